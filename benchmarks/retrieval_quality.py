"""Retrieval quality on three sets of real photographs, and the sweep that picks the retrieval defaults:

- dev (../shared/data/landmarks-dev): every scene image queries an index of all the other images
  plus the distractors (relevant = the other images of its scene);
- train (../shared/data/landmarks-train, web photos of 36 landmarks, noisy labels): a split by
  image within each landmark, the same for every run: per landmark the ``--train-queries`` images
  with the smallest hash of their path query, and the next ``--train-database`` (by the same hash)
  form the database with the queries left out (relevant = the database images of its landmark).
- hard (../shared/data/landmarks-hard, 177 photos of 15 structures from clearly different
  viewpoints, 162 distractors): all 339 images indexed, every group photo queries with itself
  excluded, scored under both of the set's protocols (Revisited-Oxford Medium and Hard:
  ``gt_medium.json``, ``gt_hard.json``, positives and junk); decisions use Hard. Beside mAP, the
  mean over scenes (each scene's mean AP first; two groups hold 44% of the queries).
- train-heldout: the train split restricted to the half of the landmarks that
  ``train_attention_model.py`` leaves out of training (``landmark_halves``).

    python benchmarks/retrieval_quality.py [--quick] [--sets dev,train,hard] [--presets lite,resnet50]
        [--models DIR,...] [--no-sift] [--max-distances 0.8,1.0] [--json FILE] [--markdown FILE]

``--models`` adds trained model folders (``pipeline.train`` output, or a head-only folder such as
``models/lite0-attention``), each extracted with the lite preset's pyramid and feature budget.

Per preset and set: features of all images (cached under bench_results/cache/), one index of the
database (default IndexParams, as the pipeline builds it), then each query searches once with
itself excluded (``Retriever.search(among=...)``: its rows are not scanned; the PCA and quantizer
were trained with it, a small leak), with ``RetrievalConfig``'s defaults but ``top`` = the whole
database. Every database image is also searched once with its own stored rows, as the build's
neighbour stage does, keeping all its verified neighbours (>= 1 inlier): the neighbour table of any
(k, min inliers) is cut from that list exactly as the build cuts it.

The sweep (``retrieval_sweep.py``) then re-ranks the same searches offline for every setting:
rank_by (votes, inliers, combined = inliers + vote_weight x votes), and, with a neighbour table of
k verified neighbours per image at >= min inliers, verified query expansion (the top K verified
matches with >= T inliers expand the query, ``expansion.expand`` as ``Retriever.search`` calls it).
Per set: mAP, mP@10 and the paired per-query AP difference from today's default (RetrievalConfig's
rank_by and vote_weight, no neighbour table, no expansion) with its standard error. The decision:
the best mean mAP over the sets among the settings that lose at most ``--max-loss`` (one mAP point)
against the default on every set. ``--max-distances`` re-searches the queries with other ANN
match distances and scores the default and the chosen setting with them (paired against 0.9).

mAP and mP@k come from ``delf_retrieval.query.evaluation`` (Revisited-Oxford protocol); GLD is the
Google-Landmarks micro-AP, and GLD+dq the same with dev's 40 distractors also querying (no positives).

The classical baseline users would otherwise pick: OpenCV SIFT (same images, long side 1024,
the 1000 strongest keypoints as ours keeps 1000 features), Lowe's ratio test 0.8, affine RANSAC (``cv2.estimateAffine2D``, 20 px, 1000 iterations), brute
force over all pairs, ranked by inliers. Its query time is its feature extraction plus matching
against every database image; ours is extraction plus the index search.

Also measured: how often the true matches survive the first stage (VLAD-16 image vectors, brute force) at
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
LANDMARKS_TRAIN = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-train")
LANDMARKS_HARD = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-hard")
RESULTS = os.path.join(ROOT, "bench_results")
# The sweep's grid: combined-score weights, neighbour tables (k per image, min inliers), expansion (K, T).
VOTE_WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
TABLE_KS = (10, 20, 40)
TABLE_MINS = (10, 15, 20, 30)
EXPAND_KS = (1, 3, 5, 10)
EXPAND_TS = (10, 15, 20, 30)
DECIDING = {"dev": "standard", "train": "standard", "train-heldout": "standard", "hard": "hard"}

import retrieval_sweep as sweep  # noqa: E402  (benchmarks/ is on the path)
from retrieval_report import markdown, max_distance_markdown, print_set, print_sift, summary  # noqa: E402
from sift_baseline import METHOD, sift_matches  # noqa: E402
from train_attention_model import landmark_halves  # noqa: E402


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
    on dev and hard they are its scene images, each with itself excluded."""
    if name in ("dev", "hard"):
        root = args.data if name == "dev" else args.hard_data
        rows = dataset(root, args.quick)
        return root, rows, rows, [p for p, s in rows if s]
    queries, database = (2, 10) if args.quick else (args.train_queries, args.train_database)
    among = set(landmark_halves(args.train_data)[1]) if name == "train-heldout" else None
    db, query_paths = train_split(args.train_data, queries, database, 6 if args.quick else None, among)
    label = dict(db) | {p: l for p, l in _labels(args.train_data).items() if p in set(query_paths)}
    return args.train_data, db + [(p, label[p]) for p in query_paths], db, query_paths


