"""Search latency of one index written as one segment (format 1) and as ten (format 2), the same
live images in both, on this machine.

    python benchmarks/segment_search.py [--quick] [--images 20000] [--per-image 100] [--segments 10]

The database is synthetic, in the PCA'd space directly (no extraction): images around 500 random
"landmark" centres, ``--per-image`` unit descriptors each, encoded by an IVF-PQ quantizer trained on
a sample of them. The ten-segment version is what nine nightly runs would leave: one segment of 91%
of the images, then nine of 1% each, every one of which also re-adds 0.2% of the images with new
descriptors (tombstoned in the first segment). The one-segment index holds the same live rows.
Queries are noisy copies of 200 descriptors of random live images. Each reader is opened cold,
then every query is searched twice; the second pass (row groups cached) is the one reported, as
ANN milliseconds per query (``reader.search``) and whole-query milliseconds (``Retriever``, with
voting and RANSAC). The answers of the two indexes are compared and must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench_results")
DIM = 40


def descriptors(rng, centres, landmark, n):
    x = centres[landmark] + 0.6 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def image_rows(quantizer, image_id, x, rng):
    from delf_retrieval import shards

    n = len(x)
    return shards.PostingRows(quantizer.encode(x), np.full(n, image_id, np.int64),
                              rng.uniform(0, 1000, (n, 2)).astype(np.float32), np.ones(n, np.float32),
                              np.ones(n, np.float32))


def records(ids, tag):
    from delf_retrieval import shards

    return shards.image_table([{"image_id": int(i), "uri": f"img/{i}-{tag}.jpg", "width": 1000, "height": 1000,
                                "num_features": 0, "content_hash": tag} for i in ids])


def timed_queries(reader, queries, nprobe):
    """(ANN ms per query, whole-query ms per query, answers) on the second of two passes."""
    from delf_retrieval.retrieval import RetrievalConfig, Retriever

    retriever = Retriever(reader, RetrievalConfig(nprobe=nprobe, top=20))
    for features in queries:  # first pass: fills the row-group caches
        retriever.search(features)
    ann, whole, answers = [], [], []
    for features in queries:
        start = time.perf_counter()
        reader.search(features.descriptors, retriever.config.neighbours, nprobe)
        ann.append(time.perf_counter() - start)
        start = time.perf_counter()
        answers.append([m.to_json() for m in retriever.search(features).matches])
        whole.append(time.perf_counter() - start)
    return 1000 * float(np.median(ann)), 1000 * float(np.median(whole)), answers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--cells", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="2,000 images, 256 cells, 10 queries")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.cells, args.queries = 2000, 256, 10

    from delf_retrieval import quantize, segments, shards
    from delf_retrieval.features import Features

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(500, DIM))
    landmark = rng.integers(0, len(centres), args.images)
    start = time.time()
    content = {i: descriptors(rng, centres, landmark[i], args.per_image) for i in range(args.images)}
    sample = np.concatenate([content[i] for i in rng.choice(args.images, min(args.images, 2000), replace=False)])
    quantizer = quantize.train(sample, quantize.IndexParams(n_cells=args.cells, lopq=False))
    train_seconds = time.time() - start

    nightly = max(args.images // 100, 1)
    changed = max(args.images // 500, 1)
    first = args.images - (args.segments - 1) * nightly
    plan, replaced = [(list(range(first)), {})], {}
    order = rng.permutation(first)
    for s in range(1, args.segments):
        new = list(range(first + (s - 1) * nightly, first + s * nightly))
        again = [int(i) for i in order[(s - 1) * changed:s * changed]]
        for i in again:
            content[i] = descriptors(rng, centres, landmark[i], args.per_image)
            replaced[i] = s
        plan.append((new + again, {"s00": again}))
    m = quantizer.params.pq_m
    start = time.time()
    rows = {i: image_rows(quantizer, i, content[i], rng) for i in range(args.images)}
    encode_seconds = time.time() - start

    with tempfile.TemporaryDirectory(prefix="segment-search-") as scratch:
        single, multi = os.path.join(scratch, "single"), os.path.join(scratch, "multi")
        ids = list(range(args.images))
        shards.write_index(single, quantizer=quantizer, pca=None, images=records(ids, "live"),
                           rows=shards.PostingRows.concatenate([rows[i] for i in ids], m))
        refs, tombstones = [], segments.Tombstones()
        old_rows = {}  # the first segment's rows of the images replaced later: their first content
        rng_old = np.random.default_rng(1)
        for i in replaced:
            old_rows[i] = image_rows(quantizer, i, descriptors(rng_old, centres, landmark[i], args.per_image), rng_old)
        for s, (members, dropped) in enumerate(plan):
            parts = [old_rows[i] if s == 0 and i in old_rows else rows[i] for i in members]
            refs.append(segments.write_segment(multi, shards.PostingRows.concatenate(parts, m),
                                               records(members, "live"), quantizer.params.pq_bits,
                                               segment_id=f"s{s:02d}"))
            for older, gone in dropped.items():
                tombstones = tombstones.adding(older, gone)
        segments.write_version(multi, quantizer=quantizer, pca=None, segments=refs, tombstones=tombstones)
        queries = []
        for i in rng.choice(args.images, args.queries, replace=False):
            take = rng.choice(args.per_image, min(200, args.per_image), replace=False)
            x = content[int(i)][take] + 0.02 * rng.normal(size=(len(take), DIM)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            ones = np.ones(len(take), np.float32)
            queries.append(Features(rng.uniform(0, 1000, (len(take), 2)).astype(np.float32), ones, ones,
                                    x.astype(np.float32), (1000, 1000)))
        figures = {}
        answers = {}
        for name, path in (("1 segment", single), (f"{args.segments} segments", multi)):
            start = time.perf_counter()
            reader = segments.open_reader(path)
            open_ms = 1000 * (time.perf_counter() - start)
            ann_ms, whole_ms, answers[name] = timed_queries(reader, queries, args.nprobe)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            figures[name] = {"open_ms": round(open_ms, 1), "ann_ms": round(ann_ms, 2), "query_ms": round(whole_ms, 2),
                             "bytes": size}
        identical = len({json.dumps(a) for a in answers.values()}) == 1
    load = os.getloadavg()
    report = {"images": args.images, "per_image": args.per_image, "cells": args.cells, "nprobe": args.nprobe,
              "queries": args.queries, "segments": args.segments, "tombstones": len(tombstones),
              "train_seconds": round(train_seconds, 1), "encode_seconds": round(encode_seconds, 1),
              "identical_answers": identical, "results": figures, "load": [round(x, 2) for x in load]}
    print(f"{args.images} images x {args.per_image} rows, {args.cells} cells, nprobe {args.nprobe}, "
          f"{args.queries} queries of 200 descriptors; {len(tombstones)} tombstones; load {load[0]:.2f}")
    print(f"{'index':<14} {'open ms':>9} {'ANN ms/q':>9} {'query ms':>9} {'MB':>7}")
    for name, f in figures.items():
        print(f"{name:<14} {f['open_ms']:>9.1f} {f['ann_ms']:>9.2f} {f['query_ms']:>9.2f} {f['bytes'] / 1e6:>7.1f}")
    print(f"answers identical: {identical}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "segment_search.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
