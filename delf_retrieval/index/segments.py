"""An index version as a list of immutable segments plus tombstones: the segment files and their
manifests, the shared codebooks, the version manifest (format version 2) that lists them, reading
its live images, writing it, and verifying any version (format 1 or 2). The reader that searches
every segment as one index is ``segment_reader``; merging is ``merge_policy`` and ``merging``.

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
read as it always was, by :class:`~delf_retrieval.index.shard_reader.IndexReader`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from delf_retrieval import storage
from delf_retrieval.index import layout, shards
from delf_retrieval.index.layout import checked_read, read_manifest
from delf_retrieval.index.neighbour_table import NEIGHBOURS_FILE
from delf_retrieval.quantize import Quantizer
from delf_retrieval.quantize import pca as pca_lib

SEGMENTS_FORMAT_VERSION = 2
SEGMENT_FORMAT = "delf-retrieval-segment"
SEGMENTS_DIR = "segments"
CODEBOOKS_DIR = "codebooks"  # the PCA + quantizer of a training build, shared by the versions encoding with them
SEGMENT_MANIFEST = "segment.json"
TOMBSTONES_FILE = "tombstones.parquet"
TOMBSTONE_SCHEMA = pa.schema([("segment", pa.string()), ("image_id", pa.int64())])
RESTAMPS_FILE = "restamps.parquet"
FIRST_STAGE = "first_stage"  # the manifest's entry for the first stage's files (delf_retrieval.first_stage)
RESTAMP_SCHEMA = pa.schema([("segment", pa.string()), ("image_id", pa.int64()), ("stamp", pa.string())])


class DamagedSegment(layout.DamagedFile):
    """A segment whose files fail their checks, named so that the user and the next run know which:
    that run leaves it out and extracts its images again from the corpus."""

    def __init__(self, segment_id: str, detail: str):
        super().__init__(f"segment {segment_id} is damaged ({detail}); the next pipeline.reindex run repairs it "
                         "from the corpus (--repair: now)")
        self.segment_id = segment_id


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
            return SegmentRef(str(record["segment_id"]), layout.check_relative(record["path"], "segments[].path"),
                              int(record["bytes"]), str(record["sha256"]), int(record["images"]),
                              int(record["descriptors"]), int(record["size_bytes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise layout.ManifestError(f"a segment record is malformed ({e!r}): {record!r}") from None

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
            raise layout.ManifestError(f"{where}: unreadable segment manifest ({e})") from None
        for name, r in [("images", segment.images)] + [(f"shards[{i}]", s) for i, s in enumerate(segment.shards)]:
            layout.check_relative(r.get("path"), f"{name}.path", where)
            if not all(isinstance(r.get(key), kind) for key, kind in (("bytes", int), ("sha256", str), ("rows", int))):
                raise layout.ManifestError(f"{where}: {name} is not a file record (path, bytes, sha256 and rows)")
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
        raise layout.ManifestError(f"{directory}: the manifest belongs in {folder}, not here")
    return stripped[:-len(folder) - 1] or "/"


def read_segment(root: str, ref: SegmentRef) -> Segment:
    """A segment's manifest, checked against the size and SHA-256 the version recorded for it."""
    data = layout.checked_read(root, {"path": ref.path, "bytes": ref.bytes, "sha256": ref.sha256}, checksum=True)
    segment = Segment.from_bytes(data, ref.path)
    if segment.segment_id != ref.segment_id:
        raise layout.ShardError(f"{ref.path} is segment {segment.segment_id}, the manifest says {ref.segment_id}")
    return segment


def in_segment(ref: SegmentRef, record: dict) -> dict:
    return {**record, "path": f"{ref.folder}/{record['path']}"}


def read_tombstones(directory: str, manifest: dict) -> Tombstones:
    record = manifest["files"].get("tombstones")
    if record is None:
        return Tombstones()
    return Tombstones.from_table(layout.read_table(layout.checked_read(directory, record, checksum=True),
                                                   TOMBSTONE_SCHEMA, record["path"], not_null=TOMBSTONE_SCHEMA.names))


def read_restamps(directory: str, manifest: dict) -> Restamps:
    record = manifest["files"].get("restamps")
    if record is None:
        return Restamps()
    return Restamps.from_table(layout.read_table(layout.checked_read(directory, record, checksum=True),
                                                 RESTAMP_SCHEMA, record["path"], not_null=("segment", "image_id")))


