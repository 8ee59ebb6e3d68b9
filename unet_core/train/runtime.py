"""Where and how training runs: device, precision, optimizer kernels, one batch's loss, software versions.

On CUDA: TF32 matmuls, cuDNN autotuning (``benchmark``), channels-last, bf16 autocast and the
fused (single-kernel) optimizer step. On the CPU: float32, deterministic algorithms and the
optimizer's plain per-parameter loop, the path whose bit-exact resume the tests pin; with
``precision: bf16`` on a CPU with native bf16, bf16 autocast and channels-last (2-2.7x faster
training steps measured on an AMX Xeon; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import numpy as np
import torch

from unet_core import __version__
from unet_core.common.device import resolve_device
from unet_core.common.errors import ConfigError, UserInputError
from unet_core.common.precision import Precision, resolve_precision
from unet_core.model.loss import weighted_cross_entropy
from unet_core.train.config import OptimizerKind, TrainConfig


@dataclass
class Runtime:
    """Where and how the loop runs (resolved from the config and the machine)."""

    device: torch.device
    precision: Precision
    channels_last: bool
    description: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16/fp16 autocast dtype, or None for plain float32."""
        return self.precision.autocast_dtype

    @property
    def fused_optimizer(self) -> bool:
        """One fused kernel per optimizer step (CUDA); the CPU keeps the reference loop."""
        return self.device.type == "cuda"


def resolve_runtime(config: TrainConfig) -> Runtime:
    """Pick the device and precision; enable TF32/cuDNN autotune on CUDA, determinism on CPU.

    Raises:
        ConfigError: CUDA requested but not available, or an unknown device string.
    """
    try:
        device = resolve_device(config.device, option="train.device")
    except UserInputError as err:
        raise ConfigError(str(err)) from None
    precision = resolve_precision(config.precision, device, option="train.precision")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        desc = (
            f"{device} ({torch.cuda.get_device_name(device)}), {precision.value} autocast, TF32 on, "
            "fused optimizer"
        )
        return Runtime(device, precision, config.channels_last, desc)
    torch.use_deterministic_algorithms(True)
    if precision is Precision.BF16:  # native bf16 (AMX/AVX512-BF16): oneDNN wants channels-last for it
        desc = f"cpu ({torch.get_num_threads()} threads), bf16 autocast (native), channels-last, deterministic"
        return Runtime(device, precision, config.channels_last, desc)
    desc = f"cpu ({torch.get_num_threads()} threads), float32, deterministic"
    return Runtime(device, Precision.FP32, False, desc)


def versions() -> dict[str, str]:
    """Versions of the software that wrote a file (state.pt, the model card)."""
    return {
        "unet_pipeline": __version__,
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "platform": platform.platform(),
    }


def make_optimizer(model: torch.nn.Module, config: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    """SGD with momentum or Adam over ``model``'s parameters, fused on CUDA.

    The fused step reads the learning rate and step count on the device, so it adds no host
    synchronisation; on the CPU the default implementation is kept (bit-exact resume is tested
    on it).
    """
    fused = {"fused": True} if runtime.fused_optimizer else {}
    if config.optimizer is OptimizerKind.ADAM:
        return torch.optim.Adam(
            model.parameters(),
            lr=config.lr,
            betas=(config.momentum, 0.999),
            weight_decay=config.weight_decay,
            **fused,
        )
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fused
    )


def batch_loss(
    forward: torch.nn.Module,
    image: torch.Tensor,
    classes: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    runtime: Runtime,
) -> torch.Tensor:
    """The training loss of one batch: the network under ``runtime``'s autocast, the loss in float32.

    Args:
        forward: the model (or its ``torch.compile`` wrapper), on ``runtime.device``.
        image: (N, 1, H, W) float32 input tiles on the device.
        classes: (N, h, w) int64 targets of the output region.
        weights: (N, h, w) float32 w(x), or None for the plain cross-entropy.

    Returns:
        0-d float32 tensor on the device (not synchronised).
    """
    dtype = runtime.autocast_dtype
    with torch.autocast(runtime.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = forward(image)
    return weighted_cross_entropy(logits, classes, weights)
