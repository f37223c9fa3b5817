"""Nightly re-indexing: a new version reflects exactly the corpus changes, unchanged images are not
extracted again (their rows are copied bit for bit), search follows, a killed run leaves the
previous version serving, two runs never both publish, rollback works, drift triggers a retrain,
gs:// through the emulator; and the version/lock primitives on their own."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from delf_retrieval import storage
from delf_retrieval.build import encode
from delf_retrieval.corpus import inputs
from delf_retrieval.corpus.images import load_image
from delf_retrieval.extraction.extractor import ExtractionConfig, Extractor
from delf_retrieval.index import layout, segment_reader, segments, shards, versions
from delf_retrieval.index.neighbour_table import NeighbourConfig
from delf_retrieval.model import delf
from delf_retrieval.query import retrieval
from pipeline import cli, reindex
from tests.conftest import REPO_ROOT, SAMPLES, SMALL, assert_shellcheck_clean, corpus_of, reindex_run
from tests.job_graph import encoding_waits_for_extraction, step_labels
from tests.test_pipeline import graph_of

BASE = {"berlin/a.jpg": ("berlin_cathedral", 0), "berlin/b.jpg": ("berlin_cathedral", 1),
        "lund/a.jpg": ("lund_street", 0), "lund/b.jpg": ("lund_street", 1), "sacre/a.jpg": ("sacre_coeur", 0)}


def last_report(root):
    pointer = layout.read_manifest(str(root))
    return json.loads(storage.read_bytes(storage.join(str(root), versions.REPORTS_DIR,
                                                      pointer["build"].split("/")[-1] + ".json")))


def rows_by_image(root):
    """{image id: sorted posting rows as tuples} of the current version's live images, straight
    from its segments' shards."""
    pointer = layout.read_manifest(str(root))
    tombstones = segments.read_tombstones(str(root), pointer)
    out = {}
    for ref in segments.segment_refs(pointer):
        for record in segments.read_segment(str(root), ref).shards:
            for row in pq.read_table(os.path.join(root, ref.folder, record["path"])).to_pylist():
                if row["image_id"] not in tombstones.of(ref.segment_id):
                    out.setdefault(row["image_id"], []).append(tuple(row.values()))
    return {k: sorted(v) for k, v in out.items()}


def extractor_of(manifest):
    """The extractor the index was built with (its settings are in the manifest)."""
    net = delf.load(delf.ModelConfig.from_json(manifest["model"]["network"]))
    config = dict(manifest["model"]["extraction"])
    return Extractor(net, ExtractionConfig.from_json(config))


