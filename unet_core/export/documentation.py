"""The package's documentation (``README.md`` in the zip), from the model file and its model card."""

from __future__ import annotations

import json
from typing import Any

from unet_core import __version__
from unet_core.common.intensity import PERCENTILES, Normalisation
from unet_core.model.spec import UNetSpec

#: What the spec's preprocessing computes for each of our normalisations, and where it differs.
PREPROCESSING_NOTES = {
    Normalisation.SLICE_PERCENTILE: (
        f"`scale_range` over (y, x), percentiles {PERCENTILES[0]:g} / {PERCENTILES[1]:g}: "
        "(x - p_low) / (p_high - p_low + 1e-6) with the image's own percentiles, as unet-pipeline's "
        "`slice-percentile` (which divides without the 1e-6). Differs on a saturated image (equal percentiles: "
        "unet-pipeline divides by max - min instead) and a constant one (unet-pipeline maps it to 0)."),
    Normalisation.SLICE_ZSCORE: (
        "`zero_mean_unit_variance` over (y, x): (x - mean) / (std + 1e-6) with the image's own statistics, as "
        "unet-pipeline's `slice-zscore` (without the 1e-6; a constant image maps to 0 there)."),
    Normalisation.STACK_ZSCORE: (
        "**Inexact by construction.** The model was trained with `stack-zscore`: (x - mean) / std with the "
        "mean and std of the whole stack being predicted, which no spec operation expresses. The package uses "
        "`zero_mean_unit_variance` over (y, x): (x - mean) / (std + 1e-6) with each image's own statistics, "
        "which differ from the stack's where slices (or the parts of a slice given) differ in brightness."),
}


def validation_scores(metadata: dict[str, Any], card: dict[str, Any] | None) -> dict[str, Any] | None:
    """The exported weights' validation scores (``val_*`` of their metrics row), or None: the model
    had no validation data."""
    exported = metadata.get("exported_weights") or (card or {}).get("exported_weights") or {}
    row = exported.get("metrics") or metadata.get("final_metrics") or {}
    scores = {k: v for k, v in row.items() if k.startswith("val_") and v is not None}
    if not scores:
        return None
    return {"weights": exported.get("choice", "last"), "iteration": exported.get("iteration"), **scores}


def _validation_section(metadata: dict[str, Any], card: dict[str, Any] | None) -> list[str]:
    scores = validation_scores(metadata, card)
    lines = ["## Validation", ""]
    if scores is None:
        return [*lines, "This model had no validation data: no validation scores were measured during training.", ""]
    data = (card or {}).get("data", {})
    where = data.get("validation")
    where = ", ".join(map(str, where)) if isinstance(where, list) else where
    lines.append(f"Scores of the exported weights ({scores['weights']}, iteration {scores['iteration']}) on the "
                 f"held-out validation slices{f' of {where}' if where else ''}"
                 f"{', slices ' + str(data['val_slices']) if data.get('val_slices') not in (None, 'all') else ''}, "
                 "predicted with unet-pipeline's overlap-tile engine:")
    lines += ["", "| score | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
              for k, v in scores.items() if k.startswith("val_")]
    return [*lines, ""]


def documentation(name: str, spec: UNetSpec, metadata: dict[str, Any], card: dict[str, Any] | None,
                  mode: Normalisation, geo: Any, crop: Any, agreement: float) -> str:
    """The markdown documentation of the package."""
    offsets = (metadata.get("decision") or {}).get("logit_offsets")
    rule = ("argmax of the logits plus per-class offsets " + json.dumps([round(v, 6) for v in offsets])
            + " (the weight-prior correction of a w(x)-weighted loss), applied inside the network: the output "
              "probabilities are softmax(logits + offsets)") if offsets else "plain softmax of the logits"
    lines = [
        f"# {name}", "",
        "A U-Net (Ronneberger, Fischer, Brox 2015) trained with unet-pipeline "
        f"{__version__} for 2-D segmentation of cells in microscopy images. "
        "Output: per-pixel class probabilities (channels " + ", ".join(
            ["background", "cell"] if spec.n_classes == 2 else [f"class{c}" for c in range(spec.n_classes)]) + ").",
        "", "## Network", "",
        f"- architecture: depth {spec.depth}, {spec.base_channels} base channels, {spec.padding.value} 3x3 "
        f"convolutions, norm {spec.norm.value}, {spec.n_classes} classes (`packaged_unet.py`, standalone)",
        f"- input: sizes {geo.min_size} + {geo.step}*k px per axis (any multiple of {geo.step} px runs); the network mirrors the input by its context "
        f"({geo.pad_before} px before, {geo.pad_after} px after) and returns one value per input pixel",
        f"- halo: {geo.halo} px per side; block-wise prediction "
        + ("equals one whole-image pass (blocks start on multiples of 2**depth)" if geo.exact else
           "approximates a whole-image pass (same-padded network: border effects within the halo)"),
        f"- decision rule: {rule}",
        "", "## Preprocessing", "", PREPROCESSING_NOTES[mode], "",
        f"On the test crop the package's decision (argmax) agrees with `unet predict`'s (which normalises with the "
        f"statistics of the whole slice or stack, as ingest stored them) on {100 * agreement:.2f} % of the pixels.",
        "",
        *_validation_section(metadata, card),
        "## Training", "",
        *_training_lines(metadata, card),
        "", "## Test tensors", "",
        f"A {crop.raw.shape[0]} x {crop.raw.shape[1]} px centre crop of slice {crop.z} of `{crop.path.name}`; the "
        "test output is the packaged network's prediction of it through the preprocessing above (statistics of "
        "the crop itself).",
        "", "## Use", "",
        "Python: `bioimageio.core.predict(model='package.zip', inputs=image, blocksize_parameter=n)`; "
        "Fiji/deepImageJ (TorchScript or ONNX weights), ilastik (PyTorch weights), QuPath (TorchScript). "
        "bioimageio.core 0.11.0's whole-image prediction (no block size) computes the preprocessing's statistics "
        "on the image padded by the halo, its block-wise prediction on the image itself (as here): the two "
        "differ slightly (3e-4 in probability on a test image). With unet-pipeline itself, predict with the "
        "original `model.pt`.", "",
    ]
    return "\n".join(lines)


def _training_lines(metadata: dict[str, Any], card: dict[str, Any] | None) -> list[str]:
    config = metadata.get("train_config") or {}
    if not config and not metadata.get("iterations"):
        return ["No training record in the model file."]
    lines = [f"- iterations: {metadata.get('iterations')}",
             f"- normalisation: {Normalisation.of_metadata(metadata.get('intensity_normalisation')).value}"]
    for key in ("optimizer", "lr", "batch", "loss"):
        if key in config:
            lines.append(f"- {key}: {config[key]}")
    if card and card.get("data"):
        data = card["data"]
        lines.append(f"- training data: {data.get('train_tiles', '?')} tiles, sha256 {str(data.get('train_sha256'))[:16]}")
    return lines
