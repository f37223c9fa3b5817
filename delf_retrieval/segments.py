"""An index version as a list of immutable segments plus tombstones: the segment files and their
manifests, the shared codebooks, the version manifest (format version 2) that lists them, the
reader that searches them all as one index, and merging (the policy and the merged shards).

Layout (``ROOT`` is an index directory, or the root of a versioned index)::

    ROOT/segments/<segment id>/segment.json          the segment's own manifest: its image table and
                                                     posting shards, each with size and SHA-256
    ROOT/segments/<segment id>/images.parquet
    ROOT/segments/<segment id>/postings/part-*.parquet   sorted by (cell, region, image id), as today
    VERSION/manifest.json      format_version 2: ``codebooks`` (the PCA + quantizer files under
                               ROOT/codebooks/<id>/, shared), ``segments`` (each segment.json by
                               path from ROOT, bytes and SHA-256), ``files.tombstones``, ``files.restamps``
    VERSION/tombstones.parquet (segment, image id): rows of that image dropped from that segment
    VERSION/restamps.parquet   (segment, image id, stamp): a touched but unchanged image's new stamp

``VERSION`` is ROOT itself, or ``ROOT/builds/<id>`` (its manifest then names that folder as
``version_folder``). Segments are written once and never modified; a version references them, so
a later version shares them without copying. A manifest of format version 1 (one set of shards) is
read as it always was, by :class:`~delf_retrieval.shards.IndexReader`.
"""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_retrieval import pca as pca_lib
from delf_retrieval import shards, storage
from delf_retrieval.quantize import Quantizer
from delf_retrieval.search import InvertedLists, Searcher

SEGMENTS_FORMAT_VERSION = 2
SEGMENT_FORMAT = "delf-retrieval-segment"
SEGMENTS_DIR = "segments"
CODEBOOKS_DIR = "codebooks"  # the PCA + quantizer of a training build, shared by the versions encoding with them
SEGMENT_MANIFEST = "segment.json"
TOMBSTONES_FILE = "tombstones.parquet"
TOMBSTONE_SCHEMA = pa.schema([("segment", pa.string()), ("image_id", pa.int64())])
RESTAMPS_FILE = "restamps.parquet"
RESTAMP_SCHEMA = pa.schema([("segment", pa.string()), ("image_id", pa.int64()), ("stamp", pa.string())])


