"""First stage: how many of the images that the full scan verifies an image-level first stage keeps
in its top K, and what restricting the full pipeline to that top K does to mAP.

    python benchmarks/first_stage.py [--sets dev,hard,train] [--words 1024,4096,16384]
        [--query-assignment 1,5] [--ks 20,50,100,200,500,1000] [--map-ks 50,100]
        [--features-cache DIR] [--json FILE]

The sets are retrieval_quality.py's (dev: 165 scene photos query the other 204 images of
landmarks-dev; hard: landmarks-hard's 177 group photos query the other 338 images, mAP under its Hard
protocol; train: 180 queries against 1,403 images of landmarks-train), their features read from the
feature cache that benchmark writes (``--features-cache``; a set whose features are not all there is
left out with a note). Per set one index of the database (``retrieval_quality.build_index``, the
default IndexParams), then per query, with itself excluded:

- the full scan: ``Retriever.search`` over every posting row, every voted image verified by RANSAC
  (``shortlist`` = the database): its verified images are those with >= ``min_inliers`` (4) inliers;
  and the default search (shortlist 100) whose ranking gives the full pipeline's mAP;
- each first stage's top K: the shipped first stage (VLAD-16, words from the coarse centroids, brute force)
  and ASMK* (``first_stage/asmk.py``: codebook of ``--words`` trained on 200,000 stored rows, database
  descriptors = the index's decoded rows, each to its nearest word; query descriptors to their
  ``--query-assignment`` nearest words; alpha 3, tau 0, idf);
- recall: per query |top K & verified| / |verified| over the queries that verify something, then
  the mean; "all" pools the queries of every set;
- mAP of the default search restricted to the top K (``among``) against the full scan's, at
  ``--map-ks``, for VLAD and the ASMK* setting with the best recall.

Seconds per query: the first stage alone (aggregating the query's PCA'd descriptors + the search).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
RESULTS = os.path.join(ROOT, "bench_results")
CACHE = os.path.join(RESULTS, "cache")
DEFAULT_FEATURES = CACHE  # retrieval_quality.py's feature cache

import retrieval_quality as rq  # noqa: E402  (benchmarks/ is on the path)

from delf_retrieval.corpus import inputs  # noqa: E402
from delf_retrieval.extraction.features import Features  # noqa: E402
from delf_retrieval.first_stage import asmk, search, vlad  # noqa: E402
from delf_retrieval.quantize.kmeans import kmeans  # noqa: E402
from delf_retrieval.query import evaluation  # noqa: E402
from delf_retrieval.query.retrieval import RetrievalConfig, Retriever  # noqa: E402
from pipeline.extract import output_names  # noqa: E402


def evaluation_set(name: str):
    """(root, every row (path, label), database rows, queries, ground truth for mAP)."""
    if name in ("dev", "hard"):
        root = os.path.join(DATA, "landmarks-dev" if name == "dev" else "landmarks-hard")
        rows = rq.dataset(root, False)
        database, queries = rows, [p for p, s in rows if s]
    else:
        root = os.path.join(DATA, "landmarks-train")
        database, queries = rq.train_split(root, 5, 40)
        label = dict(database) | {p: l for p, l in rq._labels(root).items() if p in set(queries)}
        rows = database + [(p, label[p]) for p in queries]
    if name == "hard":
        with open(os.path.join(root, "gt_hard.json")) as f:
            truth = {"queries": [{k: q[k] for k in ("query", "positives", "junk")} for q in json.load(f)["queries"]]}
    else:
        truth = rq.ground_truth(dict(rows), database, queries)
    return root, rows, database, queries, evaluation.parse_ground_truth(truth)


def cached_features(name: str, root: str, rows: list, folder: str) -> dict | None:
    """Every image's features from retrieval_quality's cache, or None if any is missing."""
    label = rq.network("lite")[0]
    folder = os.path.join(folder, f"features-{label}" if name == "dev" else f"features-{name}-{label}")
    paths = [os.path.join(root, p) for p, _ in rows]
    names = output_names(paths)
    files = {p: os.path.join(folder, names[os.path.join(root, p)] + ".npz") for p, _ in rows}
    if not all(os.path.exists(f) for f in files.values()):
        return None
    return {p: Features.from_npz(f) for p, f in files.items()}


def full_scans(name, retriever, features, ids, queries, n) -> dict:
    """Per query, the full scan's answer (the default search, top = the database, itself excluded):
    the images it verified with their inliers, and its ranking (uris); cached, as they do not depend
    on the first stage."""
    path = os.path.join(CACHE, f"first-stage-{name}-{n}-full-scan.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    everything = np.array(sorted(ids.values()), np.int64)
    default = retriever.with_config(RetrievalConfig(top=n))
    default.search(features[queries[0]], among=everything[everything != ids.get(queries[0], -1)])  # loads the kernels
    out, seconds = {"queries": {}}, []
    for q in queries:
        start = time.perf_counter()
        result = default.search(features[q], among=everything[everything != ids.get(q, -1)])
        seconds.append(time.perf_counter() - start)
        out["queries"][q] = {"verified": {str(m.image_id): m.inliers for m in result.matches
                                          if m.verified and m.inliers >= default.config.min_inliers},
                             "ranking": [m.uri for m in result.matches]}
    out["seconds_per_query"] = float(np.mean(seconds))
    os.makedirs(CACHE, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def wanted_sets(scans: dict, ids: dict, truth: dict) -> dict:
    """Per measure, per query, the images a first stage should keep: those the full scan verified
    (>= 4 inliers, the definition), those with >= 10 inliers, and the ground truth's positives."""
    by_uri = {p: i for p, i in ids.items()}
    out = {"verified": {}, "verified >= 10": {}, "positives": {}}
    for q, s in scans["queries"].items():
        out["verified"][q] = {int(i) for i in s["verified"]}
        out["verified >= 10"][q] = {int(i) for i, inliers in s["verified"].items() if inliers >= 10}
        if q in truth:
            out["positives"][q] = {by_uri[p] for p in truth[q].positives if p in by_uri}
    return out


