"""On the landmarks-dev photographs (skipped without ../shared): features of two views of the same
scene match each other far more than they match an unrelated image."""

import os

from delf_retrieval.corpus.images import load_image
from delf_retrieval.extraction.extractor import ExtractionConfig, Extractor
from tests.conftest import good_matches


def test_same_scene_matches_more_than_other_scenes(landmarks_dev, lite_net):
    extractor = Extractor(lite_net, ExtractionConfig(scales=(0.5, 0.7071, 1.0), max_features=500, max_image_size=640))
    photo = lambda *p: extractor.extract(load_image(os.path.join(landmarks_dev, *p))).descriptors  # noqa: E731
    query = photo("images", "herz_jesu", "0000.jpg")
    same = good_matches(query, photo("images", "herz_jesu", "0002.jpg"))
    other_scene = good_matches(query, photo("images", "fountain", "0001.jpg"))
    distractor = good_matches(query, photo("distractors", "17_Elephants.jpg"))
    assert same >= 20
    assert same > 5 * max(other_scene, distractor, 1)
