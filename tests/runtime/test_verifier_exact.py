"""Exact-enumeration tests of the verifier (TESTING.md layer 1; ALGORITHMS.md §0.2-0.3, §8.3).

fp64, no sampling noise. A tiny "model world" (vocab 3-5) gives a target q(ctx) and a drafter p(ctx)
from fixed seeded logit tables keyed by the last two tokens, so depth > 1 is meaningful. For a tree
shape and a per-node child kind we enumerate EVERY draft tree the drafting procedure can produce,
weighted by its exact probability, and for each tree the verification walk exactly, using the same
functions the engine uses (`target_probs`, `child_proposal`, `rrs_step`):

- at a node with children, child k is accepted with probability a_k times the probability that the
  earlier ones were rejected; the residual after a rejection is the one `rrs_step` returns; after the
  last child (or a `None` residual) the emitted token is drawn from the current residual;
- at a leaf the bonus token is drawn from q(node);
- under SAMPLE_MATCH, y ~ q(node) and the walk follows the first child whose token is y.

The distribution of the first m emitted tokens (padded with plain target sampling when a step emits
fewer than m) must equal the target's autoregressive m-token joint to 1e-12. The biased combinations of
§8.3 must visibly differ (> 1e-3), which is what justifies the config validator's refusals.

The helpers here (World, enumerate_drafts, walk_outcomes, ...) are reused by test_verifier_sampling.py.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pytest
import torch

from runtime.sampling import (AcceptanceRule, ChildKind, child_proposal, rrs_step,
                              target_probs)
from spec_compiler.tree import TreeTopology

TOL = 1e-12
BIAS = 1e-3
A, IID, WOR, DET = AcceptanceRule, ChildKind.IID, ChildKind.WOR, ChildKind.DETERMINISTIC


# ---------------------------------------------------------------------------------------------------
# the model world
# ---------------------------------------------------------------------------------------------------
@dataclass
class World:
    """Target and drafter over V tokens, each a seeded logit table keyed by the last `order` tokens.

    q(ctx) = target_probs(target logits, t_temp, t_top_k, t_top_p) (the engine's transform);
    p(ctx) = the same transform of the drafter's logits with the drafter's own settings.
    `same=True` makes the drafter's logits equal to the target's.
    """

    V: int
    seed: int
    order: int = 2
    t_temp: float = 1.0
    t_top_k: int = 0
    t_top_p: float = 1.0
    d_temp: float = 1.0
    d_top_k: int = 0
    scale: float = 1.5
    same: bool = False
    d_keep: tuple[int, ...] | None = None
    """VocabTrim: the drafter's head has only these token ids (p is 0 elsewhere, renormalised over them)."""
    _q: dict = field(default_factory=dict, repr=False)
    _p: dict = field(default_factory=dict, repr=False)
    _ar: dict = field(default_factory=dict, repr=False)
    _node: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.V,) * self.order + (self.V,)
        self.t_logits = torch.randn(shape, generator=g, dtype=torch.float64) * self.scale
        noise = torch.randn(shape, generator=g, dtype=torch.float64) * self.scale
        # a drafter correlated with the target, so that paths of every length have real mass
        self.d_logits = self.t_logits.clone() if self.same else 0.6 * self.t_logits + 0.8 * noise

    def key(self, ctx: Sequence[int]) -> tuple[int, ...]:
        return tuple(ctx[-self.order:])

    def q(self, ctx: Sequence[int]) -> torch.Tensor:
        k = self.key(ctx)
        if k not in self._q:
            self._q[k] = target_probs(self.t_logits[k], self.t_temp, self.t_top_k, self.t_top_p)
        return self._q[k]

    def p(self, ctx: Sequence[int]) -> torch.Tensor:
        k = self.key(ctx)
        if k not in self._p:
            if self.d_keep is None:
                self._p[k] = target_probs(self.d_logits[k], self.d_temp, self.d_top_k, 1.0)
            else:  # as ModelDrafter does with a trimmed head: softmax over the kept columns, scattered to ids
                keep = torch.tensor(self.d_keep)
                sub = target_probs(self.d_logits[k][keep], self.d_temp, self.d_top_k, 1.0)
                self._p[k] = torch.zeros(self.V, dtype=torch.float64).index_copy_(0, keep, sub)
        return self._p[k]

    def ar_joint(self, ctx: Sequence[int], m: int) -> np.ndarray:
        """The target's autoregressive joint of the next m tokens: array of shape [V]*m."""
        k = (self.key(ctx), m)
        if k not in self._ar:
            if m == 0:
                out = np.ones(())
            else:
                q = self.q(ctx).numpy()
                out = np.stack([q[x] * self.ar_joint(tuple(ctx) + (x,), m - 1) for x in range(self.V)])
            self._ar[k] = out
        return self._ar[k]


