"""Files on local disk or Google Cloud Storage (``gs://bucket/path``) behind one small API: whole and
ranged reads, writes, listing, deletion. Honours ``STORAGE_EMULATOR_HOST`` (a local GCS emulator)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import os
import re
import shutil
import stat
import uuid

GCS_PREFIX = "gs://"


class PreconditionFailed(Exception):
    """A conditional write or delete found the file in another state than the one expected."""


class TooLarge(ValueError):
    """A bounded read found more bytes than it may take."""


class NotAFile(OSError):
    """A path that names something other than a regular file (FIFO, device, directory, socket)."""


def is_gcs(path: str) -> bool:
    return path.startswith(GCS_PREFIX)


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(base, *parts)


def relative(path: str, base: str) -> str:
    if is_gcs(path):
        return path[len(base.rstrip("/")) + 1:]
    return os.path.relpath(path, base)


@functools.lru_cache(maxsize=None)
def _client():
    from google.cloud import storage  # heavy: imported on first use

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials  # heavy: imported on first use

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulated"), credentials=AnonymousCredentials())
    return storage.Client()


def _blob(path: str):
    bucket, _, name = path[len(GCS_PREFIX):].partition("/")
    if not bucket or not name:
        raise ValueError(f"not a gs://bucket/object path: {path}")
    return _client().bucket(bucket).blob(name)


def exists(path: str) -> bool:
    return _blob(path).exists() if is_gcs(path) else os.path.exists(path)


def size(path: str) -> int:
    """Size in bytes; FileNotFoundError if absent."""
    if is_gcs(path):
        blob = _blob(path)
        blob_with_meta = blob.bucket.get_blob(blob.name)
        if blob_with_meta is None:
            raise FileNotFoundError(path)
        return int(blob_with_meta.size)
    return os.path.getsize(path)


def read_bytes(path: str, start: int | None = None, length: int | None = None) -> bytes:
    """The whole file, or ``length`` bytes from ``start``; FileNotFoundError if absent."""
    if is_gcs(path):
        from google.api_core import exceptions  # heavy: imported on first use

        try:
            if start is None:
                return _blob(path).download_as_bytes()
            return _blob(path).download_as_bytes(start=start, end=start + length - 1) if length else b""
        except exceptions.NotFound as e:
            raise FileNotFoundError(path) from e
    with open(path, "rb") as f:
        if start is None:
            return f.read()
        f.seek(start)
        return f.read(length)


def read_bounded(path: str, max_bytes: int, timeout: float | None = None) -> bytes:
    """A whole input file of at most ``max_bytes`` (TooLarge otherwise; FileNotFoundError if absent).
    Locally only a regular file is read (NotAFile for a FIFO, device or directory, checked on the
    opened descriptor, which a FIFO does not block), and never more than ``max_bytes + 1`` bytes.
    On gs:// the object's size is looked up first, then exactly that generation is downloaded;
    ``timeout`` bounds each request."""
    if is_gcs(path):
        from google.api_core import exceptions  # heavy: imported on first use

        blob = _blob(path)
        found = blob.bucket.get_blob(blob.name, timeout=timeout or 60)
        if found is None:
            raise FileNotFoundError(path)
        if found.size is not None and int(found.size) > max_bytes:
            raise TooLarge(f"{path}: {found.size} bytes exceeds the limit of {max_bytes}")
        try:
            data = found.download_as_bytes(if_generation_match=found.generation, timeout=timeout or 60)
        except exceptions.NotFound as e:
            raise FileNotFoundError(path) from e
        except exceptions.PreconditionFailed as e:
            raise OSError(f"{path} was replaced while it was read") from e
        if len(data) > max_bytes:
            raise TooLarge(f"{path}: more than {max_bytes} bytes")
        return data

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            raise NotAFile(f"{path} is {kind}, not a regular file")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > max_bytes:
        raise TooLarge(f"{path}: more than {max_bytes} bytes")
    return b"".join(chunks)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file. Atomic: readers see the old file or the new one, never a part (a GCS
    object upload is atomic; locally the data goes to a temporary name that is then renamed)."""
    if is_gcs(path):
        _blob(path).upload_from_string(data)
        return
    _replace_atomically(path, data=data)