def recall(tops: dict, wanted: dict, ks) -> dict:
    """Per K: (sum of per-query recall, queries counted), over the queries that want something."""
    out = {}
    for k in ks:
        values = [len(set(tops[q][:k]) & w) / len(w) for q, w in wanted.items() if w]
        out[k] = (float(np.sum(values)), len(values))
    return out


def mean_ap(rankings: dict, truth: dict) -> float:
    aps = [evaluation.average_precision(evaluation.positive_ranks(rankings.get(q, []), t), len(t.positives))
           for q, t in truth.items() if t.positives]
    return float(np.mean(aps))


def distractor_pool(name: str, rows: list, others: dict, count: int) -> dict:
    """``count`` images with features of the other sets (by a hash of their path), as first-stage distractors:
    {id: features}. Images whose label shares its first word with one of this set's (lund_street,
    lund_door_portal) are left out, in case they show the same place."""
    towns = {str(label).split("_")[0] for _, label in rows if label}
    pool = []
    for other, (other_rows, features) in others.items():
        if other != name:
            pool += [(hashlib.sha256(f"{other}/{p}".encode()).hexdigest(), other, p, features[p])
                     for p, label in other_rows if len(features[p])
                     and (not label or str(label).split("_")[0] not in towns)]
    pool.sort(key=lambda item: item[0])
    return {inputs.image_id(f"distractor:{other}/{p}"): f for _, other, p, f in pool[:count]}


def database_chunks(reader, features, ids, distractors, source):
    """(image ids, PCA'd descriptors) of the database and the distractors: the index's decoded rows
    (``rows``; distractors encoded and decoded by its quantizer) or the exact descriptors (``exact``,
    as the build's encode step holds them)."""
    if source == "rows":
        yield from reader.postings()
    else:
        for p, i in ids.items():
            yield np.full(len(features[p]), i, np.int64), reader.pca.transform(features[p].descriptors.astype(np.float32))
    yield from distractor_chunks(reader, distractors, source)


def distractor_chunks(reader, distractors, source):
    for i, f in distractors.items():
        projected = reader.pca.transform(f.descriptors.astype(np.float32))
        if source == "rows":
            encoded = reader.quantizer.encode(projected)
            projected = reader.quantizer.decode(encoded.regions, encoded.codes)
        yield np.full(len(f), i, np.int64), projected


