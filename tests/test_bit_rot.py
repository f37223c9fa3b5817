"""Bit rot never becomes an outage: a budgeted round-robin scrub reads every byte within a bounded
number of runs and finds a flipped one; a run leaves a damaged segment out of the version it
publishes and extracts its images again from the corpus (``--repair`` at once, a plain run for a
segment its scrub or a reader found); a reader names the damaged segment and leaves a note; a
merge alone over a damaged segment is refused with the way out."""

import math
import os
import shutil

from delf_retrieval.index import layout, scrub, segment_reader, segments
from delf_retrieval.query.retrieval import RetrievalConfig, Retriever
from pipeline import cli, reindex
from tests.conftest import corpus_of, reindex_run
from tests.test_reindex import BASE, last_report
from tests.test_segment_builds import stored_queries


def flip(path, at: int = 200, count: int = 8) -> None:
    """Flip ``count`` bytes of a file in place, its size unchanged (bit rot)."""
    data = bytearray(open(path, "rb").read())
    for i in range(at, at + count):
        data[i % len(data)] ^= 0xFF
    open(path, "wb").write(bytes(data))


def two_segments(tmp_path):
    """An index of BASE, then a night that adds one photo: (corpus, root, the shared first segment)."""
    corpus, root = corpus_of(tmp_path / "corpus", BASE), tmp_path / "index"
    assert reindex_run(corpus, root) == 0
    (first,) = segments.segment_refs(layout.read_manifest(str(root)))
    corpus_of(corpus, {"lund/new.jpg": ("lund_street", 5)})
    assert reindex_run(corpus, root) == 0
    assert len(segments.segment_refs(layout.read_manifest(str(root)))) == 2
    return corpus, root, first


def shard_of(root, ref) -> str:
    return os.path.join(root, ref.folder, segments.read_segment(str(root), ref).shards[0]["path"])


def each_image_finds_itself(root, corpus) -> bool:
    names = sorted(BASE) + ["lund/new.jpg"]
    retriever = Retriever(segment_reader.open_reader(str(root)), RetrievalConfig(top=3))
    for name, (projected, locations) in zip(names, stored_queries(root, names, corpus)):
        if retriever.search_projected(projected, locations).matches[0].uri != str(corpus / name):
            return False
    return True


def test_a_round_robin_scrub_reads_every_byte_within_its_bound_and_finds_a_flip(built, tmp_path):
    root = str(tmp_path / "index")
    shutil.copytree(built[1], root)
    pointer = layout.read_manifest(root)
    files, _ = scrub.segment_files(root, pointer)
    total = sum(r["bytes"] for _, _, r in files)
    budget = total // 3
    seen, cursor = set(), None
    for _ in range(math.ceil(total / budget)):
        report = scrub.scrub(root, pointer, budget, cursor)
        assert report.damaged == {} and report.total_bytes == total
        seen |= set(report.checked)
        cursor = report.cursor
    assert seen == {key for key, _, _ in files}
    (ref,) = segments.segment_refs(pointer)
    flip(shard_of(root, ref))
    found = scrub.scrub(root, pointer, total)
    assert list(found.damaged) == [ref.segment_id] and "SHA-256" in found.damaged[ref.segment_id]
    # A zero budget still reads one file a run, and a suspect is read whole whatever the budget.
    assert len(scrub.scrub(root, pointer, 0).checked) == 1
    assert scrub.scrub(root, pointer, 0, suspects={ref.segment_id}).damaged.keys() == {ref.segment_id}


def test_repair_leaves_the_damaged_shared_segment_out_and_extracts_its_images_again(tmp_path, cache_dir):
    corpus, root, first = two_segments(tmp_path)
    flip(shard_of(root, first))  # same size: a check by size alone passes it
    # A merge alone cannot rebuild the images: refused, naming the segment and the way out.
    assert cli.main(reindex.run, ["--index", str(root), "--merge"]) == 2
    assert reindex_run(corpus, root, "--repair") == 0
    pointer = layout.read_manifest(str(root))
    listed = {r.segment_id for r in segments.segment_refs(pointer)}
    assert first.segment_id not in listed
    report = last_report(root)
    assert report["repaired"] == [first.segment_id] and report["re_extracted"] == len(BASE)
    assert pointer["counts"]["images"] == len(BASE) + 1 and pointer["scrub"]["damaged"].keys() == {first.segment_id}
    segments.verify(str(root))  # every byte of the new version checks out
    assert each_image_finds_itself(root, corpus)


def test_a_reader_names_the_damaged_segment_and_the_next_plain_run_repairs_it(tmp_path, cache_dir):
    corpus, root, first = two_segments(tmp_path)
    flip(shard_of(root, first))
    reader = segment_reader.open_reader(str(root))
    try:
        reader.load_all()
    except segments.DamagedSegment as e:
        assert e.segment_id == first.segment_id and f"segment {first.segment_id} is damaged" in str(e)
    else:
        raise AssertionError("a flipped row group was read without complaint")
    assert scrub.noted_damage(str(root)) == {first.segment_id}
    # A plain run with a scrub budget that reaches no posting shard still verifies the noted segment.
    assert reindex_run(corpus, root, "--scrub-bytes", "1") == 0
    assert last_report(root)["repaired"] == [first.segment_id]
    assert first.segment_id not in {r.segment_id for r in segments.segment_refs(layout.read_manifest(str(root)))}
    assert scrub.noted_damage(str(root)) == set()  # the note is cleared once the segment is out
    assert each_image_finds_itself(root, corpus)


def test_the_scrub_goes_on_from_where_the_last_run_stopped(tmp_path, cache_dir):
    corpus, root = corpus_of(tmp_path / "corpus", BASE), tmp_path / "index"
    assert reindex_run(corpus, root) == 0
    cursors = []
    for _ in range(2):
        assert reindex_run(corpus, root, "--scrub-bytes", "1") == 0
        cursors.append(layout.read_manifest(str(root))["scrub"]["cursor"])
    assert cursors[0] != cursors[1] and cursors[1] > cursors[0]
    assert reindex.parse_args(["--input", "x", "--index", "y", "--scrub-bytes", "25%"])[0].scrub_bytes == (None, 0.25)

