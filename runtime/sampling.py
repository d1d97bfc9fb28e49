"""Target distributions, drafter child sampling, and acceptance for the batched step (ALGORITHMS.md §0.2-0.3).

Terminology (as in vLLM's rejection sampler):
- *accepted* tokens: draft nodes on the verified path, each accepted by the node-level rule;
- *recovered* token: drawn from the residual distribution when every child of a node is rejected;
- *bonus* token: drawn from the target at a node with no children (the whole path was accepted).
Each step emits `len(accepted) + 1` tokens (τ counts the bonus).

`q` below is the target's distribution after temperature, top-k and top-p; `p` is the drafter
distribution that generated a node's children (`TreeBatch.draft_probs` at the parent). A child's
*proposal* `r` follows from its own provenance (`spec_compiler.tree.Provenance`): topk / retrieved ->
δ(x); iid -> p; wor -> p with the earlier WOR siblings' tokens removed, renormalised. One parent may mix
them (sampled children first, then retrieved ones). The node rule is recursive rejection sampling (RRS):
accept child k with probability min(1, res[x_k] / r_k[x_k]), otherwise res <- normalize(max(res - r_k, 0))
and try the next child; after the last child, draw from res. Lossless whenever r_k is the law child k was
really drawn from. `child_proposal` and `rrs_step` are the single implementation of that rule, on tensors
of any leading shape: the batched acceptance (`accept_sampled`, rows at once) and the per-row reference
walk (`walk_sampled`) both call them.

Randomness: every random decision of a walk goes through a *chooser*. In the engine the chooser reads a
fixed block of uniforms per row (`draw_uniforms`: column i drives node i's acceptance test, column 0 the
final draw), so a request consumes the same randomness whatever its batch, and the batched and reference
walks given the same uniforms make identical decisions. The exact-enumeration tests pass a chooser that
enumerates every outcome with its probability instead.

Shape legend: B rows, T nodes (bucket), V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor

from runtime.batch import TreeBatch
from spec_compiler.errors import InputError
from spec_compiler.schema import AcceptanceRule, ChildKind
from spec_compiler.tree import Provenance

__all__ = ["AcceptanceRule", "ChildKind", "NumericsError", "SamplingParams", "target_probs", "row_target_probs",
           "check_finite", "greedy_token", "child_proposal", "removes_later", "rrs_step", "inverse_cdf",
           "draw_uniforms", "Uniforms", "accept_greedy", "walk_greedy", "accept_sampled", "walk_sampled",
           "accept", "DraftSampler", "TorchDraftSampler", "NodeLogits", "NodeProbs"]

IID, WOR = int(Provenance.iid), int(Provenance.wor)


class NumericsError(InputError):
    """Non-finite or empty distributions: fail closed rather than emit a wrong token."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (temperature 0: greedy)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    acceptance: AcceptanceRule = AcceptanceRule.auto

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------------------------------------------
# target distribution
# ---------------------------------------------------------------------------------------------------
def target_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, check: bool = True) -> Tensor:
    """logits [..., V] -> q [..., V] float64 after temperature, top-k (0 = off), top-p (1.0 = off).

    Top-k keeps ties at the k-th value out; top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches top_p (always at least one token), as HF's TopPLogitsWarper.
    check=False skips the finiteness check (a host read; the device acceptance flags non-finite rows itself).
    """
    if temperature <= 0:
        raise ValueError("target_probs needs temperature > 0; greedy uses argmax")
    x = logits.to(torch.float64)
    if check:
        check_finite(x)
    x = x / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    q = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sq, idx = torch.sort(q, dim=-1, descending=True)
        before = torch.cumsum(sq, dim=-1) - sq  # mass strictly before each sorted token
        drop = before >= top_p
        drop[..., 0] = False
        sq = sq.masked_fill(drop, 0.0)
        q = torch.zeros_like(q).scatter(-1, idx, sq)
        q = q / q.sum(-1, keepdim=True)
    return q


