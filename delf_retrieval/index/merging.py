"""Merging segments: the merges a run makes, each merged shard rebuilt from the live rows of its
sources, and the tombstones and restamps a run's new version carries."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_retrieval.index import layout, scrub, shards
from delf_retrieval.index.merge_policy import MergePolicy, SegmentStats
from delf_retrieval.index.segments import (Restamps, SegmentRef, Tombstones, in_segment, read_segment, segment_images,
                                           segment_refs)
from delf_retrieval.index.shards import shard_count


def segment_stats(manifest: dict, tombstones: Tombstones) -> list[SegmentStats]:
    """The stats of a format-2 version's segments, in its order."""
    return [SegmentStats(r.segment_id, r.size_bytes, r.images, len(tombstones.of(r.segment_id)))
            for r in segment_refs(manifest)]


@dataclass(frozen=True)
class Merge:
    """One merge of a run: the ``sources`` segments (their records) compacted into the new segment
    ``segment_id``, without their tombstoned rows, its rows cut by cell range into ``num_shards``
    shards that carry ``index_id``."""

    segment_id: str
    sources: tuple  # SegmentRef
    num_shards: int
    index_id: str

    @property
    def source_ids(self) -> tuple:
        return tuple(r.segment_id for r in self.sources)


def plan_merges(manifest: dict, tombstones: Tombstones, merge_id: str, rows_per_shard: int,
                policy: MergePolicy = MergePolicy(), max_segments: int | None = None) -> list[Merge]:
    """The merges a run makes of a format-2 version whose tombstones (the run's deletions
    included) are ``tombstones``: those ``policy`` finds, or with ``max_segments`` those a merge on
    demand makes. Merged segments are named ``<merge_id>-m<i>``."""

    stats = segment_stats(manifest, tombstones)
    chosen = policy.find_merges(stats) if max_segments is None else policy.forced_merges(stats, max_segments)
    refs = {r.segment_id: r for r in segment_refs(manifest)}
    n_cells = int(manifest["params"]["n_cells"])
    merges = []
    for i, ids in enumerate(chosen):
        sources = tuple(refs[s] for s in ids)
        live = sum(r.descriptors * (1 - len(tombstones.of(r.segment_id)) / max(r.images, 1)) for r in sources)
        merges.append(Merge(f"{merge_id}-m{i}", sources, shard_count(int(live), n_cells, rows_per_shard),
                            layout.new_index_id()))
    return merges


def cell_range(shard: int, n_cells: int, n_shards: int) -> tuple[int, int]:
    """[first, end) cells of ``shard`` when cells are cut into ``n_shards`` as ``index.shard_of_cells`` does."""
    return -(-shard * n_cells // n_shards), -(-(shard + 1) * n_cells // n_shards)


def merged_shard(root: str, merge: Merge, shard: int, dropped: Tombstones, n_cells: int, pq_m: int,
                 pq_bits: int) -> pa.Table:
    """The posting table of one shard of ``merge``: the rows of its sources in the shard's cell
    range, without images ``dropped`` names for their segment, in the order one segment stores
    (an image's rows keep theirs). Each source shard read is checked against its SHA-256 (a damaged one is
    named and noted: ``scrub.reading``)."""
    first, end = cell_range(shard, n_cells, merge.num_shards)
    parts = []
    for ref in merge.sources:
        gone = dropped.of(ref.segment_id)
        with scrub.reading(root, ref.segment_id):
            records = read_segment(root, ref).shards
        for record in records:
            if record["last_cell"] < first or record["first_cell"] >= end:
                continue
            with scrub.reading(root, ref.segment_id):
                data = layout.checked_read(root, in_segment(ref, record), checksum=True)
            table = pq.read_table(io.BytesIO(data))
            cells = table.column("cell").to_numpy()
            keep = (cells >= first) & (cells < end) & ~np.isin(table.column("image_id").to_numpy(), gone)
            if keep.any():
                parts.append(shards.posting_rows(table.filter(pa.array(keep)), pq_m, pq_bits))
    return shards.postings_table(shards.PostingRows.concatenate(parts, pq_m), pq_bits)


def merged_images(root: str, merge: Merge, dropped: Tombstones, restamps: Restamps) -> pa.Table:
    """The image table of ``merge``'s segment: its sources' images but the dropped, restamped."""
    return pa.concat_tables([segment_images(root, r, dropped.of(r.segment_id), restamps.stamps.get(r.segment_id))
                             for r in merge.sources])


def successor(kept: list[SegmentRef], tombstones: Tombstones, restamps: Restamps, merges: list[Merge],
              removed: list[tuple[str, int]], restamped: list[tuple[str, int, str]]) -> tuple[Tombstones, Restamps]:
    """The tombstones and restamps of a run's new version. ``kept``: the current version's segments
    it still lists (not merged away); ``tombstones``/``restamps``: the current version's;
    ``removed``: (segment, image id) of indexed images whose rows must no longer be found (deleted,
    changed or now rejected) and were not already dropped by a merge; ``restamped``: (segment,
    image id, stamp) of images touched but unchanged. A removed or restamped image of a merged
    segment is recorded against the merged one (its rows and image record are there)."""
    into = {source: m.segment_id for m in merges for source in m.source_ids}
    out_tombstones = tombstones.only(r.segment_id for r in kept)
    by_segment: dict = {}
    for segment, image_id in removed:
        by_segment.setdefault(into.get(segment, segment), []).append(image_id)
    for segment, ids in by_segment.items():
        out_tombstones = out_tombstones.adding(segment, ids)
    out_restamps = restamps.only([r.segment_id for r in kept], dropping=out_tombstones)
    gone = {(s, int(i)) for s, ids in out_tombstones.deleted.items() for i in ids}
    updates: dict = {}
    for segment, image_id, stamp in restamped:
        if segment not in into and (segment, image_id) not in gone:
            updates.setdefault(segment, {})[image_id] = stamp
    for segment, stamps in updates.items():
        out_restamps = out_restamps.adding(segment, stamps)
    return out_tombstones, out_restamps