@dataclass(frozen=True)
class SegmentRef:
    """A segment as a version manifest lists it: its manifest's path (from the index root), size and
    SHA-256, and its counts (so policies need not open it)."""

    segment_id: str
    path: str
    bytes: int
    sha256: str
    images: int
    descriptors: int
    size_bytes: int  # its image table and posting shards together, for the merge policy

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @staticmethod
    def from_json(record: dict) -> "SegmentRef":
        try:
            return SegmentRef(str(record["segment_id"]), shards.check_relative(record["path"], "segments[].path"),
                              int(record["bytes"]), str(record["sha256"]), int(record["images"]),
                              int(record["descriptors"]), int(record["size_bytes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise shards.ManifestError(f"a segment record is malformed ({e!r}): {record!r}") from None

    @property
    def folder(self) -> str:
        return self.path.rsplit("/", 1)[0]


@dataclass(frozen=True)
class Segment:
    """A segment's own manifest (``segment.json``): the id its shards carry, its image table and
    posting shards as file records, paths relative to the segment's folder."""

    segment_id: str
    index_id: str
    images: dict  # file record of images.parquet (path, bytes, sha256, rows)
    shards: tuple  # shard records as shards.write_shard returns them

    @property
    def descriptors(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def to_json(self) -> dict:
        return {"format": SEGMENT_FORMAT, "segment_id": self.segment_id, "index_id": self.index_id,
                "images": self.images, "shards": list(self.shards)}

    @staticmethod
    def from_bytes(data: bytes, where: str) -> "Segment":
        try:
            record = json.loads(data)
            if record.get("format") != SEGMENT_FORMAT:
                raise ValueError(f"not a {SEGMENT_FORMAT} manifest")
            segment = Segment(str(record["segment_id"]), str(record["index_id"]), dict(record["images"]),
                              tuple(dict(s) for s in record["shards"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise shards.ManifestError(f"{where}: unreadable segment manifest ({e})") from None
        for name, r in [("images", segment.images)] + [(f"shards[{i}]", s) for i, s in enumerate(segment.shards)]:
            shards.check_relative(r.get("path"), f"{name}.path", where)
        return segment


@dataclass(frozen=True)
class Tombstones:
    """Image ids deleted from each segment (an image replaced by a newer segment is deleted from the
    older one only): segment id -> sorted unique int64 ids."""

    deleted: dict = field(default_factory=dict)

    def of(self, segment_id: str) -> np.ndarray:
        return self.deleted.get(segment_id, np.zeros(0, np.int64))

    def __len__(self) -> int:
        return sum(len(v) for v in self.deleted.values())

    def adding(self, segment_id: str, image_ids) -> "Tombstones":
        """These tombstones plus ``image_ids`` deleted from ``segment_id``."""
        merged = np.union1d(self.of(segment_id), np.asarray(image_ids, np.int64)).astype(np.int64)
        return Tombstones({**self.deleted, segment_id: merged})

    def only(self, segment_ids) -> "Tombstones":
        """Those of the listed segments (a merge drops the rest with the segments they named)."""
        return Tombstones({s: v for s, v in self.deleted.items() if s in set(segment_ids)})

    def to_table(self) -> pa.Table:
        names = sorted(self.deleted)
        return pa.Table.from_arrays(
            [pa.array([s for s in names for _ in range(len(self.deleted[s]))], pa.string()),
             pa.array(np.concatenate([self.deleted[s] for s in names] or [np.zeros(0, np.int64)]), pa.int64())],
            schema=TOMBSTONE_SCHEMA)

    @staticmethod
    def from_table(table: pa.Table) -> "Tombstones":
        segment = np.asarray(table.column("segment").to_pylist(), dtype=object)
        ids = table.column("image_id").to_numpy().astype(np.int64)
        return Tombstones({str(s): np.unique(ids[segment == s]) for s in np.unique(segment)})


@dataclass(frozen=True)
class Restamps:
    """New change markers of images whose source was touched but whose bytes did not change: their
    rows stay in their segment, and the version records the stamp the next run compares with
    (segment id -> {image id: stamp}); a merge writes them into the merged image table."""

    stamps: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(v) for v in self.stamps.values())

    def adding(self, segment_id: str, updates: dict) -> "Restamps":
        return Restamps({**self.stamps, segment_id: {**self.stamps.get(segment_id, {}), **updates}})

    def only(self, segment_ids, dropping: Tombstones = Tombstones()) -> "Restamps":
        """Those of the listed segments, without images ``dropping`` tombstones."""
        keep = set(segment_ids)
        out = {}
        for segment, updates in self.stamps.items():
            if segment in keep:
                gone = set(dropping.of(segment).tolist())
                out[segment] = {i: v for i, v in updates.items() if i not in gone}
        return Restamps({k: v for k, v in out.items() if v})

    def to_table(self) -> pa.Table:
        rows = [(s, i, v) for s in sorted(self.stamps) for i, v in sorted(self.stamps[s].items())]
        return pa.Table.from_arrays([pa.array([r[0] for r in rows], pa.string()),
                                     pa.array([r[1] for r in rows], pa.int64()),
                                     pa.array([r[2] for r in rows], pa.string())], schema=RESTAMP_SCHEMA)

    @staticmethod
    def from_table(table: pa.Table) -> "Restamps":
        out: dict = {}
        for s, i, v in zip(*(table.column(n).to_pylist() for n in ("segment", "image_id", "stamp"))):
            out.setdefault(str(s), {})[int(i)] = v
        return Restamps(out)


def is_segmented(manifest: dict) -> bool:
    return manifest.get("format_version") == SEGMENTS_FORMAT_VERSION


def segment_refs(manifest: dict) -> list[SegmentRef]:
    """The segments a manifest uses; a format-1 manifest uses none (its shards are its own)."""
    return [SegmentRef.from_json(r) for r in manifest.get("segments", [])] if is_segmented(manifest) else []


def index_root(directory: str, manifest: dict) -> str:
    """The folder segment paths are relative to: the version folder itself, or, for a version
    manifest read from ``ROOT/builds/<id>`` (it names that folder as ``version_folder``), ROOT."""
    folder = manifest.get("version_folder")
    if folder is None or manifest.get("build") is not None:  # the root pointer: paths are from ROOT
        return directory
    stripped = directory.rstrip("/")
    if not stripped.replace("\\", "/").endswith("/" + folder):
        raise shards.ManifestError(f"{directory}: the manifest belongs in {folder}, not here")
    return stripped[:-len(folder) - 1] or "/"


def read_segment(root: str, ref: SegmentRef) -> Segment:
    """A segment's manifest, checked against the size and SHA-256 the version recorded for it."""
    data = shards._check_file(root, {"path": ref.path, "bytes": ref.bytes, "sha256": ref.sha256}, checksum=True)
    segment = Segment.from_bytes(data, ref.path)
    if segment.segment_id != ref.segment_id:
        raise shards.ShardError(f"{ref.path} is segment {segment.segment_id}, the manifest says {ref.segment_id}")
    return segment


def _in_segment(ref: SegmentRef, record: dict) -> dict:
    return {**record, "path": f"{ref.folder}/{record['path']}"}


def read_tombstones(directory: str, manifest: dict) -> Tombstones:
    record = manifest["files"].get("tombstones")
    if record is None:
        return Tombstones()
    return Tombstones.from_table(pq.read_table(io.BytesIO(shards._check_file(directory, record, checksum=True))))


def read_restamps(directory: str, manifest: dict) -> Restamps:
    record = manifest["files"].get("restamps")
    if record is None:
        return Restamps()
    return Restamps.from_table(pq.read_table(io.BytesIO(shards._check_file(directory, record, checksum=True))))


def live_images(root: str, manifest: dict) -> pa.Table:
    """The live images of a format-2 version read from ``root`` (the pointer, or a manifest whose
    paths are from ``root``): each segment's image table without its tombstoned images, with the
    version's restamps applied and a ``segment`` column naming where each image's rows are."""
    tombstones, restamps = read_tombstones(root, manifest), read_restamps(root, manifest)
    parts = [pa.Table.from_pylist([], schema=shards.IMAGE_SCHEMA.append(pa.field("segment", pa.string())))]
    for ref in segment_refs(manifest):
        table = segment_images(root, ref, tombstones.of(ref.segment_id), restamps.stamps.get(ref.segment_id, {}))
        parts.append(table.append_column("segment", pa.array(np.full(table.num_rows, ref.segment_id, object),
                                                             pa.string())))
    return pa.concat_tables(parts)


def segment_images(root: str, ref: SegmentRef, dropped: np.ndarray = np.zeros(0, np.int64),
                   restamped: dict | None = None) -> pa.Table:
    """A segment's image table (checked) without the ``dropped`` image ids, ``restamped`` stamps applied."""
    segment = read_segment(root, ref)
    table = pq.read_table(io.BytesIO(shards._check_file(root, _in_segment(ref, segment.images), checksum=True)))
    return _restamped(_without(table, dropped), restamped)


def _without(table: pa.Table, image_ids: np.ndarray) -> pa.Table:
    """An image table without the rows of ``image_ids``."""
    if not len(image_ids):
        return table
    return table.filter(pa.array(~np.isin(table.column("image_id").to_numpy(), image_ids)))


def _restamped(table: pa.Table, restamped: dict | None) -> pa.Table:
    """An image table with the stamps of ``restamped`` (image id -> stamp) replaced."""
    if not restamped:
        return table
    ids = table.column("image_id").to_pylist()
    stamps = [restamped.get(i, old) for i, old in zip(ids, table.column("stamp").to_pylist())]
    return table.set_column(table.schema.get_field_index("stamp"), "stamp", pa.array(stamps, pa.string()))


def verify(directory: str, manifest: dict, deep: set[str] | None = None) -> None:
    """Check a format-2 version: its own files byte for byte, every segment's manifest against its
    recorded SHA-256, and the files of the segments in ``deep`` (None: all) byte for byte; the
    files of the others only by size (a segment is verified once, by the run that wrote it)."""
    for record in manifest["files"].values():
        shards._check_file(directory, record, checksum=True)
    root = index_root(directory, manifest)
    for record in manifest["codebooks"].values():  # small, shared: always read
        shards._check_file(root, record, checksum=True)
    for ref in segment_refs(manifest):
        segment = read_segment(root, ref)
        for record in (segment.images,) + segment.shards:
            shards._check_file(root, _in_segment(ref, record), checksum=deep is None or ref.segment_id in deep)


# ---------------------------------------------------------------------------------------------
# Writing


def segment_folder(root: str, segment_id: str) -> str:
    return storage.join(root, f"{SEGMENTS_DIR}/{segment_id}")


def write_segment(root: str, rows: shards.PostingRows, images: pa.Table, pq_bits: int,
                  segment_id: str | None = None, rows_per_shard: int = 4_000_000,
                  rows_per_group: int = shards.ROWS_PER_GROUP) -> SegmentRef:
    """Write one immutable segment held in memory under ``root/segments/<id>/`` (its manifest
    last; the Beam build writes the same files in parallel) and return the record a version
    lists it by."""
    segment_id = segment_id or shards.new_index_id()
    folder = segment_folder(root, segment_id)
    index_id = shards.new_index_id()
    table = shards.postings_table(rows, pq_bits)
    shard_records = [
        shards.write_shard(folder, f"{shards.POSTINGS_DIR}/part-{i:05d}.parquet", piece, index_id, rows_per_group)
        for i, piece in enumerate(shards.split_by_cells(table, rows_per_shard))]
    return finish_segment(root, segment_id, index_id, images, shard_records)


def finish_segment(root: str, segment_id: str, index_id: str, images: pa.Table, shard_records: list[dict]) -> SegmentRef:
    """Complete a segment whose posting shards (carrying ``index_id``) are written: its image table,
    then its manifest. Returns its record for a version manifest."""
    folder = segment_folder(root, segment_id)
    records = tuple(sorted((r for r in shard_records if r["rows"]), key=lambda r: r["first_cell"]))
    segment = Segment(segment_id, index_id, shards.write_table_file(folder, shards.IMAGES_FILE, images), records)
    payload = json.dumps(segment.to_json(), indent=1, sort_keys=True).encode()
    record = shards.write_array_file(folder, SEGMENT_MANIFEST, payload)
    return SegmentRef(segment_id, f"{SEGMENTS_DIR}/{segment_id}/{SEGMENT_MANIFEST}", record["bytes"],
                      record["sha256"], images.num_rows, segment.descriptors,
                      segment.images["bytes"] + sum(r["bytes"] for r in records))


def write_codebooks(root: str, codebooks_id: str, quantizer_npz: bytes, pca_npz: bytes | None) -> dict:
    """Write a training build's PCA + quantizer once, under ``root/codebooks/<id>/``; returns their
    file records (paths from ``root``), which every version encoding with them lists as ``codebooks``."""
    folder = f"{CODEBOOKS_DIR}/{codebooks_id}"
    records = {"quantizer": shards.write_array_file(root, f"{folder}/{shards.QUANTIZER_FILE}", quantizer_npz)}
    if pca_npz is not None:
        records["pca"] = shards.write_array_file(root, f"{folder}/{shards.PCA_FILE}", pca_npz)
    return records


def codebook_records(manifest: dict) -> dict:
    """The PCA + quantizer file records of a root's pointer, paths from the root: a format-1
    version's own files, or the shared model a format-2 version lists."""
    if is_segmented(manifest):
        return dict(manifest["codebooks"])
    return {k: manifest["files"][k] for k in ("pca", "quantizer") if k in manifest["files"]}


def version_manifest(directory: str, *, quantizer: Quantizer, pca: pca_lib.PCA | None, segments: list[SegmentRef],
                     tombstones: Tombstones = Tombstones(), version_folder: str | None = None,
                     dead_letters: pa.Table | None = None, neighbours=None, model: dict | None = None,
                     codebooks: dict | None = None) -> dict:
    """Write a version's own files into ``directory`` (its tombstones, and the model under
    ``codebooks/`` unless ``codebooks`` names those already written) and return its format-2
    manifest, not yet written: ``shards.write_manifest`` or ``versions.publish`` does that.
    ``version_folder``: ``builds/<id>`` when ``directory`` is that folder of a versioned root;
    ``neighbours``: the version's ``expansion.NeighbourTable`` (readers drop its edges to images
    that are not live)."""
    root = index_root(directory, {"version_folder": version_folder}) if version_folder else directory
    if codebooks is None:
        codebooks = write_codebooks(root, shards.new_index_id(), quantizer.to_npz_bytes(),
                                  None if pca is None else pca.to_npz_bytes())
    files = {}
    if dead_letters is not None:
        files["dead_letters"] = shards.write_table_file(directory, shards.DEAD_LETTERS_FILE, dead_letters)
    if neighbours is not None:
        from delf_retrieval.expansion import NEIGHBOURS_FILE

        files["neighbours"] = shards.write_table_file(directory, NEIGHBOURS_FILE, neighbours.to_table())
    return segmented_manifest(directory, shards.new_index_id(), quantizer, files, segments, tombstones,
                              version_folder=version_folder, model=model, codebooks=codebooks)


def segmented_manifest(directory: str, index_id: str, quantizer: Quantizer, files: dict, segments: list[SegmentRef],
                       tombstones: Tombstones = Tombstones(), restamps: Restamps = Restamps(),
                       version_folder: str | None = None, model: dict | None = None, extra: dict | None = None,
                       live_descriptors: int | None = None, codebooks: dict | None = None) -> dict:
    """A format-2 manifest over the version's own ``files`` (written into ``directory``; its
    tombstones and restamps are written here too), the shared ``codebooks`` (``write_codebooks``'s
    records) and the ``segments`` it lists. ``live_descriptors``: the rows of its live images,
    when the caller knows them (a build does: the previous version's, less those of the images it
    removes, plus those it adds); otherwise they are counted from the segments' image tables."""
    if not codebooks or "quantizer" not in codebooks:
        raise ValueError("a version of segments needs its codebooks (write_codebooks)")
    listed = {ref.segment_id for ref in segments}
    if len(listed) != len(segments):
        raise ValueError("a segment is listed twice")
    for name, named in (("tombstones", tombstones.deleted), ("restamps", restamps.stamps)):
        if set(named) - listed:
            raise ValueError(f"{name} name segments the version does not list: {sorted(set(named) - listed)}")
    files = {**files, "tombstones": shards.write_table_file(directory, TOMBSTONES_FILE, tombstones.to_table())}
    if len(restamps):
        files["restamps"] = shards.write_table_file(directory, RESTAMPS_FILE, restamps.to_table())
    # The format-1 record (spec, parameters, model, counts), then what format 2 lists instead of shards.
    # counts.images and counts.descriptors are the live ones; counts.stored_descriptors also holds
    # the rows of tombstoned images, until a merge drops them.
    stored = sum(r.descriptors for r in segments)
    if live_descriptors is None:
        root = index_root(directory, {"version_folder": version_folder}) if version_folder else directory
        live_descriptors = stored - sum(_rows_of(root, r, tombstones.of(r.segment_id))
                                        for r in segments if len(tombstones.of(r.segment_id)))
    live_images = {"rows": sum(r.images for r in segments) - len(tombstones)}
    manifest = shards.build_manifest(index_id, quantizer, {**files, "images": live_images}, [], model, extra)
    del manifest["shards"], manifest["counts"]["shards"]
    manifest.update({"format_version": SEGMENTS_FORMAT_VERSION, "files": files, "codebooks": dict(codebooks),
                     "segments": [r.to_json() for r in segments]})
    manifest["counts"].update({"descriptors": int(live_descriptors), "stored_descriptors": stored,
                               "segments": len(segments), "tombstones": len(tombstones)})
    if version_folder is not None:
        manifest["version_folder"] = version_folder
    return manifest


def _rows_of(root: str, ref: SegmentRef, image_ids: np.ndarray) -> int:
    """The posting rows of these images of a segment (their ``num_features``)."""
    table = segment_images(root, ref)
    chosen = np.isin(table.column("image_id").to_numpy(), image_ids)
    return int(table.column("num_features").to_numpy()[chosen].sum())


def write_version(directory: str, **kwargs) -> dict:
    """:func:`version_manifest`, then the manifest written (the version published in ``directory``)."""
    manifest = version_manifest(directory, **kwargs)
    shards.write_manifest(directory, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading


LOAD_BATCH_ROWS = 1 << 20  # SegmentedReader.load_all merges the cells of about this many rows at a time


def open_reader(directory: str, cache_bytes: int = 2 << 30, manifest: dict | None = None):
    """A reader for the index at ``directory``: :class:`~delf_retrieval.shards.IndexReader` for a
    format-1 manifest, :class:`SegmentedReader` for a list of segments. Both answer the same calls
    (search, rows, images, stored_rows, postings, neighbours, load_all, resident_bytes)."""
    if manifest is None:
        manifest = shards.read_manifest(directory)
    if is_segmented(manifest):
        return SegmentedReader(directory, cache_bytes, manifest)
    return shards.IndexReader(directory, cache_bytes, manifest)


@dataclass(frozen=True)
class _MergedCell:
    """One coarse cell's live rows of every segment, in the order one segment would store them."""

    counts: np.ndarray  # (regions of the cell,) int64: rows per region, in region order
    codes: np.ndarray  # (n, M) uint8
    ids: np.ndarray  # (n,) int64 global row ids
    ranks: np.ndarray  # (n,) int32: each row's image among the version's live image ids

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + self.codes.nbytes + self.ids.nbytes + self.ranks.nbytes


class SegmentedReader:
    """Searches every segment of a format-2 version as one index, with the calls and meaning of
    :class:`~delf_retrieval.shards.IndexReader`: one IndexReader per segment (its own lazy row
    groups, checked by CRC-32), tombstoned images dropped, and the live rows of all segments merged
    per coarse cell in the order one segment stores them (by region, then image id), so results
    equal those of the same live images written as one segment.

    :meth:`load_all` (resident) merges every cell once into one set of inverted lists; otherwise
    each probed cell is merged when first searched and kept in an LRU cache of merged cells, so a
    search only gathers cached cells. ``cache_bytes`` is shared by the segments' row-group caches
    (in proportion to their rows) and the merged-cell cache. Searches may run in several threads
    at once: both caches are shared under locks.

    Global row ids are the segments' row ids, segment after segment, in the version's order;
    ``num_rows`` is the size of that id space, tombstoned rows included (as the manifest's
    ``counts.stored_descriptors``), until a merge drops them.
    """

    def __init__(self, directory: str, cache_bytes: int = 2 << 30, manifest: dict | None = None):
        """``manifest``: read the version folder ``directory`` (the root, or ``ROOT/builds/<id>``)
        by this manifest rather than its manifest file, as IndexReader does (a build reading its
        own version before publishing it)."""
        self.directory = directory
        if manifest is None:
            manifest = shards.read_manifest(directory)
        else:
            shards.check_manifest_paths(manifest, storage.join(directory, shards.MANIFEST))
        if not is_segmented(manifest):
            raise shards.ManifestError(f"{directory}: not a segmented (format version 2) manifest")
        self.manifest = manifest
        self.cache_bytes = cache_bytes
        self.refs = segment_refs(manifest)
        if not self.refs:
            raise shards.ManifestError(f"{directory}: the version lists no segments")
        self.tombstones = read_tombstones(directory, manifest)
        root = index_root(directory, manifest)
        self.segments: list[shards.IndexReader] = []
        model = None
        for ref in self.refs:
            segment = read_segment(root, ref)
            own = {"index_id": segment.index_id,
                   "files": {**manifest["codebooks"], "images": _in_segment(ref, segment.images)},
                   "shards": [_in_segment(ref, s) for s in segment.shards]}
            reader = shards.IndexReader(root, cache_bytes, manifest=own, model=model)
            model = (reader.quantizer, reader.pca)  # read and checked once, shared by every segment
            self.segments.append(reader)
        self.quantizer, self.pca = model
        self._offsets = np.cumsum([0] + [s.num_rows for s in self.segments]).astype(np.int64)
        self.num_rows = int(self._offsets[-1])
        self._deleted = [self.tombstones.of(ref.segment_id) for ref in self.refs]
        for ref, reader, deleted in zip(self.refs, self.segments, self._deleted):
            if not np.isin(deleted, reader._sorted_image_ids).all():
                raise shards.ManifestError(f"{directory}: tombstones of segment {ref.segment_id} name images it "
                                           "does not hold")
        live = [np.setdiff1d(s._sorted_image_ids, d) for s, d in zip(self.segments, self._deleted)]
        every = np.concatenate(live)
        self._live_ids = np.unique(every)
        if len(self._live_ids) != len(every):
            ids, counts = np.unique(every, return_counts=True)
            raise shards.ManifestError(f"{directory}: image ids live in two segments (not tombstoned in the older "
                                       f"one): {ids[counts > 1][:5].tolist()}")
        # Each segment's image position (in its sorted ids) -> the image's rank among the live ids,
        # -1 when tombstoned: rows merge by the int64 key (region, rank), and image restrictions
        # and tombstones both cost one gather per row.
        self._ranks = [np.where(np.isin(s._sorted_image_ids, d), -1,
                                np.searchsorted(self._live_ids, s._sorted_image_ids)).astype(np.int32)
                       for s, d in zip(self.segments, self._deleted)]
        self._cell_regions = self.quantizer.regions.cell_regions(self.quantizer.coarse.n_cells)
        self._cells: OrderedDict[int, _MergedCell] = OrderedDict()
        self._cell_bytes = 0
        self._cell_lock = threading.Lock()
        self._resident: InvertedLists | None = None
        self._resident_ranks: np.ndarray | None = None
        self._share_cache(resident=False)
        self._images: pa.Table | None = None
        self._neighbours = None

    def _share_cache(self, resident: bool) -> None:
        """Split ``cache_bytes``: the segments' row-group caches in proportion to their rows, and
        (unless resident) the merged-cell cache, so that both can hold the same share of the rows."""
        m = self.quantizer.params.pq_m
        group_row, cell_row = shards.cached_row_bytes(m), 0 if resident else m + 8 + 4
        groups = self.cache_bytes * group_row / (group_row + cell_row)
        for reader in self.segments:
            reader.cache_bytes = max(int(groups * reader.num_rows / max(self.num_rows, 1)), 1)
        self._cell_cache_bytes = max(int(self.cache_bytes - groups), 0)

    @property
    def images(self) -> pa.Table:
        """The live images of every segment (tombstoned rows dropped), segment after segment."""
        if self._images is None:
            parts = []
            restamps = read_restamps(self.directory, self.manifest)
            for ref, reader, deleted in zip(self.refs, self.segments, self._deleted):
                parts.append(_restamped(_without(reader.images, deleted), restamps.stamps.get(ref.segment_id)))
            self._images = pa.concat_tables(parts)
        return self._images

    def neighbours(self):
        """The version's neighbour table without edges from or to an image that is not live."""
        from delf_retrieval.expansion import NeighbourTable

        record = self.manifest["files"].get("neighbours")
        if record is None:
            return None
        if self._neighbours is None:
            table = NeighbourTable.from_bytes(shards._check_file(self.directory, record, checksum=True))
            keep = np.isin(table.image_ids, self._live_ids) & np.isin(table.neighbours, self._live_ids)
            self._neighbours = NeighbourTable(table.image_ids[keep], table.neighbours[keep], table.inliers[keep])
        return self._neighbours

    def resident_bytes(self) -> int:
        """About how much memory :meth:`load_all` takes: the segments' own estimates (cached row
        groups, resident lists and what loading leaves in the allocators), tombstoned rows
        counted too."""
        return sum(reader.resident_bytes() for reader in self.segments)

    def _merged(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The live rows of ``cells`` in every segment, merged: (regions, codes, global row ids,
        image ranks), sorted by (region, image rank), an image's rows in their stored order."""
        parts = []
        for s, reader in enumerate(self.segments):
            regions, codes, rows, index = reader._cell_rows(cells)
            ranks = self._ranks[s][index]
            if len(self._deleted[s]):
                keep = ranks >= 0
                regions, codes, rows, ranks = regions[keep], codes[keep], rows[keep], ranks[keep]
            if len(rows):
                parts.append((regions, codes, rows + self._offsets[s], ranks))
        if not parts:
            return (np.zeros(0, np.int64), np.zeros((0, self.quantizer.params.pq_m), np.uint8), np.zeros(0, np.int64),
                    np.zeros(0, np.int32))
        regions, codes, rows, ranks = (np.concatenate([p[i] for p in parts]) for i in range(4))
        if len(parts) > 1:
            # Each segment's rows are one run sorted by this key: the stable sort merges the runs.
            order = np.argsort(regions * len(self._live_ids) + ranks, kind="stable")
            regions, codes, rows, ranks = regions[order], codes[order], rows[order], ranks[order]
        return regions, codes, rows, ranks

    def _merge_cells(self, cells: np.ndarray) -> dict[int, _MergedCell]:
        regions, codes, rows, ranks = self._merged(cells)
        first, last = self._cell_regions[cells], self._cell_regions[cells + 1]
        lo, hi = np.searchsorted(regions, first), np.searchsorted(regions, last)
        return {int(c): _MergedCell(np.bincount(regions[a:b] - f, minlength=int(e - f)).astype(np.int64),
                                    codes[a:b].copy(), rows[a:b].copy(), ranks[a:b].copy())
                for c, f, e, a, b in zip(cells, first, last, lo, hi)}

    def _probed_lists(self, probe_cells: np.ndarray) -> tuple[InvertedLists, np.ndarray]:
        """Inverted lists of the probed cells' live rows (other regions empty) and each row's image
        rank, from the merged-cell cache; cells not cached are merged now, in one batch."""
        cells = np.unique(probe_cells[probe_cells >= 0]).astype(np.int64)
        found, missing = {}, []
        with self._cell_lock:
            for c in cells.tolist():
                entry = self._cells.get(c)
                if entry is None:
                    missing.append(c)
                else:
                    self._cells.move_to_end(c)
                    found[c] = entry
        if missing:
            built = self._merge_cells(np.asarray(missing, np.int64))
            found.update(built)
            with self._cell_lock:
                for c, entry in built.items():
                    if c not in self._cells:  # another thread may have merged it meanwhile
                        self._cells[c] = entry
                        self._cell_bytes += entry.nbytes
                while self._cell_bytes > self._cell_cache_bytes and self._cells:
                    _, evicted = self._cells.popitem(last=False)
                    self._cell_bytes -= evicted.nbytes
        n_regions = self.quantizer.regions.n_regions
        entries = [found[c] for c in cells.tolist()]
        counts = np.zeros(n_regions, np.int64)
        if entries:
            counts[shards.regions_of_cells(self._cell_regions, cells)] = np.concatenate([e.counts for e in entries])
        offsets = np.zeros(n_regions + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        m = self.quantizer.params.pq_m
        codes = np.concatenate([e.codes for e in entries]) if entries else np.zeros((0, m), np.uint8)
        ids = np.concatenate([e.ids for e in entries]) if entries else np.zeros(0, np.int64)
        ranks = np.concatenate([e.ranks for e in entries]) if entries else np.zeros(0, np.int32)
        return InvertedLists(offsets, codes, ids), ranks

    def load_all(self) -> None:
        """Hold every live row in memory as one set of inverted lists, merged once (tombstoned rows
        dropped, in one segment's row order), with each row's image rank for image restrictions, so
        a search costs what one segment's does; the row groups stay cached for :meth:`rows`."""
        self._share_cache(resident=True)
        m, n_regions = self.quantizer.params.pq_m, self.quantizer.regions.n_regions
        live_rows = 0
        for s, reader in enumerate(self.segments):
            for group in range(reader.num_row_groups):
                index = reader._load_group(group)["image_index"]
                live_rows += int((self._ranks[s][index] >= 0).sum())
        codes, ids = np.empty((live_rows, m), np.uint8), np.empty(live_rows, np.int64)
        ranks, counts = np.empty(live_rows, np.int32), np.zeros(n_regions, np.int64)
        n_cells = self.quantizer.coarse.n_cells
        edges = np.unique(np.linspace(0, n_cells, max(1, -(-self.num_rows // LOAD_BATCH_ROWS)) + 1).astype(np.int64))
        at = 0
        for a, b in zip(edges[:-1], edges[1:]):  # a batch of cells at a time: their rows are contiguous
            regions, c, i, r = self._merged(np.arange(a, b))
            codes[at:at + len(i)], ids[at:at + len(i)], ranks[at:at + len(i)] = c, i, r
            counts += np.bincount(regions, minlength=n_regions)
            at += len(i)
        if at != live_rows:
            raise shards.ShardError(f"{self.directory}: {at} live rows found by cell, {live_rows} by row group")
        offsets = np.zeros(n_regions + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        with self._cell_lock:
            self._resident, self._resident_ranks = InvertedLists(offsets, codes, ids), ranks
            self._cells.clear()
            self._cell_bytes = 0

    def _live_ranks(self, image_ids: np.ndarray) -> np.ndarray:
        """The ranks of those of ``image_ids`` that are live (others ignored), sorted."""
        ids = np.asarray(image_ids, np.int64)
        pos = np.minimum(np.searchsorted(self._live_ids, ids), max(len(self._live_ids) - 1, 0))
        found = (self._live_ids[pos] == ids) if len(self._live_ids) else np.zeros(len(ids), bool)
        return np.unique(pos[found]).astype(np.int32)

    def search(self, queries: np.ndarray, k: int, nprobe: int = 8,
               image_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ADC search as :meth:`IndexReader.search`, over the live rows of every segment:
        (squared distances, global row ids); ``image_ids`` restricts the scan to those images."""
        queries = np.ascontiguousarray(queries, np.float32)
        probe_cells, _ = self.quantizer.coarse.probe(queries, nprobe)
        if self._resident is not None:
            lists, ranks = self._resident, self._resident_ranks
        else:
            lists, ranks = self._probed_lists(probe_cells.ravel())
        if image_ids is not None:
            lists = lists.restrict_to_images(shards.regions_of_cells(self._cell_regions, probe_cells), ranks,
                                             self._live_ranks(image_ids))
        return Searcher(self.quantizer, lists).search_cells(queries, probe_cells, k)

    def stored_rows(self):
        """Every live posting row group in turn as :class:`~delf_retrieval.shards.StoredRows`
        (global row ids, image ids, decoded descriptors, keypoints), segment after segment;
        tombstoned rows dropped, groups left empty skipped."""
        for s, (reader, deleted) in enumerate(zip(self.segments, self._deleted)):
            for block in reader.stored_rows():
                if len(deleted):
                    block = block.take(~np.isin(block.image_ids, deleted))
                if len(block):
                    block.rows = block.rows + self._offsets[s]
                    yield block

    def postings(self):
        """:meth:`stored_rows` as (image ids, reconstructed PCA'd descriptors)."""
        for block in self.stored_rows():
            yield block.image_ids, block.descriptors

    def rows(self, ids: np.ndarray) -> shards.Rows:
        """Image id, keypoint, scale and attention of global row ids (-1: image id -1)."""
        ids = np.asarray(ids, np.int64)
        flat = ids.ravel()
        out = shards.Rows(np.full(flat.shape, -1, np.int64), np.zeros((flat.size, 2), np.float32),
                          np.zeros(flat.size, np.float32), np.zeros(flat.size, np.float32))
        valid = np.flatnonzero(flat >= 0)
        segment = np.searchsorted(self._offsets, flat[valid], side="right") - 1
        for s in np.unique(segment):
            where = valid[segment == s]
            part = self.segments[int(s)].rows(flat[where] - self._offsets[s])
            out.image_ids[where], out.locations[where] = part.image_ids, part.locations
            out.scales[where], out.attentions[where] = part.scales, part.attentions
        shape = ids.shape
        return shards.Rows(out.image_ids.reshape(shape), out.locations.reshape(shape + (2,)),
                           out.scales.reshape(shape), out.attentions.reshape(shape))


# ---------------------------------------------------------------------------------------------
# Merging


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


def segment_stats(manifest: dict, tombstones: Tombstones) -> list[SegmentStats]:
    """The stats of a format-2 version's segments, in its order."""
    return [SegmentStats(r.segment_id, r.size_bytes, r.images, len(tombstones.of(r.segment_id)))
            for r in segment_refs(manifest)]


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
    from delf_retrieval.index import shard_count

    stats = segment_stats(manifest, tombstones)
    chosen = policy.find_merges(stats) if max_segments is None else policy.forced_merges(stats, max_segments)
    refs = {r.segment_id: r for r in segment_refs(manifest)}
    n_cells = int(manifest["params"]["n_cells"])
    merges = []
    for i, ids in enumerate(chosen):
        sources = tuple(refs[s] for s in ids)
        live = sum(r.descriptors * (1 - len(tombstones.of(r.segment_id)) / max(r.images, 1)) for r in sources)
        merges.append(Merge(f"{merge_id}-m{i}", sources, shard_count(int(live), n_cells, rows_per_shard),
                            shards.new_index_id()))
    return merges


def cell_range(shard: int, n_cells: int, n_shards: int) -> tuple[int, int]:
    """[first, end) cells of ``shard`` when cells are cut into ``n_shards`` as ``index.shard_of_cells`` does."""
    return -(-shard * n_cells // n_shards), -(-(shard + 1) * n_cells // n_shards)


def merged_shard(root: str, merge: Merge, shard: int, dropped: Tombstones, n_cells: int, pq_m: int,
                 pq_bits: int) -> pa.Table:
    """The posting table of one shard of ``merge``: the rows of its sources in the shard's cell
    range, without images ``dropped`` names for their segment, in the order one segment stores
    (an image's rows keep theirs). Each source shard read is checked against its SHA-256."""
    first, end = cell_range(shard, n_cells, merge.num_shards)
    parts = []
    for ref in merge.sources:
        gone = dropped.of(ref.segment_id)
        for record in read_segment(root, ref).shards:
            if record["last_cell"] < first or record["first_cell"] >= end:
                continue
            table = pq.read_table(io.BytesIO(shards._check_file(root, _in_segment(ref, record), checksum=True)))
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


def posting_shards(directory: str, manifest: dict) -> list[dict]:
    """Every posting shard record a version reads, with its path from ``directory`` (where the
    manifest was read): a format-1 version's own shards, or those of each segment it lists."""
    if not is_segmented(manifest):
        return list(manifest["shards"])
    root = index_root(directory, manifest)
    if root != directory:
        raise ValueError("posting_shards reads a segmented version from its root, not its own folder")
    return [_in_segment(ref, s) for ref in segment_refs(manifest) for s in read_segment(root, ref).shards]
