"""Throughput of the Beam index build (pipeline.run) on the local runner: images/s, CPU s/image, peak
RSS of the whole process tree and the time per stage, then a scaling curve over a generated corpus,
and an on-paper Dataflow cost/time estimate for 1M images.

    python benchmarks/pipeline_throughput.py [--quick] [--parts dev,scaling,estimate]
        [--sizes 500,2000,5000,10000,50000] [--json bench_results/pipeline_throughput.json]

dev:      landmarks-dev (../shared/data/landmarks-dev: scenes + distractors) on the in-process runner
          and with --direct_running_mode=multi_processing --direct_num_workers=2.
scaling:  a generated corpus (procedurally textured JPEGs, reproducible from --seed, written to a
          temporary folder and removed afterwards) at increasing sizes, listed through a CSV as
          Google-Landmarks ships it.
estimate: FLOPs of each backbone over a paper pyramid (7 scales of a 1024x768 image) from the Keras
          graph, a stated fraction of the GPU's peak, the measured CPU cost of the other stages, and
          assumed Dataflow prices -> time and cost for 1M images.

Each build runs in its own process (this script with ``_run``); the parent samples the RSS and CPU
time of that process and all its descendants (the SDK worker processes of multi_processing mode)
and the machine load, every 0.25 s. The stage breakdown is read from the job's own Beam metrics:
the ``delf/<stage>_us`` distributions that the transforms record (see transforms/extract.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
LANDMARKS_DEV = os.path.join(os.path.dirname(ROOT), "shared", "data", "landmarks-dev")
STAGES = ("read", "decode", "model_load", "extract", "sample", "train", "encode", "write", "publish")
MULTI = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]

# Extraction settings of each part (stated in the output and the README).
DEV_SETTINGS = ["--preset", "lite", "--max-image-size", "640", "--scales", "0.5,0.7071,1.0", "--max-features", "500"]
DEV_SETTINGS_QUICK = ["--preset", "lite", "--max-image-size", "320", "--scales", "1.0", "--max-features", "200"]
SCALING_SETTINGS = ["--preset", "lite", "--scales", "1.0", "--max-features", "100", "--sample-size", "200000"]
SYNTHETIC_SIZE = (160, 120)  # width, height of generated images


# ----------------------------------------------------------------------------- the synthetic corpus
def synthetic_image(rng, width: int, height: int):
    """One procedurally textured RGB image: a colour gradient, a few oriented gratings, random
    rectangles and ellipses, and noise; every choice drawn from ``rng``."""
    import numpy as np
    from PIL import Image, ImageDraw

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3) + (xs[..., None] / width) * rng.uniform(-80, 80, 3) + (ys[..., None] / height) * rng.uniform(-80, 80, 3)
    for _ in range(rng.integers(2, 5)):
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 40)
        wave = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 2 * np.pi))
        base += wave[..., None] * rng.uniform(-50, 50, 3)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 12)):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.uniform(5, width / 2), y0 + rng.uniform(5, height / 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=colour)
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, rng.uniform(2, 12), (height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_synthetic_range(folder: str, first: int, last: int, seed: int, size, quality: int) -> None:
    import numpy as np

    for i in range(first, last):
        path = synthetic_path(folder, i)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            synthetic_image(np.random.default_rng([seed, i]), *size).save(path, quality=quality)


def synthetic_path(folder: str, i: int) -> str:
    return os.path.join(folder, f"part-{i // 1000:04d}", f"{i:07d}.jpg")


def write_synthetic_corpus(folder: str, count: int, seed: int = 0, size=SYNTHETIC_SIZE, quality: int = 85,
                           processes: int = 2) -> list[str]:
    """``count`` JPEGs under ``folder`` (1000 per subfolder); image i depends only on (seed, i), so
    the corpus is the same whatever the number of processes writing it."""
    from concurrent.futures import ProcessPoolExecutor

    step = 1000
    with ProcessPoolExecutor(processes) as pool:
        jobs = [pool.submit(_write_synthetic_range, folder, a, min(a + step, count), seed, size, quality)
                for a in range(0, count, step)]
        for job in jobs:
            job.result()
    return [synthetic_path(folder, i) for i in range(count)]


def write_listing(paths: list[str], listing: str) -> str:
    """A Google-Landmarks style CSV (id,url,landmark_id) of local paths."""
    with open(listing, "w") as f:
        f.write("id,url,landmark_id\n")
        for i, path in enumerate(paths):
            f.write(f"{i},{path},{i % 100}\n")
    return listing


# ----------------------------------------------------------------------------- one measured build
def run_build(argv: list[str], metrics_out: str) -> None:
    """The child: pipeline.run's build, in-process, then its metrics and timings as JSON."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from pipeline import cli
    from pipeline import run as job

    cli.quiet_tensorflow()
    start = time.time()
    from apache_beam.options.pipeline_options import PipelineOptions

    args, beam_args = job.parse_args(argv)
    times, results = {}, []

    class Timed(beam.Pipeline):  # the local runner; the graph's build and its run timed apart
        def run(self, test_runner_api="AUTO"):
            times["graph_built"] = time.time()
            results.append(super().run(test_runner_api))
            return results[-1]

    assert job.run(argv, test_pipeline=Timed(runner=FnApiRunner(), options=PipelineOptions(beam_args))) == 0
    result = results[0]
    graph_built, finished = times["graph_built"], time.time()
    from delf_retrieval.index import layout

    manifest = layout.read_manifest(args.index)
    metrics = result.metrics().query()
    value = lambda r: r.committed if r.committed is not None else r.attempted  # noqa: E731
    distributions = {}
    for r in metrics["distributions"]:
        if r.key.metric.namespace == "delf":
            d = value(r)
            old = distributions.setdefault(r.key.metric.name, {"sum": 0, "count": 0, "max": 0})
            old["sum"] += d.sum
            old["count"] += d.count
            old["max"] = max(old["max"], d.max)
    counters = {}
    for r in metrics["counters"]:
        if r.key.metric.namespace == "delf":
            counters[r.key.metric.name] = counters.get(r.key.metric.name, 0) + value(r)
    with open(metrics_out, "w") as f:
        json.dump({"distributions": distributions, "counters": counters, "counts": manifest["counts"],
                   "spec": manifest["spec"], "startup_s": graph_built - start,
                   "pipeline_s": finished - graph_built}, f)


