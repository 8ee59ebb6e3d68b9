"""How class probabilities are stored: ``uint8`` codes (default), ``float16`` or ``float32``.

``uint8`` stores ``floor(255 · p + 0.5)`` (round half up, computed in float32): 1 byte per
class and pixel instead of 4, exact to ±0.002. With two classes the background's code is the
complement of the cell's, ``255 − code``, so a pixel's codes sum to 255 as its probabilities
sum to 1. A probability threshold ``t`` on stored codes is exactly the code
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
#: float32 value of each uint8 code (code / 255 rounded once to float32): decoding is a table lookup.
_UINT8_VALUES = (np.arange(256, dtype=np.float64) / UINT8_SCALE).astype(np.float32)


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

    @property
    def description(self) -> str:
        """How the stored values are computed from the probabilities (for output attributes)."""
        if self is ProbabilityEncoding.UINT8:
            return "uint8 codes floor(255 p + 0.5); with two classes class 0's code is 255 - class 1's"
        return self.value

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # not at the top: merge and evaluate read stores without torch

        return getattr(torch, self.value)

    def encode(self, probs: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
        """(C, ...) float32 probabilities in [0, 1] (on any device) -> stored values.

        With ``inplace`` the uint8 encoding scales ``probs`` itself (one pass less, no float copy).
        """
        import torch

        if self is not ProbabilityEncoding.UINT8:
            return probs.to(self.torch_dtype)
        if probs.shape[0] != 2:
            return _scaled(probs, inplace=inplace).to(torch.uint8)  # truncation of a positive value: floor
        codes = torch.empty(probs.shape, dtype=torch.uint8, device=probs.device)
        _two_class_codes(probs[1], out=codes, inplace=inplace)
        return codes

    def encode_margin(self, margin: torch.Tensor, *, out: torch.Tensor) -> None:
        """(...) float32 logit margin d = l1 - l0 of a two-class model (decision offsets included)
        -> the stored values of p0 = sigmoid(-d) and p1 = sigmoid(d), written into the (2, ...)
        ``out`` of this encoding's dtype. ``margin`` is overwritten."""
        import torch

        if self is ProbabilityEncoding.UINT8:
            _two_class_codes(margin.sigmoid_(), out=out, inplace=True)
        elif self is ProbabilityEncoding.FLOAT32:
            torch.sigmoid(margin, out=out[1])
            torch.sigmoid(margin.neg_(), out=out[0])  # not 1 - p1: accurate where p0 is tiny
        else:
            out[1].copy_(torch.sigmoid(margin))
            out[0].copy_(margin.neg_().sigmoid_())

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> float32 probabilities in [0, 1].

        uint8 codes become the float32 nearest to ``code / 255``, so ``p > t`` on the result
        equals :meth:`code_threshold` for every threshold ``t`` (also where ``255 t`` is a
        whole number, e.g. t = 0.2: code 51 is not above it, code 52 is).
        """
        if self is ProbabilityEncoding.UINT8:
            return _UINT8_VALUES[np.asarray(stored, np.uint8)]
        return np.asarray(stored, np.float32)

    def code_threshold(self, threshold: float) -> str:
        """How ``p > threshold`` reads on stored values, e.g. ``code >= 230`` for uint8 and 0.9."""
        if self is ProbabilityEncoding.UINT8:
            return f"code >= {math.floor(UINT8_SCALE * threshold) + 1}"
        return f"value > {threshold}"


def _scaled(probs: torch.Tensor, *, inplace: bool) -> torch.Tensor:
    """0.5 + 255 p in float32, in ``probs`` itself where ``inplace``."""
    import torch

    half = torch.full((), 0.5, dtype=probs.dtype, device=probs.device)
    return torch.add(half, probs, alpha=UINT8_SCALE, out=probs if inplace else None)


def _two_class_codes(p1: torch.Tensor, *, out: torch.Tensor, inplace: bool) -> None:
    """Codes of a two-class pixel into the (2, ...) uint8 ``out``: class 1's floor(255 p1 + 0.5),
    class 0's its complement 255 - code (no pass over class 0's floats)."""
    import torch

    out[1].copy_(_scaled(p1, inplace=inplace))  # truncation of a positive value: floor
    torch.bitwise_not(out[1], out=out[0])  # 255 - code, exactly
