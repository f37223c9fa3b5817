"""Index files: round trip of shards and tables, lazy reads equal in-memory search, and every kind of
damage (missing, truncated, corrupt, foreign shard, no manifest) gives a clear error."""

import json
import os

import numpy as np
import pytest

from delf_retrieval import quantize
from delf_retrieval.index import layout, segments, shard_reader, shards
from delf_retrieval.quantize import pca as pca_lib
from delf_retrieval.quantize.ivf import InvertedLists, Searcher

N_IMAGES = 60
PER_IMAGE = 200


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(21)
    raw = rng.normal(size=(N_IMAGES * PER_IMAGE, 64)).astype(np.float32) @ rng.normal(size=(64, 64)).astype(np.float32)
    projection = pca_lib.fit(raw, 40)
    x = projection.transform(raw)
    trained = quantize.train(x, quantize.IndexParams(n_cells=32, lopq=True, max_region_features=1200, min_region_train=300))
    return {
        "pca": projection, "quantizer": trained, "x": x, "encoded": trained.encode(x),
        "image_ids": np.repeat(np.arange(N_IMAGES, dtype=np.int64) * 10 + 5, PER_IMAGE),
        "locations": rng.uniform(0, 1500, size=(len(x), 2)).astype(np.float32),
        "scales": rng.choice([0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0], len(x)).astype(np.float32),
        "attentions": rng.gamma(2.0, 40.0, len(x)).astype(np.float32),
        "images": shards.image_table([{"image_id": i * 10 + 5, "uri": f"gs://bucket/img/{i}.jpg", "width": 1024,
                                       "height": 768, "num_features": PER_IMAGE, "content_hash": f"{i:064x}",
                                       "label": "scene" if i % 2 else None} for i in range(N_IMAGES)]),
        "dead_letters": shards.dead_letter_table([{"uri": "gs://bucket/broken.jpg", "stage": "decode",
                                                   "reason": "corrupt", "error": "not an image"}]),
    }


def write(directory, corpus, **kwargs):
    rows = shards.PostingRows(*(corpus[k] for k in ("encoded", "image_ids", "locations", "scales", "attentions")))
    return shards.write_index(str(directory), **{k: corpus[k] for k in ("quantizer", "pca", "images", "dead_letters")},
                              rows=rows, model={"preset": "lite"}, **kwargs)


@pytest.fixture()
def index_dir(tmp_path, corpus):
    write(tmp_path / "index", corpus, rows_per_shard=3000, rows_per_group=500)
    return tmp_path / "index"


def test_manifest_lists_every_file_and_count(index_dir, corpus):
    manifest = segments.verify(str(index_dir))
    assert manifest["counts"] == {"images": N_IMAGES, "descriptors": N_IMAGES * PER_IMAGE, "rejected": 1,
                                  "shards": len(manifest["shards"])}
    assert len(manifest["shards"]) >= 3 and manifest["spec"] == corpus["quantizer"].params.spec
    # Shards cover disjoint, increasing ranges of cells.
    ranges = [(s["first_cell"], s["last_cell"]) for s in manifest["shards"]]
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
    listed = {s["path"] for s in manifest["shards"]} | {f["path"] for f in manifest["files"].values()}
    on_disk = {os.path.relpath(os.path.join(root, name), index_dir) for root, _, names in os.walk(index_dir)
               for name in names} - {layout.MANIFEST}
    assert listed == on_disk


def test_round_trip_of_rows_and_tables(index_dir, corpus):
    reader = shard_reader.IndexReader(str(index_dir))
    assert reader.num_rows == len(corpus["x"])
    rows = reader.rows(np.arange(reader.num_rows))
    # Rows are stored sorted by (cell, region, image id): match them back by content.
    stored = np.lexsort((corpus["image_ids"], corpus["encoded"].regions, corpus["encoded"].cells))
    np.testing.assert_array_equal(rows.image_ids, corpus["image_ids"][stored])
    np.testing.assert_allclose(rows.locations, corpus["locations"][stored], atol=0.5)  # whole pixels
    np.testing.assert_allclose(rows.scales, corpus["scales"][stored], rtol=1e-3)  # float16
    np.testing.assert_allclose(rows.attentions, corpus["attentions"][stored], rtol=1e-3)
    images = reader.images.to_pylist()
    assert images[3] == {"image_id": 35, "uri": "gs://bucket/img/3.jpg", "width": 1024, "height": 768,
                         "num_features": PER_IMAGE, "content_hash": f"{3:064x}", "label": "scene", "stamp": None,
                         "latitude": None, "longitude": None}
    assert reader.pca.components.shape == (40, 64)
    np.testing.assert_array_equal(reader.quantizer.encode(corpus["x"][:50]).codes, corpus["encoded"].codes[:50])


def test_lazy_and_resident_search_equal_in_memory_search(index_dir, corpus):
    queries = corpus["x"][::97] + 0.01
    in_memory = Searcher(corpus["quantizer"], InvertedLists.build(corpus["quantizer"].regions.n_regions,
                                                                  corpus["encoded"])).search(queries, 15, 4)
    lazy = shard_reader.IndexReader(str(index_dir), cache_bytes=1)  # evicts all but the last row group
    d_lazy, ids_lazy = lazy.search(queries, 15, 4)
    resident = shard_reader.IndexReader(str(index_dir))
    resident.load_all()
    d_res, ids_res = resident.search(queries, 15, 4)
    np.testing.assert_allclose(d_lazy, in_memory[0], rtol=1e-6)
    np.testing.assert_array_equal(ids_lazy, ids_res)
    # Global row ids name the same images as the in-memory insertion ids.
    np.testing.assert_array_equal(lazy.rows(ids_lazy).image_ids, corpus["image_ids"][in_memory[1]])


