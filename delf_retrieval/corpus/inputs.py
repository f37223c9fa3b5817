"""What goes into an index: listing a corpus (folder, glob or Google-Landmarks CSV), stable image ids,
and reading an image's bytes from disk, gs:// or http(s) (timeouts, retries, per-host politeness)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import http.client
import io
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple

from delf_retrieval import storage
from delf_retrieval.corpus import images
from delf_retrieval.corpus.images import DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS

CSV_URL_COLUMNS = ("url", "path", "uri", "path_or_url")
CSV_LABEL_COLUMNS = ("landmark_id", "label", "landmark")
MAX_REDIRECTS = 5
LISTING_EXTENSIONS = (".csv", ".txt")  # a source ending so is a listing, else a folder or glob


class InputImage(NamedTuple):
    """One image to index (a tuple, so Beam encodes it deterministically without pickling)."""

    uri: str
    label: str | None = None


class ListingError(ValueError):
    """A listing that cannot be parsed: the message names the file and the line."""


def image_id(uri: str) -> int:
    """A stable 63-bit id from the uri's bytes (:func:`uri_bytes`): re-runs and parallel workers agree
    without coordination. The chance of any collision is n^2 / 2^64: 5e-8 for a million images."""
    return int.from_bytes(hashlib.sha256(uri_bytes(uri)).digest()[:8], "big") >> 1


def uri_bytes(uri: str) -> bytes:
    """The bytes a uri names: its UTF-8, and for a file name that is not UTF-8 (which os.walk gives
    surrogate-escaped) the name's own bytes, as ``os.fsencode`` gives them on POSIX."""
    try:
        return uri.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return uri.encode("utf-8", "surrogatepass")


def is_text(uri: str) -> bool:
    """Whether a uri is UTF-8 text, as the index's tables (Parquet, JSON) store it."""
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(uri: str) -> str:
    """A uri as text any table takes: the bytes of a name that is not UTF-8 as ``\\xNN`` escapes."""
    return uri_bytes(uri).decode("utf-8", "backslashreplace")


def listing_dead_letter(uri: str, reason: str, error: str) -> dict:
    """The dead-letter record of an input refused while listing (stage ``list``)."""
    return {"uri": printable(uri), "stage": "list", "reason": reason, "error": error}


def _csv_rows(text: str, name: str) -> list[tuple[int, list[str]]]:
    """(line, cells) of the non-blank rows, parsed strictly: a quote left open, stray characters
    after a closing quote, or a NUL byte raise :class:`ListingError` naming the line, and a
    field may not run over lines (no uri holds a newline, so that is always an unclosed quote)."""
    reader = csv.reader(io.StringIO(text), strict=True)
    rows, line = [], 1
    try:
        for row in reader:
            if any("\n" in cell or "\r" in cell for cell in row):
                raise ListingError(f"{name} line {line}: a quoted field runs over lines {line}-{reader.line_num} "
                                   "(an unclosed quote?)")
            if any("\x00" in cell for cell in row):
                raise ListingError(f"{name} line {line}: a NUL byte (not a text listing?)")
            if row and any(cell.strip() for cell in row):
                rows.append((line, row))
            line = reader.line_num + 1
    except csv.Error as e:  # reported at the line where the record that broke began
        hint = " (a quote opened there is never closed)" if "end of data" in str(e) else ""
        raise ListingError(f"{name} line {line}: {e}{hint}") from None
    return rows


