"""Config values as the schema means them: one-line schema errors, integers as ``int``, every
number finite.

Snakemake's ``validate`` reports a schema violation with the whole schema and the whole
config after it (hundreds of lines; a typo's name is on line 3). :func:`schema_problem`
turns the violation into one line naming the key, the file(s) it came from and the fix,
with a "did you mean" for a misspelt key.

JSON Schema (and so Snakemake's ``validate``) counts ``400.0`` as an integer and lets NaN pass
``minimum``/``maximum`` (every comparison with NaN is false), so a config with
``iterations: 400.0`` or ``w0: .nan`` validates and then fails inside a job, or writes ``NaN``
into a file. :func:`exact_numbers` runs once after validation and settles both, naming the key
(and refuses integers beyond 64 bits, which overflow inside a job).

Every YAML file is read by :func:`load_yaml`, which refuses what PyYAML passes silently: a key
given twice in one section (the first dropped) and aliases that expand to a huge value. Values
echoed in an error line are cut to a few dozen characters (:func:`shown_value`).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import reprlib
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from unet_core.common.errors import ConfigError

if TYPE_CHECKING:
    import jsonschema

#: The largest integer a config key or option takes: every one ends up in a C integer (64-bit)
#: somewhere (torch, numpy), which larger values overflow deep inside a job.
MAX_INT = 2**63 - 1
#: The most CPU threads or worker processes an option takes (the schema's ``maximum`` of
#: train.threads, predict.threads and train.workers): more than any machine has.
MAX_THREADS = 1024


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """The YAML file at ``path``, read the way every config file of this project is read.

    PyYAML (and so Snakemake) keeps the last of two equal keys in one section without a word: a
    second ``train:`` section drops the first. Here a key given twice in one mapping is refused
    (keys brought in by a ``<<: *anchor`` merge may be overridden, as YAML means them).

    Aliases (``*name``) that expand to more than :data:`MAX_YAML_VALUES` values (an alias bomb:
    seven lines of nine aliases each are 336 MB when printed) are refused before anything expands them.

    Raises:
        ConfigError: a key given twice (the line names the file, the line and the key), an alias
            bomb or a recursive alias, or a file that is not YAML.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            loader = _strict_loader()(fh)
            try:
                node = loader.get_single_node()
                if node is None:
                    return None
                if _expanded_size(node, {}) > MAX_YAML_VALUES:
                    raise ConfigError(f"{path}: its aliases (*name) expand to more than {MAX_YAML_VALUES} values "
                                      "(a config has a few hundred); write the values out")
                return loader.construct_document(node)
            finally:
                loader.dispose()
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{path}: not a readable YAML file ({' '.join(str(err).split())[:200]})") from None


#: The most values a YAML file may expand to (config/config.yaml has about 100): a few lines of
#: nested aliases expand to billions, which every check that walks or prints the value expands.
MAX_YAML_VALUES = 100_000


def _expanded_size(node: Any, sizes: dict[int, int]) -> int:
    """How many nodes the YAML ``node`` stands for with every alias expanded (``sizes`` memoises
    nodes that aliases share, so this costs one visit per distinct node)."""
    known = sizes.get(id(node))
    if known is not None:
        if known < 0:
            raise ConfigError(f"{node.start_mark.name} line {node.start_mark.line + 1}: an alias inside "
                              "the value it names (a recursive value)")
        return known
    sizes[id(node)] = -1  # in progress
    children = node.value if isinstance(node.value, list) else []
    total = 1 + sum(_expanded_size(c, sizes) for item in children
                    for c in (item if isinstance(item, tuple) else (item,)))
    sizes[id(node)] = total = min(total, MAX_YAML_VALUES + 1)
    return total


@functools.cache
def _strict_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses duplicate keys in a mapping (see :func:`load_yaml`); its
    libyaml twin where PyYAML has it (parsing in C: 5 ms for the config schema, 25 ms in Python,
    and every snakemake call, a dry run too, reads the schema and the config files)."""
    import yaml

    class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # PyYAML refuses it itself
                if key in seen:
                    mark = key_node.start_mark
                    raise ConfigError(f"{mark.name} line {mark.line + 1}: key {shown_value(key)} appears twice "
                                      "in one section (the first would be dropped without a word); merge them")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


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
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ConfigError(f"config {key} = {value}: too large (at most {MAX_INT}, a 64-bit integer)")
    if isinstance(value, float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"config {key} = {value}: must be a finite number")
        if "integer" in types and "number" not in types:
            if not value.is_integer():
                raise ConfigError(f"config {key} = {value}: must be an integer")
            return _settle(int(value), schema, key)
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


def shown_value(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error line, at most ``limit`` characters: a long text, or a YAML
    alias bomb (a few lines that expand to hundreds of MB), is cut, never expanded whole."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 80


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
    shown = f"{'config' if noun == 'key' else noun} {_key(path)} = {shown_value(error.instance)}"
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
    return f"{shown}: {shown_value(error.message, 160)}"


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
