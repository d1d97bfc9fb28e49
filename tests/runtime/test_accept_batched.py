"""The batched acceptance (`accept_greedy`, `accept_sampled`, `accept`) against the per-row reference walks
(`walk_greedy`, `walk_sampled`): identical decisions on thousands of random trees of mixed provenance
(topk, iid, wor, retrieved, padding), distributions with zeros and ties, and random uniforms; a row's result
does not depend on its batch or size bucket. Exactness itself: test_verifier_exact.py."""
from __future__ import annotations

import random

import pytest
import torch

from runtime.batch import TreeBatch
from runtime.sampling import (AcceptanceRule, NodeLogits, SamplingParams, accept, accept_greedy, accept_sampled, draw_uniforms,
                              row_target_probs, target_probs, walk_greedy, walk_sampled)
from spec_compiler.tree import Provenance, TreeTopology

A, P = AcceptanceRule, Provenance
RULES = [A.auto, A.sample_match, A.rrs_draft_probs, A.rrs_wor]
SIBLINGS = [[P.topk], [P.iid], [P.wor], [P.retrieved], [P.wor, P.retrieved], [P.iid, P.retrieved],
            [P.topk, P.wor]]


def random_tree(rng: random.Random, V: int, max_n: int = 10) -> tuple[TreeTopology, list[int], list[Provenance]]:
    """A random topology; each parent's children get a provenance pattern (sampled first, then
    retrieved / top-k ones); tokens from a small pool, so duplicate siblings occur."""
    n = rng.randint(1, max_n)
    topo = TreeTopology(tuple([-1] + [rng.randrange(i) for i in range(1, n)]))
    pool = rng.sample(range(V), min(V, 4))
    tokens = [rng.choice(pool) for _ in range(n)]
    provs = [P.root] + [P.topk] * (n - 1)
    for i in range(n):
        pattern = rng.choice(SIBLINGS)
        kids = topo.children[i]
        for j, c in enumerate(kids):
            provs[c] = pattern[0] if len(pattern) == 1 or j < (len(kids) + 1) // 2 else pattern[1]
    return topo, tokens, provs


def random_dists(g: torch.Generator, shape, zero: float) -> torch.Tensor:
    """[..., V] float64 distributions with some exact zeros (each row keeps at least one id)."""
    x = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, -1)
    x = x.masked_fill(torch.rand(shape, generator=g) < zero, 0.0)
    x[..., 0] += (x.sum(-1) == 0).double()
    return x / x.sum(-1, keepdim=True)


def random_batch(seed: int, B: int, V: int):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    trees = [random_tree(rng, V) for _ in range(B)]
    T = max(t[0].n for t in trees) + rng.randint(0, 3)  # padding nodes
    q = random_dists(g, (B, T, V), 0.25)
    p = random_dists(g, (B, T, V), 0.25)
    near = torch.rand(B, T, 1, generator=g) < 0.3  # some drafters equal the target (acceptance 1)
    p = torch.where(near, q, p)
    tree = TreeBatch.build([t[0] for t in trees], [t[1] for t in trees], [t[2] for t in trees], T, p)
    u = torch.rand(B, T, generator=g, dtype=torch.float64)
    u[torch.rand(B, T, generator=g) < 0.05] = 0.0
    return tree, q, u


@pytest.mark.parametrize("rule", RULES)
def test_accept_sampled_equals_walk(rule):
    """2048 random rows per rule: the batched walk and the reference walk decide alike."""
    accepted = 0
    for seed in range(32):
        tree, q, u = random_batch(seed, 64, V=7)
        paths, nxt = accept_sampled(tree, q, rule, u)
        for b in range(tree.B):
            assert (paths[b], nxt[b]) == walk_sampled(tree, b, q[b], rule, u[b]), (seed, b)
            assert q[b, paths[b][-1], nxt[b]] > 0
            accepted += len(paths[b]) - 1
    assert accepted > 300  # deep paths occur


def test_accept_sampled_without_draft_probs():
    """Top-k / retrieved only trees carry no draft_probs; the override rules then see p = 0."""
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    trees = []
    for _ in range(64):
        topo, toks, provs = random_tree(rng, 5)
        trees.append((topo, toks, [P.root] + [rng.choice([P.topk, P.retrieved]) for _ in provs[1:]]))
    T = max(t[0].n for t in trees)
    tree = TreeBatch.build([t[0] for t in trees], [t[1] for t in trees], [t[2] for t in trees], T, None)
    q = random_dists(g, (64, T, 5), 0.3)
    u = torch.rand(64, T, generator=g, dtype=torch.float64)
    for rule in RULES:
        paths, nxt = accept_sampled(tree, q, rule, u)
        for b in range(64):
            assert (paths[b], nxt[b]) == walk_sampled(tree, b, q[b], rule, u[b])
            if rule is A.rrs_draft_probs:
                assert paths[b] == [0]  # proposal 0 for every child: nothing is accepted


