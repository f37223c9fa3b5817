"""Build the image-level shortlist beside an index (for large corpora):

    python -m pipeline.build_shortlist --index INDEX [--words 16]

One VLAD vector per image (its stored descriptors' residuals to a small vocabulary of visual
words, signed square root, intra- and L2-normalised), and an nmslib HNSW graph over them.
``pipeline.search`` then restricts each query's descriptor search to the ``--shortlist-size``
images nearest its own VLAD vector. Written under INDEX/shortlist/<index id>/ with
INDEX/shortlist.json last; it belongs to the index version it was built for and is ignored
(rebuild it) once another version is published.
"""

from __future__ import annotations

import argparse
import sys
import time

from delf_retrieval.index import layout, segment_reader, shortlist
from pipeline import cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.build_shortlist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="index folder or gs:// prefix")
    parser.add_argument("--words", type=int, default=16, help="visual words of the VLAD vocabulary (default %(default)s)")
    parser.add_argument("--sample-rows", type=int, default=200_000, help="descriptors the words are trained on")
    parser.add_argument("--M", type=int, default=16, help="HNSW graph degree")
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    cli.add_debug_argument(parser)
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)

    start = time.time()
    reader = segment_reader.open_reader(args.index, cache_bytes=256 << 20)
    built = shortlist.build_from_index(reader, n_words=args.words, sample_rows=args.sample_rows, seed=args.seed,
                                       M=args.M, ef_construction=args.ef_construction)
    if layout.read_manifest(args.index)["index_id"] != reader.manifest["index_id"]:
        print(f"{args.index} was re-published while the shortlist was built: run again for the new version",
              file=sys.stderr)
        return 1
    record = built.save(args.index, reader.manifest["index_id"])
    print(f"image shortlist of {record['images']} images ({record['words']} words, {record['dim']}-D VLAD, "
          f"HNSW M={args.M}) written beside {args.index} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