def parse_csv(text: str, name: str = "<listing>") -> list[InputImage]:
    """Rows of a listing CSV: ``id,url,landmark_id`` as Google-Landmarks ships it, ``path_or_url,label``,
    or one uri per line. A header row names the columns; without one, the first column is the uri
    (when there are two) or the second (when there are three: id,url,label). Malformed lines are
    a :class:`ListingError` naming ``name`` and the line; rows are never merged."""
    rows = _csv_rows(text, name)
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0][1]]
    url_col = next((header.index(c) for c in CSV_URL_COLUMNS if c in header), None)
    if url_col is not None:
        label_col = next((header.index(c) for c in CSV_LABEL_COLUMNS if c in header), None)
        rows = rows[1:]
    else:
        width = len(rows[0][1])
        url_col, label_col = (1, 2) if width >= 3 else (0, 1 if width == 2 else None)
    images = []
    for line, row in rows:
        if len(row) <= url_col or not row[url_col].strip():
            raise ListingError(f"{name} line {line}: no uri in column {url_col + 1}: {row}")
        label = row[label_col].strip() if label_col is not None and len(row) > label_col else None
        images.append(InputImage(row[url_col].strip(), label or None))
    return images


def resolve_uri(uri: str, base: str) -> str:
    """A listed uri as read: URLs, gs:// uris and absolute paths as they are, relative paths
    against ``base`` (the listing's folder)."""
    if is_url(uri) or storage.is_gcs(uri) or "://" in uri or os.path.isabs(uri):
        return uri
    return storage.join(base, uri)


def listing_folder(path: str) -> str:
    """The folder a listing's relative paths resolve against."""
    if storage.is_gcs(path):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def unique_inputs(images: list[InputImage]) -> tuple[list[InputImage], list[dict]]:
    """(the first listing of each uri, a dead-letter record for each later one): a uri listed twice
    is indexed once, and the repeat is reported (with both labels when they differ)."""
    first: dict[str, InputImage] = {}
    repeats = []
    for image in images:
        seen = first.setdefault(image.uri, image)
        if seen is image:
            continue
        conflict = (f"with another label ({image.label!r}; indexed with {seen.label!r})"
                    if image.label != seen.label else "with the same label")
        repeats.append(listing_dead_letter(image.uri, "duplicate", f"listed again {conflict}; indexed once"))
    return list(first.values()), repeats


def list_source(source: str, label_from_folder: bool = False) -> tuple[list, list[dict]]:
    """(the unique images of a source, dead letters of what could not be listed: uris listed again,
    names that are not UTF-8, folders that cannot be read): a listing CSV/TXT (local or gs://;
    relative paths resolve against its folder), a folder (searched recursively) or a glob."""
    if source.lower().endswith(LISTING_EXTENSIONS):
        base = listing_folder(source)
        rows = parse_csv(storage.read_bytes(source).decode("utf-8-sig", errors="replace"), name=source)
        return unique_inputs([InputImage(resolve_uri(r.uri, base), r.label) for r in rows])
    refused = []

    def unreadable_folder(error: OSError):
        refused.append(listing_dead_letter(str(error.filename or source), "unreadable",
                                           f"folder not listed: {error.strerror or error}"))

    if any(c in source for c in "*?["):
        paths = storage.glob(source, on_error=unreadable_folder)
    else:
        if not storage.is_gcs(source) and not os.path.isdir(source):
            raise FileNotFoundError(f"{source}: no such folder or listing")
        paths = storage.list_files(source, on_error=unreadable_folder)
    paths = [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)]
    refused += [listing_dead_letter(p, "undecodable_name", "the file name is not UTF-8; rename the file to index it")
                for p in paths if not is_text(p)]
    label = (lambda p: os.path.basename(os.path.dirname(p))) if label_from_folder else (lambda p: None)
    return [InputImage(p, label(p)) for p in paths if is_text(p)], refused


