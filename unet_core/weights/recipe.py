"""The parameters of w(x), and the recipe that turns instance labels into classes and w(x).

:class:`WeightParams` (in :mod:`unet_core.weights.maps`, whose kernels take it whole) holds what the ``weights`` stage is asked for (w0, sigma, truncation,
connectivity, which pixels get the border term, the d1/d2 algorithm). A :class:`WeightRecipe`
adds what the stage measured or decided (the class weights w_c, whether touching instances
are separated) and is stored in the weights store's attributes, so augmentation recomputes
w(x) for deformed labels exactly as the weights stage computed it for the originals.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from unet_core.common.errors import UserInputError, parse_choice
from unet_core.weights.maps import WeightParams, class_map, weight_map

__all__ = ["WeightParams", "WeightRecipe"]  # WeightParams lives with the kernels that take it


@dataclass(frozen=True)
class WeightRecipe:
    """How instance labels become classes and w(x): the parameters plus what the stage decided.

    Attributes:
        params: w0, sigma, tolerance, border pixels, method.
        class_weights: (w_background, w_cell) class-balancing weights.
        separate_touching: whether a 1-px separation line is cut between touching instances.
    """

    params: WeightParams
    class_weights: tuple[float, float]
    separate_touching: bool

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], *, where: str) -> WeightRecipe:
        """Read the recipe from a weights store's ``attrs["unet"]``.

        Raises:
            UserInputError: a key is missing (names the store and the key).
        """
        try:
            cw = attrs["class_weights"]
            params = WeightParams(
                w0=float(attrs["w0"]), sigma_px=float(attrs["sigma_px"]),
                tolerance=float(attrs.get("tolerance", WeightParams.tolerance)),
                border_pixels=str(attrs.get("border_pixels", WeightParams.border_pixels.value)),
                method=str(attrs.get("method", WeightParams.method.value)),
            )
            return cls(params, (float(cw[0]), float(cw[1])), bool(attrs["separate_touching"]))
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise UserInputError(
                f"{where}: attrs['unet'] lacks a usable {err} entry; regenerate it with 'unet weights'"
            ) from None

    def apply(self, instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Y, X) int32 instances -> classes (Y, X) uint8 and w(x) (Y, X) float32.

        Touching instances (also where a deformation's nearest-neighbour sampling dropped the
        1-px separation line) are separated by :func:`unet_core.weights.maps.class_map`.
        """
        classes = class_map(instances, separate_touching=self.separate_touching)
        weights = weight_map(instances, classes, class_weights=self.class_weights, params=self.params)
        return classes.astype(np.uint8, copy=False), weights.astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        p = self.params
        return {"class_weights": list(self.class_weights), "w0": p.w0, "sigma_px": p.sigma_px,
                "separate_touching": self.separate_touching, "tolerance": p.tolerance,
                "border_pixels": p.border_pixels.value}
