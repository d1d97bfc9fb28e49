"""Exact enumeration through the engine's own drafter (issue #10): the real `ModelDrafter` (a tiny fp64 Llama or
Mamba2 with its cache, catch-up and level-by-level tree forwards) draws its children through an enumerating
`DraftSampler`, so every draft tree it can make is visited with its exact probability; each tree goes through
the production batched `accept_sampled` with every accept / reject branch enumerated; the target
distributions come from a real tiny fp64 target model. The distribution of the emitted tokens must equal the
target model's autoregressive joint to 1e-12 (test_verifier_exact.py holds the harness)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from runtime.drafters import ModelDrafter
from runtime.models import mamba2
from runtime.models.llama import LlamaConfig, init_random
from runtime.sampling import AcceptanceRule, ChildKind, target_probs
from spec_compiler.tree import Provenance, TreeTopology
from tests.runtime.test_verifier_exact import TOL, World, joint_of, step_outcomes

V = 4
LLAMA = LlamaConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16,
                    max_position_embeddings=64)
SSM = mamba2.Mamba2Config(vocab_size=V, d_model=16, n_layer=1, d_state=4, headdim=8, chunk_size=16)


class ModelWorld:
    """The harness's world with q from a real target model: q(ctx) = target_probs(model logits after ctx)."""

    ar_joint = World.ar_joint

    def __init__(self, model, temperature: float, top_k: int = 0, top_p: float = 1.0):
        self.model, self.V = model, V
        self.params = (temperature, top_k, top_p)
        self._q, self._ar, self._steps = {}, {}, {}

    def key(self, ctx):
        return tuple(ctx)

    def q(self, ctx):
        k = tuple(ctx)
        if k not in self._q:
            ids = torch.tensor([list(ctx)])
            with torch.no_grad():
                logits = self.model(ids, torch.arange(len(ctx))[None])[0, -1]
            self._q[k] = target_probs(logits, *self.params)
        return self._q[k]


def engine_drafter(model, topo: TreeTopology, kind: ChildKind, temperature: float, s2t=None, policy=None):
    """The harness's drafter callable over the engine's ModelDrafter (one row, fresh prefill per draft): the
    static `topo`, or trees grown by `policy` (runtime.tree_policies); s2t: the head is trimmed to these ids."""
    n = topo.n if policy is None else policy.max_nodes + policy.per_round
    extra = {"num_scratch": n + 1} if isinstance(model, mamba2.Mamba2LMModel) else {}
    d = ModelDrafter(model, topo, 64 + n, kind, temperature, V, rows=1, s2t=s2t,
                     cache=model.new_cache(1, 64 + n, **extra), policy=policy)
    depth = topo.max_depth if policy is None else policy.max_nodes

    def draft(ctx, sampler):
        d.start(0, list(ctx))
        tree = d.propose([SimpleNamespace(tokens=list(ctx), slot=0, sampler=sampler)], [depth])
        n = tree.topologies[0].n
        dp = tree.draft_probs[0, :n] if tree.draft_probs is not None else torch.zeros(n, V, dtype=torch.float64)
        return tree.topologies[0], tree.row_tokens(0), [Provenance(int(x)) for x in tree.provenance[0, :n]], dp

    return draft


def models(arch: str):
    if arch == "llama":
        return init_random(LLAMA, 0).double().eval(), init_random(LLAMA, 5).double().eval()
    return (mamba2.init_random_mamba2(SSM, 0).double().eval(), mamba2.init_random_mamba2(SSM, 5).double().eval())


@pytest.mark.parametrize("arch", ["llama", "mamba2"])
@pytest.mark.parametrize("topo,kind,rule", [
    (TreeTopology.chain(2), ChildKind.iid, AcceptanceRule.auto),
    (TreeTopology.static([2, 1]), ChildKind.wor, AcceptanceRule.auto),
    (TreeTopology.static([3]), ChildKind.deterministic, AcceptanceRule.auto),
    (TreeTopology.static([2]), ChildKind.iid, AcceptanceRule.sample_match),
], ids=["chain2-iid", "static21-wor", "top3", "static2-iid-match"])
def test_engine_drafter_and_acceptance_are_lossless(arch, topo, kind, rule):
    target, draft_model = models(arch)
    world = ModelWorld(target, temperature=0.9, top_k=3 if kind is ChildKind.deterministic else 0)
    ctx = (1, 3, 0)
    m = topo.max_depth + 1
    outs = step_outcomes(world, engine_drafter(draft_model, topo, kind, 1.1), rule, ctx)
    assert abs(sum(w for *_, w in outs) - 1.0) < TOL
    got, want = joint_of(world, outs, ctx, m), world.ar_joint(ctx, m)
    assert abs(want.sum() - 1.0) < TOL
    assert float(np.abs(got - want).max()) < TOL
    accepted = sum(w for acc, _, w in outs if len(acc) > 0)
    assert accepted > 0.05  # drafts really were accepted: the check covers the accept paths too


def test_engine_drafter_with_a_biased_rule_is_caught():
    """WOR children verified with the plain draft distribution (no zeroing: a §8.3 biased combination) visibly
    differ through the same path, so the lossless results above are not vacuous. (The bias needs q > p on at
    least two tokens: a flat target, a peaked drafter.)"""
    target, draft_model = models("llama")
    topo = TreeTopology.static([2])
    world = ModelWorld(target, temperature=1.5)
    outs = step_outcomes(world, engine_drafter(draft_model, topo, ChildKind.wor, 0.5),
                         AcceptanceRule.rrs_draft_probs, (1, 3, 0))
    got, want = joint_of(world, outs, (1, 3, 0), 2), world.ar_joint((1, 3, 0), 2)
    assert float(np.abs(got - want).max()) > 1e-3