def test_probe_reads_only_the_row_groups_of_probed_cells(index_dir, corpus):
    reader = shard_reader.IndexReader(str(index_dir))
    reader.search(corpus["x"][:1], 5, 1)
    cell = reader.quantizer.coarse.assign(corpus["x"][:1])[0]
    loaded = list(reader._cache)
    assert 0 < len(loaded) < len(reader._group_shard)
    assert all(reader._group_first_cell[g] <= cell <= reader._group_last_cell[g] for g in loaded)


def test_missing_manifest_is_not_an_index(tmp_path, index_dir):
    os.remove(index_dir / layout.MANIFEST)
    with pytest.raises(layout.ManifestError, match="no manifest.json"):
        shard_reader.IndexReader(str(index_dir))
    with pytest.raises(layout.ManifestError, match="no manifest.json"):
        shard_reader.IndexReader(str(tmp_path / "nowhere"))


def test_manifest_of_another_version_is_refused(index_dir):
    path = index_dir / layout.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(layout.ManifestError, match="version 99"):
        shard_reader.IndexReader(str(index_dir))


def test_missing_shard(index_dir):
    os.remove(index_dir / "postings" / "part-00001.parquet")
    with pytest.raises(layout.ShardError, match="part-00001.parquet is listed in the manifest but missing"):
        shard_reader.IndexReader(str(index_dir))


def test_truncated_shard(index_dir):
    path = index_dir / "postings" / "part-00000.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(layout.ShardError, match="truncated"):
        shard_reader.IndexReader(str(index_dir))


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_row_group_is_caught_when_read_and_by_verify(index_dir, corpus):
    manifest = layout.read_manifest(str(index_dir))
    group = manifest["shards"][0]["row_groups"][0]
    flip_byte(index_dir / manifest["shards"][0]["path"], group["offset"] + group["length"] // 2)
    reader = shard_reader.IndexReader(str(index_dir))  # sizes still match: opening is cheap and succeeds
    with pytest.raises(layout.ShardError, match="row group 0 does not match its CRC-32"):
        reader.rows(np.arange(10))
    with pytest.raises(layout.ShardError, match="SHA-256"):
        segments.verify(str(index_dir))


def test_corrupt_quantizer_file(index_dir):
    flip_byte(index_dir / layout.QUANTIZER_FILE, 100)
    with pytest.raises(layout.ShardError, match="quantizer.npz does not match its SHA-256"):
        shard_reader.IndexReader(str(index_dir))


def test_shard_from_another_index(tmp_path, index_dir, corpus):
    other = tmp_path / "other"
    write(other, corpus, rows_per_shard=3000, rows_per_group=500)
    # Same sizes and row counts, different index: only the index id can tell.
    os.replace(other / "postings" / "part-00000.parquet", index_dir / "postings" / "part-00000.parquet")
    with pytest.raises(layout.ShardError, match="belongs to another index"):
        shard_reader.IndexReader(str(index_dir))


def test_postings_fit_the_storage_budget(tmp_path, corpus):
    manifest = write(tmp_path / "big-groups", corpus)
    posting_bytes = sum(s["bytes"] for s in manifest["shards"])
    # Code (7 bytes) + image id + location + scale + attention, after compression. The budget of
    # 16 bytes is all-in at scale; this small index still pays Parquet's fixed per-file costs.
    assert posting_bytes / manifest["counts"]["descriptors"] < 16


def test_index_on_gcs_reads_like_a_local_one(gcs_emulator, index_dir, corpus):
    from delf_retrieval import storage

    remote = f"{gcs_emulator}/indexes/run-1"
    write(remote, corpus, rows_per_shard=3000, rows_per_group=500)
    assert storage.exists(f"{remote}/{layout.MANIFEST}")
    segments.verify(remote)
    queries = corpus["x"][::211]
    local_reader, remote_reader = shard_reader.IndexReader(str(index_dir)), shard_reader.IndexReader(remote)
    d_local, ids_local = local_reader.search(queries, 10, 4)
    d_remote, ids_remote = remote_reader.search(queries, 10, 4)
    np.testing.assert_array_equal(ids_local, ids_remote)
    np.testing.assert_array_equal(remote_reader.rows(ids_remote).image_ids, local_reader.rows(ids_local).image_ids)
    # Damage on GCS is caught the same way.
    storage.write_bytes(f"{remote}/postings/part-00001.parquet", b"PAR1 not really")
    with pytest.raises(layout.ShardError, match="truncated or replaced"):
        shard_reader.IndexReader(remote)
    storage.delete(f"{remote}/{layout.MANIFEST}")
    with pytest.raises(layout.ManifestError, match="no manifest.json"):
        shard_reader.IndexReader(remote)


def test_glob_means_the_same_on_disk_and_on_gcs(tmp_path, gcs_emulator):
    from delf_retrieval import storage

    names = ["top.jpg", "a/one.jpg", "a/b/two.jpg", "a/b/two.png", "c/three.JPG"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
        storage.write_bytes(f"{gcs_emulator}/glob/{name}", b"x")
    for pattern in ("**/*.jpg", "a/*.jpg", "*/b/two.*", "a/**", "?/one.jpg", "[ac]/*"):
        local = [os.path.relpath(p, tmp_path) for p in storage.glob(str(tmp_path / pattern))]
        remote = [p[len(f"{gcs_emulator}/glob/"):] for p in storage.glob(f"{gcs_emulator}/glob/{pattern}")]
        assert local == remote, pattern
    assert storage.glob(str(tmp_path / "**/*.jpg")) == [str(tmp_path / n) for n in ("a/b/two.jpg", "a/one.jpg", "top.jpg")]
