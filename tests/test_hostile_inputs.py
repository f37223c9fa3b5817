"""The worst inputs a nightly build meets, one at a time and together: dripping and redirecting
servers, devices and FIFOs, malformed listings, duplicated uris, manifests that point outside the
index, unreadable locks, a writer ignoring the lock, too many rejects, and every command line
answering one clear line instead of a traceback."""

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from delf_retrieval import storage
from delf_retrieval.build import encode
from delf_retrieval.corpus import images, inputs
from delf_retrieval.index import layout, segment_reader, segments, versions
from pipeline import build_quantizer, cli, evaluate, extract, reindex
from pipeline import run as run_job
from pipeline import search, train
from tests.conftest import REPO_ROOT, SAMPLES
from tests.fuzzing import encoded_bases
from tests.test_fuzz_decode import png_with_text_bomb

TINY = ["--scales", "1.0", "--max-features", "100", "--max-image-size", "320", "--cells", "8", "--no-progress"]
DRIP_SECONDS = 20  # how long a dripping handler would keep going if nobody hung up


class HostileHandler(http.server.BaseHTTPRequestHandler):
    """/drip-body: headers, then one byte a second; /drip-headers: one header byte a second;
    /to-ftp and /to-credentials: redirects; /huge: announces 1 GB; /image: a real photograph."""

    requests = []

    def log_message(self, *args):
        pass

    def _drip(self, data: bytes):
        for i in range(min(len(data), DRIP_SECONDS)):
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:
                return
            time.sleep(1)

    def do_GET(self):  # noqa: N802 - the handler API's name
        HostileHandler.requests.append(self.path)
        if self.path == "/drip-body":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self._drip(b"\xff\xd8" + b"x" * 998)
        elif self.path == "/drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._drip(b"X-Slow: " + b"y" * 100)
        elif self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/photo.jpg")
            self.end_headers()
        elif self.path == "/to-credentials":
            self.send_response(302)
            self.send_header("Location", f"http://user:secret@127.0.0.1:{self.server.server_port}/image")
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
        elif self.path == "/image":
            data = open(os.path.join(SAMPLES, "berlin_cathedral", "01.jpg"), "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)


@contextlib.contextmanager
def hostile_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    server.daemon_threads, server.block_on_close = True, False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server():
    with hostile_server() as url:
        yield url


def quick_fetcher(**overrides):
    return inputs.Fetcher(inputs.FetchConfig(**{"timeout": 1.5, "retries": 0, "backoff": 0.0, **overrides}))


# ---------------------------------------------------------------------------------------------
# Reading: bounded in time and size, regular files only, http(s) only


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_a_dripping_server_is_cut_off_at_the_deadline(server, path):
    start = time.monotonic()
    with pytest.raises(inputs.FetchError, match="within 1.5 s"):
        quick_fetcher().fetch(server + path)
    assert time.monotonic() - start < 4.0
    start = time.monotonic()
    with pytest.raises(inputs.FetchError, match="after 2 attempts"):
        quick_fetcher(retries=1).fetch(server + path)
    assert time.monotonic() - start < 7.0  # the deadline is per attempt


def test_redirects_go_to_http_only_and_credentials_are_refused(server):
    HostileHandler.requests.clear()
    with pytest.raises(inputs.FetchRefused, match="only http"):
        quick_fetcher().fetch(server + "/to-ftp")
    with pytest.raises(inputs.FetchRefused, match="credentials"):
        quick_fetcher().fetch(server + "/to-credentials")
    assert HostileHandler.requests == ["/to-ftp", "/to-credentials"]  # refused before following
    with pytest.raises(inputs.FetchRefused, match="credentials"):
        quick_fetcher().fetch(server.replace("http://", "http://user:pw@") + "/image")
    with pytest.raises(inputs.FetchRefused, match="exceeds the limit"):
        quick_fetcher().fetch(server + "/huge")
    assert HostileHandler.requests == ["/to-ftp", "/to-credentials", "/huge"]  # nothing sent with credentials
    assert len(quick_fetcher().fetch(server + "/image")) > 10_000


def test_devices_fifos_and_folders_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # opening it for reading would block forever, reading a writer's data
    for path, kind in (("/dev/zero", "device"), (str(fifo), "FIFO"), (str(tmp_path), "directory")):
        with pytest.raises(images.UnreadableImageError, match=kind):
            inputs.read_image_bytes(path)
        with pytest.raises(images.UnreadableImageError):
            images.load_image(path)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 5000)
    with pytest.raises(images.ImageTooLargeError):
        inputs.read_image_bytes(str(big), inputs.Fetcher(inputs.FetchConfig(max_bytes=4999)))
    assert inputs.read_image_bytes(str(big), inputs.Fetcher(inputs.FetchConfig(max_bytes=5000))) == b"\xff" * 5000
    with pytest.raises(images.UnreadableImageError, match="not a local path"):
        inputs.read_image_bytes("file:///etc/passwd")


