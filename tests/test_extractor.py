"""Multi-scale extraction: buckets, pyramid, selection rules, location mapping, padding, batching,
determinism and no retracing."""

import dataclasses

import numpy as np
import pytest

from delf_retrieval.corpus.images import load_image
from delf_retrieval.extraction.extractor import ExtractionConfig, Extractor, bucket_size, pyramid, select_keypoints
from delf_retrieval.extraction.features import Features
from delf_retrieval.model import delf
from tests.conftest import sample_path


def test_bucket_ladder():
    for n in range(1, 3000, 7):
        b = bucket_size(n, 32)
        assert b >= n and b % 32 == 0
        assert b - n < max(32, 0.25 * n + 1)  # bounded padding
    sizes = {bucket_size(n, 16) for n in range(16, 2049)}
    assert len(sizes) < 30  # a small fixed set of compiled shapes


def test_pyramid_sizes_and_limits():
    config = ExtractionConfig(scales=(0.25, 1.0, 2.0), max_image_size=500)
    levels = pyramid(480, 1000, config, stride=16)
    assert [(lv.height, lv.width) for lv in levels] == [(60, 125), (240, 500), (480, 1000)]
    assert [lv.scale for lv in levels] == [0.125, 0.5, 1.0]
    # Levels smaller than a stride are skipped.
    assert [lv.scale for lv in pyramid(40, 40, ExtractionConfig(scales=(0.25, 1.0)), stride=16)] == [1.0]
    up = pyramid(100, 50, ExtractionConfig(scales=(1.0,), min_image_size=200), stride=16)
    assert (up[0].height, up[0].width) == (200, 100)


def test_select_keypoints_matches_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 500).astype(np.float32)  # many ties
    for threshold, k in [(0.0, 50), (10.0, 1000), (19.0, 3), (25.0, 10)]:
        kept = select_keypoints(scores, k, threshold)
        brute = sorted([i for i in range(len(scores)) if scores[i] >= threshold], key=lambda i: (-scores[i], i))[:k]
        assert kept.tolist() == brute


class _PoolNet:
    """A stand-in network with a known receptive field: 8x8 average pooling (stride 8, centre 3.5).

    Its 'descriptor' is the mean brightness of a cell, so a bright dot is found where it is.
    """

    def __init__(self):
        import keras

        inp = keras.Input((None, None, 3))
        backbone = keras.Model(inp, keras.layers.AveragePooling2D(8, strides=8)(inp))
        attention = keras.Model(inp, keras.layers.AveragePooling2D(8, strides=8)(inp)[..., :1])
        config = delf.ModelConfig(backbone="efficientnet_lite0", weights="random", keypoint_score="l2norm",
                                  normalisation={"mean": [0.0] * 3, "std": [255.0] * 3, "bgr": False})
        self.net = delf.DelfNet(config, backbone, attention)


@pytest.mark.parametrize("dot", [(37, 90), (150, 20), (5, 230)])
def test_locations_map_back_to_the_original_image(dot):
    net = _PoolNet().net
    image = np.zeros((200, 260, 3), np.uint8)
    y, x = dot
    image[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] = 255
    config = ExtractionConfig(scales=(0.5, 0.7071, 1.0, 1.4142), max_features=1)
    features = Extractor(net, config).extract(image)
    assert len(features) == 1
    (fy, fx), scale = features.locations[0], features.scales[0]
    half_cell = 4.0 / scale  # the cell's half width in original pixels
    assert abs(fy - y) <= half_cell + 1 and abs(fx - x) <= half_cell + 1


def test_padding_produces_no_features():
    net = _PoolNet().net
    image = np.full((100, 150, 3), 255, np.uint8)  # bright everywhere: padding is darker than any cell
    extractor = Extractor(net, ExtractionConfig(scales=(1.0, 0.5), max_features=10_000))
    features = extractor.extract(image)
    h, w = image.shape[:2]
    assert (features.locations[:, 0] >= 0).all() and (features.locations[:, 0] <= h - 1).all()
    assert (features.locations[:, 1] >= 0).all() and (features.locations[:, 1] <= w - 1).all()
    # Exactly the cells whose centre lies in the image: 3.5 + 8 i <= n - 1 at each level.
    expected = sum(len(np.arange(3.5, n - 0.5, 8)) * len(np.arange(3.5, m - 0.5, 8)) for n, m in [(h, w), (50, 75)])
    assert len(features) == expected


