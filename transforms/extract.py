"""Read, decode and extract DELF features in Beam, with a dead-letter output for bad images."""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.metrics import Metrics

DEAD_LETTER = "dead_letter"


def dead_letter(uri: str, stage: str, reason: str, error: str) -> dict:
    """A dead-letter record: which input, at which stage, why."""
    return {"uri": uri, "stage": stage, "reason": reason, "error": error}


class DecodeImage(beam.DoFn):
    """(uri, encoded bytes) -> (uri, RGB array, content hash); bad images -> the dead-letter output."""

    def __init__(self):
        self.decoded = Metrics.counter("delf", "images_decoded")
        self.rejected = Metrics.counter("delf", "images_rejected")

    def process(self, element):
        from delf_retrieval import images

        uri, data = element
        try:
            image = images.decode_image(data, name=uri)
        except images.ImageError as e:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(uri, "decode", e.reason, str(e)))
            return
        self.decoded.inc()
        yield uri, image, images.content_hash(data)


class ExtractFeatures(beam.DoFn):
    """Batches of (uri, image, hash) -> (uri, Features, hash). The network is built once per worker
    in ``setup`` (never pickled with the graph) from plain model/extraction settings."""

    def __init__(self, model_config: dict, extraction_config: dict):
        self.model_config = model_config
        self.extraction_config = extraction_config
        self.extractor = None
        self.features = Metrics.counter("delf", "features_extracted")

    def setup(self):
        from delf_retrieval.extract import ExtractionConfig, Extractor
        from delf_retrieval.model import delf

        net = delf.load(delf.ModelConfig.from_json(dict(self.model_config)))
        config = dict(self.extraction_config)
        config["scales"] = tuple(config["scales"])
        self.extractor = Extractor(net, ExtractionConfig(**config))

    def process(self, batch):
        results = self.extractor.extract_batch([image for _, image, _ in batch])
        for (uri, _, digest), features in zip(batch, results):
            self.features.inc(len(features))
            yield uri, features, digest


class ExtractFromFiles(beam.PTransform):
    """File pattern(s) -> features per image, plus dead letters for files that cannot be used.

    Returns a dict with ``features`` ((uri, Features, content hash)) and ``dead_letter``.
    """

    def __init__(self, model_config, extraction_config, max_batch_size: int = 8):
        super().__init__()
        self.model_config = model_config.to_json()
        self.extraction_config = dataclasses.asdict(extraction_config)
        self.max_batch_size = max_batch_size

    def expand(self, patterns):
        from apache_beam.io import fileio

        files = (
            patterns
            | "MatchFiles" >> fileio.MatchAll()
            | "SpreadOverWorkers" >> beam.Reshuffle()
            | "ReadMatches" >> fileio.ReadMatches()
            | "ReadBytes" >> beam.Map(lambda f: (f.metadata.path, f.read()))
        )
        decoded = files | "Decode" >> beam.ParDo(DecodeImage()).with_outputs(DEAD_LETTER, main="images")
        features = (
            decoded.images
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
            | "Extract" >> beam.ParDo(ExtractFeatures(self.model_config, self.extraction_config))
        )
        return {"features": features, DEAD_LETTER: decoded[DEAD_LETTER]}