def vlad_tops(reader, features, ids, distractors, queries, k_max, **spread) -> tuple[dict, float, int]:
    """The shipped first stage (``delf_retrieval.first_stage``): VLAD-16 over the words derived from
    the coarse centroids, database vectors from the decoded rows, brute-force dot products, at most
    ``duplicates.SLOTS`` images of a near-duplicate group before the others (``FirstStage.top``;
    ``spread``: its ``slots`` and ``cosine`` instead)."""
    words = vlad.words_of(reader.quantizer.coarse.centroids)
    db_ids, vectors = vlad.vectors_of_postings(database_chunks(reader, features, ids, distractors, "rows"), words)
    n = len(db_ids)
    stage = search.FirstStage("", reader.quantizer, words, db_ids, vectors.astype(np.float16).astype(np.float32),
                              np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64), [])
    tops, seconds = {}, []
    for q in queries:
        projected = reader.pca.transform(features[q].descriptors.astype(np.float32))
        start = time.perf_counter()
        top = stage.top(projected, k_max + 1, **spread)
        seconds.append(time.perf_counter() - start)
        tops[q] = [i for i in top.tolist() if i != ids.get(q, -1)][:k_max]
    return tops, float(np.mean(seconds)), vectors.shape[1] * 2


def whitened_vlad_tops(reader, features, ids, distractors, queries, k_max, n_words, dims) -> tuple[dict, float, int]:
    """VLAD of ``n_words`` over the exact PCA'd descriptors (signed square root, per-word and global
    L2), then PCA-whitened to ``dims`` (0: not whitened) with the whitening learned on the distractors
    alone, L2 again; brute-force dot products (an upper bound for any graph over the vectors)."""
    sample = asmk.sample_rows_of(reader, np.sort(np.fromiter(ids.values(), np.int64)), 200_000)
    words = kmeans(np.asarray(sample, np.float32), n_words, iterations=20, seed=0)
    project = lambda f: reader.pca.transform(f.descriptors.astype(np.float32))  # noqa: E731
    db_ids = np.r_[np.fromiter(ids.values(), np.int64), np.fromiter(distractors, np.int64)]
    vectors = np.stack([vlad.aggregate(project(features[p]), words) for p in ids]
                       + [vlad.aggregate(project(f), words) for f in distractors.values()])
    mean, basis = np.zeros(vectors.shape[1], vectors.dtype), None  # no whitening: the vectors as they are
    if dims:
        learn = vectors[len(ids):]
        mean = learn.mean(axis=0)
        _, sv, vt = np.linalg.svd(learn - mean, full_matrices=False)
        keep = min(dims, len(sv) - 1)
        scale = 1.0 / np.sqrt(sv[:keep] ** 2 / len(learn) + 1e-6)
        basis = (vt[:keep].T * scale).astype(np.float32)

    def transform(v):
        if basis is None:
            return v
        w = (v - mean) @ basis
        return w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    vectors = transform(vectors)
    tops, seconds = {}, []
    for q in queries:
        projected = project(features[q])
        start = time.perf_counter()
        scores = vectors @ transform(vlad.aggregate(projected, words))
        scores[db_ids == ids.get(q, -1)] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k_max]
        seconds.append(time.perf_counter() - start)
        tops[q] = db_ids[top].tolist()
    return tops, float(np.mean(seconds)), vectors.shape[1] * 4


def asmk_codebook(name, reader, ids, words) -> asmk.Codebook:
    path = os.path.join(CACHE, f"first-stage-{name}-{len(ids)}-asmk-{words}.npz")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return asmk.load(f.read())[0]
    config = asmk.AsmkConfig(words=words)
    start = time.perf_counter()
    sample = asmk.sample_rows_of(reader, np.sort(np.fromiter(ids.values(), np.int64)), config.sample_rows)
    codebook = asmk.Codebook.train(sample, config)
    print(f"  {name}: codebook of {words} words trained in {time.perf_counter() - start:.0f} s", flush=True)
    os.makedirs(CACHE, exist_ok=True)
    with open(path, "wb") as f:
        f.write(asmk.save(codebook, config))
    return codebook


def asmk_part(name, codebook, reader, features, ids, distractors, source) -> asmk.AsmkPart:
    path = os.path.join(CACHE, f"first-stage-{name}-{len(ids)}-asmk-{len(codebook)}-{source}-d{len(distractors)}.npz")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return asmk.AsmkPart.from_bytes(f.read())
    start = time.perf_counter()
    part = asmk.AsmkPart.build(codebook, database_chunks(reader, features, ids, distractors, source),
                               image_ids=np.r_[np.fromiter(ids.values(), np.int64), list(distractors)])
    print(f"  {name}: ASMK part ({len(codebook)} words, {source}) built in {time.perf_counter() - start:.0f} s",
          flush=True)
    with open(path, "wb") as f:
        f.write(part.to_bytes())
    return part


