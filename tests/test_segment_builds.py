"""Builds that write segments: a nightly run writes only a new segment, its tombstones and
restamps and the manifest, references the rest and has only its own segment read byte for byte
when it publishes; the merge policy merges during a run, ``--merge`` on demand, both as new
versions that roll back; an index written before segments (format 1) is read, and converted once
by the first nightly run."""

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq

from delf_retrieval import storage
from delf_retrieval.corpus import inputs
from delf_retrieval.index import layout, segment_reader, segments, shard_reader, shards, versions
from delf_retrieval.query import retrieval
from delf_retrieval.query.retrieval import RetrievalConfig, Retriever
from pipeline import reindex
from tests.conftest import SMALL, corpus_of, reindex_run
from tests.test_reindex import BASE, last_report, rows_by_image
from tests.test_segments import model  # noqa: F401,F811 - a fixture


def files_of(root):
    """{path under root: (size, mtime_ns)} of every file."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return out


def answers(root, queries):
    """The ranked (uri, score) of each query's own stored rows, searched in the current version."""
    retriever = Retriever(segment_reader.open_reader(str(root)), RetrievalConfig(top=5, expand=0))  # the rows, not the table
    out = []
    for projected, locations in queries:
        out.append([(m.uri, m.score, m.inliers) for m in retriever.search_projected(projected, locations).matches])
    return out


def stored_queries(root, names, corpus):
    """Each named image's live stored rows (decoded codes) and keypoints, as a query."""
    pointer = layout.read_manifest(str(root))
    reader = segment_reader.open_reader(str(root))
    params, tombstones = pointer["params"], segments.read_tombstones(str(root), pointer)
    queries = []
    for name in names:
        image_id = inputs.image_id(str(corpus / name))
        parts = []
        for ref in segments.segment_refs(pointer):
            if image_id in tombstones.of(ref.segment_id):
                continue
            for record in segments.read_segment(str(root), ref).shards:
                table = pq.read_table(os.path.join(root, ref.folder, record["path"]))
                rows = shards.posting_rows(table, params["pq_m"], params["pq_bits"])
                parts.append(rows.take(np.flatnonzero(rows.image_ids == image_id)))
        rows = shards.PostingRows.concatenate(parts, params["pq_m"])
        assert len(rows)
        queries.append((reader.quantizer.decode(rows.encoded.regions, rows.encoded.codes), rows.locations))
    return queries


def first_stage_of(root, queries=()):
    """The current version's first-stage entry, checked: it covers exactly the version's segments,
    holds exactly its live images, and searching through it (K above the index's size) answers
    each query as the full scan does."""
    manifest = layout.read_manifest(str(root))
    entry = manifest["first_stage"]
    assert set(entry["segments"]) == {r.segment_id for r in segments.segment_refs(manifest)}
    staged = retrieval.open_index(str(root), RetrievalConfig(top=5, expand=0), image_shortlist="on")
    live = staged.reader.images.column("image_id").to_pylist()
    assert sorted(staged.first_stage.image_ids.tolist()) == sorted(live)
    for (projected, locations), expected in zip(queries, answers(root, queries)):
        got = [(m.uri, m.score, m.inliers) for m in staged.search_projected(projected, locations).matches]
        assert got == expected
    return entry


