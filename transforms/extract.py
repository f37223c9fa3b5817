"""Beam stages from listed images to features: read (disk, gs://, http), decode, batched
extraction; every input that cannot be used leaves as a dead letter with its stage and reason.
Also what every stage shares: dead-letter records and the per-stage timer."""

from __future__ import annotations

import sys
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from delf_retrieval.corpus import images, inputs
from delf_retrieval.corpus.inputs import FetchConfig, Fetcher, image_id
from delf_retrieval.extraction.extractor import ExtractionConfig, Extractor
from delf_retrieval.model import delf

DEAD_LETTER = "dead_letter"
METRICS_NAMESPACE = "delf"
STAGES = ("read", "decode", "model_load", "extract", "sample", "train", "encode", "write", "merge", "first_stage",
          "neighbours", "publish")


class StageTimer:
    """Wall microseconds per element of one stage, as the Beam distribution ``delf/<stage>_us``
    (integers, so microseconds keep sub-millisecond stages; its sum is the stage's total time, and
    it shows in the Dataflow UI and in a run's metrics). ``with timer:`` around one element's work
    (never around a ``yield``: the fused steps downstream would be counted), or ``timer.share``
    for the elements of a batch."""

    def __init__(self, stage: str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        self.distribution = Metrics.distribution(METRICS_NAMESPACE, f"{stage}_us")
        self._starts: list[float] = []

    def __enter__(self) -> "StageTimer":
        self._starts.append(time.perf_counter())
        return self

    def __exit__(self, *_) -> bool:
        self.distribution.update(int(round((time.perf_counter() - self._starts.pop()) * 1e6)))
        return False

    def share(self, seconds: float, elements: int) -> None:
        """One update per element, each its share of ``seconds`` spent on all of them."""
        for _ in range(elements):
            self.distribution.update(int(round(seconds * 1e6 / elements)))


class ProgressLine:
    """Images finished (indexed or rejected) of a known total, with rate and ETA, on stderr at most
    every few seconds. One per worker process: on the local in-process runner that is the job."""

    def __init__(self):
        self.total = 0
        self.done = 0
        self.start = 0.0
        self.last = 0.0

    def configure(self, total: int, every_seconds: float = 2.0) -> None:
        if self.total != total:
            self.total, self.done, self.start, self.last = total, 0, time.time(), 0.0
        self.every_seconds = every_seconds

    def tick(self, n: int = 1) -> None:
        if not self.total:
            return
        self.done += n
        now = time.time()
        if now - self.last < self.every_seconds and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else float("inf")
        end = "\n" if self.done >= self.total else ""
        print(f"\r[delf] images {self.done}/{self.total}  {rate:.2f}/s  ETA {eta:.0f} s", end=end,
              file=sys.stderr, flush=True)


PROGRESS = ProgressLine()


def dead_letter(uri: str, stage: str, reason: str, error: str) -> dict:
    """A dead-letter record: which input, at which stage, why."""
    return {"uri": uri, "stage": stage, "reason": reason, "error": error}


INTERNAL_ERRORS = Metrics.counter(METRICS_NAMESPACE, "internal_errors")


def internal_error(uri: str, stage: str, error: BaseException):
    """An unexpected exception for one element, as its dead letter (reason ``internal_error``, with
    the exception's type and message), counted; the bundle and the other elements go on."""
    INTERNAL_ERRORS.inc()
    return beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(uri, stage, "internal_error",
                                                             f"{type(error).__name__}: {error}"))


def in_sample(row: dict, ids: frozenset, inside: bool = True) -> bool:
    """Whether the plan row's image id is (``inside``) or is not in ``ids``. Steps call module-level
    functions such as this one, never lambdas: they pickle by reference, so workers run the code of
    the package they installed, and no file name of the launching machine travels with the job."""

    return (image_id(row["uri"]) in ids) == inside


def split_training_sample(rows, chosen: frozenset, label: str = "TrainingSample"):
    """Plan rows (dicts with a ``uri``) -> (the training sample, the rest): the rows whose image id
    is in ``chosen`` (``index.training_sample``)."""
    sample = rows | f"{label}Images" >> beam.Filter(in_sample, chosen)
    rest = rows | f"{label}Rest" >> beam.Filter(in_sample, chosen, inside=False)
    return sample, rest


class ReadImage(beam.DoFn):
    """InputImage -> (InputImage, bytes), bounded in time and size by a ``FetchConfig``; an
    unreadable, oversized or unfetchable input -> dead letter."""

    def __init__(self, fetch=None, progress_total: int = 0):
        self.fetch = fetch or FetchConfig()
        self.progress_total = progress_total
        self.fetcher = None
        self.failed = Metrics.counter("delf", "images_unreadable")
        self.timing = StageTimer("read")

    def setup(self):
        self.fetcher = Fetcher(self.fetch)
        PROGRESS.configure(self.progress_total)

    def process(self, image):
        with self.timing:
            data, rejected = read_input(image.uri, self.fetcher)
        if rejected is not None:
            self.failed.inc()
            PROGRESS.tick()
            yield rejected
        else:
            yield image, data


def read_input(uri: str, fetcher):
    """(an input's bytes, None), or (None, its dead letter): stage ``fetch`` for http(s), ``read``
    otherwise, with the typed reason, or ``internal_error`` for anything unexpected."""

    stage = "fetch" if inputs.is_url(uri) else "read"
    try:
        return inputs.read_image_bytes(uri, fetcher), None
    except (inputs.FetchError, images.ImageError) as e:
        return None, beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(uri, stage, e.reason, str(e)))
    except OSError as e:
        return None, beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(uri, stage, "unreadable",
                                                                       f"{type(e).__name__}: {e}"))
    except Exception as e:  # noqa: BLE001 - one input never fails the bundle
        return None, internal_error(uri, stage, e)