class TreeSampler(threading.Thread):
    """Peak RSS (sum over a process and all its descendants), CPU seconds per process and the
    1-minute load average, sampled every ``every`` seconds until stopped."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_rss = 0
        self.peak_processes = 0
        self.cpu = {}  # pid -> last seen user+system seconds
        self.loads = []
        self.stopped = threading.Event()

    def run(self):
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stopped.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, len(procs))
            self.loads.append(os.getloadavg()[0])
            self.stopped.wait(self.every)


def measure(name: str, argv: list[str], workdir: str) -> dict:
    """Run one build in a child process and return its figures."""
    metrics_out = os.path.join(workdir, f"{name}.metrics.json")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()
    start = time.time()
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_run", metrics_out, "--"] + argv,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(child.pid)
    sampler.start()
    log, _ = child.communicate()
    wall = time.time() - start
    sampler.stopped.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{log[-4000:]}")
    with open(metrics_out) as f:
        job = json.load(f)
    # Reaped descendants count in RUSAGE_CHILDREN; the sampler also sees workers that were never
    # waited for. Take the larger.
    cpu_rusage = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cpu = max(cpu_rusage, sum(sampler.cpu.values()))
    images = job["counts"]["images"]
    stages_s = {s: job["distributions"].get(f"{s}_us", {}).get("sum", 0) / 1e6 for s in STAGES}
    loads = sampler.loads or [load_before[0]]
    return {
        "name": name, "argv": argv, "images": images, "rejected": job["counts"]["rejected"],
        "descriptors": job["counts"]["descriptors"], "spec": job["spec"],
        "wall_s": round(wall, 2), "pipeline_s": round(job["pipeline_s"], 2), "startup_s": round(job["startup_s"], 2),
        "images_per_s": round(images / job["pipeline_s"], 3),
        "cpu_s": round(cpu, 1), "cpu_s_per_image": round(cpu / max(images, 1), 4),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1), "processes": sampler.peak_processes,
        "load_before": round(load_before[0], 2), "load_mean": round(sum(loads) / len(loads), 2),
        "load_max": round(max(loads), 2),
        "stages_s": {k: round(v, 2) for k, v in stages_s.items()},
        "stage_counts": {s: job["distributions"].get(f"{s}_us", {}).get("count", 0) for s in STAGES},
        "counters": job["counters"],
    }


def print_run_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'run':<22}{'images':>7}{'wall s':>8}{'img/s':>7}{'CPU s/img':>10}{'peak RSS MB':>12}{'procs':>6}{'load':>6}")
    for r in rows:
        print(f"{r['name']:<22}{r['images']:>7}{r['pipeline_s']:>8.1f}{r['images_per_s']:>7.2f}"
              f"{r['cpu_s_per_image']:>10.3f}{r['peak_rss_mb']:>12.0f}{r['processes']:>6}{r['load_mean']:>6.2f}")
    print("\nstage totals, seconds (sum of the delf/<stage>_us distributions over all workers)")
    print(f"{'run':<22}" + "".join(f"{s[:10]:>11}" for s in STAGES) + f"{'sum':>9}")
    for r in rows:
        total = sum(r["stages_s"].values())
        print(f"{r['name']:<22}" + "".join(f"{r['stages_s'][s]:>11.2f}" for s in STAGES) + f"{total:>9.1f}")


# ----------------------------------------------------------------------------- parts
def part_dev(quick: bool, workdir: str) -> dict:
    if not os.path.isdir(LANDMARKS_DEV):
        print(f"skipping dev: {LANDMARKS_DEV} not found")
        return {}
    settings = DEV_SETTINGS_QUICK if quick else DEV_SETTINGS
    corpus = LANDMARKS_DEV
    if quick:  # a few images per scene folder, through a listing
        from pipeline.extract import expand_inputs

        paths = expand_inputs([LANDMARKS_DEV])[::8]
        corpus = write_listing(paths, os.path.join(workdir, "dev.csv"))
    rows = []
    for mode, extra in (("in-memory", []), ("multi_processing x2", MULTI)):
        out = os.path.join(workdir, f"dev-{len(rows)}")
        rows.append(measure(f"dev {mode}", ["--input", corpus, "--output", out, "--no-progress"] + settings + extra, workdir))
        shutil.rmtree(out, ignore_errors=True)
    print_run_table(f"landmarks-dev, settings: {' '.join(settings)}", rows)
    return {"settings": settings, "runs": rows}


def part_scaling(sizes: list[int], seed: int, workdir: str, modes: list[str], save=lambda part: None) -> dict:
    """Build over the first n generated images for each n; ``save(part)`` after every run, so a
    run stopped at a deadline keeps the sizes it finished."""
    corpus = os.path.join(workdir, "synthetic")
    start = time.time()
    paths = write_synthetic_corpus(corpus, max(sizes), seed)
    generated = time.time() - start
    jpeg_kb = sum(os.path.getsize(p) for p in paths[:200]) / min(200, len(paths)) / 1024
    print(f"generated {len(paths)} images {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} (mean {jpeg_kb:.1f} KB) in {generated:.0f} s")
    rows = []
    part = {"settings": SCALING_SETTINGS, "image_size": list(SYNTHETIC_SIZE), "seed": seed,
            "generate_s": round(generated, 1), "mean_jpeg_kb": round(jpeg_kb, 1), "runs": rows}
    for n in sizes:
        listing = write_listing(paths[:n], os.path.join(workdir, f"synthetic-{n}.csv"))
        quantizer = os.path.join(workdir, f"quantizer-{n}")
        for mode in modes:
            if mode == "fixed" and not os.path.isdir(quantizer):
                raise SystemExit(f"the 'fixed' mode reuses {quantizer}, kept by an earlier mode's build of the same "
                                 f"size (in this --workdir): list one before it")
            out = os.path.join(workdir, f"scaling-{n}-{mode}")
            extra = {"multi": MULTI, "fixed": ["--quantizer", quantizer]}.get(mode, [])
            row = measure(f"{n} {mode}", ["--input", listing, "--output", out, "--no-progress"] + SCALING_SETTINGS + extra,
                          workdir)
            row["corpus_size"] = n
            rows.append(row)
            if mode != "fixed" and not os.path.isdir(quantizer):
                keep_quantizer(out, quantizer)
            shutil.rmtree(out, ignore_errors=True)
            print_run_table(f"scaling so far (synthetic {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]}, "
                            f"{' '.join(SCALING_SETTINGS)})", rows)
            sys.stdout.flush()
            save(part)
    return part


def keep_quantizer(index_root: str, folder: str) -> None:
    """Copy a built index's PCA + quantizer files to ``folder``, as ``--quantizer`` reads them."""
    from delf_retrieval.index import layout, versions

    pointer, _ = versions.current(index_root)
    os.makedirs(folder, exist_ok=True)
    for name in (layout.PCA_FILE, layout.QUANTIZER_FILE):
        shutil.copy(os.path.join(index_root, pointer["build"], name), os.path.join(folder, name))


