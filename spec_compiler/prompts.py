"""Prompt files in Spec-Bench's question format: one JSON row per line with `turns` (a non-empty list of
strings), optional `question_id` and `category`. Read by the tasks (runtime/tasks.py) and by VocabTrim's
calibration (runtime/vocab_trim.py); pure Python, so neither imports the other.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spec_compiler.errors import ConfigError
from spec_compiler.validate import resolve_path


@dataclass(frozen=True)
class Question:
    question_id: Any
    category: str
    turns: tuple[str, ...]


def read_text(file: str, key: str) -> str:
    """A UTF-8 text file named by config key `key`; a typed error naming the file otherwise."""
    path = resolve_path(file)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(key, f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8", file) from None
    except OSError as e:
        raise ConfigError(key, f"{path}: cannot read ({e.strerror})", file) from None


def read_question_file(file: str, key: str) -> list[Question]:
    """A Spec-Bench question file (one JSON row per line with `turns`); errors name config key `key`."""
    path = resolve_path(file)
    qs = []
    for n, line in enumerate(read_text(file, key).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError("'turns' must be a non-empty list of strings")
            if not all(t.strip() for t in turns):
                raise ValueError("a turn is empty")
            qs.append(Question(row.get("question_id", n), str(row.get("category", "")), tuple(turns)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(key, f"{path}:{n}: not a Spec-Bench question row ({type(e).__name__}: {e})",
                              file) from None
    if not qs:
        raise ConfigError(key, f"{path}: no questions", file)
    return qs
