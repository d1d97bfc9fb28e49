"""Exact-enumeration tests of drafting + acceptance (TESTING.md layer 1; ALGORITHMS.md §0.2-0.3, §8.3).

fp64, no sampling noise, and every random decision goes through the engine's own code:

- **Drafting**: a *drafter* is any callable `(context tokens, sampler) -> (topology, tokens, provenances,
  draft_probs)` that draws its sampled children through a `runtime.sampling.DraftSampler`. The engine
  passes `TorchDraftSampler`; here `EnumeratingSampler` replays a scripted choice sequence and reports each
  choice's exact probability (i.i.d.: p(x); without replacement: the Plackett-Luce factors
  p(x1) · p(x2) / (1 - p(x1)) ...), and a depth-first search over choice prefixes (`enumerate_runs`) yields
  every tree the drafter can make with its probability. `world_drafter` builds one from the World tables
  (the lead's tiny-model drafter plugs into the same enumeration).
- **Acceptance**: `runtime.sampling.accept_sampled` (the batched production path) runs with a `ScriptChooser`
  instead of the engine's `Uniforms`: every accept / reject (probability a, 1 - a) and every categorical
  draw is a scripted choice, so the same search enumerates every verification branch; the final
  (bonus / recovered) draw is recorded as its whole distribution. All enumerated branches of all trees run
  as rows of one batch per search round. `walk_sampled` (the per-row reference) equals `accept_sampled`
  decision for decision on random inputs (test_accept_batched.py).

The distribution of the first m emitted tokens (padded with plain target sampling when a step emits
fewer than m) must equal the target's autoregressive m-token joint to 1e-12. The biased combinations of
§8.3 must visibly differ (> 1e-3), which is what justifies the config validator's refusals.

The helpers here (World, world_drafter, enumerate_runs, ...) are reused by test_verifier_sampling.py and
test_accept_batched.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

from runtime.batch import TreeBatch
from runtime.sampling import (AcceptanceRule, ChildKind, accept_sampled, child_proposal, removes_later, rrs_step,
                              target_probs)
from spec_compiler.tree import Provenance, TreeTopology

TOL = 1e-12
BIAS = 1e-3
A, IID, WOR, DET = AcceptanceRule, ChildKind.IID, ChildKind.WOR, ChildKind.DETERMINISTIC
P = Provenance
PROV_OF_KIND = {DET: P.topk, IID: P.iid, WOR: P.wor}

Draft = tuple  # (topology, tokens [n], provenances [n], draft_probs [n, V] float64)
Drafter = Callable[[tuple, object], Draft]


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
    _steps: dict = field(default_factory=dict, repr=False)

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

    def retrieved(self, ctx: Sequence[int], j: int) -> int:
        """A retrieval source's j-th continuation after ctx (deterministic, blind to p and q)."""
        return (3 * ctx[-1] + ctx[-2] + j) % self.V

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
# enumeration over scripted choices
# ---------------------------------------------------------------------------------------------------
class Script:
    """One run's random choices: replays `prefix`, then takes option 0 at every new choice and remembers
    the other options (each becomes a script of its own). `weight` accumulates the chosen options' exact
    probabilities."""

    def __init__(self, prefix: list[int], weight: float = 1.0, tag=None):
        self.prefix, self.taken, self.weight, self.base, self.tag = prefix, [], weight, weight, tag
        self.branches: list[tuple[int, int]] = []

    def choose(self, probs: Sequence[float]) -> int:
        """Index of the option taken among options of probability probs (all > 0)."""
        i = len(self.taken)
        if i < len(self.prefix):
            k = self.prefix[i]
        else:
            k = 0
            self.branches += [(i, j) for j in range(1, len(probs))]
        self.taken.append(k)
        self.weight *= probs[k]
        return k

    def siblings(self) -> list["Script"]:
        return [Script(self.taken[:i] + [j], self.base, self.tag) for i, j in self.branches]


def enumerate_runs(run_all: Callable[[list[Script]], list], roots: list[Script]) -> Iterator[tuple[Script, object]]:
    """Every outcome of a random procedure with its probability: `run_all(scripts)` runs the procedure once
    per script (in one batch); each new choice a run meets spawns the scripts of its other options."""
    scripts = roots
    while scripts:
        results = run_all(scripts)
        nxt = []
        for s, r in zip(scripts, results):
            yield s, r
            nxt += s.siblings()
        scripts = nxt


