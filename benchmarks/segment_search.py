"""Search latency of one index written as one segment (format 1 and format 2) and as ten (format 2),
the same live images in all, held in memory (resident) and read per probe (lazy), on this machine.

    python benchmarks/segment_search.py [--quick] [--images 20000] [--per-image 100] [--segments 10]

The database is synthetic, in the PCA'd space directly (no extraction): images around 500 random
"landmark" centres, ``--per-image`` unit descriptors each, encoded by an IVF-PQ quantizer trained on
a sample of them. The ten-segment version is what nine nightly runs would leave: one segment of 91%
of the images, then nine of 1% each, every one of which also re-adds 0.2% of the images with new
descriptors (tombstoned in the first segment). The one-segment indexes hold the same live rows.
Queries are noisy copies of 200 descriptors of random live images. Each reader is opened cold,
then either ``load_all()`` (resident: what the engine does when the index fits in memory) or not
(lazy: row groups and merged cells cached as probes need them, as ``pipeline.search`` reads);
the six readers (three indexes, two modes) take turns query by query, every query is searched twice and the
second pass is the one reported, as ANN milliseconds per
query (``reader.search``), the same restricted to 1,000 live images (``image_ids``, as under the
image shortlist) and whole-query milliseconds (``Retriever``, with voting and RANSAC). The answers
of every index and mode are compared and must be identical (the script exits 1 otherwise).
"""

from __future__ import annotations

import argparse
import gc
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
    from delf_retrieval.index import shards

    n = len(x)
    return shards.PostingRows(quantizer.encode(x), np.full(n, image_id, np.int64),
                              rng.uniform(0, 1000, (n, 2)).astype(np.float32), np.ones(n, np.float32),
                              np.ones(n, np.float32))


def records(ids, tag):
    from delf_retrieval.index import shards

    return shards.image_table([{"image_id": int(i), "uri": f"img/{i}-{tag}.jpg", "width": 1000, "height": 1000,
                                "num_features": 0, "content_hash": tag} for i in ids])


def timed_queries(readers: dict, queries, nprobe, among) -> tuple[dict, dict]:
    """Per reader: (ANN ms per query, restricted ANN ms per query, whole-query ms per query) on the
    second of two passes, and its answers (ANN distances and row image ids, and the matches). The
    readers take turns query by query, so a change in the machine's load falls on all alike."""
    from delf_retrieval.query.retrieval import RetrievalConfig, Retriever

    retrievers = {name: Retriever(reader, RetrievalConfig(nprobe=nprobe, top=20)) for name, reader in readers.items()}
    k = RetrievalConfig().neighbours
    for features in queries:  # first pass: fills the caches (lazy) and compiles the kernel
        for name, reader in readers.items():
            retrievers[name].search(features)
            reader.search(features.descriptors, k, nprobe, image_ids=among)
    times = {name: ([], [], []) for name in readers}
    answers = {name: [] for name in readers}
    for features in queries:
        for name, reader in readers.items():
            ann, restricted, whole = times[name]
            start = time.perf_counter()
            d, rows = reader.search(features.descriptors, k, nprobe)
            ann.append(time.perf_counter() - start)
            start = time.perf_counter()
            d_among, rows_among = reader.search(features.descriptors, k, nprobe, image_ids=among)
            restricted.append(time.perf_counter() - start)
            start = time.perf_counter()
            matches = [m.to_json() for m in retrievers[name].search(features).matches]
            whole.append(time.perf_counter() - start)
            answers[name].append({"ann": [d.tolist(), reader.rows(rows).image_ids.tolist()],
                                  "restricted": [d_among.tolist(), reader.rows(rows_among).image_ids.tolist()],
                                  "matches": matches})
    ms = lambda t: round(1000 * float(np.median(t)), 2)  # noqa: E731
    return {name: tuple(ms(t) for t in times[name]) for name in readers}, answers


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

    from delf_retrieval import quantize
    from delf_retrieval.extraction.features import Features
    from delf_retrieval.index import segment_reader, segments, shards

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
        single, one, multi = (os.path.join(scratch, n) for n in ("single", "one", "multi"))
        ids = list(range(args.images))
        live_rows = shards.PostingRows.concatenate([rows[i] for i in ids], m)
        shards.write_index(single, quantizer=quantizer, pca=None, images=records(ids, "live"), rows=live_rows)
        segments.write_version(one, quantizer=quantizer, pca=None, segments=[
            segments.write_segment(one, live_rows, records(ids, "live"), quantizer.params.pq_bits, segment_id="s00")])
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
        among = np.sort(rng.choice(args.images, min(1000, args.images), replace=False)).astype(np.int64)
        figures = {}
        indexes = (("1 segment, format 1", single), ("1 segment, format 2", one),
                   (f"{args.segments} segments", multi))
        readers, opened = {}, {}
        for mode in ("resident", "lazy"):
            for name, path in indexes:
                gc.collect()
                start = time.perf_counter()
                reader = segment_reader.open_reader(path)
                open_ms = 1000 * (time.perf_counter() - start)
                start = time.perf_counter()
                if mode == "resident":
                    reader.load_all()
                readers[(mode, name, path)] = reader
                opened[(mode, name, path)] = (open_ms, 1000 * (time.perf_counter() - start))
        timings, answers = timed_queries(readers, queries, args.nprobe, among)
        for (mode, name, path), reader in readers.items():
            (open_ms, load_ms), (ann_ms, among_ms, whole_ms) = opened[(mode, name, path)], timings[(mode, name, path)]
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
            figures[f"{name}, {mode}"] = {
                "mode": mode, "open_ms": round(open_ms, 1), "load_all_ms": round(load_ms, 1), "ann_ms": ann_ms,
                "restricted_ann_ms": among_ms, "query_ms": whole_ms, "bytes": size,
                "resident_estimate_bytes": reader.resident_bytes() if mode == "resident" else None}
        del readers
        identical = len({json.dumps(a) for a in answers.values()}) == 1
    load = os.getloadavg()
    report = {"images": args.images, "per_image": args.per_image, "cells": args.cells, "nprobe": args.nprobe,
              "queries": args.queries, "segments": args.segments, "tombstones": len(tombstones),
              "train_seconds": round(train_seconds, 1), "encode_seconds": round(encode_seconds, 1),
              "identical_answers": identical, "results": figures, "load": [round(x, 2) for x in load]}
    print(f"{args.images} images x {args.per_image} rows, {args.cells} cells, nprobe {args.nprobe}, "
          f"{args.queries} queries of 200 descriptors; {len(tombstones)} tombstones; load {load[0]:.2f}")
    print(f"{'index':<32} {'open ms':>8} {'load ms':>8} {'ANN ms/q':>9} {'1000 img':>9} {'query ms':>9} "
          f"{'MB':>6} {'est. MB':>8}")
    mb = lambda b: f"{b / 1e6:.0f}" if b is not None else "-"  # noqa: E731
    for name, f in figures.items():
        print(f"{name:<32} {f['open_ms']:>8.1f} {f['load_all_ms']:>8.1f} {f['ann_ms']:>9.2f} "
              f"{f['restricted_ann_ms']:>9.2f} {f['query_ms']:>9.2f} {f['bytes'] / 1e6:>6.1f} "
              f"{mb(f['resident_estimate_bytes']):>8}")
    print(f"answers identical: {identical}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "segment_search.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
