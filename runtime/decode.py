"""The one batched decode step and the generate loop around it (ALGORITHMS.md §0.2, §8.1).

`Engine` serves up to `rows` requests at once, one per cache row. A request is prefilled into a free row
(its prompt minus the last token, which becomes the pending tree root), then every `step()`:

    drafter.propose(rows, max_depth) -> TreeBatch [B, T]     one tree per row, padded to a size bucket
    Block.tree(lengths, tree)        -> one target forward    logits [B, T, V], KV written by slot index
    accept (greedy / RRS per row)    -> path + next token     on batched tensors (runtime.sampling)
    cache.commit(lengths, paths)                              KV compaction / SSM state per row

Each row keeps its own committed length L_b, budget, sampling parameters and generators, so a request's
output is the same alone or in any batch. A step never emits past `max_new_tokens` or the context
(`max_seq_len`): the drafter is told `max_depth = remaining - 1` per row (the +1 is the bonus/recovered
token). EOS ends a request, dropping anything after it; finished requests leave the batch (the last row
moves into the freed one) while the others continue. The autoregressive baseline is `NoDrafter`: a
root-only tree through the same step; batch 1 is B = 1.

`kv_window`: the attention window per forward: "live" slices the cache to the longest live row (fastest
in CPU eager; a shape that changes every step), "full" attends over the whole capacity (fixed shapes per
(B, T) bucket, for compiled phases and CUDA graphs). Both give the same tokens.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from runtime.batch import Block
from runtime import transfer as devices
from runtime.transfer import to_device, to_host
from runtime.sampling import AcceptanceRule, NodeLogits, SamplingParams, TorchDraftSampler, accept, target_probs
from spec_compiler.errors import InputError


@dataclass
class DecodeResult:
    output_ids: list[int]
    """New tokens only."""
    accept_lengths: list[int] = field(default_factory=list)
    """Tokens emitted per step (accepted drafts + 1, fewer where EOS or the budget cut the step); sums to
    len(output_ids). Spec-Bench's accept_lengths."""
    accepted_drafts: list[int] = field(default_factory=list)
    """Draft tokens accepted *and emitted* per step."""
    draft_depths: list[int] = field(default_factory=list)
    """Depth of the tree verified at each step (0 = no draft)."""
    stop_reason: str = ""
    """'eos' | 'max_new_tokens' | 'context'."""
    draft_time: float = 0.0
    """Seconds in drafter.propose (of the batched steps this request took part in)."""
    verify_time: float = 0.0
    """Seconds in the target's tree forward and the acceptance."""
    prefill_time: float = 0.0
    """Seconds prefilling the prompt (target and drafter)."""
    other_time: float = 0.0
    """The rest of wall_time: cache commit, bookkeeping, and waiting for other rows (their prefills too)."""
    wall_time: float = 0.0
    """Seconds from admission to the last token."""

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def tau(self) -> float:
        """Mean tokens per target forward, bonus included (1.0 for autoregressive decoding)."""
        return sum(self.accept_lengths) / max(1, self.steps)


@dataclass
class StepState:
    """What a step hook sees of one row after commit (tests compare the cache with a fresh prefill)."""

    tokens: list[int]
    L: int
    cache: object
    """This row's cache (a one-row view)."""
    path: list[int]
    row: int


