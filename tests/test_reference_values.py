"""Reference values: the ``lite`` preset's network (ImageNet EfficientNet-Lite0, converted from the
PyPI package's torch file) must keep giving the same features and the same ImageNet classes.

Two stored references, both written by ``tests/data/make_reference_values.py``:

* ``tests/data/reference_lite0_features.npz``: the features of ``samples/berlin_cathedral/01.jpg``
  extracted with cheap settings (scales 0.5 and 1.0 of the image brought to a 320 px long side, the
  top 100 features). Locations and scales must be identical; scores (the descriptor L2 norms, the
  ``lite`` preset's keypoint score) within a relative 1e-3; descriptors, after L2 normalisation,
  within 1e-3 per component (they are stored that way, as float16).
* ``tests/data/reference_lite0_imagenet_logits.npz``: the ImageNet logits of the three Berlin
  cathedral and ten Sacre-Coeur photographs, classified by the extraction backbone plus the rest of
  the converted classifier (:func:`delf_retrieval.model.efficientnet_lite.imagenet_classifier_head`)
  on exactly the input the extractor feeds its network (its resize and ``DelfNet.normalise``).
  Their top-5 classes must name churches and similar buildings, and the logits match the stored
  ones within 5e-3.

Tolerances. All of this is float32 inference on CPU; another machine or TensorFlow build differs
only by round-off: switching TensorFlow between its oneDNN and Eigen kernels
(``TF_ENABLE_ONEDNN_OPTS=0/1``) moves unit descriptors by ~4e-7, scores by ~4e-7 relative and
logits by ~5e-6. Storing unit descriptors as float16 adds at most ~2.5e-4 (measured 1.2e-4). The
tolerances leave a wide margin over that, yet are well under what a preprocessing mistake does:
shifting the mean by one grey level (127 -> 128) moves unit descriptors by 3e-3, scores by 3.6e-3
relative and logits by 0.028; a BGR channel swap moves logits by over 1 and unit descriptors by
0.27 (and changes which features are selected). Locations and scales are grid arithmetic, not
network output, so they compare exactly; the reference file is only accepted (by the script) when
the 100th and 101st scores differ by more than the score tolerance, so round-off cannot change which
features are kept. Features are compared in location order, as near-equal scores may swap ranks.
The input is a JPEG, so a JPEG decoder that gives other pixels (another libjpeg in Pillow) would
fail this test too (noise of +-1 grey level is enough); the failure message says whether the
decoded pixels still match the reference's digest, to tell that apart from a network change.

The top-5 check alone would not catch a channel swap or a slightly wrong mean/std: on these photos
EfficientNet-Lite0 still names churches and palaces under a BGR swap, Keras' caffe normalisation,
[0, 1] scaling or a halved std (only unnormalised 0..255 pixels lose them). The logit comparison is
what pins the preprocessing down.

When to regenerate: only after a deliberate change that is meant to change features or classes --
the network definition, the torch-to-Keras weight conversion, the pixel normalisation, the resize,
the receptive-field locations, keypoint selection, or the sample photographs. Then run
``python tests/data/make_reference_values.py``, check what it prints (the top-5 classes still make
sense), and commit the two ``.npz`` files with the change that explains them. Never regenerate to
make an unexplained failure go away: that failure is what this module is for.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from delf_retrieval.corpus.images import load_image
from delf_retrieval.extraction import presets
from delf_retrieval.extraction.extractor import Extractor, pyramid
from tests.conftest import SAMPLES, sample_path

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FEATURES_FILE = "reference_lite0_features.npz"
LOGITS_FILE = "reference_lite0_imagenet_logits.npz"

PRESET = "lite"
FEATURE_PHOTO = ("berlin_cathedral", "01.jpg")
EXTRACTION = {"scales": (0.5, 1.0), "max_features": 100, "max_image_size": 320}
# Classification sees the extractor's input at one pyramid level: the photo at a 320 px long side.
CLASSIFICATION = {"scales": (1.0,), "max_features": 1, "max_image_size": 320}
CATHEDRAL_PHOTOS = tuple(("berlin_cathedral", f"0{i}.jpg") for i in (1, 2, 3))
SACRE_COEUR_PHOTOS = tuple(("sacre_coeur", name) for name in sorted(os.listdir(os.path.join(SAMPLES, "sacre_coeur")))
                           if name.endswith(".jpg"))

DESCRIPTOR_ATOL = 1e-3  # per component of L2-normalised descriptors
SCORE_RTOL = 1e-3
LOGIT_ATOL = 5e-3

# ImageNet-1k classes that fairly describe a photograph of a cathedral or basilica.
CHURCH_LIKE = {406: "altar", 442: "bell cote", 483: "castle", 497: "church", 538: "dome", 663: "monastery",
               668: "mosque", 698: "palace", 832: "stupa", 884: "vault"}


# --- shared with tests/data/make_reference_values.py -------------------------------------------------

def model_config():
    """The lite preset's network with keypoints by descriptor L2 norm: the references pin the
    backbone and its weights; the preset's shipped attention head is tested on its own."""
    return presets.model_config(PRESET, keypoint_score="l2norm")


