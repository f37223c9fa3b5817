"""Building an index from features: uniform sampling, the separate quantizer builder, a full write."""

import json

import numpy as np
import pytest

from delf_retrieval import quantize
from delf_retrieval.build import encode
from delf_retrieval.extraction.features import Features
from delf_retrieval.index import shard_reader, shards
from pipeline import build_quantizer


def fake_features(n_images, per_image, dim=48, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(dim, dim)).astype(np.float32)
    for i in range(n_images):
        yield Features(locations=rng.uniform(0, 800, (per_image, 2)).astype(np.float32),
                       scales=np.ones(per_image, np.float32), scores=rng.uniform(1, 9, per_image).astype(np.float32),
                       descriptors=rng.normal(size=(per_image, dim)).astype(np.float32) @ basis,
                       image_size=(600, 800))


def test_sampling_is_uniform_over_the_stream():
    # Descriptor value = its position in the stream: a uniform sample has a flat histogram.
    stream = [Features(np.zeros((n, 2)), np.ones(n), np.ones(n), np.arange(s, s + n, dtype=np.float32)[:, None],
                       (1, 1)) for s, n in ((0, 3000), (3000, 500), (3500, 16500))]
    sample = encode.sample_descriptors(stream, 2000, seed=3)[:, 0]
    assert len(sample) == 2000 and len(np.unique(sample)) == 2000
    counts = np.histogram(sample, bins=10, range=(0, 20000))[0]
    assert counts.min() > 140 and counts.max() < 260  # expected 200 per bin
    short = encode.sample_descriptors(stream[:1], 5000)
    assert len(short) == 3000
    with pytest.raises(ValueError, match="no features"):
        encode.sample_descriptors([], 10)


def test_build_quantizer_cli_writes_loadable_artifacts(tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    for i, f in enumerate(fake_features(12, 300)):
        f.save(str(folder / f"img{i}.npz"))
    code = build_quantizer.run(["--features", str(folder), "--output", str(tmp_path / "q"), "--cells", "16",
                                "--pca-dim", "40", "--sample-size", "3000"])
    assert code == 0
    report = json.loads((tmp_path / "q" / "quantizer.json").read_text())
    assert report["spec"] == "IVF16,PQ10x5,LOPQ30000" and report["sample_size"] == 3000 and report["input_dim"] == 48
    loaded = quantize.Quantizer.load(str(tmp_path / "q" / "quantizer.npz"))
    assert loaded.params.n_cells == 16


def test_write_index_from_encoded_images(tmp_path):
    features = list(fake_features(8, 250, seed=1))
    projection, quantizer = encode.train(np.concatenate([f.descriptors for f in features]),
                                        quantize.IndexParams(n_cells=8))
    encoded = [encode.encode_image(100 + i, f, projection, quantizer) for i, f in enumerate(features)]
    table = shards.image_table([{"image_id": 100 + i, "uri": f"img{i}.jpg", "width": 800, "height": 600,
                                 "num_features": 250, "content_hash": "0" * 64} for i in range(8)])
    manifest = encode.write(str(tmp_path / "idx"), encoded, table, projection, quantizer)
    assert manifest["counts"]["descriptors"] == 2000
    reader = shard_reader.IndexReader(str(tmp_path / "idx"))
    # An image's own descriptors find that image.
    _, ids = reader.search(projection.transform(features[5].descriptors[:50]), 1, nprobe=8)
    assert (reader.rows(ids[:, 0]).image_ids == 105).mean() > 0.9


def test_merged_reservoirs_sample_the_union_uniformly():
    # Two workers see streams of very different sizes; the merged sample must weigh them by size.
    a, b = encode.Reservoir(1000, seed=1), encode.Reservoir(1000, seed=2)
    for start in range(0, 3000, 700):
        a.add(np.arange(start, min(start + 700, 3000), dtype=np.float32)[:, None])
    b.add(np.arange(3000, 12000, dtype=np.float32)[:, None])
    a.merge(b)
    sample = a.result()[:, 0]
    assert a.seen == 12000 and len(sample) == 1000 and len(np.unique(sample)) == 1000
    share_a = np.mean(sample < 3000)
    assert 0.2 < share_a < 0.3  # 3000 of 12000 rows came from a
    empty = encode.Reservoir(10)
    empty.merge(a)
    assert empty.seen == 12000
