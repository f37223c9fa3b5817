"""Which segments to merge: tiered merging, as Lucene's TieredMergePolicy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SegmentStats:
    """What the merge policy weighs of a segment: its bytes, its images and how many are tombstoned."""

    segment_id: str
    size_bytes: int
    images: int
    deleted: int = 0

    @property
    def deleted_fraction(self) -> float:
        return self.deleted / self.images if self.images else 0.0

    @property
    def live_bytes(self) -> float:
        return self.size_bytes * (1.0 - self.deleted_fraction)


@dataclass(frozen=True)
class MergePolicy:
    """Tiered merging, as Lucene's TieredMergePolicy: segments of about the same size form a tier of
    at most ``segments_per_tier``; each tier is ``max_merge_at_once`` times the size of the one below,
    from ``floor_segment_bytes`` (smaller segments count as that big). When a version has more
    segments than its tiers allow, the policy merges up to ``max_merge_at_once`` of similar size (the
    least skewed, smallest, most-deleted first), never into more than ``max_merged_segment_bytes``.
    A segment too big to merge is rewritten alone once over ``max_deleted_fraction`` of it is
    tombstoned."""

    segments_per_tier: int = 10
    max_merge_at_once: int = 10
    floor_segment_bytes: int = 2 << 20
    max_merged_segment_bytes: int = 5 << 30
    max_deleted_fraction: float = 0.33

    def allowed_segments(self, live_bytes: list[float]) -> int:
        """How many segments the tiers allow for segments of these (live) sizes."""
        if not live_bytes:
            return 0
        level = max(min(live_bytes), self.floor_segment_bytes)
        left, allowed = float(sum(live_bytes)), 0
        while True:
            at_level = left / level
            if at_level < self.segments_per_tier:
                return allowed + int(np.ceil(at_level))
            allowed += self.segments_per_tier
            left -= self.segments_per_tier * level
            level *= self.max_merge_at_once

    def score(self, candidate: list[SegmentStats], hit_too_large: bool) -> float:
        """Lower is better: skew (the largest segment's share, sizes floored), a mild preference for
        small merges, and a strong one for merges that drop many tombstoned rows."""
        after = sum(c.live_bytes for c in candidate)
        before = sum(c.size_bytes for c in candidate)
        floored = lambda b: max(b, self.floor_segment_bytes)  # noqa: E731
        skew = (1.0 / self.max_merge_at_once if hit_too_large
                else floored(max(c.live_bytes for c in candidate)) / sum(floored(c.live_bytes) for c in candidate))
        return skew * max(after, 1.0) ** 0.05 * (after / before if before else 1.0) ** 2

    def find_merges(self, segments: list[SegmentStats]) -> list[tuple[str, ...]]:
        """The merges to run now, each a tuple of segment ids (one id: rewrite it without its
        tombstoned rows); an empty list when the version's segments fit their tiers."""
        too_large = [s for s in segments if s.live_bytes > self.max_merged_segment_bytes / 2]
        merges = [(s.segment_id,) for s in too_large if s.deleted_fraction > self.max_deleted_fraction]
        eligible = sorted((s for s in segments if s not in too_large), key=lambda s: (-s.live_bytes, s.segment_id))
        while len(eligible) > self.allowed_segments([s.live_bytes for s in eligible]):
            best, best_score = None, None
            for start in range(len(eligible)):
                candidate, total, hit_too_large = [], 0.0, False
                for s in eligible[start:]:
                    if len(candidate) == self.max_merge_at_once:
                        break
                    if total + s.live_bytes > self.max_merged_segment_bytes:
                        hit_too_large = True
                        continue  # a smaller one further on may still fit
                    candidate.append(s)
                    total += s.live_bytes
                if len(candidate) < 2:
                    continue
                score = self.score(candidate, hit_too_large)
                if best_score is None or score < best_score:
                    best, best_score = candidate, score
            if best is None:
                break
            merges.append(tuple(s.segment_id for s in best))
            eligible = [s for s in eligible if s not in best]
        return merges

    def forced_merges(self, segments: list[SegmentStats], max_segments: int = 1) -> list[tuple[str, ...]]:
        """Merges on demand (Lucene's forceMerge): the smallest segments into one until at most
        ``max_segments`` remain; a version already that small has each segment with tombstoned
        rows rewritten without them."""
        if max_segments < 1:
            raise ValueError("max_segments must be at least 1")
        if len(segments) > max_segments:
            smallest = sorted(segments, key=lambda s: (s.live_bytes, s.segment_id))[:len(segments) - max_segments + 1]
            return [tuple(s.segment_id for s in smallest)]
        return [(s.segment_id,) for s in segments if s.deleted]
