"""The U-Net training loss: pixel-wise softmax + cross-entropy weighted by w(x).

The paper's energy is ``E = sum_x w(x) * log p_{l(x)}(x)`` over the output region (the
network's valid output, i.e. the input tile minus :attr:`UNetSpec.context` per side; a 3-D
network's output region is a (Z, Y, X) box, the same sum over voxels). Here
it is divided by the number of pixels, so that ``w(x) = 1`` gives exactly the mean plain
cross-entropy, and the scale of the gradient does not depend on the tile size.

Numerics: logits are cast to float32 before the fused log-softmax (which subtracts the
per-pixel maximum), so the loss is finite and accurate when the network runs under bf16/fp16
autocast, where a softmax computed in half precision would underflow to ``log(0)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over pixels (voxels) of ``w(x) * -log softmax(logits)[target(x)]``, computed in float32.

    Args:
        logits: (N, C, Y, X) class scores of the network (a 3-D network: (N, C, Z, Y, X)), any
            float dtype (fp32/bf16/fp16).
        target: (N, Y, X) (3-D: (N, Z, Y, X)) integer class per pixel, values in ``[0, C)``;
            same spatial shape as ``logits`` (crop it to the output region first).
        weight: float per-pixel weights w(x) (dimensionless) shaped as ``target``, or None for
            the unweighted loss (w = 1 everywhere).

    Returns:
        0-d float32 tensor: the loss, averaged over all N * Y * X pixels (N * Z * Y * X voxels).

    Raises:
        ValueError: shapes do not match.
    """
    if logits.ndim not in (4, 5):
        raise ValueError(f"logits must be (N, C, Y, X) or (N, C, Z, Y, X), got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {expected} (crop to the output)"
        )
    if weight is not None and tuple(weight.shape) != expected:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match logits {expected} (crop to the output)"
        )
    nll = F.cross_entropy(logits.float(), target.long(), reduction="none")  # fused log-softmax + NLL
    if weight is not None:
        nll = nll * weight.float()
    return nll.mean()
