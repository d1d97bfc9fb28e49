"""Exact enumeration through the SSM path (ISSUE: STree): the target's distribution at every tree node
comes from a Mamba2 / hybrid model's *tree-verification* forward (tree conv + tree scan, fp64), while the
autoregressive joint it must equal comes from plain causal prefills. Every draft tree and every
accept / reject branch is enumerated with the engine's own rule (tests/runtime/test_verifier_exact.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pytest
import torch

from runtime.batch import Block, TreeBatch
from runtime.models.mamba2 import Mamba2Config, init_random_mamba2
from runtime.sampling import AcceptanceRule, ChildKind, target_probs
from spec_compiler.tree import Provenance, TreeTopology
from tests.runtime.test_verifier_exact import TOL, World, emitted_joint, kinds_for

V = 4
BASE = (1, 3, 0, 2)  # committed context; its last token is the tree root


@dataclass
class SSMWorld(World):
    """q(ctx) from the SSM model: prefill BASE[:-1], then verify root + path as a tree (a tree Block)."""

    model: object = None

    def key(self, ctx: Sequence[int]) -> tuple[int, ...]:
        return tuple(ctx)  # the SSM state depends on the whole context

    def p(self, ctx: Sequence[int]) -> torch.Tensor:  # the drafter stays a table on the last tokens
        k = tuple(ctx[-self.order:])
        if k not in self._p:
            self._p[k] = target_probs(self.d_logits[k], self.d_temp, self.d_top_k, 1.0)
        return self._p[k]

    def _logits(self, ctx: tuple[int, ...], tree: bool) -> torch.Tensor:
        L = len(BASE) - 1
        cache = self.model.new_cache(1, 32)
        with torch.no_grad():
            if not tree:
                return self.model(torch.tensor([ctx]), torch.arange(len(ctx))[None], cache,
                                  Block.causal(0, len(ctx)))[0, -1]
            self.model(torch.tensor([BASE[:-1]]), torch.arange(L)[None], cache, Block.causal(0, L))
            path = ctx[L:]
            topo = TreeTopology.chain(len(path) - 1)
            tb = TreeBatch.build([topo], [path], [[Provenance.root] + [Provenance.topk] * (topo.n - 1)], topo.n)
            block = Block.tree(torch.tensor([L]), tb, L + topo.n)
            return self.model(tb.tokens, block.positions, cache, block)[0, -1]

    def q(self, ctx: Sequence[int]) -> torch.Tensor:
        k = tuple(ctx)
        if k not in self._q:
            self._q[k] = target_probs(self._logits(k, tree=True), self.t_temp, self.t_top_k, self.t_top_p)
        return self._q[k]

    def ar_joint(self, ctx: Sequence[int], m: int) -> np.ndarray:
        k = (tuple(ctx), m)
        if k not in self._ar:
            if m == 0:
                out = np.ones(())
            else:
                q = target_probs(self._logits(tuple(ctx), tree=False), self.t_temp, self.t_top_k, self.t_top_p)
                out = np.stack([q[x].item() * self.ar_joint(tuple(ctx) + (x,), m - 1) for x in range(V)])
            self._ar[k] = out
        return self._ar[k]


def ssm_world(hybrid: bool, **kw) -> SSMWorld:
    attn = dict(attn_layer_idx=(1,), attn_num_heads=2, attn_rotary_dim=8) if hybrid else {}
    cfg = Mamba2Config(vocab_size=V, d_model=16, n_layer=2, d_state=8, headdim=8, chunk_size=16, **attn)
    model = init_random_mamba2(cfg, seed=3).to(torch.float64).eval()
    return SSMWorld(V=V, seed=5, model=model, **kw)


@pytest.mark.parametrize("hybrid", [False, True], ids=["mamba2", "hybrid"])
@pytest.mark.parametrize("branching,kind,rule", [
    ([1, 1], ChildKind.iid, AcceptanceRule.auto),
    ([2, 1], ChildKind.wor, AcceptanceRule.auto),
    ([2, 1], ChildKind.deterministic, AcceptanceRule.auto),
    ([2, 2], ChildKind.iid, AcceptanceRule.sample_match),
])
def test_tree_verification_through_ssm_is_exact(hybrid, branching, kind, rule):
    world = ssm_world(hybrid, t_temp=0.9, t_top_p=0.95)
    topo = TreeTopology.static(branching)
    got = emitted_joint(world, topo, kinds_for(topo, kind), rule, BASE, m=2)
    want = world.ar_joint(BASE, 2)
    assert abs(want.sum() - 1) < TOL
    assert np.abs(got - want).max() < 1e-10, np.abs(got - want).max()
