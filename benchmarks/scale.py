"""An index of N images on this machine, served through the first stage: build time per stage,
bytes on disk, query latency and serving memory, the first stage's recall of the full scan, mAP of
the real queries with and without it, and the neighbour stage's seconds per image.

    python benchmarks/scale.py --images N [--json FILE] [--work DIR] [--shortlist-size 1000]
        [--full-scan auto|on|off] [--segment-images 25000]
    python benchmarks/scale.py --images N --first-stage-grid 0:4,16:16   # the first stage alone, per
        near-duplicate setting (slots:candidates), on the index written before
    python benchmarks/scale.py --paired BEFORE.json,AFTER.json   # two serving runs' mAP, paired per query

The index holds:

- the real photographs of the three validation sets, their features from retrieval_quality.py's
  cache (bench_results/cache; extracted with the lite preset): landmarks-dev (205), landmarks-hard
  (339), landmarks-train's database split (1,403), and their queries: dev's 165 and hard's 177 scene
  photos (each with itself excluded) and the 90 train queries of the 18 landmarks
  ``train_attention_model.landmark_halves`` puts first;
- distractors up to N images, 1000 rows each, each made from ONE real image's encoded rows (dev's
  and hard's distractor photos, and landmarks-train photos of the other 18 landmarks: never a
  query's group): 1000 of its rows drawn (with replacement when it has fewer), 3 of each row's 10
  PQ sub-codes re-drawn and the keypoints shuffled among the rows and jittered, so that it
  resembles its source to the first stage but does not verify.

The PCA and quantizer are trained on the real descriptors (``encode.train``, ``expected_count`` the
index's rows, as a build sizes LOPQ). Segments of ``--segment-images`` images are written as a build
writes them (cell-sorted posting shards, then the first stage's parts). The neighbour table holds
the real images' verified neighbours, found by the neighbour stage through the first stage (a
distractor's would be empty: it verifies against nothing); its seconds per image are timed on them.

Queries are answered by a separate serving process (``--serve``) that opens the index as
``pipeline.serve`` does: through the first stage (``image_shortlist="on"``, cell lists never held)
or, for the full scan, with every posting held in memory (``load_all``); its peak RSS is reported.
Times are search + verification + expansion, extraction apart. The full scan runs where it fits
(``--full-scan auto``: up to 2e5 images). First-stage recall: per query, the share of the images
the full scan verifies (>= 10 inliers, the neighbour table's threshold; and >= 4, every verified
image; each also over the real photos alone, distractors left out, and over the query's true
matches alone, its ground truth's positives and junk) found in the first stage's top K, averaged
over the queries that verify something; pooled over the queries (all, and per set), the same
share at K 1000 by kind (positive, junk, other real photo, distractor) and inliers (4 to 9,
>= 10); and at any size, the share of each real query's ground-truth positives in the top K, per
set. ``--reuse --answers`` scores the answers already served under ``--work`` again, serving nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
RESULTS = os.path.join(ROOT, "bench_results")

ROWS_PER_DISTRACTOR = 1000
REDRAWN_SUBCODES = 3
KS = (100, 300, 1000)


def real_sets():
    """{set: (root, database rows, queries, truth, features)} from retrieval_quality's cache, and
    the distractor sources (set, path) (never a query's group)."""
    import first_stage as fs
    from train_attention_model import landmark_halves

    out, sources = {}, []
    for name in ("dev", "hard", "train"):
        root, rows, database, queries, truth = fs.evaluation_set(name)
        features = fs.cached_features(name, root, rows, fs.CACHE)
        if features is None:
            raise SystemExit(f"{name}: features not in {fs.CACHE}: run benchmarks/retrieval_quality.py first")
        label = dict(rows)
        if name == "train":
            asked, other = (set(h) for h in landmark_halves(root))
            queries = [q for q in queries if label[q] in asked]
            truth = {q: t for q, t in truth.items() if q in set(queries)}
            sources += [(name, p) for p, l in database if l in other]
        else:
            sources += [(name, p) for p, l in rows if not l]
        out[name] = (root, database, queries, truth, features)
    return out, sources


def uri_of(name: str, path: str) -> str:
    return f"{name}/{path}"


def distractor_rows(rng, source, quantizer, first_id: int, count: int):
    """``count`` distractors made from one source's encoded rows (see the module's docstring)."""
    from delf_retrieval.index import shards
    from delf_retrieval.quantize import Encoded

    regions, codes, locations, scales, attentions = source
    k = quantizer.pq.codebooks.shape[1]
    n = ROWS_PER_DISTRACTOR
    take = rng.integers(0, len(regions), (count, n)).ravel()
    new_codes = codes[take].copy()
    m = new_codes.shape[1]
    # Three distinct sub-codes of each row: a random start and two random distinct steps mod m.
    first = rng.integers(0, m, len(take))
    steps = np.stack([np.ones(len(take), np.int64), rng.integers(2, m, len(take))], 1)
    which = np.column_stack([first, (first + steps[:, 0]) % m, (first + steps[:, 1]) % m])[:, :REDRAWN_SUBCODES]
    np.put_along_axis(new_codes, which, rng.integers(0, k, (len(take), REDRAWN_SUBCODES)).astype(np.uint8), axis=1)
    shuffled = rng.permuted(locations[take].reshape(count, n, 2), axis=1)  # keypoints swapped among the rows
    shuffled = shuffled.reshape(-1, 2) + rng.normal(0, 8, (len(take), 2)).astype(np.float32)
    ids = np.repeat(np.arange(first_id, first_id + count, dtype=np.int64), n)
    region = regions[take]
    return shards.PostingRows(Encoded(quantizer.regions.region_cell[region], region, new_codes), ids,
                              np.clip(shuffled, 0, 4000), scales[take], attentions[take])


def build(args, work: str) -> dict:
    """Write the index under ``work/index`` and the queries' features; returns the build report."""
    from delf_retrieval import quantize
    from delf_retrieval.build import encode
    from delf_retrieval.corpus import inputs
    from delf_retrieval.first_stage import parts, search, vlad
    from delf_retrieval.index import layout, segment_reader, segments, shards
    from delf_retrieval.quantize import pca as pca_lib

    seconds: dict = {}
    start = time.perf_counter()
    sets, sources = real_sets()
    real = {}
    for name, (_, database, _, _, features) in sets.items():
        for path, _ in database:
            if len(features[path]):
                real[uri_of(name, path)] = features[path]
    raw = np.concatenate([f.descriptors for f in real.values()])
    n_distractors = max(args.images - len(real), 0)
    total_rows = len(raw) + n_distractors * ROWS_PER_DISTRACTOR
    model_path = os.path.join(work, "model.npz")  # kept: a re-run of the same size trains nothing
    if os.path.exists(model_path):
        with np.load(model_path) as saved:
            projection = pca_lib.PCA.load(io.BytesIO(saved["pca"].tobytes()))
            quantizer = quantize.Quantizer.load(io.BytesIO(saved["quantizer"].tobytes()))
    else:
        params = quantize.IndexParams(**({"n_cells": args.cells} if args.cells else {}))
        projection, quantizer = encode.train(raw[np.random.default_rng(0).permutation(len(raw))[:args.train_rows]],
                                             params, expected_count=total_rows)
        np.savez(model_path, pca=np.frombuffer(projection.to_npz_bytes(), np.uint8),
                 quantizer=np.frombuffer(quantizer.to_npz_bytes(), np.uint8))
    seconds["train"] = time.perf_counter() - start
    print(f"trained {quantizer.params.spec} on {min(len(raw), args.train_rows)} of {len(raw)} real descriptors "
          f"in {seconds['train']:.0f} s; {len(real)} real images + {n_distractors} distractors", flush=True)
    ids = {uri: inputs.image_id(uri) for uri in real}
    encoded = {uri: encode.encode_image(ids[uri], f, projection, quantizer) for uri, f in real.items()}
    pool = []
    for name, path in sources:
        e = encoded.get(uri_of(name, path))
        if e is not None:
            pool.append((e.encoded.regions, e.encoded.codes, e.locations, e.scales, e.attentions))
    # The queries' features, for the serving process.
    queries, owners = [], {}
    for name, (_, _, asked, _, features) in sets.items():
        for q in asked:
            queries.append((name, q))
            owners[f"{name}/{q}"] = ids.get(uri_of(name, q), -1)
    arrays = {}
    for i, (name, q) in enumerate(queries):
        f = sets[name][4][q]
        arrays[f"d{i}"], arrays[f"l{i}"] = projection.transform(f.descriptors.astype(np.float32)), f.locations
    np.savez(os.path.join(work, "queries.npz"), **arrays)
    with open(os.path.join(work, "queries.json"), "w") as f:
        json.dump({"queries": [f"{n}/{q}" for n, q in queries], "owners": owners}, f)
    root = os.path.join(work, "index")
    words = vlad.words_of(quantizer.coarse.centroids)
    refs, by_segment = [], {}
    seconds.update({"postings": 0.0, "first_stage": 0.0, "distractors": 0.0})
    done, next_id, number = 0, 1, 0
    if args.resume and os.path.exists(os.path.join(root, "manifest.json")):
        # Go on from the segments already written: distractor ids are 1, 2, ... in order.
        manifest = layout.read_manifest(root)
        refs, by_segment = segments.segment_refs(manifest), dict(manifest["first_stage"]["segments"])
        done = sum(ref.images for ref in refs)
        number, next_id = len(refs), done - len(real) + 1
        previous = json.load(open(os.path.join(work, "build.json"))) if os.path.exists(
            os.path.join(work, "build.json")) else {}
        seconds.update({k: v for k, v in previous.get("build_seconds", {}).items() if k in seconds})
        print(f"  resuming after {number} segments, {done} images", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
    rng = np.random.default_rng(1 + number)
    entry = search.entry(vlad.DEFAULT_WORDS, by_segment)
    real_uris = sorted(real)
    while done < len(real_uris) + n_distractors:
        if number and args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            print(f"  stopped at {done} images: --max-minutes {args.max_minutes} reached", flush=True)
            break
        t = time.perf_counter()
        parts_rows, records = [], []
        if number == 0:
            parts_rows.append(shards.PostingRows.concatenate([encoded[u] for u in real_uris], quantizer.params.pq_m))
            records += [{"image_id": ids[u], "uri": u, "width": 0, "height": 0, "num_features": len(real[u]),
                         "content_hash": ""} for u in real_uris]
        room = args.segment_images - len(records)
        count = min(room, len(real_uris) + n_distractors - done - len(records))
        made = 0
        while made < count:
            batch = min(count - made, 64)
            source = pool[int(rng.integers(len(pool)))]
            parts_rows.append(distractor_rows(rng, source, quantizer, next_id, batch))
            records += [{"image_id": i, "uri": f"distractor:{i}", "width": 0, "height": 0,
                         "num_features": ROWS_PER_DISTRACTOR, "content_hash": ""}
                        for i in range(next_id, next_id + batch)]
            next_id += batch
            made += batch
        rows = shards.PostingRows.concatenate(parts_rows, quantizer.params.pq_m)
        del parts_rows
        seconds["distractors"] += time.perf_counter() - t
        segment_id = f"s{number:04d}"
        t = time.perf_counter()
        refs.append(segments.write_segment(root, rows, shards.image_table(records), quantizer.params.pq_bits,
                                           segment_id=segment_id))
        seconds["postings"] += time.perf_counter() - t
        t = time.perf_counter()
        by_segment[segment_id] = parts.write_segment_parts(root, segment_id, rows, quantizer, words, len(records))
        seconds["first_stage"] += time.perf_counter() - t
        done += len(records)
        number += 1
        del rows
        entry = search.entry(vlad.DEFAULT_WORDS, by_segment)  # a version after every segment: it can stop here
        segments.write_version(root, quantizer=quantizer, pca=projection, segments=refs, first_stage=entry)
        print(f"  segment {segment_id}: {done} images written ({time.perf_counter() - start:.0f} s; "
              f"postings {seconds['postings']:.0f} s, first stage {seconds['first_stage']:.0f} s)", flush=True)

    # The neighbour stage through the first stage, for the real images (in batches, as the build).
    t = time.perf_counter()
    sample = real_uris[:: max(1, len(real_uris) // args.neighbour_images)] if args.neighbour_images else real_uris
    table, neighbour_seconds = neighbour_stage(root, [ids[u] for u in sample], args.shortlist_size)
    segments.write_version(root, quantizer=quantizer, pca=projection, segments=refs, first_stage=entry,
                           neighbours=table)
    seconds["neighbours_real_images"] = time.perf_counter() - t
    reader = segment_reader.open_reader(root)

    size = sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(root) for name in names)
    stage_bytes = sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(root) for name in names
                      if parts.FIRST_STAGE_DIR in d)
    return {"images": done, "requested_images": args.images, "real_images": len(real), "rows": int(reader.num_rows),
            "index": quantizer.params.spec, "segments": len(refs), "build_seconds": seconds,
            "index_bytes": size, "first_stage_bytes": stage_bytes, "neighbour_s_per_image": neighbour_seconds,
            "neighbour_images_timed": len(sample)}


def neighbour_stage(root: str, image_ids: list, shortlist_size: int):
    """The build's neighbour stage for these images of the index at ``root``: each searches with
    its stored rows (read through the first stage, decoded), in batches of 32 as the build batches
    them. Returns (their neighbour table, seconds per image, the first batch left out: it compiles)."""
    from delf_retrieval.first_stage import search
    from delf_retrieval.index import segment_reader
    from delf_retrieval.index.neighbour_table import NeighbourConfig, NeighbourTable, cut, symmetric
    from delf_retrieval.query import expansion
    from delf_retrieval.query.retrieval import RetrievalConfig, Retriever

    reader = segment_reader.open_reader(root)
    stage = search.FirstStage.open(reader)
    retriever = Retriever(reader, RetrievalConfig(), stage, shortlist_size)
    config, edges, timed = NeighbourConfig(), [], []
    for b in range(0, len(image_ids), 32):
        items = []
        for image_id in image_ids[b:b + 32]:
            rows = stage.rows_of(np.array([image_id]))
            items.append((image_id, reader.quantizer.decode(rows.table["region"].astype(np.int64), rows.table["code"]),
                          np.stack([rows.table["y"], rows.table["x"]], 1).astype(np.float32)))
        t = time.perf_counter()
        found = expansion.search_neighbours_batch(retriever, items, config)
        timed.append((time.perf_counter() - t, len(items)))
        for (image_id, _, _), (neighbours, inliers) in zip(items, found):
            edges += [(image_id, n, c) for n, c in zip(neighbours.tolist(), inliers.tolist())]
    seconds = sum(s for s, _ in timed[1:]) / max(sum(n for _, n in timed[1:]), 1)
    found = np.asarray(edges, np.int64).reshape(-1, 3)
    table = cut(symmetric(found[:, 0], found[:, 1], found[:, 2]), config.k)
    print(f"neighbour stage: {seconds:.3f} s per image over {len(image_ids)} images, {len(table)} edges", flush=True)
    return NeighbourTable(table.image_ids, table.neighbours, table.inliers), seconds


def serve(args) -> int:
    """The serving process: open the index as the service does, answer every query, report."""
    from delf_retrieval.query import retrieval
    from delf_retrieval.query.retrieval import RetrievalConfig

    start = time.perf_counter()
    staged = args.mode == "staged"
    # The full scan holds every posting, and its row groups for verification: a cache the index's size.
    retriever = retrieval.open_index(args.serve, RetrievalConfig(top=100), image_shortlist="on" if staged else "off",
                                     shortlist_size=args.shortlist_size, cache_bytes=(2 if staged else 12) << 30)
    if not staged:
        retriever.reader.load_all()
    opened = time.perf_counter() - start
    with open(os.path.join(os.path.dirname(args.query_file), "queries.json")) as f:
        meta = json.load(f)
    data = np.load(args.query_file)
    names = meta["queries"]
    out = {"mode": args.mode, "open_seconds": opened, "queries": {}}
    retriever.search_projected(data["d0"], data["l0"])  # compile the kernels outside the timing
    for i, name in enumerate(names):
        projected, locations = data[f"d{i}"], data[f"l{i}"]
        own = meta["owners"][name]
        t = time.perf_counter()
        result = retriever.search_projected(projected, locations)
        seconds = time.perf_counter() - t
        record = {"seconds": seconds, "timings": result.timings,
                  "ranking": [m.uri for m in result.matches if m.image_id != own],
                  "verified": {str(m.image_id): m.inliers for m in result.matches
                               if m.verified and m.inliers >= 4 and m.image_id != own}}
        if staged:
            top = retriever.first_stage.top(projected, max(KS) + 1)
            record["top"] = [int(i) for i in top if i != own][:max(KS)]
        out["queries"][name] = record
    from ann_common import peak_rss_mb

    out["rss_mb"] = peak_rss_mb()
    with open(args.json, "w") as f:
        json.dump(out, f)
    return 0


def served(args, work: str, mode: str) -> dict:
    path = os.path.join(work, f"served-{mode}.json")
    command = [sys.executable, os.path.abspath(__file__), "--serve", os.path.join(work, "index"), "--mode", mode,
               "--query-file", os.path.join(work, "queries.npz"), "--shortlist-size", str(args.shortlist_size),
               "--json", path]
    subprocess.run(command, check=True)
    with open(path) as f:
        return json.load(f)


def positives_share(name: str, truth, top: set) -> float:
    """The share of a query's ground-truth positives (of set ``name``) among the image ids ``top``."""
    from delf_retrieval.corpus import inputs

    wanted = {inputs.image_id(uri_of(name, p)) for p in truth.positives}
    return len(wanted & top) / len(wanted)


def evaluate(report: dict, staged: dict, full: dict | None) -> None:
    import first_stage as fs

    sets, _ = real_sets()
    for mode, answers in (("staged", staged), ("full", full)):
        if answers is None:
            continue
        times = np.array([a["seconds"] for a in answers["queries"].values()])
        report[mode] = {"query_p50_s": float(np.percentile(times, 50)), "query_p95_s": float(np.percentile(times, 95)),
                        "rss_mb": answers["rss_mb"], "open_seconds": answers["open_seconds"],
                        "stage_seconds": {k: float(np.mean([a["timings"].get(k, 0.0)
                                                            for a in answers["queries"].values()]))
                                          for k in ("shortlist", "ann", "voting", "ransac", "expansion")},
                        "map": {}}
        for name, (_, _, asked, truth, _) in sets.items():
            rankings = {q: [u.split("/", 1)[1] for u in answers["queries"][f"{name}/{q}"]["ranking"]
                            if u.startswith(name + "/")] for q in asked}
            report[mode]["map"][name] = fs.mean_ap(rankings, truth)
    report.update({k: report["staged"][k] for k in ("query_p50_s", "query_p95_s", "rss_mb")})
    # The share of each query's ground-truth positives in the first stage's top K: at any size.
    report["first_stage_positives"] = {}
    for name, (_, _, _, truth, _) in sets.items():
        shares = [positives_share(name, t, set(staged["queries"][f"{name}/{q}"]["top"])) for q, t in truth.items()
                  if f"{name}/{q}" in staged["queries"] and t.positives]
        report["first_stage_positives"][name] = float(np.mean(shares)) if shares else None
    if full is None:
        report["first_stage_recall"] = None
        return
    from delf_retrieval.corpus import inputs

    real = {inputs.image_id(uri_of(name, p)) for name, (_, database, _, _, _) in sets.items() for p, _ in database}
    positives, junk = {}, {}  # per query, its ground truth's images: the verified images that are true matches
    for name, (_, _, asked, truth, _) in sets.items():
        for q in asked:
            t = truth.get(q)
            positives[f"{name}/{q}"] = {inputs.image_id(uri_of(name, p)) for p in t.positives} if t else set()
            junk[f"{name}/{q}"] = {inputs.image_id(uri_of(name, p)) for p in t.junk} if t else set()
    matches = {q: positives[q] | junk[q] for q in positives}
    recall, verified = {}, {"real": [], "distractors": [], "true matches": []}
    for threshold in (10, 4):
        # every verified image; the real photos alone; the query's true matches alone
        for label in ("", " real", " true"):
            for k in KS:
                values = []
                for name, answer in full["queries"].items():
                    wanted = {int(i) for i, c in answer["verified"].items() if c >= threshold}
                    wanted &= {"": wanted, " real": real, " true": matches.get(name, set())}[label]
                    if wanted:
                        values.append(len(wanted & set(staged["queries"][name]["top"][:k])) / len(wanted))
                recall[f">={threshold}{label}@{k}"] = float(np.mean(values)) if values else None
    pooled: dict = {}  # every query's verified images by kind and inliers: [verified, in the top K]
    for name, answer in full["queries"].items():
        ids = {int(i) for i in answer["verified"]}
        verified["real"].append(len(ids & real))
        verified["distractors"].append(len(ids - real))
        verified["true matches"].append(len(ids & matches.get(name, set())))
        top = set(staged["queries"][name]["top"][:max(KS)])
        for i, inliers in answer["verified"].items():
            i = int(i)
            kind = ("positive" if i in positives.get(name, ()) else "junk" if i in junk.get(name, ())
                    else "other real" if i in real else "distractor")
            for group in ("all", name.split("/", 1)[0]):
                counts = pooled.setdefault(group, {}).setdefault(
                    f"{kind}, {'>= 10' if inliers >= 10 else '4 to 9'} inliers", [0, 0])
                counts[0] += 1
                counts[1] += i in top
    report["first_stage_recalls"] = recall
    report["full_scan_verified_per_query"] = {k: float(np.mean(v)) for k, v in verified.items()}
    report["full_scan_verified_in_top"] = {group: {k: {"verified": n, "in_top": kept, "share": kept / n}
                                                   for k, (n, kept) in sorted(kinds.items())}
                                           for group, kinds in pooled.items()}
    report["first_stage_recall"] = recall[f">=10@{max(KS)}"]


def first_stage_grid(work: str, settings: list[tuple[int, int]], k: int) -> dict:
    """The first stage alone, in this process, on the written index: per (slots, candidates) of
    the near-duplicate spread (slots 0: the plain ranking), the share of each set's positives in
    the real queries' top ``k`` and, where the full scan was served, of the images it verified with
    >= 10 inliers; and milliseconds per query (in batches of 32, as the neighbour stage asks)."""
    import first_stage as fs
    from delf_retrieval.first_stage import search
    from delf_retrieval.index import segment_reader

    stage = search.FirstStage.open(segment_reader.open_reader(os.path.join(work, "index")))
    with open(os.path.join(work, "queries.json")) as f:
        meta = json.load(f)
    data = np.load(os.path.join(work, "queries.npz"))
    vectors = np.stack([stage.vector(data[f"d{i}"]) for i in range(len(meta["queries"]))])
    truth = {name: fs.evaluation_set(name)[4] for name in ("dev", "hard", "train")}
    full_path = os.path.join(work, "served-full.json")
    full = json.load(open(full_path))["queries"] if os.path.exists(full_path) else None
    out = {}
    for slots, candidates in settings:
        start = time.perf_counter()
        tops = [t for b in range(0, len(vectors), 32)
                for t in stage.top_vectors(vectors[b:b + 32], k + 1, slots=slots, candidates=candidates)]
        seconds = (time.perf_counter() - start) / len(vectors)
        shares: dict = {}
        for i, name in enumerate(meta["queries"]):
            kind, q = name.split("/", 1)
            top = set([x for x in tops[i].tolist() if x != meta["owners"][name]][:k])
            t = truth[kind].get(q)
            if t is not None and t.positives:
                shares.setdefault(kind, []).append(positives_share(kind, t, top))
            verified = {int(i) for i, c in full[name]["verified"].items() if c >= 10} if full else set()
            if verified:
                shares.setdefault("verified >= 10", []).append(len(verified & top) / len(verified))
        out[f"{slots} slots, {candidates}K"] = {"ms_per_query": 1000 * seconds,
                                               **{key: float(np.mean(v)) for key, v in shares.items()}}
        print(f"{slots} slots among the nearest {candidates}K: " + ", ".join(
            f"{key} {v:.3f}" if key != "ms_per_query" else f"{v:.0f} ms/query"
            for key, v in out[f"{slots} slots, {candidates}K"].items()), flush=True)
    return out


def paired(before: str, after: str) -> dict:
    """Per set, mAP of two serving runs' answers (``served-*.json``, the same queries) and the mean
    per-query AP difference with its paired standard error."""
    import first_stage as fs
    from delf_retrieval.query import evaluation

    runs = [json.load(open(path))["queries"] for path in (before, after)]
    out = {}
    for name in ("dev", "hard", "train"):
        aps = []
        for q, t in fs.evaluation_set(name)[4].items():
            key = f"{name}/{q}"
            if t.positives and key in runs[0]:
                rankings = [[u.split("/", 1)[1] for u in run[key]["ranking"] if u.startswith(name + "/")]
                            for run in runs]
                aps.append([evaluation.average_precision(evaluation.positive_ranks(r, t), len(t.positives))
                            for r in rankings])
        a = np.asarray(aps)
        d = a[:, 1] - a[:, 0]
        out[name] = {"queries": len(a), "before": float(a[:, 0].mean()), "after": float(a[:, 1].mean()),
                     "difference": float(d.mean()), "standard_error": float(d.std(ddof=1) / np.sqrt(len(d)))}
        print(f"{name}: {100 * a[:, 0].mean():.1f} -> {100 * a[:, 1].mean():.1f}, {100 * d.mean():+.1f} "
              f"({100 * out[name]['standard_error']:.1f}) over {len(a)} queries", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=float, default=1e5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--work", default=None, help="where the index is written (default bench_results/scale-N)")
    parser.add_argument("--shortlist-size", type=int, default=1000)
    parser.add_argument("--full-scan", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--segment-images", type=int, default=25_000)
    parser.add_argument("--cells", type=int, default=0, help="coarse cells (0: the build's default)")
    parser.add_argument("--train-rows", type=int, default=500_000, help="real descriptors the quantizer trains on")
    parser.add_argument("--neighbour-images", type=int, default=0, help="time the neighbour stage on this many "
                        "real images (0: all of them)")
    parser.add_argument("--max-minutes", type=float, default=0, help="stop adding segments after this many "
                        "minutes of build (0: never); the index then holds the images written so far")
    parser.add_argument("--reuse", action="store_true", help="serve the index already written under --work")
    parser.add_argument("--resume", action="store_true", help="add segments to the index already written under "
                        "--work (a run stopped by --max-minutes) until it holds --images")
    parser.add_argument("--remeasure-neighbours", type=int, default=0, help="with --reuse: time the neighbour "
                        "stage again on this many real images of the written index")
    parser.add_argument("--modes", default="staged,full", help="serving modes to measure (full: where it fits)")
    parser.add_argument("--answers", action="store_true", help="with --reuse: score the answers already served "
                        "under --work (served-*.json) again, serving nothing")
    parser.add_argument("--first-stage-grid", default="", help="with --reuse: only the first stage, per "
                        "SLOTS:CANDIDATES of the near-duplicate spread (e.g. 0:4,16:4,16:16): its recall (no serving)")
    parser.add_argument("--paired", default="", help="BEFORE.json,AFTER.json: two serving runs' answers "
                        "(served-*.json) compared per query: mAP per set and the paired difference (no index needed)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="staged", help=argparse.SUPPRESS)
    parser.add_argument("--query-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)
    args.images = int(args.images)
    work = args.work or os.path.join(RESULTS, f"scale-{args.images}")
    os.makedirs(work, exist_ok=True)
    report_path = os.path.join(work, "build.json")
    if args.paired:
        paired(*args.paired.split(","))
        return 0
    if args.first_stage_grid:
        settings = [tuple(int(x) for x in spec.split(":")) for spec in args.first_stage_grid.split(",")]
        grid = first_stage_grid(work, settings, args.shortlist_size)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"images": args.images, "first_stage_grid": grid, "load_average": os.getloadavg()}, f, indent=1)
        return 0
    if args.reuse:
        with open(report_path) as f:
            report = json.load(f)
        if args.remeasure_neighbours:
            with open(os.path.join(work, "queries.json")) as f:
                owners = sorted({i for i in json.load(f)["owners"].values() if i >= 0})
            sample = owners[:: max(1, len(owners) // args.remeasure_neighbours)]
            report["neighbour_s_per_image"] = neighbour_stage(os.path.join(work, "index"), sample,
                                                              args.shortlist_size)[1]
            report["neighbour_images_timed"] = len(sample)
    else:
        report = build(args, work)
        with open(report_path, "w") as f:
            json.dump(report, f)
    report["load_average"] = os.getloadavg()
    modes = args.modes.split(",")
    if args.reuse and args.answers:
        answers = {m: os.path.join(work, f"served-{m}.json") for m in ("staged", "full")}
        staged, full = (json.load(open(answers[m])) if os.path.exists(answers[m]) else None for m in ("staged", "full"))
        evaluate(report, staged, full)
        return write_report(report, args.json)
    staged = served(args, work, "staged")
    full = None
    if "full" in modes and (args.full_scan == "on" or (args.full_scan == "auto" and report["images"] <= 200_000)):
        full = served(args, work, "full")
    elif args.reuse and os.path.exists(os.path.join(work, "served-full.json")) and args.full_scan != "off":
        with open(os.path.join(work, "served-full.json")) as f:  # measured before, by the same index
            full = json.load(f)
    evaluate(report, staged, full)
    report["load_average_end"] = os.getloadavg()
    return write_report(report, args.json)


def write_report(report: dict, path: str | None) -> int:
    """Print the report, and write it to ``path`` if one is given."""
    text = json.dumps(report, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