def test_fetch_config_round_trips_as_json():
    config = inputs.FetchConfig(timeout=3.0, retries=1, max_bytes=1000)
    assert inputs.FetchConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


# ---------------------------------------------------------------------------------------------
# Listings: strict, relative to their folder, each uri once


def test_an_unclosed_quote_is_an_error_naming_the_line(tmp_path):
    text = 'path,label\na.jpg,x\n"b.jpg,y\nc.jpg,z\nd.jpg,w\n'
    with pytest.raises(inputs.ListingError, match=r"list.csv line 3: .*never closed"):
        inputs.parse_csv(text, name="list.csv")
    with pytest.raises(inputs.ListingError, match=r"list.csv line 3: .*runs over lines 3-4 \(an unclosed quote"):
        inputs.parse_csv(text.replace("c.jpg,z", 'c.jpg",z'), name="list.csv")
    with pytest.raises(inputs.ListingError, match="line 2"):
        inputs.parse_csv('path\n"a.jpg"x\n', name="list.csv")
    with pytest.raises(inputs.ListingError, match="line 3"):
        inputs.parse_csv("path\na.jpg\nb\x00.jpg\n", name="list.csv")
    with pytest.raises(inputs.ListingError, match="no uri"):
        inputs.parse_csv("path,label\n,x\n", name="list.csv")
    assert inputs.parse_csv('path,label\n"a,b.jpg",x\n\nc.jpg,\n') == [inputs.InputImage("a,b.jpg", "x"),
                                                                       inputs.InputImage("c.jpg", None)]


def test_relative_rows_resolve_against_the_listing_in_the_build_and_in_training(tmp_path, monkeypatch):
    from delf_retrieval.training import data

    (tmp_path / "photos").mkdir()
    listing = tmp_path / "photos" / "list.csv"
    listing.write_text("path,label\na.jpg,x\nsub/b.jpg,y\n/abs/c.jpg,z\nhttp://h/d.jpg,w\n")
    monkeypatch.chdir(tmp_path)
    listed, repeats = inputs.list_source(os.path.join("photos", "list.csv"))
    folder = str(tmp_path / "photos")
    assert [i.uri for i in listed] == [os.path.join(folder, "a.jpg"), os.path.join(folder, "sub/b.jpg"),
                                       "/abs/c.jpg", "http://h/d.jpg"] and repeats == []
    assert data.list_csv(os.path.join("photos", "list.csv")).uris == [i.uri for i in listed]


def test_a_uri_listed_twice_is_listed_once_and_reported():
    unique, repeats = inputs.unique_inputs([inputs.InputImage("a", "x"), inputs.InputImage("b", None),
                                            inputs.InputImage("a", "y"), inputs.InputImage("b", None)])
    assert unique == [inputs.InputImage("a", "x"), inputs.InputImage("b", None)]
    assert [(r["uri"], r["stage"], r["reason"]) for r in repeats] == [("a", "list", "duplicate"),
                                                                     ("b", "list", "duplicate")]
    assert "'y'" in repeats[0]["error"] and "'x'" in repeats[0]["error"]


# ---------------------------------------------------------------------------------------------
# One Beam build over a listing full of bad inputs


