"""The index-time neighbour stage of the build: each image encoded by the run searches the written
(not yet published) version with its own stored rows, and the verified pairs it finds update the
version's neighbour table (``delf_retrieval.expansion``), which queries use for expansion."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from delf_retrieval import storage
from delf_retrieval.index import layout, neighbour_table, segment_reader
from delf_retrieval.query import expansion
from delf_retrieval.query.retrieval import RetrievalConfig, Retriever
from transforms.extract import StageTimer


class FindNeighbours(beam.DoFn):
    """(image id, PostingRows) -> (image id, neighbour id, inliers) of each verified neighbour,
    searched in the version the ``version`` side input describes (``WriteVersion``'s output),
    opened once per worker. A search that fails loses that image's edges only (counted)."""

    def __init__(self, job):
        self.job = job
        self._index_id = None
        self.failed = Metrics.counter("delf", "neighbour_searches_failed")
        self.timing = StageTimer("neighbours")

    def process(self, element, version):
        image_id, rows = element
        try:
            with self.timing:
                manifest = version["manifest"]
                if self._index_id != manifest["index_id"]:
                    reader = segment_reader.open_reader(storage.join(self.job.root, self.job.build), manifest=manifest)
                    self.retriever = Retriever(reader, RetrievalConfig())
                    self._index_id = manifest["index_id"]
                quantizer = self.retriever.reader.quantizer
                projected = quantizer.decode(rows.encoded.regions, rows.encoded.codes)
                neighbours, inliers = expansion.search_neighbours(self.retriever, image_id, projected,
                                                                  rows.locations, self.job.neighbours)
        except Exception:  # noqa: BLE001 - the image stays indexed; only its edges are missing
            self.failed.inc()
            return
        for n, c in zip(neighbours.tolist(), inliers.tolist()):
            yield image_id, n, c


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
