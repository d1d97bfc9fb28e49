"""Target distributions and the one verifier rule (ALGORITHMS.md §0.2-0.3).

Terminology (as in vLLM's rejection sampler):
- *accepted* tokens: draft nodes on the verified path, each accepted by the node-level rule;
- *recovered* token: drawn from the residual distribution when every child of a node is rejected;
- *bonus* token: drawn from the target at a node with no children (the whole path was accepted).
Each step emits `len(accepted) + 1` tokens (τ counts the bonus).

`q` below is the target's distribution after temperature, top-k and top-p; `p` is the drafter
distribution that generated a node's children. A child's *proposal* `r_k` follows from how it was made:
deterministic -> δ(x_k); i.i.d. -> p; without replacement -> p with earlier siblings removed and
renormalised. The node rule is recursive rejection sampling (RRS): accept child k with probability
min(1, res[x_k] / r_k[x_k]), otherwise res <- normalize(max(res - r_k, 0)) and try the next child; after
the last child, draw from res. Lossless whenever r_k is the law child k was really drawn from.

`rrs_step` and `child_proposal` are the single implementation of that rule: the sampled verifier walks
the tree with them, and the exact-enumeration tests enumerate over them.
"""
from __future__ import annotations

import enum
import math
from typing import Sequence

import torch

from spec_compiler.errors import InputError
from spec_compiler.tree import DraftTree


# Lower-case names are canonical (config files spell them so); upper-case names are aliases.
class ChildKind(str, enum.Enum):
    deterministic = "deterministic"
    """top-k / static / retrieval / n-gram pick: proposal δ(x)."""
    iid = "iid"
    """sampled with replacement from p: proposal p for every sibling."""
    wor = "wor"
    """sampled without replacement (Gumbel-top-k): p minus earlier siblings, renormalised."""
    DETERMINISTIC = "deterministic"
    IID = "iid"
    WOR = "wor"


class AcceptanceRule(str, enum.Enum):
    auto = "auto"
    """RRS with each child's true proposal (derived from ChildKind). Always lossless."""
    sample_match = "sample_match"
    """Draw y ~ q at each node and follow the child equal to y. Always lossless, accepts less."""
    rrs_draft_probs = "rrs_draft_probs"
    """RRS using the raw drafter p for every child. Lossless only for i.i.d. children."""
    rrs_wor = "rrs_wor"
    """RRS using p minus earlier siblings for every child. Lossless only for WOR children."""
    AUTO = "auto"
    SAMPLE_MATCH = "sample_match"
    RRS_DRAFT_PROBS = "rrs_draft_probs"
    RRS_WOR = "rrs_wor"


class NumericsError(InputError):
    """Non-finite or empty distributions: fail closed rather than emit a wrong token."""