@dataclass(eq=False)  # identity: two requests with the same prompt and state are still two rows
class Request:
    """One request's parameters and decoding state (the engine's row `slot` while it is admitted)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    draft_gen: Optional[torch.Generator] = None
    verify_gen: Optional[torch.Generator] = None
    tokens: list[int] = field(default_factory=list)
    """Prompt + emitted tokens; the last one (the tree root) is not in the cache yet."""
    L: int = 0
    """Committed length: tokens[:L] have their KV / SSM state in the target cache."""
    slot: int = -1
    result: DecodeResult = field(default_factory=lambda: DecodeResult([]))
    sampler: object = None
    """Per-request draft sampler (runtime.sampling.TorchDraftSampler over draft_gen)."""
    t_start: float = 0.0
    prefilled: int = 0
    """Prompt tokens whose KV / state is in the cache while the request waits in `Engine.prefilling`."""
    device_gen: Optional[torch.Generator] = None
    """The resident step's acceptance noise generator on the device (`Engine._accept_packed`), seeded from
    verify_gen when first needed."""

    @property
    def emitted(self) -> int:
        return len(self.result.output_ids)


class Engine:
    def __init__(self, target, cache, drafter, *, max_seq_len: int, eos_ids: Sequence[int] = (),
                 kv_window: str = "live", prefill_chunk: int = 0, verify_head: str = "full",
                 on_step: Optional[Callable[[StepState], None]] = None, record_shapes: bool = False,
                 acceptor: Optional[Callable] = None, defer_drafter: bool = False, resident: Optional[bool] = None):
        """cache: the target's cache with `cache.rows` rows (the most requests decoded together);
        prefill_chunk: prompt tokens per prefill forward (0 = the whole prompt in one); verify_head: "full" runs
        the LM head over every tree node of the verify forward, "path" only over the nodes the acceptance
        walk reaches (`runtime.sampling.NodeLogits`: one head call of B rows per accepted level); record_shapes: keep
        the (B, T, S) of every verify forward in `shapes` (tests of the static-shape contract); defer_drafter: a
        joining request's drafter prefill waits for its first drafted step (serving, where the policy may pick
        k = 0: then the drafter costs nothing), else it runs when the request joins (bench and generate, whose
        prefill time then holds the drafter's too); resident: all-greedy steps keep the verify logits on the device
        and accept there (`codegen.fused_accept`, or the artifact's acceptance program), the host reading one small
        tensor per step (None: on every device but the CPU, where reading logits costs nothing, when Triton imports:
        the walk's CUDA implementation is a Triton kernel)."""
        assert kv_window in ("live", "full"), kv_window
        assert verify_head in ("full", "path"), verify_head
        self.verify_head = verify_head
        self.acceptor, self.defer_drafter = acceptor, defer_drafter
        """backend=compiled: acceptor(tree, logits) -> the packed greedy acceptance [B, T + 2] (`AcceptPhase`) or None,
        for all-greedy batches whose logits are a tensor (runtime/compiled.py); None (or a None answer): the fused
        acceptance when resident, else runtime.sampling.accept."""
        self.target, self.cache, self.drafter = target, cache, drafter
        self.max_seq_len, self.eos = max_seq_len, frozenset(eos_ids)
        self.kv_window, self.prefill_chunk, self.on_step = kv_window, prefill_chunk, on_step
        self.device = next(target.parameters()).device
        if resident is None:  # the fused walk's CUDA implementation is a Triton kernel
            resident = not devices.on_host(self.device) and importlib.util.find_spec("triton") is not None
        self.resident = resident
        self.rows: list[Request] = []
        """The decoding requests; row b of the cache is rows[b]'s."""
        self.prefilling: list[Request] = []
        """Admitted requests whose prompt is still being prefilled, in rows len(rows).. in admission order."""
        self.shapes: Optional[list[tuple]] = [] if record_shapes else None
        """(B, T, S) of every verify forward (record_shapes), else None."""

    @property
    def capacity_rows(self) -> int:
        return self.cache.rows

    def _kv_len(self, need: int) -> int:
        return need if self.kv_window == "live" else self.cache.capacity

    # ---- admission ---------------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        """Reserve the next free row for `req`; its prompt is prefilled by `prefill()` (possibly over several
        calls, interleaved with steps), after which it joins the decoding rows."""
        if not req.prompt_ids:
            raise InputError("prompt", "is empty after tokenization")
        if len(req.prompt_ids) >= self.max_seq_len:
            raise InputError("prompt", f"{len(req.prompt_ids)} tokens do not fit the context "
                             f"(target.max_seq_len={self.max_seq_len} leaves no room to generate)")
        assert len(self.rows) + len(self.prefilling) < self.capacity_rows, "no free row"
        req.t_start = time.perf_counter()
        req.slot = len(self.rows) + len(self.prefilling)
        req.tokens = list(req.prompt_ids)
        req.L = len(req.tokens) - 1
        req.prefilled = 0
        req.result = DecodeResult([])
        req.sampler = TorchDraftSampler(req.draft_gen)
        req.device_gen = None
        self.prefilling.append(req)

    def add(self, req: Request) -> None:
        """Prefill `req` into the next free row (the whole prompt now)."""
        self.admit(req)
        self.prefill()

    @torch.inference_mode()
    def prefill(self, budget: Optional[int] = None) -> list[Request]:
        """Prefill waiting requests in admission order, up to `budget` prompt tokens in all (None: every one to
        the end), in forwards of at most `prefill_chunk` tokens. A request whose prompt is in the cache joins
        the decoding rows (its drafter row starts then, `defer_drafter` aside). Returns the requests that joined."""
        joined = []
        while self.prefilling and (budget is None or budget > 0):
            req = self.prefilling[0]
            t0 = time.perf_counter()
            n = req.L - req.prefilled
            if budget is not None:
                n = min(n, budget)
                budget -= n
            chunk = self.prefill_chunk or max(1, n)
            view = self.cache.view_rows(req.slot, req.slot + 1)
            for lo in range(req.prefilled, req.prefilled + n, chunk):
                part = req.tokens[lo:min(lo + chunk, req.prefilled + n)]
                block = Block.causal(lo, len(part), 1, self._kv_len(lo + len(part)), device=self.device)
                self.target.hidden(to_device(torch.tensor([part]), self.device), block.positions, view, block,
                                   num_rows=0)
            req.prefilled += n
            if req.prefilled == req.L:
                self.prefilling.pop(0)
                assert req.slot == len(self.rows)
                self.drafter.start(req.slot, req.tokens, self.defer_drafter)
                self.rows.append(req)
                joined.append(req)
            req.result.prefill_time += time.perf_counter() - t0
        return joined

    def cancel(self, req: Request) -> None:
        """Drop a decoding or prefilling request now (stop_reason 'cancelled'); its row is freed."""
        if req in self.rows:
            req.result.stop_reason = "cancelled"
            self._finish(req)
        elif req in self.prefilling:
            req.result.stop_reason = "cancelled"
            j = self.prefilling.index(req)
            self.prefilling.pop(j)
            self._shift_prefilling(j, req.slot)
            req.slot = -1

    def _shift_prefilling(self, j: int, free: int) -> None:
        """Prefilling requests j.. move down one row each, the first into row `free` (rows stay contiguous)."""
        for p in self.prefilling[j:]:
            self.cache.copy_row(p.slot, free)
            p.slot, free = free, p.slot

    # ---- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()  # no autograd bookkeeping at all: measurably less per-op overhead than no_grad on CPU
    def step(self, depth_limit: Optional[Sequence[int]] = None) -> list[Request]:
        """One batched step over every decoding request; returns the requests that finished (their rows freed).
        depth_limit[b]: the most draft levels row b may verify this step (0 = none; the serving policy's
        speculation length), on top of its remaining budget."""
        rows = self.rows
        B = len(rows)
        t0 = time.perf_counter()
        remaining = [min(r.max_new_tokens - r.emitted, self.max_seq_len - len(r.tokens)) for r in rows]
        max_depth = [m - 1 for m in remaining]
        if depth_limit is not None:
            max_depth = [min(m, k) for m, k in zip(max_depth, depth_limit)]
        tree = self.drafter.propose(rows, max_depth)
        t1 = time.perf_counter()
        lengths = [r.L for r in rows]
        block = Block.tree(torch.tensor(lengths), tree, self._kv_len(max(lengths) + tree.T), device=self.device)
        if self.shapes is not None:
            self.shapes.append((B, tree.T, block.S))
        tokens = to_device(tree.tokens, self.device)
        args = (tokens, block.positions, self.cache.view_rows(0, B), block)
        greedy = all(r.sampling.greedy for r in rows)
        resident = self.resident and self._fusable(tree, rows)
        if self.verify_head == "path" and tree.T > 1 and not resident:
            logits = NodeLogits(self.target.hidden(*args), self.target.logits)
        else:
            logits = self.target(*args)
            if not resident:
                logits = logits.cpu()
        accepted = self._accept_packed(tree, tokens, logits, rows) if (greedy or resident) \
            and isinstance(logits, torch.Tensor) else None
        if accepted is None:
            logits = logits.cpu() if isinstance(logits, torch.Tensor) else logits
            paths, nxt = accept(tree, logits, [r.sampling for r in rows], [r.verify_gen for r in rows])
            toks = tree.tokens.tolist()
        else:
            paths, nxt, toks = accepted
        t2 = time.perf_counter()
        self.cache.commit(lengths, paths)
        done = []
        for b, r in enumerate(rows):
            path = paths[b]
            res = r.result
            new = [toks[b][i] for i in path[1:]] + [nxt[b]]
            stop = next((i for i, x in enumerate(new) if x in self.eos), None)
            if stop is not None:
                new = new[:stop + 1]
            r.L += len(path)
            r.tokens += new
            res.output_ids += new
            res.accept_lengths.append(len(new))
            res.accepted_drafts.append(min(len(path) - 1, len(new)))
            res.draft_depths.append(tree.topologies[b].max_depth)
            res.draft_time += t1 - t0
            res.verify_time += t2 - t1
            if self.on_step is not None:
                self.on_step(StepState(r.tokens, r.L, self.cache.view_rows(b, b + 1), path, b))
            if stop is not None:
                res.stop_reason = "eos"
            elif r.emitted >= r.max_new_tokens:
                res.stop_reason = "max_new_tokens"
            elif len(r.tokens) >= self.max_seq_len:
                res.stop_reason = "context"
            if res.stop_reason:
                done.append(r)
        for r in done:
            self._finish(r)
        return done

    @staticmethod
    def _fusable(tree, rows) -> bool:
        """Whether the fused device walk accepts this batch exactly: greedy rows, and sampled rows whose tree has
        only deterministic children (top-b, retrieved: no `draft_probs`) under the auto or sample-match rule. For
        a deterministic child, recursive rejection sampling with its delta proposal and sample-match (draw y ~ q
        at the node, follow the child whose token is y) have the same law (codegen/fused_accept.py)."""
        if all(r.sampling.greedy for r in rows):
            return True
        return tree.draft_probs is None and all(
            r.sampling.greedy or r.sampling.acceptance in (AcceptanceRule.auto, AcceptanceRule.sample_match)
            for r in rows)

    def _accept_packed(self, tree, tokens: torch.Tensor, logits: torch.Tensor, rows):
        """Acceptance as one packed tensor [B, T + 2] (path nodes, length, next token), read by the host together
        with the tree's tokens: the step's one synchronisation on a device. All-greedy batches: the artifact's
        acceptance program or the fused greedy walk; with sampled rows (resident, `_fusable`): the fused walk in
        sample-match mode, scores = log q of each sampled row (temperature, top-k, top-p on the device) and Gumbel
        noise from the request's own device generator (seeded once from its verify generator, so a request
        samples the same alone or in any batch), zero noise and raw logits for greedy rows.
        -> (paths, next tokens, tokens [B][T]), or None where no fused walk applies, or a row met non-finite
        scores (the host walk then raises for it: runtime.sampling.NumericsError)."""
        from codegen import ops  # noqa: F401  (registers torch.ops.spec: the Triton walk on CUDA)
        T = tree.T
        if all(r.sampling.greedy for r in rows):
            packed = self.acceptor(tree, logits) if self.acceptor is not None else None
            if packed is None and self.resident:
                packed = torch.ops.spec.fused_accept(logits, to_device(tree.parents, self.device), tokens, T - 1, None)
        elif self.resident:
            scores, noise = [], []
            for b, r in enumerate(rows):
                if r.sampling.greedy:
                    scores.append(logits[b])
                    noise.append(torch.zeros(T, logits.shape[-1], device=logits.device))
                    continue
                sp = r.sampling
                q = target_probs(logits[b], sp.temperature, sp.top_k, sp.top_p, check=False)  # [T, V] float64
                scores.append(q.log().float())  # -inf outside the support
                if r.device_gen is None:
                    r.device_gen = torch.Generator(device=logits.device).manual_seed(
                        int(torch.randint(0, 2 ** 63 - 1, (), generator=r.verify_gen)))
                # noise for this row's own walk (its tree's depth + 1 draws), not the batch's bucket: what a request
                # consumes from its generator must not depend on the other rows
                steps = tree.topologies[b].max_depth + 1
                u = torch.rand(steps, logits.shape[-1], generator=r.device_gen, device=logits.device)
                g = -torch.log(-torch.log(u.clamp_(min=1e-20)))  # Gumbel(0, 1), finite
                noise.append(torch.nn.functional.pad(g, (0, 0, 0, T - steps)))
            packed = torch.ops.spec.fused_accept(torch.stack(scores), to_device(tree.parents, self.device), tokens,
                                                 T - 1, torch.stack(noise))
        else:
            packed = None
        if packed is None:
            return None
        host = to_host(torch.cat([packed, tokens], 1)).tolist()  # [B, (T + 2) + T]
        paths, nxt = [r[:r[T]] for r in host], [r[T + 1] for r in host]
        if min(nxt) < 0:
            return None
        return paths, nxt, [r[T + 2:] for r in host]

    def _finish(self, req: Request) -> None:
        """req leaves; the last row moves into its row."""
        res = req.result
        res.wall_time = time.perf_counter() - req.t_start
        res.other_time = res.wall_time - res.prefill_time - res.draft_time - res.verify_time
        b, last = self.rows.index(req), len(self.rows) - 1
        if b != last:
            moved = self.rows[last]
            self.cache.copy_row(last, b)
            self.drafter.move(last, b)
            moved.slot = b
            self.rows[b] = moved
        self.rows.pop()
        if self.prefilling:
            self._shift_prefilling(0, last)
        req.slot = -1

    # ---- many requests -------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request]) -> list[DecodeResult]:
        """Decode every request, up to `cache.rows` at a time; a finished request's row goes to the next one
        waiting (continuous batching in arrival order). Results in request order."""
        waiting = list(requests)[::-1]
        while waiting or self.rows:
            while waiting and len(self.rows) < self.capacity_rows:
                req = waiting.pop()
                self.add(req)
                if req.max_new_tokens <= 0 or len(req.tokens) >= self.max_seq_len:  # nothing to generate
                    req.result.stop_reason = "max_new_tokens" if req.max_new_tokens <= 0 else "context"
                    self._finish(req)
            if self.rows:
                self.step()
        return [r.result for r in requests]


def decode(target, cache, drafter, prompt_ids: list[int], *, max_new_tokens: int, max_seq_len: int,
           eos_ids: tuple[int, ...] = (), sampling: SamplingParams = SamplingParams(),
           draft_gen: Optional[torch.Generator] = None, verify_gen: Optional[torch.Generator] = None,
           on_step: Optional[Callable[[StepState], None]] = None, kv_window: str = "live") -> DecodeResult:
    """One request through the engine (batch 1)."""
    engine = Engine(target, cache, drafter, max_seq_len=max_seq_len, eos_ids=eos_ids, kv_window=kv_window,
                    on_step=on_step)
    return engine.generate([Request(list(prompt_ids), max_new_tokens, sampling, draft_gen, verify_gen)])[0]


def per_position_acceptance(results: list[DecodeResult]) -> list[float]:
    """P(draft position j accepted and emitted | the step drafted position j), j = 0..max depth - 1."""
    depth = max((d for r in results for d in r.draft_depths), default=0)
    hit, tried = [0] * depth, [0] * depth
    for r in results:
        for a, d in zip(r.accepted_drafts, r.draft_depths):
            for j in range(d):
                tried[j] += 1
                hit[j] += a > j
    return [h / t if t else 0.0 for h, t in zip(hit, tried)]