@pytest.fixture(scope="module")
def hostile_build(tmp_path_factory, cache_dir, server):
    """A listing of nine good photographs beside a text bomb, an EPS, a FIFO, /dev/zero, a dripping
    URL, a decoder that fails unexpectedly for one file, and a uri listed twice with two labels."""
    folder = tmp_path_factory.mktemp("hostile")
    rows = ["path,label"]
    for scene in ("berlin_cathedral", "lund_street", "sacre_coeur"):
        os.makedirs(folder / scene)
        for name in sorted(os.listdir(os.path.join(SAMPLES, scene)))[:3]:
            shutil.copy(os.path.join(SAMPLES, scene, name), folder / scene / name)
            rows.append(f"{scene}/{name},{scene}")
    (folder / "bomb.png").write_bytes(png_with_text_bomb())
    (folder / "page.eps").write_bytes(next(d for label, d in encoded_bases() if label.startswith("EPS")))
    os.mkfifo(folder / "fifo.jpg")
    shutil.copy(os.path.join(SAMPLES, "lund_street", "10.jpg"), folder / "boom.jpg")
    rows += ["bomb.png,x", "page.eps,x", "fifo.jpg,x", "/dev/zero,x", f"{server}/drip-body,x", "boom.jpg,x",
             f"{rows[1].split(',')[0]},another-label"]
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    output = folder / "index"
    real_decode = images.decode_image

    def decode_or_fail(data, limits=images.DecodeLimits(), name="<bytes>"):
        if name.endswith("boom.jpg"):
            raise RuntimeError("a decoder bug")
        return real_decode(data, limits, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "decode_image", decode_or_fail)
        start = time.monotonic()
        status = cli.main(run_job.run, ["--input", str(folder / "list.csv"), "--output", str(output),
                                        "--fetch-timeout", "2", "--fetch-retries", "0"] + TINY)
        seconds = time.monotonic() - start
    return folder, output, status, seconds


def test_a_build_over_bad_inputs_publishes_the_good_ones_and_accounts_for_every_row(hostile_build):
    folder, output, status, seconds = hostile_build
    assert status == 0
    manifest = segments.verify(str(output))
    dead = pq.read_table(os.path.join(output, manifest["files"]["dead_letters"]["path"])).to_pylist()
    reasons = {d["uri"].replace(str(folder) + "/", ""): (d["stage"], d["reason"]) for d in dead}
    drip = next(u for u in reasons if u.endswith("/drip-body"))
    first = "berlin_cathedral/" + sorted(os.listdir(os.path.join(SAMPLES, "berlin_cathedral")))[0]
    assert reasons == {"bomb.png": ("decode", "too_large"), "page.eps": ("decode", "unsupported"),
                       "fifo.jpg": ("read", "unreadable"), "/dev/zero": ("read", "unreadable"),
                       drip: ("fetch", "fetch_failed"), "boom.jpg": ("decode", "internal_error"),
                       first: ("list", "duplicate")}
    assert "RuntimeError: a decoder bug" in next(d["error"] for d in dead if d["uri"].endswith("boom.jpg"))
    table = segment_reader.open_reader(str(output)).images.to_pylist()
    assert len(table) == 9 and {r["label"] for r in table} == {"berlin_cathedral", "lund_street", "sacre_coeur"}
    assert next(r for r in table if r["uri"].endswith(first))["label"] == "berlin_cathedral"  # the first listing
    counts = manifest["counts"]
    assert counts["inputs"] == 16 == counts["images"] + counts["rejected"] and counts["rejected"] == 7
    assert seconds < 240  # the dripping server did not hold the build


def test_the_nightly_run_over_the_same_listing_publishes_too(hostile_build, tmp_path):
    folder, output, _, _ = hostile_build
    root = tmp_path / "root"
    shutil.copytree(output, root)
    before = layout.read_manifest(str(root))["build"]
    assert cli.main(reindex.run, ["--input", str(folder / "list.csv"), "--index", str(root), "--fetch-timeout", "2",
                                  "--fetch-retries", "0"] + TINY) == 0
    manifest = segments.verify(str(root))
    assert manifest["previous"] == before and manifest["counts"]["images"] == 10  # boom.jpg decodes now
    dead = pq.read_table(os.path.join(root, manifest["files"]["dead_letters"]["path"])).to_pylist()
    assert {(d["stage"], d["reason"]) for d in dead} == {("decode", "too_large"), ("decode", "unsupported"),
                                                         ("read", "unreadable"), ("fetch", "fetch_failed"),
                                                         ("list", "duplicate")}
    assert manifest["counts"]["inputs"] == 16