def asmk_tops(codebook, part, reader, features, ids, queries, k_max, query_assignment) -> tuple[dict, float, dict]:
    config = asmk.AsmkConfig(words=len(codebook), query_assignment=query_assignment)
    searcher = asmk.AsmkSearcher(codebook, [part], config)
    searcher.search(reader.pca.transform(features[queries[0]].descriptors.astype(np.float32)), 1)  # compiles
    lengths = np.diff(part.offsets)
    tops, seconds, scanned = {}, [], []
    for q in queries:
        projected = reader.pca.transform(features[q].descriptors.astype(np.float32))
        start = time.perf_counter()
        found, _ = searcher.search(projected, k_max, exclude=[ids.get(q, -1)])
        seconds.append(time.perf_counter() - start)
        tops[q] = found.tolist()
        scanned.append(lengths[codebook.query(projected, query_assignment)[0]].sum())
    cost = {"bytes_per_image": len(part.to_bytes()) / len(part), "entries_per_image": part.entries / len(part),
            "scanned_share": float(np.mean(scanned)) / part.entries}
    return tops, float(np.mean(seconds)), cost


def restricted_map(retriever, features, ids, tops, truth, k, n) -> float:
    """mAP of the default search with the candidates restricted to each query's first-stage top k."""
    default = retriever.with_config(RetrievalConfig(top=n))
    rankings = {}
    for q in truth:
        if q in tops:
            rankings[q] = [m.uri for m in default.search(features[q], among=np.array(tops[q][:k], np.int64)).matches]
    return mean_ap(rankings, truth)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="dev,hard,train")
    parser.add_argument("--words", default="1024,4096,16384")
    parser.add_argument("--query-assignment", default="1,5")
    parser.add_argument("--sources", default="rows,exact", help="database descriptors of ASMK*: the index's "
                        "decoded rows, or the exact PCA'd descriptors")
    parser.add_argument("--distractors", type=int, default=1000, help="images of the other sets added to each "
                        "set's first stage")
    parser.add_argument("--vlad", default="16:0,16:256,64:256,256:512", help="stronger VLADs, words:whitened "
                        "dims (0: none), brute force")
    parser.add_argument("--slots", default="", help="the shipped first stage again with these slots a "
                        "near-duplicate group (0: the plain ranking), e.g. 0,16,32")
    parser.add_argument("--ks", default="20,50,100,200,500,1000")
    parser.add_argument("--map-ks", default="50,100")
    parser.add_argument("--features-cache", default=DEFAULT_FEATURES)
    parser.add_argument("--json", default=os.path.join(RESULTS, "first_stage.json"))
    parser.add_argument("--merge", default="", help="JSON files of earlier runs (same sets and distractors): "
                        "print their stages as one table, pooled over the sets where a stage ran on every set")
    args = parser.parse_args(argv)
    if args.merge:
        print(merged_tables([json.load(open(path)) for path in args.merge.split(",")]))
        return 0
    ks = [int(k) for k in args.ks.split(",")]
    map_ks = [int(k) for k in args.map_ks.split(",")]
    settings = [(int(w), src, int(m)) for w in filter(None, args.words.split(",")) for src in args.sources.split(",")
                for m in args.query_assignment.split(",")]
    loaded = {}
    for name in ("dev", "hard", "train"):
        root, rows, database, queries, truth = evaluation_set(name)
        features = cached_features(name, root, rows, args.features_cache)
        if features is None:
            print(f"{name}: features not all in {args.features_cache}: left out", flush=True)
            continue
        loaded[name] = (root, rows, database, queries, truth, features)
    report = {"sets": {}, "distractors": args.distractors}
    for name in [n for n in args.sets.split(",") if n in loaded]:
        root, rows, database, queries, truth, features = loaded[name]
        n = len(database)
        folder = os.path.join(CACHE, f"index-first-{name}-{n}")
        if os.path.exists(os.path.join(folder, "manifest.json")):
            reader, ids = _open(name, n, database)
        else:
            reader, ids = rq.build_index({p: features[p] for p, _ in database}, folder)
        retriever = Retriever(reader)
        scans = full_scans(name, retriever, features, ids, queries, n)
        full_map = mean_ap({q: s["ranking"] for q, s in scans["queries"].items()}, truth)
        verified = [len(s["verified"]) for s in scans["queries"].values()]
        wanted = wanted_sets(scans, ids, truth)
        distractors = distractor_pool(name, rows, {o: (v[1], v[5]) for o, v in loaded.items()}, args.distractors)
        out = {"images": n, "distractors": len(distractors), "queries": len(queries), "rows": reader.num_rows,
               "full_scan_map": full_map, "full_scan_seconds": scans["seconds_per_query"],
               "verified_per_query": float(np.mean(verified)), "queries_verifying": int(np.count_nonzero(verified)),
               "stages": {}}
        print(f"{name}: {n} images + {len(distractors)} distractors, {len(queries)} queries, "
              f"{np.mean(verified):.1f} verified per query, full-scan mAP {full_map:.3f}", flush=True)
        tops, seconds, nbytes = vlad_tops(reader, features, ids, distractors, queries, max(ks))
        out["stages"]["VLAD-16 (shipped)"] = {"tops": tops, "seconds": seconds, "bytes_per_image": nbytes}
        for slots in filter(None, args.slots.split(",")):
            tops, seconds, nbytes = vlad_tops(reader, features, ids, distractors, queries, max(ks), slots=int(slots))
            out["stages"][f"VLAD-16, {slots} slots a near-duplicate group"] = {"tops": tops, "seconds": seconds,
                                                                            "bytes_per_image": nbytes}
        for spec in filter(None, args.vlad.split(",")):
            n_words, dims = (int(x) for x in spec.split(":"))
            tops, seconds, nbytes = whitened_vlad_tops(reader, features, ids, distractors, queries, max(ks), n_words, dims)
            out["stages"][f"VLAD-{n_words}, exact, " + (f"whitened {dims}" if dims else "not whitened")
                          + ", brute force"] = {"tops": tops, "seconds": seconds, "bytes_per_image": nbytes}
        for words, source, assignment in settings:
            codebook = asmk_codebook(name, reader, ids, words)
            part = asmk_part(name, codebook, reader, features, ids, distractors, source)
            tops, seconds, cost = asmk_tops(codebook, part, reader, features, ids, queries, max(ks), assignment)
            out["stages"][f"ASMK* {words}, {source}, MA {assignment}"] = {"tops": tops, "seconds": seconds, **cost}
        for label, stage in out["stages"].items():
            stage["recalls"] = {measure: recall(stage["tops"], w, ks) for measure, w in wanted.items()}
            stage["recall"] = stage["recalls"]["verified"]
            print(f"  {label}: {1000 * stage['seconds']:.1f} ms/query, {stage['bytes_per_image']:.0f} B/image"
                  + (f", scans {stage['scanned_share']:.3f} of the entries" if "scanned_share" in stage else ""),
                  flush=True)
            for measure, r in stage["recalls"].items():
                print(f"    {measure}: " + " ".join(f"@{k} {a / max(c, 1):.3f}" for k, (a, c) in r.items()), flush=True)
        report["sets"][name] = out
        out["_ctx"] = (retriever, features, ids, truth)
    if not report["sets"]:
        return 1
    labels = list(next(iter(report["sets"].values()))["stages"])
    measures = list(next(iter(report["sets"].values()))["stages"][labels[0]]["recalls"])
    report["pooled"] = {m: {label: {k: sum(s["stages"][label]["recalls"][m][k][0] for s in report["sets"].values())
                                    / max(sum(s["stages"][label]["recalls"][m][k][1] for s in report["sets"].values()), 1)
                                    for k in ks} for label in labels} for m in measures}
    report["all"] = report["pooled"]["verified"]
    best = max((l for l in labels if l != "VLAD-16 (shipped)"), key=lambda l: sum(report["pooled"]["verified >= 10"][l].values()),
               default=None)
    for label in ["VLAD-16 (shipped)"] + ([best] if best else []):
        for name, out in report["sets"].items():
            retriever, features, ids, truth = out["_ctx"]
            out["stages"][label]["map"] = {k: restricted_map(retriever, features, ids, out["stages"][label]["tops"],
                                                             truth, k, out["images"]) for k in map_ks}
            print(f"  {name}: {label}: mAP restricted to its top " + ", ".join(
                f"{k}: {v:.3f}" for k, v in out["stages"][label]["map"].items())
                + f" (full scan {out['full_scan_map']:.3f})", flush=True)
    print(markdown(report, ks, map_ks, labels, best))
    for out in report["sets"].values():
        del out["_ctx"]
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, default=str)
    return 0


