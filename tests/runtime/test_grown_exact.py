"""Dynamic and beam trees are lossless at temperature > 0 (issue #12; ALGORITHMS.md §0.3, §2.3, §4.3).

- **Dynamic, exact**: the engine's `ModelDrafter` with a `DynamicTree` policy (a tiny fp64 Llama / Mamba2
  drafter, its cache and tree-range forwards) draws every child through the enumerating sampler of
  test_verifier_exact.py, so every tree it can grow (budget, depth cap, threshold stops included) is visited
  with its exact probability; each goes through the production `accept_sampled` with every branch
  enumerated. The emitted 3-token joint equals the target model's autoregressive joint to 1e-12, with target
  top-k and top-p.
- **Beam, exact law**: stochastic beam search draws continuous Gumbel noise, which no finite enumeration
  visits. Its tree law is enumerated instead through the exponential-race form of SBS (with X = exp(-G):
  a beam's first child arrives at the beam's own time, each later child after an exponential delay of rate
  P(path) * (mass not yet drawn), token drawn without replacement; a level keeps its first `beam_width`
  arrivals), every tree through the same `accept_sampled` enumeration: exact to 1e-12. The engine's
  Gumbel builder is tied to that law by a chi-square test over its trees.
- **End to end**: one chi-square test per policy of the first two emitted tokens of the batched engine.
"""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from runtime.decode import Engine, Request, SamplingParams
from runtime.drafters import ModelDrafter
from runtime.models import mamba2
from runtime.models.llama import LlamaConfig, init_random, perturbed_copy, trim_lm_head
from runtime.sampling import AcceptanceRule, ChildKind, TorchDraftSampler, target_probs
from runtime.tree_policies import BeamTree, DynamicTree
from spec_compiler.tree import Provenance, TreeTopology
from tests.runtime.test_engine_exact import V, ModelWorld, engine_drafter, models
from tests.runtime.test_verifier_exact import TOL, Script, enumerate_runs, joint_of, step_outcomes

ALPHA = 1e-6


def policy_drafter(model, policy, kind: ChildKind, temperature: float, s2t=None):
    """The harness's drafter callable over the engine's ModelDrafter growing `policy` trees (one row)."""
    return engine_drafter(model, TreeTopology.root_only(), kind, temperature, s2t=s2t, policy=policy)


def assert_exact(world, drafter, ctx, m=3):
    outs = step_outcomes(world, drafter, AcceptanceRule.auto, ctx)
    assert abs(sum(w for *_, w in outs) - 1.0) < TOL
    got, want = joint_of(world, outs, ctx, m), world.ar_joint(ctx, m)
    assert float(np.abs(got - want).max()) < TOL
    assert sum(w for acc, _, w in outs if len(acc) > 1) > 0.01  # two-token drafts were accepted too
    return outs


DYNAMIC = {"budget": DynamicTree(num_nodes=4, max_depth=3, threshold=0.0, expand_per_round=1),
           "threshold": DynamicTree(num_nodes=5, max_depth=2, threshold=0.12, expand_per_round=2)}


@pytest.mark.parametrize("arch,policy,transform", [
    ("llama", "budget", dict(top_k=3)), ("llama", "budget", dict(top_p=0.8)), ("llama", "threshold", dict(top_k=3)),
    ("llama", "threshold", dict(top_p=0.8)), ("mamba2", "threshold", dict(top_p=0.8))],
    ids=["llama-budget-top_k", "llama-budget-top_p", "llama-threshold-top_k", "llama-threshold-top_p",
         "mamba2-threshold-top_p"])
def test_dynamic_tree_is_exact(arch, policy, transform):
    target, draft_model = models(arch)
    world = ModelWorld(target, temperature=0.9, **transform)
    outs = assert_exact(world, policy_drafter(draft_model, DYNAMIC[policy], ChildKind.wor, 1.1), (1, 3, 0))
    assert len({acc for acc, *_ in outs}) > 4


@pytest.mark.parametrize("kind", [ChildKind.wor, ChildKind.deterministic])
def test_vocab_trimmed_dynamic_tree_is_exact(kind):
    """A VocabTrim head over 3 of the 4 ids: the trimmed id is never drafted and keeps its target mass."""
    target, draft_model = models("llama")
    s2t = torch.tensor([0, 1, 3])
    trim_lm_head(draft_model, s2t)
    draft = policy_drafter(draft_model, DYNAMIC["threshold"], kind, 1.1, s2t)
    world = ModelWorld(target, temperature=0.9, top_p=0.9)
    outs = assert_exact(world, draft, (1, 3, 0))
    assert all(2 not in acc for acc, *_ in outs)