def row_target_probs(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """logits [B, T, V] -> q [B, T, V] float64, row b under params[b] (rows with equal settings together)."""
    groups: dict[tuple, list[int]] = {}
    for b, sp in enumerate(params):
        groups.setdefault((sp.temperature, sp.top_k, sp.top_p), []).append(b)
    if len(groups) == 1:
        return target_probs(logits, *next(iter(groups)))
    q = torch.empty(logits.shape, dtype=torch.float64)
    for key, rows in groups.items():
        q[rows] = target_probs(logits[rows], *key)
    return q


def check_finite(logits: Tensor) -> None:
    """Raise NumericsError if any value is NaN or +-Inf. One min/max pass (NaN propagates into both): on
    CPU an order of magnitude cheaper than isfinite().all() over a [n, V] block, and every step runs it."""
    lo, hi = torch.aminmax(logits)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NumericsError("logits", "non-finite target logits (NaN or Inf)")


def greedy_token(logits: Tensor) -> int:
    """argmax of a [V] logit row (lowest id on exact ties)."""
    check_finite(logits)
    return int(torch.argmax(logits))


# ---------------------------------------------------------------------------------------------------
# the node-level rule (any leading shape: [] in the reference walk, [B] in the batched one)
# ---------------------------------------------------------------------------------------------------
def child_proposal(prov: Tensor, rule: AcceptanceRule, p: Tensor, x: Tensor, earlier: Tensor) -> Tensor:
    """The proposal r [..., V] in a child's acceptance ratio.

    prov [...]: the child's Provenance; rule: which proposal the verifier uses (auto = the true one from
    provenance; the others override it for every child); p [..., V]: the drafter distribution at the parent
    (zeros for a deterministic drafter); x [...]: the child's token; earlier [..., V] bool: tokens of the
    earlier siblings a WOR proposal removes (see `removes_later`).
    """
    if rule is AcceptanceRule.rrs_draft_probs:
        return p
    kept = p.masked_fill(earlier, 0.0)
    s = kept.sum(-1, keepdim=True)
    wor = torch.where(s > 0, kept / torch.where(s > 0, s, 1.0), kept)
    if rule is AcceptanceRule.rrs_wor:
        return wor
    assert rule is AcceptanceRule.auto, f"no proposal for rule {rule}"
    delta = torch.zeros_like(p).scatter_(-1, x.unsqueeze(-1), 1.0)
    prov = prov.unsqueeze(-1)
    return torch.where(prov == IID, p, torch.where(prov == WOR, wor, delta))


def removes_later(prov: Tensor, rule: AcceptanceRule) -> Tensor:
    """[...] bool: a child's token leaves the proposals of its later siblings (it was a WOR draw; under
    rrs_wor every child counts as one)."""
    return torch.ones_like(prov, dtype=torch.bool) if rule is AcceptanceRule.rrs_wor else prov == WOR


def rrs_step(res: Tensor, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One stage of recursive rejection sampling.

    res [..., V]: current residual target (sums to 1); x [...]: the child's token; r [..., V]: its proposal.
    Returns (a [...]: probability of accepting x, res' [..., V]: the residual after rejecting it,
    stop [...] bool: rejection has probability zero (only rounding reaches it): the walk keeps res and
    tries no more children). A child its proposal could not have produced (r[x] = 0) is never accepted
    and leaves res unchanged.
    """
    rx = r.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    qx = res.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    ok = rx > 0
    a = torch.where(ok, torch.clamp(qx / torch.where(ok, rx, 1.0), max=1.0), 0.0)
    m = torch.clamp(res - r, min=0.0)
    s = m.sum(-1)
    stop = ok & (s <= 1e-300)
    nxt = torch.where((ok & ~stop).unsqueeze(-1), m / torch.where(stop, 1.0, s).unsqueeze(-1), res)
    return a, nxt, stop


def inverse_cdf(w: Tensor, u: Tensor) -> Tensor:
    """[...] long: the id drawn from nonnegative weights w [..., V] by one uniform u [...] in [0, 1): the
    first id whose cumulative weight exceeds u * sum(w), so a zero-weight id is never picked (the last
    positive id when rounding runs past the end)."""
    c = torch.cumsum(w, -1)
    t = (u * c[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(c, t, right=True).squeeze(-1)
    V = w.shape[-1]
    last = V - 1 - torch.argmax((w.flip(-1) > 0).to(torch.uint8), dim=-1)
    return torch.where(idx < V, idx, last)


# ---------------------------------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------------------------------
def draw_uniforms(gens: Sequence[Optional[torch.Generator]], T: int) -> Tensor:
    """[B, T] float64 uniforms for one step, row b from gens[b]: column i drives node i's acceptance test
    (sample-match: node i's draw), column 0 the final (bonus / recovered) draw.

    Each row takes exactly one 63-bit seed from its generator per step and expands it on a private stream,
    whose first values do not depend on T: a request sees the same uniforms, and leaves its generator in
    the same state, whatever its batch and the batch's size bucket."""
    out = torch.empty(len(gens), T, dtype=torch.float64)
    for b, g in enumerate(gens):
        seed = int(torch.randint(0, 2 ** 63 - 1, (), generator=g, dtype=torch.int64))
        out[b] = torch.rand(T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return out


class Uniforms:
    """The engine's chooser: decisions from pre-drawn uniforms u [B, >= T] (see `draw_uniforms`).

    The batched walk calls it with [B] tensors, the reference walk with one row (`Uniforms(u_b[None])`,
    ints); both compare the same values, so they decide alike."""

    def __init__(self, u: Tensor):
        self.u = u  # [B, N] float64

    def accept(self, nodes: Tensor, a: Tensor, active: Tensor) -> Tensor:
        """[B] bool: accept child nodes[b] (acceptance probability a[b]); only `active` rows count."""
        return self.u.gather(1, nodes[:, None])[:, 0] < a

    def draw(self, w: Tensor, nodes: Tensor, active: Tensor) -> Tensor:
        """[B] long: an id from weights w [B, V] at node nodes[b] (sample-match)."""
        return inverse_cdf(w, self.u.gather(1, nodes[:, None])[:, 0])

    def final(self, w: Tensor) -> Tensor:
        """[B] long: the bonus / recovered token from weights w [B, V]."""
        return inverse_cdf(w, self.u[:, 0])


class Chooser(Protocol):
    def accept(self, nodes: Tensor, a: Tensor, active: Tensor) -> Tensor: ...

    def draw(self, w: Tensor, nodes: Tensor, active: Tensor) -> Tensor: ...

    def final(self, w: Tensor) -> Tensor: ...


# ---------------------------------------------------------------------------------------------------
# the target's outputs at tree nodes, all at once or as the walk reaches them
# ---------------------------------------------------------------------------------------------------
class NodeLogits:
    """The target's logits at tree nodes, computed when a walk reaches them: from the verify forward's final
    hidden states h [B, T, E] and the model's head. A walk stands at one node per row per depth level, so
    it runs the head over at most B rows per level instead of all B*T nodes up front (the head is the
    widest matmul of a step). Same logits as the full head, row for row."""

    def __init__(self, h: Tensor, head):
        self.h, self.head = h, head  # h: [B, T, E]; head: [n, E] -> [n, V] fp32

    @classmethod
    def of(cls, logits: Tensor) -> "NodeLogits":
        """Already computed logits [B, T, V] behind the same interface."""
        out = cls.__new__(cls)
        out.h, out.head = logits, None
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.h.shape[:2])

    def at(self, rows: Tensor, nodes: Tensor) -> Tensor:
        """rows, nodes: [n] -> [n, V] fp32 logits on the CPU (finite, else NumericsError)."""
        if self.head is None:
            out = self.h[rows, nodes]
        else:
            dev = self.h.device
            out = self.head(self.h[rows.to(dev), nodes.to(dev)]).cpu()
        check_finite(out)
        return out

    def select_rows(self, idx: Sequence[int]) -> "NodeLogits":
        out = NodeLogits.__new__(NodeLogits)
        out.h, out.head = self.h[list(idx)], self.head
        return out


class NodeProbs:
    """Target distributions q at tree nodes, from `NodeLogits` under each row's sampling parameters."""

    def __init__(self, logits: NodeLogits, params: Sequence[SamplingParams]):
        self.logits, self.params = logits, list(params)

    def at(self, rows: Tensor, nodes: Tensor) -> Tensor:
        """rows, nodes: [n] -> q [n, V] float64."""
        lg = self.logits.at(rows, nodes)
        return row_target_probs(lg[:, None], [self.params[b] for b in rows.tolist()])[:, 0]


def _node_logits(logits) -> NodeLogits:
    return logits if isinstance(logits, NodeLogits) else NodeLogits.of(logits)


# ---------------------------------------------------------------------------------------------------
# greedy acceptance
# ---------------------------------------------------------------------------------------------------
def accept_greedy(tree: TreeBatch, logits) -> tuple[list[list[int]], list[int]]:
    """Greedy acceptance of every row at once. logits: [B, T, V] or `NodeLogits` (the target's at each node).

    Level by level from the root: y = argmax at the row's current node (lowest id on ties); the walk moves
    to the first child (lowest id) whose token is y, else stops and emits y (the recovered / bonus token).
    Returns per row (accepted path of node ids, root first) and the next token: `walk_greedy` row by row.
    Logits are read only at the nodes the walk stands on (at most B rows per level).
    """
    nl = _node_logits(logits)
    B, T = tree.tokens.shape
    rows = torch.arange(B)
    if T == 1:  # root-only trees (an autoregressive step): nothing to match
        return [[0] for _ in range(B)], torch.argmax(nl.at(rows, torch.zeros(B, dtype=torch.long)), -1).tolist()
    if B == 1:  # one row: the walk with Python ints is cheaper than tensor bookkeeping
        return tuple([x] for x in walk_greedy(tree, 0, nl))
    cur = torch.zeros(B, dtype=torch.long)
    active = torch.ones(B, dtype=torch.bool)
    nxt_tok = torch.zeros(B, dtype=torch.long)
    paths = [[0] for _ in range(B)]
    while active.any():
        idx = rows[active]
        y = torch.argmax(nl.at(idx, cur[idx]), dim=-1)  # [n]
        sub_cur = cur[idx]
        kid = tree.valid[idx] & (tree.parents[idx] == sub_cur[:, None]) & (tree.tokens[idx] == y[:, None])
        has = kid.any(1)
        first = torch.argmax(kid.to(torch.uint8), dim=1)  # lowest matching id
        nxt_tok[idx] = y
        cur[idx] = torch.where(has, first, sub_cur)
        for b, h, c in zip(idx.tolist(), has.tolist(), first.tolist()):
            if h:
                paths[b].append(c)
        active[idx] = has
    return paths, nxt_tok.tolist()


def walk_greedy(tree: TreeBatch, b: int, logits) -> tuple[list[int], int]:
    """Reference for row b of `accept_greedy`: walk down from the root. logits: row b's [T, V], or the
    batch's `NodeLogits`."""
    if isinstance(logits, NodeLogits):
        row = torch.tensor([b])
        at = lambda node: logits.at(row, torch.tensor([node]))[0]  # noqa: E731
    else:
        check_finite(logits)
        at = lambda node: logits[node]  # noqa: E731
    topo, tokens = tree.topologies[b], tree.row_tokens(b)
    node, path = 0, [0]
    while True:
        y = int(torch.argmax(at(node)))
        nxt = next((c for c in topo.children[node] if tokens[c] == y), None)
        if nxt is None:
            return path, y
        path.append(nxt)
        node = nxt


# ---------------------------------------------------------------------------------------------------
# sampled acceptance (RRS, or sample-and-match)
# ---------------------------------------------------------------------------------------------------
def accept_sampled(tree: TreeBatch, q, rule: AcceptanceRule, u: Optional[Tensor] = None,
                   chooser: Optional[Chooser] = None) -> tuple[list[list[int]], list[int]]:
    """Sampled acceptance of every row at once (§0.2 walk, §0.3 node rule), depth level by level and
    sibling by sibling, rows as tensors. q: [B, T, V] float64, the target's distributions, or `NodeProbs`
    (computed at the nodes the walk reaches); u [B, >= T] float64 uniforms (`draw_uniforms`), or a
    `chooser` deciding instead. Returns what `walk_sampled` returns row by row."""
    ch = chooser if chooser is not None else Uniforms(u)
    B, T = tree.tokens.shape
    rows = torch.arange(B)
    q_at = q.at if isinstance(q, NodeProbs) else (lambda r, n: q[r, n])
    q_cur = q_at(rows, torch.zeros(B, dtype=torch.long))  # [B, V] at each row's current node
    V = q_cur.shape[-1]
    assert u is None or (u.shape[0] == B and u.shape[1] >= T), (tuple(u.shape), B, T)
    ids = torch.arange(T)
    topos = tree.topologies
    levels = max(t.max_depth for t in topos)
    width = max(max(len(c) for c in t.children) for t in topos)  # most children of one node
    cur = torch.zeros(B, dtype=torch.long)  # the node each row stands at
    active = torch.ones(B, dtype=torch.bool)  # rows still walking
    path = torch.full((B, levels + 1), -1, dtype=torch.long)
    path[:, 0] = 0
    res = q_cur  # [B, V] residual at the current node
    tok = torch.zeros(B, dtype=torch.long)  # sample-match: the draw the row stopped on
    zeros = torch.zeros(B, V, dtype=torch.float64)
    for d in range(levels + 1):
        kid = tree.valid & (tree.parents == cur[:, None])  # [B, T]: children of the current node
        if rule is AcceptanceRule.sample_match:
            y = ch.draw(q_cur, cur, active)
            match = kid & (tree.tokens == y[:, None])
            nxt = torch.where(match.any(1), torch.argmax(match.to(torch.uint8), dim=1), -1)  # first match
            tok = torch.where(active & (nxt < 0), y, tok)
        else:
            p = tree.draft_probs[rows, cur] if tree.draft_probs is not None else zeros  # [B, V]
            earlier = torch.zeros(B, V, dtype=torch.bool)
            trying, last = active, torch.full((B,), -1, dtype=torch.long)
            nxt = torch.full((B,), -1, dtype=torch.long)
            for _ in range(width):  # k-th child of every row's current node
                cand = kid & (ids[None] > last[:, None])
                c = torch.argmax(cand.to(torch.uint8), dim=1)  # lowest id after the last one tried
                has = trying & cand.any(1)
                x, prov = tree.tokens[rows, c], tree.provenance[rows, c].long()
                a, nres, stop = rrs_step(res, x, child_proposal(prov, rule, p, x, earlier))
                acc = ch.accept(c, a, has) & has
                nxt = torch.where(acc, c, nxt)
                rej = has & ~acc
                earlier[rows, x] |= rej & removes_later(prov, rule)
                res = torch.where((rej & ~stop)[:, None], nres, res)
                trying = rej & ~stop
                last = torch.where(has, c, last)
        go = active & (nxt >= 0)
        cur = torch.where(go, nxt, cur)
        if d < levels:
            path[:, d + 1] = torch.where(go, cur, -1)
        if go.any() and (d < levels or rule is AcceptanceRule.sample_match):
            moved = rows[go]
            q_cur = q_cur.clone()
            q_cur[moved] = q_at(moved, cur[moved])
            res = torch.where(go[:, None], q_cur, res)  # stopped rows keep their residual
        active = go
    if rule is not AcceptanceRule.sample_match:
        tok = ch.final(res)
    return [[i for i in r if i >= 0] for r in path.tolist()], tok.tolist()


def walk_sampled(tree: TreeBatch, b: int, q: Tensor, rule: AcceptanceRule, u: Optional[Tensor] = None,
                 chooser: Optional[Chooser] = None) -> tuple[list[int], int]:
    """Reference for row b of `accept_sampled`: the §0.2 walk, one node and one child at a time.
    q [T, V] (row b's); u [>= T] (row b's uniforms) or a one-row `chooser`."""
    ch = chooser if chooser is not None else Uniforms(u[None])
    topo, tokens, prov = tree.topologies[b], tree.row_tokens(b), tree.provenance[b].long()
    V = q.shape[-1]
    node, path = 0, [0]
    yes = torch.ones(1, dtype=torch.bool)

    def one(i: int) -> Tensor:  # a one-row node index for the chooser
        return torch.tensor([i])

    while True:
        kids = topo.children[node]
        if rule is AcceptanceRule.sample_match:
            y = int(ch.draw(q[node][None], one(node), yes)[0])
            nxt = next((c for c in kids if tokens[c] == y), None)
            if nxt is None:
                return path, y
            path.append(nxt)
            node = nxt
            continue
        p = tree.draft_probs[b, node] if tree.draft_probs is not None else torch.zeros(V, dtype=torch.float64)
        res, accepted, earlier = q[node], None, torch.zeros(V, dtype=torch.bool)
        for c in kids:
            x = torch.tensor(tokens[c])
            a, nres, stop = rrs_step(res, x, child_proposal(prov[c], rule, p, x, earlier))
            if bool(ch.accept(one(c), a[None], yes)[0]):
                accepted = c
                break
            if removes_later(prov[c], rule):
                earlier[tokens[c]] = True
            if stop:
                break
            res = nres
        if accepted is None:
            return path, int(ch.final(res[None])[0])
        path.append(accepted)
        node = accepted


def accept(tree: TreeBatch, logits: Tensor, params: Sequence[SamplingParams],
           gens: Sequence[Optional[torch.Generator]]) -> tuple[list[list[int]], list[int]]:
    """Acceptance of a mixed batch: greedy rows (temperature 0) by `accept_greedy`, sampled rows by
    `accept_sampled` against their own target distribution (`row_target_probs`), rule and generator
    (`draw_uniforms`; greedy rows draw nothing). logits: [B, T, V] or `NodeLogits`."""
    B = len(params)
    paths: list = [None] * B
    nxt: list = [None] * B
    groups: dict[Optional[AcceptanceRule], list[int]] = {}
    for b, sp in enumerate(params):
        groups.setdefault(None if sp.greedy else AcceptanceRule(sp.acceptance), []).append(b)
    for rule, idx in groups.items():
        sub = tree if len(idx) == B else tree.select_rows(idx)
        lg = logits if len(idx) == B else (logits.select_rows(idx) if isinstance(logits, NodeLogits) else logits[idx])
        if rule is None:
            out = accept_greedy(sub, lg)
        else:
            sub_params = [params[b] for b in idx]
            q = NodeProbs(lg, sub_params) if isinstance(lg, NodeLogits) else row_target_probs(lg, sub_params)
            out = accept_sampled(sub, q, rule, draw_uniforms([gens[b] for b in idx], tree.T))
        for b, pth, y in zip(idx, *out):
            paths[b], nxt[b] = pth, y
    return paths, nxt


# ---------------------------------------------------------------------------------------------------
# drafter child sampling (one sampler per request; the drafter calls it once per parent node)
# ---------------------------------------------------------------------------------------------------
class DraftSampler(Protocol):
    def children(self, p: Tensor, b: int, prov: Provenance) -> list[int]:
        """b child tokens drawn from p [V] float64 in generation order (fewer if p's support is smaller):
        prov iid = with replacement, wor = an ordered sample without replacement."""
        ...

    def gumbel(self, shape: tuple[int, ...]) -> Tensor:
        """Standard Gumbel noise of `shape`, float64 (stochastic beam search)."""
        ...


class TorchDraftSampler:
    """`DraftSampler` over a torch.Generator: multinomial (iid) and Gumbel-top-k (wor)."""

    def __init__(self, gen: Optional[torch.Generator]):
        self.gen = gen

    def children(self, p: Tensor, b: int, prov: Provenance) -> list[int]:
        b = min(b, int((p > 0).sum()))
        if b == 0:
            return []
        if prov == Provenance.iid:
            return torch.multinomial(p, b, replacement=True, generator=self.gen).tolist()
        assert prov == Provenance.wor, f"no sampling for provenance {Provenance(prov).name}"
        u = torch.rand(p.shape, generator=self.gen, dtype=torch.float64).clamp_min(1e-300)
        keys = torch.log(p) - torch.log(-torch.log(u))  # Gumbel-top-k: an ordered sample without replacement
        return torch.topk(keys, b).indices.tolist()

    def gumbel(self, shape: tuple[int, ...]) -> Tensor:
        u = torch.rand(shape, generator=self.gen, dtype=torch.float64).clamp_min(1e-300)
        return -torch.log(-torch.log(u))
