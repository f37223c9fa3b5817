"""Query an index with images:

    python -m pipeline.search --index INDEX --output results.json QUERY [QUERY ...]
    python -m pipeline.search --index INDEX --queries queries.txt --runner DirectRunner ...

Per query: extract features with the network the index was built with -> PCA -> per-descriptor
ANN -> votes per database image -> RANSAC verification of the shortlist -> ranked by the score
(``--rank-by``: inliers + 2 x votes by default, votes, or inliers). Writes results.json ({"results": [{"query", "matches": [{"uri", "score", "inliers",
"votes"}]}]}, best first) and prints a table. With ``--runner`` the same search runs as a Beam
pipeline (for many queries: extraction spreads over workers, each opens the index once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline import cli


def parse_args(argv=None):
    from delf_retrieval.retrieval import RANK_BY, RetrievalConfig

    defaults = RetrievalConfig()
    parser = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="*", help="query images: paths, gs:// uris or http(s) URLs")
    parser.add_argument("--queries", dest="queries_file", help="a file with one query path or URL per line")
    parser.add_argument("--index", required=True, help="index folder or gs:// prefix (its current version is read)")
    parser.add_argument("--output", default="results.json", help="results file (default: %(default)s)")
    parser.add_argument("--top", type=int, default=defaults.top, help="matches per query (default: %(default)s)")
    parser.add_argument("--shortlist", type=int, default=defaults.shortlist,
                        help="images verified by RANSAC per query, the most voted (default: %(default)s)")
    parser.add_argument("--neighbours", type=int, default=defaults.neighbours, help="ANN neighbours per query descriptor")
    parser.add_argument("--nprobe", type=int, default=defaults.nprobe, help="coarse cells scanned per query descriptor")
    parser.add_argument("--max-distance", type=float, default=defaults.max_distance,
                        help="L2 distance (unit descriptors) beyond which a neighbour is not a match")
    parser.add_argument("--rank-by", choices=RANK_BY, default=defaults.rank_by,
                        help="combined (default: inliers + --vote-weight x votes), votes (ties broken by "
                             "inliers), or inliers (the paper)")
    parser.add_argument("--vote-weight", type=float, default=defaults.vote_weight)
    parser.add_argument("--expand", type=int, default=defaults.expand,
                        help="verified query expansion: the top K verified matches bring in their stored "
                             "neighbours (the index needs a neighbour table: --verified-neighbours at build "
                             "time); 0 is off (default %(default)s)")
    parser.add_argument("--expand-min-inliers", type=int, default=defaults.expand_min_inliers,
                        help="inliers a match needs to expand the query (default %(default)s)")
    parser.add_argument("--min-inliers", type=int, default=defaults.min_inliers)
    parser.add_argument("--residual-threshold", type=float, default=defaults.residual_threshold, help="RANSAC, pixels")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="RANSAC seed: same seed, same answer")
    parser.add_argument("--image-shortlist", choices=("auto", "on", "off"), default="auto",
                        help="restrict the search to the images nearest the query's aggregated descriptor "
                             "(auto: when the index has one and at least --shortlist-min-images images)")
    parser.add_argument("--shortlist-size", type=int, default=1000, help="images kept by the image shortlist")
    parser.add_argument("--shortlist-min-images", type=int, default=50_000)
    parser.add_argument("--visualize", metavar="DIR", help="write a picture per query: matches with inliers, attention map")
    parser.add_argument("--visualize-top", type=int, default=5, help="matches drawn per query picture")
    parser.add_argument("--runner", help="run as a Beam pipeline on this runner (DirectRunner, DataflowRunner, ...)")
    parser.add_argument("--accelerator", help="with --runner: Beam accelerator hint (Dataflow's right fitting) of the "
                                              "extraction and the search after it (run_dataflow.sh's form)")
    cli.add_debug_argument(parser)
    cli.add_fetch_arguments(parser)
    args, beam_args = parser.parse_known_args(argv)
    if args.queries_file:
        with open(args.queries_file) as f:
            args.queries += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if not args.queries:
        parser.error("no queries: give image paths/URLs or --queries FILE")
    for name in ("top", "neighbours", "nprobe", "shortlist_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.runner:
        beam_args = [f"--runner={args.runner}", *beam_args]
    elif beam_args:
        parser.error(f"unrecognised arguments: {' '.join(beam_args)} (Beam options need --runner)")
    return args, beam_args


def retrieval_config(args):
    from delf_retrieval.retrieval import RetrievalConfig

    return RetrievalConfig(neighbours=args.neighbours, nprobe=args.nprobe, max_distance=args.max_distance,
                           shortlist=args.shortlist, top=args.top, residual_threshold=args.residual_threshold,
                           min_inliers=args.min_inliers, rank_by=args.rank_by, vote_weight=args.vote_weight,
                           seed=args.seed, expand=args.expand, expand_min_inliers=args.expand_min_inliers)


def open_retriever(args):
    from delf_retrieval import retrieval

    return retrieval.open_index(args.index, retrieval_config(args), image_shortlist=args.image_shortlist,
                                shortlist_min_images=args.shortlist_min_images, shortlist_size=args.shortlist_size)


def search_locally(args) -> tuple[list, list]:
    """Answer each query in this process: (answers, failures)."""
    from delf_retrieval import retrieval
    from delf_retrieval.extract import Extractor
    from delf_retrieval.images import ImageError
    from delf_retrieval.inputs import Fetcher, FetchError, read_image
    from delf_retrieval.model import delf
    from delf_retrieval.visualize import write_query_picture

    retriever = open_retriever(args)
    fetcher = Fetcher(cli.fetch_config_from_args(args))
    model_config, extraction_config = retrieval.index_configs(retriever.reader.manifest)
    extractor = Extractor(delf.load(model_config), extraction_config)
    answers, failures = [], []
    timings = dict.fromkeys(("extract", "shortlist", "ann", "voting", "ransac"), 0.0)
    for rank, query in enumerate(args.queries):
        try:
            image = read_image(query, fetcher)
        except (ImageError, FetchError, OSError, ValueError) as e:
            failures.append((query, f"{type(e).__name__}: {e}"))
            answers.append((query, []))
            continue
        start = time.perf_counter()
        try:
            features = extractor.extract(image)
        except Exception as e:  # noqa: BLE001 - one query that fails extraction must not lose the others
            failures.append((query, f"extraction failed: {type(e).__name__}: {e}"))
            answers.append((query, []))
            continue
        timings["extract"] += time.perf_counter() - start
        try:
            result = retriever.search(features)
        except Exception as e:  # noqa: BLE001 - likewise for the search itself
            failures.append((query, f"search failed: {type(e).__name__}: {e}"))
            answers.append((query, []))
            continue
        for stage, seconds in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        answers.append((query, result.matches))
        if args.visualize:
            write_query_picture(args.visualize, rank, query, image, extractor.score_map(image),
                                result.matches[: args.visualize_top])
    n = max(len(answers) - len(failures), 1)
    print("seconds per query: " + ", ".join(f"{k} {v / n:.3f}" for k, v in timings.items()), file=sys.stderr)
    return answers, failures


def search_with_beam(args, beam_args) -> tuple[list, list]:
    """The same search as a Beam pipeline: workers write one JSON line per query beside
    ``--output`` (so on Dataflow it must be a gs:// path), read back here in query order."""
    from delf_retrieval import storage
    from pipeline.build import make_pipeline
    from transforms.search import SearchQueries

    records_path = args.output + ".records.jsonl"
    pipeline, local = make_pipeline(beam_args)
    if not local and not args.output.startswith("gs://"):
        raise cli.UsageError("--output must be a gs:// path on a remote runner (the workers write it)")
    pipeline | "SearchQueries" >> SearchQueries(args.queries, args.index, retrieval_config(args), records_path,
                                                image_shortlist=args.image_shortlist,
                                                shortlist_min_images=args.shortlist_min_images,
                                                shortlist_size=args.shortlist_size,
                                                visualize=args.visualize, visualize_top=args.visualize_top,
                                                fetch=cli.fetch_config_from_args(args), accelerator=args.accelerator)
    pipeline.run().wait_until_finish()
    records = [json.loads(line) for line in storage.read_bytes(records_path).decode().splitlines() if line]
    storage.delete(records_path)
    records.sort(key=lambda r: r["rank"])
    answers = [(r["query"], [_Match(m) for m in r["matches"]]) for r in records]
    failures = [(r["query"], r["error"]) for r in records if r.get("error")]
    return answers, failures


class _Match:
    """A match read back from the Beam pipeline's records (the fields results.json carries)."""

    def __init__(self, record: dict):
        self.uri, self.score, self.inliers, self.votes = record["uri"], record["score"], record["inliers"], record["votes"]

    def to_json(self) -> dict:
        return {"uri": self.uri, "score": self.score, "inliers": self.inliers, "votes": self.votes}


def run(argv=None) -> int:
    args, beam_args = parse_args(argv)
    cli.quiet_tensorflow()
    from delf_retrieval import retrieval, storage

    start = time.time()
    answers, failures = search_with_beam(args, beam_args) if args.runner else search_locally(args)
    storage.write_bytes(args.output, json.dumps(retrieval.results_document(answers), indent=1).encode())
    print(retrieval.results_table(answers))
    for query, error in failures:
        print(f"query failed: {query}: {error}", file=sys.stderr)
    print(f"{len(answers)} queries ({len(failures)} failed) in {time.time() - start:.1f} s; results in {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
