"""One index version answering queries: opened and checked, its postings held in memory when they
fit, with the network it was built with; an image in, its ranked matches and the seconds of every
stage out. ``pipeline.search`` (locally) and ``pipeline.serve`` both answer through it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from dataclasses import dataclass

import numpy as np

from delf_retrieval.extraction.extractor import Extractor
from delf_retrieval.first_stage.search import DEFAULT_MIN_IMAGES
from delf_retrieval.index import layout
from delf_retrieval.landmarks import recognition
from delf_retrieval.model import delf
from delf_retrieval.query import retrieval
from delf_retrieval.query.matching import Match
from delf_retrieval.query.retrieval import RetrievalConfig

IMAGE_SHORTLIST_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineConfig:
    """How a version is opened and how its queries are answered unless a request says otherwise."""

    retrieval: RetrievalConfig = RetrievalConfig()
    image_shortlist: str = "auto"  # auto: when the index has one and at least shortlist_min_images images
    shortlist_size: int = 1000
    shortlist_min_images: int = DEFAULT_MIN_IMAGES
    # The postings are held in memory (the reader's load_all) when ``resident`` and their estimate
    # fits in ``max_memory``; otherwise they are read per probe through a row-group cache of that size.
    max_memory: int = 4 << 30
    resident: bool = True

    def __post_init__(self):
        if self.image_shortlist not in IMAGE_SHORTLIST_MODES:
            raise ValueError(f"image_shortlist must be one of {IMAGE_SHORTLIST_MODES}")
        if self.shortlist_size < 1 or self.shortlist_min_images < 0 or self.max_memory < 1:
            raise ValueError("shortlist_size and max_memory must be >= 1, shortlist_min_images >= 0")


class DeadlineExceeded(Exception):
    """A query ran past its deadline; ``stage`` says where it was."""

    def __init__(self, stage: str, seconds: float):
        super().__init__(f"no answer within {seconds:g} s (still {stage})")
        self.stage = stage


class Deadline:
    """The end of a query's time: ``check`` between stages raises DeadlineExceeded once it has passed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, stage: str) -> None:
        if self.remaining() <= 0:
            raise DeadlineExceeded(stage, self.seconds)


@dataclass(frozen=True)
class Version:
    """A published version of an index root, as its pointer named it when read (so the version that
    is opened is the one that was read, whatever is published meanwhile)."""

    root: str
    manifest: dict = dataclasses.field(repr=False, compare=False)
    name: str = ""  # the build id (builds/<id>), or the index id of an index written without versions

    @property
    def index_id(self) -> str:
        return self.manifest["index_id"]


def published(root: str) -> Version:
    """The version the root's pointer names now (``layout.ManifestError`` if none is published)."""
    pointer = layout.read_manifest(root)
    build = pointer.get("build")
    return Version(root, pointer, build.rsplit("/", 1)[-1] if build else pointer["index_id"])


class VersionRejected(ValueError):
    """A version that opened but does not answer as an index must (its own image not found first)."""


@dataclass
class Answer:
    matches: list[Match]
    timings: dict  # seconds per stage: extract, then the search's (shortlist, ann, voting, ransac[, expansion])
    num_descriptors: int
    notes: tuple = ()  # how it was answered, when a user should know (no neighbour table to expand with)
    landmark: recognition.Recognition | None = None  # when the index has landmarks (pipeline.landmarks)


def network_key(manifest: dict) -> str:
    """What decides how queries of an index are extracted: versions with the same key share a network."""
    model = manifest.get("model") or {}
    return json.dumps({"network": model.get("network"), "extraction": model.get("extraction")}, sort_keys=True)


def load_extractor(manifest: dict):
    """The Extractor of the network and settings the index was built with (from its manifest)."""

    model_config, extraction_config = retrieval.index_configs(manifest)
    return Extractor(delf.load(model_config), extraction_config)


_NUMBA_GUARD = threading.Lock()


def _search_guard():
    """Numba's parallel kernels may run in several threads at once except on its workqueue layer
    (which aborts the process on concurrent use): there, searches take turns."""
    import numba  # heavy: imported on first use

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        return _NUMBA_GUARD
    return _NUMBA_GUARD if layer == "workqueue" else contextlib.nullcontext()


