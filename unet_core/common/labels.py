"""Label images: what their integers mean, and pixel adjacency.

Ingest decides a stack's :class:`LabelKind` and stores it; the weights, training targets
and evaluation read it. Connected components everywhere use :func:`connectivity_structure`.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
from scipy import ndimage as ndi


class LabelKind(str, Enum):
    """What the integers of a label stack mean (decided at ingest, stored with the stack)."""

    INSTANCE = "instance"  # 0 = background, every other value one cell
    BINARY = "binary"  # two values: the larger is cell interior, the other background/membrane


#: Ingest's ``--label-kind`` default: decide from the values (two values -> binary, else instance).
AUTO_KIND = "auto"


def connectivity_structure(connectivity: int) -> np.ndarray:
    """scipy.ndimage structuring element of 4- or 8-connectivity in 2-D.

    Raises:
        ValueError: ``connectivity`` is neither 4 nor 8.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    return ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