# ---------------------------------------------------------------------------------------------------
# target distribution
# ---------------------------------------------------------------------------------------------------
def target_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> q [..., V] float64 after temperature, top-k (0 = off), top-p (1.0 = off).

    Top-k keeps ties at the k-th value out; top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches top_p (always at least one token), as HF's TopPLogitsWarper.
    """
    if temperature <= 0:
        raise ValueError("target_probs needs temperature > 0; greedy uses argmax")
    x = logits.to(torch.float64)
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


def check_finite(logits: torch.Tensor) -> None:
    """Raise NumericsError if any value is NaN or +-Inf. One min/max pass (NaN propagates into both): on
    CPU an order of magnitude cheaper than isfinite().all() over a [n, V] block, and every step runs it."""
    lo, hi = torch.aminmax(logits)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NumericsError("logits", "non-finite target logits (NaN or Inf)")


def greedy_token(logits: torch.Tensor) -> int:
    """argmax of a [V] logit row (lowest id on exact ties)."""
    check_finite(logits)
    return int(torch.argmax(logits))


def sample_from(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    """One draw from a [V] probability row (zero-probability ids are never drawn)."""
    return int(torch.multinomial(probs, 1, generator=gen))


# ---------------------------------------------------------------------------------------------------
# the node-level rule
# ---------------------------------------------------------------------------------------------------
def child_proposal(kind: ChildKind, rule: AcceptanceRule, p: torch.Tensor, x: int,
                   earlier: Sequence[int]) -> torch.Tensor:
    """The proposal r_k [V] used in child k's acceptance ratio.

    kind: how the child was generated; rule: which proposal the verifier is told to use (AUTO = the
    true one); p: drafter distribution at the parent [V] (zeros for a deterministic drafter); x: the child's token; earlier: tokens of the
    siblings generated before it.
    """
    if rule is AcceptanceRule.auto:
        rule = {ChildKind.deterministic: None, ChildKind.iid: AcceptanceRule.rrs_draft_probs,
                ChildKind.wor: AcceptanceRule.rrs_wor}[kind]
    if rule is None:
        r = torch.zeros_like(p)
        r[x] = 1.0
        return r
    if rule is AcceptanceRule.rrs_draft_probs:
        return p
    if rule is AcceptanceRule.rrs_wor:
        r = p.clone()
        if earlier:
            r[list(earlier)] = 0.0
        s = r.sum()
        return r / s if s > 0 else r
    raise AssertionError(f"no proposal for rule {rule}")


def rrs_step(res: torch.Tensor, x: int, r: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """One stage of recursive rejection sampling.

    res: current residual target [V] (sums to 1); x: the child's token; r: its proposal [V].
    Returns (probability of accepting x, residual after rejecting it). The residual is None when
    rejection has probability zero (only rounding can reach it; the caller stops trying children).
    """
    rx = float(r[x])
    if rx <= 0.0:  # the child could not have been proposed; never accept it, residual unchanged
        return 0.0, res
    a = min(1.0, float(res[x]) / rx)
    m = torch.clamp(res - r, min=0.0)
    s = float(m.sum())
    if s <= 1e-300:
        return a, None
    return a, m / s


# ---------------------------------------------------------------------------------------------------
# the verification walk
# ---------------------------------------------------------------------------------------------------
def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy walk. logits [n, V]: the target's logits at each node.

    Returns (accepted path of node ids, root first) and the next token (recovered or bonus).
    """
    topo, node, path = tree.topology, 0, [0]
    check_finite(logits)
    while True:
        y = int(torch.argmax(logits[node]))  # as greedy_token (lowest id on ties); checked once above
        nxt = next((c for c in topo.children[node] if tree.tokens[c] == y), None)
        if nxt is None:
            return path, y
        path.append(nxt)
        node = nxt


def verify_sampling(tree: DraftTree, q: torch.Tensor, rule: AcceptanceRule,
                    gen: torch.Generator | None) -> tuple[list[int], int]:
    """Sampling walk (§0.2) with the RRS node rule (§0.3). q [n, V] float64: target distributions.

    Uniforms come from `gen` in a fixed order, so a seed reproduces the step exactly.
    """
    topo, node, path = tree.topology, 0, [0]
    while True:
        kids = topo.children[node]
        if not kids:
            return path, sample_from(q[node], gen)  # bonus
        if rule is AcceptanceRule.sample_match:
            y = sample_from(q[node], gen)
            nxt = next((c for c in kids if tree.tokens[c] == y), None)
            if nxt is None:
                return path, y
            path.append(nxt)
            node = nxt
            continue
        kind = ChildKind(tree.child_kind[node])
        p = tree.draft_probs[node] if tree.draft_probs is not None else torch.zeros_like(q[node])
        res, accepted, earlier = q[node], None, []
        for c in kids:
            x = tree.tokens[c]
            a, nxt_res = rrs_step(res, x, child_proposal(kind, rule, p, x, earlier))
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            if u < a:
                accepted = c
                break
            earlier.append(x)
            if nxt_res is None:
                break
            res = nxt_res
        if accepted is None:
            return path, sample_from(res, gen)  # recovered
        path.append(accepted)
        node = accepted
