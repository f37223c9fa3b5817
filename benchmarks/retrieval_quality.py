"""Retrieval quality on two sets of real photographs, side by side, for every ranking rule:

- dev (../shared/data/landmarks-dev): every scene image queries an index of all the other images
  plus the distractors (relevant = the other images of its scene);
- train (../shared/data/landmarks-train, web photos of 36 landmarks, noisy labels): a split by
  image within each landmark, the same for every run: per landmark the ``--train-queries`` images
  with the smallest hash of their path query, and the next ``--train-database`` (by the same hash)
  form the database with the queries left out (relevant = the database images of its landmark).

- train-heldout: the same split restricted to the half of the landmarks that
  ``train_attention_model.py`` leaves out of training (``landmark_halves``): the set on which a
  model trained on landmarks-train is validated.

    python benchmarks/retrieval_quality.py [--quick] [--sets dev,train,train-heldout] [--presets lite,resnet50]
        [--models DIR,...] [--no-sift]

``--models`` adds trained model folders (``pipeline.train`` output, or a head-only folder such as
``models/lite0-attention``), each extracted with the lite preset's pyramid and feature budget.

Per preset: features of all images (cached under bench_results/cache/), one index of everything
(default IndexParams, as the pipeline builds it), then each query searches with itself excluded
(``Retriever.search(among=...)``: its rows are not scanned; the PCA and quantizer were trained with
it, a small leak). One search per query gives the votes and RANSAC inliers of the shortlist;
the ranking rules are then compared on the same figures: votes alone (no verification), inliers
alone (the paper), and inliers + w x votes for several w, each paired per query against votes.
mAP and mP@k come from ``delf_retrieval.query.evaluation`` (Revisited-Oxford protocol); GLD is the
Google-Landmarks micro-AP, and GLD+dq the same with the 40 distractors also querying (no positives).

The classical baseline users would otherwise pick: OpenCV SIFT (same images, long side 1024,
the 1000 strongest keypoints as ours keeps 1000 features), Lowe's ratio test 0.8, affine RANSAC (``cv2.estimateAffine2D``, 20 px, 1000 iterations), brute
force over all pairs, ranked by inliers. Its query time is its feature extraction plus matching
against every database image; ours is extraction plus the index search.

Also measured: how often the true matches survive the image-level shortlist (VLAD + HNSW) at
several shortlist sizes. ResNet50 needs the Keras ImageNet file (a download): offline it is
reported as unavailable.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
LANDMARKS_DEV = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-dev")
RESULTS = os.path.join(ROOT, "bench_results")
VOTE_WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


LANDMARKS_TRAIN = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-train")
from train_attention_model import landmark_halves  # noqa: E402  (benchmarks/ is on the path)


def dataset(root: str, quick: bool) -> list[tuple[str, str | None]]:
    """(relative path, scene or None) of every image; quick: three scenes and ten distractors."""
    with open(os.path.join(root, "labels.csv")) as f:
        rows = [(r["path"], r["scene"] or None) for r in csv.DictReader(f)]
    if quick:
        scenes = sorted({s for _, s in rows if s})[:3]
        rows = [r for r in rows if r[1] in scenes] + [r for r in rows if r[1] is None][:10]
    return rows


def train_split(root: str, queries: int, database: int, landmarks: int | None = None, among=None):
    """(database rows, query paths) of landmarks-train: per landmark, by a hash of the path, the
    first ``queries`` images query and the next ``database`` are indexed (queries left out);
    ``among``: only these landmarks."""
    import hashlib

    with open(os.path.join(root, "labels.csv")) as f:
        rows = [(r["path"], r["landmark"]) for r in csv.DictReader(f)]
    by_landmark: dict = {}
    for path, landmark in rows:
        by_landmark.setdefault(landmark, []).append(path)
    db, query_paths = [], []
    for landmark in [l for l in sorted(by_landmark) if among is None or l in among][:landmarks]:
        paths = sorted(by_landmark[landmark], key=lambda p: hashlib.sha256(p.encode()).hexdigest())
        query_paths += paths[:queries]
        db += [(p, landmark) for p in paths[queries:queries + database]]
    return db, query_paths


def evaluation_set(name: str, args):
    """(root, every row (path, label), database rows, queries): the queries search the database;
    on dev they are its scene images, each with itself excluded."""
    if name == "dev":
        rows = dataset(args.data, args.quick)
        return args.data, rows, rows, [p for p, s in rows if s]
    queries, database = (2, 10) if args.quick else (args.train_queries, args.train_database)
    among = set(landmark_halves(args.train_data)[1]) if name == "train-heldout" else None
    db, query_paths = train_split(args.train_data, queries, database, 6 if args.quick else None, among)
    label = dict(db) | {p: l for p, l in _labels(args.train_data).items() if p in set(query_paths)}
    return args.train_data, db + [(p, label[p]) for p in query_paths], db, query_paths


def _labels(root: str) -> dict:
    with open(os.path.join(root, "labels.csv")) as f:
        return {r["path"]: r["landmark"] for r in csv.DictReader(f)}


def _digest(folder: str) -> str:
    import hashlib

    from delf_retrieval.model import delf

    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".h5") or name == delf.MODEL_CONFIG_FILE:
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:8]


def network(spec: str) -> tuple[str, object, object]:
    """(label, ModelConfig, ExtractionConfig) of a preset name, or of a model folder extracted with
    the lite preset's settings. A model folder's label, or that of a preset with a shipped model,
    carries a hash of its weights, so the feature cache follows retraining."""
    from delf_retrieval.extraction import presets
    from delf_retrieval.model import delf

    if not os.path.isdir(spec):
        shipped = presets.PRESETS.get(spec, {}).get("model")
        label = f"{spec}+{shipped}-{_digest(os.path.join(delf.SHIPPED_MODELS_DIR, shipped))}" if shipped else spec
        return label, presets.model_config(spec), presets.extraction_config(spec)
    label = f"{os.path.basename(os.path.normpath(spec))}-{_digest(spec)}"
    return label, delf.read_model_config(spec), presets.extraction_config("lite")


def extract_all(root, rows, preset, cache, timed: int = 5, set_name: str = "dev") -> tuple[dict, float]:
    """Features of every image (cached, one .npz per image), and the seconds per image of
    extraction, timed afresh on ``timed`` images (spread over the set)."""
    from delf_retrieval.corpus.images import load_image
    from delf_retrieval.extraction.extractor import Extractor
    from delf_retrieval.extraction.features import Features
    from delf_retrieval.model import delf
    from pipeline.extract import main as extract_main
    from pipeline.extract import output_names

    label, model_config, extraction_config = network(preset)
    images = "train" if set_name == "train-heldout" else set_name  # the same photos, one cache
    folder = os.path.join(cache, f"features-{label}" if images == "dev" else f"features-{images}-{label}")
    paths = [os.path.join(root, p) for p, _ in rows]
    names = output_names(paths)
    extract_main(model_config, extraction_config, paths, folder, progress=False)  # skips cached images
    extractor = Extractor(delf.load(model_config), extraction_config)
    sample = [load_image(p) for p in paths[:: max(1, len(paths) // timed)][:timed]]
    for image in sample:  # the first call of each pyramid shape is slower: time a second pass
        extractor.extract(image)
    start = time.perf_counter()
    for image in sample:
        extractor.extract(image)
    seconds = (time.perf_counter() - start) / len(sample)
    return {p: Features.from_npz(os.path.join(folder, names[os.path.join(root, p)] + ".npz")) for p, _ in rows}, seconds


def build_index(features: dict, directory: str):
    from delf_retrieval import quantize
    from delf_retrieval.build import encode
    from delf_retrieval.corpus import inputs
    from delf_retrieval.index import shard_reader, shards

    raw = np.concatenate([f.descriptors for f in features.values()])
    projection, quantizer = encode.train(raw, quantize.IndexParams(), expected_count=len(raw))
    ids = {uri: inputs.image_id(uri) for uri in features}
    encoded = [encode.encode_image(ids[uri], f, projection, quantizer) for uri, f in features.items()]
    table = shards.image_table([{"image_id": ids[uri], "uri": uri, "width": f.image_size[1], "height": f.image_size[0],
                                 "num_features": len(f), "content_hash": ""} for uri, f in features.items()])
    encode.write(directory, encoded, table, projection, quantizer)
    return shard_reader.IndexReader(directory), ids


def rank(matches, rule: str, weight: float, min_inliers: int, expansion=None, query: str | None = None) -> list[dict]:
    """Re-rank one search's matches (verified first) by a rule, as results.json matches; with
    ``expansion`` = (table, K, T, uri_of) the re-ranked matches are then expanded as
    ``Retriever.search`` does (``delf_retrieval.query.expansion.expand``), the query itself left out
    (a dev query is a database image, which its neighbours' edges lead back to)."""
    from delf_retrieval.query import expansion
    from delf_retrieval.query.matching import Match

    def score(m):
        inliers = m.inliers if m.inliers >= min_inliers else 0
        return {"votes": m.votes, "inliers": inliers, "combined": inliers + weight * m.votes}[rule]
    ordered = sorted(matches, key=lambda m: (not m.verified, -score(m), -m.votes, m.image_id))
    ordered = [Match(m.image_id, m.uri, float(score(m)), m.inliers, m.votes, m.verified) for m in ordered]
    if expansion is not None:
        table, k, t, uri_of = expansion
        ordered = [m for m in expansion.expand(ordered, table, k, t, uri_of, len(ordered)) if m.uri != query]
    return [{"uri": m.uri, "score": float(m.score), "inliers": m.inliers, "votes": m.votes} for m in ordered]


EXPANSIONS = ((3, 10), (3, 15), (5, 10), (5, 20), (1, 10))  # (K, T) at query time
TABLE = (20, 10)  # the neighbour table: k per image, min inliers


def neighbour_table(reader, retriever, database_ids) -> tuple:
    """Every database image's verified neighbours (``delf_retrieval.expansion``), as the build's
    neighbour stage finds them, and the seconds per image it took."""
    from delf_retrieval.index import neighbour_table
    from delf_retrieval.query import expansion

    config = neighbour_table.NeighbourConfig(*TABLE)
    stored = expansion.rows_by_image(reader)
    found, start = [], time.perf_counter()
    for image_id in database_ids:
        if image_id not in stored:  # an image that kept no features has no rows to search with
            continue
        projected, locations = stored[image_id]
        neighbours, inliers = expansion.search_neighbours(retriever, image_id, projected, locations, config)
        found += [(image_id, n, c) for n, c in zip(neighbours.tolist(), inliers.tolist())]
    seconds = (time.perf_counter() - start) / max(len(database_ids), 1)
    edges = np.asarray(found, np.int64).reshape(-1, 3)
    table = neighbour_table.cut(neighbour_table.symmetric(edges[:, 0], edges[:, 1], edges[:, 2]), config.k)
    return table, seconds


def ground_truth(label_of: dict, database: list, queries: list, distractor_queries: list = ()) -> dict:
    """Each query's positives: the database images of its label but itself; ``distractor_queries``
    query too, with none (as most Google-Landmarks queries)."""
    return {"queries": [{"query": q, "positives": [p for p, t in database if t == label_of[q] and p != q], "junk": []}
                        for q in queries] + [{"query": q, "positives": [], "junk": []} for q in distractor_queries]}


def measure(doc: dict, truth: dict) -> dict:
    from delf_retrieval.query import evaluation

    scores = evaluation.evaluate(evaluation.parse_results(doc), evaluation.parse_ground_truth(truth))
    return {**{k: scores[k] for k in ("map", "mp@1", "mp@5", "mp@10", "gld_micro_ap")},
            "ap_per_query": [q["ap"] for q in scores["per_query"]]}


def run_ours(set_name, root, rows, database, queries, preset, cache, config) -> dict:
    from delf_retrieval.index import shortlist
    from delf_retrieval.query import retrieval

    features, extract_seconds = extract_all(root, rows, preset, cache, set_name=set_name)
    label = network(preset)[0]
    preset = label if os.path.isdir(preset) else preset
    reader, ids = build_index({p: features[p] for p, _ in database},
                              os.path.join(cache, f"index-{set_name}-{label}-{len(database)}"))
    retriever = retrieval.Retriever(reader, config)
    everything = np.array(sorted(ids.values()), np.int64)
    label_of = dict(rows)
    distractors = [p for p, s in database if s is None]  # dev's: they query too, for GLD+dq
    searches, timings = {}, {"shortlist": [], "ann": [], "voting": [], "ransac": []}
    for p in queries + distractors:
        among = everything[everything != ids[p]] if p in ids else everything
        result = retriever.search(features[p], among=among)
        searches[p] = result.matches
        for stage, seconds in result.timings.items():
            timings[stage].append(seconds)
    truth = ground_truth(label_of, database, queries)
    neighbours, neighbour_seconds = neighbour_table(reader, retriever, sorted(ids.values()))
    uri_of = retriever.uri_of
    rules = [("votes (no verification)", "votes", 0.0, None), ("inliers (paper)", "inliers", 0.0, None)]
    rules += [(f"inliers + {w} x votes", "combined", w, None) for w in VOTE_WEIGHTS]
    rules += [(f"{base}, expand K {k} T {t}", rule, 0.0, (neighbours, k, t, uri_of))
              for base, rule in (("votes", "votes"), ("inliers", "inliers")) for k, t in EXPANSIONS]
    table = {}
    for name, rule, weight, expand in rules:
        doc = {"results": [{"query": p, "matches": rank(searches[p], rule, weight, config.min_inliers, expand, p)}
                           for p in queries]}
        table[name] = measure(doc, truth)
        if distractors:
            # The Google-Landmarks measure when the distractors query too: a score must then also be
            # comparable across queries, since a distractor query's best matches are all false.
            everyone = {"results": [{"query": p, "matches": rank(searches[p], rule, weight, config.min_inliers,
                                                                  expand, p)}
                                    for p in queries + distractors]}
            table[name]["gld_with_distractor_queries"] = measure(
                everyone, ground_truth(label_of, database, queries, distractors))["gld_micro_ap"]
    # Each rule against votes alone, paired over the same queries: mean AP difference and its s.e.
    base = np.asarray(table["votes (no verification)"]["ap_per_query"])
    for name in table:
        diff = np.asarray(table[name]["ap_per_query"]) - base
        table[name]["vs_votes"] = [float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))]
    # How often the true matches survive the image shortlist (self excluded).
    built = shortlist.build_from_index(reader, size=len(ids))
    survival = {}
    for size in (5, 10, 20, 50):
        kept = total = 0
        for p in queries:
            candidates = [c for c in built.candidates(reader.pca.transform(features[p].descriptors), size + 1)
                          if c != ids.get(p)][:size]
            positives = {ids[q] for q in truth_positives(truth, p)}
            kept += len(positives & set(candidates))
            total += len(positives)
        survival[size] = kept / max(total, 1)
    return {"set": set_name, "preset": preset, "images": len(database), "queries": len(queries),
            "descriptors": reader.num_rows, "index": reader.manifest["spec"], "rules": table,
            "seconds_per_query": {k: float(np.mean(v)) for k, v in timings.items()},
            "neighbour_table": {"k": TABLE[0], "min_inliers": TABLE[1], "edges": len(neighbours),
                                "seconds_per_image": neighbour_seconds},
            "extract_seconds_per_image": extract_seconds, "shortlist_survival": survival}


