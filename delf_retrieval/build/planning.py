"""The plan of one index build: its settings (``BuildConfig``), its mode (full, fixed quantizer or
incremental), what it starts from (the current version's live images, checked, its damaged
segments left out), what it does with each listed input (keep / check / extract / delete), the
segments it keeps and merges, and how its shards are sized. The Beam build carries a plan out;
nothing here imports Beam."""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from delf_retrieval import storage
from delf_retrieval.build import encode
from delf_retrieval.build.encode import DEFAULT_MAX_REJECTED_FRACTION
from delf_retrieval.corpus import inputs
from delf_retrieval.index import layout, merging, scrub, shards
from delf_retrieval.index.neighbour_table import NeighbourConfig
from delf_retrieval.index.scrub import ScrubReport
from delf_retrieval.index.segments import is_segmented, live_images, read_tombstones, segment_refs
from delf_retrieval.quantize import IndexParams
from delf_retrieval.quantize import pca as pca_lib

# The modes of the one build.
FULL = "full"  # extract every image; train PCA + quantizer on a sample of them first
FIXED = "fixed"  # extract every image; encode with a given PCA + quantizer (pipeline.build_quantizer's)
INCREMENTAL = "incremental"  # reuse the current version's model and the rows of unchanged images
MODES = (FULL, FIXED, INCREMENTAL)

# What a build does with each listed input.
KEEP = "keep"  # indexed, the same change marker: its posting rows stay where they are, nothing is read
CHECK = "check"  # indexed, its marker changed: read and hashed; extracted again only if the bytes changed
EXTRACT = "extract"  # new (or every input, in a full or fixed build)
DELETE = "delete"  # indexed but no longer listed: tombstoned in its segment
ACTIONS = (KEEP, CHECK, EXTRACT, DELETE)

PLAN_FILE = "plan.parquet"
DRIFT_THRESHOLD = 1.5  # retrain when new descriptors' quantization error exceeds the training error x this
DRIFT_SAMPLE = 100_000  # new descriptors an incremental build samples to measure it
PLAN_FIELDS = ("uri", "label", "stamp", "action", "width", "height", "num_features", "content_hash", "segment")
INDEXED_FIELDS = ("width", "height", "num_features", "content_hash")  # what a kept row brings from the index
PLAN_SCHEMA = pa.schema([("uri", pa.string()), ("label", pa.string()), ("stamp", pa.string()),
                         ("action", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                         ("num_features", pa.int32()), ("content_hash", pa.string()), ("segment", pa.string())])


@dataclass(frozen=True)
class BuildConfig:
    """What a build makes of the features: the index (``IndexParams``), the PCA dimension, the
    descriptors the model is trained on, and the posting shards' size (``num_shards`` fixes their
    number; otherwise there is one per ~``rows_per_shard`` descriptors)."""

    index: IndexParams = field(default_factory=IndexParams)
    pca_dim: int = pca_lib.DEFAULT_DIM
    sample_size: int = 1_000_000
    rows_per_shard: int = 4_000_000
    num_shards: int | None = None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "index": dataclasses.asdict(self.index)}

    @classmethod
    def from_json(cls, data: dict) -> "BuildConfig":
        """The inverse of :meth:`to_json`; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        settings = {k: v for k, v in dict(data).items() if k in known}
        if "index" in settings:
            settings["index"] = index_params(dict(settings["index"]))
        return cls(**settings)


def index_params(manifest_params: dict) -> IndexParams:
    """The ``IndexParams`` of a manifest's ``params`` (which also holds what training found: regions,
    local models, dimension); ``n_cells`` is the trained count."""
    known = {f.name for f in dataclasses.fields(IndexParams)}
    return IndexParams(**{k: v for k, v in manifest_params.items() if k in known})


def choose_mode(pointer: dict | None, fixed_model: bool, retrain: bool = False) -> str:
    """A fixed-quantizer build when given one; incremental on top of a current version unless told
    to retrain or the version found its codebooks drifted; otherwise a full, training build."""
    if fixed_model:
        return FIXED
    return INCREMENTAL if pointer is not None and not retrain and not retrain_due(pointer) else FULL


def retrain_due(pointer: dict | None) -> bool:
    """Whether the version found the new descriptors' quantization error past its threshold."""
    return bool(pointer and (pointer.get("drift") or {}).get("retrain_due"))


def _immutable(uri: str) -> bool:
    """http(s) URLs have no change marker: an indexed URL is taken as unchanged."""

    return inputs.is_url(uri)


