"""Config values as the schema means them: one-line schema errors, integers as ``int``, every
number finite.

Snakemake's ``validate`` reports a schema violation with the whole schema and the whole
config after it (hundreds of lines; a typo's name is on line 3). :func:`schema_problem`
turns the violation into one line naming the key, the file(s) it came from and the fix,
with a "did you mean" for a misspelt key.

JSON Schema (and so Snakemake's ``validate``) counts ``400.0`` as an integer and lets NaN pass
``minimum``/``maximum`` (every comparison with NaN is false), so a config with
``iterations: 400.0`` or ``w0: .nan`` validates and then fails inside a job, or writes ``NaN``
into a file. :func:`exact_numbers` runs once after validation and settles both, naming the key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from unet_core.common.errors import ConfigError

if TYPE_CHECKING:
    import jsonschema


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


def _key(path: Sequence[Any]) -> str:
    """``train.iterations``, ``ingest.chunks[1]`` or ``(top level)`` for a path into the config."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(top level)"


def _subschema(schema: Mapping[str, Any], path: Sequence[Any]) -> Mapping[str, Any]:
    """The schema of the config section at ``path`` ({} where the schema does not say)."""
    for part in path:
        if isinstance(part, int):
            schema = schema.get("items", {})
        else:
            schema = schema.get("properties", {}).get(part, {})
    return schema


def _kinds(kinds: str | Sequence[str]) -> str:
    """``an integer or null`` for JSON Schema ``type`` names."""
    words = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
             "object": "a section (key: value lines)", "array": "a list", "null": "null"}
    return " or ".join(words.get(k, k) for k in ([kinds] if isinstance(kinds, str) else kinds))


def _describe(error: jsonschema.ValidationError, schema: Mapping[str, Any], noun: str) -> str:
    """One line for one violation: the key (a ``noun``), its value, and what it must be."""
    path, kind, rule = list(error.absolute_path), error.validator, error.validator_value
    if kind == "additionalProperties":
        known = sorted(_subschema(schema, path).get("properties", {}))
        where = f" in {_key(path)}" if path else " at the top level" if noun == "key" else ""
        lines = []
        for name in sorted(set(error.instance) - set(known)):
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known {noun}s: {', '.join(known)}"
            lines.append(f"unknown {noun} {name!r}{where}; {hint}")
        return "; ".join(lines)
    shown = f"{'config' if noun == 'key' else noun} {_key(path)} = {error.instance!r}"
    if kind == "enum":
        choices = (str(v).lower() if isinstance(v, bool) else str(v) for v in rule)  # YAML's true/false
        return f"{shown}: use one of {', '.join(choices)}"
    if kind == "type":
        return f"{shown}: must be {_kinds(rule)}"
    if kind == "pattern" and rule == "^auto$":
        numbers = [k for k in _types(_subschema(schema, path)) if k != "string"]
        return f"{shown}: must be {_kinds(numbers)} or 'auto'"
    if kind in ("minItems", "maxItems"):
        least, most = (_subschema(schema, path).get(k, rule) for k in ("minItems", "maxItems"))
        return f"{shown}: must have {least if least == most else f'{least}-{most}'} items"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if kind in bounds:
        return f"{shown}: must be {bounds[kind]} {rule}"
    described = _subschema(schema, path).get("description")
    if kind == "pattern" and described:
        return f"{shown}: {described}"
    return f"{shown}: {error.message}"


def schema_problem(
    config: Mapping[str, Any], schema: Mapping[str, Any], files: Sequence[str], *, noun: str = "key"
) -> str | None:
    """One line describing why ``config`` does not validate against ``schema``, or None if it does.

    The line names the key (``train.iterations``), the value and the rule; an unknown key gets the
    closest known one (``normalization`` -> ``normalisation``). ``files`` are the config files the
    values came from (``config/config.yaml`` and each ``--configfile``, or a samples table and
    row), named at the start; ``noun`` is what a key is called there (``key``, ``column``).
    Of several violations the most specific one is described (``jsonschema.exceptions.best_match``).
    """
    import jsonschema  # here: the CLI imports this module's constants, and jsonschema takes 60 ms

    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is None:
        return None
    return f"{' + '.join(files) or 'config'}: {_describe(error, schema, noun)}"