def run_mode(run: dict) -> str:
    """inmemory, multi or fixed: the last word of a scaling run's name ("10000 fixed")."""
    return run["name"].split()[-1]


def extrapolate(runs: list[dict], sizes: list[int]) -> list[dict]:
    """EXTRAPOLATION, not measurement: least-squares lines a + b*n through the measured in-memory runs
    for CPU seconds, wall seconds and peak RSS, evaluated at the sizes that were not measured. (Per-image
    costs are flat in n; the fixed part is model load + training; RSS grows with n because the local
    runner holds every image's features in memory until the trained model reaches the encoder.)"""
    import numpy as np

    runs = [r for r in runs if run_mode(r) == "inmemory"]
    measured = {r["corpus_size"] for r in runs}
    n = np.array([r["corpus_size"] for r in runs], float)
    if len(set(n)) < 2:
        return []
    fits = {key: np.polyfit(n, [r[key] for r in runs], 1) for key in ("cpu_s", "pipeline_s", "peak_rss_mb")}
    rows = []
    for size in sizes:
        if size in measured:
            continue
        value = {key: float(np.polyval(fit, size)) for key, fit in fits.items()}
        rows.append({"corpus_size": size, "extrapolated": True, "cpu_s": round(value["cpu_s"]),
                     "cpu_s_per_image": round(value["cpu_s"] / size, 4), "pipeline_s": round(value["pipeline_s"]),
                     "images_per_s": round(size / value["pipeline_s"], 2), "peak_rss_mb": round(value["peak_rss_mb"]),
                     "fit": {key: [round(float(c), 6) for c in fit] for key, fit in fits.items()}})
    return rows


