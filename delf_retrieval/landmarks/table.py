"""The landmarks of an index version: the per-image table, the per-landmark summary and ground truth,
their files beside the index (landmarks.json, written last, names the version), and stable ids."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delf_retrieval import storage
from delf_retrieval.corpus import gps
from delf_retrieval.index import layout
from delf_retrieval.index.neighbour_table import NeighbourTable
from delf_retrieval.landmarks import clustering
from delf_retrieval.landmarks.clustering import NONE, ClusterConfig

FORMAT_VERSION = 1
MANIFEST = "landmarks.json"  # at the index root: the version the landmarks belong to, its files
FOLDER = "landmarks"  # landmarks/<index id>/: the files of that version's landmarks
TABLE_FILE = "landmarks.parquet"
SUMMARY_FILE = "summary.json"
GROUND_TRUTH_FILE = "ground_truth.json"
SCHEMA = pa.schema([("uri", pa.string()), ("image_id", pa.int64()), ("landmark", pa.int64()),
                    ("score", pa.float64())])


@dataclass
class Landmarks:
    """One row per live image (``landmark`` NONE when in none; ``score`` the inliers of its strongest
    kept edge inside its landmark), and one summary per landmark id."""

    uris: list
    image_ids: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    summary: list = field(default_factory=list)
    next_id: int = 0  # the first id never used: ids of vanished landmarks are not given again
    config: dict = field(default_factory=dict)

    def to_table(self) -> pa.Table:
        return pa.Table.from_arrays([pa.array(self.uris, pa.string()), pa.array(self.image_ids, pa.int64()),
                                     pa.array(self.landmarks, pa.int64()), pa.array(self.scores, pa.float64())],
                                    schema=SCHEMA)

    def of(self) -> dict[int, int]:
        """image id -> landmark id, for the images in a landmark."""
        inside = self.landmarks >= 0
        return dict(zip(self.image_ids[inside].tolist(), self.landmarks[inside].tolist()))

    def ground_truth(self) -> dict:
        """``pipeline.evaluate``'s ground truth: each image in a landmark queries, the other images of
        its landmark are its positives."""
        members: dict[int, list] = {}
        for uri, landmark in zip(self.uris, self.landmarks.tolist()):
            if landmark >= 0:
                members.setdefault(landmark, []).append(uri)
        return {"queries": [{"query": uri, "positives": [u for u in members[landmark] if u != uri], "junk": []}
                            for uri, landmark in zip(self.uris, self.landmarks.tolist()) if landmark >= 0]}


def find(images: pa.Table, neighbours: NeighbourTable, config: ClusterConfig = ClusterConfig(),
         previous: "Landmarks | None" = None) -> Landmarks:
    """The landmarks of a version from its live image table (GPS columns optional) and its verified
    neighbour table; with ``previous`` (the last run's), landmarks that persist keep their ids."""
    ids = images.column("image_id").to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    every_uri = images.column("uri").to_pylist()
    uris = [every_uri[i] for i in order]
    lat, lon = (np.full(len(ids), np.nan), np.full(len(ids), np.nan))
    if "latitude" in images.schema.names and "longitude" in images.schema.names:
        lat = np.asarray(images.column("latitude").to_numpy(zero_copy_only=False), np.float64)[order]
        lon = np.asarray(images.column("longitude").to_numpy(zero_copy_only=False), np.float64)[order]
    a = np.searchsorted(ids, neighbours.image_ids)
    b = np.searchsorted(ids, neighbours.neighbours)
    live = (a < len(ids)) & (b < len(ids))
    live[live] = (ids[a[live]] == neighbours.image_ids[live]) & (ids[b[live]] == neighbours.neighbours[live])
    result = clustering.cluster(len(ids), a[live], b[live], neighbours.inliers[live], lat, lon, config)
    labels, next_id = stable_ids(ids, result.labels, previous)
    a_kept, b_kept, w_kept = result.edges
    found = Landmarks(uris, ids, labels, result.scores.astype(np.float64), next_id=next_id, config=config.to_json())
    found.summary = summaries(found, result.labels, labels, (a_kept, b_kept, w_kept), lat, lon)
    return found


def stable_ids(image_ids: np.ndarray, labels: np.ndarray, previous: "Landmarks | None") -> tuple[np.ndarray, int]:
    """The clustering's labels (0..k-1) as landmark ids: a landmark takes the previous id that most of
    its previously clustered images had, if they are more than half of them and no larger landmark
    took that id first; the others take new ids from the previous ``next_id``. Returns (ids, next id)."""
    out = np.full(len(labels), NONE, np.int64)
    count = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    start = previous.next_id if previous is not None else 0
    taken: set = set()
    assigned = np.full(count, NONE, np.int64)
    if previous is not None and count:
        before = previous.of()
        old = np.array([before.get(int(i), NONE) for i in image_ids], np.int64)
        pairs: dict[tuple, int] = {}
        known = np.zeros(count, np.int64)
        for label, was in zip(labels.tolist(), old.tolist()):
            if label >= 0 and was >= 0:
                pairs[(label, was)] = pairs.get((label, was), 0) + 1
                known[label] += 1
        for (label, was), overlap in sorted(pairs.items(), key=lambda p: (-p[1], p[0])):
            if assigned[label] < 0 and was not in taken and 2 * overlap > known[label]:
                assigned[label] = was
                taken.add(was)
        start = max(start, max(taken, default=-1) + 1)
    for label in range(count):
        if assigned[label] < 0:
            assigned[label] = start
            start += 1
    inside = labels >= 0
    out[inside] = assigned[labels[inside]]
    return out, start


def summaries(found: Landmarks, labels: np.ndarray, ids: np.ndarray, edges, lat, lon) -> list[dict]:
    """Per landmark: id, size, representative (best connected member), GPS centre and radius (km,
    the farthest geotagged member from the centre) when any member is geotagged, members' uris."""
    representatives = clustering.representatives(labels, *edges)
    out = []
    for label, rep in enumerate(representatives.tolist()):
        members = np.flatnonzero(labels == label)
        record = {"landmark": int(ids[rep]), "size": int(len(members)), "representative": found.uris[rep],
                  "representative_id": int(found.image_ids[rep]), "members": [found.uris[m] for m in members],
                  "latitude": None, "longitude": None, "radius_km": None, "geotagged": 0}
        tagged = members[np.isfinite(lat[members]) & np.isfinite(lon[members])]
        if len(tagged):
            centre = _centre(lat[tagged], lon[tagged])
            record.update(latitude=round(centre[0], 6), longitude=round(centre[1], 6), geotagged=int(len(tagged)),
                          radius_km=round(float(gps.distance_km(centre[0], centre[1], lat[tagged], lon[tagged]).max()), 3))
        out.append(record)
    return sorted(out, key=lambda r: r["landmark"])


def _centre(lat: np.ndarray, lon: np.ndarray) -> tuple[float, float]:
    """The mean position on the sphere (3-D mean of unit vectors, back to degrees)."""
    la, lo = np.radians(lat), np.radians(lon)
    x, y, z = np.mean(np.cos(la) * np.cos(lo)), np.mean(np.cos(la) * np.sin(lo)), np.mean(np.sin(la))
    return float(np.degrees(np.arctan2(z, np.hypot(x, y)))), float(np.degrees(np.arctan2(y, x)))


def payloads(found: Landmarks) -> dict[str, bytes]:
    """The files of a version's landmarks: the table (Parquet), the summary and the ground truth (JSON)."""
    table = io.BytesIO()
    pq.write_table(found.to_table(), table, compression="zstd")
    summary = {"format_version": FORMAT_VERSION, "landmarks": len(found.summary), "images": len(found.uris),
               "clustered": int((found.landmarks >= 0).sum()), "next_id": found.next_id, "config": found.config,
               "summary": found.summary}
    return {TABLE_FILE: table.getvalue(), SUMMARY_FILE: json.dumps(summary, indent=1).encode(),
            GROUND_TRUTH_FILE: json.dumps(found.ground_truth(), indent=1).encode()}


def write_file(root: str, index_id: str, name: str, payload: bytes) -> dict:
    """Write one file of a version's landmarks under landmarks/<index id>/; its record (path from
    the root, bytes, SHA-256)."""
    relative = f"{FOLDER}/{index_id}/{name}"
    storage.write_bytes(storage.join(root, relative), payload)
    return {"path": relative, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def save(root: str, index_id: str, found: Landmarks, written: dict | None = None) -> dict:
    """Write a version's landmarks beside its index under landmarks/<index id>/, then landmarks.json
    naming the version and listing the files (with ``written``: files already written there, such
    as contact sheets, by name -> record), last. Landmarks of other versions are then removed."""
    files = {name: write_file(root, index_id, name, payload) for name, payload in payloads(found).items()}
    files.update(written or {})
    record = {"format_version": FORMAT_VERSION, "index_id": index_id, "landmarks": len(found.summary),
              "images": len(found.uris), "clustered": int((found.landmarks >= 0).sum()), "files": files}
    storage.write_bytes(storage.join(root, MANIFEST), json.dumps(record, indent=1).encode())
    folder = storage.join(root, FOLDER)
    stale = {storage.relative(path, folder).split("/")[0] for path in storage.list_files(folder)} - {index_id}
    for other in sorted(stale):
        storage.delete_tree(storage.join(folder, other))
    return record


def load(root: str, index_id: str | None = None) -> Landmarks | None:
    """The landmarks saved beside the index at ``root``: those of ``index_id`` (None: whichever version
    they were found for), or None when there are none. Files are checked by SHA-256; a damaged or
    foreign file raises ``layout.IndexStorageError`` naming it."""
    path = storage.join(root, MANIFEST)
    if not storage.exists(path):
        return None
    try:
        record = json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise layout.ManifestError(f"{path}: not JSON ({e})") from None
    if not isinstance(record, dict) or (index_id is not None and record.get("index_id") != index_id):
        return None
    if record.get("format_version") != FORMAT_VERSION:
        raise layout.ManifestError(f"{path}: landmarks format {record.get('format_version')}, this code reads {FORMAT_VERSION}")
    try:
        metas = {name: record["files"][name] for name in (TABLE_FILE, SUMMARY_FILE)}
        for name, meta in metas.items():
            layout.resolve(root, meta["path"], f"{MANIFEST} files.{name}.path")
    except (KeyError, TypeError):
        raise layout.ManifestError(f"{path}: no {TABLE_FILE} or {SUMMARY_FILE} listed") from None
    table = layout.read_table(layout.checked_read(root, metas[TABLE_FILE], where=MANIFEST), SCHEMA,
                              metas[TABLE_FILE]["path"], not_null=("uri", "image_id", "landmark"))
    try:
        summary = json.loads(layout.checked_read(root, metas[SUMMARY_FILE], where=MANIFEST))
        landmarks, next_id = list(summary["summary"]), int(summary["next_id"])
    except (ValueError, KeyError, TypeError):
        raise layout.ManifestError(f"{metas[SUMMARY_FILE]['path']}: not a landmarks summary") from None
    scores = table.column("score").to_numpy(zero_copy_only=False)
    return Landmarks(table.column("uri").to_pylist(), table.column("image_id").to_numpy().astype(np.int64),
                     table.column("landmark").to_numpy().astype(np.int64), np.nan_to_num(scores.astype(np.float64)),
                     landmarks, next_id, dict(summary.get("config") or {}))
