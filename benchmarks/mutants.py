"""Deliberate breakages as a standing check: each mutant is applied alone to a scratch copy of the
tree, the tests that should catch it run there, and the mutant is killed if they fail.

    python benchmarks/mutants.py [--only NAME,NAME] [--list] [--timeout 600] [--json OUT]

Prints one line per mutant (killed / SURVIVED, seconds, the tests run) and the mutation score;
exits 1 if any mutant survived. A mutant whose text is not found exactly once in its file is an
error of this list (the code moved): it is reported as such, never counted as killed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    before: str
    after: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("normalise-always-bgr", "delf_retrieval/model/delf.py",
           'x = rgb[..., ::-1] if norm["bgr"] else rgb', "x = rgb[..., ::-1]",
           ("tests/test_reference_values.py",)),
    Mutant("npz-allow-pickle", "delf_retrieval/npz.py",
           "np.load(source, allow_pickle=False)", "np.load(source, allow_pickle=True)",
           ("tests/test_fault_injection.py::test_no_npz_loader_unpickles_an_object_array",)),
    Mutant("publish-skips-verify", "delf_retrieval/index/versions.py",
           "    segments.verify(storage.join(root, folder), deep)\n    pointer = pointer_from_version(version, folder)",
           "    pointer = pointer_from_version(version, folder)",
           ("tests/test_fault_injection.py::test_a_damaged_shard_in_the_new_version_does_not_move_the_pointer",)),
    Mutant("publish-trusts-the-new-segment", "delf_retrieval/index/versions.py",
           "    segments.verify(storage.join(root, folder), deep)", "    segments.verify(storage.join(root, folder), set())",
           ("tests/test_segment_builds.py::test_publishing_reads_only_the_segments_the_run_wrote",)),
    Mutant("merge-keeps-tombstoned-rows", "delf_retrieval/index/merging.py",
           'keep = (cells >= first) & (cells < end) & ~np.isin(table.column("image_id").to_numpy(), gone)',
           "keep = (cells >= first) & (cells < end)",
           ("tests/test_segment_builds.py::test_a_nightly_run_writes_only_its_segment_and_merges_keep_every_answer",)),
    Mutant("receptive-field-start-off-by-one", "delf_retrieval/extraction/receptive_field.py",
           "start=first.start + ((k - 1) / 2.0 - pad) * first.stride,",
           "start=first.start + ((k - 1) / 2.0 - pad + 1) * first.stride,",
           ("tests/test_receptive_field.py",)),
    Mutant("feature-centres-off-by-one", "delf_retrieval/extraction/receptive_field.py",
           "return self.start + self.stride * np.arange(n, dtype=np.float64)",
           "return self.start + 1 + self.stride * np.arange(n, dtype=np.float64)",
           ("tests/test_reference_values.py",)),
    Mutant("ransac-threshold-ignored", "delf_retrieval/query/verify.py",
           "threshold2 = float(residual_threshold) ** 2", "threshold2 = float(20.0) ** 2",
           ("tests/test_verify.py",)),
    Mutant("dead-letter-tag-dropped", "transforms/extract.py",
           'yield (beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(uri, "decode", failure.reason, str(failure)))',
           'yield (dead_letter(uri, "decode", failure.reason, str(failure))',
           ("tests/test_transforms.py",)),
    Mutant("lock-not-taken", "pipeline/cli.py",
           "lock = versions.RunLock(root, args.lock_ttl, owner=uuid.uuid4().hex, track_pid=local).acquire()",
           "lock = versions.RunLock(root, args.lock_ttl, owner=uuid.uuid4().hex, track_pid=local)",
           ("tests/test_hostile_inputs.py::test_pipeline_run_takes_the_same_lock_and_prunes_nothing_under_a_live_run",)),
    Mutant("manifest-path-escapes-root", "delf_retrieval/index/layout.py",
           'if (any(p in ("", ".", "..") for p in parts)', 'if (any(p in ("",) for p in parts)',
           ("tests/test_hostile_inputs.py::test_a_manifest_path_leaving_the_root_is_refused",)),
    Mutant("accounting-check-off", "delf_retrieval/build/encode.py",
           "    if accounted != listed:", "    if False:",
           ("tests/test_fault_injection.py::test_a_lost_image_record_stops_the_publish",)),
    Mutant("rejected-fraction-ignored", "delf_retrieval/build/encode.py",
           "if listed and len(dead_letters) / listed > max_rejected_fraction:",
           "if listed and len(dead_letters) / listed > 1.0:",
           ("tests/test_hostile_inputs.py::test_a_build_that_rejects_most_inputs_is_not_published",)),
    Mutant("local-cas-ignores-token", "delf_retrieval/storage.py",
           "    with _local_guard(path):\n        if _local_token(path) != token:\n            raise PreconditionFailed(f\"{path} changed since it was read\")\n        write_bytes(path, data)",
           "    with _local_guard(path):\n        write_bytes(path, data)",
           ("tests/test_fault_injection.py::test_two_publishers_holding_one_token_cannot_both_write",)),
    Mutant("gcs-cas-unconditional", "delf_retrieval/storage.py",
           "blob.upload_from_string(data, if_generation_match=int(token) if token is not None else 0)",
           "blob.upload_from_string(data)",
           ("tests/test_fault_injection.py::test_gcs_conditional_writes_and_deletes_enforce_the_generation",)),
    Mutant("fetch-deadline-never-fires", "delf_retrieval/corpus/inputs.py",
           "        self._timer.start()\n", "",
           ("tests/test_hostile_inputs.py::test_a_dripping_server_is_cut_off_at_the_deadline",)),
    Mutant("fifo-and-devices-read", "delf_retrieval/storage.py",
           "        if not stat.S_ISREG(mode):", "        if False:",
           ("tests/test_hostile_inputs.py::test_devices_fifos_and_folders_are_refused_without_reading",)),
    Mutant("redirect-to-ftp-followed", "delf_retrieval/corpus/inputs.py",
           "        try:\n            check_url(newurl)\n", "        try:\n            pass\n",
           ("tests/test_hostile_inputs.py::test_redirects_go_to_http_only_and_credentials_are_refused",)),
    Mutant("decode-lets-untyped-errors-out", "delf_retrieval/corpus/images.py",
           "    except Exception as e:  # noqa: BLE001 - a decoder's own bug on hostile bytes is still a corrupt file\n"
           "        raise CorruptImageError",
           "    except ZeroDivisionError as e:  # noqa: BLE001 - a decoder's own bug on hostile bytes is still a corrupt file\n"
           "        raise CorruptImageError",
           ("tests/test_fuzz_decode.py::test_a_decoder_bug_on_hostile_bytes_is_a_corrupt_file",
            "tests/test_fuzz_decode.py::test_mutants_of_every_format_decode_or_raise_a_typed_error")),
    Mutant("every-pillow-format-decoded", "delf_retrieval/corpus/images.py",
           "img = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)", "img = Image.open(io.BytesIO(data))",
           ("tests/test_fuzz_decode.py::test_only_the_allow_listed_formats_are_decoded",)),
    Mutant("png-text-chunk-unbounded", "delf_retrieval/corpus/images.py",
           "MAX_METADATA_CHUNK = 1 << 20", "MAX_METADATA_CHUNK = 1 << 30",
           ("tests/test_fuzz_decode.py::test_metadata_is_bounded_per_chunk_and_in_all",)),
    Mutant("png-text-total-unbounded", "delf_retrieval/corpus/images.py",
           "MAX_METADATA_TOTAL = 8 << 20", "MAX_METADATA_TOTAL = 1 << 30",
           ("tests/test_fuzz_decode.py::test_metadata_is_bounded_per_chunk_and_in_all",)),
    Mutant("pixel-limit-not-checked", "delf_retrieval/corpus/images.py",
           "    if width * height > limits.max_pixels:\n        raise ImageTooLargeError(",
           "    if False:\n        raise ImageTooLargeError(",
           ("tests/test_images.py::test_huge_image_is_refused_before_decoding",)),
    Mutant("csv-rows-merged", "delf_retrieval/corpus/inputs.py",
           'if any("\\n" in cell or "\\r" in cell for cell in row):', "if False:",
           ("tests/test_hostile_inputs.py::test_an_unclosed_quote_is_an_error_naming_the_line",)),
    Mutant("duplicates-indexed-twice", "delf_retrieval/corpus/inputs.py",
           "        if seen is image:\n            continue", "        continue",
           ("tests/test_hostile_inputs.py::test_a_uri_listed_twice_is_listed_once_and_reported",)),
    Mutant("unreadable-lock-broken-at-once", "delf_retrieval/index/versions.py",
           "if modified + self.ttl_seconds >= time.time():", "if False:",
           ("tests/test_hostile_inputs.py::test_an_unreadable_lock_is_named_then_stale_after_its_ttl_and_breakable",)),
    Mutant("resume-ignores-stream-position", "delf_retrieval/training/loop.py",
           "make_dataset(start, resume_at if resume_at >= 0 else None)", "make_dataset(start, None)",
           ("tests/test_training.py::test_a_resumed_descriptor_run_sees_exactly_the_uninterrupted_stream",)),
    Mutant("row-group-crc-unchecked", "delf_retrieval/index/shard_reader.py",
           'if len(data) != record["length"] or zlib.crc32(data) != record["crc32"]:',
           'if len(data) != record["length"]:',
           ("tests/test_shards.py::test_corrupt_row_group_is_caught_when_read_and_by_verify",)),
    Mutant("average-precision-without-trapezoid", "delf_retrieval/query/evaluation.py",
           "return float(np.sum((precision_0 + precision_1) / 2.0) / n_positives)",
           "return float(np.sum(precision_1) / n_positives)",
           ("tests/test_evaluation.py",)),
    Mutant("gpu-hint-on-the-network-only", "transforms/index.py",
           "encoded.append(encode_images(features, model, job, descriptors, accelerator=self.accelerator))",
           "encoded.append(encode_images(features, model, job, descriptors))",
           ("tests/test_dataflow_jobs.py::test_extraction_streams_into_encoding_with_nothing_between_them",)),
    Mutant("worker-accelerator-beside-the-hint", "pipeline/dataflow.py",
           "        for experiment in EXPERIMENTS:",
           '        options += ["--dataflow_service_options", f"worker_accelerator={self.accelerator}"]\n'
           "        for experiment in EXPERIMENTS:",
           ("tests/test_dataflow_jobs.py::test_the_job_runs_the_given_image_with_the_given_options",)),
    Mutant("sdist-without-transforms", "setup.py",
           '"transforms", "transforms.*"]', '"transforms.*"]',
           ("tests/test_dataflow_jobs.py::test_the_staged_sdist_installs_in_a_fresh_venv_and_every_pickled_object_loads_there",)),
    Mutant("serve-queue-unbounded", "pipeline/service/pool.py",
           "            if self.waiting + self.running >= self.workers + self.max_queue:", "            if False:",
           ("tests/test_serve.py::test_a_full_queue_is_503_with_retry_after_and_a_late_answer_504",)),
    Mutant("serve-token-ignored", "pipeline/service/limits.py",
           "elif self.token is not None and path not in OPEN_PATHS and not self._authorised(headers):",
           "elif False:",
           ("tests/test_serve.py::test_the_token_guards_everything_but_the_page_and_healthz",)),
    Mutant("scrub-checks-sizes-only", "delf_retrieval/index/scrub.py",
           "            layout.checked_read(root, record, checksum=True)",
           "            layout.checked_read(root, record, checksum=False)",
           ("tests/test_bit_rot.py::test_a_round_robin_scrub_reads_every_byte_within_its_bound_and_finds_a_flip",)),
    Mutant("repair-keeps-the-damaged-segment", "delf_retrieval/build/planning.py",
           "    return Start(scrub.without_segments(pointer, set(damaged)), previous,",
           "    return Start(pointer, previous,",
           ("tests/test_bit_rot.py::test_repair_leaves_the_damaged_shared_segment_out_and_extracts_its_images_again",)),
    Mutant("serve-no-header-timeout", "pipeline/service/connections.py",
           "        if not self.answering():\n            self.close_idle()", "        pass",
           ("tests/test_serve_connections.py::test_idle_and_dripping_sockets_are_closed_after_the_header_timeout_and_keep_no_one_out",)),
    Mutant("serve-any-address-fetched", "pipeline/service/urls.py",
           "    return address.is_global and not address.is_multicast and not address.is_reserved", "    return True",
           ("tests/test_serve_urls.py",)),
    Mutant("serve-raw-method-label", "pipeline/service/metrics.py",
           'method = scope["method"] if scope["method"] in METHODS else "other"', 'method = scope["method"]',
           ("tests/test_serve_connections.py::test_metrics_labels_stay_few_whatever_methods_and_paths_clients_invent",)),
    Mutant("ci-skips-allowed", "tests/ci_skips.py",
           "        session.exitstatus = 1", "        pass",
           ("tests/test_ci_skips.py",)),
)


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line and os.path.isfile(os.path.join(ROOT, line))]


def scratch_copy(files: list[str], into: str) -> None:
    for rel in files:
        target = os.path.join(into, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)


def apply(tree: str, mutant: Mutant) -> None:
    path = os.path.join(tree, mutant.path)
    text = open(path).read()
    count = text.count(mutant.before)
    if count != 1:
        raise LookupError(f"{mutant.name}: its text occurs {count} times in {mutant.path}, not once")
    open(path, "w").write(text.replace(mutant.before, mutant.after))


def run_mutant(mutant: Mutant, files: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as scratch:
        tree = os.path.join(scratch, "tree")
        scratch_copy(files, tree)
        missing = [t for t in mutant.tests if not os.path.exists(os.path.join(tree, t.split("::")[0]))]
        try:
            if missing:
                raise LookupError(f"{mutant.name}: no test file {', '.join(missing)}")
            apply(tree, mutant)
        except LookupError as e:
            return {"name": mutant.name, "status": "error", "detail": str(e), "seconds": 0.0}
        env = {**os.environ, "PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "3", "CI": ""}
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests],
                                  cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:]
            if done.returncode in (4, 5):  # usage error, or no test ran: the list is wrong, not the code
                return {"name": mutant.name, "status": "error", "seconds": round(time.perf_counter() - start, 1),
                        "detail": f"pytest exit {done.returncode}: {tail[0] if tail else ''}"}
            killed = done.returncode != 0
        except subprocess.TimeoutExpired:
            killed, tail = True, ["timed out (counted as killed: the tests did not pass)"]
        return {"name": mutant.name, "status": "killed" if killed else "survived",
                "seconds": round(time.perf_counter() - start, 1), "tests": list(mutant.tests),
                "detail": tail[0] if tail else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's tests")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench_results", "mutants.json"))
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m.name:38s} {m.path}  ->  {' '.join(m.tests)}")
        return 0
    files = tracked_files()
    results = []
    for mutant in chosen:
        result = run_mutant(mutant, files, args.timeout)
        results.append(result)
        print(f"{result['status'].upper() if result['status'] != 'killed' else 'killed':9s} {result['seconds']:7.1f} s  "
              f"{mutant.name:38s} {result.get('detail', '')}", flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    counted = sum(r["status"] in ("killed", "survived") for r in results)
    score = killed / counted if counted else 0.0
    print(f"mutation score: {killed}/{counted} killed ({score:.0%}); "
          f"{sum(r['status'] == 'error' for r in results)} mutants whose text was not found")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"mutants": results, "killed": killed, "counted": counted, "score": score}, f, indent=2)
    return 0 if killed == counted == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