def merge_scaling(paths: list[str]) -> dict:
    """One scaling part from the runs of several earlier JSONs (same settings and corpus), by size."""
    part = None
    for path in paths:
        with open(path) as f:
            other = json.load(f)["scaling"]
        if part is None:
            part = {**other, "runs": list(other["runs"]), "sources": [path]}
            continue
        for key in ("settings", "image_size", "seed"):
            if other[key] != part[key]:
                raise SystemExit(f"{path}: its {key} {other[key]} differs from {part['sources'][0]}'s {part[key]}")
        part["runs"] += other["runs"]
        part["sources"].append(path)
    part.pop("extrapolated", None)
    part["runs"].sort(key=lambda r: (r["corpus_size"], r["name"]))
    return part


def print_scaling(part: dict) -> None:
    print(f"\nscaling curve, synthetic {part['image_size'][0]}x{part['image_size'][1]}, {' '.join(part['settings'])}")
    print(f"{'images':>8}{'':>18}{'wall s':>9}{'img/s':>8}{'CPU s':>8}{'CPU s/img':>10}{'peak RSS MB':>12}{'load':>6}")
    for r in part["runs"]:
        print(f"{r['corpus_size']:>8}{'measured ' + run_mode(r):>18}{r['pipeline_s']:>9.0f}{r['images_per_s']:>8.2f}{r['cpu_s']:>8.0f}"
              f"{r['cpu_s_per_image']:>10.3f}{r['peak_rss_mb']:>12.0f}{r['load_mean']:>6.1f}")
    for r in part.get("extrapolated", []):
        print(f"{r['corpus_size']:>8}{'EXTRAPOLATED':>18}{r['pipeline_s']:>9.0f}{r['images_per_s']:>8.2f}{r['cpu_s']:>8.0f}"
              f"{r['cpu_s_per_image']:>10.3f}{r['peak_rss_mb']:>12.0f}{'':>6}")