# ---------------------------------------------------------------------------------------------------
# drafting: every tree the procedure can produce, with its probability
# ---------------------------------------------------------------------------------------------------
def child_tuples(kind: ChildKind, p: torch.Tensor, b: int) -> list[tuple[tuple[int, ...], float]]:
    """All ordered b-tuples of sibling tokens a drafter of this kind can produce from p, with their
    probabilities: IID = b independent draws from p; WOR = ordered sampling without replacement
    (P(x1) = p(x1), P(x2 | x1) = p(x2) / (1 - p(x1)), ...); DETERMINISTIC = the top-b tokens of p
    (descending p, lower id first on ties), probability 1."""
    pl = p.tolist()
    V = len(pl)
    if kind is DET:
        order = sorted(range(V), key=lambda x: (-pl[x], x))
        return [(tuple(order[:b]), 1.0)]
    out = []
    if kind is IID:
        for tup in itertools.product(range(V), repeat=b):
            w = float(np.prod([pl[x] for x in tup]))
            if w > 0:
                out.append((tup, w))
        return out
    if kind is WOR:
        support = [x for x in range(V) if pl[x] > 0]
        assert len(support) >= b, "WOR needs at least b tokens in the drafter's support"
        for tup in itertools.permutations(support, b):
            w, left = 1.0, 1.0
            for x in tup:
                w *= pl[x] / left
                left -= pl[x]
            out.append((tup, w))
        return out
    raise AssertionError(kind)


def node_ctx(topo: TreeTopology, tokens: Sequence[int], ctx: tuple[int, ...], node: int) -> tuple[int, ...]:
    """Context seen at `node`: the committed context (ending with the root token) plus the path."""
    return ctx + tuple(tokens[j] for j in topo.path(node)[1:])


def enumerate_drafts(world: World, topo: TreeTopology, kinds: Sequence[ChildKind],
                     ctx: tuple[int, ...]) -> Iterator[tuple[list[int], float]]:
    """Every draft tree (token list) for this topology, with its exact probability. ctx[-1] is the
    root token; node i's children are generated from p(context of i) by kinds[i]."""
    internal = [i for i in range(topo.n) if topo.children[i]]

    def rec(j: int, tokens: list[int], w: float):
        if j == len(internal):
            yield list(tokens), w
            return
        node = internal[j]
        kids = topo.children[node]
        p = world.p(node_ctx(topo, tokens, ctx, node))
        for tup, pw in child_tuples(kinds[node], p, len(kids)):
            for c, x in zip(kids, tup):
                tokens[c] = x
            yield from rec(j + 1, tokens, w * pw)

    tokens = [-1] * topo.n
    tokens[0] = ctx[-1]
    yield from rec(0, tokens, 1.0)


# ---------------------------------------------------------------------------------------------------
# verification: every accept / reject branch and residual draw of one tree, with its probability
# ---------------------------------------------------------------------------------------------------
def node_rule(world: World, ctx: tuple[int, ...], xs: tuple[int, ...], kind: ChildKind,
              rule: AcceptanceRule) -> tuple[list[float], float, list[float]]:
    """The RRS stage sequence at one node, exactly as verify_sampling runs it.

    Returns (P(child k accepted) for each k, P(all rejected), residual the emitted token is drawn from).
    """
    key = (world.key(ctx), xs, kind, rule)  # memoised per world
    if key in world._node:
        return world._node[key]
    q, p = world.q(ctx), world.p(ctx)
    res, stay, earlier, acc = q, 1.0, [], []
    for x in xs:
        a, nres = rrs_step(res, x, child_proposal(kind, rule, p, x, earlier))
        acc.append(stay * a)
        stay *= 1.0 - a
        earlier.append(x)
        if nres is None:
            break
        res = nres
    acc += [0.0] * (len(xs) - len(acc))
    out = (acc, stay, res.tolist())
    world._node[key] = out
    return out


