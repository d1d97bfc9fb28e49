"""Dynamic (DySpec) and beam (RSD-S) trees through the batched engine (issue #12).

Greedy: for Llama, Mamba2 and hybrid targets x an independent model drafter / a noisy copy x dynamic / beam
trees, requests decoded alone and together in one batch (rows of different prompts and budgets, so the rows'
trees differ in shape and size inside one forward) equal plain autoregressive decoding token for token, with
tau > 1 for the agreeing drafter. Sampled: a mixed batch equals each request alone (same seeds). Tree
invariants: the node budget and depth cap hold in every step, every tree fits the size buckets, the dynamic
heap pops best-first, and with one position per round the greedy dynamic tree is exactly the most probable
nodes (brute force over the drafter's tree).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from runtime.decode import Engine, SamplingParams
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.models import mamba2
from runtime.models.llama import init_random, perturbed_copy, trim_lm_head
from runtime.sampling import ChildKind, TorchDraftSampler
from runtime.tree_policies import BeamTree, DynamicTree, truncated_gumbel
from spec_compiler.tree import TreeTopology, tree_buckets
from tests.runtime.test_batch import LLAMA, MAX_SEQ, SSM, V, make_target, requests

POLICIES = {"dynamic": DynamicTree(num_nodes=8, max_depth=4, threshold=0.0, expand_per_round=3),
            "beam": BeamTree(beam_width=2, beam_depth=3)}


def slots(policy) -> int:
    return policy.max_nodes + policy.per_round


def cache_for(model, rows: int, policy):
    if isinstance(model, mamba2.Mamba2LMModel):
        return model.new_cache(rows, MAX_SEQ + slots(policy), num_scratch=slots(policy) + 1)
    return model.new_cache(rows, MAX_SEQ + slots(policy))


def grown_drafter(kind: str, target, policy, rows: int, child=ChildKind.deterministic, temperature=1.0):
    ssm = isinstance(target, mamba2.Mamba2LMModel)
    if kind == "noisy_copy":
        model = (mamba2.perturbed_copy if ssm else perturbed_copy)(target, 0.05, 7)
    else:
        model = mamba2.init_random_mamba2(SSM, seed=3) if ssm else init_random(LLAMA, seed=3)
    return ModelDrafter(model.eval(), TreeTopology.root_only(), MAX_SEQ + slots(policy), child, temperature, V,
                        rows=rows, cache=cache_for(model, rows, policy), policy=policy)


def run(model, kind, policy, reqs, rows, child=ChildKind.deterministic, check=None):
    drafter = grown_drafter(kind, model, policy, rows, child)
    if check is not None:
        propose = drafter.propose

        def checked(rs, max_depth):
            tree = propose(rs, max_depth)
            check(tree, max_depth)
            return tree
        drafter.propose = checked
    eng = Engine(model, cache_for(model, rows, policy), drafter, max_seq_len=MAX_SEQ, record_shapes=True)
    return eng.generate(reqs)


@pytest.fixture(scope="module", params=["llama", "mamba2", "hybrid"])
def target(request):
    return request.param, make_target(request.param)


@pytest.fixture(scope="module")
def reference(target):
    _, model = target
    eng = Engine(model, cache_for(model, 1, POLICIES["beam"]), NoDrafter(), max_seq_len=MAX_SEQ)
    return [eng.generate([r])[0].output_ids for r in requests([SamplingParams()] * 5)]


def tree_check(policy):
    seen, differ = [], []

    def check(tree, max_depth):
        differ.append(len({t.parents for t in tree.topologies}) > 1)  # rows of one batch, different trees
        assert tree.T in tree_buckets(policy.max_nodes)
        for b, topo in enumerate(tree.topologies):
            assert topo.n <= policy.max_nodes  # the budget
            assert topo.max_depth <= max(0, min(max_depth[b], getattr(policy, "max_depth", None) or
                                                policy.beam_depth))
            if isinstance(policy, BeamTree):
                assert all(len(level) <= policy.beam_width for level in topo.levels[1:])
            seen.append(topo.n)
    check.differ = differ
    return check, seen


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("kind", ["model", "noisy_copy"])
def test_greedy_equals_autoregressive_alone_and_batched(target, reference, kind, policy):
    _, model = target
    pol = POLICIES[policy]
    check, seen = tree_check(pol)
    alone = [run(model, kind, pol, [r], 1, check=check)[0] for r in requests([SamplingParams()] * 5)[:1]]
    batched = run(model, kind, pol, requests([SamplingParams()] * 5), rows=3, check=check)
    for a, ref in zip(alone, reference):
        assert a.output_ids == ref
    for b, ref in zip(batched, reference):
        assert b.output_ids == ref
        assert sum(b.accept_lengths) == len(b.output_ids)
    assert len(set(seen)) > 1 and any(check.differ)  # trees of different sizes, and rows differing in one batch
    tau = sum(len(r.output_ids) for r in batched) / sum(r.steps for r in batched)
    assert tau > (1.5 if kind == "noisy_copy" else 1.0)  # drafts were accepted (an agreeing drafter's often)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_vocab_trimmed_drafter_greedy_equals_autoregressive(policy):
    """A VocabTrim head (s2t: 40 of the 61 ids) grows trees over target ids; greedy output is still AR's."""
    model = make_target("llama")
    pol = POLICIES[policy]
    d = grown_drafter("noisy_copy", model, pol, 3)
    s2t = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:40].sort().values
    trim_lm_head(d.model, s2t)
    d = ModelDrafter(d.model, d.topology, d.cache.capacity, d.kind, d.temperature, V, rows=3, s2t=s2t, cache=d.cache,
                     policy=pol)
    eng = Engine(model, cache_for(model, 3, pol), d, max_seq_len=MAX_SEQ)
    out = eng.generate(requests([SamplingParams()] * 5))
    ref = Engine(model, cache_for(model, 1, pol), NoDrafter(), max_seq_len=MAX_SEQ).generate(
        requests([SamplingParams()] * 5))
    assert [r.output_ids for r in out] == [r.output_ids for r in ref]
    assert sum(len(r.output_ids) for r in out) / sum(r.steps for r in out) > 1.2


