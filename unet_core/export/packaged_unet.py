"""The U-Net as a bioimage.io package carries it: one self-contained file, torch only.

A bioimage.io ``pytorch_state_dict`` weights entry names the Python source that builds the
network, and the consumer (bioimageio.core, ilastik) imports that file alone: it cannot import
``unet_core``. This file is therefore standalone. :class:`UNet` has the parameter names and the
arithmetic of :class:`unet_core.model.unet.UNet` (``tests/unit/test_bioimageio_export.py`` checks that
both give the same logits for the same weights); :class:`PackagedUNet` wraps it so that any
consumer gets what ``unet predict`` computes:

* the input, a multiple of 2**depth per spatial axis, is extended by mirroring (reflection about the
  border pixel, as ``unet_core/common/mirror.py``) by the network's context before and by the
  context plus the surplus output pixels after, so a valid-convolution network returns one value
  per input pixel and every 2x2 max-pool sees the pixel pairs it sees in one pass over the image;
* the decision rule's per-class logit offsets (weight-prior correction) are added to the logits;
* the output is the softmax over classes: class probabilities of the input's size.

Nothing in this file imports anything but torch.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


def _double_conv(c_in: int, c_out: int, padding: str, norm: str) -> nn.Sequential:
    pad = 1 if padding == "same" else 0
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=pad, bias=norm == "none"), _norm(norm, c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=pad, bias=norm == "none"), _norm(norm, c_out), nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    def __init__(self, c_in: int, c_out: int, padding: str, norm: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        self.conv = _double_conv(2 * c_out, c_out, padding, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        top = (skip.shape[-2] - x.shape[-2]) // 2
        left = (skip.shape[-1] - x.shape[-1]) // 2
        skip = skip[:, :, top:top + x.shape[-2], left:left + x.shape[-1]]
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """The U-Net of Ronneberger et al. (2015): (N, in_channels, Y, X) -> (N, n_classes, Y', X') logits."""

    def __init__(self, depth: int = 4, base_channels: int = 64, in_channels: int = 1, n_classes: int = 2,
                 padding: str = "valid", norm: str = "none") -> None:
        super().__init__()
        widths = [base_channels * 2**level for level in range(depth + 1)]
        self.inc = _double_conv(in_channels, widths[0], padding, norm)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _double_conv(widths[i], widths[i + 1], padding, norm))
            for i in range(depth))
        self.ups = nn.ModuleList(_Up(widths[i + 1], widths[i], padding, norm) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


def _mirror_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices of ``arange(-before, n + after)`` folded into ``[0, n)`` by reflection about the
    border pixels, for any width (``n >= 2``: inputs are multiples of 2**depth)."""
    index = torch.arange(-before, n + after, device=device)
    period = torch.full_like(index[:1], 2 * (n - 1))
    folded = torch.remainder(index, period)
    return torch.where(folded < n, folded, period - folded)


class PackagedUNet(nn.Module):
    """(N, in_channels, Y, X) normalised input -> (N, n_classes, Y, X) class probabilities.

    Args:
        depth, base_channels, in_channels, n_classes, padding, norm: the architecture
            (``unet_core.model.spec.UNetSpec``).
        pad_before, pad_after: mirrored pixels added before and after each spatial axis (the
            network's context; after: plus its surplus output pixels); 0 for a same-padded net.
        logit_offsets: per-class offsets added to the logits before the softmax (the model's
            decision rule), or None.
    """

    def __init__(self, depth: int = 4, base_channels: int = 64, in_channels: int = 1, n_classes: int = 2,
                 padding: str = "valid", norm: str = "none", pad_before: int = 92, pad_after: int = 96,
                 logit_offsets: Optional[List[float]] = None) -> None:
        super().__init__()
        self.net = UNet(depth, base_channels, in_channels, n_classes, padding, norm)
        self.pad_before = int(pad_before)
        self.pad_after = int(pad_after)
        offsets = torch.tensor(logit_offsets if logit_offsets is not None else [0.0] * n_classes,
                               dtype=torch.float32).reshape(1, n_classes, 1, 1)
        self.register_buffer("logit_offsets", offsets, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if self.pad_before > 0 or self.pad_after > 0:
            x = x.index_select(-2, _mirror_index(h, self.pad_before, self.pad_after, x.device))
            x = x.index_select(-1, _mirror_index(w, self.pad_before, self.pad_after, x.device))
        logits = self.net(x)[:, :, :h, :w] + self.logit_offsets
        return F.softmax(logits, dim=1)
