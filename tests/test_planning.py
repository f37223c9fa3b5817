"""The build's plan and records without Beam: settings as JSON, the mode, keep / check / extract per
input, shard sizing, the training sample, the trained model record and the one posting-row shape."""

import json

import numpy as np
import pytest

from delf_retrieval.build import encode, planning
from delf_retrieval.corpus import inputs
from delf_retrieval.index import layout, shards
from delf_retrieval.index.neighbour_table import NeighbourConfig
from delf_retrieval.quantize import IndexParams


def test_build_config_round_trips_through_json_and_ignores_unknown_keys():
    config = planning.BuildConfig(index=IndexParams(n_cells=64, pq_m=8, lopq=False), pca_dim=32, sample_size=5000,
                               rows_per_shard=1000, num_shards=3)
    data = json.loads(json.dumps(config.to_json()))
    assert planning.BuildConfig.from_json(data) == config
    data["from_a_newer_version"] = 1
    data["index"]["also_newer"] = True
    assert planning.BuildConfig.from_json(data) == config
    assert planning.BuildConfig.from_json({}) == planning.BuildConfig()
    # A manifest's params carry what training found besides the parameters.
    assert planning.index_params({**vars(IndexParams(n_cells=46)), "regions": 50, "dim": 40}) == IndexParams(n_cells=46)


def test_the_mode_follows_the_current_version():
    current = {"drift": {"retrain_due": False}}
    assert planning.choose_mode(None, fixed_model=False) == planning.FULL
    assert planning.choose_mode(current, fixed_model=False) == planning.INCREMENTAL
    assert planning.choose_mode(current, fixed_model=False, retrain=True) == planning.FULL
    assert planning.choose_mode({"drift": {"retrain_due": True}}, fixed_model=False) == planning.FULL
    assert planning.choose_mode(current, fixed_model=True) == planning.FIXED
    assert planning.choose_mode(None, fixed_model=True) == planning.FIXED


def indexed(uri, stamp, label="old", n=10):
    return {"uri": uri, "stamp": stamp, "label": label, "width": 4, "height": 3, "num_features": n,
            "content_hash": f"h-{uri}"}


def test_incremental_plan_keeps_checks_extracts_and_deletes():
    previous = [indexed("/a.jpg", "st:1"), indexed("/b.jpg", "st:1"), indexed("/gone.jpg", "st:1"),
                indexed("https://h/x.jpg", None), indexed("/unstamped.jpg", None)]
    listed = [("/a.jpg", None, "st:1"),  # same stamp: keep, with the index's label
              ("/b.jpg", "new", "st:2"),  # touched: read and hash
              ("/c.jpg", "c", "st:1"),  # new
              ("https://h/x.jpg", None, None),  # an indexed URL is taken as unchanged
              ("/unstamped.jpg", None, "st:5"),  # no stamp recorded: check
              ("/a.jpg", None, "st:1")]  # listed again: the first row stands
    rows, deleted = planning.plan_rows(listed, previous, incremental=True)
    assert [(r["uri"], r["action"], r["label"]) for r in rows] == [
        ("/a.jpg", planning.KEEP, "old"), ("/b.jpg", planning.CHECK, "new"), ("/c.jpg", planning.EXTRACT, "c"),
        ("https://h/x.jpg", planning.KEEP, "old"), ("/unstamped.jpg", planning.CHECK, "old")]
    assert [(r["uri"], r["action"], r["num_features"]) for r in deleted] == [("/gone.jpg", planning.DELETE, 10)]
    assert rows[0]["num_features"] == 10 and rows[2]["num_features"] is None
    # A full plan extracts everything, still keeps labels the listing lacks, still reports deletions.
    rows, deleted = planning.plan_rows(listed, previous, incremental=False)
    assert {r["action"] for r in rows} == {planning.EXTRACT} and rows[0]["label"] == "old"
    assert [r["uri"] for r in deleted] == ["/gone.jpg"]
    # Over a version of segments, each indexed image's row names the segment holding its rows.
    previous = [{**r, "segment": "s1"} for r in previous]
    rows, deleted = planning.plan_rows(listed, previous, incremental=True)
    assert [r["segment"] for r in rows] == ["s1", "s1", None, "s1", "s1"] and deleted[0]["segment"] == "s1"
    # A listing made of the index's own images (a merge alone) keeps them all.
    rows, deleted = planning.plan_rows([(r["uri"], r["label"], r["stamp"]) for r in previous], previous,
                                    incremental=True, keep_all=True)
    assert {r["action"] for r in rows} == {planning.KEEP} and deleted == []