def protocols(name: str, root: str, rows: list, database: list, queries: list) -> dict:
    """The set's ground truths as ``retrieval_sweep.Protocol``s: dev and train one ("standard": the
    other database images of the query's label); hard its two files ("medium", "hard"), restricted
    to the images indexed (a --quick run indexes a few scenes)."""
    label_of = dict(rows)
    if name != "hard":
        return {"standard": sweep.Protocol("standard", ground_truth(label_of, database, queries))}
    indexed, asked = {p for p, _ in database}, set(queries)
    out = {}
    for protocol in ("medium", "hard"):
        with open(os.path.join(root, f"gt_{protocol}.json")) as f:
            truth = json.load(f)
        truth = {"queries": [{"query": q["query"], "positives": [p for p in q["positives"] if p in indexed],
                              "junk": [p for p in q["junk"] if p in indexed]}
                             for q in truth["queries"] if q["query"] in asked]}
        out[protocol] = sweep.Protocol(protocol, truth, scene_of=label_of)
    return out


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
    from delf_retrieval.extraction.extractor import Extractor
    from delf_retrieval.extraction.features import Features
    from delf_retrieval.corpus.images import load_image
    from delf_retrieval.model import delf
    from pipeline.extract import main as extract_main, output_names

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
    from delf_retrieval.index import shard_reader
    from delf_retrieval.index import shards

    raw = np.concatenate([f.descriptors for f in features.values()])
    projection, quantizer = encode.train(raw, quantize.IndexParams(), expected_count=len(raw))
    ids = {uri: inputs.image_id(uri) for uri in features}
    encoded = [encode.encode_image(ids[uri], f, projection, quantizer) for uri, f in features.items()]
    table = shards.image_table([{"image_id": ids[uri], "uri": uri, "width": f.image_size[1], "height": f.image_size[0],
                                 "num_features": len(f), "content_hash": ""} for uri, f in features.items()])
    encode.write(directory, encoded, table, projection, quantizer)
    return shard_reader.IndexReader(directory), ids


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


def search_all(retriever, features: dict, ids: dict, paths: list) -> tuple[dict, dict]:
    """Each path's matches, searched with itself excluded when it is indexed, and the seconds per
    query of each stage."""
    everything = np.array(sorted(ids.values()), np.int64)
    searches, timings = {}, {}
    if paths:  # the first search loads the compiled RANSAC (numba): not timed
        retriever.search(features[paths[0]], among=everything[everything != ids.get(paths[0], -1)])
    for p in paths:
        among = everything[everything != ids[p]] if p in ids else everything
        result = retriever.search(features[p], among=among)
        searches[p] = result.matches
        for stage, seconds in result.timings.items():
            timings.setdefault(stage, []).append(seconds)
    return searches, {k: float(np.mean(v)) for k, v in timings.items()}


def searched(path: str, run, key) -> tuple:
    """``run()``'s (searches, timings, edges, neighbour seconds), kept in ``path`` (JSON) for the
    next run with the same ``key`` (retrieval config, queries, image ids): the searches are the slow part."""
    import hashlib

    from delf_retrieval.query.matching import Match

    digest = hashlib.sha256(repr(key).encode()).hexdigest()
    if os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
        if kept["key"] == digest:
            searches = {p: [Match(*m) for m in ms] for p, ms in kept["searches"].items()}
            edges = np.asarray(kept["edges"], np.int64).reshape(-1, 3)
            return searches, kept["timings"], edges, kept["neighbour_seconds"]
    searches, timings, edges, neighbour_seconds = run()
    with open(path, "w") as f:
        json.dump({"key": digest, "searches": {p: [(int(m.image_id), m.uri, float(m.score), int(m.inliers), int(m.votes),
                                                    bool(m.verified)) for m in ms] for p, ms in searches.items()},
                   "timings": timings, "edges": [[int(x) for x in e] for e in edges],
                   "neighbour_seconds": neighbour_seconds}, f)
    return searches, timings, edges, neighbour_seconds