def plan_rows(listed: list[tuple[str, str | None, str | None]], previous_images: list[dict],
              incremental: bool, keep_all: bool = False) -> tuple[list[dict], list[dict]]:
    """(a plan row per unique listed (uri, label, stamp), a ``DELETE`` row per image indexed in
    the previous version but no longer listed). Incremental: keep an indexed image with the same
    stamp (or an indexed URL; every indexed image when ``keep_all``: a listing made from the index
    itself), check one whose stamp differs, extract a new one; otherwise extract everything. Rows
    of indexed images name the ``segment`` their rows are in (None in a format-1 version)."""
    before = {r["uri"]: r for r in previous_images}
    rows, seen = [], set()
    for uri, label, stamp in listed:
        if uri in seen:
            continue
        seen.add(uri)
        old = before.get(uri)
        if old is None or not incremental:
            action = EXTRACT
        elif keep_all or (old.get("stamp") is not None and old.get("stamp") == stamp) or (
                stamp is None and old.get("stamp") is None and _immutable(uri)):
            action = KEEP
        else:
            action = CHECK
        if label is None and old:
            label = old.get("label")  # a listing without labels keeps the ones the index has
        rows.append({"uri": uri, "label": label, "stamp": stamp, "action": action,
                     **{k: (old or {}).get(k) for k in INDEXED_FIELDS},
                     "segment": (old or {}).get("segment") if incremental else None})
    deleted = [{"uri": r["uri"], "label": r.get("label"), "stamp": r.get("stamp"), "action": DELETE,
                **{k: r.get(k) for k in INDEXED_FIELDS}, "segment": r.get("segment") if incremental else None}
               for uri, r in sorted(before.items()) if uri not in seen]
    return rows, deleted


def input_of(row: dict) -> inputs.InputImage:
    """The input a plan row names, as the build reads it."""
    return inputs.InputImage(row["uri"], row["label"])


def check_unique_ids(rows: list[dict]) -> None:
    """Refuse a plan in which two listed uris share an image id (the 64-bit hash of the uri): the
    index could not tell their rows apart."""

    ids: dict[int, str] = {}
    for row in rows:
        if ids.setdefault(inputs.image_id(row["uri"]), row["uri"]) != row["uri"]:
            raise encode.PublishRefused(f"image id collision: {row['uri']} and {ids[inputs.image_id(row['uri'])]}")


@dataclass
class BuildPlan:
    """What one build does: its mode, a row per unique listed input (``PLAN_FIELDS``), a ``DELETE``
    row per image no longer listed, the listing's dead letters (uris listed again), the training
    sample (image ids) of a full build, whether the rows of kept images are copied into the new
    segment (``carry``: an incremental build over a format-1 version, whose shards are no segment)
    and how the new segment's shards are sized: ``num_shards`` when it is known up front, else from
    ``descriptor_bound`` once the trained model's cell count is."""

    mode: str
    rows: list[dict]
    deleted: list[dict] = field(default_factory=list)
    repeats: list[dict] = field(default_factory=list)
    training_sample: frozenset = frozenset()
    carry: bool = False
    num_shards: int | None = None
    descriptor_bound: int = 0

    @property
    def listed(self) -> int:
        """Every listed row, repeats included: indexed + rejected must come to this."""
        return len(self.rows) + len(self.repeats)

    @property
    def to_read(self) -> int:
        """Inputs the build reads (checks and extractions): what progress counts."""
        return sum(r["action"] != KEEP for r in self.rows)

    def count(self, action: str) -> int:
        return sum(r["action"] == action for r in self.rows)

    def table(self):
        """The plan as the Parquet table the build's steps read (``PLAN_FILE`` in the version folder):
        the rows it acts on (checks, extractions, deletions), and the kept ones only when it copies
        their rows (a kept image's rows otherwise stay in its segment: a plan of a million kept
        images would be written every night for nothing)."""

        rows = [r for r in self.rows if self.carry or r["action"] != KEEP] + self.deleted
        return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def plan_build(mode: str, listed: list[tuple], repeats: list[dict], config: BuildConfig, max_features: int,
               previous_images: list[dict] = (), previous_counts: dict | None = None,
               n_cells: int | None = None, carry: bool = False, keep_all: bool = False) -> BuildPlan:
    """The plan of a build in ``mode`` over ``listed`` (uri, label, stamp) rows.

    A full build trains on ``encode.training_sample`` of the inputs (the smallest image ids, enough
    for ``config.sample_size`` descriptors at ``max_features`` per image). Shards of the new
    segment: ``num_shards`` if the config fixes it; an incremental build sizes them from the
    previous version's mean descriptors per image for the images it reads (plus the kept rows'
    descriptors when it ``carry``s them; ``n_cells`` and ``previous_counts`` come from the current
    version); full and fixed builds from the extracted inputs x ``max_features``, an upper bound,
    once the model's cell count is known. ``keep_all``: the listing is the index's own images
    (a merge alone), all kept."""

    if mode not in MODES:
        raise ValueError(f"unknown build mode {mode!r}; one of {', '.join(MODES)}")
    incremental = mode == INCREMENTAL
    rows, deleted = plan_rows(listed, list(previous_images), incremental, keep_all)
    check_unique_ids(rows)
    plan = BuildPlan(mode, rows, deleted, list(repeats), carry=incremental and carry, num_shards=config.num_shards)
    extracted = [r["uri"] for r in rows if r["action"] == EXTRACT]
    if mode == FULL:
        plan.training_sample = frozenset(encode.training_sample(extracted, config.sample_size, max_features))
    if incremental:
        if previous_counts is None or n_cells is None:
            raise ValueError("an incremental plan needs the current version's counts and cell count")
        copied = sum(r["num_features"] or 0 for r in rows if r["action"] == KEEP) if plan.carry else 0
        per_image = previous_counts["descriptors"] / max(previous_counts["images"], 1)
        estimate = int(copied + per_image * plan.to_read)
        plan.num_shards = config.num_shards or shards.shard_count(estimate, n_cells, config.rows_per_shard)
    plan.descriptor_bound = plan.to_read * int(max_features)
    return plan