def test_dynamic_tree_with_deterministic_children_is_exact():
    target, draft_model = models("llama")
    world = ModelWorld(target, temperature=1.0)
    assert_exact(world, policy_drafter(draft_model, DynamicTree(5, 3, 0.0, 2), ChildKind.deterministic, 1.0),
                 (2, 0, 1))


# ---------------------------------------------------------------------------------------------------
# beam: the SBS tree law by the exponential race
# ---------------------------------------------------------------------------------------------------
def draft_p(model, temperature: float):
    cache: dict = {}

    def p(ctx):
        if ctx not in cache:
            with torch.no_grad():
                logits = model(torch.tensor([list(ctx)]), torch.arange(len(ctx))[None])[0, -1]
            cache[ctx] = torch.softmax(logits.double() / temperature, -1)
        return cache[ctx]
    return p


def race_tree(p, ctx: tuple, W: int, D: int, choose):
    """One SBS tree drawn by the exponential race (see the module docstring); `choose(probs) -> index` makes
    every random choice. Returns (topology, tokens, provenances, draft_probs) in the builder's layout: levels in
    order, a level's nodes by parent then arrival (descending G)."""
    nodes = [dict(parent=-1, tok=ctx[-1], depth=0, path=(), prob=1.0, kids=[])]
    level = [0] * (D + 2)
    level[0] = 1
    drawn: dict[int, list[int]] = {}

    def dist(i):
        return p(ctx + nodes[i]["path"])

    def arrive(parent, tok):
        par = nodes[parent]
        i = len(nodes)
        nodes.append(dict(parent=parent, tok=tok, depth=par["depth"] + 1, path=par["path"] + (tok,),
                          prob=par["prob"] * float(dist(parent)[tok]), kids=[]))
        par["kids"].append(i)
        level[par["depth"] + 1] += 1
        drawn[parent].append(tok)
        cascade(i)

    def draw(i):
        w = dist(i).clone()
        w[drawn[i]] = 0.0
        support = [x for x in range(len(w)) if w[x] > 0]
        return support[choose([float(w[x] / w.sum()) for x in support])]

    def cascade(i):  # node i arrived: its first child arrives at the same time (if its level has room)
        drawn[i] = []
        if nodes[i]["depth"] < D and level[nodes[i]["depth"] + 1] < W:
            arrive(i, draw(i))

    def rate(i):
        return nodes[i]["prob"] * (1.0 - sum(float(dist(i)[x]) for x in drawn[i]))

    cascade(0)
    while True:
        clocks = [i for i in range(len(nodes)) if nodes[i]["depth"] < D and level[nodes[i]["depth"] + 1] < W
                  and len(drawn[i]) < int((dist(i) > 0).sum())]
        if not clocks:
            break
        rates = [rate(i) for i in clocks]
        i = clocks[choose([r / sum(rates) for r in rates])]
        arrive(i, draw(i))
    order = [0]
    for d in range(1, D + 1):  # the builder's ids: level by level, by parent (in id order), then arrival
        order += [k for par in order if nodes[par]["depth"] == d - 1 for k in nodes[par]["kids"]]
    new_id = {old: new for new, old in enumerate(order)}
    topo = TreeTopology(tuple(-1 if i == 0 else new_id[nodes[i]["parent"]] for i in order))
    dp = torch.stack([dist(i) for i in order])
    return topo, [nodes[i]["tok"] for i in order], [Provenance.root] + [Provenance.wor] * (len(order) - 1), dp


def race_drafter(model, W, D, temperature):
    p = draft_p(model, temperature)
    return lambda ctx, sampler: race_tree(p, tuple(ctx), W, D, sampler.script.choose)


@pytest.mark.parametrize("transform", [dict(top_k=3), dict(top_p=0.8)], ids=["top_k", "top_p"])
def test_beam_tree_law_is_exact(transform):
    """W = 2, D = 2: the second level's beams race (the second root child gets a child only if it arrives
    before the first's second child)."""
    target, draft_model = models("llama")
    world = ModelWorld(target, temperature=0.9, **transform)
    assert_exact(world, race_drafter(draft_model, 2, 2, 1.1), (1, 3, 0))


