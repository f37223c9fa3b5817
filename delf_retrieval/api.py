"""The Python API: open an index and search it, extract an image's features. ``pipeline.search``
and ``pipeline.serve`` answer through :class:`Index`, so a script gets the commands' answers.

    import delf_retrieval as delf
    index = delf.open_index("output/sample-index")
    hits = index.search("photo.jpg", top=10)   # best first: .uri .score .inliers .votes
    feats = delf.extract("photo.jpg")          # .locations .descriptors .scales .scores
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
from PIL import Image

from delf_retrieval.corpus import images
from delf_retrieval.corpus.inputs import Fetcher, FetchConfig, read_image
from delf_retrieval.extraction import presets
from delf_retrieval.extraction.extractor import Extractor
from delf_retrieval.extraction.features import Features
from delf_retrieval.model import delf
from delf_retrieval.query import engine as engine_lib
from delf_retrieval.query.engine import Answer, Deadline, EngineConfig
from delf_retrieval.query.live import LiveIndex
from delf_retrieval.query.matching import Match
from delf_retrieval.query.retrieval import RetrievalConfig

OPEN_OPTIONS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "retrieval")
SEARCH_OPTIONS = tuple(f.name for f in dataclasses.fields(RetrievalConfig))


def to_rgb(image, fetcher: Fetcher | None = None) -> np.ndarray:
    """An RGB array (H, W, 3) uint8 of a query as a user holds it: a path, ``gs://`` uri or URL
    (read with ``fetcher``'s bounds), the bytes of an image file, a PIL image, or an array
    (H, W, 3) or (H, W), decoded with the limits a build decodes with."""
    if isinstance(image, str):
        return read_image(image, fetcher)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return images.decode_image(bytes(image))
    if isinstance(image, Image.Image):
        return images.to_rgb_array(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
            raise images.UnsupportedImageError(f"an image array is (H, W, 3) RGB, not {image.shape}")
        if image.dtype != np.uint8:
            raise images.UnsupportedImageError(f"an image array is uint8, not {image.dtype}")
        return np.ascontiguousarray(image[:, :, :3])
    raise TypeError(f"a query is a path or URL, bytes, a PIL image or an RGB array, not {type(image).__name__}")


class Index:
    """An index opened for search: the version its root publishes, with the network it was built
    with, loaded once. :meth:`search` is safe to call from several threads.

    With ``follow`` the index follows the root: a new version is opened and checked in the
    background and replaces the served one (a query in flight finishes on the version it started
    with); :meth:`start` begins following, as ``pipeline.serve`` does."""

    def __init__(self, root: str, config: EngineConfig = EngineConfig(), fetch: FetchConfig = FetchConfig(),
                 follow: bool = False, reload_interval: float = 60.0, live: LiveIndex | None = None):
        """``live``: a follower to answer through (``follow`` implied), started and stopped by its owner."""
        self.root = root
        self.config = config
        self.fetcher = Fetcher(fetch)
        follow = follow or live is not None
        self.live = live if live is not None else LiveIndex(root, config, reload_interval) if follow else None
        self._engine = None if follow else engine_lib.open_engine(engine_lib.published(root), config)

    @property
    def engine(self) -> engine_lib.Engine | None:
        """The version answering now (None while a followed root has none open yet). A caller that
        answers in several steps takes it once, so every step sees the same version."""
        return self.live.engine if self.live is not None else self._engine

    def start(self) -> None:
        """Open the published version in the background and follow the root (``follow`` only)."""
        self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()

    def answer(self, image, config: RetrievalConfig | None = None, deadline: Deadline | None = None,
               engine: engine_lib.Engine | None = None) -> Answer:
        """One query with every stage's seconds: :meth:`search`'s answer, with the image already
        an RGB array or anything :func:`to_rgb` reads. ``engine``: the version to answer with, as
        the caller took it from :attr:`engine` (default: the one answering now)."""
        engine = engine or self.engine
        if engine is None:
            raise LookupError(f"{self.root}: no version is open yet")
        return engine.answer(to_rgb(image, self.fetcher), config, deadline)

    def search(self, query, top: int | None = None, **options) -> list[Match] | list[list[Match]]:
        """The best matches of ``query`` (a path or URL, bytes, a PIL image or an RGB array), best
        first; a list of queries gives a list of answers. ``options`` are ``RetrievalConfig``'s
        fields (rank_by, vote_weight, expand, nprobe, ...), defaulting to the index's settings,
        which are the command line's defaults."""
        unknown = set(options) - set(SEARCH_OPTIONS)
        if unknown:
            raise TypeError(f"unknown search options: {', '.join(sorted(unknown))} (known: {', '.join(SEARCH_OPTIONS)})")
        engine = self.engine
        if engine is None:
            raise LookupError(f"{self.root}: no version is open yet")
        if top is not None:
            options["top"] = top
        config = dataclasses.replace(engine.config, **options) if options else None
        if isinstance(query, (list, tuple)):
            return [engine.answer(to_rgb(q, self.fetcher), config).matches for q in query]
        return engine.answer(to_rgb(query, self.fetcher), config).matches

    def info(self) -> dict:
        engine = self.engine
        return engine.info() if engine is not None else {"root": self.root, "version": None}


def open_index(root: str, fetch: FetchConfig = FetchConfig(), **options) -> Index:
    """The current version of a local or ``gs://`` index root, opened for search. ``options``:
    how it is opened (``EngineConfig``'s image_shortlist, shortlist_size, shortlist_min_images,
    max_memory, resident) and how it answers by default (``RetrievalConfig``'s fields)."""
    unknown = set(options) - set(OPEN_OPTIONS) - set(SEARCH_OPTIONS)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    opening = {k: v for k, v in options.items() if k in OPEN_OPTIONS}
    answering = {k: v for k, v in options.items() if k in SEARCH_OPTIONS}
    return Index(root, EngineConfig(retrieval=RetrievalConfig(**answering), **opening), fetch)


_EXTRACTORS: dict = {}
_EXTRACTORS_LOCK = threading.Lock()


def extractor(preset: str = presets.DEFAULT_PRESET, model: str | None = None) -> Extractor:
    """The extractor of a preset, or of a model directory saved by training with the preset's
    pyramid; loaded once per process and shared."""
    key = (preset, model)
    with _EXTRACTORS_LOCK:
        if key not in _EXTRACTORS:
            config = delf.read_model_config(model) if model else presets.model_config(preset)
            _EXTRACTORS[key] = Extractor(delf.load(config), presets.extraction_config(preset))
        return _EXTRACTORS[key]


def extract(image, preset: str = presets.DEFAULT_PRESET, model: str | None = None,
            fetch: FetchConfig = FetchConfig()) -> Features:
    """The DELF features of one image (a path or URL, bytes, a PIL image or an RGB array), as
    ``pipeline.extract`` computes them: ``.locations`` (y, x), ``.descriptors``, ``.scales``,
    ``.scores`` (attention)."""
    return extractor(preset, model).extract(to_rgb(image, Fetcher(fetch)))
