"""The Beam extraction transforms on the local runner: every input ends as features or a dead letter."""

import shutil

import apache_beam as beam
import numpy as np
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from delf_retrieval.corpus.images import load_image
from delf_retrieval.corpus.inputs import InputImage, list_source
from delf_retrieval.extraction.extractor import ExtractionConfig, Extractor
from delf_retrieval.extraction.features import Features
from delf_retrieval.model import delf
from tests.conftest import sample_path
from transforms.extract import DEAD_LETTER, ExtractFeatures, ExtractImages


def test_extract_from_files_accounts_for_every_input(tmp_path, cache_dir):
    shutil.copy(sample_path("berlin_cathedral", "01.jpg"), tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image" * 100)
    model = delf.ModelConfig(backbone="efficientnet_lite0", keypoint_score="l2norm")
    extraction = ExtractionConfig(scales=(0.25, 0.5), max_features=100)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        listed, repeats = list_source(str(tmp_path / "*.jpg"))
        assert len(listed) == 3 and not repeats
        out = p | beam.Create(listed) | ExtractImages(model, extraction)
        summary = out["features"] | beam.Map(lambda r: (r[0].uri.rsplit("/", 1)[-1], len(r[1]), r[1].descriptors.shape[1]))
        assert_that(summary, equal_to([("good.jpg", 100, 112)]), label="features")
        reasons = out[DEAD_LETTER] | beam.Map(lambda d: (d["uri"].rsplit("/", 1)[-1], d["stage"], d["reason"]))
        assert_that(reasons, equal_to([("empty.jpg", "decode", "empty"), ("junk.jpg", "decode", "corrupt")]),
                    label="dead letters")
        # The transform computes what the library computes.
        expected = Extractor(delf.load(model), extraction).extract(load_image(str(tmp_path / "good.jpg")))
        same = out["features"] | beam.Map(lambda r: bool(np.array_equal(r[1].descriptors, expected.descriptors)))
        assert_that(same, equal_to([True]), label="same as library")


class FlakyExtractor:
    """Fails on whole batches, and on single images whose first pixel is 255."""

    def extract_batch(self, images):
        raise RuntimeError("out of memory")

    def extract(self, image):
        if image[0, 0, 0] == 255:
            raise ValueError("bad image")
        return Features(np.zeros((1, 2)), np.ones(1), np.ones(1), np.zeros((1, 4)), image.shape[:2])


def test_a_failing_batch_loses_only_the_failing_image():
    fn = ExtractFeatures({}, {})
    fn.extractor = FlakyExtractor()
    good, bad = np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)
    batch = [(InputImage("a.jpg"), good, "h1"), (InputImage("b.jpg"), bad, "h2"), (InputImage("c.jpg"), good, "h3")]
    out = list(fn.process(batch))
    assert [r[0].uri for r in out if isinstance(r, tuple)] == ["a.jpg", "c.jpg"]
    dead = [r.value for r in out if isinstance(r, beam.pvalue.TaggedOutput)]
    assert [(d["uri"], d["stage"], d["reason"]) for d in dead] == [("b.jpg", "extract", "extraction_failed")]
    assert "bad image" in dead[0]["error"]
