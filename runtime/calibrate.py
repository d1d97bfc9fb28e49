"""tree.budget=auto at compile (or load) time: measure what `spec_compiler.budget.choose` needs, on the runtime's
own models, and pick the tree.

- `measure_walks` / `calibrate`: the target completes the calibration prompts greedily (the engine, plain
  autoregressive); then, at every generated position, the rank of each target token among the drafter's
  children along the accepted path (a *walk*, spec_compiler/budget.py). A model drafter's children are its
  top-k given the text so far, and an accepted path *is* the target's text, so one causal drafter forward over
  prompt + completion gives every rank at every depth (the same ranks a probe tree of top-R children per
  level would draft, without its R^D nodes). Prompt lookup is probed through its own `propose` on that text
  (a chain: its trie's branches follow the matches, so only its depth is chosen).
- `profile_costs`: one step past drafting per tree size (a real `Engine.step` over a drafter that hands back
  a fixed tree: verify forward, acceptance, commit), the drafter's level forward per width, and its whole
  propose of a one-token chain (the per-step part beyond the level forwards), each the median of repeated
  timed calls under inference mode, at the runtime's batch size.
- `resolve_budget(plan, runtime)`: both, the choice, and the record the compile step writes to its manifest.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace
from typing import Sequence

import torch

from runtime.batch import Block, TreeBatch
from runtime.decode import Engine
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.lookup import PromptLookupDrafter
from spec_compiler.budget import AcceptanceModel, CostModel, choose, replay_accepted
from spec_compiler.errors import ConfigError
from spec_compiler.plan import Plan
from spec_compiler.prompts import read_question_file
from spec_compiler.tree import Provenance, TreeTopology, tree_buckets


def calibration_prompts(plan: Plan, tokenizer) -> list[list[int]]:
    """The first turn of the first num_calibration_prompts questions, tokenized, cut to leave room for the
    completion and one tree in the context."""
    b = plan.tree_budget
    qs = read_question_file(b.calibration_prompts, "tree.calibration_prompts")
    qs = qs[:b.num_calibration_prompts] if b.num_calibration_prompts else qs
    room = plan.max_seq_len - b.calibration_max_new_tokens - b.max_nodes
    if room < 1:
        raise ConfigError("tree.calibration_max_new_tokens", f"leaves no room for a prompt in target.max_seq_len="
                          f"{plan.max_seq_len} (with tree.max_nodes={b.max_nodes})", b.calibration_max_new_tokens)
    out = [ids[-room:] for ids in (tokenizer.encode(q.turns[0]).ids for q in qs) if ids]
    if not out:
        raise ConfigError("tree.calibration_prompts", "no prompt tokenizes to any token", b.calibration_prompts)
    return out


def completions(runtime, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
    """prompt + the target's greedy completion of each prompt (autoregressive, `batch_size` at a time)."""
    ar = runtime.with_drafter(NoDrafter())
    results = ar.generate_many([ar.request(p, max_new_tokens) for p in prompts])
    return [list(p) + r.output_ids for p, r in zip(prompts, results)]


def _walks(ranks: Sequence[int], max_depth: int, max_rank: int) -> list[list[int]]:
    """ranks[s]: the rank of generated token s given the text before it (max_rank: a miss) -> one walk per start."""
    out = []
    for t in range(len(ranks)):
        w = []
        for r in ranks[t:t + max_depth]:
            w.append(r)
            if r >= max_rank:
                break
        out.append(w)
    return out


@torch.inference_mode()
def _model_ranks(drafter: ModelDrafter, text: list[int], start: int, max_rank: int) -> list[int]:
    """Rank (0 = the drafter's top pick) of text[s] under the drafter given text[:s], s >= start; max_rank
    when it ranks lower or the drafter's head lacks it. One causal forward (no cache)."""
    dev = drafter.device
    ids = torch.tensor([text[:-1]], device=dev)
    logits = drafter.model(ids, torch.arange(len(text) - 1, device=dev)[None])[0, start - 1:].float().cpu()  # [n, Vd]
    col = drafter.columns(torch.tensor(text[start:]))
    ok = (col >= 0) & (col < logits.shape[-1])
    mine = logits.gather(1, col.clamp(0, logits.shape[-1] - 1)[:, None])  # [n, 1]
    rank = (logits > mine).sum(-1).clamp(max=max_rank)
    return torch.where(ok, rank, max_rank).tolist()


def _lookup_walks(drafter: PromptLookupDrafter, text: list[int], start: int, max_depth: int) -> list[list[int]]:
    """Walks of a prompt-lookup chain probe of max_depth tokens: at each start, its propose on the text so far."""
    probe = PromptLookupDrafter(TreeTopology.chain(max_depth), drafter.min_n, drafter.max_n, drafter.num_pred, 1)
    probe.start(0, text[:start])
    out = []
    for t in range(start, len(text)):
        tree = probe.propose([SimpleNamespace(tokens=text[:t], slot=0, sampler=None)], [max_depth])
        topo, toks = tree.topologies[0], tree.tokens[0].tolist()
        node, w = 0, []
        for s in range(t, min(len(text), t + max_depth)):
            hit = [c for c in topo.children[node] if toks[c] == text[s]]
            w.append(0 if hit else 1)
            if not hit:
                break
            node = hit[0]
        out.append(w)
    return out


