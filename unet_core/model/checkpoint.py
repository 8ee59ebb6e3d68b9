"""Trained-model files: the architecture, the weights and how to normalise inputs.

A model file is a plain ``torch.save`` of a dict holding only tensors, numbers, strings,
lists and dicts, so it loads with ``torch.load(weights_only=True)``: no arbitrary object is
ever unpickled (a crafted pickle is rejected). The architecture (:class:`UNetSpec`) is
stored inside, so ``unet predict`` needs no repeated model flags.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from unet_core.common.atomic import atomic_output
from unet_core.common.config_values import all_finite
from unet_core.common.errors import CheckpointError
from unet_core.common.intensity import Normalisation
from unet_core.common.outputs import Mark, ZipMark, torch_file_mark
from unet_core.model.spec import UNetSpec
from unet_core.model.unet import UNet

FORMAT = "unet-pipeline/model/1"
STATE_FORMAT = "unet-pipeline/train-state/1"  # unet_core.train.loop's resumable state.pt
#: Marks by which a stage recognises its own model files (:mod:`unet_core.common.outputs`).
MODEL_MARK = torch_file_mark(FORMAT, "a model file written by 'unet train' (format key unet-pipeline/model/1)")
STATE_MARK = torch_file_mark(STATE_FORMAT, "a training state written by 'unet train'")
TORCHSCRIPT_MARK = ZipMark("extra/unet_spec.json", "a TorchScript export written by 'unet train'")


def write_torch_file(path: str | os.PathLike[str], obj: Any, *, own: Mark, torchscript: bool = False,
                     extra_files: dict[str, str] | None = None) -> None:
    """``torch.save`` (or ``torch.jit.save`` when ``torchscript``) of ``obj`` atomically to ``path``.

    Serialises in memory first, then writes the bytes with plain Python I/O: torch's own file
    writer reports a full disk as an opaque ``RuntimeError``, Python raises ``OSError`` with
    ``errno.ENOSPC``, which the CLI turns into one line ("no space left on device"). An
    existing file at ``path`` is replaced only if it carries the mark ``own``.
    """
    buffer = io.BytesIO()
    if torchscript:
        torch.jit.save(obj, buffer, _extra_files=extra_files or {})
    else:
        torch.save(obj, buffer)
    with atomic_output(path, own=own) as tmp, open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())


def save_model(path: str | os.PathLike[str], model: UNet, *, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` (spec + float32 CPU state dict + metadata) atomically to ``path``."""
    payload = {
        "format": FORMAT,
        "spec": model.spec.to_dict(),
        "state_dict": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                       for k, v in model.state_dict().items()},
        "metadata": metadata or {},
    }
    write_torch_file(path, payload, own=MODEL_MARK)


#: How files that are not PyTorch files begin (the usual mix-ups), for the refusal's wording.
_FOREIGN_MAGIC = {b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image", b"II+\x00": "a BigTIFF image",
                  b"MM\x00+": "a BigTIFF image", b"\x89PNG": "a PNG image", b"\x89HDF": "an HDF5 file",
                  b"{": "a JSON file"}


def _check_torch_magic(path: Path, head: bytes | None = None) -> None:
    """Raise unless ``path`` (whose first bytes are ``head`` where already read) begins like a file
    ``torch.save`` writes: a zip archive (``PK``), or a
    pickle (``\\x80``, the format before PyTorch 1.6). torch.load reads any other file as a pickle,
    whose first byte then fails as an "unsafe" object: a TIFF given for the model was refused as
    untrusted code rather than as what it is."""
    if head is None:
        with open(path, "rb") as fh:
            head = fh.read(4)
    head = head[:4]
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return
    kind = next((what for magic, what in _FOREIGN_MAGIC.items() if head.startswith(magic)),
                "empty" if not head else "not a PyTorch file")
    raise CheckpointError(f"{path}: not a model file ({kind}); give a file written by 'unet train'")


