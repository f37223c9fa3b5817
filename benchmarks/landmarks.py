"""Landmark clustering: quality on three sets of real photographs, GPS cases, speed, the 1M estimate.

    python benchmarks/landmarks.py [--sets dev,hard,train] [--features-cache DIR] [--sizes 10000,100000]
        [--json FILE]

Per set (landmarks-dev: 165 scene photos of 13 scenes + 40 distractors; landmarks-hard: 177 photos of
15 structures + 162 distractors; landmarks-train: retrieval_quality.py's split, 5 + 40 web photos of
each of 36 landmarks, noisy labels, no distractors), the features cached by retrieval_quality.py
(the lite preset) are indexed as the pipeline indexes them (``retrieval_quality.build_index``), and
every image searches the index with its own stored rows, as the build's neighbour stage does
(``landmarks.graph.search_all``: the table of k = 40 neighbours with >= 10 inliers, both ways). The
graph is cached (bench_results/cache/landmarks-graph-*.json). Then ``clustering.cluster`` over a
grid of settings, scored against the labels (no GPS: these photos carry none):

- ARI: sklearn's adjusted Rand index, every unclustered image and every distractor its own cluster;
- purity: the share of clustered images whose label is their landmark's most common one (a
  distractor has a label of its own);
- distractors left unclustered; landmark photos clustered; landmarks found (true labels).

The chosen setting is the best mean ARI over the sets. GPS: two synthetic graphs (one visual cluster
photographed in two cities; two look-alike buildings in two cities, every photo matching every
other). Speed: seconds per image of ``cluster`` on synthetic graphs shaped like a neighbour table
(landmarks of Zipf sizes, ~10 strong edges per photo, weak noise edges, 1% ambiguous photos, half
geotagged). The 1M Dataflow estimate: the clustering on one high-memory worker, and, for a version
without a neighbour table, the neighbour search at the measured seconds per image on CPU workers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
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

import first_stage  # noqa: E402  (benchmarks/ is on the path)
import pipeline_throughput as throughput  # noqa: E402
import retrieval_quality as rq  # noqa: E402

from delf_retrieval.index.neighbour_table import NeighbourTable  # noqa: E402
from delf_retrieval.landmarks import clustering, graph  # noqa: E402
from delf_retrieval.landmarks.clustering import ClusterConfig  # noqa: E402

GRID = {"min_inliers": (10, 15, 20, 30, 40), "min_support": (0.0, 0.2, 0.35, 0.5, 0.65), "min_size": (2, 3)}


def set_rows(name: str) -> tuple[str, list]:
    """(root, [(relative path, label or None)]) of every image of a set."""
    if name in ("dev", "hard"):
        root = os.path.join(DATA, "landmarks-dev" if name == "dev" else "landmarks-hard")
        return root, rq.dataset(root, False)
    root = os.path.join(DATA, "landmarks-train")
    database, queries = rq.train_split(root, 5, 40)
    label = rq._labels(root)
    return root, [(p, l) for p, l in database] + [(p, label[p]) for p in queries]


def neighbour_graph(name: str, root: str, rows: list, features_cache: str) -> dict | None:
    """The set's neighbour table (as a build keeps it) and the seconds per image of the search; cached."""
    label = rq.network("lite")[0]
    path = os.path.join(CACHE, f"landmarks-graph-{name}-{label}-{len(rows)}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    features = first_stage.cached_features(name, root, rows, features_cache)
    if features is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        reader, ids = rq.build_index(features, tmp)
        reader.load_all()
        start = time.perf_counter()
        table = graph.search_all(reader)
        seconds = (time.perf_counter() - start) / len(rows)
    out = {"ids": {p: int(i) for p, i in ids.items()}, "seconds_per_image": seconds,
           "edges": np.stack([table.image_ids, table.neighbours, table.inliers], axis=1).tolist()}
    os.makedirs(CACHE, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def quality(predicted: np.ndarray, truth: list) -> dict:
    from sklearn.metrics import adjusted_rand_score

    n = len(truth)
    true = [t if t is not None else f"distractor:{i}" for i, t in enumerate(truth)]
    pred = [f"c{p}" if p >= 0 else f"none:{i}" for i, p in enumerate(predicted.tolist())]
    clustered = predicted >= 0
    pure = 0
    for c in set(predicted[clustered].tolist()):
        members = [true[i] for i in np.flatnonzero(predicted == c)]
        pure += max(members.count(m) for m in set(members))
    distractor = np.array([t is None for t in truth])
    return {"ari": float(adjusted_rand_score(true, pred)),
            "purity": pure / max(int(clustered.sum()), 1),
            "distractors_unclustered": float((~clustered[distractor]).mean()) if distractor.any() else None,
            "landmark_photos_clustered": float(clustered[~distractor].mean()),
            "landmarks": int(len(set(predicted[clustered].tolist()))),
            "true_landmarks": len({t for t in truth if t is not None}), "images": n}


def cluster_set(data: dict, rows: list, config: ClusterConfig) -> np.ndarray:
    ids = np.array([data["ids"][p] for p, _ in rows], np.int64)
    order = np.argsort(ids)
    edges = np.asarray(data["edges"], np.int64).reshape(-1, 3)
    table = NeighbourTable(edges[:, 0], edges[:, 1], edges[:, 2])
    a, b = np.searchsorted(ids[order], table.image_ids), np.searchsorted(ids[order], table.neighbours)
    result = clustering.cluster(len(ids), order[a], order[b], table.inliers, config=config)
    return result.labels


def bridge_safe(config: ClusterConfig) -> bool:
    """Whether one ambiguous photo matching 2, 3 or 4 photos of each of two landmarks (8 photos each,
    every pair verified with 30-80 inliers; the photo's edges as strong) leaves them apart."""
    import itertools

    rng = np.random.default_rng(1)
    for links in (2, 3, 4):
        edges = [(a, b, int(rng.integers(30, 80))) for group in (range(8), range(8, 16))
                 for a, b in itertools.combinations(group, 2)]
        edges += [(16, i, int(rng.integers(30, 80))) for i in list(range(links)) + list(range(8, 8 + links))]
        e = np.asarray(edges, np.int64)
        labels = clustering.cluster(17, e[:, 0], e[:, 1], e[:, 2], config=config).labels
        if labels[0] == labels[8]:
            return False
    return True


def settings() -> list[ClusterConfig]:
    return [ClusterConfig(i, s, z) for i in GRID["min_inliers"] for s in GRID["min_support"] for z in GRID["min_size"]]


# ------------------------------------------------------------------------------------ recognition
def gap(predictions: list) -> float:
    """Google-Landmarks GAP: predictions (confidence, correct, counted) sorted by confidence, the
    mean over the M queries that show a landmark (counted) of precision at each correct one."""
    ranked = sorted([p for p in predictions if p[0] is not None], key=lambda p: -p[0])
    m = sum(1 for p in predictions if p[2])
    hits, total = 0, 0.0
    for i, (_, correct, _) in enumerate(ranked, 1):
        if correct:
            hits += 1
            total += hits / i
    return total / max(m, 1)


def recognition_scores(data: dict, rows: list, config: ClusterConfig, min_confidence: int) -> dict:
    """Each image of the set queries: its verified matches are its neighbour-table edges (the
    build's search with its stored rows, itself excluded), recognised against the set's landmarks.
    Right: the predicted landmark's other members are mostly of the query's label; a distractor is
    right only with "none". GAP and accuracy with and without the distractor queries."""
    from delf_retrieval.landmarks.recognition import RecognitionConfig, Recognizer
    from delf_retrieval.query.matching import Match

    labels = cluster_set(data, rows, config)
    ids = np.array([data["ids"][p] for p, _ in rows], np.int64)
    truth = [l for _, l in rows]
    recognizer = Recognizer(ids, labels, config=RecognitionConfig(min_confidence=min_confidence))
    edges = np.asarray(data["edges"], np.int64).reshape(-1, 3)
    by_image: dict = {}
    for a, b, w in edges.tolist():
        by_image.setdefault(a, []).append(Match(b, "", float(w), w, w, True))
    members: dict = {}
    for i, l in enumerate(labels.tolist()):
        members.setdefault(l, []).append(i)
    with_d, without_d = [], []
    for i, image_id in enumerate(ids.tolist()):
        found = recognizer.recognize(by_image.get(image_id, []))
        if found.landmark is None:
            correct, confidence = truth[i] is None, None
        else:
            others = [truth[j] for j in members[found.landmark] if j != i]
            majority = max(set(others), key=others.count) if others else None
            correct, confidence = truth[i] is not None and majority == truth[i], found.confidence
        record = (confidence, bool(correct and found.landmark is not None), truth[i] is not None, correct)
        with_d.append(record)
        if truth[i] is not None:
            without_d.append(record)
    distractors = [r for r in with_d if not r[2]]
    return {"gap": gap([r[:3] for r in with_d]), "gap_landmarks_only": gap([r[:3] for r in without_d]),
            "accuracy": float(np.mean([r[3] for r in with_d])),
            "accuracy_landmarks_only": float(np.mean([r[3] for r in without_d])),
            "distractors_none": float(np.mean([r[0] is None for r in distractors])) if distractors else None,
            "queries": len(with_d), "landmark_queries": len(without_d)}


# ------------------------------------------------------------------------------- synthetic graphs
def gps_cases() -> list[dict]:
    """Two synthetic cases with known answers, each clustered with and without its GPS."""
    import itertools

    out = []
    rng = np.random.default_rng(0)
    # (1) one visual cluster: a monument photographed in Paris and its replica in Las Vegas (8 + 8
    # photos, all match each other, within a city with more inliers: 50-90, across 20-40), 6 of
    # each geotagged; 4 more untagged photos match only four of their city's
    n = 20
    edges = [(a, b, int(rng.integers(50, 90)) if (a < 8) == (b < 8) else int(rng.integers(20, 40)))
             for a, b in itertools.combinations(range(16), 2)]
    edges += [(16 + k, c, 40) for k in range(2) for c in range(0, 8, 2)] + [(18 + k, c, 40) for k in range(2) for c in range(8, 16, 2)]
    lat = np.r_[np.full(6, 48.858), np.full(2, np.nan), np.full(6, 36.112), np.full(2, np.nan), np.full(4, np.nan)]
    lon = np.r_[np.full(6, 2.294), np.full(2, np.nan), np.full(6, -115.173), np.full(2, np.nan), np.full(4, np.nan)]
    truth = ["paris"] * 8 + ["vegas"] * 8 + ["paris"] * 2 + ["vegas"] * 2
    out.append(_case("one visual cluster in two cities (GPS must split it)", n, edges, lat, lon, truth))
    # (2) two look-alike buildings in two cities 600 km apart: 10 photos each, every photo matches
    # every other (inliers within a city higher), all geotagged
    edges = [(a, b, 60 if (a < 10) == (b < 10) else 35) for a, b in itertools.combinations(range(20), 2)]
    lat = np.r_[52.52 + rng.normal(0, 0.002, 10), 48.14 + rng.normal(0, 0.002, 10)]
    lon = np.r_[13.40 + rng.normal(0, 0.002, 10), 11.58 + rng.normal(0, 0.002, 10)]
    out.append(_case("two look-alike buildings in two cities", 20, edges, lat, lon, ["berlin"] * 10 + ["munich"] * 10))
    return out


def _case(name, n, edges, lat, lon, truth) -> dict:
    e = np.asarray(edges, np.int64)
    with_gps = clustering.cluster(n, e[:, 0], e[:, 1], e[:, 2], lat, lon).labels
    without = clustering.cluster(n, e[:, 0], e[:, 1], e[:, 2]).labels
    return {"case": name, "images": n, "with_gps": quality(with_gps, truth), "without_gps": quality(without, truth)}


def synthetic_graph(n: int, seed: int = 0, per: int = 10):
    """(a, b, inliers, latitude, longitude) of ``n`` images shaped like a neighbour table: ``per``
    strong edges from each photo of a landmark to others of it."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.zipf(1.8, n), 500)
    sizes = sizes[np.cumsum(sizes) <= n]
    sizes = np.r_[sizes, np.ones(n - sizes.sum(), np.int64)]
    landmark = np.repeat(np.arange(len(sizes)), sizes)
    start = np.repeat(np.cumsum(sizes) - sizes, sizes)
    size = sizes[landmark]
    multi = np.flatnonzero(size > 1)
    per = np.minimum(size[multi] - 1, per)
    src = np.repeat(multi, per)
    dst = start[src] + rng.integers(0, size[src])
    strong = rng.integers(15, 120, len(src))
    noise_a, noise_b = rng.integers(0, n, n // 2), rng.integers(0, n, n // 2)
    bridges = rng.choice(multi, max(1, len(multi) // 100), replace=False)
    other = rng.choice(multi, len(bridges))
    bridge_b = np.repeat(start[other], 3) + rng.integers(0, np.repeat(size[other], 3))
    a = np.r_[src, noise_a, np.repeat(bridges, 3)]
    b = np.r_[dst, noise_b, bridge_b]
    w = np.r_[strong, rng.integers(10, 25, len(noise_a)), rng.integers(30, 80, 3 * len(bridges))]
    centre_lat, centre_lon = rng.uniform(-60, 70, len(sizes)), rng.uniform(-180, 180, len(sizes))
    tagged = rng.random(n) < 0.5
    lat = np.where(tagged, centre_lat[landmark] + rng.normal(0, 0.01, n), np.nan)
    lon = np.where(tagged, centre_lon[landmark] + rng.normal(0, 0.01, n), np.nan)
    return a, b, w, lat, lon


def speed(sizes) -> list[dict]:
    """Each size at ~10 strong edges per photo, and the largest again at 40 (a table at its cut)."""
    out = []
    for n, per in [(n, 10) for n in sizes] + [(max(sizes), 40)]:
        a, b, w, lat, lon = synthetic_graph(n, per=per)
        clustering.cluster(1000, a[a < 1000] % 1000, b[a < 1000] % 1000, w[a < 1000])  # warm up
        start = time.perf_counter()
        result = clustering.cluster(n, a, b, w, lat, lon)
        seconds = time.perf_counter() - start
        out.append({"images": n, "per_photo": per, "edges": int(len(a)), "seconds": round(seconds, 3),
                    "us_per_image": round(seconds / n * 1e6, 2), "landmarks": result.count,
                    "clustered": int((result.labels >= 0).sum())})
    return out


def estimate_1m(speed_rows: list, search_s: float | None) -> dict:
    """The 1M-image job on Dataflow: the clustering on one n1-highmem-16 worker (edges in memory), and
    without a table, the neighbour search spread over CPU workers (n1-standard-8) at the measured
    seconds per image; prices: pipeline_throughput.PRICES (assumed list prices)."""
    p = throughput.PRICES
    dense = max((r for r in speed_rows if r["per_photo"] == 40), key=lambda r: r["images"])
    # linear in the images at a fixed degree (measured: the us per image at 1e4 and 1e5); x 1.5 for
    # the larger sort and cache misses at 1e6
    cluster_s = dense["seconds"] / dense["images"] * 1e6 * 1.5
    table_edges = 1e6 * 40  # a table at its cut (k = 40 per image), the worst case
    memory_gb = table_edges * 2 * 8 * 6 / 1e9  # both ways, int64, a few copies
    highmem = {"vcpus": 16, "memory_gb": 104}
    usd_h = highmem["vcpus"] * p["vcpu_h"] + highmem["memory_gb"] * p["memory_gb_h"] + 250 * p["pd_gb_h"]
    startup_h = 0.08  # a CPU worker (no CUDA image) starting, assumed
    cluster_h = startup_h + cluster_s / 3600
    out = {"images": 1_000_000, "table_edges": int(table_edges), "memory_gb": round(memory_gb, 1),
           "cluster_worker": "n1-highmem-16", "cluster_hours": round(cluster_h, 2), "cluster_usd": round(cluster_h * usd_h, 2)}
    if search_s is not None:
        workers, vcpus = 25, 8
        standard_usd_h = vcpus * p["vcpu_h"] + 30 * p["memory_gb_h"] + 250 * p["pd_gb_h"]
        search_h = startup_h + 1e6 * search_s / (workers * vcpus) / 3600
        out.update(search_s_per_image=round(search_s, 3), search_workers=f"{workers} x n1-standard-{vcpus}",
                   search_hours=round(search_h, 2), search_usd=round(search_h * workers * standard_usd_h))
    return out


# ----------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [f"Date {report['date']}, {report['machine']}, load {report['load']}.", "",
             f"`{report['command']}`", "",
             "Chosen setting (best mean ARI among the settings at least 80% pure on every set that one ambiguous "
             "photo does not chain): " + ", ".join(f"{k} {v}" for k, v in report["chosen"].items()), "",
             "| set | images | setting | ARI | purity | distractors unclustered | landmark photos clustered | landmarks (true) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["table"]:
        q = row["quality"]
        dist = "-" if q["distractors_unclustered"] is None else f"{100 * q['distractors_unclustered']:.1f}%"
        lines.append(f"| {row['set']} | {q['images']} | {row['setting']} | {q['ari']:.3f} | {100 * q['purity']:.1f}% | "
                     f"{dist} | {100 * q['landmark_photos_clustered']:.1f}% | {q['landmarks']} ({q['true_landmarks']}) |")
    lines += ["", "| set | recognition min confidence | GAP | GAP, landmark queries only | accuracy | accuracy, landmark queries only | distractor queries answered none |",
              "|---|---|---|---|---|---|---|"]
    for r in report["recognition"]:
        none = "-" if r["distractors_none"] is None else f"{100 * r['distractors_none']:.1f}%"
        lines.append(f"| {r['set']} | {r['min_confidence']} | {r['gap']:.3f} | {r['gap_landmarks_only']:.3f} | "
                     f"{100 * r['accuracy']:.1f}% | {100 * r['accuracy_landmarks_only']:.1f}% | {none} |")
    lines += ["", "| GPS case | with GPS: ARI | landmarks | without GPS: ARI | landmarks |", "|---|---|---|---|---|"]
    for case in report["gps_cases"]:
        lines.append(f"| {case['case']} | {case['with_gps']['ari']:.3f} | {case['with_gps']['landmarks']} | "
                     f"{case['without_gps']['ari']:.3f} | {case['without_gps']['landmarks']} |")
    lines += ["", "| synthetic images | strong edges per photo | edges | seconds | us per image | landmarks | clustered |",
              "|---|---|---|---|---|---|---|"]
    for row in report["speed"]:
        lines.append(f"| {row['images']:,} | {row['per_photo']} | {row['edges']:,} | {row['seconds']} | {row['us_per_image']} | "
                     f"{row['landmarks']:,} | {row['clustered']:,} |")
    e = report["estimate"]
    lines += ["", f"1M images on Dataflow: clustering a table of {e['table_edges']:,} edges (~{e['memory_gb']} GB in "
              f"memory) on one {e['cluster_worker']}: {e['cluster_hours']} h, ${e['cluster_usd']}."]
    if "search_hours" in e:
        lines.append(f"A version without a neighbour table first searches each image ({e['search_s_per_image']} s "
                     f"per image measured here): {e['search_workers']}, {e['search_hours']} h, ${e['search_usd']}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    import subprocess

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="dev,hard,train")
    parser.add_argument("--features-cache", default=DEFAULT_FEATURES)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--json", default=os.path.join(RESULTS, "landmarks.json"))
    args = parser.parse_args(argv)

    sets, search_seconds = {}, []
    for name in [s for s in args.sets.split(",") if s]:
        root, rows = set_rows(name)
        data = neighbour_graph(name, root, rows, args.features_cache)
        if data is None:
            print(f"{name}: features not all cached in {args.features_cache}: left out", file=sys.stderr)
            continue
        sets[name] = (rows, data)
        search_seconds.append(data["seconds_per_image"])
        print(f"{name}: {len(rows)} images, {len(data['edges'])} edges, {data['seconds_per_image']:.3f} s per image searched",
              file=sys.stderr)
    scores = {}
    for config in settings():
        scores[config] = {name: quality(cluster_set(data, rows, config), [l for _, l in rows])
                          for name, (rows, data) in sets.items()}
    # The rule: the best mean ARI among the settings whose landmarks are at least 80% pure on every
    # set and that one ambiguous photo does not chain (bridge_safe)
    admissible = [c for c in scores if bridge_safe(c) and all(q["purity"] >= 0.8 for q in scores[c].values())]
    chosen = max(admissible or scores, key=lambda c: (np.mean([q["ari"] for q in scores[c].values()]), c.min_inliers))
    default = ClusterConfig()
    table = []
    for label, config in (("default", default), ("chosen", chosen)):
        for name in sets:
            table.append({"set": name, "setting": f"{label}: {config.min_inliers} / {config.min_support} / {config.min_size}",
                          "quality": scores[config][name]})
    print(f"{'min_inliers':>11} {'support':>7} {'size':>4}  " + "  ".join(f"{n:>26}" for n in sets), file=sys.stderr)
    for config, per in scores.items():
        print(f"{config.min_inliers:>11} {config.min_support:>7} {config.min_size:>4}  " + "  ".join(
            f"ARI {q['ari']:.3f} pur {q['purity']:.2f} dis {q['distractors_unclustered'] or 0:.2f}" for q in per.values()),
            file=sys.stderr)
    recognition = [{"set": name, "min_confidence": c, **recognition_scores(data, rows, chosen, c)}
                   for c in (10, 20, 40, 80) for name, (rows, data) in sets.items()]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    speed_rows = speed(sizes)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": "2-core development machine", "load": os.getloadavg()[0],
        "command": "nice -n 15 python benchmarks/landmarks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "chosen": chosen.to_json(), "table": table,
        "grid": [{"setting": c.to_json(), "bridge_safe": bridge_safe(c), **{n: q for n, q in per.items()}}
                 for c, per in scores.items()],
        "gps_cases": gps_cases(), "speed": speed_rows, "recognition": recognition,
        "estimate": estimate_1m(speed_rows, float(np.mean(search_seconds)) if search_seconds else None),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
    }
    print(markdown(report))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
