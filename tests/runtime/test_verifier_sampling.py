"""Sampled verifier tests: Monte-Carlo (TESTING.md layer 2), greedy walk, fail-closed numerics
(layer 8) and seeded determinism.

Monte-Carlo bound: every count must lie within 6·sqrt(n·p·(1−p)) + 5 of its exact expectation. A 6σ
two-sided normal bound fires falsely with probability ≈ 2e-9 per cell (alpha ≈ 2e-9 per cell; the
+5 slack covers the normal approximation for small n·p). This file checks well under 200 cells, so the
suite-wide false-alarm rate is < 1e-6. Seeds are fixed: a failure reproduces and must be investigated,
never re-rolled.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from runtime.sampling import (AcceptanceRule, ChildKind, NumericsError, greedy_token,
                              target_probs, verify_greedy, verify_sampling)
from spec_compiler.errors import InputError
from spec_compiler.tree import DraftTree, TreeTopology
from tests.runtime.test_verifier_exact import World, accepted_count_dist, kinds_for

A, IID, WOR, DET = AcceptanceRule, ChildKind.IID, ChildKind.WOR, ChildKind.DETERMINISTIC


def within_bound(counts: np.ndarray, probs: np.ndarray, n: int, what: str):
    counts, probs = np.asarray(counts, float).ravel(), np.asarray(probs, float).ravel()
    assert abs(probs.sum() - 1.0) < 1e-9
    for i, (c, p) in enumerate(zip(counts, probs)):
        tol = 6.0 * math.sqrt(n * p * (1.0 - p)) + 5.0
        assert abs(c - n * p) <= tol, f"{what}[{i}]: count {c} vs expected {n * p:.1f} ± {tol:.1f}"


# ---------------------------------------------------------------------------------------------------
# drafting in the test, with the same generator
# ---------------------------------------------------------------------------------------------------
def _inverse_cdf(w: list[float], u: float) -> int:
    """Index drawn from unnormalised weights w with one uniform u (zero weights never drawn)."""
    t, acc, last = u * sum(w), 0.0, None
    for x, wx in enumerate(w):
        if wx > 0:
            acc += wx
            last = x
            if t < acc:
                return x
    return last  # u * sum rounding past the end


def draw_children(kind: ChildKind, p: torch.Tensor, b: int, gen: torch.Generator) -> list[int]:
    """Children of one node drawn from p with `gen` (one uniform per sampled child)."""
    if kind is DET:
        return sorted(range(p.numel()), key=lambda x: (-float(p[x]), x))[:b]
    us = torch.rand(b, generator=gen, dtype=torch.float64).tolist()
    w = p.tolist()
    if kind is IID:
        return [_inverse_cdf(w, u) for u in us]
    if kind is WOR:  # sequential sampling without replacement
        out = []
        for u in us:
            x = _inverse_cdf(w, u)
            out.append(x)
            w[x] = 0.0
        return out
    raise AssertionError(kind)


def draft_tree(world: World, topo: TreeTopology, kinds, ctx, gen) -> tuple[DraftTree, torch.Tensor]:
    """Sample one DraftTree from the world's drafter, and the target rows q [n, V] for it."""
    tokens = [-1] * topo.n
    tokens[0] = ctx[-1]
    ctxs = [tuple(ctx)] + [None] * (topo.n - 1)
    dp = torch.zeros(topo.n, world.V, dtype=torch.float64)
    for i in range(topo.n):  # topological order: node i's token is set before its children
        if i:
            ctxs[i] = (ctxs[topo.parents[i]] + (tokens[i],))[-world.order:]
        kids = topo.children[i]
        if not kids:
            continue
        p = world.p(ctxs[i])
        dp[i] = p
        for c, x in zip(kids, draw_children(kinds[i], p, len(kids), gen)):
            tokens[c] = x
    q = torch.stack([world.q(c) for c in ctxs])
    ck = [k.value if k is not None else "" for k in kinds]
    return DraftTree(topo, tokens, ck, dp), q


def run_rounds(world, topo, kind, rule, ctx, n, seed):
    gen = torch.Generator().manual_seed(seed)
    kinds = kinds_for(topo, kind)
    first = np.zeros(world.V)
    pair = np.zeros((world.V, world.V))
    count = np.zeros(topo.max_depth + 1)
    for _ in range(n):
        tree, q = draft_tree(world, topo, kinds, ctx, gen)
        path, y = verify_sampling(tree, q, rule, gen)
        assert path[0] == 0 and tuple(path) == topo.path(path[-1])  # a root-to-node path
        emitted = [tree.tokens[i] for i in path[1:]] + [y]
        if len(emitted) < 2:  # pad with plain target sampling
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            emitted.append(_inverse_cdf(world.q(tuple(ctx) + tuple(emitted)).tolist(), u))
        first[emitted[0]] += 1
        pair[emitted[0], emitted[1]] += 1
        count[len(path) - 1] += 1
    return first, pair, count