MIXED = [SamplingParams(0.8), SamplingParams(), SamplingParams(1.0, top_k=5), SamplingParams(0.6, top_p=0.9),
         SamplingParams(1.2)]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_sampled_batch_equals_alone(policy):
    model = make_target("llama")
    pol = POLICIES[policy]
    alone = [run(model, "noisy_copy", pol, [r], 1, ChildKind.wor)[0].output_ids for r in requests(MIXED)]
    batched = [r.output_ids for r in run(model, "noisy_copy", pol, requests(MIXED), 4, ChildKind.wor)]
    assert batched == alone
    ar = Engine(model, cache_for(model, 1, pol), NoDrafter(), max_seq_len=MAX_SEQ).generate(requests(MIXED)[1:2])
    assert batched[1] == ar[0].output_ids  # the greedy row of the mixed batch is still greedy
    again = [r.output_ids for r in run(model, "noisy_copy", pol, requests(MIXED, seeds=(5, 6, 7, 8, 9)), 4,
                                       ChildKind.wor)]
    assert again != batched


# ---------------------------------------------------------------------------------------------------
# the policies alone, over a synthetic drafter (a distribution per path)
# ---------------------------------------------------------------------------------------------------
def synthetic_p(path: tuple[int, ...], V: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(path) % (2 ** 31))
    return torch.softmax(2.0 * torch.randn(V, generator=g, dtype=torch.float64), -1)


