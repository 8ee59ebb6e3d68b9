"""Exceptions that carry a message meant for the user.

Every user mistake (a bad file, a bad config value, an unusable checkpoint) is raised as
one of these with a one-line message that names the file or key, the problem, and what to
change. ``unet_core.cli`` prints that line and exits with status 2; anything else is a bug.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input data or arguments: a file, an array, a command-line value."""


class ConfigError(UserInputError):
    """A configuration value that cannot be used (names the key)."""


class CheckpointError(UserInputError):
    """A checkpoint or weights file that cannot be trusted or does not fit the model."""
