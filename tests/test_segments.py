"""Segmented versions: the same live images written as one segment and as three (with tombstones,
an image replaced in a newer segment, one deleted) give identical search and retrieval results;
format-1 indexes still open; pruning keeps every segment a kept version references, and rollback to
any kept version works."""

import json
import os

import numpy as np
import pytest

from delf_retrieval import quantize
from delf_retrieval.extraction.features import Features
from delf_retrieval.index import (layout, merge_policy, segment_reader, segments, shard_reader, shards,
                                  versions)
from delf_retrieval.index.neighbour_table import NeighbourTable
from delf_retrieval.quantize import pca as pca_lib
from delf_retrieval.query import engine, expansion, retrieval
from delf_retrieval.query.retrieval import RetrievalConfig, Retriever

N_IMAGES = 30
PER_IMAGE = 80
DIM = 48


def image_features(rng, image_id):
    """An image's raw descriptors (around a few landmark centres) and keypoints."""
    centre = np.random.default_rng(image_id % 6).normal(size=(PER_IMAGE, DIM))
    raw = (centre + 0.35 * rng.normal(size=(PER_IMAGE, DIM))).astype(np.float32)
    return raw, rng.uniform(0, 800, size=(PER_IMAGE, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(5)
    sample = np.concatenate([image_features(rng, i)[0] for i in range(N_IMAGES)])
    projection = pca_lib.fit(sample, 32)
    quantizer = quantize.train(projection.transform(sample),
                               quantize.IndexParams(n_cells=16, pq_m=8, lopq=True, max_region_features=600,
                                                    min_region_train=200))
    return projection, quantizer


def posting_rows(model, image_id, raw, locations):
    projection, quantizer = model
    n = len(raw)
    scales = np.linspace(0.25, 2.0, n).astype(np.float32)
    return shards.PostingRows(quantizer.encode(projection.transform(raw)), np.full(n, image_id, np.int64),
                              locations, scales, np.linspace(1, 90, n).astype(np.float32))


def image_record(image_id, content):
    return {"image_id": image_id, "uri": f"gs://b/{image_id}-{content}.jpg", "width": 800, "height": 800,
            "num_features": PER_IMAGE, "content_hash": f"{image_id}-{content}"}


class History:
    """Three nightly segments: A holds images 0-14; B adds 15-24 and a changed image 3 (tombstoned
    in A); C adds 25-29 and a changed 17 (tombstoned in B), and deletes 5 (tombstoned in A)."""

    def __init__(self, model):
        rng = np.random.default_rng(11)
        self.model = model
        self.content = {}  # image id -> (raw, locations, content tag), the live version of each image
        self.segments = []  # (segment name, [image ids], tombstones {older segment: ids})
        plan = [("a", list(range(15)), {}),
                ("b", list(range(15, 25)) + [3], {"a": [3]}),
                ("c", list(range(25, 30)) + [17], {"a": [5], "b": [17]})]
        self.rows = {}
        for name, ids, dropped in plan:
            per_image = {}
            for i in ids:
                raw, locations = image_features(rng, i)
                per_image[i] = (raw, locations, name)
                self.content[i] = (raw, locations, name)
            self.rows[name] = per_image
            self.segments.append((name, ids, dropped))
        del self.content[5]

    def segment_parts(self, name):
        per_image = self.rows[name]
        ids = sorted(per_image)
        rows = shards.PostingRows.concatenate([posting_rows(self.model, i, *per_image[i][:2]) for i in ids],
                                              self.model[1].params.pq_m)
        return rows, shards.image_table([image_record(i, per_image[i][2]) for i in ids])

    def live_parts(self):
        ids = sorted(self.content)
        rows = shards.PostingRows.concatenate([posting_rows(self.model, i, *self.content[i][:2]) for i in ids],
                                              self.model[1].params.pq_m)
        return rows, shards.image_table([image_record(i, self.content[i][2]) for i in ids])

    def neighbours(self):
        ids = np.arange(N_IMAGES, dtype=np.int64)
        return NeighbourTable(ids, (ids + 1) % N_IMAGES, np.full(N_IMAGES, 12))


def write_single(directory, history):
    rows, images = history.live_parts()
    projection, quantizer = history.model
    manifest = shards.write_index(str(directory), quantizer=quantizer, pca=projection, rows=rows, images=images,
                                  rows_per_shard=1500, rows_per_group=400)
    table = history.neighbours()
    live = np.asarray(sorted(history.content))
    keep = np.isin(table.image_ids, live) & np.isin(table.neighbours, live)
    manifest["files"]["neighbours"] = layout.write_table_file(
        str(directory), "neighbours.parquet", NeighbourTable(table.image_ids[keep], table.neighbours[keep],
                                                             table.inliers[keep]).to_table())
    layout.write_manifest(str(directory), manifest)


def write_segments(root, history, names=("a", "b", "c")):
    """Each named segment under root/segments/, as the nightly runs would have written them."""
    projection, quantizer = history.model
    refs = {}
    for name in names:
        rows, images = history.segment_parts(name)
        refs[name] = segments.write_segment(str(root), rows, images, quantizer.params.pq_bits, segment_id=name,
                                            rows_per_shard=700, rows_per_group=300)
    return refs


def tombstones_of(history, names):
    out = segments.Tombstones()
    for name, _, dropped in history.segments:
        if name in names:
            for older, ids in dropped.items():
                out = out.adding(older, ids)
    return out


@pytest.fixture(scope="module")
def both(model, tmp_path_factory):
    """(one-segment format-1 reader, three-segment reader) over the same live images."""
    history = History(model)
    single = tmp_path_factory.mktemp("single")
    write_single(single, history)
    root = tmp_path_factory.mktemp("segmented")
    refs = write_segments(root, history)
    segments.write_version(str(root), quantizer=model[1], pca=model[0], segments=[refs[n] for n in "abc"],
                           tombstones=tombstones_of(history, "abc"), neighbours=history.neighbours())
    return history, segment_reader.open_reader(str(single)), segment_reader.open_reader(str(root))


def queries(history, rng):
    """Noisy copies of some live images' descriptors (and of a deleted and a replaced image's old
    content, which must find nothing of the dropped rows)."""
    out = []
    for i in (0, 3, 5, 12, 17, 21, 28):
        raw, locations = history.content[i][:2] if i in history.content else history.rows["a"][i][:2]
        take = rng.choice(PER_IMAGE, 50, replace=False)
        out.append(Features(locations[take] + rng.normal(0, 1, (50, 2)).astype(np.float32),
                            np.ones(50, np.float32), np.ones(50, np.float32),
                            raw[take] + 0.05 * rng.normal(size=(50, DIM)).astype(np.float32), (800, 800)))
    old = history.rows["a"][3]
    out.append(Features(old[1][:40], np.ones(40, np.float32), np.ones(40, np.float32), old[0][:40],
                        (800, 800)))  # image 3's replaced content
    return out


def test_open_reader_reads_format_1_as_one_segment_and_format_2_as_segments(both):
    _, single, segmented = both
    assert isinstance(single, shard_reader.IndexReader) and single.manifest["format_version"] == 1
    assert isinstance(segmented, segment_reader.SegmentedReader) and segmented.manifest["format_version"] == 2
    assert [r.segment_id for r in segmented.refs] == ["a", "b", "c"]
    assert segmented.manifest["counts"]["images"] == N_IMAGES - 1 and len(segmented.tombstones) == 3
    with pytest.raises(layout.ManifestError, match="open_reader"):
        shard_reader.IndexReader(segmented.directory)


def test_images_and_neighbours_are_the_live_merged_view(both):
    history, single, segmented = both
    key = lambda t: sorted(zip(t.column("image_id").to_pylist(), t.column("uri").to_pylist()))  # noqa: E731
    assert key(segmented.images) == key(single.images)
    assert 5 not in segmented.images.column("image_id").to_pylist()
    assert "gs://b/3-b.jpg" in segmented.images.column("uri").to_pylist()
    for name in ("image_ids", "neighbours", "inliers"):
        np.testing.assert_array_equal(getattr(segmented.neighbours(), name), getattr(single.neighbours(), name))
    assert 5 not in segmented.neighbours().image_ids and 5 not in segmented.neighbours().neighbours
    live_single = sorted(int(i) for ids, _ in single.postings() for i in np.unique(ids))
    live_segmented = sorted(int(i) for ids, _ in segmented.postings() for i in np.unique(ids))
    assert sorted(set(live_segmented)) == sorted(set(live_single)) == sorted(history.content)


def opened(directory, mode):
    """A reader of ``directory`` as the engine opens it: resident (``load_all``), lazy, or lazy
    with a cache so small that row groups and merged cells are evicted at every search."""
    reader = segment_reader.open_reader(str(directory), cache_bytes=20_000 if mode == "evicting" else 2 << 30)
    if mode == "resident":
        reader.load_all()
    return reader


def assert_same_search(single, segmented, history, among_sets=(None, np.asarray([1, 3, 5, 17, 20, 28], np.int64))):
    rng = np.random.default_rng(2)
    projection = history.model[0]
    for features in queries(history, rng):
        x = projection.transform(features.descriptors)
        for among in among_sets:
            d1, r1 = single.search(x, 10, 4, image_ids=among)
            d2, r2 = segmented.search(x, 10, 4, image_ids=among)
            np.testing.assert_array_equal(d1, d2)
            a, b = single.rows(r1), segmented.rows(r2)
            for name in ("image_ids", "locations", "scales", "attentions"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
            assert 5 not in b.image_ids
            if among is not None:
                assert np.isin(b.image_ids[b.image_ids >= 0], among).all()


@pytest.mark.parametrize("mode", ["lazy", "resident", "evicting"])
def test_search_is_identical_to_one_segment(both, mode):
    """Resident and lazy (cached merged cells, or evicted at every search), with and without an
    image restriction, against the one-segment index read the same way."""
    history, single, segmented = both
    assert_same_search(opened(single.directory, mode), opened(segmented.directory, mode), history)


def test_resident_lists_hold_only_live_rows_in_one_segments_order(both):
    _, single, segmented = both
    one, many = opened(single.directory, "resident"), opened(segmented.directory, "resident")
    lists = many._resident
    assert len(lists) == len(one._resident) < many.num_rows  # tombstoned rows dropped, not only skipped
    np.testing.assert_array_equal(lists.offsets, one._resident.offsets)
    np.testing.assert_array_equal(lists.codes, one._resident.codes)
    np.testing.assert_array_equal(many.rows(lists.ids).image_ids, one.rows(one._resident.ids).image_ids)
    assert many.resident_bytes() == sum(s.resident_bytes() for s in many.segments) > one.resident_bytes()


def test_searches_from_several_threads_answer_as_one(both):
    """The engine's workers share one reader: caches of row groups and merged cells under locks."""
    from concurrent.futures import ThreadPoolExecutor

    history, single, segmented = both
    shared = opened(segmented.directory, "evicting")
    asked = [history.model[0].transform(f.descriptors) for f in queries(history, np.random.default_rng(6))] * 4
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda x: shared.search(x, 10, 4), asked))
    assert 0 < shared._cell_cache_bytes and shared._cell_bytes <= shared._cell_cache_bytes  # evicted to its share
    for x, (d, r) in zip(asked, answers):
        d1, r1 = single.search(x, 10, 4)
        np.testing.assert_array_equal(d, d1)
        np.testing.assert_array_equal(shared.rows(r).image_ids, single.rows(r1).image_ids)


def test_stored_rows_are_the_live_rows_under_their_global_ids(both):
    """What the probe, the neighbour stage and the shortlist read: every live row once, each
    block's row ids leading back (through rows()) to its images and keypoints; for one image, its
    rows in the order one segment stores them."""
    history, single, segmented = both
    for reader in (single, segmented):
        seen = []
        for block in reader.stored_rows():
            assert len(block) and 5 not in block.image_ids
            stored = reader.rows(block.rows)
            np.testing.assert_array_equal(stored.image_ids, block.image_ids)
            np.testing.assert_array_equal(stored.locations, block.locations)
            seen.append(block.rows)
        seen = np.concatenate(seen)
        assert len(np.unique(seen)) == len(seen) == len(history.content) * PER_IMAGE
    one, many = expansion.rows_by_image(single), expansion.rows_by_image(segmented)
    assert sorted(one) == sorted(many) == sorted(history.content)
    for image_id in one:
        np.testing.assert_array_equal(one[image_id][0], many[image_id][0])
        np.testing.assert_array_equal(one[image_id][1], many[image_id][1])


def test_retriever_results_are_identical_to_one_segment(both):
    history, single, segmented = both
    config = RetrievalConfig(top=20, expand=1, expand_min_inliers=4)
    one, many = Retriever(single, config), Retriever(segmented, config)
    found_any = False
    asked = queries(history, np.random.default_rng(3))
    last = asked[-1]
    for features in asked:
        a, b = one.search(features).matches, many.search(features).matches
        assert [m.to_json() for m in a] == [m.to_json() for m in b]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.query_points, y.query_points)
            np.testing.assert_array_equal(x.database_points, y.database_points)
        found_any |= any(m.inliers for m in b)
        assert any(m.image_id == 3 and m.uri.endswith("3-b.jpg") for m in b) or features is not last
        assert all(m.image_id != 5 for m in b)
    assert found_any  # the comparison covers verified matches, not only empty answers
    assert many.uri_of(np.asarray([3, 17]))[0] == "gs://b/3-b.jpg"