CTX = (1, 2)


@pytest.mark.parametrize("name,topo,kind,rule,n", [
    ("chain2-iid", TreeTopology.chain(2), IID, A.AUTO, 20000),
    ("wor-2x2", TreeTopology.static([2, 2]), WOR, A.AUTO, 20000),
    ("iid-2x1-sample-match", TreeTopology.static([2, 1]), IID, A.SAMPLE_MATCH, 5000),
    ("det-2x1", TreeTopology.static([2, 1]), DET, A.AUTO, 5000),
])
def test_monte_carlo_verify_sampling(name, topo, kind, rule, n):
    world = World(V=4, seed=906)
    first, pair, count = run_rounds(world, topo, kind, rule, CTX, n, seed=12345)
    within_bound(first, world.q(CTX).numpy(), n, f"{name} first token")
    within_bound(pair, world.ar_joint(CTX, 2), n, f"{name} first two tokens")
    exp = accepted_count_dist(world, topo, kinds_for(topo, kind), rule, CTX)
    within_bound(count, exp, n, f"{name} accepted count")
    assert (count > 0).sum() >= 2  # not vacuous: several acceptance lengths occur


def test_monte_carlo_has_power():
    """The same bound sees the WOR + RRS_DRAFT_PROBS bias of the [2,2] tree (its acceptance law
    differs from the AUTO one by far more than the bound)."""
    world = World(V=4, seed=906)
    topo = TreeTopology.static([2, 2])
    n = 3000
    _, _, count = run_rounds(world, topo, WOR, A.RRS_DRAFT_PROBS, CTX, n, seed=7)
    exp = accepted_count_dist(world, topo, kinds_for(topo, WOR), A.AUTO, CTX)
    with pytest.raises(AssertionError):
        within_bound(count, exp, n, "biased")


# ---------------------------------------------------------------------------------------------------
# verify_greedy
# ---------------------------------------------------------------------------------------------------
V = 6


