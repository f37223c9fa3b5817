"""The first stage: its files written per segment, its image vectors against a direct VLAD of the
live images' decoded rows, the candidates' rows read by ranges against the reader's, the search
through it against the full scan, and hostile or damaged first-stage files."""

import json
import os
import shutil

import numpy as np
import pytest

from delf_retrieval.first_stage import parts, search, vlad
from delf_retrieval.index import layout, segment_reader, segments
from delf_retrieval.query import retrieval
from delf_retrieval.query.retrieval import RetrievalConfig, Retriever
from tests.test_segments import History, model, queries, tombstones_of, write_segments  # noqa: F401 (fixture)


def test_words_are_a_function_of_the_centroids_and_vlad_matches_a_direct_sum():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(64, 8)).astype(np.float32)
    words = vlad.words_of(centroids, 4)
    np.testing.assert_array_equal(words, vlad.words_of(centroids.copy(), 4))
    x = rng.normal(size=(50, 8)).astype(np.float32)
    owners = rng.integers(0, 3, 50)
    got = vlad.image_vectors(x, owners, 4, words)
    for o in range(3):
        mine = x[owners == o]
        nearest = np.argmin(((mine[:, None] - words[None]) ** 2).sum(-1), 1)
        raw = np.stack([(mine[nearest == w] - words[w]).sum(0) for w in range(4)])
        np.testing.assert_allclose(got[o], vlad.normalise(raw[None])[0], atol=1e-5)
        np.testing.assert_allclose(vlad.aggregate(mine, words), got[o], atol=1e-6)
    assert not got[3].any()  # an owner without descriptors


@pytest.fixture(scope="module")
def staged(model, tmp_path_factory):  # noqa: F811
    """Three segments with tombstones and their first stage (parts of 4 images, so each segment
    has several), opened; and the same version without a first stage."""
    history = History(model)
    root = tmp_path_factory.mktemp("staged")
    refs = write_segments(root, history)
    projection, quantizer = model
    words = vlad.words_of(quantizer.coarse.centroids, 4)
    old = parts.IMAGES_PER_PART
    parts.IMAGES_PER_PART = 4
    try:
        by_segment = {name: parts.write_segment_parts(str(root), name, history.segment_parts(name)[0], quantizer, words)
                      for name in "abc"}
    finally:
        parts.IMAGES_PER_PART = old
    assert all(len(records) > 1 for records in by_segment.values())
    segments.write_version(str(root), quantizer=quantizer, pca=projection, segments=[refs[n] for n in "abc"],
                           tombstones=tombstones_of(history, "abc"), neighbours=history.neighbours(),
                           first_stage=search.entry(4, by_segment))
    return history, str(root), segment_reader.open_reader(str(root))


def test_the_first_stage_holds_the_live_images_and_their_rows(staged):
    history, root, reader = staged
    stage = search.FirstStage.open(reader)
    assert sorted(stage.image_ids.tolist()) == sorted(history.content)  # 5 deleted, old 3 and 17 replaced
    decoded = {}
    for block in reader.stored_rows():
        for i in np.unique(block.image_ids):
            keep = block.image_ids == i
            decoded.setdefault(int(i), []).append((block.descriptors[keep], block.locations[keep]))
    for image_id in (0, 3, 17, 28):
        mine = np.concatenate([d for d, _ in decoded[image_id]])
        expected = vlad.aggregate(mine, stage.words)
        got = stage.vectors[np.searchsorted(stage.image_ids, image_id)]
        np.testing.assert_allclose(got, expected, atol=2e-3)  # stored as float16
        rows = stage.rows_of(np.array([image_id, 999]))
        assert set(rows.image_ids.tolist()) == {image_id}
        locations = np.concatenate([loc for _, loc in decoded[image_id]])
        assert sorted(map(tuple, rows.rows(np.arange(len(rows.table))).locations.tolist())) == \
            sorted(map(tuple, locations.tolist()))


