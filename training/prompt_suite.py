"""The local prompt suite: Spec-Bench-format questions cut from HELD-OUT standard-library files only (and
VocabTrim's calibration prompts, cut the same way from TRAINING files).

Categories (BENCHMARKS.md §3, adapted to a code-only corpus):
- `code_completion`: a prefix of a held-out file, cut at a line boundary; continue the file.
- `docstring_to_code`: a function's signature and docstring (with its module header as context); write
  the body.
- `long_context`: a whole held-out file (or, for files longer than the context allows, a whole run of
  consecutive top-level definitions), then a marker and its first lines again; the natural continuation
  copies it, which is where prompt lookup and retrieval shine.

Deterministic: the same corpus gives the same suite. Regenerate with `python -m training.prompt_suite`.
"""
from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from training.corpus import Corpus, build_corpus

SUITE = Path(__file__).resolve().parent.parent / "data" / "prompts" / "local_suite.jsonl"
CALIBRATION = SUITE.parent / "calibration.jsonl"  # VocabTrim calibration prompts, from TRAINING files
MAX_PROMPT_CHARS = 2400  # ~650 tokens at ~3.7 bytes/token
LONG_CONTEXT_CHARS = 3000  # ~850 tokens: prompt + 128 new tokens fit a 1024-token context
MAX_NEW_TOKENS = 128  # task=bench's default
COPY_MARKER = "\n\n# ---- the module above, verbatim ----\n"


def _rank(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _code_completion(path: str, text: str) -> list[tuple[str, str]]:
    lines = text.splitlines(keepends=True)
    out = []
    for frac in (0.3, 0.6):
        cut = max(8, int(len(lines) * frac))
        prefix = "".join(lines[:cut])
        if len(prefix) > MAX_PROMPT_CHARS:
            prefix = "".join(lines[:cut])[-MAX_PROMPT_CHARS:]
            prefix = prefix[prefix.index("\n") + 1:]  # start at a line boundary
        ref = "".join(lines[cut:cut + 20])
        if prefix.strip() and ref.strip():
            out.append((prefix, ref))
    return out


def _docstring_to_code(path: str, text: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not ast.get_docstring(node):
            continue
        doc = node.body[0]
        if len(node.body) < 2 or node.decorator_list:
            continue
        head = "".join(lines[node.lineno - 1:doc.end_lineno])
        body = "".join(lines[doc.end_lineno:node.end_lineno])
        context = "".join(lines[:min(12, node.lineno - 1)])  # module header: imports, constants
        prompt = context + ("\n" if context and not context.endswith("\n\n") else "") + head
        if len(prompt) <= MAX_PROMPT_CHARS and 40 <= len(body) <= 1500:
            out.append((prompt, body))
    out.sort(key=lambda pr: _rank(path + pr[0]))
    return out[:3]


def _long_context(path: str, text: str) -> list[tuple[str, str]]:
    """Whole small files, or whole runs of consecutive top-level definitions of larger ones."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines(keepends=True)
    starts = [n.lineno - 1 - len(getattr(n, "decorator_list", [])) for n in tree.body] + [len(lines)]
    windows, lo = [], 0
    for i in range(1, len(starts)):
        if len("".join(lines[lo:starts[i]])) <= LONG_CONTEXT_CHARS:
            continue  # the window can take definition i-1 too
        prev = "".join(lines[lo:starts[i - 1]])  # close the window before definition i-1
        if len(prev) >= 800:
            windows.append(prev)
        too_long = len("".join(lines[starts[i - 1]:starts[i]])) > LONG_CONTEXT_CHARS
        lo = starts[i] if too_long else starts[i - 1]  # skip a single definition longer than a window
    tail = "".join(lines[lo:])
    if 800 <= len(tail) <= LONG_CONTEXT_CHARS:
        windows.append(tail)
    out = []
    for w in windows[:3]:
        wl = w.splitlines(keepends=True)
        if len(wl) > 22:
            out.append((w + COPY_MARKER + "".join(wl[:2]), "".join(wl[2:20])))
    return out


def build_suite(corpus: Corpus, per_category: int = 40, fits=lambda prompt: True, split: str = "heldout") -> list[dict]:
    """`fits(prompt)`: keep only prompts that leave room to generate in the target's context. `split`:
    'heldout' for the benchmark suite; 'train' for VocabTrim's calibration prompts (never benchmarked)."""
    makers = {"code_completion": _code_completion, "docstring_to_code": _docstring_to_code,
              "long_context": _long_context}
    files = {"heldout": corpus.heldout, "train": corpus.train}[split]
    rows = []
    for cat, make in makers.items():
        items = []
        for path in sorted(files, key=_rank):
            for prompt, ref in make(path, corpus.text(path)):
                if fits(prompt):
                    items.append((path, prompt, ref))
        for path, prompt, ref in items[:per_category]:
            rows.append({"question_id": len(rows), "category": cat, "source": path, "turns": [prompt],
                         "reference": [ref]})
    return rows


def main() -> None:
    corpus = build_corpus()
    tok_file = SUITE.parent.parent.parent / "models" / "default" / "target" / "tokenizer.json"
    fits = lambda prompt: True  # noqa: E731
    if tok_file.is_file():  # leave room for MAX_NEW_TOKENS in the default target's 1024-token context
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_file))
        fits = lambda prompt: len(tok.encode(prompt).ids) <= 1024 - MAX_NEW_TOKENS  # noqa: E731
    SUITE.parent.mkdir(parents=True, exist_ok=True)
    for path, split, per_category in ((SUITE, "heldout", 40), (CALIBRATION, "train", 16)):
        rows = build_suite(corpus, per_category, fits, split)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts = {c: sum(r["category"] == c for r in rows) for c in {r["category"] for r in rows}}
        print(f"{len(rows)} prompts {counts} from {split} files (corpus {corpus.content_hash[:12]}) -> {path}")


if __name__ == "__main__":
    main()
