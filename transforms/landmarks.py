"""The landmarks job as Beam steps: the version's verified-neighbour edges (its table, or searched
afresh with each image's stored rows as a re-index does), the clustering, one contact sheet per
landmark, and the files written beside the index (``delf_retrieval.landmarks``)."""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from delf_retrieval import storage
from delf_retrieval.first_stage import search as first_stage
from delf_retrieval.index import layout, neighbour_table, segment_reader
from delf_retrieval.index.neighbour_table import NeighbourConfig, NeighbourTable
from delf_retrieval.landmarks import graph, sheets, table
from delf_retrieval.landmarks.clustering import ClusterConfig
from transforms.neighbours import FindNeighbours, StoredImageRows, image_rows, stored_shards


@dataclass(frozen=True)
class LandmarksJob:
    """What the steps need: the index ``root``, the version (``build``: builds/<id>, its ``manifest``),
    the clustering settings, how many contact sheets (the largest landmarks), and the neighbour
    search's cut when the version has no table (``neighbours``, also read by the re-used steps)."""

    root: str
    build: str
    manifest: dict
    config: ClusterConfig
    sheets: int
    neighbours: NeighbourConfig = NeighbourConfig()

    @property
    def index_id(self) -> str:
        return self.manifest["index_id"]

    def has_table(self) -> bool:
        return self.manifest["files"].get("neighbours") is not None

    def is_segmented(self) -> bool:
        return "segments" in self.manifest

    @property
    def previous_first_stage(self) -> dict:
        """The version's first-stage parts by segment (what ``FindNeighbours`` searches through)."""
        return (first_stage.records_of(self.manifest) or {}).get("segments", {})


def stored_edges(_, job: LandmarksJob):
    """The version's neighbour table as one (n, 3) array of (image id, neighbour, inliers)."""
    reader = segment_reader.open_reader(storage.join(job.root, job.build), manifest=job.manifest)
    found = reader.neighbours() or NeighbourTable.empty()
    yield np.stack([found.image_ids, found.neighbours, found.inliers], axis=1)


def searched_edges(_, job: LandmarksJob):
    """A version of format 1 without a table: every image searched in this one step (in memory)."""
    reader = segment_reader.open_reader(storage.join(job.root, job.build), manifest=job.manifest)
    found = graph.search_all(reader, job.neighbours)
    yield np.stack([found.image_ids, found.neighbours, found.inliers], axis=1)


def as_array(edge: tuple) -> np.ndarray:
    """One (image id, neighbour, inliers) edge as a (1, 3) array, as the other sources give them."""
    return np.asarray([edge], np.int64)


def find_landmarks(_, job: LandmarksJob, edges: list):
    """The clustering, in one step: linear in the edges, which it holds in memory (~24 bytes each)."""
    reader = segment_reader.open_reader(storage.join(job.root, job.build), manifest=job.manifest)
    parts = [np.asarray(e, np.int64).reshape(-1, 3) for e in edges]
    found = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
    # each verified pair once per direction (a pair found from both sides keeps its larger count)
    edges_table = neighbour_table.symmetric(found[:, 0], found[:, 1], found[:, 2])
    previous = None
    try:
        previous = table.load(job.root)  # the last run's, of whichever version: ids carry over
    except layout.IndexStorageError:
        previous = None  # a damaged previous table only costs the ids' stability
    yield table.find(reader.images, edges_table, job.config, previous)


def sheet_of(summary: dict, job: LandmarksJob):
    """(file name, record) of one landmark's contact sheet, written under landmarks/<index id>/."""
    name = sheets.sheet_name(summary["landmark"])
    yield name, table.write_file(job.root, job.index_id, name, sheets.landmark_sheet(summary))


def largest(found, count: int) -> list[dict]:
    return sorted(found.summary, key=lambda s: (-s["size"], s["landmark"]))[:count]


def publish(found, job: LandmarksJob, written: list):
    yield table.save(job.root, job.index_id, found, dict(written))


class FindLandmarks(beam.PTransform):
    """Nothing -> the record of the published landmarks (landmarks.json's content)."""

    def __init__(self, job: LandmarksJob):
        super().__init__()
        self.job = job

    def expand(self, pbegin):
        job = self.job
        once = pbegin | "Once" >> beam.Create([None])
        if job.has_table():
            edges = once | "ReadNeighbours" >> beam.FlatMap(stored_edges, job)
        elif job.is_segmented():  # each image searches the version with its stored rows, in parallel
            version = {"manifest": job.manifest, "searched": [], "removed": []}
            pq_m, pq_bits = job.manifest["params"]["pq_m"], job.manifest["params"]["pq_bits"]
            edges = (once
                     | "StoredShards" >> beam.FlatMap(stored_shards, job, version=version)
                     | "SpreadStoredShards" >> beam.Reshuffle()
                     | "StoredImageRows" >> beam.ParDo(StoredImageRows(job, pq_m, pq_bits), version=version)
                     | "GroupImageRows" >> beam.GroupByKey()
                     | "ImageRows" >> beam.Map(image_rows, pq_m)
                     | "SpreadImageRows" >> beam.Reshuffle()
                     | "BatchImageRows" >> beam.BatchElements(min_batch_size=1, max_batch_size=32)
                     | "FindNeighbours" >> beam.ParDo(FindNeighbours(job), version=version, first_stage=[])
                     | "AsArrays" >> beam.Map(as_array))
        else:
            edges = once | "SearchNeighbours" >> beam.FlatMap(searched_edges, job)
        found = once | "Cluster" >> beam.FlatMap(find_landmarks, job, edges=beam.pvalue.AsList(edges))
        written = (found
                   | "LargestLandmarks" >> beam.FlatMap(largest, job.sheets)
                   | "SpreadSheets" >> beam.Reshuffle()
                   | "ContactSheets" >> beam.FlatMap(sheet_of, job))
        return found | "Publish" >> beam.FlatMap(publish, job, written=beam.pvalue.AsList(written))