def extraction_config(settings: dict = EXTRACTION):
    return presets.extraction_config(PRESET, **settings)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pixels_sha256(image: np.ndarray) -> str:
    """Digest of decoded pixels: tells a changed JPEG decoder apart from a changed network."""
    return hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()


def unit(descriptors: np.ndarray) -> np.ndarray:
    d = descriptors.astype(np.float32)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


def location_order(locations: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Indices sorting features by (scale, y, x): a score-independent order."""
    return np.lexsort((locations[:, 1], locations[:, 0], scales))


def feature_keys(locations: np.ndarray, scales: np.ndarray) -> set:
    return set(zip(scales.tolist(), locations[:, 0].tolist(), locations[:, 1].tolist()))


def extract_reference_photo(net, max_features: int | None = None):
    """Features of the reference photo, extracted as the reference was."""
    settings = dict(EXTRACTION)
    if max_features is not None:
        settings["max_features"] = max_features
    return Extractor(net, extraction_config(settings)).extract(load_image(sample_path(*FEATURE_PHOTO)))


def extraction_network_input(extractor: Extractor, image: np.ndarray) -> np.ndarray:
    """The (h, w, 3) array ``extractor`` feeds its network for ``image`` (whose extraction config
    must have one pyramid level): its own resize and ``DelfNet.normalise``, captured at the network
    call and cropped of the bucket padding."""
    batches = []
    run = extractor._run

    def spy(batch):
        batches.append(np.array(batch))
        return run(batch)

    extractor._run = spy
    try:
        extractor.extract(image)
    finally:
        extractor._run = run
    (level,) = pyramid(image.shape[0], image.shape[1], extractor.config, extractor.net.stride)
    assert len(batches) == 1 and batches[0].shape[0] == 1, "expected one network call for one level"
    return batches[0][0, : level.height, : level.width]


def classify(net, head, photos) -> np.ndarray:
    """ImageNet logits (N, 1000) of sample photos: the extractor's network input at the
    ``CLASSIFICATION`` level, through the extraction backbone and the classifier head."""
    extractor = Extractor(net, extraction_config(CLASSIFICATION))
    logits = []
    for photo in photos:
        x = extraction_network_input(extractor, load_image(sample_path(*photo)))
        logits.append(np.asarray(head(net.backbone(x[None], training=False)))[0])
    return np.stack(logits).astype(np.float32)


def top5(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, axis=-1, kind="stable")[..., :5]


def _load(name: str) -> dict:
    path = os.path.join(DATA_DIR, name)
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: run python tests/data/make_reference_values.py")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# --- tests ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0_head(cache_dir):
    from delf_retrieval.model import efficientnet_lite

    return efficientnet_lite.imagenet_classifier_head("efficientnet_lite0", cache_dir)


def test_session_network_is_the_lite_preset(lite_net):
    assert lite_net.config == model_config()


def test_features_match_the_reference(lite_net):
    ref = _load(FEATURES_FILE)
    path = sample_path(*FEATURE_PHOTO)
    assert str(ref["photo"]) == "/".join(FEATURE_PHOTO)
    assert str(ref["photo_sha256"]) == file_sha256(path), "the sample photo changed: regenerate on purpose"
    assert tuple(ref["extraction_scales"].tolist()) == EXTRACTION["scales"]
    assert int(ref["max_features"]) == EXTRACTION["max_features"]
    assert int(ref["max_image_size"]) == EXTRACTION["max_image_size"]
    image = load_image(path)
    decoder = ("same decoded pixels as the reference" if pixels_sha256(image) == str(ref["pixels_sha256"])
               else "the JPEG decoder gives other pixels than when the reference was made")

    features = extract_reference_photo(lite_net)
    assert features.image_size == tuple(ref["image_size"].tolist())
    assert len(features) == len(ref["scores"]) == EXTRACTION["max_features"]
    lost = len(feature_keys(ref["locations"], ref["scales"]) - feature_keys(features.locations, features.scales))
    assert lost == 0, f"{lost} of {len(ref['scores'])} reference features are no longer selected ({decoder})"
    got, want = location_order(features.locations, features.scales), location_order(ref["locations"], ref["scales"])
    np.testing.assert_array_equal(features.scales[got], ref["scales"][want], err_msg=decoder)
    np.testing.assert_array_equal(features.locations[got], ref["locations"][want], err_msg=decoder)
    np.testing.assert_allclose(features.scores[got], ref["scores"][want], rtol=SCORE_RTOL, atol=0, err_msg=decoder)
    np.testing.assert_allclose(unit(features.descriptors)[got], ref["unit_descriptors"][want].astype(np.float32),
                               rtol=0, atol=DESCRIPTOR_ATOL, err_msg=decoder)
    # The score is the descriptor norm (keypoint_score "l2norm"), so raw descriptors are pinned too.
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), features.scores, rtol=1e-5)


def test_classifier_head_completes_the_extraction_backbone(lite_net, lite0_head, cache_dir):
    """``head(backbone(x))`` of the DELF network is the whole converted ImageNet classifier."""
    from delf_retrieval.model import efficientnet_lite

    assert tuple(lite0_head.inputs[0].shape)[-1] == efficientnet_lite.get("efficientnet_lite0").feature_channels
    assert tuple(lite0_head.outputs[0].shape) == (None, efficientnet_lite.NUM_CLASSES)
    classifier = efficientnet_lite.imagenet_classifier("efficientnet_lite0", cache_dir)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 96, 128, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lite0_head(lite_net.backbone(x))), np.asarray(classifier(x)),
                               rtol=1e-4, atol=1e-4)


def test_imagenet_classes_through_the_extraction_preprocessing(lite_net, lite0_head):
    ref = _load(LOGITS_FILE)
    photos = CATHEDRAL_PHOTOS + SACRE_COEUR_PHOTOS
    assert ref["photos"].tolist() == ["/".join(p) for p in photos]
    assert ref["photo_sha256"].tolist() == [file_sha256(sample_path(*p)) for p in photos]
    logits = classify(lite_net, lite0_head, photos)
    tops = top5(logits)
    churchy = [bool(CHURCH_LIKE.keys() & set(t.tolist())) for t in tops]
    report = "\n".join(f"{'/'.join(p)}: {t.tolist()}" for p, t in zip(photos, tops))
    assert sum(churchy[: len(CATHEDRAL_PHOTOS)]) >= 2, f"cathedral photos not seen as churches:\n{report}"
    assert sum(churchy[len(CATHEDRAL_PHOTOS):]) >= 8, f"Sacre-Coeur photos not seen as churches:\n{report}"
    # Sensible classes survive many preprocessing mistakes; the logits do not.
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=LOGIT_ATOL,
                               err_msg=f"top-5 now:\n{report}\nreference: {top5(ref['logits']).tolist()}")