def live_images(root: str, manifest: dict, damaged: dict | None = None) -> pa.Table:
    """The live images of a format-2 version read from ``root`` (the pointer, or a manifest whose
    paths are from ``root``): each segment's image table without its tombstoned images, with the
    version's restamps applied and a ``segment`` column naming where each image's rows are. With
    ``damaged`` ({segment id: reason}), those segments are left out, and so is a segment whose
    image table fails its check, which is added there instead of raising."""
    tombstones, restamps = read_tombstones(root, manifest), read_restamps(root, manifest)
    parts = [pa.Table.from_pylist([], schema=shards.IMAGE_SCHEMA.append(pa.field("segment", pa.string())))]
    for ref in segment_refs(manifest):
        if damaged is not None and ref.segment_id in damaged:
            continue
        try:
            table = segment_images(root, ref, tombstones.of(ref.segment_id), restamps.stamps.get(ref.segment_id, {}))
        except layout.DamagedFile as e:
            if damaged is None:
                raise
            damaged[ref.segment_id] = str(e)
            continue
        parts.append(table.append_column("segment", pa.array(np.full(table.num_rows, ref.segment_id, object),
                                                             pa.string())))
    return pa.concat_tables(parts)


def segment_images(root: str, ref: SegmentRef, dropped: np.ndarray = np.zeros(0, np.int64),
                   restamped: dict | None = None) -> pa.Table:
    """A segment's image table (checked) without the ``dropped`` image ids, ``restamped`` stamps applied."""
    segment = read_segment(root, ref)
    record = in_segment(ref, segment.images)
    table = shards.read_image_table(layout.checked_read(root, record, checksum=True), record["path"])
    return with_restamps(without_images(table, dropped), restamped)


def without_images(table: pa.Table, image_ids: np.ndarray) -> pa.Table:
    """An image table without the rows of ``image_ids``."""
    if not len(image_ids):
        return table
    return table.filter(pa.array(~np.isin(table.column("image_id").to_numpy(), image_ids)))


def with_restamps(table: pa.Table, restamped: dict | None) -> pa.Table:
    """An image table with the stamps of ``restamped`` (image id -> stamp) replaced."""
    if not restamped:
        return table
    ids = table.column("image_id").to_pylist()
    stamps = [restamped.get(i, old) for i, old in zip(ids, table.column("stamp").to_pylist())]
    return table.set_column(table.schema.get_field_index("stamp"), "stamp", pa.array(stamps, pa.string()))


def verify_segments(directory: str, manifest: dict, deep: set[str] | None = None) -> None:
    """Check a format-2 version: its own files byte for byte, every segment's manifest against its
    recorded SHA-256, and the files of the segments in ``deep`` (None: all) byte for byte; the
    files of the others only by size (a segment is verified once, by the run that wrote it)."""
    for record in manifest["files"].values():
        layout.checked_read(directory, record, checksum=True)
    root = index_root(directory, manifest)
    for record in manifest["codebooks"].values():  # small, shared: always read
        layout.checked_read(root, record, checksum=True)
    first_stage = (manifest.get(FIRST_STAGE) or {}).get("segments", {})
    for ref in segment_refs(manifest):
        segment = read_segment(root, ref)
        deeply = deep is None or ref.segment_id in deep
        for record in (segment.images,) + segment.shards:
            layout.checked_read(root, in_segment(ref, record), checksum=deeply)
        for part in first_stage.get(ref.segment_id, ()):  # paths from the root
            for record in (part["vectors"], part["row_file"]):
                layout.checked_read(root, record, checksum=deeply)


def segment_folder(root: str, segment_id: str) -> str:
    return storage.join(root, f"{SEGMENTS_DIR}/{segment_id}")


def write_segment(root: str, rows: shards.PostingRows, images: pa.Table, pq_bits: int,
                  segment_id: str | None = None, rows_per_shard: int = 4_000_000,
                  rows_per_group: int = shards.ROWS_PER_GROUP) -> SegmentRef:
    """Write one immutable segment held in memory under ``root/segments/<id>/`` (its manifest
    last; the Beam build writes the same files in parallel) and return the record a version
    lists it by."""
    segment_id = segment_id or layout.new_index_id()
    folder = segment_folder(root, segment_id)
    index_id = layout.new_index_id()
    table = shards.postings_table(rows, pq_bits)
    shard_records = [
        shards.write_shard(folder, f"{layout.POSTINGS_DIR}/part-{i:05d}.parquet", piece, index_id, rows_per_group)
        for i, piece in enumerate(shards.split_by_cells(table, rows_per_shard))]
    return finish_segment(root, segment_id, index_id, images, shard_records)


def finish_segment(root: str, segment_id: str, index_id: str, images: pa.Table, shard_records: list[dict]) -> SegmentRef:
    """Complete a segment whose posting shards (carrying ``index_id``) are written: its image table,
    then its manifest. Returns its record for a version manifest."""
    folder = segment_folder(root, segment_id)
    records = tuple(sorted((r for r in shard_records if r["rows"]), key=lambda r: r["first_cell"]))
    segment = Segment(segment_id, index_id, layout.write_table_file(folder, layout.IMAGES_FILE, images), records)
    payload = json.dumps(segment.to_json(), indent=1, sort_keys=True).encode()
    record = layout.write_array_file(folder, SEGMENT_MANIFEST, payload)
    return SegmentRef(segment_id, f"{SEGMENTS_DIR}/{segment_id}/{SEGMENT_MANIFEST}", record["bytes"],
                      record["sha256"], images.num_rows, segment.descriptors,
                      segment.images["bytes"] + sum(r["bytes"] for r in records))