def merged_tables(reports: list[dict]) -> str:
    """Recall per K pooled over the sets (per-query mean over the queries of every set that verify
    something), by measure; then ms/query, bytes/image and restricted mAP per set."""
    sets: dict = {}
    for report in reports:
        for name, out in report["sets"].items():
            held = sets.setdefault(name, {**{k: v for k, v in out.items() if k != "stages"}, "stages": {}})
            for label, stage in out["stages"].items():
                held["stages"].setdefault(label, {}).update({k: v for k, v in stage.items() if k != "map" or v})
                if "map" in stage:
                    held["stages"][label].setdefault("maps", {}).update(stage["map"])
    names = list(sets)
    labels = list(dict.fromkeys(l for s in sets.values() for l in s["stages"]))
    first = next(iter(next(iter(sets.values()))["stages"].values()))
    ks = list(first["recalls"]["verified"])
    lines = []
    for measure in first["recalls"]:
        lines += ["", f"{measure}: recall pooled over " + ", ".join(f"{n} ({sets[n]['queries']} queries)" for n in names),
                  "| first stage | " + " | ".join(f"@{k}" for k in ks) + " | " + " | ".join(f"{n} @100" for n in names) + " |",
                  "|---|" + "---|" * (len(ks) + len(names))]
        for label in labels:
            have = [n for n in names if label in sets[n]["stages"]]
            per = {n: sets[n]["stages"][label]["recalls"][measure] for n in have}
            pooled = [f"{sum(per[n][k][0] for n in have) / max(sum(per[n][k][1] for n in have), 1):.3f}"
                      if len(have) == len(names) else "" for k in ks]
            own = [f"{per[n]['100'][0] / max(per[n]['100'][1], 1):.3f}" if n in per else "" for n in names]
            lines.append(f"| {label} | " + " | ".join(pooled + own) + " |")
    lines += ["", "| first stage | " + " | ".join(f"{n} ms/query | {n} bytes/image | {n} mAP @50, @100" for n in names) + " |",
              "|---|" + "---|" * (3 * len(names))]
    for label in labels:
        cells = []
        for n in names:
            stage = sets[n]["stages"].get(label)
            if stage is None:
                cells += ["", "", ""]
                continue
            maps = stage.get("maps", {})
            cells += [f"{1000 * stage['seconds']:.1f}", f"{stage['bytes_per_image']:.0f}",
                      ", ".join(f"{maps[k]:.3f}" for k in ("50", "100") if k in maps)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| full scan | " + " | ".join(f"{1000 * sets[n]['full_scan_seconds']:.0f} | | {sets[n]['full_scan_map']:.3f}"
                                              for n in names) + " |")
    return "\n".join(lines)