def test_biased_rule_on_grown_trees_is_caught():
    """The same enumerations with WOR children verified by the plain draft distribution (a §8.3 biased rule)
    differ by far more than the tolerance (> 1e-5), so the exact results above are not vacuous."""
    target, draft_model = models("llama")
    world = ModelWorld(target, temperature=1.5)
    for drafter in (policy_drafter(draft_model, DYNAMIC["budget"], ChildKind.wor, 0.5),
                    race_drafter(draft_model, 2, 2, 0.5)):
        outs = step_outcomes(world, drafter, AcceptanceRule.rrs_draft_probs, (1, 3, 0))
        assert float(np.abs(joint_of(world, outs, (1, 3, 0), 2) - world.ar_joint((1, 3, 0), 2)).max()) > 1e-5


def tree_key(topo, tokens):
    return topo.parents, tuple(tokens)


def test_beam_builder_follows_the_sbs_law():
    """The engine's Gumbel builder (64 rows per propose) against the race law, chi-square over trees."""
    _, draft_model = models("llama")
    W, D, ctx, rows, reps = 2, 2, (1, 3, 0), 64, 25
    law = Counter()
    p = draft_p(draft_model, 1.1)
    for s, (topo, toks, _, _) in enumerate_runs(lambda ss: [race_tree(p, ctx, W, D, s.choose) for s in ss],
                                                [Script([])]):
        law[tree_key(topo, toks)] += s.weight
    assert abs(sum(law.values()) - 1.0) < TOL
    pol = BeamTree(W, D)
    d = ModelDrafter(draft_model, TreeTopology.root_only(), 64, ChildKind.wor, 1.1, V, rows=rows, policy=pol)
    for r in range(rows):
        d.start(r, list(ctx))
    g = torch.Generator().manual_seed(0)
    counts = Counter()
    for _ in range(reps):
        for r in range(rows):
            d.cached[r] = len(ctx) - 1  # re-draft from the same root (the catch-up feeds it again)
        tree = d.propose([SimpleNamespace(tokens=list(ctx), slot=r, sampler=TorchDraftSampler(g))
                          for r in range(rows)], [D] * rows)
        for b in range(rows):
            counts[tree_key(tree.topologies[b], tree.row_tokens(b))] += 1
    n = rows * reps
    assert set(counts) <= set(law), "the builder made a tree the law gives probability 0"
    keys = [k for k in law if law[k] * n >= 5]
    rest = 1.0 - sum(law[k] for k in keys)
    obs = [counts[k] for k in keys] + [n - sum(counts[k] for k in keys)]
    exp = [law[k] * n for k in keys] + [rest * n]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    assert len(keys) > 5 and stat < chi2.ppf(1 - ALPHA, len(keys)), f"chi2={stat:.1f} over {len(keys)} trees"


# ---------------------------------------------------------------------------------------------------
# end to end: the batched engine's first two tokens
# ---------------------------------------------------------------------------------------------------
E2E_V = 5
E2E = LlamaConfig(vocab_size=E2E_V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
PROMPT = [1, 3, 0, 3, 1]


@pytest.mark.parametrize("policy", [DynamicTree(6, 3, 0.0, 2), BeamTree(2, 3)], ids=["dynamic", "beam"])
def test_two_token_joint_matches_target(policy):
    target = init_random(E2E, seed=11).eval()
    draft = perturbed_copy(target, 0.6, 3).eval()
    sp = SamplingParams(1.0, top_p=0.9)
    n_slots = policy.max_nodes + policy.per_round
    rows, N = 50, 1000
    drafter = ModelDrafter(draft, TreeTopology.root_only(), 16 + n_slots, ChildKind.wor, 0.9, E2E_V, rows=rows,
                           policy=policy)
    eng = Engine(target, target.new_cache(rows, 16 + n_slots), drafter, max_seq_len=16)
    reqs = [Request(list(PROMPT), 2, sp, torch.Generator().manual_seed(2 * i), torch.Generator().manual_seed(2 * i + 1))
            for i in range(N)]
    res = eng.generate(reqs)
    counts = torch.zeros(E2E_V, E2E_V)
    for r in res:
        counts[r.output_ids[0], r.output_ids[1]] += 1

    def q(ctx):
        with torch.no_grad():
            logits = target(torch.tensor([ctx]), torch.arange(len(ctx))[None])[0, -1]
        return target_probs(logits, sp.temperature, sp.top_k, sp.top_p)
    expected = torch.stack([q(PROMPT)[a] * q(PROMPT + [a]) for a in range(E2E_V)]) * N
    assert (counts[expected == 0] == 0).all()
    keep = expected > 0
    stat = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    assert stat < chi2.ppf(1 - ALPHA, int(keep.sum()) - 1), f"chi2={stat:.1f}"
    assert sum(r.accept_lengths[0] for r in res) / N > 1.2  # drafts were accepted