def list_stamped(source: str, label_from_folder: bool = False, stat_objects: bool = True
                 ) -> tuple[list[tuple[str, str | None, str | None]], list[dict]]:
    """What every build lists: ((uri, label, stamp) of each unique image of the source, dead
    letters of what it refused: uris listed again, names that are not UTF-8, files it cannot stat). The stamp is ``storage.stamp``'s change marker: from one
    bucket listing for gs:// folders and globs, a stat per local file, a request per gs:// object
    named by a listing CSV (only with ``stat_objects``: a build that extracts everything skips
    them, and the next incremental run reads those images to check them), and None for http(s)
    URLs, which are taken as immutable."""
    images, refused = list_source(source, label_from_folder)
    bulk = {}
    if storage.is_gcs(source) and not source.lower().endswith(LISTING_EXTENSIONS):
        wildcard = min((source.find(c) for c in "*?[" if c in source), default=-1)
        bulk = storage.stamps_under(source if wildcard < 0 else source[:wildcard].rsplit("/", 1)[0])
    out = []
    for image in images:
        if is_url(image.uri) or (storage.is_gcs(image.uri) and image.uri not in bulk and not stat_objects):
            stamp = None
        else:
            try:
                stamp = bulk.get(image.uri) or storage.stamp(image.uri)
            except OSError as e:  # a link loop, a name too long, permission denied: this file only
                refused.append(listing_dead_letter(image.uri, "unreadable", f"cannot stat: {e.strerror or e}"))
                continue
        out.append((image.uri, image.label, stamp))
    return out, refused


