"""The retrieval datastore (REST; ALGORITHMS.md §3.2 step 1-2): a corpus's token ids and their suffix array.

**Corpus** (`read_corpus`): `retrieval.corpus` entries are files, directories (their text source files,
recursively) or glob matches; a `.jsonl` file is a text corpus, one document per row (`text`, or Spec-Bench
`turns`). No entries: the project corpus's training files (training/corpus.py: the standard library split
the models were trained on). Every document must be UTF-8 text; a missing path, a binary or non-UTF-8 file
and an empty corpus are each an `InputError` naming `retrieval.corpus`.

**Store** (`open_store`): the documents tokenized with the target's tokenizer into one int32 stream, each
document followed by a separator id no tokenizer emits (`vocab_size`), and the stream's suffix array from
`pydivsufsort` (libdivsufsort: maintained, C, ~0.2 s per million tokens). Built once (with a progress bar)
under `retrieval.cache_dir/<corpus hash>-<tokenizer hash>/` and memory-mapped afterwards; `meta.json`
records both hashes, and a store whose tokenizer hash is not the target's is refused.

**Lookup** (`Datastore.candidates`): the longest context suffix of `min_ngram..max_ngram` tokens that occurs
(binary search on the suffix length: a suffix that occurs has every shorter suffix occurring), its
occurrences are one contiguous suffix-array range, and the continuations after them are sorted within it,
so every trie node is a sub-range whose size is its count. The trie grows best first by count (at most
`max_leaves` distinct continuations, `budget` nodes, `cont_len` deep); a huge range is read through an
evenly strided sample of rows (sorted still, counts in proportion).

Shape legend: N corpus tokens, M sampled occurrences, D continuation length.
"""
from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from spec_compiler.errors import InputError

TEXT_SUFFIXES = frozenset({".py", ".pyi", ".txt", ".md", ".rst", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts",
                           ".java", ".go", ".rs", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".json"})
"""File types a corpus directory contributes (named files are read whatever their suffix)."""
STORE_VERSION = 1
MAX_ROWS = 512
"""Occurrences read per lookup at most (an evenly strided sample of a larger range)."""
KEY = "retrieval.corpus"


@dataclass(frozen=True)
class Document:
    name: str
    """Its file (and jsonl line)."""
    text: str


