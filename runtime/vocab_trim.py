"""VocabTrim calibration (ALGORITHMS.md §6.2): which tokens the drafter's trimmed LM head keeps.

1. Complete the calibration prompts with the target (greedy, through the engine's own decode loop).
2. Count the generated tokens; the prompts' own tokens are counted too, only to rank tokens the target
   never generated (so a small calibration still fills K rows sensibly).
3. Keep the target's EOS ids and `keep` tokens, then the most generated tokens, then the most frequent
   prompt tokens, then the lowest ids, until K rows: `s2t`, sorted ascending.

Counts go to a calibration file keyed by everything they depend on (the target's files, the tokenizer,
the prompts, their number and length; not the context limit), so later runs reuse them and a stale file is refused rather than
silently used. Calibration is greedy whatever the run's sampling settings [D]: any selection is lossless,
and one file then serves every temperature.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.decode import decode
from runtime.drafters import NoDrafter
from spec_compiler.checkpoint import sha256_file
from spec_compiler.errors import CheckpointError, ConfigError
from spec_compiler.plan import Plan, VocabTrimPlan
from spec_compiler.prompts import read_question_file
from spec_compiler.validate import PROJECT_ROOT

ARTIFACT_VERSION = 1
ARTIFACT_DIR = PROJECT_ROOT / "artifacts" / "vocab_trim"
WEIGHT_SUFFIXES = (".json", ".safetensors", ".bin")


def target_identity(plan: Plan) -> dict:
    """What the target's next-token choices depend on: its checkpoint files (or its random-weight recipe),
    dtype and the tokenizer file."""
    t = plan.target
    ident: dict = {"source": t.source, "dtype": t.dtype}
    if t.checkpoint is not None:
        d = Path(t.checkpoint)
        ident["files"] = {p.name: sha256_file(p) for p in sorted(d.iterdir())
                          if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
    else:
        ident["arch"], ident["seed"] = [list(kv) for kv in t.arch], t.seed
    if plan.tokenizer is not None:
        ident["tokenizer"] = sha256_file(Path(plan.tokenizer))
    return ident


def calibration_key(plan: Plan) -> tuple[str, dict]:
    """The key hashes what the counts are about (target, tokenizer, prompts, their number and length), not the
    run's context limit: `target.max_seq_len` only cuts calibration prompts too long for it, which shifts the
    prompt-token tie-breaks, never what the file describes, so one file serves every context length. The meta
    records the max_seq_len that made the file (not hashed)."""
    vt = plan.vocab_trim
    meta = {"version": ARTIFACT_VERSION, "target": target_identity(plan),
            "prompts_sha256": sha256_file(Path(vt.prompts)), "num_prompts": vt.num_prompts,
            "max_new_tokens": vt.max_new_tokens}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return key, {**meta, "max_seq_len": plan.max_seq_len}


def read_prompts(path: str, num: int) -> list[str]:
    """First turn of each question (Spec-Bench format), the first `num` (0 = all)."""
    rows = [q.turns[0] for q in read_question_file(path, "drafter.vocab_trim.prompts")]
    return rows[:num] if num else rows


def calibrate(target, cache, tokenizer, eos_ids: tuple[int, ...], prompts: list[str], max_new_tokens: int,
              max_seq_len: int, vocab: int) -> dict:
    """Greedy target completions of `prompts`; returns generated and prompt token counts ({id: count})."""
    gen = torch.zeros(vocab, dtype=torch.int64)
    seen = torch.zeros(vocab, dtype=torch.int64)
    bar = tqdm(prompts, desc="vocab_trim calibration", unit="prompt", leave=False)
    start, made = time.perf_counter(), 0
    for text in bar:
        ids = tokenizer.encode(text).ids[:max_seq_len - max_new_tokens]
        if not ids:
            continue
        out = decode(target, cache, NoDrafter(), ids, max_new_tokens=max_new_tokens, max_seq_len=max_seq_len,
                     eos_ids=eos_ids).output_ids
        made += len(out)
        bar.set_postfix_str(f"{made / (time.perf_counter() - start):.0f} tok/s", refresh=False)
        gen += torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=vocab)[:vocab]
        seen += torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=vocab)[:vocab]
    sparse = lambda c: {str(i): int(c[i]) for i in c.nonzero().flatten().tolist()}  # noqa: E731
    return {"generated": sparse(gen), "prompt": sparse(seen), "generated_tokens": int(gen.sum())}


def select(counts: dict, size: int, vocab: int, must_keep: list[int]) -> torch.Tensor:
    """s2t: `size` token ids (sorted) out of range(vocab), ranked must_keep > generated > prompt count > id."""
    gen = torch.zeros(vocab, dtype=torch.int64)
    seen = torch.zeros(vocab, dtype=torch.int64)
    for name, c in (("generated", gen), ("prompt", seen)):
        for i, n in counts[name].items():
            if int(i) < vocab:
                c[int(i)] = n
    # lexicographic rank via stable sorts, least significant key first
    order = torch.arange(vocab)
    order = order[torch.sort(-seen[order], stable=True).indices]
    order = order[torch.sort(-gen[order], stable=True).indices]
    keep = [i for i in dict.fromkeys(must_keep) if 0 <= i < vocab]
    chosen = set(keep)
    picked = keep + [i for i in order.tolist() if i not in chosen][:max(size - len(keep), 0)]
    return torch.tensor(sorted(picked), dtype=torch.int64)


def _read_artifact(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text())
        found = data["key"]
        counts = data["counts"]
        counts["generated"], counts["prompt"]  # noqa: B018  (both present)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(str(path), f"unreadable VocabTrim calibration file ({type(e).__name__}: {e}); "
                              "delete it to recalibrate") from None
    if found != key:
        raise CheckpointError(str(path), f"calibrated for another target, tokenizer or prompt set (key {found}, "
                              f"this run needs {key}); point drafter.vocab_trim.artifact elsewhere or delete it")
    return counts


def token_ids(tokenizer, keep: tuple[str, ...]) -> list[int]:
    out = []
    for t in keep:
        i = tokenizer.token_to_id(t)
        if i is None:
            raise ConfigError("drafter.vocab_trim.keep", "token not in the tokenizer's vocabulary", t)
        out.append(i)
    return out


def resolve(plan: Plan, target, cache, tokenizer, eos_ids: tuple[int, ...],
            drafter_vocab: int) -> tuple[torch.Tensor, Path]:
    """s2t for this plan's trimmed head, reading the calibration file or creating it; and its path."""
    vt: VocabTrimPlan = plan.vocab_trim
    key, meta = calibration_key(plan)
    path = Path(vt.artifact) if vt.artifact is not None else ARTIFACT_DIR / f"{key}.json"
    if path.is_file():
        counts = _read_artifact(path, key)
    else:
        prompts = read_prompts(vt.prompts, vt.num_prompts)
        counts = calibrate(target, cache, tokenizer, eos_ids, prompts, vt.max_new_tokens, plan.max_seq_len,
                           target.config.vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "meta": meta, "counts": counts}, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent run never reads half a file
    must_keep = list(eos_ids) + token_ids(tokenizer, vt.keep)
    return select(counts, vt.size, drafter_vocab, must_keep), path