def logits_with_argmax(rows: list[int], noise_seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(noise_seed)
    lg = torch.randn(len(rows), V, generator=g)
    for i, a in enumerate(rows):
        lg[i, a] = lg[i].max() + 1.0
    return lg


# tree: 0 -> {1: tok 3, 2: tok 1}; 1 -> {3: tok 2}; 2 -> {4: tok 0, 5: tok 5}; 4 -> {6: tok 4}
GT = DraftTree(TreeTopology((-1, 0, 0, 1, 2, 2, 4)), [9 % V, 3, 1, 2, 0, 5, 4], ["deterministic"] * 3 + [""] * 4)


def test_greedy_follows_known_path_with_bonus():
    # argmax per node: root -> 1 (node 2), node 2 -> 0 (node 4), node 4 -> 4 (node 6), leaf 6 -> bonus 2
    lg = logits_with_argmax([1, 0, 0, 0, 0, 0, 0])
    lg[2] = logits_with_argmax([0])[0]
    lg[4] = logits_with_argmax([4])[0]
    lg[6] = logits_with_argmax([2])[0]
    path, y = verify_greedy(GT, lg)
    assert path == [0, 2, 4, 6] and y == 2


def test_greedy_all_accepted_bonus_on_chain():
    topo = TreeTopology.chain(3)
    tree = DraftTree(topo, [0, 5, 1, 3], ["deterministic"] * 3 + [""])
    path, y = verify_greedy(tree, logits_with_argmax([5, 1, 3, 4]))
    assert path == [0, 1, 2, 3] and y == 4


def test_greedy_first_level_rejection():
    path, y = verify_greedy(GT, logits_with_argmax([4, 0, 0, 0, 0, 0, 0]))
    assert path == [0] and y == 4


def test_greedy_mid_rejection():
    # root -> 3 (node 1), node 1 argmax 5 is not its child (2): recovered 5
    path, y = verify_greedy(GT, logits_with_argmax([3, 5, 0, 0, 0, 0, 0]))
    assert path == [0, 1] and y == 5


def test_greedy_root_only_and_ties():
    tree = DraftTree.root_only(2)
    path, y = verify_greedy(tree, torch.tensor([[0.0, 1.0, 3.0, 3.0, -1.0, 3.0]]))
    assert path == [0] and y == 2  # exact tie: lowest id
    assert greedy_token(torch.tensor([1.0, 1.0])) == 0


def test_greedy_duplicate_children_takes_first():
    tree = DraftTree(TreeTopology((-1, 0, 0)), [0, 3, 3], ["deterministic", "", ""])
    path, y = verify_greedy(tree, logits_with_argmax([3, 1, 2]))
    assert path == [0, 1] and y == 1


def test_greedy_nan_on_visited_row_raises():
    lg = logits_with_argmax([3, 1, 0, 0, 0, 0, 0])
    lg[1, 2] = float("nan")
    with pytest.raises(NumericsError):
        verify_greedy(GT, lg)


# ---------------------------------------------------------------------------------------------------
# fail-closed numerics
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_raise(bad):
    lg = torch.tensor([0.5, 1.0, -2.0, 0.0])
    lg[1] = bad
    with pytest.raises(NumericsError) as ei:
        target_probs(lg, 1.0)
    assert isinstance(ei.value, InputError) and isinstance(ei.value, ValueError)
    for kw in (dict(top_k=2), dict(top_p=0.5), dict(temperature=0.3)):
        with pytest.raises(NumericsError):
            target_probs(lg, kw.pop("temperature", 1.0), **kw)
    with pytest.raises(NumericsError):
        greedy_token(lg)
    with pytest.raises(NumericsError):  # one bad row in a batch fails the call
        target_probs(torch.stack([torch.zeros(4), lg]), 1.0)


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_non_positive_temperature_raises(t):
    with pytest.raises(ValueError):
        target_probs(torch.zeros(4), t)


def test_target_probs_basic():
    lg = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 3.0, 0.0, -5.0]], dtype=torch.float32)
    q = target_probs(lg, 0.7)
    assert q.dtype == torch.float64 and q.shape == (2, 4)
    assert torch.allclose(q, torch.softmax(lg.double() / 0.7, -1), rtol=0, atol=1e-15)
    assert torch.allclose(q.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_top_k_leaves_exactly_k(k):
    g = torch.Generator().manual_seed(k)
    lg = torch.randn(5, 8, generator=g, dtype=torch.float64)  # distinct values
    q = target_probs(lg, 1.3, top_k=k)
    assert ((q > 0).sum(-1) == k).all()
    top = torch.topk(lg, k, dim=-1).indices
    assert torch.equal((q > 0), torch.zeros_like(q, dtype=torch.bool).scatter(-1, top, True))
    ref = torch.softmax((lg / 1.3).masked_fill(q == 0, float("-inf")), -1)
    assert torch.allclose(q, ref, rtol=0, atol=1e-15)


def test_top_k_ties_at_kth_value_are_kept():
    """Documented behaviour: every token tied with the k-th largest logit survives (HF
    TopKLogitsWarper semantics), so more than k tokens can remain."""
    lg = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 2.0])
    q = target_probs(lg, 1.0, top_k=2)
    assert (q > 0).tolist() == [True, False, True, True, False, True]
    assert torch.allclose(q[[2, 3, 5]], q[2].expand(3))


def test_top_k_off_values():
    lg = torch.tensor([0.3, -1.0, 2.0])
    full = target_probs(lg, 1.0)
    for k in (0, 3, 10):
        assert torch.equal(target_probs(lg, 1.0, top_k=k), full)


@pytest.mark.parametrize("top_p", [0.0, 1e-12, 0.01])
def test_top_p_keeps_at_least_one_token(top_p):
    lg = torch.tensor([[0.1, 2.0, -1.0, 0.5], [1.0, 1.0, 1.0, 1.01]])
    q = target_probs(lg, 1.0, top_p=top_p)
    assert ((q > 0).sum(-1) == 1).all()
    assert q[0, 1] == 1.0 and q[1, 3] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_top_p_smallest_prefix_reaching_mass(seed):
    g = torch.Generator().manual_seed(seed)
    lg = torch.randn(7, generator=g, dtype=torch.float64) * 2
    base = torch.softmax(lg, -1)
    for top_p in (0.3, 0.6, 0.9, 0.999):
        q = target_probs(lg, 1.0, top_p=top_p)
        order = torch.argsort(base, descending=True).tolist()
        keep, mass = [], 0.0
        for x in order:  # smallest prefix of the sorted distribution whose mass reaches top_p
            keep.append(x)
            mass += float(base[x])
            if mass >= top_p:
                break
        assert sorted(torch.nonzero(q).flatten().tolist()) == sorted(keep)
        assert torch.allclose(q[keep], base[keep] / base[keep].sum(), rtol=0, atol=1e-15)


def _zero_world_tree():
    """Root with children whose tokens have q == 0 at the root, the drafter heavy on them."""
    topo = TreeTopology((-1, 0, 0, 1, 2))
    q = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 5, dtype=torch.float64)
    q[1] = torch.tensor([0.2, 0.0, 0.8, 0.0, 0.0], dtype=torch.float64)
    p = torch.tensor([[0.05, 0.05, 0.45, 0.0, 0.45]] * 5, dtype=torch.float64)
    return topo, q, p