# ----------------------------------------------------------------------------- the 1M estimate
GPUS = {
    # The T4 is the cheapest GPU Dataflow offers on general-purpose n1 workers and has 16 GB (a 2048 px
    # ResNet50 level fits); the L4 (g2 workers) is the faster alternative. Peak FP32: the spec sheets.
    "nvidia-tesla-t4": {"peak_tflops_fp32": 8.1, "machine": "n1-standard-8", "vcpus": 8, "memory_gb": 30},
    "nvidia-l4": {"peak_tflops_fp32": 30.3, "machine": "g2-standard-8", "vcpus": 8, "memory_gb": 32},
}
# ASSUMED Dataflow batch list prices, us-central1, USD (not verified here: the pricing page renders
# its figures client-side; check https://cloud.google.com/dataflow/pricing before spending).
PRICES = {"vcpu_h": 0.056, "memory_gb_h": 0.003557, "pd_gb_h": 0.000054, "shuffle_gb": 0.011,
          "gpu_h": {"nvidia-tesla-t4": 0.35, "nvidia-l4": 0.71}}
# ASSUMED achieved fraction of FP32 peak (the extractor runs float32): dense 3x3/1x1 convolutions
# (ResNet50) reach ~40% with cuDNN at these sizes; EfficientNet's depthwise convolutions are memory
# bound, ~15%.
GPU_EFFICIENCY = {"resnet50": 0.40, "efficientnet_lite0": 0.15, "efficientnet_lite2": 0.15}
CHANNELS = {"resnet50": 1024, "efficientnet_lite0": 112, "efficientnet_lite2": 120}
ESTIMATE_IMAGE = (768, 1024)  # Google-Landmarks-like: long side 1024, 4:3
ESTIMATE = {"images": 1_000_000, "features": 1000, "workers": 25, "startup_h": 0.15, "disk_gb": 250,
            "train_h": 0.25, "sample_size": 1_000_000}  # startup: GPU workers pulling a ~6 GB CUDA container (assumed)