class DecodeImage(beam.DoFn):
    """(key, encoded bytes) -> (key, RGB array, ImageFacts: content hash and EXIF GPS); bad images
    -> dead letter. The key is an ``InputImage`` (or a plain uri string)."""

    def __init__(self, limits: dict | None = None):
        self.limits = limits or {}
        self.decoded = Metrics.counter("delf", "images_decoded")
        self.rejected = Metrics.counter("delf", "images_rejected")
        self.timing = StageTimer("decode")

    def process(self, element):
        key, data = element
        uri = getattr(key, "uri", key)
        with self.timing:
            try:
                image = images.decode_image(data, name=uri, limits=images.DecodeLimits(**self.limits))
                facts = images.image_facts(data)
            except Exception as e:  # noqa: BLE001 - typed errors by their reason, anything else as internal
                image, failure = None, e
        if image is None:
            self.rejected.inc()
            PROGRESS.tick()
            yield (beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(uri, "decode", failure.reason, str(failure)))
                   if isinstance(failure, images.ImageError) else internal_error(uri, "decode", failure))
            return
        self.decoded.inc()
        yield key, image, facts


class ExtractFeatures(beam.DoFn):
    """Batches of (key, image, facts) -> (key, Features, facts) (the facts pass through). The network is built once per worker,
    by its first batch (never pickled with the graph), from plain model/extraction settings. If a batch
    fails, its images are retried one by one and only the failing ones become dead letters."""

    def __init__(self, model_config: dict, extraction_config: dict):
        self.model_config = model_config
        self.extraction_config = extraction_config
        self.extractor = None
        self.features = Metrics.counter("delf", "features_extracted")
        self.failed = Metrics.counter("delf", "images_extraction_failed")
        self.timing = StageTimer("extract")

    def setup(self):
        self.extractor = None  # built by the first batch: a worker (or a re-index) with none never loads it

    def _build(self):
        with StageTimer("model_load"):
            net = delf.load(delf.ModelConfig.from_json(dict(self.model_config)))
            self.extractor = Extractor(net, ExtractionConfig.from_json(self.extraction_config))

    def process(self, batch):
        if self.extractor is None:
            self._build()
        start = time.perf_counter()
        try:
            results = self.extractor.extract_batch([image for _, image, _ in batch])
        except Exception:  # noqa: BLE001 - isolate the image that fails, keep the others
            results = None
        if results is not None:
            self.timing.share(time.perf_counter() - start, len(batch))
        for i, (key, image, digest) in enumerate(batch):
            if results is None:
                try:
                    with self.timing:
                        features = self.extractor.extract(image)
                except Exception as e:  # noqa: BLE001 - one bad image must not fail the job
                    self.failed.inc()
                    PROGRESS.tick()
                    yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(getattr(key, "uri", key), "extract",
                                                                            "extraction_failed", f"{type(e).__name__}: {e}"))
                    continue
            else:
                features = results[i]
            self.features.inc(len(features))
            PROGRESS.tick()
            yield key, features, digest


def with_accelerator(transform, accelerator: str | None):
    """``transform`` with the Beam accelerator hint ``accelerator`` (None: as it is), which Dataflow
    meets with GPU workers (right fitting). The hint goes on every step from reading an image to what
    is made of its features (``ExtractImages`` and the step after it): Beam runs hinted steps in an
    environment of their own, which no other step fuses with, so a hint on the network's step alone
    would cut that stage in three and materialise the decoded images and the raw features
    (docs/dataflow.md, "What is checked offline")."""
    return transform.with_resource_hints(accelerator=accelerator) if accelerator else transform


class ExtractImages(beam.PTransform):
    """InputImage records -> {"features": (InputImage, Features, ImageFacts), "dead_letter": records}."""

    def __init__(self, model_config, extraction_config, max_batch_size: int = 8, decode_limits: dict | None = None,
                 fetch=None, progress_total: int = 0):
        super().__init__()
        self.model_config = model_config.to_json() if hasattr(model_config, "to_json") else dict(model_config)
        self.extraction_config = (extraction_config.to_json() if hasattr(extraction_config, "to_json")
                                  else dict(extraction_config))
        self.max_batch_size = max_batch_size
        self.decode_limits = decode_limits
        self.fetch = fetch  # a FetchConfig (None: its defaults)
        self.progress_total = progress_total

    def expand(self, images):
        read = images | "Read" >> beam.ParDo(ReadImage(self.fetch, progress_total=self.progress_total)).with_outputs(
            DEAD_LETTER, main="bytes")
        decoded = read.bytes | "Decode" >> beam.ParDo(DecodeImage(self.decode_limits)).with_outputs(DEAD_LETTER, main="images")
        extracted = (
            decoded.images
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
            | "Extract" >> beam.ParDo(ExtractFeatures(self.model_config, self.extraction_config)).with_outputs(
                DEAD_LETTER, main="features")
        )
        dead = (read[DEAD_LETTER], decoded[DEAD_LETTER], extracted[DEAD_LETTER]) | "DeadLetters" >> beam.Flatten()
        return {"features": extracted.features, DEAD_LETTER: dead}