def test_a_full_plan_trains_on_the_smallest_image_ids_and_bounds_the_descriptors():
    listed = [(f"/p/{i}.jpg", None, "st:1") for i in range(1000)]
    config = planning.BuildConfig(sample_size=5000)
    plan = planning.plan_build(planning.FULL, listed, [{"uri": "/p/1.jpg", "stage": "list", "reason": "duplicate"}],
                            config, max_features=100)
    assert plan.training_sample == frozenset(sorted(inputs.image_id(u) for u, _, _ in listed)[:100])
    assert plan.listed == 1001 and plan.to_read == 1000 and plan.count(planning.EXTRACT) == 1000
    assert plan.num_shards is None and plan.descriptor_bound == 100_000
    assert plan.table().num_rows == 1000 and plan.table().column_names == list(planning.PLAN_FIELDS)
    fixed = planning.plan_build(planning.FIXED, listed, [], config, max_features=100)
    assert fixed.training_sample == frozenset() and fixed.descriptor_bound == 100_000
    with pytest.raises(ValueError, match="unknown build mode"):
        planning.plan_build("partial", listed, [], config, 100)


def test_an_incremental_plan_sizes_the_new_segment_from_the_mean_per_image():
    previous = [indexed(f"/p/{i}.jpg", "st:1", n=300) for i in range(10)]
    listed = [(f"/p/{i}.jpg", None, "st:1") for i in range(10)] + [(f"/q/{i}.jpg", None, "st:1") for i in range(10)]
    counts = {"images": 10, "descriptors": 2000}  # 200 per image on average
    plan = planning.plan_build(planning.INCREMENTAL, listed, [], planning.BuildConfig(rows_per_shard=1000), 300, previous,
                            counts, n_cells=64)
    # The new segment holds the 10 new images only: 10 x 200 = 2000 descriptors, 2 shards of 1000.
    assert plan.num_shards == 2 == shards.shard_count(2000, 64, 1000) and not plan.carry
    assert plan.count(planning.KEEP) == 10 and plan.to_read == 10 and plan.training_sample == frozenset()
    # Over a format-1 version the kept rows are copied in too: 10 x 300 + 10 x 200 = 5000, 5 shards.
    carried = planning.plan_build(planning.INCREMENTAL, listed, [], planning.BuildConfig(rows_per_shard=1000), 300, previous,
                               counts, n_cells=64, carry=True)
    assert carried.num_shards == 5 == shards.shard_count(5000, 64, 1000) and carried.carry
    assert planning.plan_build(planning.INCREMENTAL, listed, [], planning.BuildConfig(num_shards=7), 300, previous, counts,
                            64).num_shards == 7
    with pytest.raises(ValueError, match="current version"):
        planning.plan_build(planning.INCREMENTAL, listed, [], planning.BuildConfig(), 300, previous)


def test_two_uris_with_one_image_id_are_refused_when_planned(monkeypatch):
    monkeypatch.setattr(inputs, "image_id", lambda uri: 7)
    with pytest.raises(encode.PublishRefused, match="image id collision: /b.jpg and /a.jpg"):
        planning.plan_build(planning.FULL, [("/a.jpg", None, "s"), ("/b.jpg", None, "s")], [], planning.BuildConfig(), 100)


def test_a_written_plan_reads_back_by_action(tmp_path):
    rows, _ = planning.plan_rows([("/a", "x", "s1"), ("/b", None, "s2")], [indexed("/a", "s1")], incremental=True)
    # Kept rows are written only by a plan that copies their rows: otherwise they stay in their segment.
    assert [r["uri"] for r in planning.BuildPlan(planning.INCREMENTAL, rows).table().to_pylist()] == ["/b"]
    layout.write_table_file(str(tmp_path), planning.PLAN_FILE, planning.BuildPlan(planning.INCREMENTAL, rows, carry=True).table())
    path = str(tmp_path / planning.PLAN_FILE)
    assert [r["uri"] for r in planning.read_plan(path)] == ["/a", "/b"]
    assert [r["uri"] for r in planning.read_plan(path, (planning.KEEP,))] == ["/a"]
    record = planning.indexed_record(planning.read_plan(path, (planning.KEEP,))[0])
    assert record == {"image_id": inputs.image_id("/a"), "uri": "/a", "label": "x", "stamp": "s1", "width": 4,
                      "height": 3, "num_features": 10, "content_hash": "h-/a"}


