"""The version a long-running server answers from: it follows an index root's pointer, opens and
checks each newly published version beside the serving one, then switches to it; a version that
fails to open is logged and never served, and the serving one stays."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections import OrderedDict

import numpy as np

from delf_retrieval import storage
from delf_retrieval.index import layout
from delf_retrieval.query import engine as engine_lib

log = logging.getLogger("delf_retrieval.query.live")

FAILED_VERSIONS_KEPT = 64  # damaged versions remembered (so each is opened once, not at every poll)


class LiveIndex:
    """Holds the serving :class:`~delf_retrieval.query.engine.Engine` of ``root`` and replaces it when a
    new version is published. A request takes :attr:`engine` once and answers with it to the end,
    so queries in flight finish on the version they started with; the old version is freed when
    the last of them is done.

    A version that is damaged or does not answer as an index (``layout.IndexStorageError``,
    ``ValueError``: a file that does not match its checksum, a failed probe) is remembered and not
    opened again: versions never change once published. Any other failure (storage unreachable)
    is tried again at the next poll. :attr:`outcomes` counts the versions opened ("switched"),
    refused ("failed") and put off ("retry")."""

    def __init__(self, root: str, config: engine_lib.EngineConfig = engine_lib.EngineConfig(),
                 interval: float = 60.0):
        self.root = root
        self.config = config
        self.interval = interval
        self.outcomes: collections.Counter = collections.Counter()
        self._engine: engine_lib.Engine | None = None
        self._failed: OrderedDict[str, str] = OrderedDict()
        self.last_error: str | None = None
        self.last_poll: float | None = None
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def engine(self) -> engine_lib.Engine | None:
        """The serving engine (None until a version has been opened)."""
        return self._engine

    def failed(self) -> dict[str, str]:
        return dict(self._failed)

    def _extractor_for(self, version: engine_lib.Version):
        """The serving network when the new version was built with the same one; else None (load it)."""
        serving = self._engine
        if serving is not None and engine_lib.network_key(serving.manifest) == engine_lib.network_key(version.manifest):
            return serving.extractor
        return None

    def poll(self) -> str:
        """Look at the pointer once and act: "unchanged", "switched", "failed" (a damaged version,
        not served), "retry" (could not read or open it now), or "none" (nothing published)."""
        with self._poll_lock:
            self.last_poll = time.time()
            try:
                if not storage.exists(storage.join(self.root, layout.MANIFEST)):
                    self.last_error = f"{self.root}: no version is published yet"
                    return "none"
                version = engine_lib.published(self.root)
            except Exception as e:  # noqa: BLE001 - an unreachable root: keep serving, read it again next time
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("cannot read the pointer of %s: %s", self.root, self.last_error)
                return "retry"
            serving = self._engine
            if serving is not None and serving.version == version:
                return "unchanged"
            if version.name in self._failed:
                return "failed"
            start = time.perf_counter()
            extractor = self._extractor_for(version)
            try:
                opened = engine_lib.open_engine(version, self.config, extractor=extractor, check=True)
                if extractor is None:
                    warm_up(opened.extractor)
            except (layout.IndexStorageError, ValueError, KeyError) as e:
                reason = f"{type(e).__name__}: {e}"
                self._failed[version.name] = reason
                while len(self._failed) > FAILED_VERSIONS_KEPT:
                    self._failed.popitem(last=False)
                self.last_error = f"version {version.name} not served: {reason}"
                log.error("%s: version %s fails to open and is not served (%s); still serving %s", self.root,
                          version.name, reason, serving.version.name if serving else "nothing")
                self.outcomes["failed"] += 1
                return "failed"
            except Exception as e:  # noqa: BLE001 - storage or memory trouble: try again at the next poll
                self.last_error = f"version {version.name} could not be opened now: {type(e).__name__}: {e}"
                log.warning("%s; still serving %s", self.last_error, serving.version.name if serving else "nothing")
                self.outcomes["retry"] += 1
                return "retry"
            self._engine = opened
            self.last_error = None
            log.info("%s: serving version %s (%d images, %s in memory) after %.1f s to open and check it; was %s",
                     self.root, version.name, opened.manifest["counts"]["images"],
                     "postings held" if opened.resident else "postings read per query",
                     time.perf_counter() - start, serving.version.name if serving else "nothing")
            self.outcomes["switched"] += 1
            return "switched"

    def start(self) -> None:
        """Poll now (the first version is opened in the background) and then every ``interval`` s."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="index-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the follower never dies; the error is in the log
                log.exception("polling %s failed", self.root)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


def warm_up(extractor) -> None:
    """One extraction of a noise image, so the first query does not pay for tracing the network."""
    rng = np.random.default_rng(0)
    extractor.extract(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