def truth_positives(truth: dict, query: str) -> list[str]:
    return next(q["positives"] for q in truth["queries"] if q["query"] == query)


def run_sift(root, rows, database, queries, max_features: int) -> dict:
    """OpenCV SIFT + ratio test + affine RANSAC, brute force over all pairs."""
    import cv2

    from delf_retrieval.corpus.images import load_image

    sift = cv2.SIFT_create(nfeatures=max_features)
    keypoints, extract_seconds = {}, []
    for p, _ in rows:
        image = load_image(os.path.join(root, p))
        start = time.perf_counter()
        h, w = image.shape[:2]
        factor = min(1.0, 1024 / max(h, w))
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if factor < 1:
            gray = cv2.resize(gray, (int(round(w * factor)), int(round(h * factor))), interpolation=cv2.INTER_AREA)
        kp, desc = sift.detectAndCompute(gray, None)
        extract_seconds.append(time.perf_counter() - start)
        points = np.array([k.pt for k in kp], np.float32) / factor if kp else np.zeros((0, 2), np.float32)
        keypoints[p] = (points, desc if desc is not None else np.zeros((0, 128), np.float32))
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    results, match_seconds = [], []
    for p in queries:
        start = time.perf_counter()
        qp, qd = keypoints[p]
        scored = []
        for other, _ in database:
            if other == p:
                continue
            dp, dd = keypoints[other]
            inliers = 0
            if len(qd) >= 2 and len(dd) >= 2:
                pairs = [m for m, n in (x for x in matcher.knnMatch(qd, dd, k=2) if len(x) == 2) if m.distance < 0.8 * n.distance]
                if len(pairs) >= 3:
                    src = qp[[m.queryIdx for m in pairs]]
                    dst = dp[[m.trainIdx for m in pairs]]
                    _, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=20.0,
                                                   maxIters=1000, confidence=0.999)
                    inliers = int(mask.sum()) if mask is not None else 0
            scored.append((inliers, other))
        match_seconds.append(time.perf_counter() - start)
        scored.sort(key=lambda s: (-s[0], s[1]))
        results.append({"query": p, "matches": [{"uri": o, "score": float(n), "inliers": n, "votes": 0}
                                                for n, o in scored if n > 0]})
    return {"method": f"OpenCV SIFT ({max_features}) + ratio 0.8 + affine RANSAC, all pairs",
            "scores": measure({"results": results}, ground_truth(dict(rows), database, queries)),
            "seconds_per_query": {"extract": float(np.mean(extract_seconds)), "match+ransac": float(np.mean(match_seconds))}}


