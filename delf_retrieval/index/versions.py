"""Index versions under one root: immutable build folders with their own manifests, the root
``manifest.json`` as the pointer to the current one (replaced by compare-and-swap, only after the new
version is verified), retention of old versions, rollback, and the lock that keeps runs apart.

Layout of a versioned root::

    manifest.json                   the pointer: the current version's manifest with its paths
                                    prefixed by builds/<id>/, so a reader of ROOT reads it as is
    builds/<id>/manifest.json       each version's own manifest (paths relative to its folder), so
                                    builds/<id> is itself a complete index
    builds/<id>/...                 its files; never modified after its manifest is written
    segments/<id>/...               immutable segments that format-2 versions list (segments.py);
                                    deleted once no kept version lists them
    codebooks/<id>/...              the PCA + quantizer of a training build, which the format-2
                                    versions encoding with them list; deleted likewise
    reindex.lock                    while a run holds the lock: owner, host, pid, start, expiry
    reports/<id>.json               one report per re-index run
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import uuid

from delf_retrieval import storage
from delf_retrieval.index import layout, segments

LOCK_FILE = "reindex.lock"
REPORTS_DIR = "reports"


class PublishConflict(layout.IndexStorageError):
    """The pointer changed since the run read it: another run published first; this one must not."""


class LockHeld(Exception):
    """Another run holds the lock (and it has not expired); ``path`` is the lock file."""

    def __init__(self, record: dict | None, path: str = LOCK_FILE, unreadable_until: float | None = None):
        self.record = record or {}
        self.path = path
        if unreadable_until is not None:
            until = datetime.datetime.fromtimestamp(unreadable_until, datetime.timezone.utc).isoformat(timespec="seconds")
            message = (f"the lock {path} is unreadable (not a lock record); it is taken as held until {until} "
                       "(its modification time + the lock's TTL)")
        else:
            message = f"another run holds the lock {path}: {json.dumps(self.record, sort_keys=True)}"
        super().__init__(message)


def build_folder(build: str) -> str:
    """``builds/<id>`` from an id or a folder name."""
    return build if build.startswith(layout.BUILDS_DIR + "/") else f"{layout.BUILDS_DIR}/{build}"


def _with_paths(manifest: dict, change) -> dict:
    out = json.loads(json.dumps(manifest))
    # A segmented version's segments are named from the root already: they are shared, not its own.
    for record in list(out["files"].values()) + out.get("shards", []):
        record["path"] = change(record["path"])
    return out


def pointer_from_version(manifest: dict, build: str) -> dict:
    """The root pointer for a version: its manifest with paths relative to the root."""
    folder = build_folder(build)
    return {**_with_paths(manifest, lambda p: f"{folder}/{p}"), "build": folder}


def current(root: str) -> tuple[dict | None, str | None]:
    """(pointer manifest, token) of the published version; (None, None) if nothing is published.
    Pass the token to :func:`publish` so it only replaces the version this run started from."""
    data, token = storage.read_with_token(storage.join(root, layout.MANIFEST))
    if data is None:
        return None, None
    layout.read_manifest(root)  # format checks
    return json.loads(data), token


def read_version(root: str, build: str) -> dict:
    return layout.read_manifest(storage.join(root, build_folder(build)))


def version_ids(root: str) -> tuple[list[str], list[str]]:
    """(complete, incomplete) build folders under root, oldest first (ids sort by launch time).
    Complete ones hold their own manifest; incomplete ones are runs that never finished."""
    prefix = storage.join(root, layout.BUILDS_DIR)
    files: dict[str, set] = {}
    for path in storage.list_files(prefix):
        parts = storage.relative(path, root).replace(os.sep, "/").split("/")
        if len(parts) >= 3:
            files.setdefault(f"{parts[0]}/{parts[1]}", set()).add("/".join(parts[2:]))
    complete = sorted(b for b, names in files.items() if layout.MANIFEST in names)
    return complete, sorted(set(files) - set(complete))


def publish(root: str, build: str, manifest: dict, expected_token: str | None, deep: set[str] | None = None) -> dict:
    """Make ``build`` (its files already written) the current version: write its own manifest,
    verify every file against it, then replace the pointer, only if the pointer is still the one
    ``expected_token`` names (None: nothing published yet). Returns the pointer manifest. Every
    writer (``pipeline.run`` and ``pipeline.reindex``) passes the token it read under the lock.
    ``deep``: of a version of segments, those the run wrote, which are read byte for byte; the
    segments it shares with earlier versions were verified by the run that wrote them and are
    checked against their recorded checksums and sizes only (None: every byte is read)."""
    folder = build_folder(build)
    before, token = current(root)
    if before and before.get("build") == folder:
        return before  # already published (a retried publish step): nothing to do
    previous = before.get("build") if before else None
    version = {**manifest, "previous": previous}
    layout.write_manifest(storage.join(root, folder), version)
    segments.verify(storage.join(root, folder), deep)
    pointer = pointer_from_version(version, folder)
    if token != expected_token:
        raise PublishConflict(f"{root}: the current version changed while this run worked (now {previous}); "
                              "not publishing")
    _swap_pointer(root, pointer, token, "while this one was publishing")
    return pointer


def _swap_pointer(root: str, pointer: dict, token, during: str) -> None:
    """Replace the root pointer only if it is still the one read with ``token`` (compare-and-swap)."""
    try:
        storage.write_bytes_if(storage.join(root, layout.MANIFEST),
                               json.dumps(pointer, indent=1, sort_keys=True).encode(), token)
    except storage.PreconditionFailed as e:
        raise PublishConflict(f"{root}: another run published {during}") from e


def rollback(root: str, to: str | None = None) -> dict:
    """Re-point to the version the current one replaced (or to ``to``), verified first. The
    restored pointer names its own predecessor, so rolling back again goes one further back."""
    pointer, token = current(root)
    if pointer is None:
        raise layout.ManifestError(f"{root} has no published version to roll back from")
    target = build_folder(to) if to else pointer.get("previous")
    if not target:
        raise layout.ManifestError(f"{root}: the current version records no previous one")
    complete, _ = version_ids(root)
    if target not in complete:
        raise layout.ManifestError(f"{root}: version {target} is no longer kept (see --keep)")
    version = segments.verify(storage.join(root, target))
    restored = pointer_from_version(version, target)
    _swap_pointer(root, restored, token, "during the rollback")
    return restored


def prune(root: str, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete versions beyond the current one and the ``keep`` newest others, and folders of runs
    that never finished, except ``protect``ed ones. Call it only while holding the lock (or from
    the only writer): an unfinished folder of a live run would go too. Returns what it deleted."""
    pointer, _ = current(root)
    serving = pointer.get("build") if pointer else None
    # The version the current one replaced always stays (readers may still be on it, and an index
    # published before versions had their own manifests has no other mark of completeness).
    previous = pointer.get("previous") if pointer else None
    kept = {b for b in (serving, previous) if b} | {build_folder(b) for b in protect}
    complete, incomplete = version_ids(root)
    others = [b for b in complete if b != serving and b not in protect]
    doomed = [b for b in others[:max(len(others) - keep, 0)] if b not in kept]
    doomed += [b for b in incomplete if b not in kept]
    for folder in doomed:
        storage.delete_tree(storage.join(root, folder))
    return doomed + prune_segments(root)