def test_a_nightly_run_writes_only_its_segment_and_merges_keep_every_answer(tmp_path, cache_dir, monkeypatch):
    corpus, root = corpus_of(tmp_path / "corpus", BASE), tmp_path / "index"
    assert reindex_run(corpus, root) == 0
    first = layout.read_manifest(str(root))
    (a,) = segments.segment_refs(first)
    assert first["format_version"] == 2 and a.segment_id == first["build"].split("/")[-1] and a.images == 5
    before = files_of(root)
    first_stage_of(root, stored_queries(root, ["lund/a.jpg"], corpus))

    # Tonight: one photo added, one replaced by another picture, one deleted, one only touched.
    corpus_of(corpus, {"lund/new.jpg": ("lund_street", 5), "sacre/a.jpg": ("sacre_coeur", 3)})
    os.remove(corpus / "berlin/b.jpg")
    os.utime(corpus / "lund/a.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    deep = []
    publish = versions.publish
    monkeypatch.setattr(versions, "publish", lambda *args, **kw: deep.append(kw.get("deep")) or publish(*args, **kw))
    assert reindex_run(corpus, root) == 0
    second = layout.read_manifest(str(root))
    refs = segments.segment_refs(second)
    assert [r.segment_id for r in refs][0] == a.segment_id and refs[0] == a  # referenced as it was
    b = refs[1]
    assert b.segment_id == second["build"].split("/")[-1] and b.images == 2  # the added and the changed photo
    assert deep == [{b.segment_id}]  # publishing read only the new segment's bytes
    uri = {name: str(corpus / name) for name in list(BASE) + ["lund/new.jpg"]}
    tombstones = segments.read_tombstones(str(root), second)
    assert tombstones.deleted.keys() == {a.segment_id}
    assert sorted(tombstones.of(a.segment_id).tolist()) == sorted(inputs.image_id(uri[n])
                                                                  for n in ("berlin/b.jpg", "sacre/a.jpg"))
    restamps = segments.read_restamps(str(root), second)
    assert restamps.stamps == {a.segment_id: {inputs.image_id(uri["lund/a.jpg"]): storage.stamp(uri["lund/a.jpg"])}}
    # What the run wrote: its version folder, its segment, its report and the pointer; nothing of
    # the first segment was touched, and the new segment is a fraction of it.
    after = files_of(root)
    changed = {p for p in after if before.get(p) != after[p]}
    build = second["build"]
    assert changed and all(p.startswith((build + "/", f"segments/{b.segment_id}/", "reports/")) or p == "manifest.json"
                           for p in changed)
    assert all(after[p] == before[p] for p in before if p.startswith(f"segments/{a.segment_id}/"))
    assert second["codebooks"] == first["codebooks"] and not any(p.endswith(".npz") for p in changed)
    assert b.size_bytes < a.size_bytes
    report = last_report(root)
    assert report["segments_written"] == [b.segment_id] and report["merged"] == [] and report["tombstones"] == 2
    second_rows = rows_by_image(root)
    assert len(second_rows) == 5 == second["counts"]["images"]
    assert sum(len(v) for v in second_rows.values()) == second["counts"]["descriptors"]
    queries = stored_queries(root, ["lund/new.jpg", "berlin/a.jpg", "lund/a.jpg"], corpus)
    second_answers = answers(root, queries)
    assert second_answers[0][0][0] == uri["lund/new.jpg"]
    # The first stage: the kept segment's parts as they were, the new segment's written by the run.
    entry = first_stage_of(root, queries)
    assert entry["segments"][a.segment_id] == first["first_stage"]["segments"][a.segment_id]

    # The next run (nothing changed): two tiny segments are more than the policy's tiers allow, so
    # it merges them, dropping the tombstoned rows; every image keeps its rows bit for bit.
    deep.clear()
    assert reindex_run(corpus, root) == 0
    third = layout.read_manifest(str(root))
    (merged,) = segments.segment_refs(third)
    assert last_report(root)["merged"] == [[a.segment_id, b.segment_id]] and deep == [{merged.segment_id}]
    assert third["counts"]["tombstones"] == 0 and merged.images == 5
    assert merged.descriptors == third["counts"]["descriptors"] == second["counts"]["descriptors"]
    assert rows_by_image(root) == second_rows and answers(root, queries) == second_answers
    assert list(first_stage_of(root, queries)["segments"]) == [merged.segment_id]
    merged_images = {r["uri"]: r["stamp"] for r in segment_reader.open_reader(str(root)).images.to_pylist()}
    assert merged_images[uri["lund/a.jpg"]] == storage.stamp(uri["lund/a.jpg"])  # the restamp, merged in

    # Rollback returns to the two-segment version (its segments are kept while it is); a merge on
    # demand (no --input) then merges them again, as a version of its own.
    assert reindex.run(["--index", str(root), "--rollback"]) == 0
    assert segments.verify(str(root))["build"] == second["build"] and rows_by_image(root) == second_rows
    assert reindex.run(["--index", str(root), "--merge", "--keep", "3"] + SMALL) == 0
    fourth = layout.read_manifest(str(root))
    assert fourth["counts"]["segments"] == 1 and fourth["previous"] == second["build"]
    assert last_report(root)["re_extracted"] == 0 and rows_by_image(root) == second_rows
    assert answers(root, queries) == second_answers
    # Every kept version still opens and answers as it did.
    for version in (second, third):
        folder = os.path.join(root, version["build"])
        assert segment_reader.open_reader(folder).manifest["index_id"] == version["index_id"]
    # Pruning keeps what kept versions reference and deletes the rest.
    referenced = {r.folder for v in (second, third, fourth) for r in segments.segment_refs(v)}
    assert set(versions.segment_folders(str(root))) == referenced


def test_an_index_without_a_first_stage_gains_one_at_its_next_run(tmp_path, cache_dir):
    corpus, root = corpus_of(tmp_path / "corpus", BASE), tmp_path / "index"
    assert reindex_run(corpus, root) == 0
    pointer = layout.read_manifest(str(root))
    for folder in (root, root / pointer["build"]):  # as a version written before first stages
        manifest = json.loads((folder / layout.MANIFEST).read_text())
        del manifest["first_stage"]
        (folder / layout.MANIFEST).write_text(json.dumps(manifest))
    assert retrieval.open_index(str(root), shortlist_min_images=1).first_stage is None  # it answers without
    assert reindex_run(corpus, root) == 0
    assert last_report(root)["re_extracted"] == 0
    first_stage_of(root, stored_queries(root, ["lund/a.jpg", "sacre/a.jpg"], corpus))


def format_1_copy(root, tmp_path):
    """The current version of ``root`` rewritten as an index of before segments (format 1: one set
    of shards, its own image table) under a new versioned root."""
    pointer = layout.read_manifest(str(root))
    reader = segment_reader.open_reader(str(root))
    params = pointer["params"]
    tables = [pq.read_table(os.path.join(root, s["path"])) for s in segments.posting_shards(str(root), pointer)]
    rows = shards.PostingRows.concatenate([shards.posting_rows(t, params["pq_m"], params["pq_bits"]) for t in tables],
                                          params["pq_m"])
    old = tmp_path / "old"
    build = "builds/20200101T000000Z-00000000"
    manifest = shards.write_index(str(old / build), quantizer=reader.quantizer, pca=reader.pca, rows=rows,
                                  images=reader.images, model=pointer["model"])
    manifest.update({k: pointer[k] for k in ("settings", "training") if k in pointer})
    layout.write_manifest(str(old / build), manifest)
    versions.publish(str(old), build, manifest, None)
    return old


def test_an_index_of_before_segments_is_read_and_converted_by_the_first_nightly_run(tmp_path, cache_dir):
    corpus, root = corpus_of(tmp_path / "corpus", BASE), tmp_path / "index"
    assert reindex_run(corpus, root) == 0
    old = format_1_copy(root, tmp_path)
    assert layout.read_manifest(str(old))["format_version"] == 1
    assert isinstance(segment_reader.open_reader(str(old)), shard_reader.IndexReader)
    before = rows_by_image(root)
    query = stored_queries(root, ["lund/a.jpg"], corpus)
    assert answers(old, query) == answers(root, query)
    corpus_of(corpus, {"lund/new.jpg": ("lund_street", 5)})
    assert reindex_run(corpus, old) == 0
    converted = layout.read_manifest(str(old))
    assert converted["format_version"] == 2 and converted["counts"]["segments"] == 1
    first_stage_of(old, stored_queries(old, ["lund/new.jpg", "lund/a.jpg"], corpus))  # the carried rows too
    report = last_report(old)
    assert report["reused"] == 5 and report["re_extracted"] == 1 and report["added"] == 1
    rows = rows_by_image(old)
    assert {k: v for k, v in rows.items() if k in before} == before  # copied bit for bit into the segment
    assert len(rows) == 6


def test_publishing_reads_only_the_segments_the_run_wrote(model, tmp_path, monkeypatch):
    from tests.test_segments import History, tombstones_of, write_segments

    history, root = History(model), str(tmp_path)
    refs = write_segments(root, history, names=("a", "b"))
    projection, quantizer = model
    manifests = {}
    for build, listed in (("builds/v1", "a"), ("builds/v2", "ab")):
        manifests[build] = segments.version_manifest(os.path.join(root, build), quantizer=quantizer, pca=projection,
                                                     segments=[refs[n] for n in listed], version_folder=build,
                                                     tombstones=tombstones_of(history, listed).only(listed))
    versions.publish(root, "builds/v1", manifests["builds/v1"], None)
    _, token = versions.current(root)

    def flip(ref):
        path = os.path.join(root, segments.posting_shards(root, {**manifests["builds/v2"], "build": "builds/v2",
                                                                 "segments": [ref.to_json()]})[0]["path"])
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
        open(path, "wb").write(bytes(data))

    flip(refs["b"])  # the run's own segment damaged: not published
    try:
        versions.publish(root, "builds/v2", manifests["builds/v2"], token, deep={"b"})
    except layout.ShardError as e:
        assert "SHA-256" in str(e)
    else:
        raise AssertionError("a damaged new segment was published")
    assert versions.current(root)[0]["build"] == "builds/v1"
    flip(refs["b"])  # repaired; the shared one damaged instead, which publishing does not re-read
    flip(refs["a"])
    read = []
    original = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda path, *a, **kw: read.append(path) or original(path, *a, **kw))
    assert versions.publish(root, "builds/v2", manifests["builds/v2"], token, deep={"b"})["build"] == "builds/v2"
    assert any("segments/b/postings/" in p for p in read)
    assert not any("segments/a/postings/" in p for p in read)
    assert any(p.endswith("segments/a/segment.json") for p in read)  # its manifest is checked by SHA-256
