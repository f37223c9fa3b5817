"""The build's first-stage step: each segment of the written version without first-stage files
(the run's own, merged ones, or every one when the version gains a first stage) gets them: its
shards' rows regrouped by part (a bucket of its images), each part's image vectors and its rows
stored image-major (``delf_retrieval.first_stage.parts``)."""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq

from delf_retrieval.first_stage import parts, search, vlad
from delf_retrieval.index import layout, scrub, segments, shards
from delf_retrieval.quantize import Quantizer
from transforms.extract import StageTimer


def shards_to_stage(_, job, version: dict) -> list[tuple[dict, dict, int]]:
    """(segment ref, shard record, part count) of every posting shard of the written version's
    segments that the current version's first stage does not cover."""
    have = job.previous_first_stage
    return [(ref.to_json(), record, parts.part_count(ref.images))
            for ref in segments.segment_refs(version["manifest"]) if ref.segment_id not in have
            for record in segments.read_segment(job.root, ref).shards]


class PartRows(beam.DoFn):
    """(segment ref, shard record, part count) -> ((segment id, part), (shard path, PostingRows of
    that part's images in the shard))."""

    def __init__(self, job, pq_m: int, pq_bits: int):
        self.job, self.pq_m, self.pq_bits = job, pq_m, pq_bits

    def process(self, element):
        ref, record, count = segments.SegmentRef.from_json(element[0]), element[1], element[2]
        with scrub.reading(self.job.root, ref.segment_id):
            data = layout.checked_read(self.job.root, segments.in_segment(ref, record))
        rows = shards.posting_rows(pq.read_table(io.BytesIO(data)), self.pq_m, self.pq_bits)
        which = parts.part_of(rows.image_ids, count)
        for part in np.unique(which).tolist():
            yield (ref.segment_id, part), (record["path"], rows.take(np.flatnonzero(which == part)))


class WritePart(beam.DoFn):
    """((segment id, part), [(shard path, rows)]) -> (segment id, the part's record): its files
    written, vectors from the rows decoded by the version's quantizer (read once per worker)."""

    def __init__(self, job, pq_m: int):
        self.job, self.pq_m = job, pq_m
        self._codebooks, self.timing = None, StageTimer("first_stage")

    def process(self, element, version):
        (segment_id, part), pieces = element
        with self.timing:
            record = version["manifest"]["codebooks"]["quantizer"]
            if self._codebooks != record["sha256"]:
                self.quantizer = Quantizer.load(io.BytesIO(layout.checked_read(self.job.root, record)))
                self.words = vlad.words_of(self.quantizer.coarse.centroids, vlad.DEFAULT_WORDS)
                self._codebooks = record["sha256"]
            pieces = sorted(pieces, key=lambda piece: piece[0])  # shard order: the same files on every run
            rows = shards.PostingRows.concatenate([r for _, r in pieces], self.pq_m)
            record = parts.write_part(self.job.root, segment_id, part, rows, self.quantizer, self.words)
        yield segment_id, record


def first_stage_files(pbegin, job, version, pq_m: int, pq_bits: int):
    """The step in the build's graph: (segment id, part record) of each part written."""
    return (pbegin | "FirstStageOnce" >> beam.Create([None])
            | "FirstStageShards" >> beam.FlatMap(shards_to_stage, job, version=beam.pvalue.AsSingleton(version))
            | "SpreadFirstStageShards" >> beam.Reshuffle()
            | "FirstStagePartRows" >> beam.ParDo(PartRows(job, pq_m, pq_bits))
            | "GroupFirstStageParts" >> beam.GroupByKey()
            | "WriteFirstStageParts" >> beam.ParDo(WritePart(job, pq_m), version=beam.pvalue.AsSingleton(version)))


def first_stage_entry(job, manifest: dict, written: list[tuple[str, dict]]) -> dict:
    """The new version's first-stage entry: the current version's parts of the segments it keeps,
    and this run's of the others (a segment without rows has none)."""
    by_segment = {ref.segment_id: list(job.previous_first_stage.get(ref.segment_id, ()))
                  for ref in segments.segment_refs(manifest)}
    for segment_id, record in written:
        by_segment[segment_id].append(record)
    return search.entry(vlad.DEFAULT_WORDS, by_segment)