def prepare(set_name, root, rows, database, queries, preset, cache, config) -> dict:
    """Everything the sweep needs of one set: the queries' searches (one each), the raw verified
    neighbour edges of every database image, the protocols, and the figures that do not depend on
    the setting (timings, shortlist survival)."""
    from delf_retrieval.query import retrieval
    from delf_retrieval.first_stage import vlad

    features, extract_seconds = extract_all(root, rows, preset, cache, set_name=set_name)
    label = network(preset)[0]
    preset = label if os.path.isdir(preset) else preset
    reader, ids = build_index({p: features[p] for p, _ in database},
                              os.path.join(cache, f"index-{set_name}-{label}-{len(database)}"))
    retriever = retrieval.Retriever(reader, config)
    # dev's distractors query too, for GLD+dq (hard's are never queries: the set's protocol).
    distractors = [p for p, s in database if s is None] if set_name == "dev" else []
    searches, timings, edges, neighbour_seconds = searched(
        os.path.join(cache, f"searches-{set_name}-{label}-{len(database)}-{len(queries)}.json"),
        lambda: search_all(retriever, features, ids, queries + distractors) + sweep.raw_edges(
            reader, retriever, sorted(ids.values())), (config, queries + distractors, sorted(ids.items())))
    truths = protocols(set_name, root, rows, database, queries)
    first = next(iter(truths.values()))  # dev, train: the only one; hard: medium (every true match)
    positives = {q: first.truth[q].positives if q in first.truth else frozenset() for q in queries}
    words = vlad.words_of(reader.quantizer.coarse.centroids)
    stage_ids, stage_vectors = vlad.vectors_of_postings(reader.postings(), words)
    survival = {}
    for size in (5, 10, 20, 50):
        kept = total = 0
        for p in queries:
            scores = stage_vectors @ vlad.aggregate(reader.pca.transform(features[p].descriptors), words)
            candidates = [c for c in stage_ids[np.argsort(-scores, kind="stable")[:size + 1]].tolist()
                          if c != ids.get(p)][:size]
            wanted = {ids[q] for q in positives[p]}
            kept += len(wanted & set(candidates))
            total += len(wanted)
        survival[size] = kept / max(total, 1)
    return {"set": set_name, "preset": preset, "images": len(database), "queries": queries,
            "distractors": distractors, "label_of": dict(rows), "database": database,
            "descriptors": reader.num_rows, "index": reader.manifest["spec"], "features": features, "ids": ids,
            "retriever": retriever, "searches": searches, "edges": edges, "protocols": truths,
            "seconds_per_query": timings, "neighbour_seconds_per_image": neighbour_seconds,
            "extract_seconds_per_image": extract_seconds, "shortlist_survival": survival}


def default_setting() -> sweep.Setting:
    """Today's default: RetrievalConfig's ranking and expansion, with the neighbour table every
    build keeps (NeighbourConfig)."""
    from delf_retrieval.index.neighbour_table import NeighbourConfig
    from delf_retrieval.query.retrieval import RetrievalConfig

    d, n = RetrievalConfig(), NeighbourConfig()
    if not d.expand:
        return sweep.Setting(d.rank_by, d.vote_weight)
    return sweep.Setting(d.rank_by, d.vote_weight, n.k, n.min_inliers, d.expand, d.expand_min_inliers)


def score_settings(data: dict, grid: list, min_inliers: int, searches: dict | None = None) -> dict:
    """{setting: {protocol: (AP per query, P@10 per query)}} of one set, the searches re-ranked offline."""
    searches = searches or data["searches"]
    tables = {(k, m): sweep.table(data["edges"], k, m) for k, m in {s.table for s in grid if s.table}}
    uri_of, top = data["retriever"].uri_of, data["retriever"].config.top
    memo = {}
    out, by_rule = {}, {}
    for s in grid:
        by_rule.setdefault(s.rule, []).append(s)
    protocols = data["protocols"]
    scored = set().union(*(p.queries for p in protocols.values()))  # the queries with positives somewhere
    for rule, members in by_rule.items():
        ordered = {q: sweep.rank_matches(searches[q], *rule, min_inliers) for q in scored}
        for s in members:
            per_query = {}
            for q in scored:
                key = (q, sweep.answer_key(ordered[q], s, rule))
                if key not in memo:  # settings that answer alike are scored once
                    uris = sweep.ranking(ordered[q], s, tables, uri_of, top, q)
                    memo[key] = {name: p.score_one(q, uris) for name, p in protocols.items() if q in p.positive}
                per_query[q] = memo[key]
            # in each protocol's own query order (its scene means pair them with its queries)
            out[s] = {name: (np.array([per_query[q][name][0] for q in p.queries]),
                             np.array([per_query[q][name][1] for q in p.queries])) for name, p in protocols.items()}
    return out


