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


def read_question_file(file: str, key: str) -> list[Question]:
    """A Spec-Bench question file (one JSON row per line with `turns`); errors name config key `key`."""
    path = resolve_path(file)
    qs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError("'turns' must be a non-empty list of strings")
            qs.append(Question(row.get("question_id", n), str(row.get("category", "")), tuple(turns)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(key, f"{path}:{n}: not a Spec-Bench question row ({e})") from None
    if not qs:
        raise ConfigError(key, f"{path}: no questions", file)
    return qs
