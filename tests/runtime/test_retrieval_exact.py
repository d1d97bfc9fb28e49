"""Exact enumeration of RASD fused trees (issue #13; ALGORITHMS.md §3.3) through the engine's own code: the real
`FusedDrafter` (a tiny fp64 `ModelDrafter` whose children are drawn by the enumerating sampler, a
`DatastoreDrafter` over a small corpus, pruning by the draft model's path probabilities, longest-prefix
fusion) makes every fused tree with its exact probability; each goes through the production `accept_sampled`
with every accept / reject branch enumerated, against a real tiny fp64 target. The emitted tokens' law must be
the target's autoregressive joint to 1e-12 at temperature > 0.

The trees mix provenance under one parent: the root's drafted children (WOR / i.i.d. / top-k) are followed by
the retrieved-only ones, a retrieved token equal to a drafted sibling merges into it (keeping the drafter's
provenance), and retrieved continuations hang under drafted nodes next to drafted grandchildren. The power
check relabels merged nodes as retrieved (a δ proposal for a node that was really sampled): visibly biased.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import runtime.retrieval as R
from runtime.datastore import Datastore
from runtime.retrieval import DatastoreDrafter, FusedDrafter
from runtime.sampling import AcceptanceRule, ChildKind, TorchDraftSampler
from spec_compiler.tree import Provenance, TreeTopology
from tests.runtime.test_engine_exact import V, ModelWorld, models
from tests.runtime.test_verifier_exact import TOL, joint_of, step_outcomes
from runtime.drafters import ModelDrafter
from runtime.models import mamba2

CTX = (1, 3, 0)
# after "3 0": 2 (x2, then 1 / 2), 1 (then 2), 3 (then 3); documents separated by V
CORPUS = [3, 0, 2, 1, V, 3, 0, 2, 2, V, 3, 0, 1, 2, V, 1, 3, 0, 3, 3, V]


def fused_drafter(draft_model, topo: TreeTopology, kind: ChildKind, max_nodes: int, seen: list, prune="path"):
    n = topo.n + 16
    cache = draft_model.new_cache(1, 64 + n, **({"num_scratch": n + 1}
                                                if isinstance(draft_model, mamba2.Mamba2LMModel) else {}))
    model = ModelDrafter(draft_model, topo, 64 + n, kind, 1.1, V, rows=1, cache=cache)
    source = DatastoreDrafter(Datastore.from_tokens(CORPUS, V), 1, 2, 2, 4, 6)
    d = FusedDrafter(model, source, max_nodes, prune)

    def draft(ctx, sampler):
        d.start(0, list(ctx))
        tree = d.propose([SimpleNamespace(tokens=list(ctx), slot=0, sampler=sampler)], [3])
        n = tree.topologies[0].n
        provs = [Provenance(int(x)) for x in tree.provenance[0, :n]]
        seen.append(provs)
        dp = tree.draft_probs[0, :n] if tree.draft_probs is not None else torch.zeros(n, V, dtype=torch.float64)
        return tree.topologies[0], tree.row_tokens(0), provs, dp

    return draft


def mixed_under_one_parent(topo: TreeTopology, provs) -> bool:
    return any(len({provs[c] for c in kids}) > 1 for kids in topo.children)


@pytest.mark.parametrize("arch,topo,kind,max_nodes,prune", [
    ("llama", TreeTopology.static([2, 1]), ChildKind.wor, 4, "path"),
    ("mamba2", TreeTopology.static([2]), ChildKind.iid, 5, "path"),
    ("llama", TreeTopology.static([2]), ChildKind.deterministic, 3, "path"),
    ("mamba2", TreeTopology.static([2]), ChildKind.deterministic, 3, "path"),
    ("llama", TreeTopology.static([2]), ChildKind.wor, 3, "root"),
], ids=["llama-wor21", "mamba2-iid2", "llama-top2", "mamba2-top2", "llama-wor2-root"])
def test_fused_trees_are_lossless(arch, topo, kind, max_nodes, prune):
    target, draft_model = models(arch)
    world = ModelWorld(target, temperature=0.9)
    seen: list = []
    outs = step_outcomes(world, fused_drafter(draft_model, topo, kind, max_nodes, seen, prune), AcceptanceRule.auto,
                         CTX)
    assert abs(sum(w for *_, w in outs) - 1.0) < TOL
    m = 4  # longer than any tree's path + bonus
    got, want = joint_of(world, outs, CTX, m), world.ar_joint(CTX, m)
    assert abs(want.sum() - 1.0) < TOL
    assert float(np.abs(got - want).max()) < TOL
    assert any(Provenance.retrieved in p for p in seen)
    assert sum(w for acc, _, w in outs if len(acc) >= 1) > 0.05  # the accept paths are covered too
    if kind is not ChildKind.deterministic:
        assert sum(w for acc, _, w in outs if len(acc) >= 2) > 0.01


def test_mixed_provenance_is_exercised():
    """The trees above really mix drafted and retrieved children under one parent, and merge duplicates."""
    target, draft_model = models("llama")
    seen: list = []
    draft = fused_drafter(draft_model, TreeTopology.static([2, 1]), ChildKind.wor, 4, seen)
    trees = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        trees.append(draft(CTX, TorchDraftSampler(gen)))
    assert any(mixed_under_one_parent(t, p) for t, _, p, _ in trees)
    # below a drafted node too: a drafted grandchild next to a retrieved one
    assert any(len({p[c] for c in t.children[i]}) > 1 for t, _, p, _ in trees for i in range(1, t.n))
    # the model's 5 nodes + 4 kept candidates, fewer when a candidate merged into a drafted node
    assert all(t.n <= 5 + 4 for t, _, _, _ in trees) and any(t.n < 5 + 4 for t, _, _, _ in trees)


def test_merged_node_relabelled_retrieved_is_biased(monkeypatch):
    """Power check: the other choice for a node both drafted and retrieved, a δ proposal, is not exact."""
    real = R.fuse

    def relabel(model, cand, keep, *args):
        out = real(model, cand, keep, *args)
        topo, toks = out.topologies[0], out.row_tokens(0)
        ct, ctoks = cand.topologies[0], cand.row_tokens(0)
        kept = {tuple(ctoks[j] for j in ct.path(i)[1:]) for i in keep[0][1:]}
        for i in range(1, topo.n):
            if tuple(toks[j] for j in topo.path(i)[1:]) in kept:
                out.provenance[0, i] = int(Provenance.retrieved)
        return out

    monkeypatch.setattr(R, "fuse", relabel)
    target, draft_model = models("llama")
    world = ModelWorld(target, temperature=0.9)
    outs = step_outcomes(world, fused_drafter(draft_model, TreeTopology.static([2, 1]), ChildKind.wor, 4, []),
                         AcceptanceRule.auto, CTX)
    got, want = joint_of(world, outs, CTX, 4), world.ar_joint(CTX, 4)
    assert float(np.abs(got - want).max()) > 1e-3
