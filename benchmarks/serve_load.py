"""The query service under load: ``python -m pipeline.serve`` on the sample corpus's index and on a
larger synthetic index (query_latency.py's database, written as a real index), with 1, 4 and 16
concurrent clients on loopback for a fixed time each.

    python benchmarks/serve_load.py [--quick] [--duration 12] [--clients 1,4,16] [--synthetic-images 10000]

Per phase (the phases run twice): requests/s; p50/p95/p99 of the latency a client sees, and of
the server's extraction and search (its answer's timings); errors (anything but 200 and 503: none
is allowed below the queue limit) and the share of clean 503s (a full queue, Retry-After
honoured); the server's RSS (current and peak, from /proc) after each phase: the second pass must
not need more than the first. Also the first answer after the server's start against
``pipeline.search``'s whole process for one query, and a switch to a new version under load:
``pipeline.reindex`` publishes while 4 clients query, and no request may fail.

The server runs with its defaults (2 workers, a queue of 8: 16 clients exceed it). Clients are
threads of this process, each with its own connection, sending sample photographs (landmarks-dev
photographs to the synthetic index) as uploads; everything stays on 127.0.0.1. The synthetic
index needs ../shared/data/landmarks-dev and its lite features (cached by retrieval_quality.py);
without them only the sample index is measured. Needs httpx2 (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
RESULTS = os.path.join(ROOT, "bench_results")
WORK = os.path.join(RESULTS, "serve")
SAMPLES = os.path.join(ROOT, "samples")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs)


def sample_photos() -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(SAMPLES) for f in files if f.endswith(".jpg"))


def sample_index() -> str:
    """The README's first command (pipeline.run over samples/, default settings), built once."""
    root = os.path.join(WORK, "sample-index")
    if not os.path.exists(os.path.join(root, "manifest.json")):
        shutil.rmtree(root, ignore_errors=True)
        result = run(["-m", "pipeline.run", "--output", root, "--no-progress"])
        assert result.returncode == 0, result.stderr[-2000:]
    return root


def synthetic_index(images: int, per_image: int) -> tuple[str, list[str]] | None:
    """query_latency.py's database of ``images`` images (the real landmarks-dev ones, then synthetic
    ones), written as a published version; and its real query photographs. None without the dev set."""
    import query_latency as ql
    import retrieval_quality as rq

    if not os.path.isdir(rq.LANDMARKS_DEV):
        return None
    root = os.path.join(WORK, f"synthetic-{images}x{per_image}")
    features, queries, _ = ql.real_features(quick=False)
    queries = [os.path.join(rq.LANDMARKS_DEV, q) for q in queries]
    if os.path.exists(os.path.join(root, "manifest.json")):
        return root, queries
    from delf_retrieval import quantize
    from delf_retrieval.build import encode
    from delf_retrieval.index import layout, shards, versions
    from delf_retrieval.quantize import Encoded

    shutil.rmtree(root, ignore_errors=True)
    uris = list(features)
    raw = np.concatenate([features[u].descriptors for u in uris])
    projection, quantizer = encode.train(raw, quantize.IndexParams(), expected_count=len(raw))
    encoded = quantizer.encode(projection.transform(raw))
    real = {"regions": encoded.regions, "codes": encoded.codes,
            "locations": np.concatenate([features[u].locations for u in uris]).astype(np.float32)}
    real_images = np.repeat(np.arange(len(uris)), [len(features[u]) for u in uris])
    lists, row_images, locations, n_images = ql.database(images, per_image, real, real_images, quantizer)
    regions = (np.searchsorted(lists.offsets, np.arange(len(lists)), side="right") - 1).astype(np.int64)
    rows = shards.PostingRows(Encoded(quantizer.regions.region_cell[regions].astype(np.int64), regions, lists.codes),
                              row_images[lists.ids], locations[lists.ids], np.ones(len(lists), np.float32),
                              np.zeros(len(lists), np.float32))
    counts = np.bincount(row_images, minlength=n_images)
    table = shards.image_table([
        {"image_id": i, "uri": os.path.join(rq.LANDMARKS_DEV, uris[i]) if i < len(uris) else f"synthetic/{i}.jpg",
         "width": 1024, "height": 768, "num_features": int(counts[i]), "content_hash": ""} for i in range(n_images)])
    model = layout.read_manifest(sample_index())["model"]  # the lite preset, which extracted these features
    build = "builds/synthetic"
    manifest = shards.write_index(os.path.join(root, build), quantizer=quantizer, pca=projection, rows=rows,
                                  images=table, model=model)
    versions.publish(root, build, manifest, None)
    return root, queries