def walk_outcomes(world: World, topo: TreeTopology, tokens: Sequence[int], kinds: Sequence[ChildKind],
                  rule: AcceptanceRule, ctx: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], int, float]]:
    """(accepted tokens, emitted token (recovered or bonus), probability) for every verification branch."""

    def rec(node: int, c: tuple[int, ...], acc: tuple[int, ...], w: float):
        kids = topo.children[node]
        q = world.q(c).tolist()
        if not kids:  # bonus
            for y in range(world.V):
                if q[y] > 0:
                    yield acc, y, w * q[y]
            return
        if rule is A.SAMPLE_MATCH:
            for y in range(world.V):
                if q[y] <= 0:
                    continue
                nxt = next((k for k in kids if tokens[k] == y), None)
                if nxt is None:
                    yield acc, y, w * q[y]
                else:
                    yield from rec(nxt, c + (y,), acc + (y,), w * q[y])
            return
        xs = tuple(tokens[k] for k in kids)
        accp, stay, res = node_rule(world, c, xs, kinds[node], rule)
        for k, ak in zip(kids, accp):
            if ak > 0:
                yield from rec(k, c + (tokens[k],), acc + (tokens[k],), w * ak)
        if stay > 0:
            for y in range(world.V):
                if res[y] > 0:
                    yield acc, y, w * stay * res[y]

    yield from rec(0, tuple(ctx), (), 1.0)


def emitted_joint(world: World, topo: TreeTopology, kinds: Sequence[ChildKind], rule: AcceptanceRule,
                  ctx: tuple[int, ...], m: int) -> np.ndarray:
    """Exact distribution of the first m emitted tokens of one speculative step (padded with target
    sampling), averaged over every draft tree."""
    out = np.zeros((world.V,) * m)
    total = 0.0
    for tokens, wt in enumerate_drafts(world, topo, kinds, ctx):
        total += wt
        for acc, y, w in walk_outcomes(world, topo, tokens, kinds, rule, ctx):
            em = acc + (y,)
            if len(em) >= m:
                out[em[:m]] += wt * w
            else:
                out[em] += wt * w * world.ar_joint(ctx + em, m - len(em))
    assert abs(total - 1.0) < TOL, f"draft tree probabilities sum to {total}"
    return out


def accepted_count_dist(world: World, topo: TreeTopology, kinds: Sequence[ChildKind],
                        rule: AcceptanceRule, ctx: tuple[int, ...]) -> np.ndarray:
    """Exact distribution of len(accepted draft tokens) in one step."""
    out = np.zeros(topo.max_depth + 1)
    for tokens, wt in enumerate_drafts(world, topo, kinds, ctx):
        for acc, _y, w in walk_outcomes(world, topo, tokens, kinds, rule, ctx):
            out[len(acc)] += wt * w
    return out


def max_bias(world: World, topo: TreeTopology, kinds, rule: AcceptanceRule, ctx, m: int) -> float:
    got = emitted_joint(world, topo, kinds, rule, ctx, m)
    want = world.ar_joint(ctx, m)
    assert abs(got.sum() - 1.0) < TOL and abs(want.sum() - 1.0) < TOL
    return float(np.abs(got - want).max())


def kinds_for(topo: TreeTopology, kind) -> list[ChildKind]:
    if isinstance(kind, ChildKind):
        return [kind if topo.children[i] else None for i in range(topo.n)]
    return list(kind)


def assert_lossless(world: World, topo: TreeTopology, kind, rule: AcceptanceRule, m: int | None = None,
                    ctx: tuple[int, ...] = (1, 2)):
    m = topo.max_depth + 1 if m is None else m
    d = max_bias(world, topo, kinds_for(topo, kind), rule, ctx, m)
    assert d < TOL, f"output differs from the target's AR joint by {d:.3e}"