def upload(local_path: str, path: str) -> None:
    """Copy a finished local file to ``path`` (atomically, as :func:`write_bytes`)."""
    if is_gcs(path):
        _blob(path).upload_from_filename(local_path)
        return
    _replace_atomically(path, source=local_path)


TEMPORARY_SUFFIX = ".tmp-"  # <path>.tmp-<random hex>: a local atomic write in progress


def _replace_atomically(path: str, data: bytes | None = None, source: str | None = None) -> None:
    """Write ``data`` (or a copy of the file ``source``) to a temporary name beside ``path``, then
    rename it over ``path``; a write that fails (a full disk) removes its temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}{TEMPORARY_SUFFIX}{uuid.uuid4().hex}"
    try:
        _fill(temporary, data, source)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _fill(temporary: str, data: bytes | None, source: str | None) -> None:
    """The one place a local file's bytes are written (a test's full disk fails it)."""
    if source is not None:
        shutil.copyfile(source, temporary)
        return
    with open(temporary, "wb") as f:
        f.write(data)


def remove_temporaries(path: str) -> list[str]:
    """Delete what interrupted atomic writes of ``path`` left (``path.tmp-*``, local only: a gs://
    upload leaves nothing); returns what it deleted. Only for a path no one is writing now."""
    if is_gcs(path):
        return []
    folder, name = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    gone = []
    for leftover in names:
        if leftover.startswith(name + TEMPORARY_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, leftover))
                gone.append(os.path.join(folder, leftover))
    return gone


def list_files(prefix: str, on_error=None) -> list[str]:
    """Every file under a directory / object prefix, recursively, sorted. Locally, symbolic links to
    folders are listed as names, never followed (so a link loop is one name, not a walk without end),
    and ``on_error(OSError)`` hears of each folder that cannot be read (its files are not listed)."""
    if is_gcs(prefix):
        bucket, _, name = prefix[len(GCS_PREFIX):].partition("/")
        name = name.rstrip("/") + "/" if name else ""
        return sorted(f"{GCS_PREFIX}{bucket}/{b.name}" for b in _client().list_blobs(bucket, prefix=name))
    found = []
    for root, folders, names in os.walk(prefix, onerror=on_error):
        found += [os.path.join(root, n) for n in names]
        found += [os.path.join(root, n) for n in folders if os.path.islink(os.path.join(root, n))]
    return sorted(found)


def _glob_regex(pattern: str) -> "re.Pattern":
    """``**/`` zero or more folders, ``*`` and ``?`` within one folder, ``[...]`` a character class."""

    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):  # zero or more folders, as Python's recursive glob
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob(pattern: str, on_error=None) -> list[str]:
    """Files matching a glob (``*``, ``?``, ``[..]``; ``**`` crosses folders), local or gs://, sorted:
    the names :func:`list_files` finds under the pattern's fixed part, matched the same way on both
    (a local ``**`` never follows a symbolic link, so a link loop cannot list a file forty times)."""

    wildcard = min((pattern.find(c) for c in "*?[" if c in pattern), default=len(pattern))
    matcher = _glob_regex(pattern)
    if is_gcs(pattern):
        return [p for p in list_files(pattern[:wildcard].rsplit("/", 1)[0]) if matcher.match(p)]
    base = os.path.dirname(pattern[:wildcard])
    found = list_files(base or os.curdir, on_error)
    if not base:
        found = [p[len(os.curdir) + 1:] for p in found]
    return [p for p in found if matcher.match(p)]


def stamp(path: str) -> str | None:
    """A cheap change marker of a file without reading it: the object generation on gs://, size and
    mtime locally; None if absent. Equal stamps mean unchanged; different ones only maybe changed."""
    if is_gcs(path):
        blob = _blob(path)
        found = blob.bucket.get_blob(blob.name)
        return None if found is None else f"gen:{found.generation}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return f"st:{st.st_size}:{st.st_mtime_ns}"


def modified(path: str) -> float | None:
    """The file's last modification, as a POSIX time (the object's update time on gs://); None if absent."""
    if is_gcs(path):
        blob = _blob(path)
        found = blob.bucket.get_blob(blob.name)
        return None if found is None or found.updated is None else found.updated.timestamp()
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def stamps_under(prefix: str) -> dict[str, str]:
    """{path: stamp} of every file under a gs:// prefix, from one listing (no per-object requests)."""
    if not is_gcs(prefix):
        return {p: stamp(p) for p in list_files(prefix)}
    bucket, _, name = prefix[len(GCS_PREFIX):].partition("/")
    name = name.rstrip("/") + "/" if name else ""
    return {f"{GCS_PREFIX}{bucket}/{b.name}": f"gen:{b.generation}" for b in _client().list_blobs(bucket, prefix=name)}


