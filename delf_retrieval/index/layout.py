"""The index's files on storage: their names, the manifest (read with its paths checked, written
last), the file records (size and SHA-256) and the one checked read of a listed file."""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from delf_retrieval import storage

INDEX_FORMAT = "delf-retrieval-index"
INDEX_FORMAT_VERSION = 1  # one set of shards; version 2 lists segments (delf_retrieval.index.segments)
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PCA_FILE = "pca.npz"
QUANTIZER_FILE = "quantizer.npz"
IMAGES_FILE = "images.parquet"
DEAD_LETTERS_FILE = "dead_letters.parquet"
POSTINGS_DIR = "postings"
BUILDS_DIR = "builds"  # the pipeline writes each run under builds/<build id>/ and publishes it


class IndexStorageError(Exception):
    """Base of the errors about an index on storage."""


class ManifestError(IndexStorageError):
    """The manifest is missing, unreadable, or of another format/version."""


class ShardError(IndexStorageError):
    """A file the manifest lists is missing, truncated, corrupt, of the wrong shape, or belongs to
    another index."""


class DamagedFile(ShardError):
    """A listed file whose bytes are not the ones recorded: missing, truncated, or failing its
    SHA-256 or CRC-32 (bit rot, a replaced file). What a scrub looks for and a repair mends."""


def sha256_of_file(local_path: str) -> str:
    digest = hashlib.sha256()
    with open(local_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_record(relative: str, data: bytes, **extra) -> dict:
    return {"path": relative, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **extra}


def write_table_file(directory: str, relative: str, table: pa.Table) -> dict:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return write_array_file(directory, relative, buffer.getvalue(), rows=table.num_rows)


def write_array_file(directory: str, relative: str, payload: bytes, **extra) -> dict:
    storage.write_bytes(storage.join(directory, relative), payload)
    return bytes_record(relative, payload, **extra)


def write_manifest(directory: str, manifest: dict) -> None:
    """Publish the index in one atomic write (see :func:`storage.write_bytes`)."""
    storage.write_bytes(storage.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())


def new_index_id() -> str:
    return uuid.uuid4().hex


def check_relative(relative, field: str, where: str = MANIFEST) -> str:
    """A path from a manifest, as it must be: relative to the index root, '/'-separated, with no
    empty, '.' or '..' part, no backslash, NUL or scheme; otherwise a ManifestError naming the
    field. So no manifest can send a reader outside the root it was opened from."""
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"{where}: {field} is not a path: {relative!r}")
    parts = relative.split("/")
    if (any(p in ("", ".", "..") for p in parts) or "\\" in relative or "\x00" in relative or "://" in relative
            or os.path.isabs(relative)):
        raise ManifestError(f"{where}: {field} {relative!r} does not stay inside the index root")
    return relative


def resolve(directory: str, relative: str, field: str = "path") -> str:
    """``directory/relative`` for a checked manifest path; locally, symbolic links inside the index may
    not lead out of it either (its real path must lie under the directory's)."""
    path = storage.join(directory, check_relative(relative, field))
    if not storage.is_gcs(directory):
        real_root = os.path.realpath(directory)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise ManifestError(f"{field} {relative!r} leads outside the index root {directory} (a symbolic link)")
    return path


def check_manifest_paths(manifest: dict, where: str = MANIFEST) -> None:
    """Every path a manifest names (files, shards, its version folder and the one it replaced)."""
    files = manifest.get("files")
    listing = "segments" if manifest.get("format_version") == 2 else "shards"
    if not isinstance(files, dict) or not isinstance(manifest.get(listing), list):
        raise ManifestError(f"{where}: no files/{listing} lists")
    for name, record in files.items():
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: files.{name} is not a file record")
        check_relative(record.get("path"), f"files.{name}.path", where)
    for i, record in enumerate(manifest[listing]):
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: {listing}[{i}] is not a file record")
        check_relative(record.get("path"), f"{listing}[{i}].path", where)
    if listing == "segments":  # the shared model (paths from the root, as segments')
        codebooks = manifest.get("codebooks")
        if not isinstance(codebooks, dict) or not isinstance(codebooks.get("quantizer"), dict):
            raise ManifestError(f"{where}: no codebooks.quantizer record")
        for name, record in codebooks.items():
            if not isinstance(record, dict):
                raise ManifestError(f"{where}: codebooks.{name} is not a file record")
            check_relative(record.get("path"), f"codebooks.{name}.path", where)
    for field in ("build", "previous", "version_folder"):
        if manifest.get(field) is not None:
            check_relative(manifest[field], field, where)


def read_manifest(directory: str) -> dict:
    path = storage.join(directory, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise ManifestError(f"{directory} is not an index: no {MANIFEST} (a build that did not finish "
                            "publishes nothing)") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise ManifestError(f"{path} is not a {INDEX_FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise ManifestError(f"{path}: index format version {manifest.get('format_version')}, this reader "
                            f"reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    check_manifest_paths(manifest, path)
    return manifest


def checked_read(directory: str, record: dict, checksum: bool = True, where: str = "the manifest") -> bytes | None:
    """The one checked read of a listed file: its size (and SHA-256 when ``checksum``) against its
    record in ``where``; returns the bytes when it read them. A missing, truncated, replaced or
    corrupt file is a ``ShardError`` naming it."""
    if (not isinstance(record, dict) or not isinstance(record.get("bytes"), int)
            or (checksum and not isinstance(record.get("sha256"), str))):
        raise ManifestError(f"{where}: a file record is malformed (path, bytes and sha256 needed): {record!r}")
    path = resolve(directory, record["path"])
    try:
        size = storage.size(path) if not checksum else None
        data = storage.read_bytes(path) if checksum else None
    except FileNotFoundError:
        raise DamagedFile(f"{record['path']} is listed in {where} but missing from {directory}") from None
    size = len(data) if checksum else size
    if size != record["bytes"]:
        raise DamagedFile(f"{record['path']} has {size} bytes, {where} says {record['bytes']} "
                         "(truncated or replaced)")
    if checksum and hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise DamagedFile(f"{record['path']} does not match its SHA-256 in {where} (corrupt)")
    return data


def read_table(data: bytes, schema: pa.Schema, where: str, not_null: tuple = ()) -> pa.Table:
    """An index table's Parquet bytes (already checked against their record) read as a table that
    has every column of ``schema`` with its type (an integer column of another width is cast), and
    no null in the ``not_null`` columns; otherwise a ``ShardError`` naming ``where`` and what is
    wrong. A file with the right checksum can still be the wrong file: written by a foreign tool,
    another version, or by hand."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ShardError(f"{where} is not a Parquet table ({e})") from None
    for expected in schema:
        if expected.name not in table.schema.names:
            raise ShardError(f"{where} has no column {expected.name!r} (its columns: {', '.join(table.schema.names)})")
        index = table.schema.get_field_index(expected.name)
        found = table.schema.field(index).type
        if found != expected.type:
            if not (pa.types.is_integer(found) and pa.types.is_integer(expected.type)):
                raise ShardError(f"{where}: column {expected.name!r} is {found}, not {expected.type}")
            try:
                table = table.set_column(index, expected.name, table.column(index).cast(expected.type))
            except pa.ArrowInvalid:
                raise ShardError(f"{where}: column {expected.name!r} holds values outside {expected.type}") from None
        if expected.name in not_null and table.column(index).null_count:
            raise ShardError(f"{where}: column {expected.name!r} has {table.column(index).null_count} empty values")
    return table
