"""Weighted pixel-wise cross-entropy: equals plain CE for w = 1, weights steer gradients, fp16/bf16 safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unet_core.model.loss import weighted_cross_entropy


def _batch(seed: int = 0, n: int = 2, c: int = 3, y: int = 7, x: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, y, x, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, c, (n, y, x), generator=g)
    return logits, target


def test_uniform_weights_equal_plain_cross_entropy() -> None:
    logits, target = _batch()
    plain = F.cross_entropy(logits, target)
    assert torch.allclose(weighted_cross_entropy(logits, target, torch.ones(target.shape)), plain.float())
    assert torch.allclose(weighted_cross_entropy(logits, target), plain.float())
    # a constant weight c scales the loss by c (mean over pixels, as the paper's energy / #pixels)
    assert torch.allclose(
        weighted_cross_entropy(logits, target, torch.full(target.shape, 2.5)), 2.5 * plain.float()
    )


def test_matches_hand_computed_value() -> None:
    # one pixel, two classes: logits (0, log 3) -> p = (1/4, 3/4); target 0, w = 2 -> 2 * log 4
    logits = torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))]).view(1, 2, 1, 1)
    loss = weighted_cross_entropy(logits, torch.zeros(1, 1, 1, dtype=torch.long), torch.full((1, 1, 1), 2.0))
    assert loss.item() == pytest.approx(2 * torch.log(torch.tensor(4.0)).item(), rel=1e-6)


def test_weights_change_gradients() -> None:
    logits, target = _batch(1)
    weights = torch.ones(target.shape)
    weights[:, 3, :] = 10.0  # a "separation line" row weighted like w0

    def grad(w):
        leaf = logits.clone().float().requires_grad_(True)
        weighted_cross_entropy(leaf, target, w).backward()
        return leaf.grad

    g_plain, g_weighted = grad(None), grad(weights)
    # rows with w = 1 keep the same gradient, the heavy row gets exactly 10x
    assert torch.allclose(g_weighted[:, :, 3, :], 10 * g_plain[:, :, 3, :], rtol=1e-5, atol=1e-7)
    other = torch.ones(target.shape[1], dtype=torch.bool)
    other[3] = False
    assert torch.allclose(g_weighted[:, :, other, :], g_plain[:, :, other, :])
    # zero weight removes a pixel from the loss entirely
    zero = torch.ones(target.shape)
    zero[0, 0, 0] = 0
    assert torch.count_nonzero(grad(zero)[0, :, 0, 0]) == 0


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
)
def test_half_precision_logits_are_stable(dtype: torch.dtype) -> None:
    # large margins underflow a softmax computed in half precision (p = 0 -> log 0 = -inf)
    logits = torch.tensor([[60.0, -60.0], [-60.0, 60.0]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])  # both pixels confidently wrong
    half = logits.to(dtype)
    naive = -torch.log(torch.softmax(half, dim=1)).gather(1, target.unsqueeze(1))
    assert not torch.isfinite(naive).all()  # the failure mode the loss must avoid
    loss = weighted_cross_entropy(half.requires_grad_(True), target, torch.ones(1, 1, 2, dtype=dtype))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(120.0, rel=1e-3)
    loss.backward()


def test_autocast_cpu_bf16_matches_fp32() -> None:
    logits, target = _batch(2)
    conv = torch.nn.Conv2d(3, 3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(logits.float())
        assert out.dtype == torch.bfloat16
        loss = weighted_cross_entropy(out, target)
    ref = weighted_cross_entropy(out.float(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("target_shape", "weight_shape"),
    [
        pytest.param((2, 6, 5), None, id="target-not-cropped"),
        pytest.param((2, 7, 5), (2, 7, 4), id="weight-mismatch"),
    ],
)
def test_shape_mismatch_raises(target_shape, weight_shape) -> None:
    logits = torch.zeros(2, 3, 7, 5)
    w = None if weight_shape is None else torch.ones(weight_shape)
    with pytest.raises(ValueError, match="crop to the output"):
        weighted_cross_entropy(logits, torch.zeros(target_shape, dtype=torch.long), w)
