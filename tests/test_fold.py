"""Folding BatchNorm into convolutions computes the same function."""

import numpy as np
import pytest

from delf_retrieval.model import efficientnet_lite, resnet50
from delf_retrieval.model.fold import fold_batch_norm
from tests.test_models import randomise


@pytest.mark.parametrize("build", [lambda: resnet50.build("keras"), lambda: resnet50.build("slim"),
                                   lambda: efficientnet_lite.build("efficientnet_lite0"),
                                   lambda: efficientnet_lite.build("efficientnet_lite2")],
                         ids=["resnet50-keras", "resnet50-slim", "efficientnet_lite0", "efficientnet_lite2"])
def test_folded_model_equals_original(build):
    model = build()
    randomise(model, seed=7)
    folded = fold_batch_norm(model)
    assert not any("BatchNormalization" == type(l).__name__ for l in folded.layers)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 96, 160, 3)).astype(np.float32)
    expected = model(x).numpy()
    np.testing.assert_allclose(folded(x).numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