def read_plan(path: str, actions: tuple = ACTIONS) -> list[dict]:
    """The rows of a written plan whose action is one of ``actions`` (its columns checked: a
    ``ShardError`` naming the file)."""

    table = layout.read_table(storage.read_bytes(path), PLAN_SCHEMA, path, not_null=("uri", "action"))
    return table.filter(pc.is_in(table.column("action"), value_set=pa.array(list(actions)))).to_pylist()


def indexed_record(row: dict) -> dict:
    """The image-table record of a plan row whose image keeps its posting rows."""

    return {"image_id": inputs.image_id(row["uri"]), "uri": row["uri"], "label": row["label"], "stamp": row["stamp"],
            **{k: row[k] for k in INDEXED_FIELDS}}


def previous_images(root: str, pointer: dict | None) -> list[dict]:
    """The current version's live images, as records (none before the first version); those of a
    format-2 version name the ``segment`` their rows are in. Files are read checked."""
    if pointer is None:
        return []
    if is_segmented(pointer):
        return live_images(root, pointer).to_pylist()
    record = pointer["files"]["images"]
    return shards.read_image_table(layout.checked_read(root, record), record["path"]).to_pylist()


@dataclass(frozen=True)
class Start:
    """What an incremental run over a format-2 version starts from once it has checked it: the
    current version less its damaged segments (``pointer``), its live images (``previous``, the
    damaged segments' not among them, so they are extracted again from the corpus like new ones),
    their descriptors, and the scrub's findings."""

    pointer: dict
    previous: list
    descriptors: int
    scrub: ScrubReport

    @property
    def damaged(self) -> dict:
        return self.scrub.damaged


DEFAULT_SCRUB_FRACTION = 0.1  # of a version's segment bytes, verified by each run: all of them every 10 runs


def checked_start(root: str, pointer: dict, scrub_bytes: int | None = None,
                  scrub_fraction: float = DEFAULT_SCRUB_FRACTION, repair: bool = False) -> Start:
    """Scrub ``scrub_bytes`` (None: ``scrub_fraction`` of the current version's segment bytes),
    round-robin from where the last run stopped, plus every segment a reader noted as damaged
    (``repair``: every byte of every segment), and read its live images; a segment found damaged
    on the way is left out of the start."""
    total = sum(r.size_bytes for r in segment_refs(pointer))
    budget = total if repair else scrub_bytes if scrub_bytes is not None else int(scrub_fraction * total)
    suspects = {r.segment_id for r in segment_refs(pointer)} if repair else scrub.noted_damage(root)
    report = scrub.scrub(root, pointer, budget, (pointer.get("scrub") or {}).get("cursor"), suspects)
    damaged = dict(report.damaged)
    previous = live_images(root, pointer, damaged).to_pylist()
    report = dataclasses.replace(report, damaged=damaged)
    return Start(scrub.without_segments(pointer, set(damaged)), previous,
                 sum(r["num_features"] for r in previous), report)