def is_url(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    """How inputs are read: ``timeout`` is the whole of one http(s) attempt (connect, headers and
    body together) and each gs:// request; transient failures are retried ``retries`` times with
    exponential ``backoff``; one request per ``host_interval`` seconds to a host, per worker; at
    most ``max_bytes`` from any source."""

    timeout: float = 20.0
    retries: int = 3
    backoff: float = 1.0
    host_interval: float = 0.1
    max_bytes: int = DEFAULT_MAX_BYTES
    user_agent: str = "delf-retrieval-indexer/0.1"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> "FetchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


class FetchError(Exception):
    """An http(s) image could not be fetched after the retries; ``reason`` is 'fetch_failed'."""

    reason = "fetch_failed"


class FetchRefused(FetchError):
    """A URL that is never fetched (credentials in it, a redirect off http(s)): not retried."""


def check_url(url: str) -> None:
    """Refuse what is never fetched: schemes other than http(s), and URLs carrying credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchRefused(f"{url}: only http(s) is fetched")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused(f"{parts.scheme}://{parts.hostname}...: a URL carrying credentials is refused")


class _Deadline:
    """The end of one attempt: when it passes, every socket of the attempt is shut down, so a read
    blocked on a server that drips returns at once, whatever it was waiting for."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            shut(sock)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


def shut(sock: socket.socket) -> None:
    """Shut a socket down both ways, so a read blocked on it returns (a closed one is let be)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched(connection_class):
    """An http.client connection class whose sockets the attempt's deadline watches from creation
    (so the TLS handshake, headers and body are all bounded by it)."""

    class Watched(connection_class):
        def __init__(self, *args, deadline: _Deadline, **kwargs):
            super().__init__(*args, **kwargs)
            create = self._create_connection

            def create_and_watch(*a, **kw):
                sock = create(*a, **kw)
                deadline.watch(sock)
                return sock

            self._create_connection = create_and_watch

    return Watched


_WatchedHTTP = _watched(http.client.HTTPConnection)
_WatchedHTTPS = _watched(http.client.HTTPSConnection)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTP, deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPS, deadline=self.deadline), req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects to http(s) only, never to a URL carrying credentials, at most MAX_REDIRECTS."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check_url(newurl)
        except FetchRefused as e:
            raise FetchRefused(f"{req.full_url}: redirect refused: {e}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Fetcher:
    """http(s) GETs under a :class:`FetchConfig`: a total deadline per attempt, retries with
    exponential backoff on transient failures (timeouts, connection errors, 429 and 5xx), at most
    one request per ``host_interval`` seconds to any one host from this process (politeness towards
    photo hosts), redirects to http(s) only, and a cap on the bytes taken."""

    def __init__(self, config: FetchConfig = FetchConfig()):
        self.config = config
        self._next_slot: dict[str, float] = {}
        self._lock = threading.Lock()

    def _wait_for_host(self, host: str) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot.get(host, 0.0))
            self._next_slot[host] = slot + self.config.host_interval
        if slot > now:
            time.sleep(slot - now)

    def _attempt(self, url: str, timeout: float) -> bytes:
        c = self.config
        with _Deadline(timeout) as deadline:
            opener = urllib.request.OpenerDirector()
            for handler in (urllib.request.ProxyHandler(), _HTTPHandler(deadline), _HTTPSHandler(deadline),
                            _RedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                            urllib.request.HTTPErrorProcessor()):
                opener.add_handler(handler)
            request = urllib.request.Request(url, headers={"User-Agent": c.user_agent})
            try:
                with opener.open(request, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    if length and length.isdigit() and int(length) > c.max_bytes:
                        raise FetchRefused(f"{url}: {length} bytes exceeds the limit of {c.max_bytes}")
                    data = response.read(c.max_bytes + 1)
            except (OSError, http.client.HTTPException) as e:
                if deadline.expired and not isinstance(e, urllib.error.HTTPError):
                    raise TimeoutError(f"no complete answer within {timeout:g} s") from e
                raise
            if deadline.expired:  # the body may end early without an error once its socket is shut
                raise TimeoutError(f"no complete answer within {timeout:g} s")
        if len(data) > c.max_bytes:
            raise FetchRefused(f"{url}: larger than {c.max_bytes} bytes")
        return data

    def fetch(self, url: str, until: float | None = None) -> bytes:
        """The body at ``url``; ``until`` (a time.monotonic() instant, a caller's own deadline) also
        bounds every attempt and ends the retries."""
        check_url(url)
        host = urllib.parse.urlsplit(url).netloc
        last_error = "no attempt"
        for attempt in range(self.config.retries + 1):
            if attempt:
                pause = self.config.backoff * 2 ** (attempt - 1)
                if until is not None and time.monotonic() + pause >= until:
                    last_error += "; no time left for another attempt"
                    break
                time.sleep(pause)
            self._wait_for_host(host)
            timeout = self.config.timeout if until is None else min(self.config.timeout, until - time.monotonic())
            if timeout <= 0:
                last_error += "; no time left for another attempt"
                break
            try:
                return self._attempt(url, timeout)
            except FetchRefused:
                raise
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    break  # 404, 403...: retrying will not help
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
                last_error = str(getattr(e, "reason", e)) or type(e).__name__
        raise FetchError(f"{url}: {last_error} (after {attempt + 1} attempts)")


def read_image_bytes(uri: str, fetcher: Fetcher | None = None, until: float | None = None) -> bytes:
    """The encoded bytes of an image at a local path, gs:// uri or http(s) URL, bounded in time and
    size by the fetcher's :class:`FetchConfig` (an oversized input is ``ImageTooLargeError``, a
    missing or non-regular file ``UnreadableImageError``); ``until`` (time.monotonic()) is a
    caller's deadline, which bounds the reading too."""

    fetcher = fetcher or Fetcher()
    if is_url(uri):
        return fetcher.fetch(uri, until)
    if "://" in uri and not storage.is_gcs(uri):
        raise images.UnreadableImageError(f"{uri}: not a local path, gs:// uri or http(s) URL")
    timeout = fetcher.config.timeout if until is None else max(0.1, min(fetcher.config.timeout,
                                                                           until - time.monotonic()))
    try:
        return storage.read_bounded(uri, fetcher.config.max_bytes, timeout)
    except storage.TooLarge as e:
        raise images.ImageTooLargeError(str(e)) from e
    except OSError as e:
        raise images.UnreadableImageError(f"{uri}: cannot read: {e.strerror or e}") from e


def read_image(uri: str, fetcher: Fetcher | None = None):
    """The decoded RGB image (H, W, 3) uint8 at a local path, gs:// uri or http(s) URL."""

    return images.decode_image(read_image_bytes(uri, fetcher), name=uri)