def rows_of(sets: dict, scores: dict, grid: list, default: sweep.Setting) -> list[dict]:
    """One row per setting: per set its figures on the deciding protocol (and hard's others), the
    paired AP difference from the default, and the mean mAP over the sets."""
    rows = []
    for s in grid:
        row = {"setting": s.to_json(), "label": s.label(), "default": s == default, "sets": {}}
        for name, data in sets.items():
            figures = {}
            for protocol, (ap, p10) in scores[name][s].items():
                base = scores[name][default][protocol][0]
                figures[protocol] = {"map": float(ap.mean()), "mp@10": float(p10.mean()),
                                     "scene_mean": data["protocols"][protocol].scene_mean(ap),
                                     "diff": list(sweep.paired(ap, base)), "queries": len(ap)}
            row["sets"][name] = {**figures[DECIDING[name]], "protocols": figures}
        row["mean_map"] = float(np.mean([row["sets"][n]["map"] for n in sets]))
        rows.append(row)
    return rows


def classic_rules(data: dict, min_inliers: int, weights) -> dict:
    """The ranking rules without expansion through the full ``evaluate`` (GLD micro-AP too; on dev
    also GLD+dq, the distractors querying): a check of the sweep's own scoring as well."""
    truth_name = DECIDING[data["set"]]
    protocol = data["protocols"][truth_name]
    truth = {"queries": [{"query": q, "positives": sorted(t.positives), "junk": sorted(t.junk)}
                         for q, t in protocol.truth.items()]}
    out = {}
    for rank_by, w in [("votes", 0.0), ("inliers", 0.0)] + [("combined", w) for w in weights]:
        def doc(paths):
            results = []
            for p in paths:
                ordered = sweep.rank_matches(data["searches"][p], rank_by, w, min_inliers)
                results.append({"query": p, "matches": [m.to_json() for m in ordered if m.uri != p]})
            return {"results": results}
        name = sweep.Setting(rank_by, w).label()
        out[name] = measure(doc(data["queries"]), truth)
        ap = np.asarray(out[name].pop("ap_per_query"))
        fast = protocol.score({p: [m["uri"] for m in r["matches"]] for p, r in
                               zip(data["queries"], doc(data["queries"])["results"])})[0]
        assert np.allclose(ap, fast), "the sweep's AP differs from delf_retrieval.query.evaluation's"
        if data["distractors"]:
            out[name]["gld_with_distractor_queries"] = measure(
                doc(data["queries"] + data["distractors"]),
                ground_truth(data["label_of"], data["database"], data["queries"], data["distractors"]))["gld_micro_ap"]
    return out


def expansion_seconds(data: dict, s: sweep.Setting, min_inliers: int) -> float:
    """Seconds per query of re-ranking and expanding (``expansion.expand``) under ``s``."""
    tables = {s.table: sweep.table(data["edges"], *s.table)} if s.table else {}
    start = time.perf_counter()
    for q in data["queries"]:
        sweep.ranking(sweep.rank_matches(data["searches"][q], s.rank_by, s.vote_weight, min_inliers), s, tables,
                      data["retriever"].uri_of, data["retriever"].config.top, q)
    return (time.perf_counter() - start) / max(len(data["queries"]), 1)