def plan_segments(root: str, pointer: dict, plan: BuildPlan, build_id: str, rows_per_shard: int,
                  max_segments: int | None) -> tuple[tuple, tuple, dict]:
    """(the current version's segments the new one keeps listing, this run's merges, the current
    version's tombstones and restamps as file records) of an incremental run over a format-2
    version: the merge policy weighs the segments with this run's deletions counted as
    tombstones; ``max_segments`` (a merge on demand) merges down to that many instead."""
    tombstones = read_tombstones(root, pointer)
    deleted: dict = {}
    for row in plan.deleted:
        deleted.setdefault(row["segment"], []).append(inputs.image_id(row["uri"]))
    for segment, ids in deleted.items():
        tombstones = tombstones.adding(segment, ids)
    merges = merging.plan_merges(pointer, tombstones, build_id, rows_per_shard, max_segments=max_segments)
    merged = {s for m in merges for s in m.source_ids}
    kept = tuple(r for r in segment_refs(pointer) if r.segment_id not in merged)
    files = {k: pointer["files"][k] for k in ("tombstones", "restamps") if k in pointer["files"]}
    return kept, tuple(merges), files


def neighbour_settings(mode: str, pointer: dict | None, k: int, min_inliers: int) -> tuple:
    """(NeighbourConfig or None, the current version's neighbour table record or None): an
    incremental build keeps the index's own table up to date; other builds, and an incremental one
    over an index that has none yet (it gains one: every image searches), keep at most ``k``
    neighbours per image (0: no table)."""
    if mode == INCREMENTAL and "neighbours" in pointer:
        return NeighbourConfig.from_json(pointer["neighbours"]), pointer["files"]["neighbours"]
    if not k:
        return None, None
    return NeighbourConfig(k, min_inliers), None


@dataclass(frozen=True)
class BuildJob:
    """One build as its Beam steps see it: where it writes (``root``, its version folder ``build``),
    the version it may replace (``expected_token``, a compare-and-swap), its settings, its plan in
    brief (the rows are in the plan file, ``plan_path``) and the lock its publish step releases."""

    root: str
    build: str  # builds/<build id>, relative to root
    index_id: str
    mode: str
    config: BuildConfig
    fetch: object  # inputs.FetchConfig
    model_info: dict  # the network, the extraction and the preset, as the manifest records them
    plan_path: str
    plan_record: dict
    listed: int
    deleted: int
    repeats: tuple = ()
    training_sample: frozenset = frozenset()
    num_shards: int | None = None
    descriptor_bound: int = 0
    expected_token: str | None = None
    lock_owner: str | None = None
    keep: int = 2
    max_rejected_fraction: float = DEFAULT_MAX_REJECTED_FRACTION
    drift_threshold: float = DRIFT_THRESHOLD
    drift_sample: int = DRIFT_SAMPLE
    started: float = 0.0
    neighbours: object = None  # expansion.NeighbourConfig: keep a verified-neighbour table; None: none
    previous_neighbours: dict | None = None  # the current version's neighbour table (file record)
    # The current version's first-stage parts by segment (``first_stage.search.records_of``): the
    # segments it keeps need no new ones.
    previous_first_stage: dict = field(default_factory=dict)
    # The segments: the one this run writes (named by its build id; its shards carry ``index_id``),
    # whether it copies the kept images' rows into it (``carry``, over a format-1 version), how many
    # plan rows are kept, the current version's segments the new one keeps listing, the merges of
    # this run (``segments.Merge``), the current version's tombstones and restamps and the shared
    # model files it encodes with (file records, paths from the root).
    carry: bool = False
    kept: int = 0
    previous_descriptors: int = 0  # the current version's live descriptors
    segments: tuple = ()
    merges: tuple = ()
    previous_files: dict = field(default_factory=dict)
    codebooks: dict = field(default_factory=dict)  # the current version's shared model; empty: write the run's
    # The scrub of the current version (``scrub.ScrubReport.to_json``, recorded in the new version so
    # the next run goes on from its cursor) and the damaged segments this run leaves out and repairs.
    scrub: dict | None = None
    repaired: tuple = ()

    @property
    def segment_id(self) -> str:
        return self.build_id

    @property
    def build_id(self) -> str:
        return self.build.rsplit("/", 1)[-1]


def new_build_id() -> str:
    """Sortable and unique: the UTC time of the launch plus a random suffix."""

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]