class Server:
    """``python -m pipeline.serve`` with its default limits, on a free loopback port."""

    def __init__(self, index: str, log: str, reload_interval: float = 60.0):
        import httpx2

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.serve", "--index", index, "--port", str(self.port), "--no-access-log",
                 "--reload-interval", str(reload_interval)],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=out, stderr=subprocess.STDOUT)
        self.http = httpx2.Client(base_url=self.base, timeout=120)

    def first_answer(self, photo: str) -> tuple[float, float]:
        """(seconds from start to ready, seconds from start to the first answer of a query)."""
        import httpx2

        while True:
            assert self.process.poll() is None, "the server exited"
            try:
                if self.http.get("/readyz").status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        ready = time.perf_counter() - self.started
        assert upload(self.http, photo).status_code == 200
        return ready, time.perf_counter() - self.started

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident memory of the server process, MB."""
        fields = {}
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(timeout=120)


def upload(http, photo: str):
    with open(photo, "rb") as f:
        return http.post("/v1/search", files={"image": (os.path.basename(photo), f.read(), "image/jpeg")},
                         data={"top": "20"})


def load(base: str, photos: list[str], clients: int, seconds: float, during=None) -> dict:
    """``clients`` threads querying for ``seconds``; ``during()`` runs meanwhile (a re-index)."""
    import httpx2

    stop = time.perf_counter() + seconds
    records, lock = [], threading.Lock()

    def client(k: int):
        with httpx2.Client(base_url=base, timeout=120) as http:
            i = k
            while time.perf_counter() < stop:
                photo = photos[i % len(photos)]
                i += clients
                start = time.perf_counter()
                try:
                    response = upload(http, photo)
                    status = response.status_code
                    body = response.json() if status in (200, 503) else {}
                except httpx2.HTTPError as e:
                    status, body = f"{type(e).__name__}", {}
                latency = time.perf_counter() - start
                with lock:
                    records.append((status, latency, body.get("timings"), body.get("version")))
                if status == 503:
                    time.sleep(float(response.headers.get("retry-after", "1")))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    begun = time.perf_counter()
    for t in threads:
        t.start()
    extra = during() if during else None
    for t in threads:
        t.join()
    wall = time.perf_counter() - begun
    ok = [r for r in records if r[0] == 200]
    pct = lambda values: {f"p{q}": float(np.percentile(values, q)) if values else None for q in (50, 95, 99)}  # noqa: E731
    out = {"clients": clients, "seconds": wall, "requests": len(records), "ok": len(ok),
           "requests_per_second": len(ok) / wall,
           "refused_503": sum(1 for r in records if r[0] == 503),
           "errors": sum(1 for r in records if r[0] not in (200, 503)),
           "error_kinds": sorted({str(r[0]) for r in records if r[0] not in (200, 503)}),
           "latency": pct([r[1] for r in ok]), "extract": pct([r[2]["extract"] for r in ok]),
           "search": pct([r[2]["search"] for r in ok]),
           "versions": {v: sum(1 for r in ok if r[3] == v) for v in sorted({r[3] for r in ok})}}
    out["refused_share"] = out["refused_503"] / max(len(records), 1)
    if extra is not None:
        out["during"] = extra
    return out


def cli_search_seconds(index: str, photo: str) -> float:
    start = time.perf_counter()
    result = run(["-m", "pipeline.search", "--index", index, "--output", os.path.join(WORK, "cli-results.json"), photo])
    assert result.returncode == 0, result.stderr[-2000:]
    return time.perf_counter() - start


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(name: str, index: str, photos: list[str], clients: list[int], duration: float, switch: bool) -> dict:
    print(f"\n{name}: {index}  (load {load_average()})")
    server = Server(index, os.path.join(WORK, f"{name}-server.log"), reload_interval=1.0)
    try:
        ready, first = server.first_answer(photos[0])
        info = server.http.get("/readyz").json()
        report = {"index": index, "images": info["images"], "descriptors": info["descriptors"], "resident": info["resident"],
                  "ready_seconds": ready, "first_answer_seconds": first, "phases": []}
        print(f"{info['images']} images, {info['descriptors']} descriptors; ready {ready:.1f} s after start, "
              f"first answer {first:.1f} s after start; RSS {server.rss_mb()[0]:.0f} MB")
        # Warm-up, not reported: the allocators settle over the first hundred-odd queries (their RSS then
        # stays flat: the second pass below checks it).
        report["warm_up"] = load(server.base, photos, 4, duration)
        report["warm_up"]["rss_mb"], report["warm_up"]["peak_rss_mb"] = server.rss_mb()
        print(f"warm-up: {report['warm_up']['ok']} queries at 4 clients, RSS {report['warm_up']['rss_mb']:.0f} MB")
        print(f"{'pass':>4} {'clients':>7} {'req/s':>6} {'ok':>5} {'503':>5} {'errors':>6} {'p50':>6} {'p95':>6} {'p99':>6} "
              f"{'extract p50/p95/p99':>20} {'search p50/p95/p99':>20} {'RSS MB':>7} {'peak MB':>7} {'load':>15}")
        for repeat in (1, 2):  # the same phases twice: the second pass must not need more memory
            for n in clients:
                phase = load(server.base, photos, n, duration)
                phase["rss_mb"], phase["peak_rss_mb"] = server.rss_mb()
                phase["load"], phase["pass"] = load_average(), repeat
                report["phases"].append(phase)
                show(phase)
        if switch:
            before = server.http.get("/readyz").json()["version"]

            def reindex():
                result = run(["-m", "pipeline.reindex", "--input", SAMPLES, "--index", index, "--no-progress"])
                assert result.returncode == 0, result.stderr[-2000:]
                return result.stdout.strip().splitlines()[-1]

            phase = load(server.base, photos, 4, max(duration, 30.0), during=reindex)
            phase["rss_mb"], phase["peak_rss_mb"] = server.rss_mb()
            phase["load"] = load_average()
            phase["version_before"] = before
            phase["version_after"] = server.http.get("/readyz").json()["version"]
            report["switch"] = phase
            print(f"switch under load ({phase['during']}):")
            show(phase)
            print(f"  answered by version: {phase['versions']}; {phase['errors']} failed requests")
        first, second = (report["phases"][i * len(clients) + len(clients) - 1] for i in (0, 1))
        report["rss_first_pass_mb"], report["rss_second_pass_mb"] = first["rss_mb"], second["rss_mb"]
        end = report.get("switch") or second
        report["rss_end_mb"], report["peak_rss_mb"] = end["rss_mb"], end["peak_rss_mb"]
        print(f"RSS after the first pass {first['rss_mb']:.0f} MB, after the second {second['rss_mb']:.0f} MB "
              f"({second['rss_mb'] - first['rss_mb']:+.0f} MB), at the end {end['rss_mb']:.0f} MB, peak "
              f"{end['peak_rss_mb']:.0f} MB")
    finally:
        server.stop()
    return report


def show(p: dict) -> None:
    f = lambda d: "/".join(f"{d[k]:.2f}" if d[k] is not None else "-" for k in ("p50", "p95", "p99"))  # noqa: E731
    print(f"{p.get('pass', '-'):>4} {p['clients']:>7} {p['requests_per_second']:6.2f} {p['ok']:>5} {p['refused_503']:>5} {p['errors']:>6} "
          f"{p['latency']['p50'] or 0:6.2f} {p['latency']['p95'] or 0:6.2f} {p['latency']['p99'] or 0:6.2f} "
          f"{f(p['extract']):>20} {f(p['search']):>20} {p['rss_mb']:7.0f} {p['peak_rss_mb']:7.0f} {p['load']:>15}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per phase (default %(default)s)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--synthetic-images", type=int, default=10_000)
    parser.add_argument("--per-image", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="8 s phases, a 2,000-image synthetic index")
    parser.add_argument("--json", default=os.path.join(RESULTS, "serve_load.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.synthetic_images = 8.0, 2000
    clients = [int(c) for c in args.clients.split(",")]
    assert max(clients) <= 64 and args.duration <= 600, "clients and duration are bounded (loopback load only)"
    os.makedirs(WORK, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    photos = sample_photos()
    index = sample_index()
    report = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_start": load_average(),
              "duration": args.duration, "clients": clients}
    cli = cli_search_seconds(index, photos[0])
    report["cli_search_seconds"] = cli
    print(f"pipeline.search, one query, whole process: {cli:.1f} s (load {load_average()})")
    report["sample"] = measure("sample", index, photos, clients, args.duration, switch=True)
    print(f"first answer after start: server {report['sample']['first_answer_seconds']:.1f} s vs pipeline.search "
          f"{cli:.1f} s for one query; then {report['sample']['phases'][0]['latency']['p50']:.2f} s per query")
    synthetic = synthetic_index(args.synthetic_images, args.per_image)
    if synthetic is None:
        print("no landmarks-dev: the synthetic index is not measured")
    else:
        root, queries = synthetic
        report["synthetic"] = measure("synthetic", root, queries, clients, args.duration, switch=False)
    report["load_end"] = load_average()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