def max_distance_check(sets: dict, distances, settings: list, min_inliers: int) -> dict:
    """The queries searched again with each other ``max_distance`` (the neighbour tables stay
    those of the default search, as an index built once); each setting scored on the deciding
    protocol, paired against the same setting at the default distance."""
    import dataclasses

    out = {}
    for name, data in sets.items():
        retriever = data["retriever"]
        protocol = DECIDING[name]
        base = score_settings(data, settings, min_inliers)
        for d in distances:
            other = retriever.with_config(dataclasses.replace(retriever.config, max_distance=d))
            searches, timings = search_all(other, data["features"], data["ids"], data["queries"])
            scored = score_settings(data, settings, min_inliers, searches)
            for s in settings:
                ap = scored[s][protocol][0]
                out.setdefault(s.label(), {}).setdefault(name, {})[str(d)] = {
                    "map": float(ap.mean()), "diff": list(sweep.paired(ap, base[s][protocol][0])),
                    "search_seconds": float(sum(timings.values()))}
            print(f"  max_distance {d}: {name}: " + "; ".join(
                f"{s.label()}: {out[s.label()][name][str(d)]['map']:.3f} "
                f"({out[s.label()][name][str(d)]['diff'][0]:+.3f} +- {out[s.label()][name][str(d)]['diff'][1]:.3f})"
                for s in settings), flush=True)
    return out



def run_sift(root, rows, database, queries, max_features: int) -> dict:
    """The SIFT baseline (``sift_baseline``), scored as ours."""
    results, extract_seconds, match_seconds = sift_matches(root, rows, database, queries, max_features)
    return {"method": METHOD.format(max_features),
            "scores": measure({"results": results}, ground_truth(dict(rows), database, queries)),
            "seconds_per_query": {"extract": float(np.mean(extract_seconds)), "match+ransac": float(np.mean(match_seconds))}}


