"""The index-time neighbour stage of the build: each image encoded by the run searches the written
(not yet published) version with its own stored rows, and the verified pairs it finds update the
version's neighbour table (``delf_retrieval.index.neighbour_table``), which queries use for expansion."""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from delf_retrieval import storage
from delf_retrieval.index import layout, neighbour_table, scrub, segment_reader, segments, shards
from delf_retrieval.query import expansion
from delf_retrieval.first_stage.search import DEFAULT_MIN_IMAGES, FirstStage
from delf_retrieval.query.retrieval import RetrievalConfig, Retriever
from transforms.extract import StageTimer
from transforms.first_stage import first_stage_entry


class FindNeighbours(beam.DoFn):
    """[(image id, PostingRows)] (a batch) -> (image id, neighbour id, inliers) of each verified
    neighbour, searched in the version the ``version`` side input describes (``WriteVersion``'s
    output, with the ``first_stage`` parts written for it), opened once per worker; through the
    first stage when the version is large enough for queries to use it, so that each image
    searches its candidates, not the whole index. A search that fails loses that image's edges
    only (counted)."""

    def __init__(self, job):
        self.job = job
        self._index_id = None
        self.failed = Metrics.counter("delf", "neighbour_searches_failed")
        self.timing = StageTimer("neighbours")

    def process(self, batch, version, first_stage):
        with self.timing:
            manifest = version["manifest"]
            if self._index_id != manifest["index_id"]:
                manifest = {**manifest, "first_stage": first_stage_entry(self.job, manifest, first_stage)}
                reader = segment_reader.open_reader(storage.join(self.job.root, self.job.build), manifest=manifest)
                stage = FirstStage.open(reader) if manifest["counts"]["images"] >= DEFAULT_MIN_IMAGES else None
                self.retriever = Retriever(reader, RetrievalConfig(), stage)
                self._index_id = manifest["index_id"]
            quantizer = self.retriever.reader.quantizer
            images = [(image_id, quantizer.decode(rows.encoded.regions, rows.encoded.codes), rows.locations)
                      for image_id, rows in batch]
            found = expansion.search_neighbours_batch(self.retriever, images, self.job.neighbours)
        for (image_id, _, _), result in zip(images, found):
            if isinstance(result, Exception):  # the image stays indexed; only its edges are missing
                self.failed.inc()
                continue
            for n, c in zip(result[0].tolist(), result[1].tolist()):
                yield image_id, n, c


def stored_shards(_, job, version: dict) -> list[tuple[dict, dict]]:
    """(segment ref, shard record) of every posting shard the written version lists."""
    return [(ref.to_json(), record) for ref in segments.segment_refs(version["manifest"])
            for record in segments.read_segment(job.root, ref).shards]


class StoredImageRows(beam.DoFn):
    """(segment ref, shard record) of the written version -> (image id, (row position, PostingRows))
    of each live image that did not search with its encoded rows in this run: so a version that
    gains its neighbour table has every image search, the kept ones with their stored rows."""

    def __init__(self, job, pq_m: int, pq_bits: int):
        self.job, self.pq_m, self.pq_bits = job, pq_m, pq_bits
        self._index_id, self._tombstones, self._searched = None, None, None

    def process(self, element, version):
        ref, record = segments.SegmentRef.from_json(element[0]), element[1]
        manifest = version["manifest"]
        if self._index_id != manifest["index_id"]:  # the version's tombstones, read once per worker
            self._tombstones = segments.read_tombstones(storage.join(self.job.root, self.job.build), manifest)
            self._searched = np.asarray(version["searched"], np.int64)
            self._index_id = manifest["index_id"]
        skip = np.union1d(self._tombstones.of(ref.segment_id), self._searched)
        with scrub.reading(self.job.root, ref.segment_id):
            data = layout.checked_read(self.job.root, segments.in_segment(ref, record))
        rows = shards.posting_rows(pq.read_table(io.BytesIO(data)), self.pq_m, self.pq_bits)
        keep = np.flatnonzero(~np.isin(rows.image_ids, skip))
        order = keep[np.argsort(rows.image_ids[keep], kind="stable")]
        ids = rows.image_ids[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
        for a, b in zip(starts, np.r_[starts[1:], len(ids)]):
            yield int(ids[a]), ((ref.segment_id, record["path"], int(order[a])), rows.take(order[a:b]))


def image_rows(element, pq_m: int):
    """(image id, [(row position, PostingRows)]) -> (image id, PostingRows) in stored order."""
    image_id, parts = element
    return image_id, shards.PostingRows.concatenate([rows for _, rows in sorted(parts, key=lambda p: p[0])], pq_m)


def next_neighbour_table(job, version: dict, edges: list[tuple]):
    """The new version's table: the current version's (in an incremental build) without the edges
    of images searched again (``version["searched"]``) or no longer indexed (``version["removed"]``:
    deleted, or now rejected), plus this run's edges both ways, cut to ``k`` per image."""

    previous = neighbour_table.NeighbourTable.empty()
    if job.previous_neighbours is not None:
        previous = neighbour_table.NeighbourTable.from_bytes(layout.checked_read(job.root, job.previous_neighbours),
                                                             job.previous_neighbours["path"])
    found = np.asarray(edges, np.int64).reshape(-1, 3)
    gone = np.asarray(version["removed"], np.int64)
    return neighbour_table.update(previous, neighbour_table.NeighbourTable(found[:, 0], found[:, 1], found[:, 2]),
                            np.asarray(version["searched"], np.int64), gone, job.neighbours.k)