def pyramid_flops(backbone: str) -> dict:
    """FLOPs (2 x MACs, as TensorFlow's profiler counts them) of the network over the paper pyramid
    of one 1024x768 image, per level, on the padded bucket shapes the extractor actually runs."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.profiler import model_analyzer, option_builder

    from delf_retrieval.extraction.extractor import PAPER_SCALES, ExtractionConfig, pyramid
    from delf_retrieval.model import delf

    net = delf.load(delf.ModelConfig(backbone=backbone, weights="random", keypoint_score="l2norm"))
    config = ExtractionConfig(scales=PAPER_SCALES, max_features=1000, max_image_size=1024)
    levels = []
    for lv in pyramid(*ESTIMATE_IMAGE, config, net.stride):
        fn = tf.function(lambda x: net.keras_model(x, training=False))
        concrete = fn.get_concrete_function(tf.TensorSpec([1, *lv.bucket, 3], tf.float32))
        graph = convert_variables_to_constants_v2(concrete).graph
        options = option_builder.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        flops = model_analyzer.profile(graph, options=options).total_float_ops
        levels.append({"scale": round(lv.scale, 4), "input": [lv.height, lv.width], "bucket": list(lv.bucket),
                       "gflops": round(flops / 1e9, 2)})
    return {"backbone": backbone, "levels": levels, "gflops_per_image": round(sum(lv["gflops"] for lv in levels), 1)}


# The index-time stages after extraction (the first stage's files, the neighbour stage), CPU s/image:
# ASSUMED unless --scale-json gives benchmarks/scale.py's figures (wall s x 2 cores, an upper bound).
INDEX_STAGES = {"first_stage_cpu_s": 0.02, "neighbours_cpu_s": 0.4, "source": "assumed"}


def index_stages(scale_json: str | None) -> dict:
    """INDEX_STAGES, or the figures of a scale.py run (its JSON): build seconds of the first stage
    per image and the neighbour stage's seconds per image, each x 2 cores."""
    if not scale_json:
        return dict(INDEX_STAGES)
    with open(scale_json) as f:
        scale = json.load(f)
    cores = 2
    return {"first_stage_cpu_s": scale["build_seconds"]["first_stage"] / scale["images"] * cores,
            "neighbours_cpu_s": scale["neighbour_s_per_image"] * cores,
            "source": f"benchmarks/scale.py at {scale['images']:,} images (wall s x {cores} cores)"}


def estimate(flops: dict, cpu_s_per_image_other: float, gpu: str, e: dict = ESTIMATE,
             stages: dict = INDEX_STAGES) -> dict:
    """Time and cost of the build for ``e['images']`` images on ``e['workers']`` GPU workers.

    Per worker the GPU runs the network; its vCPUs do fetch, decode, resize, keypoint selection,
    encode and write at the measured CPU cost per image; the two overlap (several bundles per
    worker), so a worker's rate is set by the slower. Add the workers' start, and the training step
    (one worker trains while the others wait for its side input). Data moved: the raw features of
    the training sample (``index.training_images`` images, extracted first and held until the
    model is trained; every other image's features go straight to their codes) and the PQ rows
    grouped by shard, both priced as Dataflow Shuffle. Then the index-time stages on the same
    workers' vCPUs (their GPUs idle): the first stage's files (the rows regrouped by image part,
    shuffled again) and the neighbour stage (each image's rows shuffled to the worker that
    searches with them)."""
    from delf_retrieval.build.encode import training_images

    g = GPUS[gpu]
    backbone = flops["backbone"]
    gpu_s = flops["gflops_per_image"] * 1e9 / (g["peak_tflops_fp32"] * 1e12 * GPU_EFFICIENCY[backbone])
    cpu_s = cpu_s_per_image_other / g["vcpus"]
    per_worker = 1 / max(gpu_s, cpu_s)
    extract_h = e["images"] / (per_worker * e["workers"]) / 3600
    index_cpu_s = stages["first_stage_cpu_s"] + stages["neighbours_cpu_s"]
    index_h = e["images"] * index_cpu_s / (g["vcpus"] * e["workers"]) / 3600
    hours = e["startup_h"] + extract_h + e["train_h"] + index_h
    worker_h = hours * e["workers"]
    usd_h = (PRICES["gpu_h"][gpu] + g["vcpus"] * PRICES["vcpu_h"] + g["memory_gb"] * PRICES["memory_gb_h"]
             + e["disk_gb"] * PRICES["pd_gb_h"])
    held = min(e["images"], training_images(e["sample_size"], e["features"]))  # the training sample's images
    features_gb = held * e["features"] * (CHANNELS[backbone] * 4 + 16) / 1e9  # descriptors + location/scale/score
    rows_gb = e["images"] * e["features"] * 48 / 1e9  # cell, region, 10 code bytes, image id, location, scale, attention
    rows_gb *= 3  # to the shards; to the first stage's parts; to the neighbour stage
    # The index-time stages need no GPU: priced on CPU workers of the same shape (resource hints).
    usd_h_cpu = g["vcpus"] * PRICES["vcpu_h"] + g["memory_gb"] * PRICES["memory_gb_h"] + e["disk_gb"] * PRICES["pd_gb_h"]
    cost = ((hours - index_h) * usd_h + index_h * usd_h_cpu) * e["workers"] + (features_gb + rows_gb) * PRICES["shuffle_gb"]
    return {"backbone": backbone, "gpu": gpu, "machine": g["machine"], "workers": e["workers"],
            "gflops_per_image": flops["gflops_per_image"], "gpu_efficiency": GPU_EFFICIENCY[backbone],
            "gpu_s_per_image": round(gpu_s, 4), "cpu_s_per_image_other": round(cpu_s_per_image_other, 3),
            "bound": "gpu" if gpu_s >= cpu_s else "cpu", "images_per_s_per_worker": round(per_worker, 1),
            "extract_h": round(extract_h, 2), "index_stages_h": round(index_h, 2),
            "index_stages_cpu_s_per_image": round(index_cpu_s, 3), "hours": round(hours, 2),
            "worker_hours": round(worker_h, 1),
            "usd_per_worker_hour": round(usd_h, 3), "intermediate_gb": round(features_gb + rows_gb),
            "sample_features_gb": round(features_gb, 1), "rows_gb": round(rows_gb, 1),
            "usd": round(cost)}


