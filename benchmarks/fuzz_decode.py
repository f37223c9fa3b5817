"""Decoding hostile bytes: seeded mutants of valid images in every format Pillow can write, fed to
``images.decode_image``. Prints, per format, the files tried, how many decoded, the typed errors by
reason and the untyped ones (which must be 0), then the slowest file and the peak memory.

    python benchmarks/fuzz_decode.py [--files 20000] [--seed 0] [--json OUT]

The mutants (tests/fuzzing.py): flipped bytes anywhere or in the header, truncation, inserted
random runs, repeated slices, saturated 4-byte fields, spread evenly over the base images. The
same mutants, with plain Pillow (``Image.open(...).load()`` and a conversion to RGB), are counted
for comparison: what a decoder without the typed boundary lets escape.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from delf_retrieval.corpus import images
from tests import fuzzing  # noqa: E402


def plain_pillow(data: bytes) -> None:
    import io

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Image.open(io.BytesIO(data)).convert("RGB")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pillow", action="store_true", help="skip the plain-Pillow comparison")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench_results", "fuzz_decode.json"))
    args = parser.parse_args(argv)

    per_format: dict = collections.defaultdict(lambda: collections.Counter())
    untyped, pillow_escapes = [], collections.Counter()
    slowest = {"seconds": 0.0}
    start = time.perf_counter()
    for i, (label, data) in enumerate(fuzzing.corpus(args.files, args.seed)):
        fmt = label.split("-")[0]
        counts = per_format[fmt]
        counts["tried"] += 1
        t = time.perf_counter()
        try:
            images.decode_image(data, name=f"{label}#{i}")
            counts["decoded"] += 1
        except images.ImageError as e:
            counts[e.reason] += 1
        except Exception as e:  # noqa: BLE001 - what the benchmark counts
            counts["untyped"] += 1
            untyped.append(f"{label}#{i}: {type(e).__name__}: {e}")
        seconds = time.perf_counter() - t
        if seconds > slowest["seconds"]:
            slowest = {"seconds": round(seconds, 4), "file": f"{label}#{i}", "bytes": len(data)}
        if not args.no_pillow:
            try:
                plain_pillow(data)
            except (OSError, SyntaxError, EOFError):  # what callers of Pillow usually catch
                pass
            except Exception as e:  # noqa: BLE001
                pillow_escapes[type(e).__name__] += 1
    total_seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    reasons = sorted({r for c in per_format.values() for r in c} - {"tried", "decoded", "untyped"})
    header = ["format", "tried", "decoded"] + reasons + ["untyped"]
    rows = [[fmt, *(per_format[fmt].get(k, 0) for k in header[1:])] for fmt in sorted(per_format)]
    rows.append(["all", *(sum(per_format[f].get(k, 0) for f in per_format) for k in header[1:])])
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    print(f"files {args.files}, {total_seconds:.1f} s in all (with the Pillow comparison); "
          f"slowest {slowest['file']} {slowest['seconds'] * 1000:.1f} ms ({slowest['bytes']} bytes); "
          f"peak RSS {peak_mb:.0f} MB")
    if not args.no_pillow:
        print(f"plain Pillow on the same files: exceptions other than OSError/SyntaxError/EOFError: "
              f"{sum(pillow_escapes.values())} {dict(pillow_escapes)}")
    if untyped:
        print("UNTYPED:", *untyped[:20], sep="\n  ")
    record = {"files": args.files, "seed": args.seed, "per_format": {f: dict(c) for f, c in per_format.items()},
              "untyped": len(untyped), "untyped_examples": untyped[:50], "slowest": slowest,
              "seconds": round(total_seconds, 1), "peak_rss_mb": round(peak_mb), "pillow_escapes": dict(pillow_escapes)}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    return record


if __name__ == "__main__":
    sys.exit(1 if main()["untyped"] else 0)