class EnumeratingSampler:
    """`DraftSampler` whose draws are a script's choices, with their exact probabilities."""

    def __init__(self, script: Script):
        self.script = script

    def children(self, p: torch.Tensor, b: int, prov: Provenance) -> list[int]:
        w = p.tolist()
        out = []
        for _ in range(min(b, sum(x > 0 for x in w))):
            support = [x for x in range(len(w)) if w[x] > 0]
            tot = sum(w[x] for x in support)
            x = support[self.script.choose([w[x] / tot for x in support])]
            out.append(x)
            if prov == P.wor:  # Plackett-Luce: the next draw is from p without the tokens drawn so far
                w[x] = 0.0
            else:
                assert prov == P.iid, prov
        return out


class ScriptChooser:
    """The acceptance chooser of the enumeration: row r's decisions are scripts[r]'s choices."""

    def __init__(self, scripts: list[Script]):
        self.scripts = scripts
        self.finals: list[list[float]] | None = None

    def accept(self, nodes: torch.Tensor, a: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        out = []
        for s, ar, on in zip(self.scripts, a.tolist(), active.tolist()):
            if not on or ar <= 0.0:
                out.append(False)
            elif ar >= 1.0:
                out.append(True)
            else:
                out.append(s.choose([ar, 1.0 - ar]) == 0)
        return torch.tensor(out, dtype=torch.bool)

    def draw(self, w: torch.Tensor, nodes: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        out = [0] * len(self.scripts)
        on = active.nonzero().flatten().tolist()
        for r, pr in zip(on, (w[on] / w[on].sum(-1, keepdim=True)).tolist()):
            support = [x for x, px in enumerate(pr) if px > 0]
            out[r] = support[self.scripts[r].choose([pr[x] for x in support])]
        return torch.tensor(out, dtype=torch.long)

    def final(self, w: torch.Tensor) -> torch.Tensor:
        self.finals = (w / w.sum(-1, keepdim=True)).tolist()
        return torch.zeros(w.shape[0], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------
# drafting from the World tables
# ---------------------------------------------------------------------------------------------------
def node_ctx(topo: TreeTopology, tokens: Sequence[int], ctx: tuple[int, ...], node: int) -> tuple[int, ...]:
    """Context seen at `node`: the committed context (ending with the root token) plus the path."""
    return tuple(ctx) + tuple(tokens[j] for j in topo.path(node)[1:])


def world_drafter(world: World, topo: TreeTopology, provs: Sequence[Provenance]) -> Drafter:
    """A drafter for `topo` whose node i is made as provs[i] says: a parent's children are filled in id
    order, a run of equal provenance at a time: topk = the run's top-b tokens of p (descending p, lower id
    on ties); iid / wor = one `sampler.children(p, b, prov)` call (fewer children if p's support is
    smaller: the rest of the run and their subtrees are dropped); retrieved = `world.retrieved`."""
    assert len(provs) == topo.n and provs[0] == P.root

    def draft(ctx: tuple, sampler) -> Draft:
        n = topo.n
        tokens, keep = [ctx[-1]] + [0] * (n - 1), [True] + [False] * (n - 1)
        dp = torch.zeros(n, world.V, dtype=torch.float64)
        for node in range(n):  # topological: a node's token is set before its children's
            kids = topo.children[node]
            if not kids or not keep[node]:
                continue
            c = node_ctx(topo, tokens, ctx, node)
            p = dp[node] = world.p(c)
            runs: list[list[int]] = []
            for k in kids:
                if runs and provs[runs[-1][-1]] == provs[k]:
                    runs[-1].append(k)
                else:
                    runs.append([k])
            for run in runs:
                prov = provs[run[0]]
                if prov == P.topk:
                    pl = p.tolist()
                    picked = sorted(range(world.V), key=lambda x: (-pl[x], x))[:len(run)]
                elif prov == P.retrieved:
                    picked = [world.retrieved(c, j) for j in range(len(run))]
                else:
                    picked = sampler.children(p, len(run), prov)
                for k, x in zip(run, picked):
                    tokens[k], keep[k] = x, True
        kept = [i for i in range(n) if keep[i]]
        return topo.select(kept), [tokens[i] for i in kept], [provs[i] for i in kept], dp[kept]

    return draft


def enumerate_drafter(drafter: Drafter, ctx: tuple) -> list[tuple[Draft, float]]:
    """Every draft the drafter can make after ctx, with its exact probability (sums to 1)."""
    runs = enumerate_runs(lambda ss: [drafter(ctx, EnumeratingSampler(s)) for s in ss], [Script([])])
    out = [(d, s.weight) for s, d in runs]
    total = sum(w for _, w in out)
    assert abs(total - 1.0) < TOL, f"draft probabilities sum to {total}"
    return out


def draft_batch(world: World, drafts: Sequence[Draft], ctx: tuple, pad: int = 1) -> tuple[TreeBatch, torch.Tensor]:
    """The drafts as one TreeBatch (padded `pad` nodes past the largest) and the target rows q [D, T, V]."""
    T = max(d[0].n for d in drafts) + pad
    dp = torch.zeros(len(drafts), T, world.V, dtype=torch.float64)
    q = torch.full((len(drafts), T, world.V), 1.0 / world.V, dtype=torch.float64)
    for b, (topo, toks, _, p) in enumerate(drafts):
        dp[b, :topo.n] = p
        for i in range(topo.n):
            q[b, i] = world.q(node_ctx(topo, toks, ctx, i))
    tree = TreeBatch.build([d[0] for d in drafts], [d[1] for d in drafts], [d[2] for d in drafts], T, dp)
    return tree, q


# ---------------------------------------------------------------------------------------------------
# verification: every accept / reject branch and draw of every tree, through accept_sampled
# ---------------------------------------------------------------------------------------------------
def step_outcomes(world: World, drafter: Drafter, rule: AcceptanceRule, ctx: tuple,
                  key=None) -> list[tuple[tuple[int, ...], list[float], float]]:
    """(accepted tokens, law of the emitted token (recovered or bonus), probability) of every branch of one
    speculative step: every draft, every verification branch. Memoised on the world by `key`."""
    if key is not None and key in world._steps:
        return world._steps[key]
    drafts = enumerate_drafter(drafter, ctx)
    tree, q = draft_batch(world, [d for d, _ in drafts], ctx)
    tokens = tree.tokens.tolist()

    def run_all(scripts: list[Script]):
        rows = [s.tag for s in scripts]
        ch = ScriptChooser(scripts)
        paths, toks = accept_sampled(tree.select_rows(rows), q[rows], rule, chooser=ch)
        if rule is A.SAMPLE_MATCH:  # the emitted token was a scripted draw
            finals = [[float(x == y) for x in range(world.V)] for y in toks]
        else:
            finals = ch.finals
        return [(tuple(tokens[r][i] for i in path[1:]), fin) for r, path, fin in zip(rows, paths, finals)]

    out = [(acc, fin, s.weight) for s, (acc, fin) in
           enumerate_runs(run_all, [Script([], w, tag=b) for b, (_, w) in enumerate(drafts)])]
    if key is not None:
        world._steps[key] = out
    return out


def provs_for(topo: TreeTopology, kinds) -> list[Provenance]:
    """Per-node provenance from a per-parent child kind (one ChildKind, or a list per node), or a
    per-node Provenance list as is."""
    if isinstance(kinds, ChildKind):
        kinds = kinds_for(topo, kinds)
    kinds = list(kinds)
    if all(isinstance(k, Provenance) for k in kinds):
        return kinds
    return [P.root] + [PROV_OF_KIND[kinds[topo.parents[i]]] for i in range(1, topo.n)]


def kinds_for(topo: TreeTopology, kind) -> list[ChildKind]:
    if isinstance(kind, ChildKind):
        return [kind if topo.children[i] else None for i in range(topo.n)]
    return list(kind)


def outcomes(world: World, topo: TreeTopology, kinds, rule: AcceptanceRule, ctx: tuple):
    provs = provs_for(topo, kinds)
    return step_outcomes(world, world_drafter(world, topo, provs), rule, ctx,
                         key=(topo.parents, tuple(provs), rule, tuple(ctx)))


def enumerate_drafts(world: World, topo: TreeTopology, kinds, ctx: tuple) -> Iterator[tuple[list[int], float]]:
    """Every draft (token list) for this topology, with its exact probability."""
    for (_, toks, _, _), w in enumerate_drafter(world_drafter(world, topo, provs_for(topo, kinds)), ctx):
        yield toks, w


def joint_of(world: World, outs, ctx: tuple, m: int) -> np.ndarray:
    """Exact distribution of the first m emitted tokens (padded with target sampling)."""
    out = np.zeros((world.V,) * m)
    for acc, fin, w in outs:
        for y, py in enumerate(fin):
            if py <= 0:
                continue
            em = acc + (y,)
            if len(em) >= m:
                out[em[:m]] += w * py
            else:
                out[em] += w * py * world.ar_joint(tuple(ctx) + em, m - len(em))
    return out


def emitted_joint(world: World, topo: TreeTopology, kinds, rule: AcceptanceRule, ctx: tuple, m: int) -> np.ndarray:
    return joint_of(world, outcomes(world, topo, kinds, rule, ctx), ctx, m)


def accepted_count_dist(world: World, topo: TreeTopology, kinds, rule: AcceptanceRule, ctx: tuple) -> np.ndarray:
    """Exact distribution of len(accepted draft tokens) in one step."""
    out = np.zeros(topo.max_depth + 1)
    for acc, _fin, w in outcomes(world, topo, kinds, rule, ctx):
        out[len(acc)] += w
    return out


def max_bias(world: World, topo: TreeTopology, kinds, rule: AcceptanceRule, ctx, m: int) -> float:
    got = emitted_joint(world, topo, kinds, rule, ctx, m)
    want = world.ar_joint(ctx, m)
    assert abs(got.sum() - 1.0) < TOL and abs(want.sum() - 1.0) < TOL
    return float(np.abs(got - want).max())


def assert_lossless(world: World, topo: TreeTopology, kind, rule: AcceptanceRule, m: int | None = None,
                    ctx: tuple[int, ...] = (1, 2)):
    m = topo.max_depth + 1 if m is None else m
    d = max_bias(world, topo, kinds_for(topo, kind) if isinstance(kind, ChildKind) else kind, rule, ctx, m)
    assert d < TOL, f"output differs from the target's AR joint by {d:.3e}"


# ---------------------------------------------------------------------------------------------------
# self-check of the harness
# ---------------------------------------------------------------------------------------------------
def test_harness_enumerations_are_distributions():
    w = World(V=4, seed=0)
    p = w.p((0, 1))
    for prov in (P.iid, P.wor):  # the sampler's exact law: every ordered 3-tuple, summing to 1
        runs = list(enumerate_runs(lambda ss: [EnumeratingSampler(s).children(p, 3, prov) for s in ss],
                                   [Script([])]))
        assert abs(sum(s.weight for s, _ in runs) - 1.0) < TOL
        assert len(runs) == (64 if prov == P.iid else 24)
        if prov == P.wor:
            assert all(len(set(t)) == 3 for _, t in runs)
            pl = p.tolist()
            for s, (x1, x2, x3) in runs:  # Plackett-Luce
                want = pl[x1] * pl[x2] / (1 - pl[x1]) * pl[x3] / (1 - pl[x1] - pl[x2])
                assert abs(s.weight - want) < TOL
    topo = TreeTopology((-1, 0, 0, 1, 1, 2))
    kinds = kinds_for(topo, WOR)
    trees = list(enumerate_drafts(w, topo, kinds, (1, 2)))
    assert len(trees) == 12 * 12 * 4
    # every tree's verification branches sum to 1
    outs = outcomes(w, topo, kinds, A.AUTO, (1, 2))
    assert abs(sum(x for _, _, x in outs) - 1.0) < TOL
    assert all(abs(sum(fin) - 1.0) < TOL for _, fin, _ in outs)
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


def test_enumeration_uses_the_engine_walk(monkeypatch):
    """The enumeration runs accept_sampled itself: breaking the engine's node rule breaks the result."""
    import runtime.sampling as S

    w = World(V=4, seed=3)
    topo = TreeTopology.static([2, 1])
    assert max_bias(w, topo, kinds_for(topo, WOR), A.AUTO, (1, 2), 2) < TOL
    real = S.rrs_step
    monkeypatch.setattr(S, "rrs_step", lambda res, x, r: (lambda a, n, s: (torch.clamp(a * 1.2, max=1.0), n, s))(
        *real(res, x, r)))
    w2 = World(V=4, seed=3)
    assert max_bias(w2, topo, kinds_for(topo, WOR), A.AUTO, (1, 2), 2) > BIAS


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
# per-node provenance: one parent with children of mixed provenance, padding
# ---------------------------------------------------------------------------------------------------
MIXED = {
    # root: two WOR draws then two retrieved tokens; node 1: two i.i.d. draws; node 2: a top-1 pick
    "wor+retrieved": (TreeTopology((-1, 0, 0, 0, 0, 1, 1, 2)),
                      [P.root, P.wor, P.wor, P.retrieved, P.retrieved, P.iid, P.iid, P.topk]),
    # root: one i.i.d. draw then one retrieved; below: WOR pairs and a retrieved chain
    "iid+retrieved": (TreeTopology((-1, 0, 0, 1, 1, 2)),
                      [P.root, P.iid, P.retrieved, P.wor, P.wor, P.retrieved]),
    # top-k picks followed by sampled ones under one parent
    "topk+wor": (TreeTopology((-1, 0, 0, 0, 1)), [P.root, P.topk, P.wor, P.wor, P.iid]),
}


@pytest.mark.parametrize("name", list(MIXED))
@pytest.mark.parametrize("rule", [A.AUTO, A.SAMPLE_MATCH])
def test_mixed_provenance_per_parent(name, rule):
    """Each child's proposal comes from its own provenance (a WOR child excludes only the earlier WOR
    siblings), so one parent may mix sampled and retrieved / top-k children."""
    topo, provs = MIXED[name]
    assert_lossless(World(V=4, seed=1000), topo, provs, rule)


def test_mixed_provenance_needs_per_child_proposals():
    """Power check: treating the retrieved children as WOR draws (rrs_wor for all) is visibly biased."""
    topo, provs = MIXED["wor+retrieved"]
    w = World(V=4, seed=906)
    assert max_bias(w, topo, provs, A.RRS_WOR, (1, 2), 2) > BIAS
    assert max_bias(w, topo, provs, A.AUTO, (1, 2), 2) < TOL


def test_wor_support_smaller_than_branching():
    """A drafter whose p has 2 tokens cannot draw 3 WOR children: it drafts 2 (the tree is pruned), and
    the step stays exact."""
    w = World(V=5, seed=42, d_keep=(1, 3))
    topo = TreeTopology.static([3, 1])
    ns = {d[0].n for d, _ in enumerate_drafter(world_drafter(w, topo, provs_for(topo, WOR)), (1, 2))}
    assert ns == {5}
    assert_lossless(w, topo, WOR, A.AUTO)


# ---------------------------------------------------------------------------------------------------
# rrs_step / child_proposal edge cases, exactly
# ---------------------------------------------------------------------------------------------------
def _dist(vals) -> torch.Tensor:
    t = torch.tensor(vals, dtype=torch.float64)
    return t / t.sum()


def _x(i: int) -> torch.Tensor:
    return torch.tensor(i)


def test_rrs_step_p_equals_q_accepts_with_probability_one():
    q = _dist([1, 2, 3, 4])
    for x in range(4):
        a, res, stop = rrs_step(q, _x(x), q.clone())
        assert a == 1.0 and stop and torch.equal(res, q)


def test_rrs_step_q_zero_never_accepts():
    q = _dist([0, 2, 3, 5])
    p = _dist([4, 1, 1, 1])
    a, res, stop = rrs_step(q, _x(0), p)
    assert a == 0.0 and not stop
    want = torch.clamp(q - p, min=0)
    assert torch.allclose(res, want / want.sum(), rtol=0, atol=TOL)
    assert res[0] == 0.0


def test_rrs_step_zero_proposal_never_accepts_and_keeps_residual():
    q = _dist([1, 2, 3, 4])
    r = _dist([0, 1, 1, 1])
    a, res, stop = rrs_step(q, _x(0), r)
    assert a == 0.0 and torch.equal(res, q) and not stop
    a, res, stop = rrs_step(q, _x(1), torch.zeros(4, dtype=torch.float64))  # the deterministic-without-probs case
    assert a == 0.0 and torch.equal(res, q) and not stop


def test_rrs_step_delta_proposal():
    q = _dist([1, 2, 3, 4])
    r = torch.zeros(4, dtype=torch.float64)
    r[2] = 1.0
    a, res, stop = rrs_step(q, _x(2), r)
    assert abs(float(a) - 0.3) < TOL and not stop
    assert torch.allclose(res, _dist([1, 2, 0, 4]), rtol=0, atol=TOL)
    a, res, stop = rrs_step(r, _x(2), r)  # point-mass target on the proposed token
    assert a == 1.0 and stop


def test_rrs_step_batched_rows_equal_single_rows():
    """The [B, V] form is the [V] form row by row, bit for bit."""
    g = torch.Generator().manual_seed(0)
    res = torch.softmax(torch.randn(6, 7, generator=g, dtype=torch.float64), -1)
    r = torch.softmax(torch.randn(6, 7, generator=g, dtype=torch.float64), -1)
    r[2] = res[2]
    x = torch.randint(0, 7, (6,), generator=g)
    a, nres, stop = rrs_step(res, x, r)
    for b in range(6):
        a1, n1, s1 = rrs_step(res[b], x[b], r[b])
        assert torch.equal(a[b], a1) and torch.equal(nres[b], n1) and bool(stop[b]) == bool(s1)
    assert bool(stop[2])


@pytest.mark.parametrize("seed", range(5))
def test_rrs_step_single_stage_is_lossless(seed):
    """One stage: x ~ r, accept w.p. a(x), else y ~ residual. Output law == res exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64) * 2, -1)
    r = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64) * 2, -1)
    out = torch.zeros(5, dtype=torch.float64)
    for x in range(5):
        a, res, _ = rrs_step(q, _x(x), r)
        assert a == min(1.0, float(q[x] / r[x]))
        out[x] += r[x] * a
        out += r[x] * (1 - a) * res
    assert torch.allclose(out, q, rtol=0, atol=TOL)


def _prop(prov: Provenance, rule: AcceptanceRule, p: torch.Tensor, x: int, earlier: list[int]) -> torch.Tensor:
    mask = torch.zeros(p.shape[-1], dtype=torch.bool)
    mask[earlier] = True
    return child_proposal(torch.tensor(int(prov)), rule, p, _x(x), mask)


def test_child_proposal_table():
    p = _dist([1, 2, 3, 4])
    assert torch.equal(_prop(P.iid, A.AUTO, p, 1, [3]), p)
    assert torch.equal(_prop(P.wor, A.RRS_DRAFT_PROBS, p, 1, [3]), p)
    assert torch.allclose(_prop(P.wor, A.AUTO, p, 1, [3]), _dist([1, 2, 3, 0]), rtol=0, atol=TOL)
    assert torch.allclose(_prop(P.iid, A.RRS_WOR, p, 1, [3, 0]), _dist([0, 2, 3, 0]), rtol=0, atol=TOL)
    assert torch.allclose(_prop(P.wor, A.AUTO, p, 1, []), p, rtol=0, atol=1e-15)
    for prov in (P.topk, P.retrieved):
        d = _prop(prov, A.AUTO, p, 2, [0, 1])
        assert d.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert torch.equal(_prop(P.topk, A.RRS_DRAFT_PROBS, p, 2, [0]), p)
    assert torch.equal(p, _dist([1, 2, 3, 4]))  # inputs are not mutated
    # which children leave the later siblings' WOR proposals
    provs = torch.tensor([int(x) for x in (P.topk, P.iid, P.wor, P.retrieved)])
    assert removes_later(provs, A.AUTO).tolist() == [False, False, True, False]
    assert removes_later(provs, A.RRS_WOR).tolist() == [True] * 4