def non_network_cpu(dev: dict) -> tuple[float, str]:
    """CPU seconds per image spent outside the network, from the in-memory dev run: its CPU s/image
    times the share of stage time outside extraction and model loading, then scaled to a 1024 px image
    (decoding and resizing grow with pixels; x (1024/side)^2)."""
    if not dev.get("runs"):
        return 0.1, "assumed (no dev run)"
    run = dev["runs"][0]
    stages = run["stages_s"]
    per_image = sum(v for k, v in stages.items() if k not in ("model_load", "extract", "train", "publish"))
    busy = sum(v for k, v in stages.items() if k != "model_load") or 1
    side = int(dev["settings"][dev["settings"].index("--max-image-size") + 1])
    scale = (1024 / side) ** 2
    value = run["cpu_s_per_image"] * per_image / busy * scale
    return value, f"measured in '{run['name']}' (share {per_image / busy:.2f} of stage time) x {scale:.2f} for 1024 px"


def part_estimate(dev: dict, quick: bool, flops_json: str | None = None, scale_json: str | None = None) -> dict:
    backbones = ["efficientnet_lite0"] if quick else ["efficientnet_lite0", "efficientnet_lite2", "resnet50"]
    known = {}
    if flops_json:  # reuse FLOPs computed by an earlier run (they depend only on the networks)
        with open(flops_json) as f:
            known = {f["backbone"]: f for f in json.load(f)["estimate"]["flops"]}
    flops = [known.get(b) or pyramid_flops(b) for b in backbones]
    for f in flops:
        print(f"\n{f['backbone']}: {f['gflops_per_image']} GFLOPs per 1024x768 image over 7 scales (padded buckets)")
        for lv in f["levels"]:
            print(f"  scale {lv['scale']:<7} input {lv['input'][0]:>4}x{lv['input'][1]:<5} bucket "
                  f"{lv['bucket'][0]:>4}x{lv['bucket'][1]:<5} {lv['gflops']:>8.2f} GFLOPs")
    other, source = non_network_cpu(dev)
    stages = index_stages(scale_json)
    rows = [estimate(f, other, gpu, stages=stages) for gpu in GPUS for f in flops]
    print(f"index-time stages: first stage {stages['first_stage_cpu_s']:.3f}, neighbours {stages['neighbours_cpu_s']:.3f} "
          f"CPU s/image ({stages['source']})")
    print(f"\n{ESTIMATE['images']:,} images x {ESTIMATE['features']} features, {ESTIMATE['workers']} workers; "
          f"GPU efficiency {GPU_EFFICIENCY} of FP32 peak (assumed); non-network CPU {other:.3f} s/image ({source});")
    print(f"startup {ESTIMATE['startup_h']} h and training {ESTIMATE['train_h']} h added (assumed); "
          f"ASSUMED prices: {PRICES}")
    print(f"{'backbone':<19}{'gpu / machine':<32}{'GFLOP':>7}{'GPU s/img':>10}{'bound':>6}{'img/s/wkr':>10}"
          f"{'hours':>7}{'wkr-h':>7}{'$/wkr-h':>8}{'shuffle GB':>11}{'USD':>7}")
    for r in rows:
        print(f"{r['backbone']:<19}{r['gpu'] + ' / ' + r['machine']:<32}{r['gflops_per_image']:>7.0f}"
              f"{r['gpu_s_per_image']:>10.4f}{r['bound']:>6}{r['images_per_s_per_worker']:>10.1f}{r['hours']:>7.1f}"
              f"{r['worker_hours']:>7.0f}{r['usd_per_worker_hour']:>8.2f}{r['intermediate_gb']:>11}{r['usd']:>7}")
    return {"flops": flops, "gpu_efficiency": GPU_EFFICIENCY, "prices_assumed": PRICES, "gpus": GPUS,
            "assumptions": ESTIMATE, "non_network_cpu_s_per_image": round(other, 4), "non_network_source": source,
            "index_stages": stages,
            "rows": rows}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        run_build(sys.argv[4:], sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small runs: 26 dev images, sizes 100,300, lite FLOPs only")
    parser.add_argument("--parts", default="dev,scaling,estimate")
    parser.add_argument("--sizes", help="synthetic corpus sizes (default 500,2000,5000,10000,50000; quick 100,300)")
    parser.add_argument("--scaling-modes", default="inmemory",
                        help="comma list of inmemory, multi (2 worker processes) and fixed (in-memory with --quantizer "
                             "from the previous mode's build of the same size: no training, encoding streams)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scaling-json", help="take the measured scaling runs from these earlier JSONs (comma list; "
                                               "their runs are merged, so sizes measured separately make one curve)")
    parser.add_argument("--dev-json", help="take the dev part's figures from this earlier JSON instead of running it")
    parser.add_argument("--flops-json", help="take the FLOPs from this earlier JSON instead of profiling the networks")
    parser.add_argument("--scale-json", help="benchmarks/scale.py's JSON at 1e6 images: the index-time stages' "
                                             "measured seconds per image (default: assumed)")
    parser.add_argument("--workdir", help="keep the generated corpus and outputs here (default: a temporary folder)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench_results", "pipeline_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("DELF_CACHE_DIR", "/tmp/delfcache")
    parts = args.parts.split(",")
    sizes = [int(s) for s in (args.sizes or ("100,300" if args.quick else "500,2000,5000,10000,50000")).split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="pipeline-throughput-")
    os.makedirs(workdir, exist_ok=True)
    results = {"quick": args.quick, "cores": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    def save():
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)

    try:
        if "dev" in parts:
            results["dev"] = part_dev(args.quick, workdir)
            save()
        if "scaling" in parts:
            results["scaling"] = part_scaling(sizes, args.seed, workdir, args.scaling_modes.split(","),
                                              save=lambda part: (results.update(scaling=part), save()))
            save()
        if args.scaling_json and "scaling" not in results:
            results["scaling"] = merge_scaling(args.scaling_json.split(","))
        if results.get("scaling", {}).get("runs"):
            results["scaling"]["extrapolated"] = extrapolate(results["scaling"]["runs"], sizes)
            print_scaling(results["scaling"])
            save()
        if args.dev_json and "dev" not in results:
            with open(args.dev_json) as f:
                results["dev"] = json.load(f)["dev"]
        if "estimate" in parts:
            results["estimate"] = part_estimate(results.get("dev", {}), args.quick, args.flops_json, args.scale_json)
            save()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