def safe_load(path: str | os.PathLike[str], *, digest: Any = None) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors for unusable files.

    ``digest`` (a ``hashlib`` object, e.g. ``hashlib.sha256()``): the file's bytes are read once,
    fed to it and loaded from memory, so the hash is of exactly the bytes loaded (no second read,
    no file replaced between hashing and loading).

    Raises:
        CheckpointError: missing, truncated, not a torch file, or holding arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model/checkpoint file")
    content = None
    if digest is not None:
        try:
            content = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path}: not readable ({err.strerror or err})") from err
        digest.update(content)
    _check_torch_magic(path, content)
    return load_plain_data(path if content is None else io.BytesIO(content), where=path)


def load_plain_data(source: Path | io.BytesIO, *, where: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of ``source`` (a file, or bytes read already: a member of a
    bioimage.io package), with one-line errors naming ``where``.

    Raises:
        CheckpointError: not a readable PyTorch file, holding arbitrary objects, or not a dictionary.
    """
    path = where
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data "
            f"({first[:160]}); only load files you trust"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupted or truncated?)") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a unet-pipeline file (top level is {type(data).__name__})")
    return data


ModelExpectation = UNetSpec | Mapping[str, Any] | None
"""What a caller asks of a model file's architecture: a whole :class:`UNetSpec`, some of its
keys (e.g. only those a config or the command line names), or nothing."""


def check_architecture(spec: UNetSpec, expect: ModelExpectation, *, path: str | os.PathLike[str]) -> None:
    """Raise when ``spec`` (read from ``path``) differs from ``expect`` in any key ``expect`` names.

    Raises:
        CheckpointError: a differing key (all of them named, file value vs expected value), or
            a key that is not an architecture key.
    """
    if expect is None:
        return
    want = expect.to_dict() if isinstance(expect, UNetSpec) else dict(expect)
    # a 2-D model's description leaves out dims (the files before the 3-D mode): name it, so a
    # 3-D config given a 2-D file (or the reverse) is told so
    have = {"dims": spec.dims, "pool_z": spec.pool_z, "kernel_z": spec.kernel_z, **spec.to_dict()}
    for key in ("pool_z", "kernel_z"):
        if isinstance(want.get(key), tuple):
            want[key] = list(want[key])
    unknown = sorted(set(want) - set(have))
    if unknown:
        raise CheckpointError(f"{path}: unknown architecture key(s) {unknown}; known: {sorted(have)}")
    diff = {k: (have[k], v) for k, v in want.items() if have[k] != getattr(v, "value", v)}
    if diff:
        detail = ", ".join(f"{k}: file {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: model does not match the config's model section ({detail})")


def check_weights(spec: UNetSpec, state: Any, *, path: str | os.PathLike[str]) -> None:
    """Raise unless ``state`` holds finite weights of exactly the shapes of ``spec``'s network.

    The shapes are compared with a network built on the meta device (no memory), so a file
    whose architecture would not fit in memory (a crafted or damaged one) is refused before
    anything is allocated; weights the file really holds are already in memory.

    Raises:
        CheckpointError: no tensor dictionary, a missing, extra or differently shaped tensor, or
            NaN/Inf values (the file is damaged, or not a finished run's).
    """
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: weights do not fit the stored architecture "
                              "(no dictionary of tensors)")
    if spec.depth > len(state):  # every level holds weights: bounds the network built below
        raise CheckpointError(f"{path}: weights do not fit the stored architecture (depth {spec.depth} "
                              f"needs more than the {len(state)} tensors stored)")
    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in UNet(spec).state_dict().items()}
    except RuntimeError as err:  # sizes beyond what any tensor can hold
        raise CheckpointError(f"{path}: weights do not fit the stored architecture "
                              f"({str(err).splitlines()[0][:160]})") from err
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        differ = set(want) ^ set(have) or {k for k in want if want[k] != have[k]}
        key = min(differ)
        raise CheckpointError(f"{path}: weights do not fit the stored architecture ({key}: stored "
                              f"{have.get(key, 'nothing')}, architecture {want.get(key, 'nothing')})")
    # the extremes are NaN where any value is (reductions propagate NaN) and ±Inf where one is: one
    # pass over the flattened tensor (torch.isfinite(v).all() took 0.65-0.85 CPU-s for the paper
    # net's 31 M weights on a 2-core VM, this 0.15 as the first pass over them, 0.004 after)
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel()
                 and not all(math.isfinite(float(x)) for x in torch.aminmax(v.detach().reshape(-1).float())))
    if bad:
        raise CheckpointError(f"{path}: weights {bad[0]} hold NaN or Inf values; the file is damaged or "
                              "from a diverged run")


def checked_metadata(metadata: Any, spec: UNetSpec, *, path: str | os.PathLike[str]) -> dict[str, Any]:
    """A model file's metadata (None: an empty dict), with the values prediction uses checked:
    the normalisation, the decision's logit offsets (one finite number per class) and the median
    object area (a finite number > 0).

    Raises:
        CheckpointError: a value that is not what 'unet train' writes (names the key).
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{path}: model metadata is a {type(metadata).__name__}, not a dictionary; "
                              "the file is damaged or not written by 'unet train'")

    def refuse(key: str, value: Any, problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: metadata {key} = {repr(value)[:80]}: {problem}; the file is damaged "
                               "or not written by 'unet train'")

    norm = metadata.get("intensity_normalisation")
    try:
        Normalisation.of_metadata(norm)
    except (ValueError, TypeError):
        raise refuse("intensity_normalisation", norm, "not a normalisation") from None
    decision = metadata.get("decision")
    if decision is not None and not isinstance(decision, Mapping):
        raise refuse("decision", decision, "not a dictionary")
    offsets = (decision or {}).get("logit_offsets")
    if offsets is not None and not (isinstance(offsets, (list, tuple)) and len(offsets) == spec.n_classes
                                    and all_finite(*offsets)):
        raise refuse("decision.logit_offsets", offsets,
                     f"must be {spec.n_classes} finite numbers, one per class")
    area = metadata.get("median_object_area_px")
    if area is not None and not (all_finite(area) and area > 0):
        raise refuse("median_object_area_px", area, "must be a finite number > 0")
    return dict(metadata)


def load_model(path: str | os.PathLike[str], *, expect: ModelExpectation = None,
               digest: Any = None) -> tuple[UNet, dict[str, Any]]:
    """Load a model written by :func:`save_model` (also accepts a training checkpoint).

    The architecture comes from the file; ``expect`` only checks it. The network is built on the
    meta device and takes the file's tensors as its weights (no initialisation that they would
    overwrite, no second copy).

    Args:
        path: model file.
        expect: the architecture (or some of its keys) the caller's config asks for; a
            mismatch is an error naming the differing keys.
        digest: a ``hashlib`` object fed the file's bytes as they are read for loading (see
            :func:`safe_load`): the hash of the very bytes the model came from, in one read.

    Returns:
        The model in eval mode on the CPU, and its metadata dict.

    Raises:
        CheckpointError: unreadable file, wrong format, or an architecture mismatch.
    """
    data = safe_load(path, digest=digest)
    if data.get("format") not in (FORMAT, STATE_FORMAT) or "spec" not in data:
        raise CheckpointError(f"{path}: not a unet-pipeline model file (format {data.get('format')!r})")
    try:
        spec = UNetSpec.from_dict(data["spec"])
    except ValueError as err:
        raise CheckpointError(f"{path}: invalid architecture in file: {err}") from err
    check_architecture(spec, expect, path=path)
    model = model_from_state(spec, data.get("state_dict") or data.get("model"), path=path)
    return model, checked_metadata(data.get("metadata"), spec, path=path)


def model_from_state(spec: UNetSpec, state: Any, *, path: str | os.PathLike[str]) -> UNet:
    """The network of ``spec`` holding the tensors of ``state`` (checked by :func:`check_weights`),
    in eval mode on the CPU: built on the meta device, no initialisation the weights would overwrite.

    Raises:
        CheckpointError: weights that do not fit ``spec`` or are not finite (names ``path``).
    """
    check_weights(spec, state, path=path)
    with torch.device("meta"):
        model = UNet(spec)
    want = model.state_dict()
    # the module's dtype and a dense layout, as copying into an initialised network gave them
    state = {k: v.to(want[k].dtype).contiguous() for k, v in state.items()}
    try:
        model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise RuntimeError("a weight of the network is not in the file")
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: weights do not fit the stored architecture ({str(err).splitlines()[0]})") from err
    return model.eval()