@pytest.fixture(scope="module")
def photos():
    return [load_image(sample_path("berlin_cathedral", "01.jpg")), load_image(sample_path("sacre_coeur", "02928139_3448003521.jpg")),
            load_image(sample_path("lund_street", "07.jpg"))]


SMALL = ExtractionConfig(scales=(0.25, 0.5, 0.7071), max_features=300)


def test_extraction_output_format(lite_net, photos):
    features = Extractor(lite_net, SMALL).extract(photos[0])
    n = len(features)
    assert n == 300
    assert features.locations.shape == (n, 2) and features.descriptors.shape == (n, 112)
    assert features.descriptors.dtype == np.float32 and features.scores.dtype == np.float32
    assert set(np.unique(features.scales).tolist()) <= set(np.float32([0.25, 0.5, 0.7071]).tolist())
    assert np.all(np.diff(features.scores) <= 0)  # best first
    np.testing.assert_allclose(features.scores, np.linalg.norm(features.descriptors, axis=1), rtol=1e-5)
    assert features.image_size == photos[0].shape[:2]


def test_threshold_is_applied(lite_net, photos):
    everything = Extractor(lite_net, dataclasses.replace(SMALL, max_features=100_000)).extract(photos[0])
    threshold = float(np.median(everything.scores))
    kept = Extractor(lite_net, dataclasses.replace(SMALL, max_features=100_000, score_threshold=threshold)).extract(photos[0])
    assert len(kept) == int((everything.scores >= threshold).sum())
    assert kept.scores.min() >= threshold


def test_deterministic_bit_identical(lite_net, photos):
    a = Extractor(lite_net, SMALL).extract(photos[1])
    b = Extractor(lite_net, SMALL).extract(photos[1])
    for field in ("locations", "scales", "scores", "descriptors"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_any_size_without_retracing(lite_net, photos):
    extractor = Extractor(lite_net, SMALL)
    for image in photos + [photos[0][:333, :517], photos[1][:97, :180]]:
        extractor.extract(image)
    assert extractor.network_calls_traced() == 1


def test_batched_equals_one_by_one(lite_net, photos):
    single = Extractor(lite_net, SMALL)
    batched = Extractor(lite_net, dataclasses.replace(SMALL, batch_pixels=4 * 512 * 384))
    together = batched.extract_batch(photos)
    for image, got in zip(photos, together):
        alone = single.extract(image)
        np.testing.assert_array_equal(got.locations, alone.locations)
        np.testing.assert_allclose(got.descriptors, alone.descriptors, rtol=1e-4, atol=1e-4)
    assert Extractor.padded_batch(3, 8) == 4 and Extractor.padded_batch(5, 4) == 4 and Extractor.padded_batch(1, 8) == 1


def test_feature_file_round_trip(tmp_path, lite_net, photos):
    features = Extractor(lite_net, SMALL).extract(photos[2])
    features.save(str(tmp_path / "f.npz"))
    loaded = Features.from_npz(str(tmp_path / "f.npz"))
    for field in ("locations", "scales", "scores", "descriptors"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(features, field))
    assert loaded.image_size == features.image_size


def test_extraction_config_round_trips_as_json():
    import json

    config = ExtractionConfig(scales=(0.5, 1.0), max_features=300, max_image_size=640, batch_pixels=4_000_000)
    data = json.loads(json.dumps(config.to_json()))
    assert data["scales"] == [0.5, 1.0]
    assert ExtractionConfig.from_json(data) == config
    assert ExtractionConfig.from_json({**data, "a_newer_setting": 1}) == config  # an index from a newer version
    assert ExtractionConfig.from_json({}) == ExtractionConfig()