def test_extract_rejects_the_bomb_and_goes_on(hostile_build, tmp_path, capsys):
    folder, _, _, _ = hostile_build
    good = os.path.join(folder, "lund_street", sorted(os.listdir(os.path.join(SAMPLES, "lund_street")))[0])
    status = cli.main(extract.run, [str(folder / "bomb.png"), str(folder / "fifo.jpg"), good, "--output",
                                    str(tmp_path / "out")] + TINY[:6] + ["--no-progress"])
    assert status == 0
    rejected = {os.path.basename(r.split(",")[0]): r.split(",")[1]
                for r in (tmp_path / "out" / "rejected.csv").read_text().splitlines()[1:]}
    assert rejected == {"bomb.png": "too_large", "fifo.jpg": "unreadable"}


def test_a_query_that_times_out_is_reported_and_the_others_are_answered(hostile_build, server, tmp_path, capsys):
    _, output, _, _ = hostile_build
    good = os.path.join(SAMPLES, "sacre_coeur", sorted(os.listdir(os.path.join(SAMPLES, "sacre_coeur")))[0])
    results = tmp_path / "results.json"
    start = time.monotonic()
    status = cli.main(search.run, ["--index", str(output), "--output", str(results), "--fetch-timeout", "1.5",
                                   "--fetch-retries", "0", f"{server}/drip-body", good])
    assert time.monotonic() - start < 120
    assert status == 1  # a query failed
    answers = {r["query"]: r["matches"] for r in json.loads(results.read_text())["results"]}
    assert answers[f"{server}/drip-body"] == []
    assert "sacre_coeur" in answers[good][0]["uri"]
    assert "within 1.5 s" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# An index cannot send a reader outside its root


