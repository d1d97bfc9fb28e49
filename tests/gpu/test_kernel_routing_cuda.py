"""On CUDA: the plan's kernel routes give the torch paths' results inside the models.

backend.attention=triton: a Llama whose at-prefix forwards run the Triton tree-attention kernel decodes the same
greedy tokens as SDPA and its verify forward's logits agree (fp32 and bf16 tolerances). backend.ssm_prefill=
mamba_ssm: a Mamba2 prefill through mamba-ssm's chunk scan equals our torch scan (skipped where it does not
import). Routing is set as runtime.load.route_kernels sets it from a plan.
"""
from __future__ import annotations

import types

import pytest
import torch

from runtime.batch import Block, TreeBatch
from runtime.load import route_kernels
from runtime.models.llama import LlamaConfig, init_random
from runtime.models.mamba2 import Mamba2Config, init_random_mamba2, mamba_chunk_scan
from runtime.phases import cache_tensors
from spec_compiler.tree import Provenance, TreeTopology

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = "cuda"
LLAMA = LlamaConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=512)
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def plan(attention="sdpa", ssm_prefill="torch", buckets=(1, 2, 4, 8, 16)):
    return types.SimpleNamespace(attention=attention, ssm_prefill=ssm_prefill, tree_buckets=buckets)


def greedy(model, prompt, steps=8):
    cache, out, ids, L = model.new_cache(1, 128), [], prompt, 0
    with torch.no_grad():
        for _ in range(steps):
            T = ids.shape[1]
            logits = model(ids, torch.arange(L, L + T, device=DEV)[None], cache, Block.causal(L, T, 1, device=DEV))
            L += T
            ids = logits[:, -1:].argmax(-1)
            out.append(int(ids))
    return out, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_triton_attention_equals_sdpa(dtype):
    base = init_random(LLAMA, seed=0).to(DEV, dtype).eval()
    triton_model = route_kernels(init_random(LLAMA, seed=0).to(DEV, dtype).eval(),
                                 plan("triton", buckets=(1, 2, 4, 8, 16, 11)))
    route_kernels(base, plan("sdpa"))
    prompt = torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    (a, cache_a), (b, cache_b) = greedy(triton_model, prompt), greedy(base, prompt)
    if dtype == torch.float32:
        assert a == b
    else:  # bf16 rounds differently in the two kernels: the first tokens must agree
        assert a[:3] == b[:3]
    # the verify forward of a 16-node tree over the same prefix, ragged across 3 rows
    topos = [TreeTopology.static([3, 2, 1]), TreeTopology.chain(7), TreeTopology.static([2, 2])]
    g = torch.Generator().manual_seed(2)
    tree = TreeBatch.build(topos, [torch.randint(0, 512, (t.n,), generator=g).tolist() for t in topos],
                           [[Provenance.root] + [Provenance.topk] * (t.n - 1) for t in topos], 16)
    lengths = torch.tensor([5, 30, 17])
    logits = []
    for model in (triton_model, base):
        cache = model.new_cache(3, 128)
        with torch.no_grad():
            for r, L in enumerate(lengths.tolist()):
                ids = torch.randint(0, 512, (1, L), generator=torch.Generator().manual_seed(3 + r)).to(DEV)
                model(ids, torch.arange(L, device=DEV)[None], cache.view_rows(r, r + 1), Block.causal(0, L, device=DEV))
            block = Block.tree(lengths, tree, 128, device=DEV)
            assert block.at_prefix
            logits.append(model(tree.tokens.to(DEV), block.positions, cache, block))
    diff = (logits[0] - logits[1]).abs()
    print(f"{dtype}: verify logits max diff {diff.max():.3e} mean {diff.mean():.3e}")
    torch.testing.assert_close(logits[0], logits[1], atol=TOL[dtype], rtol=TOL[dtype])


def test_mamba2_prefill_via_mamba_ssm_equals_torch():
    if mamba_chunk_scan() is None:
        pytest.skip("mamba_ssm does not import here")
    cfg = Mamba2Config(vocab_size=512, d_model=256, n_layer=2, d_state=64, headdim=64, ngroups=1, chunk_size=64)
    fast = route_kernels(init_random_mamba2(cfg, seed=0).to(DEV).eval(), plan(ssm_prefill="mamba_ssm"))
    ref = route_kernels(init_random_mamba2(cfg, seed=0).to(DEV).eval(), plan(ssm_prefill="torch"))
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(0)).to(DEV)
    outs, caches = [], []
    for model in (fast, ref):
        cache = model.new_cache(2, 256)
        with torch.no_grad():  # two chunks: the second continues from the first's committed state
            a = model(ids[:, :100], torch.arange(100, device=DEV).expand(2, 100), cache,
                      Block.causal(0, 100, 2, device=DEV))
            b = model(ids[:, 100:], torch.arange(100, 150, device=DEV).expand(2, 50), cache,
                      Block.causal(100, 50, 2, device=DEV))
        outs.append((a, b))
        caches.append(cache)
    for got, want in zip(*outs):
        diff = (got - want).abs()
        print(f"mamba_ssm prefill logits max diff {diff.max():.3e} mean {diff.mean():.3e}")
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    for got, want in zip(cache_tensors(caches[0]), cache_tensors(caches[1])):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
