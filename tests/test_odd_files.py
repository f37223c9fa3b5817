"""Odd files and failed runs: symbolic link loops, names that are not UTF-8 or too long and folders
that cannot be read are one dead letter each, never a stopped build; a run that fails (a full disk)
cleans up after itself; and damaged or mis-shaped index tables are a named error with exit 2."""

import errno
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from delf_retrieval import storage
from delf_retrieval.corpus import inputs
from delf_retrieval.index import layout, segment_reader, segments, versions
from pipeline import cli, reindex, search
from pipeline import run as run_job
from tests.conftest import SAMPLES, SMALL, corpus_of, reindex_run
from tests.test_hostile_inputs import one_error_line

NAME_MAX = 255  # bytes in one name component (ext4, tmpfs, xfs)


def dead_letters(root):
    manifest = segments.verify(str(root))
    table = pq.read_table(os.path.join(root, manifest["files"]["dead_letters"]["path"])).to_pylist()
    return manifest, {d["uri"]: (d["stage"], d["reason"], d["error"]) for d in table}


def indexed_uris(root):
    return sorted(r["uri"] for r in segment_reader.open_reader(str(root)).images.to_pylist())


@pytest.fixture(scope="module")
def odd_corpus(tmp_path_factory):
    """Five photographs (one under the longest name a folder takes) beside a folder link that
    loops, a link to itself, two links to each other, a name that is not UTF-8, and a listing that
    names the good ones and a name one byte past the limit."""
    folder = tmp_path_factory.mktemp("odd") / "corpus"
    folder.mkdir()
    long_ok = "n" * (NAME_MAX - 4) + ".jpg"
    good = {"a.jpg": ("berlin_cathedral", "01.jpg"), "b.jpg": ("lund_street", "01.jpg"),
            "c.jpg": ("berlin_cathedral", "02.jpg"), "d.jpg": ("lund_street", "04.jpg"),
            long_ok: ("lund_street", "03.jpg")}
    for name, (scene, photo) in good.items():
        shutil.copy(os.path.join(SAMPLES, scene, photo), folder / name)
    os.symlink(folder, folder / "loop")  # a folder that contains itself
    os.symlink("self.jpg", folder / "self.jpg")
    os.symlink("ping.jpg", folder / "pong.jpg")
    os.symlink("pong.jpg", folder / "ping.jpg")
    with open(os.fsencode(str(folder)) + b"/caf\xe9.jpg", "wb") as f:
        f.write(open(os.path.join(SAMPLES, "lund_street", "02.jpg"), "rb").read())
    too_long = "x" * (NAME_MAX - 3) + ".jpg"  # 256 bytes: one past the limit
    (folder.parent / "list.csv").write_text("path\n" + "".join(f"corpus/{n}\n" for n in good) + f"corpus/{too_long}\n")
    return folder, sorted(str(folder / n) for n in good), too_long