def _open(name, n, database):
    from delf_retrieval.index import shard_reader

    return shard_reader.IndexReader(os.path.join(CACHE, f"index-first-{name}-{n}")), \
        {p: inputs.image_id(p) for p, _ in database}


def markdown(report, ks, map_ks, labels, best) -> str:
    sets = list(report["sets"])
    lines = ["| first stage | " + " | ".join(f"recall @{k} ({'/'.join(sets)}; all)" for k in ks)
             + " | ms/query (" + "/".join(sets) + ") | bytes/image (" + "/".join(sets) + ") |",
             "|---|" + "---|" * (len(ks) + 2)]
    for label in labels:
        cells = []
        for k in ks:
            per = [report["sets"][s]["stages"][label]["recall"][k] for s in sets]
            cells.append("/".join(f"{a / max(c, 1):.3f}" for a, c in per) + f"; **{report['all'][label][k]:.3f}**")
        ms = "/".join(f"{1000 * report['sets'][s]['stages'][label]['seconds']:.1f}" for s in sets)
        nb = "/".join(f"{report['sets'][s]['stages'][label]['bytes_per_image']:.0f}" for s in sets)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ms} | {nb} |")
    lines += ["", "| first stage | " + " | ".join(f"{m} @{k}" for m in list(report["pooled"])[1:] for k in ks) + " |",
              "|---|" + "---|" * (len(ks) * (len(report["pooled"]) - 1))]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{report['pooled'][m][label][k]:.3f}"
                                                  for m in list(report["pooled"])[1:] for k in ks) + " |")
    lines += ["", "| first stage | " + " | ".join(f"{s} mAP @{k}" for s in sets for k in map_ks) + " |",
              "|---|" + "---|" * (len(sets) * len(map_ks)),
              "| full scan | " + " | ".join(f"{report['sets'][s]['full_scan_map']:.3f}" for s in sets for _ in map_ks) + " |"]
    for label in ["VLAD-16 (shipped)"] + ([best] if best else []):
        lines.append(f"| {label} | " + " | ".join(f"{report['sets'][s]['stages'][label]['map'][k]:.3f}"
                                                  for s in sets for k in map_ks) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