def segment_folders(root: str, kind: str = segments.SEGMENTS_DIR) -> list[str]:
    """``segments/<id>`` folders under root (each an immutable segment, or one a run left
    unfinished); with ``kind`` ``models``, the shared model folders."""
    found = set()
    for path in storage.list_files(storage.join(root, kind)):
        parts = storage.relative(path, root).replace(os.sep, "/").split("/")
        if len(parts) >= 3:
            found.add(f"{parts[0]}/{parts[1]}")
    return sorted(found)


def _shared_folders(manifest: dict) -> set[str]:
    """The segment and model folders a manifest references."""
    folders = {ref.folder for ref in segments.segment_refs(manifest)}
    if segments.is_segmented(manifest):
        folders |= {record["path"].rsplit("/", 1)[0] for record in manifest["codebooks"].values()}
    return folders


def prune_segments(root: str) -> list[str]:
    """Delete the segments and models no kept version (nor the pointer) references; returns their
    folders. A kept version whose manifest cannot be read might reference any, so then none is
    deleted. The same caution as :func:`prune`: a live run's segment is referenced only once it
    publishes."""
    folders = segment_folders(root) + segment_folders(root, segments.CODEBOOKS_DIR)
    if not folders:
        return []
    pointer, _ = current(root)
    referenced = _shared_folders(pointer or {})
    for build in version_ids(root)[0]:
        try:
            manifest = read_version(root, build)
        except layout.ManifestError:
            return []
        referenced |= _shared_folders(manifest)
    doomed = [f for f in folders if f not in referenced]
    for folder in doomed:
        storage.delete_tree(storage.join(root, folder))
    return doomed


# ---------------------------------------------------------------------------------------------
# The run lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_record(data: bytes) -> dict | None:
    """The lock file's record, or None if it is not one (not JSON, not an object, no numeric expiry)."""
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("expires"), (int, float)):
        return None
    pid = record.get("pid")
    if pid is not None and not isinstance(pid, int):
        return None
    return record


