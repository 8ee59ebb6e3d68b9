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
from unet_core.weights.maps import (
    VolumeWeightParams, WeightParams, check_spacing, class_map, class_map_3d, weight_map, weight_map_3d,
)

__all__ = ["VolumeWeightRecipe", "WeightParams", "WeightRecipe"]  # WeightParams lives with the kernels that take it


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
            UserInputError: a key is missing (names the store and the key), or the store is a
                volume's (``dims`` 3, :class:`VolumeWeightRecipe`).
        """
        if attrs.get("dims", 2) != 2:
            raise UserInputError(f"{where}: a 3-D weights store ('unet weights --dims 3', sigma in µm); the "
                                 "slice recipe (sigma in px) is needed here: make the weights without --dims 3")
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


@dataclass(frozen=True)
class VolumeWeightRecipe:
    """How (Z, Y, X) instance labels become classes and w(x) in the 3-D mode (``unet weights --dims 3``).

    The volume counterpart of :class:`WeightRecipe`, stored in a 3-D weights store's attributes
    (``dims: 3``), so a deformed training volume gets its w(x) recomputed exactly as the weights
    stage computed it: separation surfaces at face contacts (6-connectivity,
    :func:`unet_core.weights.maps.class_map_3d`), d1, d2 in µm with the stack's voxel size.

    Attributes:
        params: sigma_um, w0, tolerance, border voxels, d1/d2 method.
        class_weights: (w_background, w_cell) class-balancing weights.
        spacing_um: voxel size (dz, dy, dx) of the stack the weights were made for, µm.
        separate_touching: whether touching instances are cut apart (instance labels: True).
    """

    params: VolumeWeightParams
    class_weights: tuple[float, float]
    spacing_um: tuple[float, float, float]
    separate_touching: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_um", check_spacing(self.spacing_um))

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], *, where: str) -> VolumeWeightRecipe:
        """Read the recipe from a 3-D weights store's ``attrs["unet"]``.

        Raises:
            UserInputError: a 2-D store, or a key missing (names the store and the key).
        """
        if attrs.get("dims") != 3:
            raise UserInputError(f"{where}: a 2-D weights store (no dims 3 in attrs['unet']); make it with "
                                 "'unet weights --dims 3'")
        try:
            cw = attrs["class_weights"]
            params = VolumeWeightParams(
                sigma_um=float(attrs["sigma_um"]), w0=float(attrs["w0"]), tolerance=float(attrs["tolerance"]),
                border_pixels=str(attrs["border_pixels"]), method=str(attrs["method"]),
            )
            return cls(params, (float(cw[0]), float(cw[1])), tuple(float(s) for s in attrs["spacing_um"]),
                       bool(attrs["separate_touching"]))
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise UserInputError(
                f"{where}: attrs['unet'] lacks a usable {err} entry; regenerate it with 'unet weights --dims 3'"
            ) from None

    def apply(self, instances3d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Z, Y, X) integer instances -> classes (Z, Y, X) uint8 and w(x) (Z, Y, X) float32."""
        classes = class_map_3d(instances3d, separate_touching=self.separate_touching)
        weights = weight_map_3d(instances3d, classes, class_weights=self.class_weights, params=self.params,
                                spacing_um=self.spacing_um)
        return classes, weights.astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, Any]:
        return {"dims": 3, "class_weights": list(self.class_weights), **self.params.to_dict(),
                "spacing_um": list(self.spacing_um), "separate_touching": self.separate_touching}