HEADER = (f"{'set: method':<52} {'mAP':>6} {'mP@1':>6} {'mP@5':>6} {'mP@10':>6} {'GLD':>6} {'GLD+dq':>6}  "
          "s/query (search; extraction)")


def print_ours(ours: dict) -> None:
    if "rules" not in ours:
        return
    search = sum(ours["seconds_per_query"].values())
    name_of = lambda n: f"{ours['set']}: {ours['preset']}: {n}"  # noqa: E731
    for name, s in ours["rules"].items():
        dq = s.get("gld_with_distractor_queries")
        print(f"{name_of(name):<52} {s['map']:6.3f} {s['mp@1']:6.3f} {s['mp@5']:6.3f} "
              f"{s['mp@10']:6.3f} {s['gld_micro_ap']:6.3f} {'' if dq is None else f'{dq:6.3f}':>6}  {search:.3f}; "
              f"{ours['extract_seconds_per_image']:.2f}"
              f"  (AP vs votes {s['vs_votes'][0]:+.4f} +- {s['vs_votes'][1]:.4f})")
    print(f"  {ours['set']}: {ours['preset']}: {ours['images']} images, {ours['queries']} queries, {ours['index']}, "
          f"{ours['descriptors']} descriptors; per query "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in ours["seconds_per_query"].items()))
    t = ours["neighbour_table"]
    print(f"  {ours['set']}: {ours['preset']}: neighbour table (k {t['k']}, >= {t['min_inliers']} inliers): "
          f"{t['edges']} edges, {t['seconds_per_image']:.3f} s per image to find")
    print(f"  {ours['set']}: {ours['preset']}: true matches surviving the image shortlist: "
          + ", ".join(f"top {n}: {v:.3f}" for n, v in ours["shortlist_survival"].items()), flush=True)


