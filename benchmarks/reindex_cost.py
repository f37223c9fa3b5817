"""Cost of a nightly re-index: on real photographs against a full rebuild, and on a synthetic large
index (bytes read and written against the index size, publish time, search latency with 1 and 10
segments, and a merge).

    python benchmarks/reindex_cost.py [--quick] [--parts real,synthetic] [--corpus DIR] [--new-fraction 0.01]
                                      [--images 50000] [--per-image 300]

**real**: ../shared/data/landmarks-dev/images when present, else the bundled samples/ (linked, not
copied, into a scratch folder). Runs, each timed end to end in this process (python -m
pipeline.reindex's ``run``): an initial full build of all but ``--new-fraction`` of the images;
a nightly run after the rest arrive (only they are extracted); a nightly run with no change (the
fixed cost: listing, stat, the plan, the manifest); and a full rebuild (``--retrain``).

**synthetic**: a real full build of ``--seed-images`` generated pictures (256 px, features ranked
by descriptor norm, the extraction above) gives the model (PCA, quantizer, network and extraction
settings, which every nightly run then uses); then a version of ``--images`` images is written as one segment
whose postings are drawn as benchmarks/query_latency.py draws them (each row a real encoded row
picked at random, two of its PQ sub-codes re-drawn, at a random keypoint), each image a hard link
in the corpus folder with its stamp recorded, so no extraction is needed for the unchanged part.
Nightly runs through ``pipeline.reindex`` then change 0%, 1% and 10% of the images (a third new,
a third changed: replaced by another generated picture, a third deleted); seven more 1% nights
leave ten segments; ``--merge`` merges them into one. Each run reports its seconds, the bytes it
read from and wrote to the index root (counted in ``delf_retrieval.storage``, the only way the
pipeline reaches the index) against the index size, the seconds of publishing (verification and
the pointer), and the search latency afterwards (the version opened and held in memory, as the
engine serves it, then 30 queries of 200 noisy stored descriptors of live images, whole query:
ANN, voting and RANSAC). The runs' drift ratios are reported but never retrain (a retrain is a full
rebuild, not a nightly run). Writes bench_results/reindex_cost.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

LANDMARKS_DEV = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "landmarks-dev", "images")
SAMPLES = os.path.join(REPO_ROOT, "samples")
EXTRACTION = ["--scales", "0.5,1.0", "--max-features", "300", "--max-image-size", "640", "--no-progress"]
PICTURE = 256  # pixels of a generated picture: 16 x 16 + 8 x 8 feature locations at the two scales


def images_of(folder: str) -> list[str]:
    from delf_retrieval.corpus.images import IMAGE_EXTENSIONS

    return sorted(os.path.relpath(os.path.join(root, n), folder) for root, _, names in os.walk(folder)
                  for n in names if n.lower().endswith(IMAGE_EXTENSIONS))


def link(source: str, target: str, names: list[str]) -> None:
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
        os.symlink(os.path.join(source, name), os.path.join(target, name))


def last_report(root: str) -> dict:
    from delf_retrieval import storage
    from delf_retrieval.index import layout, versions

    build = layout.read_manifest(root)["build"].split("/")[-1]
    return json.loads(storage.read_bytes(storage.join(root, versions.REPORTS_DIR, f"{build}.json")))


def timed_run(corpus: str, root: str, extra: list[str]) -> dict:
    from pipeline import reindex

    start = time.time()
    assert reindex.run(["--input", corpus, "--index", root, "--cells", "64"] + EXTRACTION + extra) == 0
    seconds = time.time() - start
    report = last_report(root)
    return {**{k: report[k] for k in ("mode", "listed", "added", "changed", "deleted", "unchanged", "reused",
                                      "re_extracted", "descriptors")}, "seconds": round(seconds, 1),
            "drift_ratio": report["drift"]["ratio"]}


def real_part(args) -> dict:
    source = args.corpus or (LANDMARKS_DEV if os.path.isdir(LANDMARKS_DEV) else SAMPLES)
    names = images_of(source)
    limit = args.max_images or (40 if args.quick else None)
    if limit:
        step = max(len(names) // limit, 1)
        names = names[::step][:limit]
    n_new = max(1, round(len(names) * args.new_fraction))
    new = names[len(names) // 2::max(len(names) // n_new, 1)][:n_new]  # spread over the corpus, not one scene
    base = [n for n in names if n not in set(new)]

    scratch = tempfile.mkdtemp(prefix="reindex-cost-")
    try:
        corpus, root = os.path.join(scratch, "corpus"), os.path.join(scratch, "index")
        link(source, corpus, base)
        runs = {"initial full build": timed_run(corpus, root, [])}
        link(source, corpus, new)
        runs[f"nightly, {len(new)} new ({100 * len(new) / len(names):.1f}%)"] = timed_run(corpus, root, [])
        runs["nightly, no change"] = timed_run(corpus, root, [])
        runs["full rebuild (--retrain)"] = timed_run(corpus, root, ["--retrain"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    nightly = runs[next(k for k in runs if k.startswith("nightly, ") and "new" in k)]
    full = runs["full rebuild (--retrain)"]
    print(f"real corpus: {source} ({len(names)} images), extraction {' '.join(EXTRACTION[:-1])}")
    print(f"{'run':<28} {'mode':<11} {'images':>6} {'extracted':>9} {'reused':>6} {'descriptors':>11} {'seconds':>8}")
    for name, r in runs.items():
        print(f"{name:<28} {r['mode']:<11} {r['listed']:>6} {r['re_extracted']:>9} {r['reused']:>6} "
              f"{r['descriptors']:>11} {r['seconds']:>8.1f}")
    ratio = nightly["seconds"] / full["seconds"]
    print(f"nightly / full rebuild: {ratio:.2f} of the time ({full['seconds'] / nightly['seconds']:.1f}x faster)\n")
    return {"corpus": source, "images": len(names), "new": len(new), "extraction": EXTRACTION, "runs": runs,
            "nightly_over_full": round(ratio, 3)}


# ---------------------------------------------------------------------------------------------
# The synthetic large index


class IndexTraffic:
    """Bytes the process reads from and writes to paths under ``root`` through ``delf_retrieval.storage``
    (every read and write of an index goes through it), and the seconds spent publishing."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.read = self.written = 0
        self.publish_seconds = 0.0

    def _ours(self, path) -> bool:
        return os.path.abspath(str(path)).startswith(self.root + os.sep)

    @contextlib.contextmanager
    def counting(self):
        from delf_retrieval import storage
        from delf_retrieval.index import versions

        originals = {name: getattr(storage, name) for name in ("read_bytes", "write_bytes", "upload",
                                                               "read_with_token", "write_bytes_if")}
        publish = versions.publish

        def read_bytes(path, *a, **kw):
            data = originals["read_bytes"](path, *a, **kw)
            self.read += len(data) if self._ours(path) else 0
            return data

        def read_with_token(path):
            data, token = originals["read_with_token"](path)
            self.read += len(data or b"") if self._ours(path) else 0
            return data, token

        def write_bytes(path, data):
            self.written += len(data) if self._ours(path) else 0
            return originals["write_bytes"](path, data)

        def write_bytes_if(path, data, token):
            self.written += len(data) if self._ours(path) else 0
            return originals["write_bytes_if"](path, data, token)

        def upload(local, path):
            self.written += os.path.getsize(local) if self._ours(path) else 0
            return originals["upload"](local, path)

        def timed_publish(*a, **kw):
            start = time.perf_counter()
            try:
                return publish(*a, **kw)
            finally:
                self.publish_seconds += time.perf_counter() - start

        replaced = {"read_bytes": read_bytes, "write_bytes": write_bytes, "upload": upload,
                    "read_with_token": read_with_token, "write_bytes_if": write_bytes_if}
        for name, fn in replaced.items():
            setattr(storage, name, fn)
        versions.publish = timed_publish
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(storage, name, fn)
            versions.publish = publish


