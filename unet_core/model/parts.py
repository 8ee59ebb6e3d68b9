"""Building blocks of the U-Net: two convolutions, a down step and an up step, in 2-D or 3-D.

In 2-D every kernel is the paper's (3x3 convolutions, 2x2 pools and up-convolutions). In 3-D
(the 3-D U-Net of Cicek et al. 2016) a level's kernels are ``kz x 3 x 3`` and its pools ``pz x 2 x 2``
(:class:`unet_core.model.spec.UNetSpec`'s ``kernel_z`` and ``pool_z``), so a z axis coarser than the
plane is not pooled or convolved below its resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from unet_core.model.spec import Norm, Padding

#: torch layer classes per number of spatial dimensions
_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_UPCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCHNORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _norm(kind: Norm, channels: int, dims: int) -> nn.Module:
    if kind is Norm.BATCH:
        return _BATCHNORM[dims](channels)
    if kind is Norm.GROUP:
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


def _kernel(dims: int, kz: int, plane: int) -> int | tuple[int, int, int]:
    """A layer's kernel: ``plane`` in 2-D (torch's square int), ``(kz, plane, plane)`` in 3-D."""
    return plane if dims == 2 else (kz, plane, plane)


class DoubleConv(nn.Sequential):
    """(3x3 [kz x 3 x 3] conv -> [norm] -> ReLU) x 2; ``valid`` padding loses 2 px per side
    in the plane (``kz - 1`` along z)."""

    def __init__(self, c_in: int, c_out: int, *, padding: Padding, norm: Norm, dims: int = 2, kz: int = 3) -> None:
        kernel = _kernel(dims, kz, 3)
        pad = 0 if padding is Padding.VALID else (1 if dims == 2 else (kz // 2, 1, 1))
        conv = _CONV[dims]
        super().__init__(
            conv(c_in, c_out, kernel, padding=pad, bias=norm is Norm.NONE),
            _norm(norm, c_out, dims),
            nn.ReLU(inplace=True),
            conv(c_out, c_out, kernel, padding=pad, bias=norm is Norm.NONE),
            _norm(norm, c_out, dims),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 [pz x 2 x 2] max-pool (stride = size), then :class:`DoubleConv` doubling the channels."""

    def __init__(self, c_in: int, c_out: int, *, padding: Padding, norm: Norm, dims: int = 2, kz: int = 3,
                 pz: int = 2) -> None:
        super().__init__(_POOL[dims](_kernel(dims, pz, 2)),
                         DoubleConv(c_in, c_out, padding=padding, norm=norm, dims=dims, kz=kz))


def center_crop(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Crop the centre ``size`` of the trailing spatial axes of an (N, C, ...) tensor (TorchScript
    compiles it: ``model.ts``)."""
    for i, want in enumerate(size):
        axis = x.dim() - len(size) + i
        x = x.narrow(axis, (x.shape[axis] - want) // 2, want)
    return x


class Up(nn.Module):
    """2x2 [pz x 2 x 2] up-convolution halving channels, crop-and-concat the skip, :class:`DoubleConv`."""

    def __init__(self, c_in: int, c_out: int, *, padding: Padding, norm: Norm, dims: int = 2, kz: int = 3,
                 pz: int = 2) -> None:
        super().__init__()
        step = _kernel(dims, pz, 2)
        self.up = _UPCONV[dims](c_in, c_out, kernel_size=step, stride=step)
        self.conv = DoubleConv(2 * c_out, c_out, padding=padding, norm=norm, dims=dims, kz=kz)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = center_crop(skip, x.shape[2:])
        return self.conv(torch.cat([skip, x], dim=1))