def test_accept_greedy_equals_walk():
    """Random trees, logits boosted on a child's token (deep paths), exact ties, duplicate siblings."""
    deep = 0
    for seed in range(32):
        tree, _, _ = random_batch(seed, 64, V=7)
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(tree.B, tree.T, 7, generator=g)
        for b in range(tree.B):
            topo = tree.topologies[b]
            for i in range(topo.n):
                kids = topo.children[i]
                if kids and float(torch.rand((), generator=g)) < 0.7:
                    logits[b, i, tree.tokens[b, kids[-1]]] += 5.0
                elif float(torch.rand((), generator=g)) < 0.3:
                    logits[b, i, 2] = logits[b, i, 5] = logits[b, i].max() + 1.0  # tie: id 2 wins
        paths, nxt = accept_greedy(tree, logits)
        for b in range(tree.B):
            assert (paths[b], nxt[b]) == walk_greedy(tree, b, logits[b])
            deep += len(paths[b]) > 2
    assert deep > 100


def test_row_results_do_not_depend_on_the_batch():
    """A request's step alone (its own size bucket) equals the same step inside a larger, padded batch:
    same generator seed, same path and token."""
    tree, q, _ = random_batch(7, 16, V=7)
    for rule in (A.auto, A.sample_match):
        gens = [torch.Generator().manual_seed(100 + b) for b in range(16)]
        paths, nxt = accept_sampled(tree, q, rule, draw_uniforms(gens, tree.T))
        for b in range(16):
            n = tree.topologies[b].n
            alone = TreeBatch.build([tree.topologies[b]], [tree.row_tokens(b)],
                                    [tree.provenance[b, :n].tolist()], n, tree.draft_probs[b:b + 1, :n])
            u = draw_uniforms([torch.Generator().manual_seed(100 + b)], n)
            p1, y1 = accept_sampled(alone, q[b:b + 1, :n], rule, u)
            assert (p1[0], y1[0]) == (paths[b], nxt[b])


def test_row_target_probs_groups_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 11, generator=g)
    params = [SamplingParams(0.7), SamplingParams(1.0, top_k=3), SamplingParams(0.7),
              SamplingParams(1.3, top_p=0.8), SamplingParams(0.9, top_k=2, top_p=0.5)]
    q = row_target_probs(logits, params)
    for b, sp in enumerate(params):
        assert torch.equal(q[b], target_probs(logits[b], sp.temperature, sp.top_k, sp.top_p))


def test_accept_mixed_batch():
    """Greedy rows (temperature 0) and sampled rows of different settings and rules in one batch: each row
    as its own mode would decide, with its own generator."""
    tree, _, _ = random_batch(3, 12, V=7)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, tree.T, 7, generator=g) * 2
    modes = [SamplingParams(), SamplingParams(1.0), SamplingParams(0.8, top_k=3, acceptance=A.sample_match),
             SamplingParams(1.2, top_p=0.9)]
    params = [modes[b % 4] for b in range(12)]
    gens = [torch.Generator().manual_seed(b) if not sp.greedy else None for b, sp in enumerate(params)]
    paths, nxt = accept(tree, logits, params, gens)
    for b, sp in enumerate(params):
        if sp.greedy:
            want = walk_greedy(tree, b, logits[b])
        else:
            u = draw_uniforms([torch.Generator().manual_seed(b)], tree.T)[0]
            q = target_probs(logits[b], sp.temperature, sp.top_k, sp.top_p)
            want = walk_sampled(tree, b, q, sp.acceptance, u)
        assert (paths[b], nxt[b]) == want


@pytest.mark.parametrize("seed", range(20))
def test_path_head_decides_like_the_full_head(seed):
    """`NodeLogits` (the head run only at the nodes the walks reach, `Engine(verify_head="path")`) gives the
    same paths and tokens as logits computed at every node, for mixed greedy / sampled batches; and it runs
    the head over fewer rows than B*T."""
    tree, _, _ = random_batch(100 + seed, 9, V=7)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(9, tree.T, 5, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64) * 2
    seen = []

    def head(x):
        seen.append(x.shape[0])
        return (x @ w.T).float()

    modes = [SamplingParams(), SamplingParams(1.0), SamplingParams(0.8, top_k=3, acceptance=A.sample_match),
             SamplingParams(1.2, top_p=0.9)]
    params = [modes[(b + seed) % 4] for b in range(9)]

    def gens():
        return [torch.Generator().manual_seed(b) if not sp.greedy else None for b, sp in enumerate(params)]

    full = accept(tree, head(h), params, gens())
    seen.clear()
    lazy = accept(tree, NodeLogits(h, head), params, gens())
    assert lazy == full
    assert sum(seen) <= 9 * (max(t.max_depth for t in tree.topologies) + 1)
