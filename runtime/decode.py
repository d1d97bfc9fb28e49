"""The one decode loop: prefill -> [draft -> verify -> accept -> commit]* (ALGORITHMS.md §0.2).

State: `tokens` (prompt + emitted) and `L`, the number of tokens whose KV sits in the target cache; the
last token (the tree root) is always pending. Each step the drafter proposes a tree rooted at it, one
target forward scores every node (positions L + depth, ancestor mask), the verifier picks the accepted
path and the next token, and the cache keeps just that path. The autoregressive baseline is the same
loop with `NoDrafter` (a root-only tree).

Limits: a step never emits past `max_new_tokens` or the context (`max_seq_len`), because the drafter is
told the remaining budget (`max_depth = remaining - 1`, the +1 being the bonus/recovered token); EOS
ends the request, dropping anything after it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from runtime.models.llama import KVCache, LlamaModel
from runtime.sampling import AcceptanceRule, target_probs, verify_greedy, verify_sampling
from spec_compiler.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    acceptance: AcceptanceRule = AcceptanceRule.auto


@dataclass
class DecodeResult:
    output_ids: list[int]
    """New tokens only."""
    accept_lengths: list[int] = field(default_factory=list)
    """Tokens emitted per step (accepted drafts + 1), Spec-Bench's accept_lengths."""
    draft_depths: list[int] = field(default_factory=list)
    """Depth of the tree verified at each step (0 = no draft)."""
    stop_reason: str = ""
    """'eos' | 'max_new_tokens' | 'context'."""
    draft_time: float = 0.0
    """Seconds in drafter.propose."""
    verify_time: float = 0.0
    """Seconds in the target's tree forward and the acceptance walk."""
    other_time: float = 0.0
    """The rest of wall_time: prefill, acceptance, cache commit, bookkeeping."""
    wall_time: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def tau(self) -> float:
        """Mean tokens per target forward, bonus included (1.0 for autoregressive decoding)."""
        return sum(self.accept_lengths) / max(1, self.steps)


@dataclass
class StepState:
    """What a step hook sees after commit (tests compare the cache with a fresh prefill)."""

    tokens: list[int]
    L: int
    cache: KVCache
    path: list[int]


@torch.inference_mode()  # no autograd bookkeeping at all: measurably less per-op overhead than no_grad on CPU
def decode(target: LlamaModel, cache: KVCache, drafter, prompt_ids: list[int], *, max_new_tokens: int,
           max_seq_len: int, eos_ids: tuple[int, ...] = (), sampling: SamplingParams = SamplingParams(),
           draft_gen: Optional[torch.Generator] = None, verify_gen: Optional[torch.Generator] = None,
           on_step: Optional[Callable[[StepState], None]] = None) -> DecodeResult:
    if not prompt_ids:
        raise InputError("prompt", "is empty after tokenization")
    if len(prompt_ids) >= max_seq_len:
        raise InputError("prompt", f"{len(prompt_ids)} tokens do not fit the context "
                         f"(target.max_seq_len={max_seq_len} leaves no room to generate)")
    device = next(target.parameters()).device
    greedy = sampling.temperature == 0
    temp = (sampling.temperature, sampling.top_k, sampling.top_p)
    eos = set(eos_ids)
    t_start = time.perf_counter()

    tokens = list(prompt_ids)
    L = len(tokens) - 1
    drafter.reset()
    if L:
        ids = torch.tensor([tokens[:L]], device=device)
        target.hidden(ids, torch.arange(L, device=device)[None], cache, 0, num_rows=0)
    res = DecodeResult([])
    while True:
        remaining = min(max_new_tokens - len(res.output_ids), max_seq_len - len(tokens))
        if remaining <= 0:
            res.stop_reason = "max_new_tokens" if len(res.output_ids) >= max_new_tokens else "context"
            break
        t0 = time.perf_counter()
        tree = drafter.propose(tokens, remaining - 1, draft_gen)
        t1 = time.perf_counter()
        topo = tree.topology
        logits = target(torch.tensor([tree.tokens], device=device), topo.position_ids(L, device)[None],
                        cache, L, topo.attention_mask(L, device) if topo.n > 1 else None)[0].cpu()
        if greedy:
            path, y = verify_greedy(tree, logits)
        else:
            path, y = verify_sampling(tree, target_probs(logits, *temp), sampling.acceptance, verify_gen)
        t2 = time.perf_counter()
        if len(path) > 1:  # keep the accepted path's KV contiguous after the prefix
            cache.compact(torch.tensor(path) + L, L)
        L += len(path)
        new = [tree.tokens[i] for i in path[1:]] + [y]
        stop = next((i for i, x in enumerate(new) if x in eos), None)
        if stop is not None:
            new = new[:stop + 1]
        tokens += new
        res.output_ids += new
        res.accept_lengths.append(len(path))
        res.draft_depths.append(topo.max_depth)
        res.draft_time += t1 - t0
        res.verify_time += t2 - t1
        if on_step is not None:
            on_step(StepState(tokens, L, cache, path))
        if stop is not None:
            res.stop_reason = "eos"
            break
    res.wall_time = time.perf_counter() - t_start
    res.other_time = res.wall_time - res.draft_time - res.verify_time  # prefill, accept, commit, bookkeeping
    return res


def per_position_acceptance(results: list[DecodeResult]) -> list[float]:
    """P(draft position j accepted | the step drafted position j), j = 0..max depth - 1."""
    depth = max((d for r in results for d in r.draft_depths), default=0)
    hit, tried = [0] * depth, [0] * depth
    for r in results:
        for a, d in zip(r.accept_lengths, r.draft_depths):
            for j in range(d):
                tried[j] += 1
                hit[j] += a - 1 > j
    return [h / t if t else 0.0 for h, t in zip(hit, tried)]
