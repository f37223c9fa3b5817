"""Extract DELF features of single images: ``python -m pipeline.extract IMAGE... --output DIR``.

Writes one ``.npz`` feature file per image (see ``delf_retrieval.extraction.features``), optionally a PNG of
its attention map and keypoints, and ``rejected.csv`` listing every input that could not be used.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import time
from dataclasses import dataclass, field

from delf_retrieval.corpus import images as image_io
from delf_retrieval.corpus.images import IMAGE_EXTENSIONS
from delf_retrieval.extraction.extractor import Extractor
from delf_retrieval.extraction.visualize import attention_figure
from delf_retrieval.model import delf
from pipeline import cli


@dataclass
class ExtractionSummary:
    extracted: list = field(default_factory=list)  # (input, feature file, number of features)
    skipped: list = field(default_factory=list)  # inputs whose feature file already existed
    rejected: list = field(default_factory=list)  # (input, reason, message)
    seconds: float = 0.0

    def table(self) -> str:
        n_features = sum(n for _, _, n in self.extracted)
        rows = [("extracted", len(self.extracted)), ("already done", len(self.skipped)),
                ("rejected", len(self.rejected)), ("features", n_features), ("seconds", f"{self.seconds:.1f}")]
        by_reason: dict = {}
        for _, reason, _ in self.rejected:
            by_reason[reason] = by_reason.get(reason, 0) + 1
        rows += [(f"  rejected: {r}", n) for r, n in sorted(by_reason.items())]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given, directories searched recursively for images, globs expanded; sorted, unique."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, files in os.walk(item):
                found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif any(c in item for c in "*?["):
            found += glob.glob(item, recursive=True)
        else:
            found.append(item)
    return sorted(set(found))


def output_names(paths: list[str]) -> dict[str, str]:
    """A unique file stem per input: its path relative to the inputs' common folder, '/' -> '__'."""
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    return {p: os.path.splitext(os.path.relpath(a, common))[0].replace(os.sep, "__") for p, a in zip(paths, absolute)}


def main(model_config, extraction_config, inputs: list[str], output: str, visualize: bool = False,
         overwrite: bool = False, progress: bool = True, cache_dir: str | None = None) -> ExtractionSummary:
    """Extract features of every input image into ``output``; re-running skips images already done."""
    from tqdm import tqdm  # heavy: imported on first use

    start = time.time()
    os.makedirs(output, exist_ok=True)
    paths = expand_inputs(inputs)
    names = output_names(paths)
    summary = ExtractionSummary()
    todo = []
    for path in paths:
        target = os.path.join(output, names[path] + ".npz")
        if os.path.exists(target) and not overwrite:
            summary.skipped.append(path)
        else:
            todo.append((path, target))
    if todo:
        extractor = Extractor(delf.load(model_config, cache_dir=cache_dir), extraction_config)
        for path, target in tqdm(todo, desc="extract", unit="img", disable=not progress):
            try:
                image = image_io.load_image(path)
            except image_io.ImageError as e:
                summary.rejected.append((path, e.reason, str(e)))
                continue
            try:
                features = extractor.extract(image)
            except Exception as e:  # noqa: BLE001 - one image that fails extraction must not stop the others
                summary.rejected.append((path, "extraction_failed", f"{type(e).__name__}: {e}"))
                continue
            tmp = target + ".tmp"
            features.save(tmp)
            os.replace(tmp, target)  # a feature file is either complete or absent
            summary.extracted.append((path, target, len(features)))
            if visualize:

                attention_figure(image, extractor.score_map(image), features).save(
                    os.path.join(output, names[path] + ".attention.png"))
    with open(os.path.join(output, "rejected.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason", "message"])
        writer.writerows(summary.rejected)
    summary.seconds = time.time() - start
    return summary


def report(summary: ExtractionSummary) -> None:
    """The summary table on stdout, and each rejected input with its reason on stderr."""
    print(summary.table())
    for path, reason, message in summary.rejected:
        print(f"rejected {path}: {reason}: {message}", file=sys.stderr)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeline.extract", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders or globs")
    parser.add_argument("--output", required=True, help="folder for the feature files")
    parser.add_argument("--visualize", action="store_true", help="also write <name>.attention.png per image")
    parser.add_argument("--overwrite", action="store_true", help="re-extract images already done")
    parser.add_argument("--no-progress", action="store_true")
    cli.add_model_arguments(parser)
    cli.add_debug_argument(parser)
    return parser.parse_args(argv)


def run(argv=None) -> int:
    args = parse_args(argv)
    cli.quiet_tensorflow(args.debug)
    model_config, extraction_config = cli.configs_from_args(args)
    summary = main(model_config, extraction_config, args.inputs, args.output, args.visualize, args.overwrite,
                   progress=not args.no_progress)
    report(summary)
    return 0 if (summary.extracted or summary.skipped or not summary.rejected) else 1


if __name__ == "__main__":
    sys.exit(cli.main(run))
