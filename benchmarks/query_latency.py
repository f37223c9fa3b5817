"""Per-query latency split into extraction, ANN, voting, RANSAC and verified query expansion, at
database sizes of 1e3 to 1e5 images (1e6 extrapolated), on this machine; and the index-time
neighbour stage's cost per image (one search with an image's own stored rows) at each size.

    python benchmarks/query_latency.py [--quick] [--sizes 1000,10000,100000] [--per-image 1000]

The database: the real landmarks-dev images (their lite-preset features, cached by
retrieval_quality.py or extracted here), then synthetic images beyond them. A synthetic image is
``--per-image`` posting rows drawn from the real encoded rows at random (any image, any cell,
so it looks like an unrelated photograph to a query) with two of its ten PQ sub-codes re-drawn,
at random keypoint locations: the cell populations, code statistics and the neighbour lists a
query sees are those of real data. The index is held in memory, as ``IndexReader.load_all()``
serves it; the PCA and quantizer are trained on the real descriptors (their 205k rows give
205k/39 cells, fewer than the 8192 a 1e8-row index would get, so scans here are longer than
they would be).

Queries are real scene photographs. Extraction is timed apart (it does not depend on the
database). The first stage at scale is benchmarks/scale.py's.
1e6 images (1e9 rows, ~35 GB in memory here) does not fit this machine: its ANN time is
extrapolated from the measured cost per scanned code, and labelled so.

Each size is searched without expansion and with the defaults (``--expand 10 --expand-min-inliers
20`` over a neighbour table of ``NeighbourConfig().k`` = 40 edges per image: random neighbours with
10-60 inliers; the merge's cost depends on the table's size, not on which images the edges join). The neighbour stage is timed on real database images: their stored rows
(decoded PQ codes and keypoints) search the index with themselves left out, as the build does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
RESULTS = os.path.join(ROOT, "bench_results")

from delf_retrieval.index.neighbour_table import NeighbourConfig, NeighbourTable  # noqa: E402  (ROOT is on the path)


class MemoryIndex:
    """The parts of IndexReader a Retriever uses, over rows held in arrays (sorted by region)."""

    def __init__(self, quantizer, pca, lists, row_images, row_locations, image_ids):
        import pyarrow as pa

        from delf_retrieval.quantize.ivf import Searcher

        self.quantizer, self.pca, self.lists = quantizer, pca, lists
        self.row_images, self.row_locations = row_images, row_locations
        self.images = pa.table({"image_id": image_ids, "uri": [f"img{i}" for i in image_ids]})
        self.manifest = {"counts": {"images": len(image_ids)}}
        self.searcher = Searcher(quantizer, lists)
        self.directory = "memory"
        self._neighbours = None
        # Each row's image in list order; rows of a region are in image order, as in an index.
        self.list_images = row_images[lists.ids]
        self.num_rows = len(lists)

    def search(self, queries, k, nprobe=8, image_ids=None):
        probe, _ = self.quantizer.coarse.probe(np.ascontiguousarray(queries, np.float32), nprobe)
        if image_ids is None:
            return self.searcher.search_cells(queries, probe, k)
        # As IndexReader over a resident index: only the probed cells' rows of the candidates.
        from delf_retrieval.index.shard_reader import regions_of_cells
        from delf_retrieval.quantize.ivf import Searcher

        lists = self.lists.restrict_to_images(regions_of_cells(self.searcher.cell_regions, probe), self.list_images,
                                              image_ids)
        return Searcher(self.quantizer, lists).search_cells(queries, probe, k)

    def neighbours(self, per_image: int = NeighbourConfig().k, seed: int = 0):
        """A neighbour table of ``per_image`` random edges per image (see the module's note)."""
        if self._neighbours is None:
            ids = self.images.column("image_id").to_numpy()
            rng = np.random.default_rng(seed)
            self._neighbours = NeighbourTable(np.repeat(ids, per_image), rng.choice(ids, len(ids) * per_image),
                                              rng.integers(10, 60, len(ids) * per_image))
        return self._neighbours

    def rows(self, ids):
        from delf_retrieval.index.shard_reader import Rows

        ids = np.asarray(ids, np.int64)
        safe = np.maximum(ids, 0)
        images = np.where(ids >= 0, self.row_images[safe], -1)
        zeros = np.zeros(ids.shape, np.float32)
        return Rows(images, self.row_locations[safe], zeros, zeros)

    def postings(self):
        step = 2_000_000
        for start in range(0, self.num_rows, step):
            rows = np.arange(start, min(start + step, self.num_rows))
            regions = np.searchsorted(self.lists.offsets, rows, side="right") - 1
            yield self.row_images[self.lists.ids[rows]], self.quantizer.decode(regions, self.lists.codes[rows])

    @property
    def num_row_groups(self):
        return -(-self.num_rows // 2_000_000)


def real_features(quick: bool):
    """Lite-preset features of the dev set (cached by retrieval_quality.py), and the query subset."""
    import retrieval_quality as rq

    rows = rq.dataset(rq.LANDMARKS_DEV, quick)
    features, extract_seconds = rq.extract_all(rq.LANDMARKS_DEV, rows, "lite", os.path.join(RESULTS, "cache"))
    queries = [p for p, s in rows if s][:: 8 if not quick else 4]
    return features, queries, extract_seconds


def database(size, per_image, real_encoded, real_images, quantizer, seed=0):
    """Rows of ``size`` images: the real ones, then synthetic ones; sorted by region."""
    from delf_retrieval.quantize.ivf import InvertedLists

    regions, codes, images, locations = [real_encoded["regions"]], [real_encoded["codes"]], [real_images], \
        [real_encoded["locations"]]
    n_real = int(real_images.max()) + 1
    rng = np.random.default_rng(seed)
    synthetic = max(0, size - n_real)
    chunk = max(1, 2_000_000 // per_image)
    k = 2 ** quantizer.params.pq_bits
    for start in range(0, synthetic, chunk):
        n = min(chunk, synthetic - start) * per_image
        pick = rng.integers(0, len(real_encoded["regions"]), n)
        c = real_encoded["codes"][pick].copy()
        for _ in range(2):
            c[np.arange(n), rng.integers(0, c.shape[1], n)] = rng.integers(0, k, n, dtype=np.uint8)
        regions.append(real_encoded["regions"][pick])
        codes.append(c)
        images.append(n_real + start + np.arange(n) // per_image)
        locations.append(rng.uniform(0, 1000, (n, 2)).astype(np.float32))
    regions, codes = np.concatenate(regions), np.concatenate(codes)
    images, locations = np.concatenate(images).astype(np.int64), np.concatenate(locations)
    order = np.argsort(regions, kind="stable")
    offsets = np.searchsorted(regions[order], np.arange(quantizer.regions.n_regions + 1)).astype(np.int64)
    del regions
    lists = InvertedLists(offsets, np.ascontiguousarray(codes[order]), order.astype(np.int64))
    return lists, images, locations, n_real + synthetic


def neighbour_estimate(report: dict, ann_1e6: float, images: int = 1_000_000) -> dict:
    """The build's neighbour stage for ``images`` images: one search per image, whose ANN part grows
    with the rows scanned (extrapolated as for queries) and whose voting and RANSAC part does not
    (measured at the largest size); one search per vCPU at a time, on n1-standard-8 CPU workers at
    the ASSUMED prices of pipeline_throughput.py."""
    from pipeline_throughput import PRICES

    largest = max(report["neighbour_stage"], key=lambda e: e["images"])
    full = [e for e in report["sizes"] if e["image_shortlist"] == "none" and not e["expand"]]
    at_largest = next(e for e in full if e["images"] == largest["images"])
    per_image = largest["seconds_per_image"] - at_largest["seconds"]["ann"] + ann_1e6
    vcpu_h = images * per_image / 3600
    worker_usd_h = 8 * PRICES["vcpu_h"] + 30 * PRICES["memory_gb_h"]
    return {"images": images, "seconds_per_image": per_image, "measured_at_images": largest["images"],
            "vcpu_hours": vcpu_h, "worker_hours": vcpu_h / 8, "usd": vcpu_h / 8 * worker_usd_h,
            "assumes": "n1-standard-8 CPU workers, 8 searches at a time each, ASSUMED list prices"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--per-image", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="sizes 1000,10000 and fewer queries")
    parser.add_argument("--no-shortlist", action="store_true", help="(kept for old command lines: no effect)")
    parser.add_argument("--json", default=os.path.join(RESULTS, "query_latency.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import retrieval_quality as rq

    if not os.path.isdir(rq.LANDMARKS_DEV):
        print(f"no dev set at {rq.LANDMARKS_DEV}: nothing to measure")
        return 0
    from delf_retrieval import quantize
    from delf_retrieval.build import encode
    from delf_retrieval.query import retrieval

    sizes = [1000, 10000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    features, queries, extract_seconds = real_features(args.quick)
    uris = list(features)
    raw = np.concatenate([features[u].descriptors for u in uris])
    projection, quantizer = encode.train(raw, quantize.IndexParams(), expected_count=len(raw))
    encoded = quantizer.encode(projection.transform(raw))
    real = {"regions": encoded.regions, "codes": encoded.codes,
            "locations": np.concatenate([features[u].locations for u in uris]).astype(np.float32)}
    real_images = np.repeat(np.arange(len(uris)), [len(features[u]) for u in uris])
    config = retrieval.RetrievalConfig(expand=0)
    report = {"config": config.__dict__, "per_image": args.per_image, "extract_seconds": extract_seconds,
              "index": quantizer.params.spec, "sizes": []}
    print(f"queries: {len(queries)} real photographs; extraction {extract_seconds:.2f} s/query (lite, 7 scales, 1024 px)")
    print(f"{'images':>8} {'rows':>11} {'shortlist':>9} {'expand':>6} {'ann':>7} {'voting':>7} {'ransac':>7} "
          f"{'expand':>7} {'search':>7} {'codes/q':>10} {'peak MB':>8}")
    expanded = retrieval.RetrievalConfig()  # the defaults: expansion on
    first_rows = np.r_[0, np.cumsum([len(features[u]) for u in uris])]
    for size in sizes:
        lists, images, locations, n_images = database(size, args.per_image, real, real_images, quantizer)
        memory = MemoryIndex(quantizer, projection, lists, images, locations, np.arange(n_images))
        variants = [("none", None, config), ("none", None, expanded)]
        for name, image_shortlist, variant in variants:
            retriever = retrieval.Retriever(memory, variant)
            retriever.search(features[queries[0]])  # compile the kernel outside the timing
            stages = {"shortlist": [], "ann": [], "voting": [], "ransac": [], "expansion": []}
            scanned = []
            for q in queries:
                result = retriever.search(features[q])
                for stage in stages:
                    stages[stage].append(result.timings.get(stage, 0.0))
                probe, _ = quantizer.coarse.probe(projection.transform(features[q].descriptors), config.nprobe)
                cells = probe[probe >= 0]
                cell_regions = memory.searcher.cell_regions
                scanned.append(int(np.sum(lists.offsets[cell_regions[cells + 1]] - lists.offsets[cell_regions[cells]])))
            mean = {k: float(np.mean(v)) for k, v in stages.items()}
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            entry = {"images": n_images, "rows": len(lists), "image_shortlist": name, "expand": variant.expand,
                     "seconds": mean, "search_seconds": sum(mean.values()),
                     "codes_scanned_per_query": float(np.mean(scanned)), "peak_rss_mb": peak}
            report["sizes"].append(entry)
            print(f"{n_images:>8} {len(lists):>11} {name[:9]:>9} {variant.expand:>6} {mean['ann']:7.3f} "
                  f"{mean['voting']:7.3f} {mean['ransac']:7.3f} {mean['expansion']:7.3f} {entry['search_seconds']:7.3f} "
                  f"{entry['codes_scanned_per_query']:10.0f} {peak:8.0f}")
        # The build's neighbour stage: real database images search with their own stored rows.
        from delf_retrieval.index import neighbour_table
        from delf_retrieval.query import expansion

        retriever = retrieval.Retriever(memory, config)
        neighbour_config = neighbour_table.NeighbourConfig()
        timed = []
        for i in range(0, len(uris), max(1, len(uris) // 10))[:10]:
            rows = slice(first_rows[i], first_rows[i + 1])
            projected = quantizer.decode(real["regions"][rows], real["codes"][rows])
            start = time.perf_counter()
            expansion.search_neighbours(retriever, i, projected, real["locations"][rows], neighbour_config)
            timed.append(time.perf_counter() - start)
        report.setdefault("neighbour_stage", []).append({"images": n_images,
                                                         "seconds_per_image": float(np.mean(timed))})
        print(f"{n_images:>8} neighbour stage: {np.mean(timed):.3f} s per image (one search with its stored rows)")
        del memory, lists, images, locations
    full = [e for e in report["sizes"] if e["image_shortlist"] == "none"]
    largest = full[-1]
    ns_per_code = largest["seconds"]["ann"] / max(largest["codes_scanned_per_query"], 1) * 1e9
    ann_1e6 = ns_per_code * largest["codes_scanned_per_query"] * (1_000_000 / largest["images"]) / 1e9
    report["extrapolated_1e6"] = {"ann_seconds": ann_1e6, "ns_per_scanned_code": ns_per_code,
                                  "assumes": "same cells (scan grows with rows), same per-code cost"}
    print(f"1e6 images (extrapolated, same cells): ANN ~{ann_1e6:.1f} s/query at {ns_per_code:.1f} ns per scanned code")
    report["neighbour_stage_1e6"] = neighbour_estimate(report, ann_1e6)
    n = report["neighbour_stage_1e6"]
    print(f"neighbour stage for 1e6 images on Dataflow (extrapolated): {n['seconds_per_image']:.2f} s per image, "
          f"{n['vcpu_hours']:.0f} vCPU-hours = {n['worker_hours']:.0f} n1-standard-8 worker-hours, "
          f"~${n['usd']:.0f} at ASSUMED list prices")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
