"""What the entry points share: the options that choose the network, extraction, input reading and
the run lock, and ``main``, which turns an expected failure into one line, a hint and an exit status.

Exit statuses: 0 done; 1 failed (an internal error, a build not published); 2 bad usage or input
(options, a listing, a missing file, an index that does not open); 75 another run holds the lock.
``--debug`` adds the traceback."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import traceback
import uuid

from delf_retrieval import storage
from delf_retrieval.build import encode
from delf_retrieval.build.encode import DEFAULT_MAX_REJECTED_FRACTION
from delf_retrieval.corpus import images, inputs
from delf_retrieval.corpus.inputs import FetchConfig
from delf_retrieval.extraction import presets
from delf_retrieval.index import layout, versions
from delf_retrieval.model import delf
from delf_retrieval.query.engine import IMAGE_SHORTLIST_MODES, EngineConfig
from delf_retrieval.query.retrieval import RANK_BY, RetrievalConfig


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and extraction")
    g.add_argument("--preset", default=presets.DEFAULT_PRESET, choices=sorted(presets.PRESETS),
                   help="named configuration (default: %(default)s)")
    g.add_argument("--model", help="a model directory (model.json + weights) saved by training; overrides --preset's network")
    g.add_argument("--backbone", choices=delf.BACKBONES)
    g.add_argument("--weights", help="'imagenet', 'random', or a path/URL: Keras .h5, torch .pth, TF1 checkpoint prefix")
    g.add_argument("--keypoint-score", choices=delf.KEYPOINT_SCORES)
    g.add_argument("--threshold", type=float, help="keep features whose score is >= this")
    g.add_argument("--scales", type=lambda s: tuple(float(v) for v in s.split(",")), help="comma-separated pyramid scales")
    g.add_argument("--max-features", type=int)
    g.add_argument("--max-image-size", type=int, help="long side brought down to this before the pyramid")
    g.add_argument("--min-image-size", type=int, help="long side brought up to this before the pyramid")
    g.add_argument("--batch-pixels", type=int, help="pixels per network call (0: one pyramid level per call)")


def configs_from_args(args: argparse.Namespace):
    """(ModelConfig, ExtractionConfig) from parsed options: the network from --model or the preset."""
    extraction = presets.extraction_config(
        args.preset, scales=args.scales, max_features=args.max_features, max_image_size=args.max_image_size,
        min_image_size=args.min_image_size, batch_pixels=args.batch_pixels,
    )
    if args.model:
        model_config = delf.read_model_config(args.model)
        if args.keypoint_score:
            model_config.keypoint_score = args.keypoint_score
        if args.threshold is not None:
            model_config.score_threshold = args.threshold
    else:
        model_config = presets.model_config(
            args.preset, backbone=args.backbone, weights=args.weights,
            keypoint_score=args.keypoint_score, score_threshold=args.threshold,
        )
    return model_config, extraction


def quiet_tensorflow(debug: bool = False) -> None:
    """Load TensorFlow without its start-up lines on stderr (absl's "All log messages before
    absl::InitializeLog()", oneDNN's notice), which its log level does not reach: stderr is closed
    while it loads. With ``debug`` it loads as it likes. Warnings of our own are untouched."""
    if debug or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow  # noqa: F401  (heavy: loaded here, once, so that its start-up is silent)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the lock; try at the next slot


class UsageError(Exception):
    """A command line that cannot be carried out as given (exit status 2)."""


class JobFailed(Exception):
    """A job submitted to a remote runner that did not finish (exit status 1)."""


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """How inputs are read (``inputs.FetchConfig``, whose defaults these are)."""

    d = FetchConfig()
    g = parser.add_argument_group("reading inputs")
    g.add_argument("--fetch-timeout", type=float, default=d.timeout,
                   help="seconds for a whole http(s) attempt: connect, headers and body (default %(default)s)")
    g.add_argument("--fetch-retries", type=int, default=d.retries, help="retries of a transient failure (default %(default)s)")
    g.add_argument("--host-interval", type=float, default=d.host_interval,
                   help="seconds between requests to one host, per worker (default %(default)s)")
    g.add_argument("--max-input-bytes", type=int, default=d.max_bytes,
                   help="largest encoded image taken from any source (default %(default)s)")


def fetch_config_from_args(args: argparse.Namespace):
    return FetchConfig(timeout=args.fetch_timeout, retries=args.fetch_retries, host_interval=args.host_interval,
                       max_bytes=args.max_input_bytes)


def add_retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    """How a query is answered (``retrieval.RetrievalConfig``) and how the index is opened for it
    (``engine.EngineConfig``), whose defaults these are: pipeline.search's, and pipeline.serve's
    defaults for every request."""

    opened = EngineConfig()
    d = opened.retrieval
    g = parser.add_argument_group("answering a query")
    g.add_argument("--top", type=int, default=d.top, help="matches per query (default: %(default)s)")
    g.add_argument("--shortlist", type=int, default=d.shortlist,
                   help="images verified by RANSAC per query, the most voted (default: %(default)s)")
    g.add_argument("--neighbours", type=int, default=d.neighbours, help="ANN neighbours per query descriptor")
    g.add_argument("--nprobe", type=int, default=d.nprobe, help="coarse cells scanned per query descriptor")
    g.add_argument("--max-distance", type=float, default=d.max_distance,
                   help="L2 distance (unit descriptors) beyond which a neighbour is not a match")
    g.add_argument("--rank-by", choices=RANK_BY, default=d.rank_by,
                   help="votes (default; ties broken by inliers), combined (inliers + --vote-weight x "
                        "votes), or inliers (the paper)")
    g.add_argument("--vote-weight", type=float, default=d.vote_weight)
    g.add_argument("--expand", type=int, default=d.expand,
                   help="verified query expansion: the top K verified matches bring in their stored "
                        "neighbours (from the index's neighbour table, which every build keeps; an index "
                        "without one answers without expansion, with a note); 0 is off (default %(default)s)")
    g.add_argument("--expand-min-inliers", type=int, default=d.expand_min_inliers,
                   help="inliers a match needs to expand the query (default %(default)s)")
    g.add_argument("--min-inliers", type=int, default=d.min_inliers)
    g.add_argument("--residual-threshold", type=float, default=d.residual_threshold, help="RANSAC, pixels")
    g.add_argument("--seed", type=int, default=d.seed, help="RANSAC seed: same seed, same answer")
    g.add_argument("--image-shortlist", choices=IMAGE_SHORTLIST_MODES, default=opened.image_shortlist,
                   help="restrict the search to the images nearest the query's aggregated descriptor "
                        "(auto: when the index has one and at least --shortlist-min-images images)")
    g.add_argument("--shortlist-size", type=int, default=opened.shortlist_size, help="images kept by the image shortlist")
    g.add_argument("--shortlist-min-images", type=int, default=opened.shortlist_min_images)


def check_retrieval_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("top", "neighbours", "nprobe", "shortlist_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        retrieval_config_from_args(args)
    except ValueError as e:
        parser.error(str(e))


def retrieval_config_from_args(args: argparse.Namespace):
    return RetrievalConfig(neighbours=args.neighbours, nprobe=args.nprobe, max_distance=args.max_distance,
                           shortlist=args.shortlist, top=args.top, residual_threshold=args.residual_threshold,
                           min_inliers=args.min_inliers, rank_by=args.rank_by, vote_weight=args.vote_weight,
                           seed=args.seed, expand=args.expand, expand_min_inliers=args.expand_min_inliers)


def engine_config_from_args(args: argparse.Namespace, resident: bool, max_memory: int | None = None):
    """The ``engine.EngineConfig`` of the retrieval flags; ``max_memory`` None keeps its default."""

    memory = {} if max_memory is None else {"max_memory": max_memory}
    return EngineConfig(retrieval=retrieval_config_from_args(args), image_shortlist=args.image_shortlist,
                        shortlist_size=args.shortlist_size, shortlist_min_images=args.shortlist_min_images,
                        resident=resident, **memory)


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def bytes_or_share(text: str) -> tuple[int | None, float]:
    """A budget given as a size ("500M", "2G", "1000") or as a share of the whole ("10%"), as
    (bytes or None, share): (None, 0.1) for "10%", (500 << 20, 0.0) for "500M"."""
    if text.strip().endswith("%"):
        try:
            share = float(text.strip()[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 <= share <= 1:
            raise argparse.ArgumentTypeError(f"not a share between 0% and 100%: {text}")
        return None, share
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size or a share: {text} (e.g. 10%, 500M, 2G)")
    return int(float(match.group(1)) * (1 << (10 * " kmgt".index(match.group(2).lower() or " ")))), 0.0


def flag(value: str) -> bool:
    """A boolean option's value as a Flex Template passes it (``--retrain=true``)."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value}")


def add_publish_arguments(parser: argparse.ArgumentParser, add=None) -> None:
    """The run lock and the publish guard, the same for every writer of an index root (``add``: the
    parser's add_argument, or one that also accepts a Flex Template's underscore spellings)."""

    add = add or parser.add_argument
    add("--lock-ttl", type=float, default=20 * 3600,
        help="seconds after which a lock left by a crashed run (or an unreadable lock file, by its modification "
             "time) is broken (default %(default)s: above the longest run, below the schedule's period)")
    add("--break-lock", nargs="?", const=True, default=False, type=flag,
        help="remove the root's lock first, whoever holds it")
    add("--max-rejected-fraction", type=float, default=DEFAULT_MAX_REJECTED_FRACTION,
        help="do not publish when more than this fraction of the listed inputs is rejected (default %(default)s)")


def take_lock(root: str, args: argparse.Namespace, local: bool, prog: str):
    """The root's run lock (``versions.RunLock``), after ``--break-lock`` if given; LockHeld if held."""

    if args.break_lock:
        broken = versions.break_lock(root)
        if broken is not None:
            print(f"{prog}: broke the lock {json.dumps(broken, sort_keys=True)}", file=sys.stderr)
    lock = versions.RunLock(root, args.lock_ttl, owner=uuid.uuid4().hex, track_pid=local).acquire()
    if lock.broke:
        print(f"{prog}: broke a stale lock {json.dumps(lock.broke, sort_keys=True)}", file=sys.stderr)
    # What a killed writer left half-written beside the lock and the pointer (no one else writes them now).
    for path in (lock.path, storage.join(root, layout.MANIFEST)):
        storage.remove_temporaries(path)
    return lock


def describe(error: BaseException) -> tuple[int, str, str | None]:
    """(exit status, one line, a hint) for a failure of an entry point."""

    message = re.sub(r" \[while running '[^']*'\]", "", str(error)).strip().splitlines()
    line = message[0] if message else type(error).__name__
    if isinstance(error, versions.LockHeld):
        return EXIT_LOCKED, line, "wait for that run to end; if it died, run again with --break-lock"
    if isinstance(error, versions.PublishConflict):
        return EXIT_FAILED, line, "another run published meanwhile: run again to build on its version"
    if isinstance(error, encode.PublishRefused):
        return EXIT_FAILED, line, "the rejected inputs and their reasons are in the table named above"
    if isinstance(error, layout.IndexStorageError):
        return EXIT_USAGE, line, ("check the index path; python -m pipeline.reindex --index ROOT --rollback "
                                  "returns to the previous version")
    if isinstance(error, inputs.ListingError):
        return EXIT_USAGE, line, "fix that line of the listing (a uri with a comma or a quote must be quoted)"
    if isinstance(error, JobFailed):
        return EXIT_FAILED, line, "the runner's log of the job says why"
    if isinstance(error, UsageError):
        return EXIT_USAGE, line, "see --help"
    if isinstance(error, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        where = getattr(error, "filename", None)
        text = f"{where}: {error.strerror}" if where and error.strerror else line
        return EXIT_USAGE, text, "check the path"
    if isinstance(error, images.ImageError):
        return EXIT_USAGE, line, None
    if getattr(error, "errno", None) == errno.ENOSPC or f"[Errno {errno.ENOSPC}]" in line:
        where = getattr(error, "filename", None) or line.rsplit(": ", 1)[-1]
        return EXIT_FAILED, f"no space left on device: {where}", ("free some space and run again: a run that "
                                                                 "fails removes what it wrote, and the previous "
                                                                 "version (if any) still serves")
    return EXIT_FAILED, f"internal error: {type(error).__name__}: {line}", "run again with --debug for the traceback"


def main(run, argv: list[str] | None = None) -> int:
    """Call an entry point's ``run(argv)``: its status, or for an exception one line on stderr (and a
    hint), the traceback only with ``--debug``, and the status :func:`describe` gives it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    module = run.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else os.path.basename(sys.argv[0])
    prog = f"python -m {module}"
    if "--debug" not in argv:
        # A failing step is re-raised here and told in one line; Beam's own log of it is the traceback.
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    try:
        return run(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - this is where every failure meets the user
        if "--debug" in argv:
            traceback.print_exc()
        status, line, hint = describe(error)
        print(f"{prog}: error: {line}", file=sys.stderr)
        if hint:
            print(f"{prog}: hint: {hint}", file=sys.stderr)
        return status