def measure_walks(runtime, prompts: Sequence[list[int]], max_new_tokens: int, max_depth: int,
                  max_rank: int) -> list[list[int]]:
    """One walk per generated position of every prompt's greedy completion (spec_compiler.budget)."""
    d = runtime.drafter
    texts = completions(runtime, prompts, max_new_tokens)
    walks = []
    for p, text in zip(prompts, texts):
        if len(text) == len(p):
            continue
        if isinstance(d, ModelDrafter):
            walks += _walks(_model_ranks(d, text, len(p), max_rank), max_depth, max_rank)
        elif isinstance(d, PromptLookupDrafter):
            walks += _lookup_walks(d, text, len(p), max_depth)
        else:
            raise TypeError(f"tree.budget=auto calibrates a model or prompt-lookup drafter, not {type(d).__name__}")
    return walks


def calibrate(runtime, prompts: Sequence[list[int]], max_new_tokens: int, max_depth: int,
              max_rank: int) -> AcceptanceModel:
    """The drafter's positional acceptance against the target's greedy completions of `prompts`."""
    rank = 1 if isinstance(runtime.drafter, PromptLookupDrafter) else max_rank
    return AcceptanceModel.from_walks(measure_walks(runtime, prompts, max_new_tokens, max_depth, rank), max_depth,
                                      rank)