def test_searching_through_the_first_stage_answers_as_the_full_scan_when_k_holds_every_image(staged):
    history, root, reader = staged
    full = Retriever(reader, RetrievalConfig(expand=0))
    staged_retriever = retrieval.open_index(root, RetrievalConfig(expand=0), image_shortlist="on", shortlist_size=100)
    assert staged_retriever.first_stage is not None
    for features in queries(history, np.random.default_rng(3)):
        a, b = full.search(features), staged_retriever.search(features)
        assert [(m.image_id, m.inliers, m.votes) for m in a.matches] == [(m.image_id, m.inliers, m.votes)
                                                                          for m in b.matches]
    narrow = retrieval.open_index(root, RetrievalConfig(expand=0), image_shortlist="on", shortlist_size=3)
    features = queries(history, np.random.default_rng(3))[0]
    assert len({m.image_id for m in narrow.search(features).matches}) <= 3
    assert narrow.search(features).matches[0].image_id == 0


def test_auto_uses_the_first_stage_only_above_its_size_and_on_needs_one(staged, tmp_path):
    history, root, reader = staged
    assert retrieval.open_index(root).first_stage is None  # 29 images: below shortlist_min_images
    assert retrieval.open_index(root, shortlist_min_images=10).first_stage is not None
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest = layout.read_manifest(str(copy))
    del manifest["first_stage"]
    layout.write_manifest(str(copy), manifest)
    assert retrieval.open_index(str(copy), shortlist_min_images=10).first_stage is None
    with pytest.raises(FileNotFoundError, match="no first stage"):
        retrieval.open_index(str(copy), image_shortlist="on")


def damaged(root, tmp_path, change):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest = layout.read_manifest(str(copy))
    change(str(copy), manifest)
    layout.write_manifest(str(copy), manifest)
    return str(copy)


def test_hostile_or_damaged_first_stage_files_are_named_errors(staged, tmp_path):
    history, root, reader = staged

    def outside(copy, manifest):
        manifest["first_stage"]["segments"]["a"][0]["row_file"]["path"] = "../../etc/passwd"

    with pytest.raises(layout.ManifestError):
        retrieval.open_index(damaged(root, tmp_path / "1", outside), image_shortlist="on")

    def wrong_format(copy, manifest):
        manifest["first_stage"]["format_version"] = 99

    with pytest.raises(layout.ManifestError, match="format"):
        retrieval.open_index(damaged(root, tmp_path / "2", wrong_format), image_shortlist="on")

    def rotten_vectors(copy, manifest):
        path = os.path.join(copy, manifest["first_stage"]["segments"]["b"][0]["vectors"]["path"])
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))

    with pytest.raises(layout.DamagedFile):
        retrieval.open_index(damaged(root, tmp_path / "3", rotten_vectors), image_shortlist="on")

    def truncated_rows(copy, manifest):
        path = os.path.join(copy, manifest["first_stage"]["segments"]["a"][0]["row_file"]["path"])
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])

    copy = damaged(root, tmp_path / "4", truncated_rows)
    stage = retrieval.open_index(copy, image_shortlist="on").first_stage
    with pytest.raises(layout.DamagedFile):
        stage.rows_of(stage.image_ids)
    with pytest.raises(layout.DamagedFile):
        segments.verify(copy)


def test_the_first_stage_must_cover_the_listed_segments(staged, tmp_path, model):  # noqa: F811
    history, root, reader = staged
    manifest = json.loads(open(os.path.join(root, layout.MANIFEST)).read())
    with pytest.raises(ValueError, match="cover"):
        segments.segmented_manifest(str(tmp_path), "x", model[1], {}, list(segments.segment_refs(manifest)),
                                    codebooks=manifest["codebooks"],
                                    first_stage=search.entry(4, {"a": manifest["first_stage"]["segments"]["a"]}))


def test_rows_naming_regions_or_codes_outside_the_quantizer_are_damage(staged):
    history, root, reader = staged
    stage = search.FirstStage.open(reader)
    rows = stage.rows_of(stage.image_ids[:3])
    queries = np.zeros((2, reader.quantizer.dim), np.float32)
    for field, value in (("region", reader.quantizer.regions.n_regions), ("code", 200)):
        table = rows.table.copy()
        table[field][0] = value
        with pytest.raises(layout.DamagedFile):
            search.CandidateRows(reader.quantizer, rows.image_ids, table).search(queries, 3)
