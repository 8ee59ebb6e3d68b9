"""What ``unet merge`` is asked to do: one :class:`MergeSettings`, passed whole.

The instance method, the smallest kept object, the watershed's seed rule and numbers, what the TIFF
holds and how many parallel pieces the merge runs as. Each value is checked once, here, where it
enters (the CLI builds the object from its options, the workflow passes the config's values to the
CLI); the merge's rounds take the object as it is. ``auto`` values that depend on the model that
predicted the parts are replaced by :meth:`MergeSettings.resolved` before any work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

from unet_core.common.errors import UserInputError, parse_choice
from unet_core.infer.instances import (
    AUTO,
    MASK_THRESHOLD,
    SEED_EROSION_PX,
    SEED_THRESHOLD,
    WATERSHED_HALO_PX,
    InstanceMethod,
    SeedRule,
    auto_h_px,
    auto_min_object_px,
)

SEGMENTATION_RULE = "segmentation = argmax of the class probabilities (ties -> lower class index)"
INSTANCE_RULES = {
    (InstanceMethod.WATERSHED, SeedRule.THRESHOLD): (
        "instances = seeded watershed of P(class 1) per slice (seeds: P > {seed_threshold} eroded by "
        "{seed_erosion_px} px; mask: P > {mask_threshold}; block-wise with a {halo_px} px halo)"
    ),
    (InstanceMethod.WATERSHED, SeedRule.DISTANCE): (
        "instances = seeded watershed of the distance transform of the mask P(class 1) > {mask_threshold} "
        "per slice (seeds: its h-maxima of depth h = {h_px:.3f} px after Gaussian smoothing; flooding in order "
        "of "
        "decreasing distance; block-wise with a {halo_px} px halo)"
    ),
    InstanceMethod.COMPONENTS: (
        "instances = 4-connected components of class 1 (cell interior) per slice, merged across block borders"
    ),
}
#: The 3-D cells of a 3-D network's parts (``unet merge`` of 3-D part stores).
VOLUME_INSTANCE_RULES = {
    InstanceMethod.COMPONENTS: (
        "instances = 6-connected components of class 1 (cell interior) in the volume (3-D cells), merged "
        "across block faces in z, y and x"
    ),
    (InstanceMethod.WATERSHED, SeedRule.THRESHOLD): (
        "instances = seeded watershed of P(class 1) in the volume (3-D cells, 6-connected; seeds: P > "
        "{seed_threshold} eroded by {seed_erosion_px} px in-plane and as deep in µm along z; mask: P > "
        "{mask_threshold}; block-wise with a {halo_px} px halo, as deep in µm along z)"
    ),
    (InstanceMethod.WATERSHED, SeedRule.DISTANCE): (
        "instances = seeded watershed of the anisotropic distance transform (µm) of the mask P(class 1) > "
        "{mask_threshold} in the volume (3-D cells, 6-connected; seeds: its h-maxima of depth h = {h_um:.3f} µm "
        "after Gaussian smoothing; flooding in order of decreasing distance; block-wise with a {halo_px} px "
        "halo, as deep in µm along z)"
    ),
}


class TiffContent(str, Enum):
    """What ``unet merge --tiff`` exports."""

    SEGMENTATION = "segmentation"  # uint8 argmax class
    INSTANCES = "instances"  # uint32 instance ids
    CELL_PROBABILITY = "cell-probability"  # float32 P(cell)


@dataclass(frozen=True)
class WatershedSettings:
    """Seed rule, seeds, mask and block halo of the seeded watershed (see :mod:`unet_core.infer.instances`).

    Attributes:
        seed_threshold: threshold seeds are P(cell) above this...
        seed_erosion_px: ...eroded this many px (4-neighbourhood).
        mask_threshold: pixels with P(cell) above this are cell.
        halo_px: context around each block, px: the block-wise result equals the whole slice's for
            cells smaller than it.
        seeds: ``threshold`` (P > ``seed_threshold`` eroded by ``seed_erosion_px``) or
            ``distance`` (h-maxima of depth ``h_px`` of the mask's smoothed distance transform).
        h_px: depth of the distance seeds, px, or ``"auto"`` (0.15 x the median object radius of
            the model's training labels, resolved by :meth:`resolved`).
        h_um: depth of the distance seeds of 3-D cells, µm (None: not given; 3-D parts with
            distance seeds need it).
    """

    seed_threshold: float = SEED_THRESHOLD
    seed_erosion_px: int = SEED_EROSION_PX
    mask_threshold: float = MASK_THRESHOLD
    halo_px: int = WATERSHED_HALO_PX
    seeds: SeedRule = SeedRule.THRESHOLD
    h_px: float | str = AUTO
    h_um: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", parse_choice(SeedRule, self.seeds, option="--seeds"))
        if not 0.0 <= self.seed_threshold < 1.0 or self.seed_erosion_px < 0 or self.halo_px < 0:
            raise UserInputError(
                f"watershed settings: need 0 <= seed threshold < 1 and erosion, halo >= 0 px "
                f"(got {self.seed_threshold}, {self.seed_erosion_px}, {self.halo_px})"
            )
        if self.h_px != AUTO and not (isinstance(self.h_px, int | float) and 0 < self.h_px < float("inf")):
            raise UserInputError(f"--seed-h-px {self.h_px!r}: must be a number of px > 0 or 'auto'")
        if self.h_um is not None and not (
            isinstance(self.h_um, int | float) and not isinstance(self.h_um, bool) and 0 < self.h_um < float("inf")
        ):
            raise UserInputError(f"--seed-h-um {self.h_um!r}: must be a number of µm > 0")

    @property
    def margin_px(self) -> int:
        """Context a block's seeds need, px: the halo for distance seeds (their h-maxima look that
        far), the erosion for threshold seeds (exact at any block size)."""
        return self.halo_px if self.seeds is SeedRule.DISTANCE else self.seed_erosion_px

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``h_um`` only where given (the records of 2-D merges stay as they were)."""
        d = {**asdict(self), "seeds": self.seeds.value}
        if self.h_um is None:
            del d["h_um"]
        return d


@dataclass(frozen=True)
class MergeSettings:
    """Everything ``unet merge`` decides besides its inputs and outputs.

    Attributes:
        instances: ``components`` (4-connected components of the argmax cell class) or
            ``watershed`` (a seeded watershed of P(cell), :attr:`watershed`).
        min_object_px: instances of fewer pixels (after merging across blocks) become background,
            or ``"auto"``: 5 % of the median object area of the model's training labels.
        watershed: the watershed's settings (used with ``instances: watershed``).
        tiff_content: what ``--tiff`` exports.
        jobs: parallel pieces K; every pass over pixels runs as K pieces, each a disjoint
            contiguous run of blocks. The output is byte-identical for any K.
    """

    instances: InstanceMethod = InstanceMethod.COMPONENTS
    min_object_px: int | str = 0
    watershed: WatershedSettings = field(default_factory=WatershedSettings)
    tiff_content: TiffContent = TiffContent.SEGMENTATION
    jobs: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "instances", parse_choice(InstanceMethod, self.instances, option="--instances")
        )
        object.__setattr__(
            self, "tiff_content", parse_choice(TiffContent, self.tiff_content, option="--tiff-content")
        )
        mop = self.min_object_px
        if mop != AUTO and (isinstance(mop, bool) or not isinstance(mop, int) or mop < 0):
            raise UserInputError(f"--min-object-px {mop!r}: must be an integer >= 0 or 'auto'")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise UserInputError(f"--jobs must be a positive integer, got {self.jobs!r}")

    @property
    def watershed_rule(self) -> WatershedSettings | None:
        """The watershed settings where cells are made by the watershed, else None."""
        return self.watershed if self.instances is InstanceMethod.WATERSHED else None

    def resolved(self, median_area_px: float | None, *, where: str, volumes: bool = False) -> MergeSettings:
        """The settings with every ``auto`` replaced by its number (from the model's median
        training object area, which predict copies into the part stores); ``volumes``: 3-D
        cells, whose distance seeds take ``h_um`` (``h_px`` is left as it is).

        Raises:
            UserInputError: ``auto`` where the model stores no median area (names ``where``).
        """
        out = self
        if self.min_object_px == AUTO:
            out = replace(
                out, min_object_px=auto_min_object_px(_need_area(median_area_px, "--min-object-px", where))
            )
        ws = self.watershed
        if (
            self.instances is InstanceMethod.WATERSHED
            and ws.seeds is SeedRule.DISTANCE
            and ws.h_px == AUTO
            and not volumes
        ):
            ws = replace(ws, h_px=auto_h_px(_need_area(median_area_px, "--seed-h-px", where)))
            out = replace(out, watershed=ws)
        return out

    def rule_text(self, *, volumes: bool = False) -> str:
        """The sentence that says how a prediction's segmentation and cells were made (stored in
        its attributes); ``volumes``: 3-D cells of a 3-D network's parts."""
        if volumes and self.instances is InstanceMethod.COMPONENTS:
            cells = VOLUME_INSTANCE_RULES[self.instances]
        elif volumes:
            cells = VOLUME_INSTANCE_RULES[(self.instances, self.watershed.seeds)].format(**asdict(self.watershed))
        elif self.instances is InstanceMethod.COMPONENTS:
            cells = INSTANCE_RULES[self.instances]
        else:
            cells = INSTANCE_RULES[(self.instances, self.watershed.seeds)].format(**asdict(self.watershed))
        return f"{SEGMENTATION_RULE}; {cells}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the work folder's manifest; equal settings give equal dicts)."""
        return {
            "instances": self.instances.value,
            "min_object_px": self.min_object_px,
            "watershed": self.watershed.to_dict(),
            "tiff_content": self.tiff_content.value,
            "jobs": self.jobs,
        }


def _need_area(median_area_px: float | None, option: str, where: str) -> float:
    """The model's median object area, or a one-line error for ``option auto`` without one."""
    if median_area_px is None:
        raise UserInputError(
            f"{where}: {option} auto scales with the median object area of the model's training labels, but "
            "the model that predicted these parts does not store one (trained before it was measured); "
            f"give {option} a number or retrain the model"
        )
    return float(median_area_px)