def lock_is_stale(record: dict | None, now: float | None = None) -> bool:
    """Expired, or taken on this host by a process that no longer exists (a killed local run)."""
    if not record:
        return False
    now = time.time() if now is None else now
    if record.get("expires", float("inf")) < now:
        return True
    pid = record.get("pid")
    return bool(pid) and record.get("host") == socket.gethostname() and not _pid_alive(int(pid))


def break_lock(root: str) -> dict | None:
    """Remove ``ROOT/reindex.lock`` on purpose, whatever holds it (``--break-lock``); returns what it
    held (``{}`` for an unreadable record), or None if there was no lock."""
    path = storage.join(root, LOCK_FILE)
    data, token = storage.read_with_token(path)
    if data is None:
        return None
    try:
        storage.delete_if(path, token)
    except storage.PreconditionFailed:
        return break_lock(root)  # replaced meanwhile: break what is there now
    return lock_record(data) or {}


class RunLock:
    """``ROOT/reindex.lock``, created only if absent (O_EXCL-like locally under a flock guard; a
    GCS precondition ``if_generation_match=0`` on gs://) with owner, host, pid, start and expiry.
    A lock past its expiry, or held by a dead process on this host, is broken by a conditional
    delete, so two runs that find the same stale lock cannot both take it.

    ``pid`` is recorded only for runs whose process lives as long as the run (local runners); a
    job submitted to Dataflow is released by its publish step, or expires after ``ttl_seconds``.
    """

    def __init__(self, root: str, ttl_seconds: float, owner: str | None = None, track_pid: bool = True):
        self.path = storage.join(root, LOCK_FILE)
        self.ttl_seconds = ttl_seconds
        self.owner = owner or uuid.uuid4().hex
        self.track_pid = track_pid
        self.token: str | None = None
        self.broke: dict | None = None

    def record(self) -> dict:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid() if self.track_pid else None,
                "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
                "expires": now + self.ttl_seconds}

    def acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                self.token = storage.write_bytes_if(self.path, json.dumps(self.record()).encode(), None)
                return self
            except storage.PreconditionFailed:
                pass
            data, token = storage.read_with_token(self.path)
            if data is None:
                continue  # released meanwhile: try again
            held = lock_record(data)
            if held is None:  # unreadable (a torn or foreign write): stale once older than the TTL
                modified = storage.modified(self.path) or time.time()
                if modified + self.ttl_seconds >= time.time():
                    raise LockHeld(None, self.path, unreadable_until=modified + self.ttl_seconds)
                held = {"unreadable": data[:200].decode("utf-8", "replace")}
            elif not lock_is_stale(held):
                raise LockHeld(held, self.path)
            try:
                storage.delete_if(self.path, token)
                self.broke = held
            except storage.PreconditionFailed:
                pass  # someone else broke or renewed it: look again
        raise LockHeld(None, self.path)

    def still_held(self) -> bool:
        """Whether the lock file still names this run (a job's publish step releases it itself)."""
        data, _ = storage.read_with_token(self.path)
        try:
            return data is not None and json.loads(data).get("owner") == self.owner
        except (ValueError, AttributeError):
            return False

    def release(self) -> bool:
        """Delete the lock if it is still this run's; False if it was not (broken by another run)."""
        return release_lock(self.path, self.owner)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def release_lock(path: str, owner: str) -> bool:
    """Delete the lock file at ``path`` if ``owner`` holds it (from any process: a job's last step)."""
    data, token = storage.read_with_token(path)
    if data is None:
        return False
    try:
        if json.loads(data).get("owner") != owner:
            return False
    except ValueError:
        return False
    try:
        storage.delete_if(path, token)
    except storage.PreconditionFailed:
        return False
    return True


def discard_failed_run(root: str, build_id: str, keep_dead_letters: bool = False) -> list[str]:
    """Remove what a run that failed wrote (a full disk, a conflict, an error), so that the next run
    starts from a clean root without anyone's help: its version folder, unless the pointer names it
    (it published before failing), and every segment and model folder no kept version references.
    ``keep_dead_letters``: a build refused for its rejects keeps its folder (the dead-letter table
    its error names; the next run's pruning removes it). Call it only while holding the lock.
    Returns what it deleted; a cleanup that fails itself is left to the next run's pruning."""
    folder = build_folder(build_id)
    try:
        pointer, _ = current(root)
        if pointer and folder in (pointer.get("build"), pointer.get("previous")):
            return []
        gone = []
        if not keep_dead_letters:
            storage.delete_tree(storage.join(root, folder))
            gone.append(folder)
        return gone + prune_segments(root)
    except (OSError, layout.IndexStorageError):
        return []
