"""Typed user-facing errors.

Every mistake a user can make (a bad config value, a missing or corrupt checkpoint, a prompt that
does not fit) raises one of these. Each names *where* the problem is (a dotted config key path or a
file) and *why*, so `main.py` can print it in at most two lines without a traceback.
"""
from __future__ import annotations

from typing import Any


class SpecError(ValueError):
    """Base class: a user mistake, reported without a traceback."""

    def __init__(self, where: str, reason: str, value: Any = None):
        self.where = where
        self.reason = reason
        self.value = value
        shown = "" if value is None else f" = {value!r}"
        super().__init__(f"{where}{shown}: {reason}")


class ConfigError(SpecError):
    """A config value violates a rule. `where` is the dotted key path (e.g. `tree.branching`)."""

    @property
    def key_path(self) -> str:
        return self.where


class CheckpointError(SpecError):
    """A checkpoint directory or file is missing, corrupt or unsupported. `where` names the file."""


class InputError(SpecError):
    """A request cannot be served (e.g. the prompt is longer than the context). `where` names it."""