def print_sift(set_name: str, sift: dict) -> None:
    s, t = sift["scores"], sift["seconds_per_query"]
    print(f"{set_name + ': SIFT baseline':<52} {s['map']:6.3f} {s['mp@1']:6.3f} {s['mp@5']:6.3f} {s['mp@10']:6.3f} "
          f"{s['gld_micro_ap']:6.3f} {'':>6}  {t['match+ransac']:.3f}; {t['extract']:.2f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="dev,train", help="dev (landmarks-dev), train (landmarks-train)")
    parser.add_argument("--data", default=LANDMARKS_DEV, help="landmarks-dev")
    parser.add_argument("--train-data", default=LANDMARKS_TRAIN, help="landmarks-train")
    parser.add_argument("--train-queries", type=int, default=5, help="queries per landmark of landmarks-train")
    parser.add_argument("--train-database", type=int, default=40, help="database images per landmark (at most)")
    parser.add_argument("--presets", default="lite,resnet50")
    parser.add_argument("--models", default="", help="trained model folders, compared beside the presets")
    parser.add_argument("--quick", action="store_true", help="dev: three scenes and ten distractors; train: six "
                        "landmarks, 2 queries and 10 database images each")
    parser.add_argument("--no-sift", action="store_true")
    parser.add_argument("--sift-sets", default="dev", help="sets the SIFT baseline runs on (brute force over all "
                        "pairs: on train's split it takes ~10 minutes here)")
    parser.add_argument("--sift-features", type=int, default=1000, help="SIFT keypoints per image (ours: 1000 features)")
    parser.add_argument("--json", default=os.path.join(RESULTS, "retrieval_quality.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from delf_retrieval.query.retrieval import RetrievalConfig

    cache = os.path.join(RESULTS, "cache")
    os.makedirs(cache, exist_ok=True)
    report = {"sets": {}}
    print(HEADER, flush=True)
    for set_name in args.sets.split(","):
        folder = args.data if set_name == "dev" else args.train_data
        if not os.path.isdir(folder):
            print(f"{set_name}: no data at {folder}: skipped")
            continue
        root, rows, database, queries = evaluation_set(set_name, args)
        config = RetrievalConfig(top=len(database), shortlist=100)
        entry = report["sets"][set_name] = {"images": len(database), "queries": len(queries),
                                            "config": config.__dict__, "ours": [], "sift": None}
        print(f"{set_name}: {len(database)} database images, {len(queries)} queries", flush=True)
        for preset in [p for p in args.presets.split(",") + args.models.split(",") if p]:
            try:
                entry["ours"].append(run_ours(set_name, root, rows, database, queries, preset, cache, config))
                print_ours(entry["ours"][-1])
            except (OSError, ValueError) as e:  # the ResNet50 ImageNet file needs a download
                print(f"{set_name}: {preset}: unavailable ({type(e).__name__}: {e})", flush=True)
                entry["ours"].append({"preset": preset, "unavailable": f"{type(e).__name__}: {e}"})
        if not args.no_sift and set_name in args.sift_sets.split(","):
            entry["sift"] = run_sift(root, rows, database, queries, args.sift_features)
            print_sift(set_name, entry["sift"])
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