def floats(text: str, kind=float) -> tuple:
    return tuple(kind(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="dev,train,hard",
                        help="dev (landmarks-dev), train (landmarks-train), hard (landmarks-hard), train-heldout")
    parser.add_argument("--data", default=LANDMARKS_DEV, help="landmarks-dev")
    parser.add_argument("--train-data", default=LANDMARKS_TRAIN, help="landmarks-train")
    parser.add_argument("--hard-data", default=LANDMARKS_HARD, help="landmarks-hard")
    parser.add_argument("--train-queries", type=int, default=5, help="queries per landmark of landmarks-train")
    parser.add_argument("--train-database", type=int, default=40, help="database images per landmark (at most)")
    parser.add_argument("--presets", default="lite,resnet50", help="the sweep and decision use the first available")
    parser.add_argument("--models", default="", help="trained model folders, compared beside the presets")
    parser.add_argument("--quick", action="store_true", help="dev and hard: three scenes and ten distractors; train: "
                        "six landmarks, 2 queries and 10 database images each")
    parser.add_argument("--vote-weights", type=floats, default=VOTE_WEIGHTS, help="combined-score weights swept")
    parser.add_argument("--table-ks", type=lambda t: floats(t, int), default=TABLE_KS,
                        help="neighbour-table k swept (verified neighbours per image)")
    parser.add_argument("--table-mins", type=lambda t: floats(t, int), default=TABLE_MINS,
                        help="neighbour-table min inliers swept")
    parser.add_argument("--expand-ks", type=lambda t: floats(t, int), default=EXPAND_KS, help="expansion K swept")
    parser.add_argument("--expand-ts", type=lambda t: floats(t, int), default=EXPAND_TS, help="expansion T swept")
    parser.add_argument("--max-loss", type=float, default=0.01,
                        help="the most mAP a setting may lose against the default on any set (default: one point)")
    parser.add_argument("--max-distances", type=floats, default=(),
                        help="also search again with these ANN max distances (default setting and chosen)")
    parser.add_argument("--no-sift", action="store_true")
    parser.add_argument("--sift-sets", default="dev", help="sets the SIFT baseline runs on (brute force over all "
                        "pairs: on train's split it takes ~10 minutes here)")
    parser.add_argument("--sift-features", type=int, default=1000, help="SIFT keypoints per image (ours: 1000 features)")
    parser.add_argument("--json", default=os.path.join(RESULTS, "retrieval_quality.json"))
    parser.add_argument("--markdown", default=os.path.join(RESULTS, "decision.md"), help="the decision table")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from delf_retrieval.query.retrieval import RetrievalConfig

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    cache = os.path.join(RESULTS, "cache")
    os.makedirs(cache, exist_ok=True)
    report = {"started": started, "load_at_start": os.getloadavg(), "command": sys.argv, "sets": {}}
    default = default_setting()
    rules = [("votes", 0.0), ("inliers", 0.0)] + [("combined", w) for w in args.vote_weights]
    grid = sweep.settings(rules, args.table_ks, args.table_mins, args.expand_ks, args.expand_ts)
    if default not in grid:
        grid.insert(0, default)
    set_names = args.sets.split(",")
    folders = {"dev": args.data, "hard": args.hard_data}
    prepared, scores = {}, {}
    for set_name in set_names:
        folder = folders.get(set_name, args.train_data)
        if not os.path.isdir(folder):
            print(f"{set_name}: no data at {folder}: skipped")
            continue
        root, rows, database, queries = evaluation_set(set_name, args)
        config = RetrievalConfig(top=len(database), expand=0)  # expansion is re-applied offline, per setting
        entry = report["sets"][set_name] = {"images": len(database), "queries": len(queries),
                                            "config": config.__dict__, "ours": [], "sift": None}
        print(f"{set_name}: {len(database)} database images, {len(queries)} queries", flush=True)
        for preset in [p for p in args.presets.split(",") + args.models.split(",") if p]:
            try:
                data = prepare(set_name, root, rows, database, queries, preset, cache, config)
            except (OSError, ValueError) as e:  # the ResNet50 ImageNet file needs a download
                print(f"{set_name}: {preset}: unavailable ({type(e).__name__}: {e})", flush=True)
                entry["ours"].append({"preset": preset, "unavailable": f"{type(e).__name__}: {e}"})
                continue
            classic = classic_rules(data, config.min_inliers, args.vote_weights)
            print_set(data, classic, DECIDING[set_name])
            entry["ours"].append({k: data[k] for k in ("preset", "images", "descriptors", "index", "seconds_per_query",
                                                       "neighbour_seconds_per_image", "extract_seconds_per_image",
                                                       "shortlist_survival")}
                                 | {"queries": len(queries), "rules": classic, "verified_pairs": len(data["edges"])})
            if set_name not in prepared:  # the sweep: the first preset that is available
                start = time.perf_counter()
                scores[set_name] = score_settings(data, grid, config.min_inliers)
                print(f"  {set_name}: swept {len(grid)} settings in {time.perf_counter() - start:.0f} s", flush=True)
                prepared[set_name] = data
        if not args.no_sift and set_name in args.sift_sets.split(",") and set_name != "hard":
            entry["sift"] = run_sift(root, rows, database, queries, args.sift_features)
            print_sift(set_name, entry["sift"])
    names = list(prepared)
    if names:
        rows = rows_of(prepared, scores, grid, default)
        chosen = sweep.decide(rows, names, args.max_loss)
        table = markdown(rows, names, chosen, args.max_loss)
        base = next(r for r in rows if r["default"])
        chosen_setting = sweep.Setting(**chosen["setting"])
        timing = {}
        for n, data in prepared.items():
            timing[n] = {"search_seconds_per_query": data["seconds_per_query"],
                         "search_total": float(sum(data["seconds_per_query"].values())),
                         "rerank_expand_seconds_default": expansion_seconds(data, default, RetrievalConfig().min_inliers),
                         "rerank_expand_seconds_chosen": expansion_seconds(data, chosen_setting,
                                                                           RetrievalConfig().min_inliers),
                         "neighbour_seconds_per_database_image": data["neighbour_seconds_per_image"]}
        text = summary(prepared, names, DECIDING, grid, started, report["load_at_start"][0], args.max_loss, default,
                       base, chosen, rows, timing)
        text += "\n\n" + table + "\n"
        print("\n" + text, flush=True)
        report.update({"grid": len(grid), "default": base, "chosen": chosen, "rows": rows, "timing": timing,
                       "decision_rule": {"max_loss": args.max_loss, "sets": names,
                                         "protocols": {n: DECIDING[n] for n in names}},
                       "ap_per_query": {n: {label: {p: scores[n][s][p][0].tolist() for p in scores[n][s]}
                                            for label, s in (("default", default), ("chosen", chosen_setting))}
                                        for n in names}})
        if args.max_distances:
            print(f"max_distance (default {RetrievalConfig().max_distance}), queries searched again:", flush=True)
            report["max_distance"] = max_distance_check(prepared, args.max_distances,
                                                        list(dict.fromkeys([default, chosen_setting])),
                                                        RetrievalConfig().min_inliers)
            text += ("\nThe queries searched again with other ANN max distances (neighbour tables of the default "
                     f"search): mAP, paired difference from max_distance {RetrievalConfig().max_distance} (SE):\n\n"
                     + max_distance_markdown(report["max_distance"]) + "\n")
        os.makedirs(os.path.dirname(args.markdown), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(f"# Retrieval defaults: the sweep\n\n`{' '.join(sys.argv)}`\n\n" + text)
        print(f"written {args.markdown}")
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report["load_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