def test_damaged_or_inconsistent_segments_are_refused(both, model, tmp_path):
    history = both[0]
    refs = write_segments(tmp_path, history, names=("a", "b"))
    segments.write_version(str(tmp_path), quantizer=model[1], pca=model[0], segments=[refs["a"], refs["b"]])
    with pytest.raises(layout.ManifestError, match="live in two segments"):  # image 3 in a and b, no tombstone
        segment_reader.open_reader(str(tmp_path))
    segments.write_version(str(tmp_path), quantizer=model[1], pca=model[0], segments=[refs["a"], refs["b"]],
                           tombstones=segments.Tombstones().adding("a", [3]))
    segment_reader.open_reader(str(tmp_path))
    listed = json.loads((tmp_path / "segments/b/segment.json").read_text())
    shard = tmp_path / "segments" / "b" / listed["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(layout.ShardError, match="SHA-256"):
        segments.verify(str(tmp_path))
    segments.verify_segments(str(tmp_path), layout.read_manifest(str(tmp_path)), deep={"a"})  # b's bytes not re-read
    (tmp_path / "segments/a/segment.json").write_text("{}")
    with pytest.raises(layout.ShardError):
        segment_reader.open_reader(str(tmp_path))


def test_prune_keeps_referenced_segments_and_rollback_reaches_every_kept_version(both, model, tmp_path):
    history, single, _ = both
    root = str(tmp_path)
    refs = write_segments(root, history)
    projection, quantizer = model
    merged_rows, merged_images = history.live_parts()
    refs["m"] = segments.write_segment(root, merged_rows, merged_images, quantizer.params.pq_bits, segment_id="m")
    plan = [("builds/20260101T000000Z-a", "a"), ("builds/20260102T000000Z-b", "ab"),
            ("builds/20260103T000000Z-c", "abc"), ("builds/20260104T000000Z-m", "m")]  # m: a merge of a, b, c
    codebooks = None  # written by the first version, shared by the others (as nightly runs share it)
    for build, names in plan:
        manifest = segments.version_manifest(os.path.join(root, build), quantizer=quantizer, pca=projection,
                                             segments=[refs[n] for n in names], version_folder=build,
                                             tombstones=tombstones_of(history, names), codebooks=codebooks)
        codebooks = manifest["codebooks"]
        versions.publish(root, build, manifest, versions.current(root)[1])
    folder = lambda n: os.path.join(root, "segments", n)  # noqa: E731
    assert versions.prune(root, keep=2) == ["builds/20260101T000000Z-a"]  # a's segment is still b's and c's
    assert all(os.path.isdir(folder(n)) for n in "abcm")

    config = RetrievalConfig(top=10, expand=0)  # the versions written here keep no neighbour table
    reference = Retriever(single, config)
    features = queries(history, np.random.default_rng(4))[2:4]
    answer = lambda: [[m.to_json() for m in Retriever(segment_reader.open_reader(root), config)  # noqa: E731
                       .search(f).matches] for f in features]
    expected = [[m.to_json() for m in reference.search(f).matches] for f in features]
    assert answer() == expected  # the merged version
    versions.rollback(root, to="builds/20260102T000000Z-b")
    assert segment_reader.open_reader(root).manifest["counts"]["segments"] == 2
    versions.rollback(root, to="builds/20260103T000000Z-c")
    assert answer() == expected  # three segments with tombstones
    with pytest.raises(layout.ManifestError, match="no longer kept"):
        versions.rollback(root, to="builds/20260101T000000Z-a")

    versions.rollback(root, to="builds/20260104T000000Z-m")
    pruned = versions.prune(root, keep=0)  # serving m; its previous (c) stays, b goes: a, b, c still c's
    assert pruned == ["builds/20260102T000000Z-b"] and all(os.path.isdir(folder(n)) for n in "abcm")
    newest = "builds/20260105T000000Z-n"
    manifest = segments.version_manifest(os.path.join(root, newest), quantizer=quantizer, pca=projection,
                                         segments=[refs["m"]], version_folder=newest)
    versions.publish(root, newest, manifest, versions.current(root)[1])
    pruned = versions.prune(root, keep=0)  # serving n, previous m: c goes and with it a, b, c's segments
    assert pruned == ["builds/20260103T000000Z-c", "segments/a", "segments/b", "segments/c"]
    assert os.path.isdir(folder("m")) and not os.path.exists(folder("a"))
    assert versions.rollback(root)["build"] == "builds/20260104T000000Z-m"
    assert answer() == expected


def test_an_unpublished_segment_goes_with_prune_and_a_format_1_root_is_untouched(tiny_versions_root):
    root, build = tiny_versions_root
    assert versions.prune(root, keep=0) == ["segments/orphan"]
    assert versions.rollback(root, to=build)["build"] == build


@pytest.fixture()
def tiny_versions_root(tmp_path, model, both):
    """A format-1 version published under root, and a segment no version references (a run that
    wrote it and died before publishing)."""
    history = both[0]
    projection, quantizer = model
    rows, images = history.segment_parts("a")
    build = "builds/20260101T000000Z-one"
    shards.write_index(str(tmp_path / build), quantizer=quantizer, pca=projection, rows=rows, images=images)
    versions.publish(str(tmp_path), build, versions.read_version(str(tmp_path), build), None)
    segments.write_segment(str(tmp_path), rows, images, quantizer.params.pq_bits, segment_id="orphan")
    return str(tmp_path), build


MB = 1 << 20


def stats(sizes_mb, prefix="s", deleted=None):
    return [merge_policy.SegmentStats(f"{prefix}{i:02d}", int(size * MB), 1000, (deleted or {}).get(i, 0))
            for i, size in enumerate(sizes_mb)]


def test_merge_policy_tiers_allow_segments_by_size():
    policy = merge_policy.MergePolicy()
    assert policy.allowed_segments([]) == 0
    # 1 GB + 9 nightly 10 MB (1114 MB): a tier of 10 x 10 MB, one of 10 x 100 MB, 14 MB left for a
    # third: 21 allowed, nothing to merge.
    nightly = stats([1024] + [10] * 9)
    assert policy.allowed_segments([s.live_bytes for s in nightly]) == 21 and policy.find_merges(nightly) == []
    # Below the floor every segment counts as 2 MB: three tiny ones are allowed one segment.
    assert policy.find_merges(stats([0.1, 0.2, 0.1])) == [("s01", "s00", "s02")]


def test_merge_policy_merges_the_small_tier_and_leaves_the_large_segment():
    policy = merge_policy.MergePolicy()
    segs = stats([1024] + [10] * 25)
    merges = policy.find_merges(segs)
    assert len(merges) == 1 and len(merges[0]) == policy.max_merge_at_once and "s00" not in merges[0]
    # Eleven equal small segments: one merge of ten (max_merge_at_once), the eleventh left alone.
    merges = policy.find_merges(stats([1] * 11))
    assert [len(m) for m in merges] == [10]


def test_merge_policy_respects_the_size_cap_and_expunges_deletes_of_too_large_segments():
    policy = merge_policy.MergePolicy(max_merged_segment_bytes=100 * MB, floor_segment_bytes=1 * MB, segments_per_tier=2,
                                  max_merge_at_once=4)
    segs = stats([60, 30, 30, 30, 30, 20, 5], deleted={0: 500})  # s00: 60 MB, half deleted -> 30 MB live
    merges = policy.find_merges(segs)
    by_id = {s.segment_id: s for s in segs}
    assert merges, "seven segments exceed two tiers of two"
    for merge in merges:
        assert sum(by_id[i].live_bytes for i in merge) <= policy.max_merged_segment_bytes
        assert len(merge) <= policy.max_merge_at_once
    assert len({i for m in merges for i in m}) == sum(len(m) for m in merges)  # no segment in two merges
    big = merge_policy.SegmentStats("big", 120 * MB, 1000, 400)  # too large to merge (72 MB live > 50), 40% deleted
    assert policy.find_merges([big]) == [("big",)]
    assert policy.find_merges([merge_policy.SegmentStats("big", 120 * MB, 1000, 100)]) == []  # 10% deleted


def test_merge_policy_prefers_segments_with_tombstones():
    policy = merge_policy.MergePolicy(segments_per_tier=2, max_merge_at_once=2, floor_segment_bytes=1)
    # Six equal segments, two 30% tombstoned: five allowed; of equal skew, the pair that drops the
    # tombstoned rows scores best.
    merges = policy.find_merges(stats([10] * 6, deleted={4: 300, 5: 300}))
    assert merges[0] == ("s04", "s05")
    assert sorted(merges[1:]) == [("s00", "s01")]  # four of 10 MB left, three allowed


@pytest.mark.parametrize("resident", [True, False])
def test_the_engine_opens_and_probes_a_format_2_version(both, resident, monkeypatch):
    """The service's path: open_engine holds the merged postings (or reads them per probe) and
    probes the version with an image's own stored rows: each descriptor searched with the keypoint
    stored beside it (segment a's first row group has tombstoned rows, so positions in it are not
    global row ids)."""
    history, _, segmented = both
    version = engine.published(segmented.directory)
    searched = []
    original = retrieval.Retriever.search_projected
    monkeypatch.setattr(retrieval.Retriever, "search_projected",
                        lambda self, x, locations, *a, **k: searched.append((x, locations)) or original(self, x, locations,
                                                                                                      *a, **k))
    opened_engine = engine.open_engine(version, engine.EngineConfig(resident=resident), extractor=object(), check=True)
    (x, locations), = searched
    stored = expansion.rows_by_image(segmented)
    image = next(i for i, (d, _) in stored.items() if (d == x[0]).all(axis=1).any())
    pairs = {(d.tobytes(), p.tobytes()) for d, p in zip(*stored[image])}
    assert len(x) >= 10 and all((d.tobytes(), p.tobytes()) in pairs for d, p in zip(x, locations))
    assert opened_engine.resident is resident
    reader = opened_engine.retriever.reader
    assert isinstance(reader, segment_reader.SegmentedReader) and (reader._resident is not None) is resident
    assert opened_engine.image_record(3)["uri"] == "gs://b/3-b.jpg" and opened_engine.image_record(5) is None
    block = next(reader.stored_rows())
    image = int(np.bincount(block.image_ids).argmax())
    own = block.take(block.image_ids == image)
    result = opened_engine.retriever.search_projected(own.descriptors, own.locations)
    assert result.matches[0].image_id == image and result.matches[0].inliers >= len(own) // 2


def test_a_version_folder_reads_by_a_manifest_not_yet_written(both, model, tmp_path):
    """As the neighbour stage reads a build's own version before publishing it."""
    history, single, _ = both
    root = str(tmp_path)
    refs = write_segments(root, history)
    build = "builds/20260101T000000Z-x"
    manifest = segments.version_manifest(os.path.join(root, build), quantizer=model[1], pca=model[0],
                                         segments=[refs[n] for n in "abc"], tombstones=tombstones_of(history, "abc"),
                                         version_folder=build)
    assert not os.path.exists(os.path.join(root, build, layout.MANIFEST))
    reader = segment_reader.SegmentedReader(os.path.join(root, build), manifest=manifest)
    assert_same_search(single, reader, history, among_sets=(None,))
    assert reader.neighbours() is None