# ---- costs -------------------------------------------------------------------------------------------
class _FixedTree:
    """A drafter that hands back `topo` with fixed tokens every step (rows cut to their budget): timing a step
    through it measures everything but drafting."""

    def __init__(self, topo: TreeTopology, tokens: list[int]):
        self.topo, self.tokens = topo, tokens

    def start(self, slot, tokens, defer=False):
        pass

    def move(self, src, dst):
        pass

    def propose(self, rows, max_depth):
        t = self.topo.truncate(max(0, min(max_depth)))
        provs = [Provenance.root] + [Provenance.topk] * (t.n - 1)
        return TreeBatch.build([t] * len(rows), [[r.tokens[-1]] + self.tokens[1:t.n] for r in rows],
                               [provs] * len(rows), t.n)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _median_times(fns: Sequence, repeats: int, warmup: int, device) -> list[float]:
    """Median seconds of each call in `fns`, timed round-robin (a burst of load on a shared machine then
    slows every entry of a table alike, not one of them)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _fresh_cache(model, like):
    """A cache shaped like `like` (same rows, slots, SSM scratch) for `model`: profiling never touches live rows."""
    extra = {"num_scratch": like.num_scratch} if hasattr(like, "num_scratch") else {}
    return model.new_cache(like.rows, like.capacity, **extra)


def _text(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % vocab for i in range(n)]


def profile_costs(runtime, sizes: Sequence[int], context: int = 128, repeats: int = 7, warmup: int = 2,
                  text: Sequence[int] | None = None) -> CostModel:
    """Seconds of one step past drafting per tree size in `sizes` (verify forward + acceptance + commit, every
    row of the runtime's batch at `context` committed tokens) and of one drafter level forward per width
    (model drafter), or of a whole propose on `text` (prompt lookup)."""
    plan, B = runtime.plan, runtime.batch_size
    dev = next(runtime.target.parameters()).device
    vocab = runtime.target.config.vocab_size
    sizes = sorted(set(int(s) for s in sizes))
    assert sizes and sizes[0] >= 1 and sizes[-1] <= plan.tree_slots, (sizes, plan.tree_slots)
    ctx = max(1, min(context, plan.max_seq_len - sizes[-1] - 2 * (repeats + warmup) - 2))
    prompt = _text(ctx + 1, vocab)
    steps = []
    for T in sizes:  # an engine (and cache) per size: their steps are timed round-robin
        fixed = _FixedTree(TreeTopology.chain(T - 1), _text(T, vocab)[::-1])
        eng = Engine(runtime.target, _fresh_cache(runtime.target, runtime.cache), fixed, max_seq_len=plan.max_seq_len,
                     kv_window=plan.kv_window, verify_head=plan.verify_head)
        for _ in range(B):
            eng.add(runtime.request(prompt, plan.max_seq_len))
        steps.append(eng.step)
    verify = list(zip(sizes, _median_times(steps, repeats, warmup, dev)))
    d = runtime.drafter
    if isinstance(d, PromptLookupDrafter):
        probe = PromptLookupDrafter(TreeTopology.chain(sizes[-1] - 1), d.min_n, d.max_n, d.num_pred, B)
        text = list(text) if text is not None else _text(64, 17) * 4  # a text that repeats itself
        rows = [SimpleNamespace(tokens=text, slot=b, sampler=None) for b in range(B)]
        for b in range(B):
            probe.start(b, text)
        fixed, = _median_times([lambda: probe.propose(rows, [sizes[-1] - 1] * B)], repeats, warmup, "cpu")
        return CostModel(B, tuple(verify), (), fixed)
    assert isinstance(d, ModelDrafter), type(d).__name__
    widths = [w for w in sizes if w < sizes[-1]] or [1]
    *levels, propose = _median_times(_draft_levels(d, B, ctx, widths) + [_propose_chain(d, B, ctx)], repeats, warmup,
                                     d.device)
    return CostModel(B, tuple(verify), tuple(zip(widths, levels)), max(0.0, propose - levels[0]))


@torch.inference_mode()
def _draft_levels(d: ModelDrafter, B: int, ctx: int, widths: Sequence[int]) -> list:
    """Per width w, a call running one level forward of w nodes per row from a committed root (its block and
    top-k included), as ModelDrafter.propose runs it."""
    cache = _fresh_cache(d.model, d.cache)
    view = cache.view_rows(0, B)
    kv = lambda need: need if d.kv_window == "live" else cache.capacity  # noqa: E731
    ids = torch.tensor([_text(ctx, d.vocab)] * B, device=d.device)
    block = Block.causal(0, ctx, B, kv(ctx), device=d.device)
    d.model.hidden(ids, block.positions, view, block, num_rows=0)
    cached = torch.full((B,), ctx)  # the root sits at slot ctx - 1
    out = []
    for w in widths:
        topo = TreeTopology.static([w])
        full = TreeBatch.build([topo] * B, [_text(w + 1, d.vocab)] * B,
                               [[Provenance.root] + [Provenance.topk] * w] * B, w + 1)
        toks = full.tokens[:, 1:].to(d.device)

        @torch.inference_mode()
        def level(w=w, full=full, toks=toks):
            blk = Block.tree(cached, full, kv(ctx + w), 1, w + 1, base=cached - 1, device=d.device)
            logits = d.model(toks, blk.positions, view, blk)  # [B, w, Vd]
            torch.topk(logits, min(w, logits.shape[-1]), dim=-1).indices.cpu()

        out.append(level)
    return out


def _propose_chain(d: ModelDrafter, B: int, ctx: int):
    """A call running the drafter's whole propose of a one-token chain (catch-up on one new token per row,
    top-k, the tree's bookkeeping): what a step's drafting costs beyond its level forwards, plus one forward."""
    probe = ModelDrafter(d.model, TreeTopology.chain(1), d.cache.capacity, d.kind, d.temperature, d.vocab, B, d.s2t,
                         d.kv_window, _fresh_cache(d.model, d.cache))
    rows = [SimpleNamespace(tokens=_text(ctx, d.vocab), slot=b, sampler=None) for b in range(B)]
    for r in rows:
        probe.start(r.slot, r.tokens)

    def step():
        for r in rows:
            r.tokens.append(r.tokens[-2])  # one new committed token per row, as after a step that accepted nothing
        probe.propose(rows, [1] * B)

    return step


# ---- the wire-up point -------------------------------------------------------------------------------
def resolve_budget(plan: Plan, runtime) -> tuple[tuple[int, ...], dict]:
    """tree.budget=auto: calibrate, profile, choose. Returns the chosen tree's parents and the record for the
    manifest (settings, acceptance model, cost tables, the choice and every candidate, the chosen tree's tau
    replayed on the measured walks). Says what it does on stderr."""
    b = plan.tree_budget
    assert b is not None, "resolve_budget needs a plan with tree.budget=auto"
    prompts = calibration_prompts(plan, runtime.tokenizer)
    print(f"tree.budget=auto: measuring acceptance on {len(prompts)} calibration prompts ({b.calibration_max_new_tokens} "
          f"greedy tokens each) and verify / draft latency at batch {runtime.batch_size}...", file=sys.stderr)
    t0 = time.perf_counter()
    lookup = isinstance(runtime.drafter, PromptLookupDrafter)
    D, R = b.max_nodes - 1, (1 if lookup or b.family == "chain" else b.max_nodes - 1)
    walks = measure_walks(runtime, prompts, b.calibration_max_new_tokens, D, R)
    acc = AcceptanceModel.from_walks(walks, D, R)
    costs = profile_costs(runtime, list(tree_buckets(b.max_nodes)))
    choice = choose(acc, costs, b.max_nodes, b.family)
    best = choice.best
    replayed = 1.0 + replay_accepted(TreeTopology(best.parents), walks)
    print(f"tree.budget=auto: chose a {best.kind} tree of {best.n} nodes, depth {best.depth}"
          + (f", branching {list(best.branching)}" if best.branching else f", parents {list(best.parents)}")
          + f": expected tau {best.tau:.2f} (replayed {replayed:.2f}), {best.tokens_per_s:.0f} tokens/s per row "
          f"({len(choice.candidates)} candidates, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    record = {"settings": asdict(b), "positions": len(walks), "replayed_tau": replayed,
              "acceptance": acc.to_dict(), "costs": costs.to_dict(), "choice": choice.to_dict()}
    return best.parents, record
