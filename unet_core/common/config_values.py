"""Config numbers as the schema means them: integers as ``int``, every number finite.

JSON Schema (and so Snakemake's ``validate``) counts ``400.0`` as an integer and lets NaN pass
``minimum``/``maximum`` (every comparison with NaN is false), so a config with
``iterations: 400.0`` or ``w0: .nan`` validates and then fails inside a job, or writes ``NaN``
into a file. :func:`exact_numbers` runs once after validation and settles both, naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from unet_core.common.errors import ConfigError


def all_finite(*values: Any) -> bool:
    """Whether every value is a finite number (an int or float; not text, None, a bool or NaN/±Inf):
    the check for numbers read from files (model metadata, store attributes)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _types(schema: Mapping[str, Any]) -> set[str]:
    kind = schema.get("type", ())
    return {kind} if isinstance(kind, str) else set(kind)


def _settle(value: Any, schema: Mapping[str, Any], key: str) -> Any:
    """``value`` with integral floats of integer keys made ``int``; raises for non-finite numbers."""
    types = _types(schema)
    if isinstance(value, float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"config {key} = {value}: must be a finite number")
        if "integer" in types and "number" not in types:
            if not value.is_integer():
                raise ConfigError(f"config {key} = {value}: must be an integer")
            return int(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in list(value):
            value[name] = _settle(value[name], props.get(name, {}), f"{key}.{name}" if key else name)
    elif isinstance(value, list):
        items = schema.get("items", {})
        value[:] = [_settle(v, items, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def exact_numbers(config: dict[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Settle the numbers of a validated ``config`` in place (see the module docstring).

    Integer keys given as integral floats (``400.0``) become ``int`` exactly once, here.

    Returns:
        ``config``.

    Raises:
        ConfigError: NaN or ±Inf anywhere, or a non-integral value for an integer key; the
            message names the key (e.g. ``config weights.w0 = nan: must be a finite number``).
    """
    return _settle(config, schema, "")