def picture(rng, size: int = PICTURE) -> np.ndarray:
    """A generated photograph: smooth colour noise with a few hard-edged shapes (corners for keypoints)."""
    from PIL import Image, ImageDraw

    low = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    image = Image.fromarray(low).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(8, size // 3, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([int(x), int(y), int(x + w), int(y + h)], fill=colour)
    return np.asarray(image)


def write_picture(path: str, rng) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.remove(path)  # a hard link: replace it, never write through it
    Image.fromarray(picture(rng)).save(path, format="PNG")


def index_bytes(root: str, manifest: dict) -> int:
    """The bytes of one version: its own files and every segment it lists."""
    from delf_retrieval.index import segments

    return sum(f["bytes"] for f in list(manifest["files"].values()) + list(manifest["codebooks"].values())) + sum(
        r.size_bytes + r.bytes for r in segments.segment_refs(manifest))


def synthetic_base(root: str, corpus: str, seed_root: str, n_images: int, per_image: int, rng) -> None:
    """Publish at ``root`` a version of one segment of ``n_images`` synthetic images (hard links in
    ``corpus``), with the model of the index at ``seed_root``."""
    import pyarrow.parquet as pq

    from delf_retrieval import storage
    from delf_retrieval.corpus import inputs
    from delf_retrieval.index import layout, segments, shards, versions

    seed = layout.read_manifest(seed_root)
    params = seed["params"]
    tables = [pq.read_table(os.path.join(seed_root, s["path"])) for s in segments.posting_shards(seed_root, seed)]
    real = shards.PostingRows.concatenate([shards.posting_rows(t, params["pq_m"], params["pq_bits"]) for t in tables],
                                          params["pq_m"])
    n = n_images * per_image
    pick = rng.integers(0, len(real), n)
    codes = real.encoded.codes[pick].copy()
    for _ in range(2):
        codes[np.arange(n), rng.integers(0, codes.shape[1], n)] = rng.integers(0, 2 ** params["pq_bits"], n,
                                                                                  dtype=np.uint8)
    original = os.path.join(corpus, "original.png")
    write_picture(original, rng)
    paths = [os.path.join(corpus, "img", f"{i // 1000:03d}", f"{i:06d}.png") for i in range(n_images)]
    for folder in sorted({os.path.dirname(p) for p in paths}):
        os.makedirs(folder, exist_ok=True)
    for path in paths:
        os.link(original, path)
    os.remove(original)
    ids = np.asarray([inputs.image_id(p) for p in paths], np.int64)
    from delf_retrieval.quantize import Encoded

    rows = shards.PostingRows(Encoded(real.encoded.cells[pick], real.encoded.regions[pick], codes),
                              np.repeat(ids, per_image), rng.uniform(0, PICTURE, (n, 2)).astype(np.float32),
                              np.ones(n, np.float32), np.ones(n, np.float32))
    stamp = storage.stamp(paths[0])  # hard links share one inode: one size and modification time
    images = shards.image_table([{"image_id": int(i), "uri": p, "width": PICTURE, "height": PICTURE,
                                  "num_features": per_image, "content_hash": f"synthetic-{i}", "stamp": stamp}
                                 for i, p in zip(ids, paths)])
    build_id = "20000101T000000Z-synthetc"
    build = f"{layout.BUILDS_DIR}/{build_id}"
    config = seed["settings"]["build"]
    ref = segments.write_segment(root, rows, images, params["pq_bits"], segment_id=build_id,
                                 rows_per_shard=config["rows_per_shard"])
    del rows, codes, pick
    folder = storage.join(root, build)
    model = {name: storage.read_bytes(layout.resolve(seed_root, seed["codebooks"][name]["path"]))
             for name in ("pca", "quantizer")}
    codebooks = segments.write_codebooks(root, build_id, model["quantizer"], model["pca"])
    files = {"dead_letters": layout.write_table_file(folder, layout.DEAD_LETTERS_FILE, shards.dead_letter_table([]))}
    from delf_retrieval.quantize import Quantizer

    manifest = segments.segmented_manifest(folder, layout.new_index_id(), Quantizer.load(model["quantizer"]), files,
                                           [ref], version_folder=build, model=seed["model"],
                                           extra={k: seed[k] for k in ("settings", "training")},
                                           live_descriptors=ref.descriptors, codebooks=codebooks)
    manifest["counts"]["inputs"] = n_images
    versions.publish(root, build, manifest, None)


def search_latency(root: str, rng, n_queries: int, per_query: int = 200) -> dict:
    """Open the current version, hold it in memory, and time ``n_queries`` whole queries (noisy
    copies of stored descriptors of random live images); ms per query, second of two passes."""
    from delf_retrieval.index import segment_reader
    from delf_retrieval.query.retrieval import RetrievalConfig, Retriever

    start = time.perf_counter()
    reader = segment_reader.open_reader(root)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    if reader.resident_bytes() <= 8 << 30:
        reader.load_all()
    loaded = time.perf_counter() - start
    # Query images: random live ones; their stored rows are spread over every cell, so one pass.
    chosen = rng.choice(reader.images.column("image_id").to_numpy(), n_queries, replace=False)
    found: dict = {}
    for image_ids, decoded in reader.postings():
        keep = np.isin(image_ids, chosen)
        for image in np.unique(image_ids[keep]):
            found.setdefault(int(image), []).append(decoded[image_ids == image])
    queries = []
    for image in chosen:
        rows = np.concatenate(found[int(image)])[:per_query]
        queries.append((rows + rng.normal(0, 0.05, rows.shape).astype(np.float32),
                        rng.uniform(0, PICTURE, (len(rows), 2)).astype(np.float32)))
    retriever = Retriever(reader, RetrievalConfig(top=20))
    for _ in range(2):
        start = time.perf_counter()
        for projected, locations in queries:
            retriever.search_projected(projected, locations)
        seconds = time.perf_counter() - start
    return {"open_s": round(opened, 2), "load_s": round(loaded, 2), "query_ms": round(1000 * seconds / len(queries), 1),
            "queries": len(queries), "descriptors_per_query": round(float(np.mean([len(q[0]) for q in queries])), 1)}


def nightly(corpus: str, root: str, extra: list[str], rng, n_queries: int) -> dict:
    """One ``pipeline.reindex`` run over ``corpus`` (no --input: a merge alone), measured."""
    from delf_retrieval.index import layout
    from pipeline import reindex

    before = layout.read_manifest(root)
    size_before = index_bytes(root, before)
    traffic = IndexTraffic(root)
    # Drift is measured and reported, never acted on: a retrain is a full rebuild, not a nightly run.
    argv = (["--input", corpus] if corpus else []) + ["--index", root, "--keep", "1", "--no-progress",
                                                      "--drift-threshold", "1000"] + extra
    with traffic.counting():
        start = time.perf_counter()
        assert reindex.run(argv) == 0
        seconds = time.perf_counter() - start
    after = layout.read_manifest(root)
    report = last_report(root)
    return {"seconds": round(seconds, 1), "publish_s": round(traffic.publish_seconds, 2),
            "index_bytes_before": size_before, "index_bytes": index_bytes(root, after),
            "read_bytes": traffic.read, "written_bytes": traffic.written,
            "read_fraction": round(traffic.read / size_before, 4), "written_fraction": round(traffic.written / size_before, 4),
            "segments": after["counts"]["segments"], "tombstones": after["counts"]["tombstones"],
            "images": after["counts"]["images"], "descriptors": after["counts"]["descriptors"],
            **{k: report[k] for k in ("mode", "added", "changed", "deleted", "re_extracted", "merged")},
            "drift_ratio": report["drift"]["ratio"],
            "search": search_latency(root, rng, n_queries)}


def change(corpus: str, fraction: float, candidates: list[int], rng) -> list[int]:
    """New, changed and deleted pictures, a third of ``fraction`` of the images each; returns the
    synthetic images still untouched."""
    n = int(round(fraction * len(candidates) / 3)) if fraction else 0
    if not n:
        return candidates
    chosen = rng.choice(len(candidates), 2 * n, replace=False)
    changed, deleted = [candidates[i] for i in chosen[:n]], [candidates[i] for i in chosen[n:]]
    for i in changed:
        write_picture(os.path.join(corpus, "img", f"{i // 1000:03d}", f"{i:06d}.png"), rng)
    for i in deleted:
        os.remove(os.path.join(corpus, "img", f"{i // 1000:03d}", f"{i:06d}.png"))
    tag = time.time_ns()
    for j in range(n):
        write_picture(os.path.join(corpus, "new", f"{tag}", f"{j:06d}.png"), rng)
    gone = set(changed) | set(deleted)
    return [i for i in candidates if i not in gone]


def synthetic_part(args) -> dict:
    from pipeline import run as run_job

    rng = np.random.default_rng(0)
    n_images = 5000 if args.quick else args.images
    per_image = 100 if args.quick else args.per_image
    n_queries = 10 if args.quick else 30
    scratch = tempfile.mkdtemp(prefix="reindex-synthetic-")
    try:
        seed_corpus, seed_root = os.path.join(scratch, "seed"), os.path.join(scratch, "seed-index")
        for i in range(args.seed_images):
            write_picture(os.path.join(seed_corpus, f"{i:04d}.png"), rng)
        start = time.perf_counter()
        # Ranked by descriptor norm: the shipped attention head keeps few features of generated pictures.
        assert run_job.run(["--input", seed_corpus, "--output", seed_root, "--keypoint-score", "l2norm"]
                           + EXTRACTION) == 0
        seed_seconds = time.perf_counter() - start
        corpus, root = os.path.join(scratch, "corpus"), os.path.join(scratch, "index")
        start = time.perf_counter()
        synthetic_base(root, corpus, seed_root, n_images, per_image, rng)
        base_seconds = time.perf_counter() - start
        print(f"synthetic index: {n_images} images x {per_image} rows, model of {args.seed_images} generated "
              f"pictures ({seed_seconds:.0f} s), written in {base_seconds:.0f} s")
        untouched = list(range(n_images))
        runs = {}
        for label, fraction in (("0%", 0.0), ("1%", 0.01), ("10%", 0.10)):
            untouched = change(corpus, fraction, untouched, rng)
            runs[f"nightly, {label} changed"] = nightly(corpus, root, [], rng, n_queries)
            print_run(f"nightly, {label} changed", runs[f"nightly, {label} changed"])
        for night in range(7):
            untouched = change(corpus, 0.01, untouched, rng)
            name = f"nightly, 1% changed ({night + 4})"
            runs[name] = nightly(corpus, root, [], rng, n_queries)
            print_run(name, runs[name])
        runs["merge (--merge)"] = nightly(None, root, ["--merge"], rng, n_queries)
        print_run("merge (--merge)", runs["merge (--merge)"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"images": n_images, "per_image": per_image, "seed_images": args.seed_images, "queries": n_queries,
            "runs": runs}


def print_run(name: str, r: dict) -> None:
    if not getattr(print_run, "header", False):
        print(f"{'run':<28} {'segs':>4} {'extracted':>9} {'seconds':>7} {'publish s':>9} {'index MB':>8} "
              f"{'read MB':>8} {'read %':>6} {'written MB':>10} {'written %':>9} {'query ms':>8} {'drift':>5}")
        print_run.header = True
    mb = 1 / 1e6
    print(f"{name:<28} {r['segments']:>4} {r['re_extracted']:>9} {r['seconds']:>7.1f} {r['publish_s']:>9.2f} "
          f"{r['index_bytes_before'] * mb:>8.1f} {r['read_bytes'] * mb:>8.1f} {100 * r['read_fraction']:>6.2f} "
          f"{r['written_bytes'] * mb:>10.2f} {100 * r['written_fraction']:>9.2f} {r['search']['query_ms']:>8.1f} "
          f"{'-' if r['drift_ratio'] is None else format(r['drift_ratio'], '.2f'):>5}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="real: at most 40 images; synthetic: 5,000 x 100 rows")
    parser.add_argument("--parts", default="real,synthetic")
    parser.add_argument("--corpus", help="real: image folder (default: landmarks-dev if present, else samples/)")
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument("--max-images", type=int)
    parser.add_argument("--images", type=int, default=50_000, help="synthetic: images in the index")
    parser.add_argument("--per-image", type=int, default=300, help="synthetic: posting rows per image")
    parser.add_argument("--seed-images", type=int, default=300, help="synthetic: generated pictures the model is built on")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "bench_results", "reindex_cost.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parts = set(args.parts.split(","))
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    out = {"quick": args.quick, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
           "machine": platform.platform()}
    if "real" in parts:
        out["real"] = real_part(args)
    if "synthetic" in parts:
        out["synthetic"] = synthetic_part(args)
    out["load_after"] = os.getloadavg()[0]
    print(f"load after: {out['load_after']:.1f}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