# ---------------------------------------------------------------------------------------------------
# self-check of the harness
# ---------------------------------------------------------------------------------------------------
def test_harness_enumerations_are_distributions():
    w = World(V=4, seed=0)
    for kind in (IID, WOR, DET):
        p = w.p((0, 1))
        tups = child_tuples(kind, p, 3)
        assert abs(sum(x for _, x in tups) - 1.0) < TOL
        if kind is WOR:
            assert all(len(set(t)) == 3 for t, _ in tups)
    topo = TreeTopology((-1, 0, 0, 1, 1, 2))
    kinds = kinds_for(topo, WOR)
    trees = list(enumerate_drafts(w, topo, kinds, (1, 2)))
    assert len(trees) == 12 * 12 * 4
    for tokens, _ in trees[:50]:
        s = sum(pr for _, _, pr in walk_outcomes(w, topo, tokens, kinds, A.AUTO, (1, 2)))
        assert abs(s - 1.0) < TOL
    assert abs(w.ar_joint((1, 2), 3).sum() - 1.0) < TOL


def test_harness_detects_a_wrong_rule():
    """Guard against a vacuous harness: an obviously wrong rule (accept every child) is caught."""
    w = World(V=4, seed=1)
    topo = TreeTopology.chain(1)
    want = w.ar_joint((1, 2), 1)
    got = np.zeros(4)
    for tokens, wt in enumerate_drafts(w, topo, kinds_for(topo, IID), (1, 2)):
        got[tokens[1]] += wt  # "always accept"
    assert np.abs(got - want).max() > BIAS


# ---------------------------------------------------------------------------------------------------
# lossless configurations
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [3, 4, 5])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chain_iid(V, depth):
    """Leviathan / Chen chain speculative sampling: one child per node drawn from p."""
    w = World(V=V, seed=10 * V + depth)
    topo = TreeTopology.chain(depth)
    assert_lossless(w, topo, IID, A.AUTO)
    assert_lossless(w, topo, IID, A.AUTO, m=depth + 2)  # also past the bonus token


@pytest.mark.parametrize("kind", [IID, WOR, DET])
@pytest.mark.parametrize("name", ["chain2", "2x1", "2x2"])
def test_vocab_trimmed_drafter_is_lossless(kind, name):
    """VocabTrim (ALGORITHMS.md §6.3): a drafter that can only propose 3 of 5 tokens, the target's likely
    tokens included or not, still yields exactly the target's joint under every child kind."""
    topo = {"chain2": TreeTopology.chain(2), "2x1": TreeTopology.static([2, 1]),
            "2x2": TreeTopology.static([2, 2])}[name]
    for seed, keep in ((41, (0, 2, 4)), (42, (1, 2, 3))):
        w = World(V=5, seed=seed, d_keep=keep)
        assert float(w.p((1, 2))[[i for i in range(5) if i not in keep]].sum()) == 0.0
        for rule in (A.AUTO, A.SAMPLE_MATCH):
            assert_lossless(w, topo, kind, rule)


def test_chain_acceptance_matches_closed_form():
    """k = 2 chain: P(accepted = 0, 1, 2) = [1 - a0, a0 (1 - a1), a0 a1] with a = Σ min(p, q),
    averaged over the drafted first token (a1 depends on it)."""
    w = World(V=4, seed=3)
    ctx = (1, 2)
    topo = TreeTopology.chain(2)
    dist = accepted_count_dist(w, topo, kinds_for(topo, IID), A.AUTO, ctx)
    q0, p0 = w.q(ctx), w.p(ctx)
    a0 = float(torch.minimum(q0, p0).sum())
    # P(accept x then accept next) = Σ_x min(p0, q0)(x) · a1(x)
    both = sum(float(min(q0[x], p0[x])) * float(torch.minimum(w.q(ctx + (x,)), w.p(ctx + (x,))).sum())
               for x in range(4))
    np.testing.assert_allclose(dist, [1 - a0, a0 - both, both], rtol=0, atol=TOL)


TREES = {
    "2": TreeTopology.static([2]),
    "3": TreeTopology.static([3]),
    "2x2": TreeTopology.static([2, 2]),
    "3x1": TreeTopology.static([3, 1]),
    "2x1x1": TreeTopology.static([2, 1, 1]),
    "irregular": TreeTopology((-1, 0, 0, 1, 1, 1, 2)),   # root: 2 kids; node 1: 3 kids; node 2: 1 kid
    "dfs_order": TreeTopology((-1, 0, 1, 1, 0, 4)),      # DFS ids (not level ordered)
}