# ---------------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------------
def _decode(path: Path, data: bytes, what: str = "") -> str:
    if b"\x00" in data:
        raise InputError(KEY, f"{path}{what}: a binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(KEY, f"{path}{what}: not UTF-8 (byte {e.start})") from None


def _jsonl_documents(path: Path) -> Iterator[Document]:
    text = _decode(path, path.read_bytes())
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(KEY, f"{path}:{i}: not JSON ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            parts = [row["text"]]
        elif isinstance(row, dict) and isinstance(row.get("turns"), list) and \
                all(isinstance(t, str) for t in row["turns"]):
            parts = row["turns"]
        else:
            raise InputError(KEY, f"{path}:{i}: a corpus row needs a string `text` or a list of string `turns`")
        for part in parts:
            yield Document(f"{path}:{i}", part)


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        out = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            out += [Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix in TEXT_SUFFIXES]
        return out
    return [path]


def read_corpus(entries: Sequence[str]) -> tuple[list[Document], str]:
    """The corpus's documents (in a fixed order) and its content hash (sha256 over names and bytes).
    entries: absolute paths (plan.retrieval.corpus, globs already expanded); () = the training files."""
    if not entries:
        from training.corpus import build_corpus  # the split the models were trained on
        corpus = build_corpus()
        return [Document(rel, corpus.text(rel)) for rel in corpus.train], corpus.content_hash
    h = hashlib.sha256()
    docs: list[Document] = []
    for entry in entries:
        path = Path(entry)
        if not path.exists():
            raise InputError(KEY, f"{path}: no such file or directory")
        for f in _files_of(path):
            data = f.read_bytes()
            for part in (str(f).encode(), data):
                h.update(len(part).to_bytes(8, "little"))
                h.update(part)
            if f.suffix == ".jsonl":
                docs += _jsonl_documents(f)
            else:
                docs.append(Document(str(f), _decode(f, data)))
    if not any(d.text.strip() for d in docs):
        raise InputError(KEY, f"the corpus is empty: {len(docs)} documents with no text in {', '.join(entries)[:200]}")
    return docs, h.hexdigest()


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------------
class Datastore:
    """Token ids [N] int32 (documents separated by `sep`) and their suffix array [N]."""

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, sep: int, path: Optional[Path] = None):
        # plain ndarray views of memory maps: slicing a np.memmap costs ~5x more per call
        self.tokens, self.sa, self.sep, self.path = np.asarray(tokens), np.asarray(sa), sep, path
        self.N = len(tokens)

    @staticmethod
    def from_tokens(tokens: Sequence[int], sep: int) -> "Datastore":
        """An in-memory store over `tokens` (tests; `build` for corpora)."""
        from pydivsufsort import divsufsort
        t = np.asarray(tokens, dtype=np.int32)
        return Datastore(t, divsufsort(t), sep)

    # ---- search --------------------------------------------------------------------------------------
    def _bound(self, pattern: list[int], upper: bool) -> int:
        """First suffix-array row whose suffix is > pattern (upper) / >= pattern (lower), comparing only the
        first len(pattern) tokens."""
        n, tokens, sa = len(pattern), self.tokens, self.sa
        head = lambda i: tokens[sa[i]:sa[i] + n].tolist()  # noqa: E731
        return (bisect.bisect_right if upper else bisect.bisect_left)(range(self.N), pattern, key=head)

    def match(self, pattern: list[int]) -> tuple[int, int]:
        """The suffix-array rows [lo, hi) of the occurrences of `pattern`."""
        lo = self._bound(pattern, False)
        return lo, self._bound(pattern, True)

    def longest_suffix(self, context: Sequence[int], min_n: int, max_n: int) -> tuple[int, int, int]:
        """(n, lo, hi): the longest context suffix of min_n..max_n tokens that occurs, and its rows
        (n = 0: none)."""
        best = (0, 0, 0)
        a, b = min_n, min(max_n, len(context))
        while a <= b:  # occurrence is monotone in n: binary search for the largest n that occurs
            n = (a + b) // 2
            lo, hi = self.match(list(context[len(context) - n:]))
            if hi > lo:
                best, a = (n, lo, hi), n + 1
            else:
                b = n - 1
        return best

    def candidates(self, context: Sequence[int], min_n: int, max_n: int, cont_len: int, max_leaves: int,
                   budget: int) -> tuple[list[int], list[int], list[int]]:
        """The retrieval trie after `context` (its last token is the root): (parents, tokens, counts) of the
        non-root nodes in the order they were chosen (best first: parents before children; siblings by
        descending count), parents indexed with the root as 0 and these nodes as 1.."""
        n, lo, hi = self.longest_suffix(context, min_n, max_n)
        if n == 0 or cont_len <= 0 or budget <= 0:
            return [], [], []
        m = hi - lo
        rows = lo + (np.arange(min(m, MAX_ROWS), dtype=np.int64) * m) // min(m, MAX_ROWS)
        start = self.sa[rows].astype(np.int64) + n  # [M]: where each continuation begins
        idx = start[:, None] + np.arange(cont_len)[None]  # [M, D]
        conts = np.where(idx < self.N, self.tokens[np.minimum(idx, self.N - 1)], self.sep)  # [M, D], rows sorted
        # a continuation ends at its document's end: every token after a separator is a separator too
        conts = np.where(np.cumsum(conts == self.sep, axis=1) > 0, self.sep, conts)
        parents, tokens, counts = [], [], []
        heap: list = []  # (-count, order, parent id, depth, row lo, row hi)
        order = 0

        def push_children(node: int, depth: int, a: int, b: int) -> None:
            nonlocal order
            if depth >= cont_len:
                return
            col = conts[a:b, depth]
            cuts = np.flatnonzero(col[1:] != col[:-1]) + 1
            for s, e in zip([0, *cuts.tolist()], [*cuts.tolist(), b - a]):
                if col[s] != self.sep:
                    heapq.heappush(heap, (-(e - s), order, node, depth, a + s, a + e))
                    order += 1

        push_children(0, 0, 0, len(conts))
        leaves, has_child = 0, [False]  # continuations so far (leaves); per node: has it a child yet
        while heap and len(tokens) < budget:
            neg, _, parent, depth, a, b = heapq.heappop(heap)
            branch = parent == 0 or has_child[parent]  # a new leaf, not a leaf growing longer
            if branch and leaves >= max_leaves:
                continue
            leaves += branch
            has_child[parent] = True
            parents.append(parent)
            tokens.append(int(conts[a, depth]))
            counts.append(-neg)
            has_child.append(False)
            push_children(len(tokens), depth + 1, a, b)
        return parents, tokens, counts


def open_store(docs_or_entries, tok: Tokenizer, cache_dir: str, store: Optional[str] = None,
               progress: bool = True) -> Datastore:
    """The datastore for a corpus and tokenizer: `store` (a prebuilt store directory, used as is), else
    cache_dir/<corpus hash>-<tokenizer hash>/, built there first if missing. docs_or_entries: corpus entries
    (read with `read_corpus` only when the store must be built or keyed)."""
    tok_hash = tokenizer_hash(tok)
    if store is not None:
        return load_store(Path(store), tok_hash, "retrieval.store")
    docs, corpus_hash = read_corpus(docs_or_entries)
    path = Path(cache_dir) / f"{corpus_hash[:16]}-{tok_hash[:16]}"
    if not (path / "meta.json").is_file():
        build_store(docs, corpus_hash, tok, path, progress)
    return load_store(path, tok_hash, "retrieval.cache_dir")


def build_store(docs: list[Document], corpus_hash: str, tok: Tokenizer, path: Path, progress: bool = True) -> None:
    """Tokenize and index the documents into `path` (written to a temporary directory, then renamed)."""
    from pydivsufsort import divsufsort
    from tqdm import tqdm

    sep = tok.get_vocab_size(with_added_tokens=True)
    parts = []
    batch = 64
    bar = tqdm(total=len(docs), desc=f"datastore {path.name}", unit="doc", disable=not progress)
    for i in range(0, len(docs), batch):
        for enc in tok.encode_batch([d.text for d in docs[i:i + batch]], add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.int32))
            parts.append(np.array([sep], dtype=np.int32))
        bar.update(min(batch, len(docs) - i))
    bar.close()
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if tokens.size == 0 or int((tokens != sep).sum()) == 0:
        raise InputError(KEY, "the corpus is empty: it tokenizes to no tokens")
    sa = divsufsort(tokens)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "sa.npy", sa)
    meta = {"version": STORE_VERSION, "corpus_hash": corpus_hash, "tokenizer_hash": tokenizer_hash(tok),
            "separator": sep, "num_tokens": int(tokens.size), "num_documents": len(docs)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, path)
    except OSError:  # another process built it first: theirs is the same store
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def load_store(path: Path, tok_hash: str, key: str) -> Datastore:
    """A built store, memory-mapped; refused unless built for this tokenizer."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise InputError(key, f"{path}: not a datastore (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("version") != STORE_VERSION:
        raise InputError(key, f"{path}: datastore version {meta.get('version')}, this code reads {STORE_VERSION}; "
                         "delete it to rebuild")
    if meta["tokenizer_hash"] != tok_hash:
        raise InputError(key, f"{path}: built for another tokenizer (hash {meta['tokenizer_hash'][:12]}, the "
                         f"target's is {tok_hash[:12]}); token ids would not match: rebuild it for this target")
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    sa = np.load(path / "sa.npy", mmap_mode="r")
    return Datastore(tokens, sa, int(meta["separator"]), path)