class Engine:
    """A version's Retriever and its network: :meth:`answer` is one query, safe to call from
    several threads at once."""

    def __init__(self, version: Version, retriever: retrieval.Retriever, extractor, resident: bool):
        self.version = version
        self.retriever = retriever
        self.extractor = extractor
        self.resident = resident
        self.opened = time.time()
        self.recognizer = recognition.load(version.root)  # None when the index has no landmarks
        ids = retriever.reader.images.column("image_id").to_numpy()
        self._image_order = np.argsort(ids, kind="stable")
        self._sorted_image_ids = ids[self._image_order]

    @property
    def manifest(self) -> dict:
        return self.retriever.reader.manifest

    @property
    def config(self) -> RetrievalConfig:
        return self.retriever.config

    def answer(self, image: np.ndarray, config: RetrievalConfig | None = None,
               deadline: Deadline | None = None) -> Answer:
        """The ranked matches of an RGB image (H, W, 3) uint8, with ``config`` (default: the
        engine's) and the seconds of each stage; ``deadline`` is checked between stages."""
        retriever = self.retriever.with_config(config) if config is not None else self.retriever
        start = time.perf_counter()
        features = self.extractor.extract(image)
        timings = {"extract": time.perf_counter() - start}
        if deadline is not None:
            deadline.check("searching")
        with _search_guard():
            result = retriever.search(features)
        timings.update(result.timings)
        landmark = self.recognizer.recognize(result.matches) if self.recognizer is not None else None
        return Answer(result.matches, timings, result.num_descriptors, result.notes, landmark)

    def image_record(self, image_id: int) -> dict | None:
        """The image table's row of ``image_id`` (None if the version has no such image)."""
        pos = int(np.searchsorted(self._sorted_image_ids, image_id))
        if pos >= len(self._sorted_image_ids) or self._sorted_image_ids[pos] != image_id:
            return None
        return self.retriever.reader.images.slice(int(self._image_order[pos]), 1).to_pylist()[0]

    def info(self) -> dict:
        """What a user asks of the serving version: its name, size and settings."""
        m = self.manifest
        model = m.get("model") or {}
        return {"version": self.version.name, "index_id": m["index_id"], "created": m.get("created"),
                "images": m["counts"]["images"], "descriptors": m["counts"]["descriptors"], "spec": m.get("spec"),
                "preset": model.get("preset"), "backbone": (model.get("network") or {}).get("backbone"),
                "resident": self.resident, "image_shortlist": self.retriever.first_stage is not None,
                "opened": self.opened}

    def probe(self, max_rows: int = 300) -> None:
        """Check that the version answers as an index must: an indexed image's own stored rows
        (decoded codes and keypoints, as the neighbour stage searches with) find that image with
        the top score. Also compiles the search kernels before the first real query."""
        reader = self.retriever.reader
        block = next(reader.stored_rows(), None)  # the first live row group (None: no live rows)
        if block is None:
            return
        values, counts = np.unique(block.image_ids, return_counts=True)
        image = int(values[np.argmax(counts)])
        own_rows = block.take(np.flatnonzero(block.image_ids == image)[:max_rows])
        if not np.array_equal(reader.rows(own_rows.rows).image_ids, own_rows.image_ids):
            raise VersionRejected(f"{self.version.root} version {self.version.name}: the stored rows of image {image} "
                                  "are not where its row ids say: not served")
        with _search_guard():
            result = self.retriever.search_projected(own_rows.descriptors, own_rows.locations)
        if len(own_rows) < max(self.config.min_inliers, 3):
            return  # too few rows to expect RANSAC to confirm the image: searching without error is the check
        top = result.matches[0].score if result.matches else None
        own = next((m.score for m in result.matches if m.image_id == image), None)
        if own is None or own < top:
            raise VersionRejected(f"{self.version.root} version {self.version.name}: image {image}'s own rows do "
                                  f"not find it first (its score {own}, the top {top}): not served")


def open_engine(version: Version, config: EngineConfig = EngineConfig(), extractor=None,
                check: bool = False) -> Engine:
    """Open ``version``: the reader checks the small files by SHA-256 and every shard's footer and
    row counts; when the postings are held in memory every row group is read and checked by CRC-32.
    ``extractor``: the network to reuse (None: load the one the manifest names). ``check`` also
    runs :meth:`Engine.probe`."""
    retriever = retrieval.open_index(version.root, config.retrieval, image_shortlist=config.image_shortlist,
                                     shortlist_min_images=config.shortlist_min_images,
                                     shortlist_size=config.shortlist_size, cache_bytes=config.max_memory,
                                     manifest=version.manifest)
    reader = retriever.reader
    # With a first stage, queries read their candidates' rows: the cell lists are never held.
    resident = config.resident and retriever.first_stage is None and reader.resident_bytes() <= config.max_memory
    if resident:
        reader.load_all()
    engine = Engine(version, retriever, extractor if extractor is not None else load_extractor(reader.manifest),
                    resident)
    if check:
        engine.probe()
    return engine