def grow(policy, sampled: bool, cap: int, seed: int = 0):
    """Drive a policy row as ModelDrafter does: feed the nodes each round made, grow, until it stops."""
    row = policy.start(0, cap, TorchDraftSampler(torch.Generator().manual_seed(seed)), sampled)
    fed = [0]
    while True:
        for node in fed:
            p = synthetic_p(tuple(row.tokens[j] for j in TreeTopology(tuple(row.parents)).path(node)[1:]))
            if isinstance(policy, DynamicTree) and not sampled:  # the drafter hands over its ranked top-k
                top = torch.topk(p, p.shape[-1])
                p = (top.values.tolist(), top.indices.tolist())
            row.feed(node, p)
        new = row.grow()
        if not new:
            return row
        fed = [c for c in new if row.wants(c)]


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("per_round", [1, 3])
def test_dynamic_pops_best_first_within_budget(sampled, per_round):
    for seed, (n, depth, thr) in enumerate(itertools.product((2, 6, 13), (1, 3), (0.0, 0.02))):
        row = grow(DynamicTree(n, depth, thr, per_round), sampled, cap=depth, seed=seed)
        topo = TreeTopology(tuple(row.parents))
        assert topo.n <= n and topo.max_depth <= depth
        assert all(key >= left - 1e-15 for key, left in row.pops)  # every pop beat every position left
        assert all(key >= thr for key, _ in row.pops)
        for i in range(1, topo.n):  # a child's path probability never exceeds its parent's
            assert row.value[i] <= row.value[topo.parents[i]] + 1e-15
        if thr == 0.0:
            assert topo.n == min(n, sum(5 ** d for d in range(depth + 1)))  # filled when nothing stops it


@pytest.mark.parametrize("sampled", [False, True])
def test_dynamic_tree_does_not_depend_on_the_round_width(sampled):
    """Rounds end before a pending node's child could be the best: every width grows the best-first tree, the
    same draws in the same order (the same sampler seed gives the same tree), in fewer rounds."""
    trees = [grow(DynamicTree(20, 4, 0.0, E), sampled, cap=4, seed=5) for E in (1, 3, 19)]
    assert all((t.parents, t.tokens) == (trees[0].parents, trees[0].tokens) for t in trees[1:])


def test_greedy_dynamic_with_one_pop_per_round_is_the_most_probable_tree():
    """DySpec's optimality under its estimate: the n-1 most probable nodes of the drafter's full tree."""
    V, depth, n = 5, 3, 9
    row = grow(DynamicTree(n, depth, 0.0, 1), False, cap=depth)
    allp = {}
    for d in range(1, depth + 1):
        for path in itertools.product(range(V), repeat=d):
            allp[path] = float(torch.prod(torch.tensor([synthetic_p(path[:i])[path[i]] for i in range(d)])))
    best = sorted(allp.values(), reverse=True)[:n - 1]
    got = sorted(row.value[1:], reverse=True)
    assert torch.allclose(torch.tensor(got), torch.tensor(best), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sampled", [False, True])
def test_beam_levels_and_child_order(sampled):
    row = grow(BeamTree(3, 4), sampled, cap=4, seed=2)
    topo = TreeTopology(tuple(row.parents))
    assert topo.n == 1 + 3 * 4 and all(len(lv) == 3 for lv in topo.levels[1:])
    for node in range(topo.n):
        kids = topo.children[node]
        keys = [row.g[c] if sampled else row.phi[c] for c in kids]
        assert keys == sorted(keys, reverse=True)  # children in descending value: the Gumbel-top-k order
        if sampled and kids:
            assert row.g[kids[0]] == pytest.approx(row.g[node], abs=1e-9)  # truncation keeps max child = parent


def test_truncated_gumbel_matches_the_direct_formula():
    g_parent = torch.tensor([-0.3, 1.2], dtype=torch.float64)
    pert = torch.tensor([[0.5, -1.0, 2.0, float("-inf")], [3.0, 2.9, -4.0, 0.0]], dtype=torch.float64)
    Z = pert.max(-1, keepdim=True).values
    direct = -torch.log(torch.exp(-g_parent[:, None]) - torch.exp(-Z) + torch.exp(-pert))
    torch.testing.assert_close(truncated_gumbel(g_parent, pert), direct, rtol=1e-12, atol=1e-12)
    far = truncated_gumbel(torch.tensor([-800.0], dtype=torch.float64),
                           torch.tensor([[-790.0, -795.0]], dtype=torch.float64))
    assert torch.isfinite(far).all() and float(far.max()) == -800.0  # the stable form where exp underflows