def copy_index(output, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(output, root)
    return root


def edit_pointer(root, change):
    path = root / layout.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("field,value", [
    ("files.tombstones", "../../outside.parquet"), ("files.tombstones", "/etc/passwd"),
    ("codebooks.quantizer", "a/../../b.npz"), ("segments", "../outside.parquet"), ("segments", "segments//x.json"),
    ("build", "builds/../.."), ("previous", "/etc"), ("codebooks.pca", "gs://elsewhere/pca.npz"),
    ("files.tombstones", "..\\..\\x"),
])
def test_a_manifest_path_leaving_the_root_is_refused(hostile_build, tmp_path, field, value):
    root = copy_index(hostile_build[1], tmp_path)
    (tmp_path / "outside.parquet").write_bytes(b"secret")

    def change(manifest):
        if field.startswith(("files.", "codebooks.")):
            manifest[field.split(".")[0]][field.split(".")[1]]["path"] = value
        elif field == "segments":
            manifest["segments"][0]["path"] = value
        else:
            manifest[field] = value

    edit_pointer(root, change)
    with pytest.raises(layout.ManifestError, match=field.replace(".", r"\.").replace("segments", r"segments\[0\]")) as e:
        segment_reader.open_reader(str(root))
    assert "passwd" not in str(e.value) or "does not stay inside" in str(e.value)
    with pytest.raises(layout.ManifestError):
        versions.current(str(root))


def test_a_symbolic_link_out_of_the_index_is_refused(hostile_build, tmp_path):
    root = copy_index(hostile_build[1], tmp_path)
    pointer = layout.read_manifest(str(root))
    segment = segments.segment_refs(pointer)[0]
    images_path = root / segment.folder / segments.read_segment(str(root), segment).images["path"]
    os.remove(images_path)
    os.symlink("/etc/passwd", images_path)
    with pytest.raises(layout.ManifestError, match="symbolic link"):
        segment_reader.open_reader(str(root))


# ---------------------------------------------------------------------------------------------
# Command lines: one line and a hint, a documented status, the traceback only with --debug


def one_error_line(capsys, prog):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"python -m {prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_commands_answer_bad_input_with_one_line(hostile_build, tmp_path, capsys):
    folder, output, _, _ = hostile_build
    bad_listing = tmp_path / "list.csv"
    bad_listing.write_text('path\na.jpg\n"b.jpg\nc.jpg\n')
    assert cli.main(run_job.run, ["--input", str(bad_listing), "--output", str(tmp_path / "i")] + TINY) == 2
    assert "list.csv line 3" in one_error_line(capsys, "pipeline.run")
    assert cli.main(run_job.run, ["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "i")] + TINY) == 2
    assert "no such folder" in one_error_line(capsys, "pipeline.run")

    root = copy_index(output, tmp_path)
    shard = root / segments.posting_shards(str(root), layout.read_manifest(str(root)))[0]["path"]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    query = os.path.join(SAMPLES, "lund_street", "01.jpg")
    assert cli.main(search.run, ["--index", str(root), "--output", str(tmp_path / "r.json"), query]) == 2
    assert "truncated or replaced" in one_error_line(capsys, "pipeline.search")
    assert cli.main(search.run, ["--index", str(output), "--queries", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in one_error_line(capsys, "pipeline.search")
    os.remove(root / layout.MANIFEST)
    (root / layout.MANIFEST).write_text('{"format": "delf-retrieval-index", "format_')
    assert cli.main(reindex.run, ["--input", str(folder), "--index", str(root)] + TINY) == 2
    assert "cannot read" in one_error_line(capsys, "pipeline.reindex")
    (tmp_path / "no-features").mkdir()
    assert cli.main(build_quantizer.run, ["--features", str(tmp_path / "no-features"), "--output",
                                          str(tmp_path / "q")]) == 2
    assert "no feature files" in one_error_line(capsys, "pipeline.build_quantizer")
    assert cli.main(train.run, ["descriptor", "--input", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "t")]) == 2
    assert "missing.csv" in one_error_line(capsys, "pipeline.train")
    assert cli.main(evaluate.run, ["--results", str(tmp_path / "absent.json"), "--ground-truth",
                                   str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in one_error_line(capsys, "pipeline.evaluate")
    (tmp_path / "a-file").write_text("")
    assert cli.main(extract.run, [str(folder / "bomb.png"), "--output", str(tmp_path / "a-file")] + TINY[:6]) == 2
    assert "a-file" in one_error_line(capsys, "pipeline.extract")
    # --debug adds the traceback.
    assert cli.main(run_job.run, ["--input", str(bad_listing), "--output", str(tmp_path / "i"), "--debug"] + TINY) == 2
    assert "Traceback" in capsys.readouterr().err


def test_the_entry_point_itself_speaks_one_line(tmp_path):
    """One line and a hint, after TensorFlow has loaded (pipeline.search loads it first) without its
    start-up lines; --debug adds the traceback."""
    argv = [sys.executable, "-m", "pipeline.search", "--index", str(tmp_path / "none"), "q.jpg"]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("python -m pipeline.search: error: ") and "Traceback" not in result.stderr
    assert [line.split(": ")[1] for line in result.stderr.splitlines()] == ["error", "hint"], result.stderr
    debug = subprocess.run(argv + ["--debug"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


# ---------------------------------------------------------------------------------------------
# One lock for every writer


def test_an_unreadable_lock_is_named_then_stale_after_its_ttl_and_breakable(tmp_path):
    root = str(tmp_path)
    lock_path = tmp_path / versions.LOCK_FILE
    lock_path.write_text("{not json")
    with pytest.raises(versions.LockHeld, match="reindex.lock is unreadable") as e:
        versions.RunLock(root, ttl_seconds=3600).acquire()
    assert str(lock_path) in str(e.value)
    old = time.time() - 7200
    os.utime(lock_path, (old, old))
    lock = versions.RunLock(root, ttl_seconds=3600).acquire()
    assert lock.broke == {"unreadable": "{not json"} and lock.release()
    lock_path.write_text("[1, 2]")  # JSON, but not a lock record
    with pytest.raises(versions.LockHeld, match="unreadable"):
        versions.RunLock(root, ttl_seconds=3600).acquire()
    assert versions.break_lock(root) == {} and not lock_path.exists()
    assert versions.break_lock(root) is None


def test_pipeline_run_takes_the_same_lock_and_prunes_nothing_under_a_live_run(hostile_build, tmp_path, capsys):
    root = copy_index(hostile_build[1], tmp_path)
    unfinished = root / layout.BUILDS_DIR / "29990101T000000Z-live" / "postings"
    unfinished.mkdir(parents=True)
    (unfinished / "part-00000.parquet").write_bytes(b"being written")
    pointer = (root / layout.MANIFEST).read_bytes()
    with versions.RunLock(str(root), ttl_seconds=3600):  # as pipeline.reindex holds it
        status = cli.main(run_job.run, ["--input", str(hostile_build[0] / "sacre_coeur"), "--output", str(root)] + TINY)
        assert status == cli.EXIT_LOCKED
        assert "another run holds the lock" in one_error_line(capsys, "pipeline.run")
    assert (root / layout.MANIFEST).read_bytes() == pointer and unfinished.exists()
    # --break-lock takes it over on purpose.
    versions.RunLock(str(root), ttl_seconds=3600, track_pid=False).acquire()
    assert cli.main(run_job.run, ["--input", str(hostile_build[0] / "sacre_coeur"), "--output", str(root),
                                  "--break-lock"] + TINY) == 0
    assert "broke the lock" in capsys.readouterr().err
    assert not (root / versions.LOCK_FILE).exists()


def test_pipeline_run_publishes_by_compare_and_swap(hostile_build, tmp_path, monkeypatch, capsys):
    root = copy_index(hostile_build[1], tmp_path)
    pointer = (root / layout.MANIFEST).read_bytes()
    real_current = versions.current
    monkeypatch.setattr(versions, "current", lambda r: (real_current(r)[0], "a token another run replaced"))
    status = cli.main(run_job.run, ["--input", str(hostile_build[0] / "sacre_coeur"), "--output", str(root)] + TINY)
    assert status == 1
    # Both reads of the pointer see the stale token, so the conditional write itself refuses.
    assert "another run published while this one was publishing" in one_error_line(capsys, "pipeline.run")
    assert (root / layout.MANIFEST).read_bytes() == pointer


def test_a_build_that_rejects_most_inputs_is_not_published(hostile_build, tmp_path, capsys):
    folder = tmp_path / "mostly-bad"
    folder.mkdir()
    shutil.copy(os.path.join(SAMPLES, "lund_street", "01.jpg"), folder / "good.jpg")
    for i in range(2):
        (folder / f"junk{i}.jpg").write_bytes(b"not an image" * 100)
    root = copy_index(hostile_build[1], tmp_path)
    pointer = (root / layout.MANIFEST).read_bytes()
    assert cli.main(run_job.run, ["--input", str(folder), "--output", str(root)] + TINY) == 1
    line = one_error_line(capsys, "pipeline.run")
    assert "2 of 3 inputs rejected" in line and "decode/corrupt 2" in line and "not published" in line
    assert (root / layout.MANIFEST).read_bytes() == pointer  # the previous index keeps serving
    refused = line.split("rejected inputs: ")[1].rstrip(")")
    assert len(pq.read_table(refused)) == 2


def test_check_publishable_counts_every_input():
    encode.check_publishable(3, 2, [{"uri": "c", "stage": "decode", "reason": "corrupt"}])
    with pytest.raises(encode.PublishRefused, match="1 unaccounted for"):
        encode.check_publishable(3, 2, [])
    with pytest.raises(encode.PublishRefused, match="above the allowed 10%"):
        encode.check_publishable(3, 2, [{"uri": "c", "stage": "decode", "reason": "corrupt"}], 0.1)
    assert storage.TooLarge.__mro__[1] is ValueError
