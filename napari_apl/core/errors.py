"""Exceptions with one-line, actionable messages shared by the core, the CLI and the viewer."""

from __future__ import annotations


class APLError(ValueError):
    """Base class for every user-facing error: its message is one line that says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class VolumeError(APLError):
    """An image or label volume cannot be read or is not usable."""


class CheckpointError(APLError):
    """A checkpoint cannot be read, is unsafe, or does not match what is expected."""


class OutputError(APLError):
    """An output cannot be written (missing folder, no permission, disk full, same as input)."""


class OutputExistsError(OutputError):
    """An output exists already and overwriting it was not asked for."""
