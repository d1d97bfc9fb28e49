"""backend.ssm_prefill=mamba_ssm: Mamba2 prefill chunks go through mamba-ssm's `mamba_chunk_scan_combined`.

mamba-ssm needs CUDA, so here a fake `mamba_ssm` package (in sys.modules) provides the function: it records its
arguments and computes our torch scan. The routing must call it for advance blocks of T > 1 only, with the
argument mapping its API defines (dt already softplused: dt_softplus=False; initial_states [b, H, P, N];
return_final_states), and the model's outputs and committed state must equal the torch path's.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from runtime.batch import Block, TreeBatch
from runtime.load import route_kernels
from runtime.models import mamba2
from runtime.models.mamba2 import Mamba2Config, init_random_mamba2, ssd_chunked_scan
from runtime.phases import cache_tensors
from spec_compiler.tree import Provenance, TreeTopology

CFG = Mamba2Config(vocab_size=53, d_model=32, n_layer=3, d_state=8, headdim=8, ngroups=2, chunk_size=4,
                   d_intermediate=32, attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2, attn_rotary_dim=4)


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    """A `mamba_ssm.ops.triton.ssd_combined` whose scan is ours; returns the list of recorded calls."""
    calls = []

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                                  return_final_states=False, return_varlen_states=False, state_dtype=None):
        calls.append(dict(x=x.shape, dt=dt.shape, A=A.shape, B=B.shape, C=C.shape, chunk_size=chunk_size,
                          D=None if D is None else D.shape, z=z, dt_bias=dt_bias,
                          initial_states=None if initial_states is None else initial_states.shape,
                          dt_softplus=dt_softplus, return_final_states=return_final_states,
                          min_dt=float(dt.min())))
        y, state = ssd_chunked_scan(x, dt, A, B, C, chunk_size, D, initial_states)
        return (y, state) if return_final_states else y

    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.ssd_combined"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined = mamba_chunk_scan_combined
    for parent, child in zip(names, names[1:]):
        setattr(sys.modules[parent], child.rsplit(".", 1)[1], sys.modules[child])
    mamba2.mamba_chunk_scan.cache_clear()
    yield calls
    mamba2.mamba_chunk_scan.cache_clear()


def plan_with(ssm_prefill: str):
    return types.SimpleNamespace(attention="sdpa", tree_buckets=(1,), ssm_prefill=ssm_prefill)


def test_the_lazy_import_finds_the_function(fake_mamba_ssm):
    assert mamba2.mamba_chunk_scan() is sys.modules["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined


def test_without_mamba_ssm_the_import_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # `import mamba_ssm` raises ImportError
    mamba2.mamba_chunk_scan.cache_clear()
    try:
        assert mamba2.mamba_chunk_scan() is None
    finally:
        mamba2.mamba_chunk_scan.cache_clear()


def test_prefill_routes_through_mamba_ssm_and_equals_torch(fake_mamba_ssm):
    torch.manual_seed(0)
    routed, plain = init_random_mamba2(CFG, seed=1).eval(), init_random_mamba2(CFG, seed=1).eval()
    route_kernels(routed, plan_with("mamba_ssm"))
    route_kernels(plain, plan_with("torch"))
    c = CFG
    B, L1, L2 = 2, 9, 6
    ids = torch.randint(0, 53, (B, L1 + L2 + 1))
    caches = [m.new_cache(B, 64) for m in (routed, plain)]
    outs = []
    with torch.no_grad():
        for m, cache in zip((routed, plain), caches):
            a = m(ids[:, :L1], torch.arange(L1).expand(B, L1), cache, Block.causal(0, L1, B))
            b = m(ids[:, L1:L1 + L2], torch.arange(L1, L1 + L2).expand(B, L2), cache, Block.causal(L1, L2, B))
            t = m(ids[:, -1:], torch.full((B, 1), L1 + L2), cache, Block.causal(L1 + L2, 1, B))  # T = 1: a step
            outs.append((a, b, t))
    ssm_layers = c.n_layer - len(c.attn_layer_idx)
    assert len(fake_mamba_ssm) == 2 * ssm_layers  # two prefill chunks per SSM layer; the T = 1 step is not one
    H, P, G, N = c.nheads, c.headdim, c.ngroups, c.d_state
    first = fake_mamba_ssm[0]
    assert first["x"] == (B, L1, H, P) and first["dt"] == (B, L1, H) and first["A"] == (H,)
    assert first["B"] == first["C"] == (B, L1, G, N) and first["chunk_size"] == c.chunk_size
    assert first["D"] == ((H, P) if c.D_has_hdim else (H,)) and first["initial_states"] == (B, H, P, N)
    assert first["dt_softplus"] is False and first["dt_bias"] is None and first["z"] is None
    assert first["return_final_states"] is True and first["min_dt"] >= c.dt_limit[0]
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for got, want in zip(cache_tensors(caches[0]), cache_tensors(caches[1])):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_tree_blocks_never_call_mamba_ssm(fake_mamba_ssm):
    model = route_kernels(init_random_mamba2(CFG, seed=1).eval(), plan_with("mamba_ssm"))
    cache = model.new_cache(1, 64)
    topo = TreeTopology.static([2, 2])
    tree = TreeBatch.build([topo], [list(range(1, topo.n + 1))], [[Provenance.root] + [Provenance.topk] * (topo.n - 1)],
                           topo.n)
    with torch.no_grad():
        model(torch.tensor([[3]]), torch.zeros(1, 1, dtype=torch.long), cache, Block.causal(0, 1, 1))
        fake_mamba_ssm.clear()
        block = Block.tree(torch.tensor([1]), tree, 1 + topo.n)
        model(tree.tokens, block.positions, cache, block)
    assert fake_mamba_ssm == []
