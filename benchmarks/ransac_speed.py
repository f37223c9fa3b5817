"""Our affine RANSAC (delf_retrieval.query.verify) against skimage.measure.ransac and OpenCV's
cv2.estimateAffine2D on the same putative matches: time per pair and inlier counts.

    python benchmarks/ransac_speed.py [--quick] [--images DIR] [--features DIR] [--repeats R]
                                      [--skimage-repeats R] [--json OUT]

Putative matches:
- real: DELF features of landmarks-dev photographs (../shared/data/landmarks-dev), extracted once
  with the `lite` preset into --features (re-runs reuse them); mutual nearest neighbours on the
  L2-normalised descriptors, no ratio test (what an ANN search hands to verification: many
  outliers). Same-scene pairs (the first three photos of each scene, all pairs among them) and
  different-scene pairs (each scene's first photo against the next scene's and against a
  distractor).
- synthetic: a planted affine map, 1 to 3 px noise, uniform outliers, at several sizes and
  inlier fractions.

Settings compared, all with the paper's parameters (affine, 3 samples, 20 px, at most 1000 trials):
- fixed:    ours and skimage run all 1000 hypotheses, no early exit: ours with confidence=None; skimage with
            its stop rule patched out (skimage.measure.fit._dynamic_max_trials -> inf). Its default
            stop_probability=1 is NOT a fixed budget: it clips 1 - p to machine epsilon, i.e. stops
            at confidence 1 - 2e-16, after ~90 trials at a 70% inlier ratio. Same work on both
            sides: the fair speed comparison with skimage, and the inlier comparison at equal effort.
            OpenCV cannot run a fixed budget (it requires confidence < 1): it runs with the largest
            confidence below 1 (1 - 2**-53), so like skimage's default it stops early where the
            inlier ratio is high (after ~280 trials at 50%, ~1000 below 35%).
- adaptive: all stop early on confidence 0.999 with the same formula, re-computed after each
            improvement: ours with its default confidence, skimage with stop_probability=0.999,
            OpenCV with confidence=0.999.
OpenCV: method=cv2.RANSAC, ransacReprojThreshold=20, maxIters=1000, its default refinement of the
model (refineIters=10, Levenberg-Marquardt on the inliers, which does not re-score the mask), float32
points as it converts them, one thread (cv2.setNumThreads(1); ours is single-threaded too). Skipped,
with a note, when cv2 is not installed.
Inliers: ours are re-scored after the least-squares refit; skimage and OpenCV report the best
hypothesis' set, so "ours no-refit" (refit=False, the best hypothesis' set) is the like-for-like
count. skimage is also run with a second seed, OpenCV on the matches in another (seeded random)
order, since its RANSAC always starts its generator from the same internal seed (cv2.setRNGSeed does
not reach it): their own run-to-run spread is the yardstick for "the same inlier counts".
Times: per pair the median of --repeats runs (ours, OpenCV) / of --skimage-repeats runs (default
max(1, --repeats // 3); skimage is slower), on one process, after one untimed call of ours (which
loads the compiled loop); wall-clock, and CPU time of the process (time.process_time, all its
threads), which a loaded machine inflates less. Summary speedups are ratios of total times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from unittest import mock

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
LANDMARKS_DEV = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-dev")

QUICK = {"photos_per_scene": 2, "scenes": 5, "distractors": 2, "synthetic": [(300, 0.3)], "repeats": 3}
FULL = {"photos_per_scene": 3, "scenes": None, "distractors": 13,
        "synthetic": [(100, 0.5), (300, 0.1), (300, 0.3), (300, 0.6), (1000, 0.1), (1000, 0.3), (1000, 0.6)],
        "repeats": 7}
PARAMS = {"residual_threshold": 20.0, "max_trials": 1000, "min_samples": 3}
OPENCV_FIXED_CONFIDENCE = float(np.nextafter(1.0, 0.0))  # OpenCV asserts confidence < 1


def load_opencv():
    """cv2 on one thread, or None (with a note) when it is not installed."""
    try:
        import cv2
    except ImportError:
        print("cv2 not installed (pip install opencv-python-headless): the OpenCV columns are skipped",
              file=sys.stderr)
        return None
    cv2.setNumThreads(1)
    return cv2


def choose_photos(images_dir: str, photos_per_scene: int, scenes: int | None, distractors: int):
    scene_dirs = sorted(d for d in os.listdir(os.path.join(images_dir, "images")))[:scenes]
    chosen = {s: sorted(os.listdir(os.path.join(images_dir, "images", s)))[:photos_per_scene] for s in scene_dirs}
    paths = {s: [os.path.join(images_dir, "images", s, f) for f in files] for s, files in chosen.items()}
    distractor_files = sorted(os.listdir(os.path.join(images_dir, "distractors")))[:distractors]
    return paths, [os.path.join(images_dir, "distractors", f) for f in distractor_files]


def extract_features(paths: list[str], features_dir: str) -> dict[str, object]:
    """Features of each photo with the lite preset, cached in features_dir by pipeline.extract."""
    from delf_retrieval.extraction import presets
    from delf_retrieval.extraction.features import Features
    from pipeline import extract

    names = extract.output_names(paths)
    extract.main(presets.model_config("lite"), presets.extraction_config("lite"), paths, features_dir,
                 progress=False)
    return {p: Features.from_npz(os.path.join(features_dir, names[p] + ".npz")) for p in paths}


def real_pairs(images_dir: str, features_dir: str, settings: dict) -> list[dict]:
    from delf_retrieval.query.verify import mutual_nearest_neighbours

    scenes, distractors = choose_photos(images_dir, settings["photos_per_scene"], settings["scenes"],
                                        settings["distractors"])
    features = extract_features([p for ps in scenes.values() for p in ps] + distractors, features_dir)
    pairs = []
    names = sorted(scenes)
    for s in names:
        ps = scenes[s]
        pairs += [("same", ps[i], ps[j]) for i in range(len(ps)) for j in range(i + 1, len(ps))]
    for k, s in enumerate(names):
        pairs.append(("different", scenes[s][0], scenes[names[(k + 1) % len(names)]][0]))
        if distractors:
            pairs.append(("different", scenes[s][0], distractors[k % len(distractors)]))
    problems = []
    for kind, a, b in pairs:
        fa, fb = features[a], features[b]
        matches = mutual_nearest_neighbours(fa.descriptors, fb.descriptors)
        problems.append({"kind": kind, "name": f"{os.path.relpath(a, images_dir)} ~ {os.path.relpath(b, images_dir)}",
                         "src": fa.locations[matches[:, 0]].astype(np.float64),
                         "dst": fb.locations[matches[:, 1]].astype(np.float64)})
    return problems


def synthetic_pairs(settings: dict, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    problems = []
    for n, inlier_fraction in settings["synthetic"]:
        linear = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]) * rng.uniform(0.6, 1.4, 2)
        src = rng.uniform(0, 1024, (n, 2))
        dst = src @ linear.T + rng.uniform(-100, 100, 2) + rng.normal(0, rng.uniform(1, 3), (n, 2))
        outliers = rng.random(n) >= inlier_fraction
        dst[outliers] = rng.uniform(0, 1024, (outliers.sum(), 2))
        problems.append({"kind": "synthetic", "name": f"n={n} inliers={inlier_fraction:.0%}", "src": src, "dst": dst})
    return problems


def timed(fn, repeats: int):
    """(median wall seconds, median CPU seconds of this process, the last result)."""
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu)), result


def run_problem(problem: dict, repeats: int, skimage_repeats: int, cv2=None, seed: int = 0) -> dict:
    from skimage.measure import fit as skimage_fit
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    from delf_retrieval.query.verify import ransac_affine

    src, dst = problem["src"], problem["dst"]
    row = {"kind": problem["kind"], "name": problem["name"], "matches": len(src)}
    if len(src) < 3:
        return row

    def skimage_run(stop_probability, rng):
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if stop_probability is None:  # no early exit at all (see the module docstring)
                stack.enter_context(mock.patch.object(skimage_fit, "_dynamic_max_trials", lambda *a: np.inf))
                stop_probability = 1.0
            _, inliers = ransac((src, dst), AffineTransform, min_samples=PARAMS["min_samples"],
                                residual_threshold=PARAMS["residual_threshold"], max_trials=PARAMS["max_trials"],
                                stop_probability=stop_probability, rng=rng)
        return 0 if inliers is None else int(np.sum(inliers))

    def ours_run(confidence, refit=True):
        return ransac_affine(src, dst, residual_threshold=PARAMS["residual_threshold"],
                             max_trials=PARAMS["max_trials"], confidence=confidence, seed=seed, refit=refit)

    src32, dst32 = src.astype(np.float32), dst.astype(np.float32)
    other_order = np.random.default_rng(seed + 1).permutation(len(src))

    def opencv_run(confidence, order=None):
        a, b = (src32, dst32) if order is None else (src32[order], dst32[order])
        _, mask = cv2.estimateAffine2D(a, b, method=cv2.RANSAC, ransacReprojThreshold=PARAMS["residual_threshold"],
                                       maxIters=PARAMS["max_trials"], confidence=confidence)
        return 0 if mask is None else int(mask.sum())

    for setting, confidence, stop_probability, cv_confidence in (("fixed", None, None, OPENCV_FIXED_CONFIDENCE),
                                                                 ("adaptive", 0.999, 0.999, 0.999)):
        seconds, cpu, result = timed(lambda: ours_run(confidence), repeats)
        sk_seconds, sk_cpu, sk_inliers = timed(lambda: skimage_run(stop_probability, seed), skimage_repeats)
        row[setting] = {"ours_s": seconds, "ours_cpu_s": cpu, "skimage_cpu_s": sk_cpu,
                        "ours_inliers": result.num_inliers, "ours_trials": result.trials,
                        "ours_inliers_no_refit": ours_run(confidence, refit=False).num_inliers,
                        "skimage_s": sk_seconds, "skimage_inliers": sk_inliers,
                        "skimage_inliers_other_seed": skimage_run(stop_probability, seed + 1),
                        "speedup": sk_seconds / seconds}
        if cv2 is not None:
            cv_seconds, cv_cpu, cv_inliers = timed(lambda: opencv_run(cv_confidence), repeats)
            row[setting].update({"opencv_s": cv_seconds, "opencv_cpu_s": cv_cpu, "opencv_inliers": cv_inliers,
                                 "opencv_inliers_other_order": opencv_run(cv_confidence, other_order),
                                 "speedup_vs_opencv": cv_seconds / seconds})
    return row


def relative_difference(a: int, b: int) -> float:
    return abs(a - b) / max(b, 1)


def summarise(rows: list[dict], kinds) -> dict:
    out = {}
    for setting in ("fixed", "adaptive"):
        rs = [r[setting] for r in rows if setting in r and r["kind"] in kinds]
        if not rs:
            continue
        ours_total = sum(r["ours_inliers"] for r in rs)
        sk_total = sum(r["skimage_inliers"] for r in rs)
        out[setting] = {
            "pairs": len(rs),
            "ours_ms_median": 1e3 * float(np.median([r["ours_s"] for r in rs])),
            "skimage_ms_median": 1e3 * float(np.median([r["skimage_s"] for r in rs])),
            "speedup_total": sum(r["skimage_s"] for r in rs) / sum(r["ours_s"] for r in rs),
            "ours_cpu_ms_median": 1e3 * float(np.median([r["ours_cpu_s"] for r in rs])),
            "skimage_cpu_ms_median": 1e3 * float(np.median([r["skimage_cpu_s"] for r in rs])),
            "speedup_cpu_total": sum(r["skimage_cpu_s"] for r in rs) / max(sum(r["ours_cpu_s"] for r in rs), 1e-9),
            "speedup_median": float(np.median([r["speedup"] for r in rs])),
            "inliers_ours_total": ours_total, "inliers_skimage_total": sk_total,
            "inliers_relative_difference_total": (ours_total - sk_total) / max(sk_total, 1),
            "inliers_relative_difference_median": float(np.median(
                [relative_difference(r["ours_inliers"], r["skimage_inliers"]) for r in rs])),
            "inliers_no_refit_total": sum(r["ours_inliers_no_refit"] for r in rs),
            "inliers_no_refit_relative_difference_total":
                (sum(r["ours_inliers_no_refit"] for r in rs) - sk_total) / max(sk_total, 1),
            "inliers_no_refit_relative_difference_median": float(np.median(
                [relative_difference(r["ours_inliers_no_refit"], r["skimage_inliers"]) for r in rs])),
            "skimage_seed_spread_median": float(np.median(
                [relative_difference(r["skimage_inliers_other_seed"], r["skimage_inliers"]) for r in rs])),
        }
        if all("opencv_s" in r for r in rs):
            cv_total = sum(r["opencv_inliers"] for r in rs)
            out[setting].update({
                "opencv_ms_median": 1e3 * float(np.median([r["opencv_s"] for r in rs])),
                "opencv_cpu_ms_median": 1e3 * float(np.median([r["opencv_cpu_s"] for r in rs])),
                "speedup_vs_opencv_total": sum(r["opencv_s"] for r in rs) / sum(r["ours_s"] for r in rs),
                "speedup_vs_opencv_cpu_total":
                    sum(r["opencv_cpu_s"] for r in rs) / max(sum(r["ours_cpu_s"] for r in rs), 1e-9),
                "inliers_opencv_total": cv_total,
                "inliers_no_refit_vs_opencv_relative_difference_total":
                    (sum(r["ours_inliers_no_refit"] for r in rs) - cv_total) / max(cv_total, 1),
                "inliers_no_refit_vs_opencv_relative_difference_mean": float(np.mean(
                    [relative_difference(r["ours_inliers_no_refit"], r["opencv_inliers"]) for r in rs])),
                "opencv_order_spread_mean": float(np.mean(
                    [relative_difference(r["opencv_inliers_other_order"], r["opencv_inliers"]) for r in rs])),
            })
    return out


def print_row(r: dict) -> None:
    if "fixed" not in r:
        print(f"{r['kind']:<9} {r['matches']:>5}  (fewer than 3 matches) {r['name']}")
        return
    f, a = r["fixed"], r["adaptive"]

    def opencv(s):  # time and inliers (this order, another order), or blanks without cv2
        if "opencv_s" not in s:
            return f" {'-':>7} {'-':>5} {'-':>5}"
        return f" {1e3 * s['opencv_s']:>7.2f} {s['opencv_inliers']:>5} {s['opencv_inliers_other_order']:>5}"

    print(f"{r['kind']:<9} {r['matches']:>5} | {1e3 * f['ours_s']:>7.2f} {1e3 * f['skimage_s']:>8.1f}"
          f" {f['speedup']:>6.1f}x"
          f" {f['ours_inliers']:>5} {f['ours_inliers_no_refit']:>5} {f['skimage_inliers']:>5}"
          f" {f['skimage_inliers_other_seed']:>5}{opencv(f)} |"
          f" {1e3 * a['ours_s']:>7.2f} {a['ours_trials']:>5} {1e3 * a['skimage_s']:>8.1f} {a['speedup']:>6.1f}x"
          f" {a['ours_inliers']:>5} {a['ours_inliers_no_refit']:>5} {a['skimage_inliers']:>5}{opencv(a)}"
          f" | {r['name']}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--images", default=LANDMARKS_DEV, help="landmarks-dev layout: images/<scene>/, distractors/")
    parser.add_argument("--features", default=os.path.join(ROOT, "bench_results", "ransac_speed_features"),
                        help="cache of extracted features (lite preset)")
    parser.add_argument("--repeats", type=int, help="timed runs of ours and of OpenCV per pair (median)")
    parser.add_argument("--skimage-repeats", type=int, help="timed runs of skimage per pair (default repeats // 3)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench_results", "ransac_speed.json"))
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.repeats:
        settings["repeats"] = args.repeats
    settings["skimage_repeats"] = args.skimage_repeats or max(1, settings["repeats"] // 3)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cv2 = load_opencv()

    problems = []
    if os.path.isdir(args.images):
        problems += real_pairs(args.images, args.features, settings)
    else:
        print(f"{args.images} not found: synthetic pairs only", file=sys.stderr)
    problems += synthetic_pairs(settings)
    from delf_retrieval.query.verify import ransac_affine

    warm_up = synthetic_pairs({"synthetic": [(50, 0.5)]})[0]
    ransac_affine(warm_up["src"], warm_up["dst"])  # untimed: loads (or compiles) the compiled loop

    print(f"{'':<9} {'':>5} | fixed 1000 trials, no early exit (OpenCV: confidence 1 - 2**-53){'':<19}"
          f" | adaptive, confidence 0.999")
    print(f"{'kind':<9} {'match':>5} | {'ours ms':>7} {'skim ms':>8} {'speed':>7} {'ours':>5} {'norf':>5} {'skim':>5}"
          f" {'skim2':>5} {'cv ms':>7} {'cv':>5} {'cv2':>5} |"
          f" {'ours ms':>7} {'tri':>5} {'skim ms':>8} {'speed':>7} {'ours':>5} {'norf':>5} {'skim':>5}"
          f" {'cv ms':>7} {'cv':>5} {'cv2':>5} | pair")
    rows = []
    for problem in problems:
        rows.append(run_problem(problem, settings["repeats"], settings["skimage_repeats"], cv2))
        print_row(rows[-1])
    summary = {name: summarise(rows, kinds) for name, kinds in
               (("real same-scene", {"same"}), ("real different-scene", {"different"}),
                ("synthetic", {"synthetic"}), ("all", {"same", "different", "synthetic"}))}
    print()
    print("inliers: ours (refit, re-scored) and ours no-refit (the best hypothesis' set, like skimage's) vs skimage;"
          " rel diff = (ours - skimage) / skimage over all pairs, then the median of |ours - skimage| / skimage"
          " per pair;"
          " skimage seed spread = median per-pair |skimage(seed 1) - skimage(seed 0)| / skimage(seed 0)")
    print(f"{'pairs':<21} {'setting':<9} {'n':>3} {'ours ms':>8} {'skim ms':>8} {'speedup':>8} {'(median)':>8}"
          f" {'ours cpu':>8} {'skim cpu':>8} {'cpu spd':>8}"
          f" {'inl ours':>8} {'no-refit':>8} {'inl skim':>8} {'rel diff':>8} {'(median)':>8} {'no-refit':>8}"
          f" {'(median)':>8} {'skim seed':>9}")
    for name, by_setting in summary.items():
        for setting, s in by_setting.items():
            print(f"{name:<21} {setting:<9} {s['pairs']:>3} {s['ours_ms_median']:>8.2f} {s['skimage_ms_median']:>8.1f}"
                  f" {s['speedup_total']:>7.1f}x {s['speedup_median']:>7.1f}x {s['ours_cpu_ms_median']:>8.2f}"
                  f" {s['skimage_cpu_ms_median']:>8.1f} {s['speedup_cpu_total']:>7.1f}x {s['inliers_ours_total']:>8}"
                  f" {s['inliers_no_refit_total']:>8} {s['inliers_skimage_total']:>8}"
                  f" {100 * s['inliers_relative_difference_total']:>+7.1f}%"
                  f" {100 * s['inliers_relative_difference_median']:>7.1f}%"
                  f" {100 * s['inliers_no_refit_relative_difference_total']:>+7.1f}%"
                  f" {100 * s['inliers_no_refit_relative_difference_median']:>7.1f}%"
                  f" {100 * s['skimage_seed_spread_median']:>8.1f}%")
    if cv2 is not None:
        print()
        print("ours vs OpenCV (cv2.estimateAffine2D): inliers of ours no-refit vs OpenCV's (both the best"
              " hypothesis' set); rel diff = over all pairs, then the mean per-pair |ours - OpenCV| / OpenCV;"
              " OpenCV order spread = mean per-pair change of OpenCV's count with the matches in another order")
        print(f"{'pairs':<21} {'setting':<9} {'n':>3} {'ours ms':>8} {'cv ms':>8} {'speedup':>8}"
              f" {'ours cpu':>8} {'cv cpu':>8} {'cpu spd':>8} {'no-refit':>8} {'inl cv':>8} {'rel diff':>8}"
              f" {'(mean)':>8} {'cv order':>8}")
        for name, by_setting in summary.items():
            for setting, s in by_setting.items():
                print(f"{name:<21} {setting:<9} {s['pairs']:>3} {s['ours_ms_median']:>8.2f}"
                      f" {s['opencv_ms_median']:>8.2f} {s['speedup_vs_opencv_total']:>7.1f}x"
                      f" {s['ours_cpu_ms_median']:>8.2f} {s['opencv_cpu_ms_median']:>8.2f}"
                      f" {s['speedup_vs_opencv_cpu_total']:>7.1f}x {s['inliers_no_refit_total']:>8}"
                      f" {s['inliers_opencv_total']:>8}"
                      f" {100 * s['inliers_no_refit_vs_opencv_relative_difference_total']:>+7.1f}%"
                      f" {100 * s['inliers_no_refit_vs_opencv_relative_difference_mean']:>7.1f}%"
                      f" {100 * s['opencv_order_spread_mean']:>7.1f}%")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"quick": args.quick, "params": PARAMS, "settings": {k: v for k, v in settings.items()},
                   "rows": rows, "summary": summary}, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
