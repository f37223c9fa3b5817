"""Finding bit rot in a version's segments before it becomes an outage: a budgeted, round-robin
scrub of their files by SHA-256, notes of damage that readers left, and the version a repair
starts from (the damaged segments left out, their images to be extracted again)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field

from delf_retrieval import storage
from delf_retrieval.index import layout
from delf_retrieval.index.segments import DamagedSegment, in_segment, read_segment, segment_refs

DAMAGE_DIR = "damage"  # ROOT/damage/<segment id>.json: a reader found that segment damaged


@dataclass(frozen=True)
class ScrubReport:
    """What one scrub read and found: the files it checked (``segment/path``), their bytes, the
    damaged segments with the first reason found for each, and where the next scrub starts."""

    checked: tuple = ()
    bytes: int = 0
    damaged: dict = field(default_factory=dict)
    cursor: str | None = None
    total_bytes: int = 0
    suspects: tuple = ()  # the segments verified whole because a reader noted them

    def to_json(self) -> dict:
        return {"checked_files": len(self.checked), "checked_bytes": self.bytes, "total_bytes": self.total_bytes,
                "cursor": self.cursor, "damaged": dict(self.damaged), "suspects": list(self.suspects)}


def segment_files(root: str, manifest: dict) -> tuple[list[tuple[str, str, dict]], dict[str, str]]:
    """([(key, segment id, record from the root)] of every segment file, sorted by key
    ``<segment id>/<path>``; {segment id: reason} of the segments whose own manifest is damaged)."""
    files, damaged = [], {}
    for ref in segment_refs(manifest):
        try:
            segment = read_segment(root, ref)
        except layout.DamagedFile as e:
            damaged[ref.segment_id] = str(e)
            continue
        for record in (segment.images,) + segment.shards:
            files.append((f"{ref.segment_id}/{record['path']}", ref.segment_id, in_segment(ref, record)))
    return sorted(files, key=lambda f: f[0]), damaged


def scrub(root: str, manifest: dict, budget_bytes: int, cursor: str | None = None,
          suspects: set[str] = frozenset()) -> ScrubReport:
    """Verify byte for byte the segment files after ``cursor`` (wrapping around) until
    ``budget_bytes`` are read (at least one file; never a file twice), and every file of the
    ``suspects``. Every segment's own manifest is checked against its SHA-256 as well. A version
    of N bytes is thus read whole within ceil(N / budget) scrubs, whatever it holds."""
    files, damaged = segment_files(root, manifest)
    total = sum(record["bytes"] for _, _, record in files)
    start = next((i for i, (key, _, _) in enumerate(files) if cursor is None or key > cursor), 0)
    order = files[start:] + files[:start]
    chosen, spent = [], 0
    for key, segment_id, record in order:
        if spent >= budget_bytes and chosen:
            break
        chosen.append((key, segment_id, record))
        spent += record["bytes"]
    chosen_keys = {key for key, _, _ in chosen}
    extra = [f for f in files if f[1] in suspects and f[0] not in chosen_keys]
    for key, segment_id, record in chosen + extra:
        if segment_id in damaged:
            continue
        try:
            layout.checked_read(root, record, checksum=True)
        except layout.DamagedFile as e:
            damaged[segment_id] = str(e)
    return ScrubReport(tuple(key for key, _, _ in chosen + extra), sum(r["bytes"] for _, _, r in chosen + extra),
                       damaged, chosen[-1][0] if chosen else cursor, total, tuple(sorted(suspects)))


def note_damage(root: str, segment_id: str, reason: str) -> bool:
    """Leave a note that a reader found ``segment_id`` damaged, for the next run to verify and
    repair; False where the reader may not write there (the note is then only in its log)."""
    try:
        storage.write_bytes(storage.join(root, f"{DAMAGE_DIR}/{segment_id}.json"),
                            json.dumps({"segment": segment_id, "reason": reason}).encode())
        return True
    except Exception:  # noqa: BLE001 - a reader without write access (a read-only bucket): its log has it
        return False


@contextlib.contextmanager
def reading(root: str, segment_id: str):
    """Reading a segment: a file of it that fails its check becomes a ``DamagedSegment`` naming
    it, and a note of the damage is left for the next run to verify and repair."""
    try:
        yield
    except DamagedSegment:
        raise
    except layout.DamagedFile as e:
        note_damage(root, segment_id, str(e))
        raise DamagedSegment(segment_id, str(e)) from e


def noted_damage(root: str) -> set[str]:
    """The segments readers noted as damaged (their notes are claims, verified before acting)."""
    return {path.rsplit("/", 1)[-1].removesuffix(".json") for path in storage.list_files(storage.join(root, DAMAGE_DIR))
            if path.endswith(".json")}


def clear_notes(root: str, version: dict, scrubbed: dict | None) -> None:
    """After ``version`` is published: remove the notes of segments it no longer lists (repaired
    or merged away) and of those its run verified whole (``scrubbed``: its scrub report's JSON)."""
    listed = {r["segment_id"] for r in version.get("segments", [])}
    verified = set((scrubbed or {}).get("suspects", ())) - set((scrubbed or {}).get("damaged", {}))
    segment_ids = {s for s in noted_damage(root) if s not in listed or s in verified}
    for segment_id in segment_ids:
        path = storage.join(root, f"{DAMAGE_DIR}/{segment_id}.json")
        if storage.exists(path):
            storage.delete(path)


def without_segments(pointer: dict, damaged: set[str]) -> dict:
    """The version a repair starts from: ``pointer`` without the ``damaged`` segments, so their
    images are not indexed any more (a build extracts them again from the corpus) and no merge
    reads them. Its counts are left to the caller, which recounts the live images."""
    kept = [r for r in pointer["segments"] if r["segment_id"] not in damaged]
    return {**pointer, "segments": kept}
