"""The weight-prior correction: offsets recover the posterior that a w(x)-weighted loss distorts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unet_core.common.intensity import IntensityStats
from unet_core.infer.predict import predict_plane
from unet_core.model.decision import WeightSums, correct, logit_offsets
from unet_core.model.loss import weighted_cross_entropy
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet


@pytest.mark.parametrize("p_interior", [0.3, 0.5, 0.8])
def test_offsets_undo_the_weighting_of_the_optimal_logit(p_interior: float) -> None:
    # Pixels that all look alike, a fraction p of them cell interior (class 1). Class 0 pixels
    # carry weight 6, class 1 weight 0.7 (as membrane vs interior with w_c + border term).
    rng = np.random.default_rng(0)
    n = 20000
    classes = (rng.random(n) < p_interior).astype(np.int64)
    weights = np.where(classes == 1, 0.7, 6.0).astype(np.float32)
    logit = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([logit], lr=1, max_iter=200)
    target = torch.from_numpy(classes).view(1, n, 1)
    w = torch.from_numpy(weights).view(1, n, 1)

    def closure():
        opt.zero_grad()
        loss = weighted_cross_entropy(logit.view(1, 2, 1, 1).expand(1, 2, n, 1), target, w)
        loss.backward()
        return loss

    opt.step(closure)
    raw = torch.softmax(logit.detach(), 0).numpy()
    sums = WeightSums(2)
    sums.add(classes, weights)
    offsets = logit_offsets(sums.means())
    fixed = torch.softmax(torch.from_numpy(correct(logit.detach().numpy(), offsets)), 0).numpy()
    p = classes.mean()
    assert abs(raw[1] - p) > 0.1  # the weighted optimum is biased toward the heavy class
    assert fixed[1] == pytest.approx(p, abs=1e-3)  # the corrected one is the true frequency


def test_weight_sums_and_empty_class() -> None:
    sums = WeightSums(3)
    sums.add(np.array([[0, 1], [1, 0]]), np.array([[2.0, 1.0], [3.0, 4.0]]))
    sums.add(np.array([1]), np.array([5.0]))
    np.testing.assert_allclose(sums.means(), [3.0, 3.0, 1.0])  # class 2 absent: no correction


def test_offsets_are_centred_and_checked() -> None:
    off = logit_offsets(np.array([8.0, 0.5]))
    assert off.sum() == pytest.approx(0.0)
    assert off[1] - off[0] == pytest.approx(np.log(16.0))
    np.testing.assert_array_equal(logit_offsets(np.ones(2)), [0.0, 0.0])
    with pytest.raises(ValueError, match="finite and > 0"):
        logit_offsets(np.array([1.0, 0.0]))


def test_prediction_adds_the_offsets_to_the_logits() -> None:
    spec = UNetSpec(depth=2, base_channels=4, dropout=0.0)
    torch.manual_seed(0)
    model = UNet(spec).eval()
    image = np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)
    kw = dict(stats=IntensityStats(0.0, 1.0), block_px=32, tile_out=16)
    raw = predict_plane(model, image, **kw)
    fixed = predict_plane(model, image, offsets=np.array([-1.0, 1.0]), **kw)
    shift = (np.log(fixed[1]) - np.log(fixed[0])) - (np.log(raw[1]) - np.log(raw[0]))
    np.testing.assert_allclose(shift, 2.0, atol=1e-4)