def test_listing_turns_each_odd_file_into_a_dead_letter(odd_corpus, monkeypatch):
    folder, good, too_long = odd_corpus
    listed, dead = inputs.list_stamped(str(folder))
    assert [uri for uri, _, _ in listed] == good
    reasons = {os.path.basename(d["uri"]): (d["reason"], d["error"]) for d in dead}
    assert reasons == {"caf\\xe9.jpg": ("undecodable_name", "the file name is not UTF-8; rename the file to index it"),
                       **{n: ("unreadable", "cannot stat: Too many levels of symbolic links")
                          for n in ("self.jpg", "ping.jpg", "pong.jpg")}}
    # A glob crosses no link: the looping folder lists nothing twice.
    assert [u for u, _, _ in inputs.list_stamped(str(folder / "**" / "*.jpg"))[0]] == good
    listed, dead = inputs.list_stamped(str(folder.parent / "list.csv"))
    assert [u for u, _, _ in listed] == good
    assert [(os.path.basename(d["uri"]), d["error"]) for d in dead] == [(too_long, "cannot stat: File name too long")]
    # Permission denied (tests run as root, who is never denied): one file, then one folder.
    real_stamp, real_scandir = storage.stamp, os.scandir

    def denied(path):
        if path.endswith("b.jpg"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_stamp(path)

    monkeypatch.setattr(storage, "stamp", denied)
    listed, dead = inputs.list_stamped(str(folder))
    assert len(listed) == 4 and ("unreadable", "cannot stat: Permission denied") in {
        (d["reason"], d["error"]) for d in dead if d["uri"].endswith("b.jpg")}
    monkeypatch.setattr(storage, "stamp", real_stamp)
    (folder / "sub").mkdir(exist_ok=True)

    def scandir(path="."):
        if str(path).endswith("sub"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listed, dead = inputs.list_stamped(str(folder))
    assert [u for u, _, _ in listed] == good
    assert {"uri": str(folder / "sub"), "stage": "list", "reason": "unreadable",
            "error": "folder not listed: Permission denied"} in dead
    (folder / "sub").rmdir()


def test_ids_of_names_that_are_not_utf8_come_from_their_bytes():
    name = os.fsdecode(b"/photos/caf\xe9.jpg")
    assert inputs.image_id(name) == inputs.image_id(os.fsdecode(b"/photos/caf\xe9.jpg"))
    assert inputs.image_id(name) != inputs.image_id("/photos/café.jpg")
    assert inputs.uri_bytes(name) == os.fsencode(name) and inputs.printable(name) == "/photos/caf\\xe9.jpg"
    assert inputs.image_id("/photos/café.jpg") == inputs.image_id(os.fsdecode("/photos/café.jpg".encode()))


def test_a_build_and_a_nightly_run_over_odd_files_index_the_good_ones(odd_corpus, tmp_path, cache_dir, capsys):
    folder, good, too_long = odd_corpus
    root = tmp_path / "index"
    assert cli.main(run_job.run, ["--input", str(folder), "--output", str(root)] + SMALL) == 0
    assert indexed_uris(root) == good
    manifest, dead = dead_letters(root)
    assert {os.path.basename(u): r[:2] for u, r in dead.items()} == {
        "caf\\xe9.jpg": ("list", "undecodable_name"), "self.jpg": ("list", "unreadable"),
        "ping.jpg": ("list", "unreadable"), "pong.jpg": ("list", "unreadable")}
    assert manifest["counts"]["inputs"] == 9 and manifest["counts"]["rejected"] == 4

    assert cli.main(reindex.run, ["--input", str(folder.parent / "list.csv"), "--index", str(root)] + SMALL) == 0
    assert indexed_uris(root) == good
    _, dead = dead_letters(root)
    assert {os.path.basename(u): r for u, r in dead.items()} == {
        too_long: ("list", "unreadable", "cannot stat: File name too long")}

    assert cli.main(reindex.run, ["--input", str(folder), "--index", str(root)] + SMALL) == 0
    assert indexed_uris(root) == good
    _, dead = dead_letters(root)
    assert {os.path.basename(u) for u in dead} == {"caf\\xe9.jpg", "self.jpg", "ping.jpg", "pong.jpg"}
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A run that fails cleans up after itself


def leftovers(root):
    """Files of interrupted writes, the lock, unfinished version folders, and segment or model
    folders that no kept version references."""
    names = [os.path.relpath(os.path.join(d, n), root) for d, _, ns in os.walk(root) for n in ns]
    referenced = set()
    for build in [None] + versions.version_ids(str(root))[0]:
        manifest = layout.read_manifest(str(root)) if build is None else versions.read_version(str(root), build)
        referenced |= {ref.folder for ref in segments.segment_refs(manifest)}
        referenced |= {r["path"].rsplit("/", 1)[0] for r in manifest.get("codebooks", {}).values()}
    shared = versions.segment_folders(str(root)) + versions.segment_folders(str(root), segments.CODEBOOKS_DIR)
    return ([n for n in names if storage.TEMPORARY_SUFFIX in n or n == versions.LOCK_FILE]
            + versions.version_ids(str(root))[1] + sorted(set(shared) - referenced))


def test_a_run_on_a_full_disk_removes_what_it_wrote_and_the_next_run_starts_clean(tmp_path, cache_dir, monkeypatch,
                                                                                 capsys):
    corpus = corpus_of(tmp_path / "corpus", {"a.jpg": ("berlin_cathedral", 0), "b.jpg": ("lund_street", 0),
                                             "c.jpg": ("lund_street", 1)})
    root = tmp_path / "index"
    assert reindex_run(corpus, root) == 0
    real_fill = storage._fill
    failed = 0
    for room in range(40):  # the disk fills after `room` writes: at the lock, the plan, a shard, ... the report
        corpus_of(corpus, {f"new{room}.jpg": ("lund_street", 2 + room)})
        before = layout.read_manifest(str(root))["build"]
        writes = []

        def full_disk(temporary, data, source):
            writes.append(temporary)
            if len(writes) > room:
                with open(temporary, "wb") as f:
                    f.write(b"the first blocks")
                raise OSError(errno.ENOSPC, "No space left on device", temporary)
            real_fill(temporary, data, source)

        monkeypatch.setattr(storage, "_fill", full_disk)
        status = cli.main(reindex.run, ["--input", str(corpus), "--index", str(root), "--keep", "2"] + SMALL)
        monkeypatch.setattr(storage, "_fill", real_fill)
        err = capsys.readouterr().err
        assert leftovers(root) == [], (room, writes)
        segments.verify(str(root))  # the pointer names a complete version: the old one, or this run's
        if status == 0:
            break
        failed += 1
        assert status == 1 and "Traceback" not in err
        assert "error: no space left on device: " in err and "free some space" in err, err
        published = any(w.startswith(str(root / layout.MANIFEST) + storage.TEMPORARY_SUFFIX) for w in writes[:room])
        assert (layout.read_manifest(str(root))["build"] != before) == published  # failed after its publish, or not
    assert failed >= 5 and status == 0  # every write failed once, then the run had room for all of them
    # A writer killed mid-write leaves its temporary files beside the lock and the pointer: they do
    # not stop the next run, which removes them.
    for name in (versions.LOCK_FILE, layout.MANIFEST):
        (root / f"{name}{storage.TEMPORARY_SUFFIX}0123abcd").write_bytes(b"{\"owner\": \"killed\"")
    assert reindex_run(corpus, root) == 0 and leftovers(root) == []


# ---------------------------------------------------------------------------------------------
# Index tables with a right checksum but a wrong shape: a named error, exit 2, one line


@pytest.fixture(scope="module")
def expandable(tmp_path_factory, cache_dir):
    """A versioned index with a neighbour table, built once."""
    base = tmp_path_factory.mktemp("shapes")
    corpus = corpus_of(base / "corpus", {"a.jpg": ("lund_street", 0), "b.jpg": ("lund_street", 1),
                                         "c.jpg": ("berlin_cathedral", 0), "d.jpg": ("lund_street", 2)})
    assert reindex_run(corpus, base / "index", "--verified-neighbours", "3") == 0
    return corpus, base / "index"


def parquet_bytes(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def replace_listed(root, path: str, data: bytes) -> None:
    """Replace the file at ``path`` (from the root) and record its new size and SHA-256 wherever it
    is listed: the pointer and its version's manifest, or its segment's manifest (then that one's
    record in turn)."""
    (root / path).write_bytes(data)
    record = layout.bytes_record("", data)
    pointer = json.loads((root / layout.MANIFEST).read_text())
    version = root / pointer["build"] / layout.MANIFEST
    for manifest_path, prefix in ((root / layout.MANIFEST, ""), (version, pointer["build"] + "/")):
        manifest = json.loads(manifest_path.read_text())
        listed = list(manifest["files"].values()) + manifest["segments"]
        for entry in listed:
            if prefix + entry["path"] == path or entry["path"] == path:
                entry.update(bytes=record["bytes"], sha256=record["sha256"])
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for ref in segments.segment_refs(pointer):
        own = json.loads((root / ref.path).read_text())
        changed = False
        for entry in [own["images"]] + own["shards"]:
            if f"{ref.folder}/{entry['path']}" == path:
                entry.update(bytes=record["bytes"], sha256=record["sha256"])
                changed = True
        if changed:
            replace_listed(root, ref.path, json.dumps(own).encode())


SHAPES = {
    "neighbours, columns renamed": ("neighbours", {"a": pa.array([1], pa.int64()), "b": pa.array([2], pa.int64())},
                                    "has no column 'image_id'"),
    "neighbours, ids as text": ("neighbours", {"image_id": ["1"], "neighbour": ["2"], "inliers": [3]},
                                "column 'image_id' is string, not int64"),
    "neighbours, an empty id": ("neighbours", {"image_id": pa.array([None], pa.int64()),
                                               "neighbour": pa.array([2], pa.int64()),
                                               "inliers": pa.array([3], pa.int32())}, "empty values"),
    "neighbours, inliers past int32": ("neighbours", {"image_id": [1], "neighbour": [2], "inliers": [2 ** 40]},
                                       "values outside int32"),
    "tombstones, no segment": ("tombstones", {"image_id": [1]}, "has no column 'segment'"),
    "image table, not Parquet": ("images", b"PAR1 not really PAR1", "is not a Parquet table"),
    "image table, uri as numbers": ("images", {"image_id": [1], "uri": [7], "width": [1], "height": [1],
                                               "num_features": [1], "content_hash": ["x"], "label": ["x"],
                                               "stamp": ["x"]}, "column 'uri' is int64, not string"),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_a_table_of_the_wrong_shape_is_a_named_error_with_exit_2(expandable, tmp_path, case, capsys):
    corpus, built = expandable
    root = tmp_path / "index"
    shutil.copytree(built, root)
    pointer = layout.read_manifest(str(root))
    which, columns, problem = SHAPES[case]
    if which == "images":
        ref = segments.segment_refs(pointer)[0]
        path = f"{ref.folder}/{segments.read_segment(str(root), ref).images['path']}"
    else:
        path = pointer["files"][which]["path"]
    replace_listed(root, path, columns if isinstance(columns, bytes) else parquet_bytes(columns))
    query = os.path.join(SAMPLES, "lund_street", "05.jpg")
    status = cli.main(search.run, ["--index", str(root), "--output", str(tmp_path / "r.json"), "--expand", "2", query])
    line = one_error_line(capsys, "pipeline.search")
    assert status == 2 and path in line and problem in line, line
    if which != "neighbours":  # the nightly run reads the current version's tables before anything else
        status = cli.main(reindex.run, ["--input", str(corpus), "--index", str(root)] + SMALL)
        line = one_error_line(capsys, "pipeline.reindex")
        assert status == 2 and path in line and problem in line, line
        assert leftovers(root) == []


def test_a_nightly_run_over_a_neighbour_table_of_the_wrong_shape_stops_with_exit_2(expandable, tmp_path, capsys):
    corpus, built = expandable
    root = tmp_path / "index"
    shutil.copytree(built, root)
    pointer = layout.read_manifest(str(root))
    path = pointer["files"]["neighbours"]["path"]
    replace_listed(root, path, parquet_bytes({"image_id": ["1"], "neighbour": ["2"], "inliers": [3]}))
    grown = corpus_of(tmp_path / "corpus", {"e.jpg": ("lund_street", 3)})  # a new image: the run writes a segment
    for name in os.listdir(corpus):
        shutil.copy2(corpus / name, grown / name)
    status = cli.main(reindex.run, ["--input", str(grown), "--index", str(root)] + SMALL)
    line = one_error_line(capsys, "pipeline.reindex")
    assert status == 2 and path in line and "column 'image_id' is string, not int64" in line, line
    assert layout.read_manifest(str(root))["build"] == pointer["build"] and leftovers(root) == []


def test_a_segment_manifest_with_a_malformed_record_is_a_named_error(expandable, tmp_path, capsys):
    _, built = expandable
    root = tmp_path / "index"
    shutil.copytree(built, root)
    ref = segments.segment_refs(layout.read_manifest(str(root)))[0]
    own = json.loads((root / ref.path).read_text())
    del own["images"]["sha256"]
    replace_listed(root, ref.path, json.dumps(own).encode())
    query = os.path.join(SAMPLES, "lund_street", "05.jpg")
    assert cli.main(search.run, ["--index", str(root), "--output", str(tmp_path / "r.json"), query]) == 2
    line = one_error_line(capsys, "pipeline.search")
    assert ref.path in line and "images is not a file record" in line, line