@pytest.mark.parametrize("name,V", [("2", 5), ("3", 4), ("2x2", 4), ("3x1", 3), ("2x1x1", 3),
                                    ("irregular", 3), ("dfs_order", 4)])
def test_multidraft_iid(name, V):
    """SpecInfer-style i.i.d. siblings (duplicates possible), RRS with proposal p for every sibling."""
    assert_lossless(World(V=V, seed=100 + V), TREES[name], IID, A.AUTO)


@pytest.mark.parametrize("name,V", [("2", 5), ("3", 4), ("2x2", 4), ("3x1", 4), ("2x1x1", 4),
                                    ("irregular", 4), ("dfs_order", 5)])
def test_multidraft_wor(name, V):
    """Sampling without replacement (Gumbel-top-k / DySpec / RSD) with RRS-WOR proposals."""
    assert_lossless(World(V=V, seed=200 + V), TREES[name], WOR, A.AUTO)


def test_wor_static_3x2():
    assert_lossless(World(V=3, seed=7), TreeTopology.static([3, 2]), WOR, A.AUTO)


@pytest.mark.parametrize("branching", [[1], [2], [2, 1], [3, 2], [2, 2, 1], [4, 1, 1]])
@pytest.mark.parametrize("V", [4, 5])
def test_deterministic_topk(branching, V):
    """Static top-b trees (children = top-b tokens of p) with the δ rule."""
    assert_lossless(World(V=V, seed=300 + V), TreeTopology.static(branching), DET, A.AUTO)


def test_mixed_kinds_per_node():
    """Each node's kind is used for its own children: deterministic root, WOR / IID below."""
    topo = TreeTopology((-1, 0, 0, 1, 1, 2, 2))
    kinds = [DET, WOR, IID, None, None, None, None]
    w = World(V=4, seed=17)
    d = max_bias(w, topo, kinds, A.AUTO, (1, 2), 3)
    assert d < TOL


@pytest.mark.parametrize("kind", [IID, WOR, DET])
@pytest.mark.parametrize("name", ["2x1x1", "irregular", "dfs_order"])
def test_sample_match_any_kind(kind, name):
    """Sample-and-match is lossless whatever made the children."""
    assert_lossless(World(V=4, seed=400), TREES[name], kind, A.SAMPLE_MATCH)


@pytest.mark.parametrize("kind,rule", [(IID, A.RRS_DRAFT_PROBS), (WOR, A.RRS_WOR), (DET, A.AUTO)])
def test_explicit_true_rules(kind, rule):
    """The explicit rule that matches the generation is as lossless as AUTO."""
    assert_lossless(World(V=4, seed=450), TREES["irregular"], kind, rule)


@pytest.mark.parametrize("target", [dict(t_temp=0.7), dict(t_temp=1.3), dict(t_top_k=2),
                                    dict(t_top_p=0.6), dict(t_temp=0.7, t_top_k=3, t_top_p=0.8),
                                    dict(t_top_k=1)])
@pytest.mark.parametrize("kind", [IID, WOR, DET])
def test_target_transforms(target, kind):
    """Temperature, top-k and top-p applied to the target via target_probs: the output is the
    TRANSFORMED q (the AR joint is built from the same q). t_top_k=1 makes q a point mass."""
    w = World(V=4, seed=500, **target)
    topo = TreeTopology((-1, 0, 0, 1, 2))
    assert_lossless(w, topo, kind, A.AUTO, m=3)
    assert_lossless(w, topo, kind, A.SAMPLE_MATCH, m=3)


def test_target_transform_zeros_are_real():
    """Sanity: the transformed targets above do have zeros, so the point is exercised."""
    w = World(V=4, seed=500, t_top_k=2)
    assert int((w.q((1, 2)) == 0).sum()) == 2
    w = World(V=4, seed=500, t_top_p=0.6)
    assert int((w.q((1, 2)) == 0).sum()) >= 1


@pytest.mark.parametrize("drafter", [dict(d_temp=0.5), dict(d_temp=1.6), dict(d_top_k=2),
                                     dict(d_temp=0.7, t_temp=1.3)])
@pytest.mark.parametrize("kind", [IID, WOR])
def test_drafter_own_temperature(drafter, kind):
    """p is whatever the drafter really sampled from (its own temperature / top-k)."""
    w = World(V=4, seed=600, **drafter)
    topo = TreeTopology((-1, 0, 0, 1, 2))
    assert_lossless(w, topo, kind, A.AUTO, m=3)