def write_codebooks(root: str, codebooks_id: str, quantizer_npz: bytes, pca_npz: bytes | None) -> dict:
    """Write a training build's PCA + quantizer once, under ``root/codebooks/<id>/``; returns their
    file records (paths from ``root``), which every version encoding with them lists as ``codebooks``."""
    folder = f"{CODEBOOKS_DIR}/{codebooks_id}"
    records = {"quantizer": layout.write_array_file(root, f"{folder}/{layout.QUANTIZER_FILE}", quantizer_npz)}
    if pca_npz is not None:
        records["pca"] = layout.write_array_file(root, f"{folder}/{layout.PCA_FILE}", pca_npz)
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
                     codebooks: dict | None = None, first_stage: dict | None = None) -> dict:
    """Write a version's own files into ``directory`` (its tombstones, and the model under
    ``codebooks/`` unless ``codebooks`` names those already written) and return its format-2
    manifest, not yet written: ``layout.write_manifest`` or ``versions.publish`` does that.
    ``version_folder``: ``builds/<id>`` when ``directory`` is that folder of a versioned root;
    ``neighbours``: the version's ``expansion.NeighbourTable`` (readers drop its edges to images
    that are not live); ``first_stage``: the first stage's manifest entry
    (``first_stage.search.entry``) when its files are written."""
    root = index_root(directory, {"version_folder": version_folder}) if version_folder else directory
    if codebooks is None:
        codebooks = write_codebooks(root, layout.new_index_id(), quantizer.to_npz_bytes(),
                                  None if pca is None else pca.to_npz_bytes())
    files = {}
    if dead_letters is not None:
        files["dead_letters"] = layout.write_table_file(directory, layout.DEAD_LETTERS_FILE, dead_letters)
    if neighbours is not None:

        files["neighbours"] = layout.write_table_file(directory, NEIGHBOURS_FILE, neighbours.to_table())
    return segmented_manifest(directory, layout.new_index_id(), quantizer, files, segments, tombstones,
                              version_folder=version_folder, model=model, codebooks=codebooks, first_stage=first_stage)


def segmented_manifest(directory: str, index_id: str, quantizer: Quantizer, files: dict, segments: list[SegmentRef],
                       tombstones: Tombstones = Tombstones(), restamps: Restamps = Restamps(),
                       version_folder: str | None = None, model: dict | None = None, extra: dict | None = None,
                       live_descriptors: int | None = None, codebooks: dict | None = None,
                       first_stage: dict | None = None) -> dict:
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
    files = {**files, "tombstones": layout.write_table_file(directory, TOMBSTONES_FILE, tombstones.to_table())}
    if len(restamps):
        files["restamps"] = layout.write_table_file(directory, RESTAMPS_FILE, restamps.to_table())
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
    if first_stage is not None:
        if set(first_stage["segments"]) != listed:
            raise ValueError("the first stage must cover exactly the segments the version lists")
        manifest[FIRST_STAGE] = first_stage
    return manifest


def _rows_of(root: str, ref: SegmentRef, image_ids: np.ndarray) -> int:
    """The posting rows of these images of a segment (their ``num_features``)."""
    table = segment_images(root, ref)
    chosen = np.isin(table.column("image_id").to_numpy(), image_ids)
    return int(table.column("num_features").to_numpy()[chosen].sum())


def write_version(directory: str, **kwargs) -> dict:
    """:func:`version_manifest`, then the manifest written (the version published in ``directory``)."""
    manifest = version_manifest(directory, **kwargs)
    layout.write_manifest(directory, manifest)
    return manifest


def posting_shards(directory: str, manifest: dict) -> list[dict]:
    """Every posting shard record a version reads, with its path from ``directory`` (where the
    manifest was read): a format-1 version's own shards, or those of each segment it lists."""
    if not is_segmented(manifest):
        return list(manifest["shards"])
    root = index_root(directory, manifest)
    if root != directory:
        raise ValueError("posting_shards reads a segmented version from its root, not its own folder")
    return [in_segment(ref, s) for ref in segment_refs(manifest) for s in read_segment(root, ref).shards]


def verify(directory: str, deep: set[str] | None = None) -> dict:
    """Check every file of an index byte for byte against the manifest; return the manifest. Of a
    version of segments, ``deep`` names the segments whose files are read byte for byte (None:
    all); the others are checked by their recorded checksums and sizes (``segments.verify``)."""
    manifest = read_manifest(directory)
    if manifest["format_version"] == 2:

        verify_segments(directory, manifest, deep)
        return manifest
    for record in list(manifest["files"].values()) + manifest["shards"]:
        checked_read(directory, record, checksum=True)
    return manifest
