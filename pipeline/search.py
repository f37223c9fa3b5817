"""Query an index with images:

    python -m pipeline.search --index INDEX --output results.json QUERY [QUERY ...]
    python -m pipeline.search --index INDEX --queries queries.txt --runner DirectRunner ...

Per query: extract features with the network the index was built with -> PCA -> per-descriptor
ANN -> votes per database image -> RANSAC verification of the shortlist -> ranked by the score
(``--rank-by``: votes by default, inliers + w x votes, or inliers) -> verified expansion with the
index's neighbour table (``--expand``). Writes results.json ({"results": [{"query", "matches":
[{"uri", "score", "inliers", "votes"}]}]}, best first) and prints a table. With ``--runner`` the same search runs as a Beam
pipeline (for many queries: extraction spreads over workers, each opens the index once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from delf_retrieval import storage
from delf_retrieval.api import Index, to_rgb
from delf_retrieval.corpus.images import ImageError
from delf_retrieval.corpus.inputs import FetchError
from delf_retrieval.extraction.visualize import write_query_picture
from delf_retrieval.query import retrieval
from pipeline import cli
from pipeline.build import make_pipeline
from transforms.search import SearchQueries


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="*", help="query images: paths, gs:// uris or http(s) URLs")
    parser.add_argument("--queries", dest="queries_file", help="a file with one query path or URL per line")
    parser.add_argument("--index", required=True, help="index folder or gs:// prefix (its current version is read)")
    parser.add_argument("--output", default="results.json", help="results file (default: %(default)s)")
    cli.add_retrieval_arguments(parser)
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
    cli.check_retrieval_arguments(parser, args)
    if args.runner:
        beam_args = [f"--runner={args.runner}", *beam_args]
    elif beam_args:
        parser.error(f"unrecognised arguments: {' '.join(beam_args)} (Beam options need --runner)")
    return args, beam_args


def search_locally(args) -> tuple[list, list, set, dict]:
    """Answer each query in this process, through the ``Index`` pipeline.serve answers with:
    (answers, failures, notes on how they were answered, landmarks: query -> recognition record)."""
    # One-off queries read only the row groups they probe; a server holds the postings instead.
    index = Index(args.index, cli.engine_config_from_args(args, resident=False), cli.fetch_config_from_args(args))
    answers, failures, notes, landmarks = [], [], set(), {}
    timings = dict.fromkeys(("extract", "shortlist", "ann", "voting", "ransac"), 0.0)
    for rank, query in enumerate(args.queries):
        try:
            image = to_rgb(query, index.fetcher)
        except (ImageError, FetchError, OSError, ValueError) as e:
            failures.append((query, f"{type(e).__name__}: {e}"))
            answers.append((query, []))
            continue
        try:
            answer = index.answer(image)
        except Exception as e:  # noqa: BLE001 - one query that fails must not lose the others
            failures.append((query, f"search failed: {type(e).__name__}: {e}"))
            answers.append((query, []))
            continue
        for stage, seconds in answer.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        answers.append((query, answer.matches))
        notes.update(answer.notes)
        if answer.landmark is not None:
            landmarks[query] = answer.landmark.to_json()
        if args.visualize:
            write_query_picture(args.visualize, rank, query, image, index.engine.extractor.score_map(image),
                                answer.matches[: args.visualize_top])
    n = max(len(answers) - len(failures), 1)
    print("seconds per query: " + ", ".join(f"{k} {v / n:.3f}" for k, v in timings.items()), file=sys.stderr)
    return answers, failures, notes, landmarks


def search_with_beam(args, beam_args) -> tuple[list, list, set, dict]:
    """The same search as a Beam pipeline: workers write one JSON line per query beside
    ``--output`` (so on Dataflow it must be a gs:// path), read back here in query order."""

    records_path = args.output + ".records.jsonl"
    pipeline, local = make_pipeline(beam_args)
    if not local and not args.output.startswith("gs://"):
        raise cli.UsageError("--output must be a gs:// path on a remote runner (the workers write it)")
    pipeline | "SearchQueries" >> SearchQueries(args.queries, args.index, cli.retrieval_config_from_args(args), records_path,
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
    landmarks = {r["query"]: r["landmark"] for r in records if r.get("landmark") is not None}
    return answers, failures, {note for r in records for note in r.get("notes", ())}, landmarks


class _Match:
    """A match read back from the Beam pipeline's records (the fields results.json carries)."""

    def __init__(self, record: dict):
        self.uri, self.score, self.inliers, self.votes = record["uri"], record["score"], record["inliers"], record["votes"]

    def to_json(self) -> dict:
        return {"uri": self.uri, "score": self.score, "inliers": self.inliers, "votes": self.votes}


def run(argv=None) -> int:
    args, beam_args = parse_args(argv)
    cli.quiet_tensorflow(args.debug)

    start = time.time()
    answers, failures, notes, landmarks = search_with_beam(args, beam_args) if args.runner else search_locally(args)
    storage.write_bytes(args.output, json.dumps(retrieval.results_document(answers, sorted(notes), landmarks),
                                                indent=1).encode())
    print(retrieval.results_table(answers))
    for query, landmark in landmarks.items():
        print(f"{query}: landmark {landmark['landmark']} (confidence {landmark['confidence']:g})")
    for note in sorted(notes):
        print(f"note: {note}", file=sys.stderr)
    for query, error in failures:
        print(f"query failed: {query}: {error}", file=sys.stderr)
    print(f"{len(answers)} queries ({len(failures)} failed) in {time.time() - start:.1f} s; results in {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