@pytest.mark.parametrize("kind", [IID, WOR, DET])
def test_drafter_equals_target(kind):
    """p == q: RRS accepts the first sampled child with probability 1 (residual None path)."""
    w = World(V=4, seed=700, same=True)
    topo = TreeTopology.static([2, 1])
    assert_lossless(w, topo, kind, A.AUTO)
    if kind is not DET:
        dist = accepted_count_dist(w, topo, kinds_for(topo, kind), A.AUTO, (1, 2))
        np.testing.assert_allclose(dist, [0, 0, 1], atol=TOL)


def test_single_child_combinations_are_lossless():
    """With ONE child per node, IID+RRS_WOR and WOR+RRS_DRAFT_PROBS coincide with the true rule
    (no earlier siblings): the §8.3 bias needs >= 2 siblings."""
    w = World(V=4, seed=800)
    topo = TreeTopology.chain(3)
    assert_lossless(w, topo, IID, A.RRS_WOR)
    assert_lossless(w, topo, WOR, A.RRS_DRAFT_PROBS)


# ---------------------------------------------------------------------------------------------------
# the biased combinations of §8.3 (the validator must refuse them at T > 0)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind,rule", [
    ("chain1", DET, A.RRS_DRAFT_PROBS),        # static / top-k tree + RRS with draft probabilities
    ("2", DET, A.RRS_DRAFT_PROBS),
    ("3x1", DET, A.RRS_DRAFT_PROBS),
    ("chain1", DET, A.RRS_WOR),                # deterministic children + WOR proposals (also refused)
    ("2", DET, A.RRS_WOR),
    ("2", WOR, A.RRS_DRAFT_PROBS),             # WOR children without zeroing
    ("3", WOR, A.RRS_DRAFT_PROBS),
    ("2x1x1", WOR, A.RRS_DRAFT_PROBS),
])
def test_biased_combinations(name, kind, rule):
    """§8.3 rows that are really biased at T > 0. The world is chosen so that q > p on >= 2 tokens:
    when max(q - p, 0) is a point mass the first-stage residual is δ and every later proposal
    gives the same answer, so seed 900 (one such token) shows no bias for WOR + RRS_DRAFT_PROBS."""
    topo = TreeTopology.chain(1) if name == "chain1" else TREES[name]
    w = World(V=4, seed=906)
    assert int((w.q((1, 2)) > w.p((1, 2))).sum()) >= 2
    d = max_bias(w, topo, kinds_for(topo, kind), rule, (1, 2), topo.max_depth + 1)
    assert d > BIAS, f"expected a visible bias, got {d:.3e}"
    # the same world and tree are exact with the right rule
    assert max_bias(w, topo, kinds_for(topo, kind), A.AUTO, (1, 2), topo.max_depth + 1) < TOL


@pytest.mark.parametrize("name,V,seed", [("2", 4, 906), ("3", 4, 906), ("3x1", 4, 906), ("2x1x1", 4, 906),
                                         ("irregular", 4, 906), ("2", 5, 900), ("3", 5, 900),
                                         ("2", 5, 905), ("3", 5, 905)])
def test_iid_children_with_wor_zeroing_is_exact(name, V, seed):
    """FINDING (contradicts ALGORITHMS.md §8.3 row "i.i.d. children + WOR zeroing: biased"):
    with this verifier, i.i.d. siblings verified with RRS_WOR proposals are LOSSLESS.

    Why: given the history, the i.i.d. draw x_k either repeats an earlier sibling (then
    r_k(x_k) = 0, `rrs_step` returns (0, res) and the stage is skipped with the residual unchanged, so
    the remaining stages output res) or it does not, and then its conditional law is exactly
    p with the earlier siblings removed and renormalised = r_k, so the stage is a correct RRS stage
    that outputs res. A mixture of two procedures that both output res outputs res. The validator's
    refusal of this pair is therefore conservative, not required for losslessness (it is harmless:
    on these worlds RRS_WOR accepts fewer i.i.d. children than AUTO). The same worlds show
    WOR + RRS_DRAFT_PROBS biased, so the harness has the power to see a bias here."""
    w = World(V=V, seed=seed)
    topo = TREES[name]
    d = max_bias(w, topo, kinds_for(topo, IID), A.RRS_WOR, (1, 2), topo.max_depth + 1)
    assert d < TOL
    d_wor = max_bias(w, topo, kinds_for(topo, WOR), A.RRS_DRAFT_PROBS, (1, 2), topo.max_depth + 1)
    assert d_wor > 1e-4