def test_changes_are_reflected_exactly_and_rollback_restores(tmp_path, cache_dir):
    corpus, root = corpus_of(tmp_path / "corpus", BASE), tmp_path / "index"
    assert reindex_run(corpus, root) == 0
    first = segments.verify(str(root))
    first_report = last_report(root)
    assert first_report["mode"] == "full" and first_report["added"] == 5 and first_report["re_extracted"] == 5
    assert first["training"]["quantization_error"] > 0  # the drift baseline
    before = rows_by_image(root)
    uri = {name: str(corpus / name) for name in list(BASE) + ["lund/new.jpg"]}
    ids = {name: inputs.image_id(u) for name, u in uri.items()}

    # Tonight: one photo added, one replaced by another picture, one deleted, one only touched.
    corpus_of(corpus, {"lund/new.jpg": ("lund_street", 5), "sacre/a.jpg": ("sacre_coeur", 3)})
    os.remove(corpus / "berlin/b.jpg")
    os.utime(corpus / "lund/a.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert reindex_run(corpus, root) == 0
    report = last_report(root)
    assert {k: report[k] for k in ("mode", "added", "changed", "deleted", "unchanged", "rejected", "reused",
                                   "re_extracted", "read_to_check", "touched_unchanged")} == {
        "mode": "incremental", "added": 1, "changed": 1, "deleted": 1, "unchanged": 3, "rejected": 0, "reused": 3,
        "re_extracted": 2, "read_to_check": 2, "touched_unchanged": 1}
    second = segments.verify(str(root))
    assert second["previous"] == first["build"] and second["build"] != first["build"]
    assert segments.verify(os.path.join(root, second["build"]))["index_id"] == second["index_id"]  # self-contained
    assert second["codebooks"] == first["codebooks"]  # the model reused: the same files, not a copy

    # The image table is exactly the corpus now, with current hashes and stamps.
    reader = segment_reader.open_reader(str(root))
    images = {r["uri"]: r for r in reader.images.to_pylist()}
    assert images == {r["uri"]: {k: v for k, v in r.items() if k != "segment"}
                      for r in segments.live_images(str(root), second).to_pylist()}
    assert sorted(images) == sorted(uri[n] for n in ("berlin/a.jpg", "lund/a.jpg", "lund/b.jpg", "lund/new.jpg",
                                                       "sacre/a.jpg"))
    for u, record in images.items():
        assert record["content_hash"] == hashlib.sha256(open(u, "rb").read()).hexdigest()
        assert record["stamp"] == storage.stamp(u)
    # Unchanged images' rows are the same bytes; the deleted one's are gone; the replaced one's
    # rows are those of its new content; the new one's those of its extraction.
    after = rows_by_image(root)
    for name in ("berlin/a.jpg", "lund/a.jpg", "lund/b.jpg"):
        assert after[ids[name]] == before[ids[name]]
    assert ids["berlin/b.jpg"] not in after and ids["berlin/b.jpg"] in before
    pca, quantizer = reader.pca, reader.quantizer
    extractor = extractor_of(second)
    extracted = {name: extractor.extract(load_image(str(corpus / name))) for name in ("sacre/a.jpg", "lund/new.jpg")}
    for name, features in extracted.items():
        rows = after[ids[name]]
        assert len(rows) == len(features) == images[uri[name]]["num_features"]
        expected = encode.encode_image(ids[name], features, pca, quantizer)
        assert sorted(r[0] for r in rows) == sorted(expected.encoded.cells.tolist())
        stored = np.array(sorted((r[4], r[5]) for r in rows))
        np.testing.assert_allclose(stored, np.array(sorted(np.rint(features.locations).tolist())), atol=1)
    assert sum(len(v) for v in after.values()) == second["counts"]["descriptors"] == sum(
        r["num_features"] for r in images.values())

    # Search follows: the new photo finds itself first, and every hit is an image of the new table.
    _, hits = reader.search(pca.transform(extracted["lund/new.jpg"].descriptors), 10, nprobe=8)
    hit_ids = reader.rows(hits).image_ids.ravel()
    counted = dict(zip(*np.unique(hit_ids[hit_ids >= 0], return_counts=True)))
    assert max(counted, key=counted.get) == ids["lund/new.jpg"]
    assert set(counted) <= {inputs.image_id(u) for u in images}

    # Rollback re-points to the first version (verified), which then serves the old corpus.
    assert reindex.run(["--index", str(root), "--rollback"]) == 0
    restored = segments.verify(str(root))
    assert restored["build"] == first["build"] and restored["index_id"] == first["index_id"]
    assert str(corpus / "berlin/b.jpg") in segment_reader.open_reader(str(root)).images.column("uri").to_pylist()
    with pytest.raises(layout.ManifestError, match="no previous"):
        reindex.run(["--index", str(root), "--rollback"])
    assert layout.read_manifest(str(root))["build"] == first["build"]


def copy_root(built, tmp_path):
    shutil.copytree(built[1], tmp_path / "index")
    return built[0], tmp_path / "index"


def test_a_run_failing_at_publish_leaves_the_previous_version_serving(built, tmp_path, monkeypatch):
    corpus, root = copy_root(built, tmp_path)
    first = layout.read_manifest(str(root))

    def crash(*args, **kwargs):
        raise RuntimeError("killed while publishing")

    monkeypatch.setattr(versions, "publish", crash)
    with pytest.raises(Exception, match="killed while publishing"):
        reindex_run(corpus, root)
    monkeypatch.undo()
    assert segments.verify(str(root))["build"] == first["build"]
    assert segment_reader.open_reader(str(root)).num_rows == first["counts"]["descriptors"]
    complete, incomplete = versions.version_ids(str(root))
    assert complete == [first["build"]] and incomplete == []  # the failed run removed its own folder
    assert not os.path.exists(root / versions.LOCK_FILE)  # released
    assert reindex_run(corpus, root) == 0
    report = last_report(root)
    assert report["previous"] == first["build"] and report["pruned"] == []
    assert report["unchanged"] == 4 and report["re_extracted"] == 0


def start_run(corpus, root, *extra):
    argv = [sys.executable, "-m", "pipeline.reindex", "--input", str(corpus), "--index", str(root)] + SMALL + list(extra)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_run_leaves_the_previous_version_and_the_next_run_completes(built, tmp_path):
    corpus, root = copy_root(built, tmp_path)
    first = layout.read_manifest(str(root))
    process = start_run(corpus, root)
    deadline = time.time() + 120
    while time.time() < deadline and not versions.version_ids(str(root))[1]:
        time.sleep(0.2)  # wait for its version folder: the run is under way
    process.kill()
    process.wait()
    assert versions.version_ids(str(root))[1], "the run never started its version"
    held = json.loads((root / versions.LOCK_FILE).read_text())
    assert held["pid"] == process.pid
    assert segments.verify(str(root))["build"] == first["build"]  # still serving
    assert reindex_run(corpus, root) == 0  # breaks the dead process's lock, publishes, prunes its folder
    report = last_report(root)
    assert report["previous"] == first["build"] and len(report["pruned"]) == 1
    assert versions.version_ids(str(root))[1] == []


def test_two_concurrent_runs_do_not_both_publish(built, tmp_path):
    _, root = copy_root(built, tmp_path)
    first = layout.read_manifest(str(root))
    # The 42 sample photographs: the first run extracts them all and holds the lock for many seconds,
    # longer than the second takes to start; the second starts once that lock is taken.
    corpus = shutil.copytree(SAMPLES, tmp_path / "samples")
    runs = [start_run(corpus, root)]
    deadline = time.time() + 120
    while time.time() < deadline and not (root / versions.LOCK_FILE).exists():
        time.sleep(0.05)
    runs.append(start_run(corpus, root))
    results = [(p.wait(timeout=300), p.communicate()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, reindex.EXIT_LOCKED], results
    assert "another run holds the lock" in next(err for code, (_, err) in results if code == reindex.EXIT_LOCKED)
    complete, incomplete = versions.version_ids(str(root))
    assert len(complete) == 2 and incomplete == []  # one new version only
    assert segments.verify(str(root))["previous"] == first["build"]


def test_drift_past_the_threshold_makes_the_next_run_retrain(built, tmp_path):
    corpus, root = copy_root(built, tmp_path)
    first = layout.read_manifest(str(root))
    more = corpus_of(tmp_path / "corpus", {"lund/c.jpg": ("lund_street", 7)})
    listing = tmp_path / "listing.csv"
    listing.write_text("path\n" + "\n".join([str(p) for p in sorted(corpus.rglob("*.jpg"))] + [str(more / "lund/c.jpg")]) + "\n")
    assert reindex_run(listing, root, "--drift-threshold", "0.01") == 0
    report = last_report(root)
    assert report["mode"] == "incremental" and report["added"] == 1 and report["re_extracted"] == 1
    assert report["drift"]["ratio"] > 0.01 and report["drift"]["retrain_due"]
    assert layout.read_manifest(str(root))["drift"]["retrain_due"]
    assert reindex_run(listing, root) == 0
    retrained = last_report(root)
    assert retrained["mode"] == "full" and retrained["re_extracted"] == 5
    assert (retrained["unchanged"], retrained["added"], retrained["changed"]) == (5, 0, 0)
    pointer = layout.read_manifest(str(root))
    assert pointer["codebooks"]["quantizer"]["sha256"] != first["codebooks"]["quantizer"]["sha256"]
    assert not pointer["drift"]["retrain_due"]


def reindex_graph(corpus, root, *extra):
    """The Beam graph a re-index run builds, stopped before it runs (the run fails and publishes nothing)."""
    return graph_of(["--input", str(corpus), "--index", str(root)] + SMALL + list(extra), reindex.run)


def test_incremental_and_full_runs_encode_behind_extraction(built, tmp_path):
    corpus, root = copy_root(built, tmp_path)
    # Incremental: the model and the shard count are known before extraction, so nothing waits for it.
    assert not encoding_waits_for_extraction(reindex_graph(corpus, root))
    # A full rebuild trains on a sample of the images, extracted first, and streams the others.
    assert not encoding_waits_for_extraction(reindex_graph(corpus, root, "--retrain"))
    # With --quantizer the re-index is the fixed-quantizer mode of the same build.
    fixed = tmp_path / "quantizer"
    fixed.mkdir()
    for name in ("pca.npz", "quantizer.npz"):
        (fixed / name).write_bytes(b"read by the workers, not here")
    graph = reindex_graph(corpus, root, "--quantizer", str(fixed))
    assert not encoding_waits_for_extraction(graph)
    labels = step_labels(graph)
    assert any(label.startswith("BuildIndex/GivenModel") for label in labels)
    assert not any(step in label for label in labels for step in ("Train", "Carry", "ReadModel"))


def test_gcs_build_update_and_rollback(tmp_path, cache_dir, gcs_emulator):
    local = corpus_of(tmp_path / "corpus", {"berlin/a.jpg": ("berlin_cathedral", 0), "lund/a.jpg": ("lund_street", 0),
                                            "sacre/a.jpg": ("sacre_coeur", 0), "lund/b.jpg": ("lund_street", 2)})
    for path in sorted(local.rglob("*.jpg")):
        storage.upload(str(path), f"{gcs_emulator}/photos/{path.relative_to(local)}")
    root = f"{gcs_emulator}/nightly"
    assert reindex_run(f"{gcs_emulator}/photos", root) == 0
    first = segments.verify(root)
    storage.delete(f"{gcs_emulator}/photos/lund/b.jpg")
    assert reindex_run(f"{gcs_emulator}/photos", root) == 0
    report = last_report(root)
    assert (report["deleted"], report["unchanged"], report["re_extracted"], report["read_to_check"]) == (1, 3, 0, 0)
    reader = segment_reader.open_reader(root)
    assert sorted(reader.images.column("uri").to_pylist()) == [f"{gcs_emulator}/photos/{n}" for n in
                                                              ("berlin/a.jpg", "lund/a.jpg", "sacre/a.jpg")]
    assert not storage.exists(f"{root}/{versions.LOCK_FILE}")
    assert reindex.run(["--index", root, "--rollback"]) == 0
    assert segments.verify(root)["build"] == first["build"]


# ---------------------------------------------------------------------------------------------
# Versions and the lock, without the pipeline


@pytest.fixture()
def tiny_versions(tmp_path):
    """Three complete versions written under builds/ with shards.write_index (none published)."""
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(400, 48)).astype(np.float32)
    from delf_retrieval import quantize
    from delf_retrieval.quantize import pca as pca_lib

    projection = pca_lib.fit(raw, 8)
    quantizer = quantize.train(projection.transform(raw), quantize.IndexParams(n_cells=4, pq_m=2, lopq=False))
    builds = []
    for b in range(3):
        build = f"builds/2026010{b}T000000Z-0000000{b}"
        n = 50 + b
        image_ids = np.arange(n, dtype=np.int64)
        shards.write_index(str(tmp_path / build), quantizer=quantizer, pca=projection,
                           rows=shards.PostingRows(quantizer.encode(projection.transform(raw[:n])), image_ids,
                                                   np.zeros((n, 2), np.float32), np.ones(n, np.float32),
                                                   np.ones(n, np.float32)),
                           images=shards.image_table([{"image_id": i, "uri": f"{b}/{i}", "width": 1, "height": 1,
                                                       "num_features": 1, "content_hash": "x"} for i in range(n)]))
        builds.append(build)
    return str(tmp_path), builds


def test_publish_is_a_compare_and_swap_and_prune_keeps_the_newest(tiny_versions):
    root, (a, b, c) = tiny_versions
    assert versions.current(root) == (None, None)
    pointer = versions.publish(root, a, versions.read_version(root, a), None)
    assert pointer["build"] == a and segment_reader.open_reader(root).num_rows == 50
    _, token = versions.current(root)
    versions.publish(root, b, versions.read_version(root, b), token)
    with pytest.raises(versions.PublishConflict):  # started from a, but b was published meanwhile
        versions.publish(root, c, versions.read_version(root, c), token)
    assert segments.verify(root)["build"] == b and segment_reader.open_reader(root).num_rows == 51
    assert versions.publish(root, b, versions.read_version(root, b), token)["build"] == b  # a retried step: no-op
    os.makedirs(os.path.join(root, "builds", "20250101T000000Z-dead", "postings"))
    open(os.path.join(root, "builds", "20250101T000000Z-dead", "postings", "part-00000.parquet"), "wb").close()
    assert versions.prune(root, keep=1) == ["builds/20250101T000000Z-dead"]  # c is the newest other version
    # With keep=0 c goes, but a stays: the current version replaced it, readers may still be on it.
    assert versions.prune(root, keep=0) == [c]
    assert versions.version_ids(root) == ([a, b], [])


def test_rollback_refuses_a_damaged_version(tiny_versions):
    root, (a, b, _) = tiny_versions
    versions.publish(root, a, versions.read_version(root, a), None)
    versions.publish(root, b, versions.read_version(root, b), versions.current(root)[1])
    images = os.path.join(root, a, layout.IMAGES_FILE)
    open(images, "ab").write(b"x")
    with pytest.raises(layout.ShardError):
        versions.rollback(root)
    assert segments.verify(root)["build"] == b


def test_lock_excludes_breaks_stale_and_releases_only_its_own(tmp_path, monkeypatch):
    root = str(tmp_path)
    first = versions.RunLock(root, ttl_seconds=60).acquire()
    with pytest.raises(versions.LockHeld):
        versions.RunLock(root, ttl_seconds=60).acquire()
    assert not versions.release_lock(os.path.join(root, versions.LOCK_FILE), "someone-else")
    assert first.release() and not os.path.exists(os.path.join(root, versions.LOCK_FILE))
    expired = versions.RunLock(root, ttl_seconds=-1, track_pid=False).acquire()
    second = versions.RunLock(root, ttl_seconds=60).acquire()
    assert second.broke["owner"] == expired.owner and not expired.release()
    second.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setattr(os, "getpid", lambda: dead.pid)
    versions.RunLock(root, ttl_seconds=3600).acquire()  # a live-looking lock of a process that has exited
    monkeypatch.undo()
    assert versions.RunLock(root, ttl_seconds=60).acquire().broke["pid"] == dead.pid


def test_quantization_error_measures_drift():
    """New descriptors from the training distribution keep the error; shifted ones raise it."""
    from delf_retrieval import quantize
    from delf_retrieval.quantize import pca as pca_lib

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(16, 64)).astype(np.float32) * 3
    sample = lambda n, c: (c[rng.integers(0, len(c), n)] + rng.normal(size=(n, 64))).astype(np.float32)  # noqa: E731
    train = sample(6000, centres)
    projection = pca_lib.fit(train, 16)
    quantizer = quantize.train(projection.transform(train), quantize.IndexParams(n_cells=16, pq_m=4, lopq=False))
    trained = encode.quantization_error(projection, quantizer, train)
    same = encode.quantization_error(projection, quantizer, sample(3000, centres))
    shifted = encode.quantization_error(projection, quantizer, sample(3000, rng.normal(size=(16, 64)).astype(np.float32) * 3))
    assert 0.9 < same / trained < 1.2
    assert shifted / trained > 1.5
    # The reference: mean squared distance to the reconstruction, computed directly.
    x = projection.transform(train[:100])
    enc = quantizer.encode(x)
    assert encode.quantization_error(projection, quantizer, train[:100]) == pytest.approx(
        float(np.mean(((x - quantizer.decode(enc.regions, enc.codes)) ** 2).sum(1))), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Scheduling: the Flex Template spec and the script that registers it and the Scheduler job

FLEX = os.path.join(REPO_ROOT, "flex_template")
EXAMPLES = {"input": "gs://b/photos", "index": "gs://b/index", "keep": "3", "retrain": "true", "drift_threshold": "1.5",
            "lock_ttl": "3600", "max_rejected_fraction": "0.2", "label_from_folder": "false", "preset": "lite-gpu", "num_shards": "4",
            "rows_per_shard": "1000", "batch_size": "8", "merge": "false", "max_segments": "2", "accelerator": "type:nvidia-l4;count:1;machine_type:g2-standard-8;install-nvidia-driver"}


def test_flex_template_parameters_are_the_jobs_flags():
    import re

    metadata = json.load(open(os.path.join(FLEX, "metadata.json")))
    parameters = {p["name"]: p for p in metadata["parameters"]}
    assert set(parameters) == set(EXAMPLES)
    assert {n for n, p in parameters.items() if not p.get("isOptional")} == {"input", "index"}
    argv = []
    for name, value in EXAMPLES.items():
        assert all(re.match(r, value) for r in parameters[name].get("regexes", [])), name
        argv.append(f"--{name}={value}")  # how the launcher passes template parameters
    args, beam_args = reindex.parse_args(argv)
    assert beam_args == []
    assert (args.input, args.index, args.keep, args.retrain, args.drift_threshold, args.lock_ttl,
            args.label_from_folder, args.preset, args.num_shards, args.merge, args.max_segments) == (
        "gs://b/photos", "gs://b/index", 3, True, 1.5, 3600.0, False, "lite-gpu", 4, False, 2)
    assert reindex.parse_args(["--index", "x", "--rollback"])[0].rollback is True
    dockerfile = open(os.path.join(FLEX, "Dockerfile")).read()
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/opt/delf/pipeline/reindex.py" in dockerfile
    assert "COPY pipeline ./pipeline" in open(os.path.join(REPO_ROOT, "Dockerfile")).read()  # where that file comes from


def test_schedule_script_registers_the_template_and_the_nightly_job(tmp_path):
    calls = tmp_path / "calls.jsonl"
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in ("docker", "gcloud", "git"):
        (stubs / tool).write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                  "call = [os.path.basename(sys.argv[0])] + sys.argv[1:]\n"
                                  "open(os.environ['CALLS'], 'a').write(json.dumps(call) + '\\n')\n")
        (stubs / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "CALLS": str(calls), "IMAGE_TAG": "t1"}
    result = subprocess.run(["bash", os.path.join(FLEX, "schedule_reindex.sh"), "--project", "p1", "--bucket", "b1",
                             "--repository", "r.pkg.dev/p1/delf", "--service-account", "sa@p1", "--input",
                             "gs://b1/photos", "--index", "gs://b1/index", "--schedule", "30 1 * * *"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [c[1:3] for c in made if c[0] == "docker"] == [["build", "-t"], ["push", "r.pkg.dev/p1/delf/delf-worker:t1"],
                                                        ["build", "-f"], ["push", "r.pkg.dev/p1/delf/delf-reindex-template:t1"]]
    build = next(c[1:] for c in made if c[:4] == ["gcloud", "dataflow", "flex-template", "build"])
    assert build[3] == "gs://b1/templates/delf-reindex.json"
    assert build[build.index("--metadata-file") + 1] == os.path.join(FLEX, "metadata.json")
    scheduler = next(c[1:] for c in made if c[:5] == ["gcloud", "scheduler", "jobs", "create", "http"])
    option = lambda name: scheduler[scheduler.index(name) + 1]  # noqa: E731
    assert option("--schedule") == "30 1 * * *"
    assert option("--uri") == "https://dataflow.googleapis.com/v1b3/projects/p1/locations/us-central1/flexTemplates:launch"
    body = json.loads(option("--message-body"))["launchParameter"]
    assert body["containerSpecGcsPath"] == build[3]
    assert body["environment"]["sdkContainerImage"] == "r.pkg.dev/p1/delf/delf-worker:t1"
    names = {p["name"] for p in json.load(open(os.path.join(FLEX, "metadata.json")))["parameters"]}
    assert set(body["parameters"]) <= names
    reindex.parse_args([f"--{k}={v}" for k, v in body["parameters"].items()])
    missing = subprocess.run(["bash", os.path.join(FLEX, "schedule_reindex.sh"), "--project", "p1"], env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "--bucket --repository --service-account --input --index" in missing.stderr


def test_schedule_script_is_shellcheck_clean():
    assert_shellcheck_clean(os.path.join(FLEX, "schedule_reindex.sh"))


def test_the_neighbour_table_is_built_kept_current_and_expands_queries(tmp_path, cache_dir):
    from pipeline import search as search_cli

    picks = {**BASE, "berlin/copy.jpg": BASE["berlin/a.jpg"]}  # another uri, the same photograph
    corpus, root = corpus_of(tmp_path / "corpus", picks), tmp_path / "index"
    assert reindex_run(corpus, root, "--verified-neighbours", "3", "--verified-min-inliers", "8") == 0
    reader = segment_reader.open_reader(str(root))
    assert reader.manifest["neighbours"] == {"k": 3, "min_inliers": 8}
    ids = {name: inputs.image_id(str(corpus / name)) for name in picks}
    table = reader.neighbours()
    assert set(table.image_ids) | set(table.neighbours) <= set(ids.values())
    assert all(len(table.of(i)[0]) <= 3 for i in ids.values()) and table.inliers.min() >= 8
    twins = dict(zip(*table.of(ids["berlin/a.jpg"])))
    assert twins[ids["berlin/copy.jpg"]] >= 100  # the same photograph verifies with most of its features
    assert dict(zip(*table.of(ids["berlin/copy.jpg"])))[ids["berlin/a.jpg"]] == twins[ids["berlin/copy.jpg"]]

    # Nightly: the copy is deleted, a copy of lund/a arrives. The existing lund/a gains an edge to it;
    # the deleted image leaves every list; the other edges stay.
    os.remove(corpus / "berlin/copy.jpg")
    shutil.copy(corpus / "lund/a.jpg", corpus / "lund/copy.jpg")
    ids["lund/copy.jpg"] = inputs.image_id(str(corpus / "lund/copy.jpg"))
    assert reindex_run(corpus, root) == 0  # the index's own setting, kept without the flags
    assert last_report(root)["mode"] == "incremental" and last_report(root)["re_extracted"] == 1
    after = segment_reader.open_reader(str(root))
    assert after.manifest["neighbours"] == {"k": 3, "min_inliers": 8}
    assert after.manifest["settings"] == reader.manifest["settings"]  # the settings the index was built with
    table = after.neighbours()
    assert ids["berlin/copy.jpg"] not in set(table.image_ids) | set(table.neighbours)
    assert dict(zip(*table.of(ids["lund/a.jpg"])))[ids["lund/copy.jpg"]] >= 100
    assert ids["lund/a.jpg"] in table.of(ids["lund/copy.jpg"])[0]
    for name in ("berlin/a.jpg", "berlin/b.jpg", "lund/a.jpg", "lund/b.jpg", "sacre/a.jpg"):
        before = dict(zip(*reader.neighbours().of(ids[name])))
        now = dict(zip(*table.of(ids[name])))
        for other, inliers in before.items():  # kept, unless a new image took its place in a full list
            if other != ids["berlin/copy.jpg"]:
                assert now.get(other) == inliers or (len(now) == 3 and min(now.values()) >= inliers)

    # Expansion at query time: the query's best verified match brings its stored neighbours in, pinned first.
    output = tmp_path / "results.json"
    assert search_cli.run([str(corpus / "lund/a.jpg"), "--index", str(root), "--output", str(output),
                           "--expand", "1", "--expand-min-inliers", "8"]) == 0
    matches = json.loads(output.read_text())["results"][0]["matches"]
    assert {matches[0]["uri"], matches[1]["uri"]} == {str(corpus / "lund/a.jpg"), str(corpus / "lund/copy.jpg")}
    with pytest.raises(cli.UsageError, match="verified-neighbours"):
        reindex_run(corpus, root, "--verified-neighbours", "-1", "--retrain")


def test_an_index_without_a_neighbour_table_answers_with_a_note_and_gains_one_at_its_next_run(tmp_path, cache_dir):
    from pipeline import search as search_cli

    corpus, root = corpus_of(tmp_path / "corpus", BASE), tmp_path / "index"
    assert reindex_run(corpus, root, "--verified-neighbours", "0") == 0
    assert "neighbours" not in layout.read_manifest(str(root))
    output = tmp_path / "results.json"
    query = str(corpus / "berlin/a.jpg")
    assert search_cli.run([query, "--index", str(root), "--output", str(output), "--expand", "3"]) == 0
    document = json.loads(output.read_text())
    assert document["notes"] == [retrieval.NO_NEIGHBOUR_TABLE] and document["results"][0]["matches"][0]["uri"] == query

    assert reindex_run(corpus, root) == 0  # nothing changed; the default adds the table, every image searching
    pointer = layout.read_manifest(str(root))
    assert pointer["neighbours"] == NeighbourConfig().to_json() and last_report(root)["re_extracted"] == 0
    table = segment_reader.open_reader(str(root)).neighbours()
    ids = {name: inputs.image_id(str(corpus / name)) for name in BASE}
    assert ids["berlin/b.jpg"] in table.of(ids["berlin/a.jpg"])[0]  # the cathedral's two photographs
    assert set(table.image_ids) <= set(ids.values())
    assert search_cli.run([query, "--index", str(root), "--output", str(output), "--expand", "3"]) == 0
    assert "notes" not in json.loads(output.read_text())