# Conditional operations (compare-and-swap). On gs:// the token is the object generation and the
# checks are GCS preconditions, atomic on the server. Locally the token is the content's SHA-256
# and each operation holds an exclusive flock on ``<path>.guard`` while it checks and writes.


@contextlib.contextmanager
def _local_guard(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _local_token(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def read_with_token(path: str) -> tuple[bytes | None, str | None]:
    """(content, token) of a file, (None, None) if absent; pass the token to the conditional calls."""
    if is_gcs(path):
        blob = _blob(path)
        found = blob.bucket.get_blob(blob.name)
        if found is None:
            return None, None
        from google.api_core import exceptions  # heavy: imported on first use

        generation = found.generation  # read first: the download may reset the blob's properties
        try:
            return found.download_as_bytes(if_generation_match=generation), str(generation)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            return read_with_token(path)  # replaced between the two requests: read the new one
    with _local_guard(path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
    return data, hashlib.sha256(data).hexdigest()


def write_bytes_if(path: str, data: bytes, token: str | None) -> str:
    """Write ``path`` only if it is still in the state ``token`` names (None: only if absent);
    PreconditionFailed otherwise. Atomic like :func:`write_bytes`. Returns the new token."""
    if is_gcs(path):
        from google.api_core import exceptions  # heavy: imported on first use

        blob = _blob(path)
        try:
            blob.upload_from_string(data, if_generation_match=int(token) if token is not None else 0)
        except exceptions.PreconditionFailed as e:
            raise PreconditionFailed(f"{path} changed since it was read") from e
        return str(blob.generation)
    with _local_guard(path):
        if _local_token(path) != token:
            raise PreconditionFailed(f"{path} changed since it was read")
        write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def delete_if(path: str, token: str) -> None:
    """Delete ``path`` only if it is still in the state ``token`` names; PreconditionFailed otherwise."""
    if is_gcs(path):
        from google.api_core import exceptions  # heavy: imported on first use

        try:
            _blob(path).delete(if_generation_match=int(token))
        except (exceptions.PreconditionFailed, exceptions.NotFound) as e:
            raise PreconditionFailed(f"{path} changed since it was read") from e
        return
    with _local_guard(path):
        if _local_token(path) != token:
            raise PreconditionFailed(f"{path} changed since it was read")
        os.remove(path)


def delete(path: str) -> None:
    if is_gcs(path):
        _blob(path).delete()
    elif os.path.exists(path):
        os.remove(path)


def delete_tree(prefix: str) -> None:
    if is_gcs(prefix):
        for path in list_files(prefix):
            delete(path)
    else:
        shutil.rmtree(prefix, ignore_errors=True)


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a file of ``size`` bytes of which only some ranges are known
    (e.g. a Parquet footer and one row group fetched with ranged reads); reading outside them
    is an error, so a reader that needs more bytes fails loudly instead of reading garbage."""

    def __init__(self, size: int, segments: dict[int, bytes]):
        self._size = size
        self._segments = sorted(segments.items())
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        for start, data in self._segments:
            if start <= self._pos and self._pos + want <= start + len(data):
                buffer[:want] = data[self._pos - start:self._pos - start + want]
                self._pos += want
                return want
        raise OSError(f"bytes {self._pos}..{self._pos + want} were not fetched")