def test_biased_combinations_are_lossless_under_greedy():
    """§8.3: the biased rows are still lossless for a point-mass (greedy) target."""
    w = World(V=4, seed=900, t_top_k=1)
    for name, kind, rule in [("2", DET, A.RRS_DRAFT_PROBS), ("2", IID, A.RRS_WOR),
                             ("2", WOR, A.RRS_DRAFT_PROBS)]:
        assert_lossless(w, TREES[name], kind, rule)


# ---------------------------------------------------------------------------------------------------
# rrs_step / child_proposal edge cases, exactly
# ---------------------------------------------------------------------------------------------------
def _dist(vals) -> torch.Tensor:
    t = torch.tensor(vals, dtype=torch.float64)
    return t / t.sum()


def test_rrs_step_p_equals_q_accepts_with_probability_one():
    q = _dist([1, 2, 3, 4])
    for x in range(4):
        a, res = rrs_step(q, x, q.clone())
        assert a == 1.0 and res is None


def test_rrs_step_q_zero_never_accepts():
    q = _dist([0, 2, 3, 5])
    p = _dist([4, 1, 1, 1])
    a, res = rrs_step(q, 0, p)
    assert a == 0.0
    want = torch.clamp(q - p, min=0)
    assert torch.allclose(res, want / want.sum(), rtol=0, atol=TOL)
    assert res[0] == 0.0


def test_rrs_step_zero_proposal_never_accepts_and_keeps_residual():
    q = _dist([1, 2, 3, 4])
    r = _dist([0, 1, 1, 1])
    a, res = rrs_step(q, 0, r)
    assert a == 0.0 and torch.equal(res, q)
    a, res = rrs_step(q, 1, torch.zeros(4, dtype=torch.float64))  # the deterministic-without-probs case
    assert a == 0.0 and torch.equal(res, q)


def test_rrs_step_delta_proposal():
    q = _dist([1, 2, 3, 4])
    r = torch.zeros(4, dtype=torch.float64)
    r[2] = 1.0
    a, res = rrs_step(q, 2, r)
    assert abs(a - 0.3) < TOL
    assert torch.allclose(res, _dist([1, 2, 0, 4]), rtol=0, atol=TOL)
    a, res = rrs_step(r, 2, r)  # point-mass target on the proposed token
    assert a == 1.0 and res is None


@pytest.mark.parametrize("seed", range(5))
def test_rrs_step_single_stage_is_lossless(seed):
    """One stage: x ~ r, accept w.p. a(x), else y ~ residual. Output law == res exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64) * 2, -1)
    r = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64) * 2, -1)
    out = torch.zeros(5, dtype=torch.float64)
    for x in range(5):
        a, res = rrs_step(q, x, r)
        assert a == min(1.0, float(q[x] / r[x]))
        out[x] += r[x] * a
        out += r[x] * (1 - a) * res
    assert torch.allclose(out, q, rtol=0, atol=TOL)


def test_child_proposal_table():
    p = _dist([1, 2, 3, 4])
    assert torch.equal(child_proposal(IID, A.AUTO, p, 1, [3]), p)
    assert torch.equal(child_proposal(WOR, A.RRS_DRAFT_PROBS, p, 1, [3]), p)
    assert torch.allclose(child_proposal(WOR, A.AUTO, p, 1, [3]), _dist([1, 2, 3, 0]), rtol=0, atol=TOL)
    assert torch.allclose(child_proposal(IID, A.RRS_WOR, p, 1, [3, 0]), _dist([0, 2, 3, 0]), rtol=0, atol=TOL)
    assert torch.equal(child_proposal(WOR, A.AUTO, p, 1, []), p)
    d = child_proposal(DET, A.AUTO, p, 2, [0, 1])
    assert d.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert torch.equal(child_proposal(DET, A.RRS_DRAFT_PROBS, p, 2, [0]), p)
    assert torch.equal(p, _dist([1, 2, 3, 4]))  # inputs are not mutated
