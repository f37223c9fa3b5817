"""What goes into an index: listing a corpus (folder, glob or Google-Landmarks CSV), stable image ids,
and reading an image's bytes from disk, gs:// or http(s) (timeouts, retries, per-host politeness)."""

from __future__ import annotations

import csv
import hashlib
import io
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple

from delf_retrieval import storage

CSV_URL_COLUMNS = ("url", "path", "uri", "path_or_url")
CSV_LABEL_COLUMNS = ("landmark_id", "label", "landmark")


class InputImage(NamedTuple):
    """One image to index (a tuple, so Beam encodes it deterministically without pickling)."""

    uri: str
    label: str | None = None


def image_id(uri: str) -> int:
    """A stable 63-bit id from the uri: re-runs and parallel workers agree without coordination.
    The chance of any collision is n^2 / 2^64: 5e-8 for a million images."""
    return int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big") >> 1


def parse_csv(text: str) -> list[InputImage]:
    """Rows of a listing CSV: ``id,url,landmark_id`` as Google-Landmarks ships it, ``path_or_url,label``,
    or one uri per line. A header row names the columns; without one, the first column is the uri
    (when there are two) or the second (when there are three: id,url,label)."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(cell.strip() for cell in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    url_col = next((header.index(c) for c in CSV_URL_COLUMNS if c in header), None)
    if url_col is not None:
        label_col = next((header.index(c) for c in CSV_LABEL_COLUMNS if c in header), None)
        rows = rows[1:]
    else:
        width = len(rows[0])
        url_col, label_col = (1, 2) if width >= 3 else (0, 1 if width == 2 else None)
    images = []
    for line, row in enumerate(rows, start=2 if url_col is not None else 1):
        if len(row) <= url_col:
            raise ValueError(f"listing row {line} has no uri column: {row}")
        label = row[label_col].strip() if label_col is not None and len(row) > label_col else None
        images.append(InputImage(row[url_col].strip(), label or None))
    return images


def is_url(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class FetchError(Exception):
    """An http(s) image could not be fetched after the retries; ``reason`` is 'fetch_failed'."""

    reason = "fetch_failed"


class Fetcher:
    """http(s) GETs with a timeout, retries with exponential backoff on transient failures (timeouts,
    connection errors, 429 and 5xx), and at most one request per ``host_interval`` seconds to
    any one host from this process (politeness towards photo hosts)."""

    def __init__(self, timeout: float = 20.0, retries: int = 3, backoff: float = 1.0, host_interval: float = 0.1,
                 max_bytes: int = 64 << 20, user_agent: str = "delf-retrieval-indexer/0.1"):
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.host_interval, self.max_bytes, self.user_agent = host_interval, max_bytes, user_agent
        self._next_slot: dict[str, float] = {}
        self._lock = threading.Lock()

    def _wait_for_host(self, host: str) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot.get(host, 0.0))
            self._next_slot[host] = slot + self.host_interval
        if slot > now:
            time.sleep(slot - now)

    def fetch(self, url: str) -> bytes:
        host = urllib.parse.urlsplit(url).netloc
        last_error = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self._wait_for_host(host)
            request = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = response.read(self.max_bytes + 1)
                if len(data) > self.max_bytes:
                    raise FetchError(f"{url}: larger than {self.max_bytes} bytes")
                return data
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code}"
                if e.code != 429 and e.code < 500:
                    break  # 404, 403...: retrying will not help
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last_error = str(getattr(e, "reason", e))
        raise FetchError(f"{url}: {last_error} (after {attempt + 1} attempts)")


def read_image_bytes(uri: str, fetcher: Fetcher | None = None) -> bytes:
    """The encoded bytes of an image at a local path, gs:// uri or http(s) URL."""
    if is_url(uri):
        return (fetcher or Fetcher()).fetch(uri)
    return storage.read_bytes(uri)


def read_image(uri: str, fetcher: Fetcher | None = None):
    """The decoded RGB image (H, W, 3) uint8 at a local path, gs:// uri or http(s) URL."""
    from delf_retrieval import images

    return images.decode_image(read_image_bytes(uri, fetcher), name=uri)
