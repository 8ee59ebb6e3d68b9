"""Building blocks of the U-Net: two 3x3 convolutions, a down step and an up step."""

from __future__ import annotations

import torch
from torch import nn

from unet_core.model.spec import Norm, Padding


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind is Norm.BATCH:
        return nn.BatchNorm2d(channels)
    if kind is Norm.GROUP:
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(3x3 conv -> [norm] -> ReLU) x 2; ``valid`` padding loses 2 px per side."""

    def __init__(self, c_in: int, c_out: int, *, padding: Padding, norm: Norm) -> None:
        pad = 1 if padding is Padding.SAME else 0
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=pad, bias=norm is Norm.NONE),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=pad, bias=norm is Norm.NONE),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool (stride 2), then :class:`DoubleConv` doubling the channels."""

    def __init__(self, c_in: int, c_out: int, *, padding: Padding, norm: Norm) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(c_in, c_out, padding=padding, norm=norm))


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the centre ``height`` x ``width`` of an (N, C, Y, X) tensor."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class Up(nn.Module):
    """2x2 up-convolution halving channels, crop-and-concat the skip, :class:`DoubleConv`."""

    def __init__(self, c_in: int, c_out: int, *, padding: Padding, norm: Norm) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * c_out, c_out, padding=padding, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = center_crop(skip, x.shape[-2], x.shape[-1])
        return self.conv(torch.cat([skip, x], dim=1))