def test_trained_model_is_index_train_with_its_error_and_round_trips_its_record():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(600, 24)).astype(np.float32)
    params = IndexParams(n_cells=4, pq_m=2, lopq=False)
    model = encode.TrainedModel.trained(raw, params, 8)
    projection, quantizer = encode.train(raw, params, 8)
    assert model.pca == projection.to_npz_bytes() and model.quantizer == quantizer.to_npz_bytes()
    assert model.sample_size == 600
    assert model.quantization_error == pytest.approx(encode.quantization_error(projection, quantizer, raw))
    again = encode.TrainedModel.from_record(model.pca, model.quantizer, json.loads(json.dumps(model.training_record())))
    assert again == model
    assert encode.TrainedModel.from_record(b"p", b"q", None).quantization_error is None


def test_posting_rows_survive_the_shard_format_and_split_by_cell_range():
    rng = np.random.default_rng(1)
    n, m, bits, n_cells = 500, 4, 5, 16
    from delf_retrieval.quantize import Encoded

    rows = shards.PostingRows(
        Encoded(rng.integers(0, n_cells, n), rng.integers(0, 3, n), rng.integers(0, 1 << bits, (n, m)).astype(np.uint8)),
        rng.integers(0, 50, n).astype(np.int64), rng.integers(0, 900, (n, 2)).astype(np.float32),
        rng.uniform(0.25, 2, n).astype(np.float16).astype(np.float32),
        rng.uniform(0, 5, n).astype(np.float16).astype(np.float32))
    back = shards.posting_rows(shards.postings_table(rows, bits), m, bits)
    order = np.lexsort((rows.image_ids, rows.encoded.regions, rows.encoded.cells))  # the table's order
    expected = rows.take(order)
    for name in ("cells", "regions", "codes"):
        np.testing.assert_array_equal(getattr(back.encoded, name), getattr(expected.encoded, name))
    for name in ("image_ids", "locations", "scales", "attentions"):
        np.testing.assert_array_equal(getattr(back, name), getattr(expected, name))
    parts = dict(encode.split_by_shard(rows, n_cells, 4))
    assert sum(len(p) for p in parts.values()) == n
    for shard, part in parts.items():
        assert set(part.encoded.cells // 4) == {shard}  # 16 cells in 4 contiguous ranges
    joined = shards.PostingRows.concatenate(list(parts.values()), m)
    assert sorted(joined.image_ids.tolist()) == sorted(rows.image_ids.tolist())
    assert len(shards.PostingRows.concatenate([], m)) == 0


def test_the_neighbour_settings_follow_the_index_in_an_incremental_build_and_k_otherwise():
    assert planning.neighbour_settings(planning.FULL, None, 0, 10) == (None, None)
    assert planning.neighbour_settings(planning.FULL, None, 20, 15) == (NeighbourConfig(20, 15), None)
    record = {"path": "neighbours.parquet", "bytes": 1, "sha256": "0"}
    pointer = {"neighbours": {"k": 7, "min_inliers": 12}, "files": {"neighbours": record}}
    assert planning.neighbour_settings(planning.INCREMENTAL, pointer, 0, 10) == (NeighbourConfig(7, 12), record)
    assert planning.neighbour_settings(planning.INCREMENTAL, {"files": {}}, 20, 10) == (NeighbourConfig(20, 10), None)
    assert planning.neighbour_settings(planning.INCREMENTAL, {"files": {}}, 0, 10) == (None, None)


def test_the_previous_images_of_a_format_1_index_are_read_checked(tmp_path):
    table = shards.image_table([{"image_id": 1, "uri": "a.jpg", "width": 4, "height": 3, "num_features": 2,
                                 "content_hash": "x"}])
    record = layout.write_table_file(str(tmp_path), layout.IMAGES_FILE, table)
    pointer = {"format_version": 1, "files": {"images": record}}
    assert planning.previous_images(str(tmp_path), None) == []
    assert [r["uri"] for r in planning.previous_images(str(tmp_path), pointer)] == ["a.jpg"]
    data = bytearray((tmp_path / layout.IMAGES_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / layout.IMAGES_FILE).write_bytes(bytes(data))
    with pytest.raises(layout.ShardError, match="SHA-256"):
        planning.previous_images(str(tmp_path), pointer)