@pytest.mark.parametrize("kind,rule", [(IID, A.AUTO), (WOR, A.AUTO), (DET, A.AUTO), (IID, A.SAMPLE_MATCH),
                                       (DET, A.RRS_DRAFT_PROBS), (WOR, A.RRS_DRAFT_PROBS)])
def test_zero_probability_tokens_never_emitted(kind, rule):
    topo, q, p = _zero_world_tree()
    gen = torch.Generator().manual_seed(99)
    kinds = [kind, kind, kind, None, None]
    seen_accept = 0
    for _ in range(1000):
        tokens = [0] * topo.n
        for i in range(topo.n):
            kids = topo.children[i]
            if kids:
                for c, x in zip(kids, draw_children(kind, p[i], len(kids), gen)):
                    tokens[c] = x
        tree = DraftTree(topo, tokens, [k.value if k else "" for k in kinds], p.clone())
        path, y = verify_sampling(tree, q, rule, gen)
        for parent, child in zip(path, path[1:]):
            assert q[parent, tokens[child]] > 0, "accepted a token the target gives probability 0"
            seen_accept += 1
        assert q[path[-1], y] > 0, f"emitted token {y} with q = 0"
        assert 0 <= y < q.shape[1]
    assert seen_accept > 0 or kind is DET  # some children really were accepted


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0 ** -53])
def test_extreme_uniform_draws(monkeypatch, u):
    """An RNG draw of exactly 0 never accepts a child with acceptance 0 (q(x) = 0); a draw just
    below 1 still accepts a child with acceptance 1."""
    import runtime.sampling as S

    real_rand = torch.rand

    def fake_rand(*args, **kw):
        return torch.full((), u, dtype=torch.float64)

    monkeypatch.setattr(S.torch, "rand", fake_rand)
    try:
        topo = TreeTopology((-1, 0))
        q = torch.tensor([[0.0, 0.3, 0.7], [0.2, 0.3, 0.5]], dtype=torch.float64)
        p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
        gen = torch.Generator().manual_seed(0)
        for _ in range(50):
            path, y = verify_sampling(DraftTree(topo, [2, 0], ["iid", ""], p), q, A.AUTO, gen)
            assert path == [0] and y in (1, 2)
        # q == p on the proposed token: acceptance exactly 1
        q2 = torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
        p2 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
        path, y = verify_sampling(DraftTree(topo, [2, 2], ["iid", ""], p2), q2, A.AUTO, gen)
        assert path == [0, 1]
    finally:
        monkeypatch.setattr(S.torch, "rand", real_rand)


def test_deterministic_children_without_draft_probs():
    """draft_probs=None with deterministic children is the retrieval / static case: δ rule."""
    topo = TreeTopology((-1, 0, 0))
    tree = DraftTree(topo, [0, 1, 2], ["deterministic", "", ""], None)
    q = torch.tensor([[0.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        path, y = verify_sampling(tree, q, A.AUTO, gen)
        assert path == [0, 1] and y == 1


# ---------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------
def _seeded_run(seed: int, kind: ChildKind, rule: AcceptanceRule, n: int = 200):
    world = World(V=4, seed=906)
    topo = TreeTopology.static([2, 2])
    kinds = kinds_for(topo, kind)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tree, q = draft_tree(world, topo, kinds, CTX, gen)
        path, y = verify_sampling(tree, q, rule, gen)
        out.append((tuple(tree.tokens), tuple(path), y))
    return out


@pytest.mark.parametrize("kind,rule", [(IID, A.AUTO), (WOR, A.AUTO), (IID, A.SAMPLE_MATCH), (DET, A.AUTO)])
def test_same_seed_same_outputs(kind, rule):
    a = _seeded_run(5, kind, rule)
    b = _seeded_run(5, kind, rule)
    c = _seeded_run(6, kind, rule)
    assert a == b
    assert a != c


def test_verify_sampling_consumes_generator_in_fixed_order():
    """Re-seeding the generator before each call reproduces the step exactly, and the step leaves
    the generator in the same state."""
    world = World(V=4, seed=906)
    topo = TreeTopology.static([2, 2])
    tree, q = draft_tree(world, topo, kinds_for(topo, WOR), CTX, torch.Generator().manual_seed(1))
    outs, states = set(), set()
    for _ in range(5):
        g = torch.Generator().manual_seed(42)
        path, y = verify_sampling(tree, q, A.AUTO, g)
        outs.add((tuple(path), y))
        states.add(bytes(g.get_state().numpy()))
    assert len(outs) == 1 and len(states) == 1
