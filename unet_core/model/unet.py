"""The U-Net of Ronneberger et al. (2015), built from :mod:`unet_core.model.parts`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unet_core.model.parts import DoubleConv, Down, Up
from unet_core.model.spec import UNetSpec


class UNet(nn.Module):
    """Contracting path, bottleneck, expanding path with crop-and-concat skips.

    Input ``(N, in_channels, Y, X)`` float; output ``(N, n_classes, Y', X')`` logits with
    ``Y' = spec.output_size(Y)`` (572 -> 388 for the paper's network). With ``spec.dims == 3``
    (N, C, Z, Y, X) in and out, ``Z' = spec.z_axis.output_size(Z)``.
    """

    def __init__(self, spec: UNetSpec | None = None) -> None:
        super().__init__()
        self.spec = spec = spec or UNetSpec()
        kw = dict(padding=spec.padding, norm=spec.norm)
        if spec.dims == 3:
            kw["dims"] = 3
        kz = spec.kernel_z or (3,) * (spec.depth + 1)
        pz = spec.pool_z or (2,) * spec.depth
        widths = [spec.base_channels * 2**level for level in range(spec.depth + 1)]
        self.inc = DoubleConv(spec.in_channels, widths[0], kz=kz[0], **kw)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], kz=kz[i + 1], pz=pz[i], **kw)
                                   for i in range(spec.depth))
        # the paper's (Caffe, element-wise) dropout sits at the end of the contracting path
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], kz=kz[i], pz=pz[i], **kw)
                                 for i in reversed(range(spec.depth)))
        self.head = (nn.Conv2d if spec.dims == 2 else nn.Conv3d)(widths[0], spec.n_classes, kernel_size=1)
        self.apply(_he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, base_channels, Y', X')`` feature maps of the last level, before the 1x1 head."""
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.dropout(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return x

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, Y', X')`` (3-D: ``(N, 1, Z', Y', X')``) logit margin l1 - l0 of a two-class network, through its head
        folded to one output channel (weights w1 - w0, bias b1 - b0).

        The same function as the difference of :meth:`forward`'s two logits, with no cancellation
        of two large logits, and half the head's work: on a CPU a 1x1 convolution to two
        channels-last outputs is slow (a width-1 network's two-output head took 8 ms of its 47 ms
        forward on a 1024-px tile; benchmarks/RESULTS.md).
        """
        if self.spec.n_classes != 2:
            raise ValueError(f"a logit margin needs two classes, the network has {self.spec.n_classes}")
        w, b = self.head.weight, self.head.bias
        conv = F.conv2d if self.spec.dims == 2 else F.conv3d
        return conv(self.features(x), w[1:] - w[:1], b[1:] - b[:1])


def _he_init(module: nn.Module) -> None:
    """He initialisation as in the paper: normal, std = sqrt(2 / N), N = incoming nodes.

    For a 2x2 (pz x 2 x 2) up-convolution with stride equal to its size each output pixel sees
    one kernel tap per input channel, so N = in_channels there; for a k x k (kz x k x k)
    convolution N = in_channels * k * k (* kz).
    """
    if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        taps = math.prod(k // s for k, s in zip(module.kernel_size, module.stride))
        fan_in = module.in_channels * max(1, taps)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        fan_in = module.in_channels * math.prod(module.kernel_size)
    else:
        return
    if module.weight.is_meta:
        # built for its shapes only (checkpoint.check_weights, the training memory check): nothing to
        # draw, and torch's normal_ on the meta device imports its compiler, 0.8 CPU-s in each process
        return
    nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
    if module.bias is not None:
        nn.init.zeros_(module.bias)
