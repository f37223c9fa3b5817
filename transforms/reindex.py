"""The Beam steps of the incremental mode of the build (``transforms.index.BuildIndex``): check the
content of maybe-changed images, carry the posting rows of unchanged images over from the current
version (re-split by cell into the new shards), read the current model and measure codebook drift."""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from delf_retrieval.build import encode, planning
from delf_retrieval.corpus import images, inputs
from delf_retrieval.corpus.inputs import FetchConfig, Fetcher
from delf_retrieval.index import layout, shards
from transforms.extract import internal_error, read_input

SAME = "same"  # checked images whose content did not change (a touched file, a rewritten object)


class CheckContent(beam.DoFn):
    """Plan rows whose stamp changed -> the image if its content hash changed too, else its uri on
    the ``same`` output (its rows are carried over; only its bytes were read, nothing extracted).
    An input that cannot be read leaves as ``read_input``'s dead letter, as in extraction."""

    def __init__(self, fetch=None):
        self.fetch = fetch or FetchConfig()
        self.same = Metrics.counter("delf", "images_checked_unchanged")
        self.changed = Metrics.counter("delf", "images_checked_changed")

    def setup(self):
        self.fetcher = Fetcher(self.fetch)

    def process(self, row):
        data, rejected = read_input(row["uri"], self.fetcher)
        if rejected is not None:
            yield rejected
            return
        if images.content_hash(data) == row["content_hash"]:
            self.same.inc()
            yield beam.pvalue.TaggedOutput(SAME, row["uri"])
        else:
            self.changed.inc()
            yield planning.input_of(row)


class CarryPostings(beam.DoFn):
    """One posting shard of the current version -> (new shard, PostingRows) of the rows of images
    that are carried over, re-split by cell for the new version's shard count. The file is checked
    against its SHA-256 in the manifest; codes, keypoints and scores are copied bit for bit.
    ``params`` are the current version's index parameters (its manifest's)."""

    def __init__(self, job, params: dict):
        self.job, self.params = job, params
        self.kept_ids = None
        self.rows = Metrics.counter("delf", "descriptors_carried")

    def setup(self):
        self.kept_ids = np.sort(np.asarray(
            [inputs.image_id(r["uri"]) for r in planning.read_plan(self.job.plan_path, (planning.KEEP,))], np.int64))

    def process(self, record, same_uris):
        try:
            yield from self._carry(record, same_uris)
        except Exception as e:  # noqa: BLE001 - the shard's failure is recorded; publishing then refuses
            yield internal_error(record["path"], "carry", e)

    def _carry(self, record, same_uris):
        data = layout.checked_read(self.job.root, record)
        table = pq.read_table(io.BytesIO(data))
        carried = np.union1d(self.kept_ids, np.asarray([inputs.image_id(u) for u in same_uris], np.int64))
        rows = np.flatnonzero(np.isin(table.column("image_id").to_numpy(), carried))
        if len(rows) == 0:
            return
        posting_rows = shards.posting_rows(table.take(rows), self.params["pq_m"], self.params["pq_bits"])
        self.rows.inc(len(rows))
        yield from encode.split_by_shard(posting_rows, self.params["n_cells"], self.job.num_shards)


def read_model(root: str, current: dict):
    """The current version's ``TrainedModel``: its PCA + quantizer files (``current["codebooks"]``,
    ``segments.codebook_records`` of its pointer), checked, and its training record."""

    files = {name: layout.checked_read(root, current["codebooks"][name]) for name in ("pca", "quantizer")}
    return encode.TrainedModel.from_record(files["pca"], files["quantizer"], current.get("training"))


def read_current_model(_, root: str, current: dict):
    """``read_model`` as a step over one dummy element."""
    return read_model(root, current)


def drift_error(sample, model):
    """Quantization error of the new images' descriptors under the current codebooks (None if none)."""

    if sample is None:
        return None
    projection, quantizer = model.load()
    return encode.quantization_error(projection, quantizer, sample)
