"""Exceptions that carry a message meant for the user.

Every user mistake (a bad file, a bad config value, an unusable checkpoint) is raised as
one of these with a one-line message that names the file or key, the problem, and what to
change. ``unet_core.cli`` prints that line and exits with status 2; anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)


class UserInputError(ValueError):
    """Bad input data or arguments: a file, an array, a command-line value."""


class ConfigError(UserInputError):
    """A configuration value that cannot be used (names the key)."""


class CheckpointError(UserInputError):
    """A checkpoint or weights file that cannot be trusted or does not fit the model."""


def check_known_keys(data: Mapping[str, Any], known: Iterable[str], *, section: str) -> None:
    """Raise :class:`ConfigError` naming every key of ``data`` not in ``known`` (config section ``section``)."""
    known = sorted(known)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; known: {known}")


def parse_choice(kind: type[E], value: Any, *, option: str, error: type[UserInputError] = UserInputError) -> E:
    """``kind(value)`` for a closed set of choices, or a one-line error naming ``option`` and the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(k.value) for k in kind)
        raise error(f"{option} {value!r}: use one of {choices}") from None
