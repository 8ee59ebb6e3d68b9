"""How class probabilities are stored: ``uint8`` codes (default), ``float16`` or ``float32``.

``uint8`` stores ``floor(255 · p + 0.5)`` (round half up, computed in float32): 1 byte per
class and pixel instead of 4, exact to ±0.002. A probability threshold ``t`` on stored codes is exactly the code
threshold ``code > 255 · t`` (:meth:`ProbabilityEncoding.code_threshold`), which is how merge
and evaluate state the thresholds they apply. The argmax segmentation is never derived from
stored codes: prediction computes it from full-precision probabilities and stores it beside
them.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

UINT8_SCALE = 255.0


class ProbabilityEncoding(str, Enum):
    """Storage dtype of class probabilities."""

    UINT8 = "uint8"  # floor(255 p + 0.5): 1 byte per class per pixel
    FLOAT16 = "float16"  # 2 bytes, relative error ~5e-4
    FLOAT32 = "float32"  # 4 bytes, as computed

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.value)

    @property
    def bytes_per_value(self) -> int:
        return self.dtype.itemsize

    @classmethod
    def of(cls, dtype: np.dtype | str) -> ProbabilityEncoding:
        """The encoding of a stored array's dtype (float32 arrays of older stores included)."""
        return cls(np.dtype(dtype).name)

    def encode(self, probs: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """float32 probabilities in [0, 1] (any shape, on any device) -> stored values.

        With ``inplace`` the uint8 encoding scales ``probs`` itself (one pass less, no float copy).
        """
        import torch  # not at the top: merge and evaluate read stores without torch

        if self is ProbabilityEncoding.UINT8:
            half = torch.full((), 0.5, dtype=probs.dtype, device=probs.device)
            scaled = torch.add(half, probs, alpha=UINT8_SCALE, out=probs if inplace else None)  # 0.5 + 255 p
            return scaled.to(torch.uint8)  # truncation of a positive value: floor
        return probs.to(getattr(torch, self.value))

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> float32 probabilities in [0, 1].

        uint8 codes become the float32 nearest to ``code / 255``, so ``p > t`` on the result
        equals :meth:`code_threshold` for every threshold ``t`` (also where ``255 t`` is a
        whole number, e.g. t = 0.2: code 51 is not above it, code 52 is).
        """
        if self is ProbabilityEncoding.UINT8:
            return (np.asarray(stored, np.float64) / UINT8_SCALE).astype(np.float32)
        return np.asarray(stored, np.float32)

    def code_threshold(self, threshold: float) -> str:
        """How ``p > threshold`` reads on stored values, e.g. ``code >= 230`` for uint8 and 0.9."""
        if self is ProbabilityEncoding.UINT8:
            return f"code >= {math.floor(UINT8_SCALE * threshold) + 1}"
        return f"value > {threshold}"
