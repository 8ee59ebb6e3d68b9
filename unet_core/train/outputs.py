"""What a finished training writes: model.pt, model.ts, metrics.csv, curve.png, model_card.json.

Every file is written atomically (a killed run never leaves half a file). model.pt holds the
weights chosen by ``train.export_weights`` (the last ones, or those of the best validation
point) and is byte-identical for a resumed or repeated run on the CPU: wall-clock figures stay
out of it (they go to metrics.csv and the model card only).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_core.common.atomic import atomic_output
from unet_core.common.intensity import Normalisation
from unet_core.common.provenance import sha256_files
from unet_core.common.outputs import CsvMark, FolderMark, JsonMark, PngMark
from unet_core.model.checkpoint import MODEL_MARK, STATE_MARK, TORCHSCRIPT_MARK, save_model, write_torch_file
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet
from unet_core.train.config import ExportWeights, TrainConfig
from unet_core.train.plot import plot_training_curve
from unet_core.train.runtime import Runtime, versions
from unet_core.train.state import STATE_FILE, History

log = logging.getLogger(__name__)

MODEL_FILE, SCRIPT_FILE = "model.pt", "model.ts"
METRICS_FILE, CURVE_FILE, CARD_FILE = "metrics.csv", "curve.png", "model_card.json"
CARD_FORMAT = "unet-pipeline/model-card/1"
METRIC_COLUMNS = (
    "iteration",
    "lr",
    "train_loss",
    "val_loss",
    "val_pixel_error",
    "val_iou",
    "train_seconds",
    "tiles_per_s",
)
# wall-clock columns: kept out of model.pt so a resumed or repeated run writes the same bytes
TIMING_COLUMNS = ("train_seconds", "tiles_per_s")
#: How ``unet train`` recognises its own output folder: it holds only these files, each with
#: its mark (:mod:`unet_core.common.outputs`); anything else there is refused, never replaced.
OUT_DIR_MARK = FolderMark(
    {
        STATE_FILE: STATE_MARK,
        MODEL_FILE: MODEL_MARK,
        SCRIPT_FILE: TORCHSCRIPT_MARK,
        METRICS_FILE: CsvMark(",".join(METRIC_COLUMNS), "a metrics table written by 'unet train'"),
        CURVE_FILE: PngMark("train"),
        CARD_FILE: JsonMark(CARD_FORMAT, "a model card written by 'unet train'"),
    },
    "an output folder of 'unet train' (state.pt, model.pt, model.ts, metrics.csv, curve.png, model_card.json)",
)


@dataclass(frozen=True)
class RunRecord:
    """What the final outputs describe besides the weights: data, validation, decision rule.

    Attributes:
        spec: the architecture.
        config: the training settings.
        runtime: device and precision the run used.
        tile_in, tile_out: training tile sizes, px (input, network output).
        train_tiles: tiles per epoch of the training data.
        data_hash: sha256 identifying the training data.
        data_desc: how the training data was given (sets or on-the-fly stacks).
        validation: ``STACK:WEIGHTS`` of every validation pair.
        val_slices: z indices used from every validation stack (None: all).
        val_tile_out: validation output tile size, px.
        decision: :func:`decision_metadata` of the run.
        normalisation: the grey-value normalisation of every training and validation input.
        median_object_area_px: median area of the training labels' objects, px (None: the
            training sets do not record object areas); seeds and the smallest kept object of
            ``unet merge`` can scale with it (``auto``).
        voxel_size_um: (dz, dy, dx) a 3-D network was trained at, µm (None for 2-D): stored in
            model.pt, so a run on volumes of another voxel size can be refused.
        tile_z: (input, output) z extent of 3-D training tiles, slices (None for 2-D).
        median_object_volume_um3: median volume of the 3-D training objects, µm³ (None: 2-D, or
            not recorded); the 3-D merge's ``auto`` seeds and smallest object can scale with it.
    """

    spec: UNetSpec
    config: TrainConfig
    runtime: Runtime
    tile_in: int
    tile_out: int
    train_tiles: int
    data_hash: str
    data_desc: dict[str, Any]
    validation: list[str]
    val_slices: list[int] | None
    val_tile_out: int
    decision: dict[str, Any]
    normalisation: Normalisation = Normalisation.STACK_ZSCORE
    median_object_area_px: float | None = None
    voxel_size_um: tuple[float, float, float] | None = None
    tile_z: tuple[int, int] | None = None
    median_object_volume_um3: float | None = None


def decision_metadata(mean_weights: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    """How ``unet predict`` turns this model's logits into classes (stored in the model file)."""
    return {
        "rule": "argmax of logits + logit_offsets (weight-prior correction, unet_core/model/decision.py)",
        "mean_weight_per_class": [float(v) for v in mean_weights],
        "logit_offsets": [float(v) for v in offsets],
    }


def write_metrics_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One row per validation point (columns :data:`METRIC_COLUMNS`; empty cell = not measured)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    with atomic_output(path, own=OUT_DIR_MARK.files[METRICS_FILE]) as tmp:
        tmp.write_text(buffer.getvalue())


def export_torchscript(model: UNet, path: Path) -> None:
    """Script a CPU float32 eval-mode copy of ``model`` with its spec as an extra file."""
    clone = UNet(model.spec)
    clone.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    clone.eval()
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the issue asks for it
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(clone)
        extra = {"unet_spec.json": model.spec.fingerprint()}
        write_torch_file(path, scripted, own=TORCHSCRIPT_MARK, torchscript=True, extra_files=extra)


