"""The training corpus: the Python standard library's own `.py` sources, split into train and held-out by file.

Present wherever Python is (PSF license), so nothing is downloaded. Excluded: the test suites (`test/`,
`tests/`, which also covers `lib2to3/tests`), `idlelib/`, `site-packages/`, `__pycache__/` and files that
are not valid UTF-8; on CPython 3.11.7 that leaves 674 files, 11.4 MB (BENCHMARKS.md §3).

The split is by file and depends on the path alone: a file is held out iff
`int(sha256(relpath).hexdigest(), 16) % 10_000 < heldout_fraction * 10_000`, so adding or editing one
file never moves another between the halves. Different Python versions ship different sources; every
cached artifact is keyed by `Corpus.content_hash`, never by the word "stdlib".
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

EOT = "<|endoftext|>"
"""Separator between documents in the training stream (and the models' end-of-sequence token)."""

EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
"""A file is skipped when any directory on its relative path has one of these names."""

SPLIT_BUCKETS = 10_000


@dataclass(frozen=True)
class Corpus:
    root: Path
    """Directory the relative paths start from."""
    train: tuple[str, ...]
    """Relative paths ('/'-separated) of the training files, sorted."""
    heldout: tuple[str, ...]
    """Relative paths of the held-out files, sorted; disjoint from `train`."""
    content_hash: str
    """sha256 hex over the sorted (relpath, split, bytes) of every used file, plus `sys.version`."""

    def text(self, relpath: str) -> str:
        """The exact contents of one file (no newline translation)."""
        return (self.root / relpath).read_bytes().decode("utf-8")

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted(self.train + self.heldout))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str, heldout_fraction: float) -> bool:
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % SPLIT_BUCKETS
    return bucket < heldout_fraction * SPLIT_BUCKETS


def source_files(root: Path) -> list[str]:
    """Relative paths of the usable `.py` files under `root`, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                path.read_bytes().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.append(path.relative_to(root).as_posix())
    return sorted(out)


def _subset(files: list[str], max_files: int) -> list[str]:
    """`max_files` of `files` spread over the whole tree (ordered by a salted path hash, then re-sorted).

    The salt keeps the choice independent of the split hash, so a subset has held-out files in proportion.
    """
    key = lambda rel: hashlib.sha256(b"subset:" + rel.encode()).hexdigest()  # noqa: E731
    return sorted(sorted(files, key=key)[:max_files])


def build_corpus(heldout_fraction: float = 0.05, root: Optional[Path] = None,
                 max_files: Optional[int] = None) -> Corpus:
    """The standard library corpus (or the `.py` files under `root`), split by file.

    `max_files` keeps a deterministic, spread-out subset (smoke runs and tests); None keeps every file.
    """
    assert 0.0 <= heldout_fraction < 1.0, heldout_fraction
    root = Path(root) if root is not None else stdlib_root()
    files = source_files(root)
    if max_files is not None:
        files = _subset(files, max_files)
    train, heldout = [], []
    h = hashlib.sha256()
    for rel in files:
        held = is_heldout(rel, heldout_fraction)
        (heldout if held else train).append(rel)
        data = (root / rel).read_bytes()
        # Length-prefixed fields, so no two different file lists hash alike.
        for field in (rel.encode(), b"heldout" if held else b"train", data):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
    h.update(sys.version.encode())
    return Corpus(root=root, train=tuple(train), heldout=tuple(heldout), content_hash=h.hexdigest())