def untimed(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row without its wall-clock columns (what model.pt may hold)."""
    return {k: v for k, v in row.items() if k not in TIMING_COLUMNS}


def exported_model(
    model: UNet, history: History, best: Mapping[str, Any] | None, choice: ExportWeights
) -> tuple[UNet, dict[str, Any]]:
    """The network model.pt gets and a description of its weights (which, iteration, metrics).

    Args:
        model: the network after the last iteration.
        history: the run's metrics; its last row describes the last weights.
        best: ``{"iteration", "model"}`` of the best validation point (None: not tracked).
        choice: ``last`` or ``best`` (``best`` without a tracked best point gives the last weights,
            and the description says ``last``).
    """
    if choice is ExportWeights.BEST and best is not None:
        row = next(r for r in history.rows if r["iteration"] == best["iteration"])
        chosen = UNet(model.spec)
        chosen.load_state_dict(best["model"])
    else:
        choice = ExportWeights.LAST
        row = history.rows[-1] if history.rows else {}
        chosen = model
    return chosen, {"choice": choice.value, "iteration": row.get("iteration"), "metrics": untimed(row)}


def write_final_outputs(
    out_dir: Path,
    *,
    model: UNet,
    best: Mapping[str, Any] | None,
    history: History,
    record: RunRecord,
    iteration: int,
) -> None:
    """model.pt, model.ts, metrics.csv, curve.png and model_card.json of a finished run."""
    export, exported = exported_model(model, history, best, record.config.export_weights)
    final = history.rows[-1] if history.rows else {}
    metadata = {
        "intensity_normalisation": record.normalisation.value,
        "median_object_area_px": record.median_object_area_px,
        "train_config": record.config.to_dict(),
        "iterations": iteration,
        "tile_in": record.tile_in,
        "tile_out": record.tile_out,
        "training_data_sha256": record.data_hash,
        "final_metrics": untimed(final),
        "exported_weights": exported,
        "decision": record.decision,
    }
    if record.spec.dims == 3:  # 2-D model files keep their metadata keys
        metadata.update(voxel_size_um=[float(v) for v in record.voxel_size_um or ()],
                        tile_in_z=record.tile_z[0] if record.tile_z else None,
                        tile_out_z=record.tile_z[1] if record.tile_z else None,
                        median_object_volume_um3=record.median_object_volume_um3)
    save_model(out_dir / MODEL_FILE, export, metadata=metadata)
    export_torchscript(export, out_dir / SCRIPT_FILE)
    write_metrics_csv(out_dir / METRICS_FILE, history.rows)
    plot_training_curve(history.train_log, history.rows, out_dir / CURVE_FILE)
    card = model_card(out_dir, record=record, history=history, iteration=iteration, exported=exported,
                      parameters=sum(p.numel() for p in export.parameters()))
    with atomic_output(out_dir / CARD_FILE, own=OUT_DIR_MARK.files[CARD_FILE]) as tmp:
        tmp.write_text(json.dumps(card, indent=2, default=str) + "\n")
    log.info("wrote %s (%s weights, iteration %s), %s, %s, %s, %s in %s", MODEL_FILE, exported["choice"],
             exported["iteration"], SCRIPT_FILE, METRICS_FILE, CURVE_FILE, CARD_FILE, out_dir)


def model_card(
    out_dir: Path,
    *,
    record: RunRecord,
    history: History,
    iteration: int,
    exported: dict[str, Any],
    parameters: int,
) -> dict[str, Any]:
    """The model card: architecture, geometry, training, data, metrics, exported weights, versions."""
    spec, config = record.spec, record.config
    best = min(
        (r for r in history.rows if r.get("val_pixel_error") is not None),
        key=lambda r: r["val_pixel_error"],
        default=None,
    )
    return {
        "format": CARD_FORMAT,
        "model": spec.to_dict(),
        "parameters": parameters,
        "geometry": {
            "context_px": spec.context,
            "stride_px": spec.stride,
            "min_input_px": spec.min_input_size,
            "train_tile_in_px": record.tile_in,
            "train_tile_out_px": record.tile_out,
            "val_tile_out_px": record.val_tile_out,
            "valid_inputs": f"{spec.min_input_size} + {spec.stride}*k",
        },
        **({"geometry_z": {"context_slices": spec.z_axis.context, "stride_slices": spec.z_axis.stride,
                           "train_tile_in_slices": record.tile_z[0] if record.tile_z else None,
                           "train_tile_out_slices": record.tile_z[1] if record.tile_z else None},
            "voxel_size_um": list(record.voxel_size_um or ()),
            "median_object_volume_um3": record.median_object_volume_um3} if spec.dims == 3 else {}),
        "intensity_normalisation": record.normalisation.value,
        "training_labels": {"median_object_area_px": record.median_object_area_px,
                            "measured_on": "objects of the training slices' instance labels, undeformed"},
        "training": {
            "config": config.to_dict(),
            "iterations_done": iteration,
            "device": record.runtime.description,
            "train_seconds": round(history.train_seconds, 3),
            "determinism": (
                "bit-exact resume (deterministic CPU algorithms)"
                if record.runtime.device.type == "cpu"
                else "data order and RNG exact; CUDA kernels reproducible up to rounding"
            ),
        },
        "data": {
            **record.data_desc,
            "train_tiles": record.train_tiles,
            "train_sha256": record.data_hash,
            "validation": record.validation,
            "val_slices": record.val_slices if record.val_slices is not None else "all",
        },
        "metrics": {"final": history.rows[-1] if history.rows else {}, "best_pixel_error": best,
                    "decision_rule": record.decision["rule"]},
        "exported_weights": {
            **exported,
            "selected_on": "lowest validation pixel error on data.validation / data.val_slices"
            if exported["choice"] == ExportWeights.BEST.value
            else "the weights after the last iteration",
        },
        "decision": record.decision,
        "files": {name: sha256_files([out_dir / name]) for name in (MODEL_FILE, SCRIPT_FILE)},
        "versions": versions(),
    }
