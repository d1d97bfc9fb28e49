"""On CUDA: the decode-path Triton kernels equal their references when captured in a CUDA graph and replayed
on new inputs (their docstrings promise graph capture: run-time values are device tensors, never read on the
host), and mamba-ssm's `mamba_chunk_scan_combined` equals our torch `ssd_chunked_scan` where it imports.

tests/codegen/ checks each kernel eagerly (on CUDA when there is one); this file checks the replay: inputs are
copied into the captured buffers, the graph replays, the output is compared with the reference on those
inputs. Fresh random inputs for every replay; bf16 tolerances as in tests/codegen.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from runtime.cuda_graphs import CudaGraphs
from spec_compiler.tree import TreeTopology

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEV = "cuda"


def rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def replay_with(graph, buffers, values):
    for buf, x in zip(buffers, values):
        buf.copy_(x)
    graph.replay()
    torch.cuda.synchronize()


def test_tree_attention_replays():
    from codegen.tree_attention import pack_bitsets, tree_attention, tree_attention_ref
    B, H, Hkv, D, C = 2, 32, 8, 64, 1024
    topo = TreeTopology.static([4, 2, 2])
    T = topo.n
    g = torch.Generator().manual_seed(0)
    k, v = rand(g, B, Hkv, C, D, dtype=torch.bfloat16), rand(g, B, Hkv, C, D, dtype=torch.bfloat16)
    bits = pack_bitsets(topo.bitsets(), device=DEV)
    q = rand(g, B, T, H, D, dtype=torch.bfloat16).transpose(1, 2)  # [B, H, T, D] view, as the model makes it
    prefix = torch.tensor([100, 7], device=DEV)
    graph, out = CudaGraphs(warmup=1).capture(lambda: tree_attention(q, k, v, prefix, bits))
    for trial in range(3):
        q_new = rand(g, B, T, H, D, dtype=torch.bfloat16).transpose(1, 2)
        p_new = torch.randint(0, C - T, (B,), generator=g).to(DEV)
        replay_with(graph, [q, prefix], [q_new, p_new])
        torch.testing.assert_close(out, tree_attention_ref(q_new, k, v, p_new, bits), atol=2e-2, rtol=2e-2)


def test_kv_compact_replays():
    from codegen.kv_compact import kv_compact, kv_compact_ref
    L, B, Hkv, C, D, M = 4, 3, 8, 512, 64, 5
    g = torch.Generator().manual_seed(1)
    k, v = rand(g, L, B, Hkv, C, D, dtype=torch.bfloat16), rand(g, L, B, Hkv, C, D, dtype=torch.bfloat16)
    src = torch.zeros(B, M, dtype=torch.long, device=DEV)
    num = torch.zeros(B, dtype=torch.int32, device=DEV)
    dst = torch.zeros(B, dtype=torch.int32, device=DEV)
    graph, _ = CudaGraphs(warmup=1).capture(lambda: kv_compact(k, v, src, num, dst))  # num = 0: moves nothing
    for trial in range(3):
        k0, v0 = rand(g, L, B, Hkv, C, D, dtype=torch.bfloat16), rand(g, L, B, Hkv, C, D, dtype=torch.bfloat16)
        d = torch.randint(0, C - 64, (B,), generator=g)
        s = torch.stack([d[b] + torch.sort(torch.randperm(60, generator=g)[:M]).values for b in range(B)])
        n = torch.randint(1, M + 1, (B,), generator=g)
        k_ref, v_ref = k0.clone(), v0.clone()
        kv_compact_ref(k_ref, v_ref, s.to(DEV), n.to(DEV), d.to(DEV))
        replay_with(graph, [k, v, src, num, dst], [k0, v0, s, n, d])
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_ssm_tree_scan_replays():
    from codegen.ssm_tree_scan import ssm_tree_scan, ssm_tree_scan_ref
    b, H, P, G, N = 2, 16, 64, 1, 128
    parents = [-1, 0, 0, 0, 1, 1, 2, 4, 5, 6, 7, 8, 9]
    T = len(parents)
    anc = torch.eye(T, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    anc = anc.to(DEV)
    g = torch.Generator().manual_seed(2)

    def draw():
        return dict(x=rand(g, b, T, H, P), dt=torch.nn.functional.softplus(rand(g, b, T, H) - 1),
                    A=-torch.exp(rand(g, H)), B=rand(g, b, T, G, N), C=rand(g, b, T, G, N), D=rand(g, H),
                    init=rand(g, b, H, P, N))

    kw = draw()
    names = list(kw)
    graph, (y, states) = CudaGraphs(warmup=1).capture(
        lambda: ssm_tree_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], anc, D=kw["D"], init_state=kw["init"],
                              return_states=True))
    for trial in range(2):
        new = draw()
        replay_with(graph, [kw[n] for n in names], [new[n] for n in names])
        y_ref, st_ref = ssm_tree_scan_ref(new["x"], new["dt"], new["A"], new["B"], new["C"], anc, D=new["D"],
                                          init_states=new["init"][:, None], return_states=True)
        torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(states, st_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sample_match"])
def test_fused_accept_replays(sampled):
    from codegen.fused_accept import fused_accept, fused_accept_ref, gumbel_noise
    topo = TreeTopology.static([3, 2, 2])
    Bn, N, V, depth = 4, topo.n, 32000, topo.max_depth
    parents = torch.tensor(topo.parents).expand(Bn, N).contiguous().to(DEV)
    g = torch.Generator().manual_seed(3)

    def draw():
        scores = rand(g, Bn, N, V)
        tokens = torch.randint(0, V, (Bn, N), generator=g)
        for c in range(1, N):  # the first child of every node carries its parent's argmax: walks go deep
            p = topo.parents[c]
            if topo.children[p][0] == c:
                tokens[:, c] = scores[:, p].argmax(-1).cpu()
        noise = gumbel_noise(Bn, depth, V, g, device=DEV) * 0.01 if sampled else None
        return scores, tokens.to(DEV), noise

    scores, tokens, noise = draw()
    graph, res = CudaGraphs(warmup=1).capture(lambda: fused_accept(scores, parents, tokens, depth, noise))
    for trial in range(3):
        s, t, n = draw()
        replay_with(graph, [scores, tokens] + ([noise] if sampled else []), [s, t] + ([n] if sampled else []))
        ref = fused_accept_ref(s, parents, t, depth, n)
        assert torch.equal(res.packed, ref.packed), (res.packed, ref.packed)
    assert int(res.path_len.max()) > 1


# ---------------------------------------------------------------------------------------------------
# mamba-ssm
# ---------------------------------------------------------------------------------------------------
def mamba_chunk_scan():
    """mamba-ssm's `mamba_chunk_scan_combined`, or skip. `import mamba_ssm` imports its CUDA extension and every
    model (mamba3's optional kernels, transformers' generation utilities) first; where that fails, the Triton
    submodule is imported under a bare package so that nothing else of mamba-ssm loads."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed")
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001  (any import-time failure of the package's __init__)
        first = e
    spec = importlib.util.find_spec("mamba_ssm")
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["mamba_ssm"] = pkg
    try:
        return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"mamba_ssm does not import ({first!r}; its Triton scan alone: {e!r})")


@pytest.mark.parametrize("T,init", [(256, False), (300, True)], ids=["T256", "T300-init"])
def test_mamba_chunk_scan_equals_ssd_chunked_scan(T, init):
    from runtime.models.mamba2 import ssd_chunked_scan
    scan = mamba_chunk_scan()
    b, H, P, G, N, chunk = 2, 8, 64, 1, 128, 64
    g = torch.Generator().manual_seed(4)
    x, B, C = rand(g, b, T, H, P), rand(g, b, T, G, N), rand(g, b, T, G, N)
    dt = torch.nn.functional.softplus(rand(g, b, T, H) - 1)
    A, D = -torch.exp(rand(g, H)), rand(g, H)
    S0 = rand(g, b, H, P, N) if init else None
    y, final = scan(x, dt, A, B, C, chunk, D=D, initial_states=S0, return_final_states=True)
    with torch.no_grad():
        y_ref, final_ref = ssd_chunked_scan(x.double(), dt.double(), A.double(), B.double(), C.double(), chunk,
                                            D=D.double(), init_state=None if S0 is None else S0.double())
    err_y = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    err_s = ((final.double() - final_ref).norm() / final_ref.norm()).item()
    print(f"T={T}: rel err y {err_y:.2e}, final state {err_s:.2e}")
    assert err_y < 5e-3 and err_s < 5e-3, (err_y, err_s)  # mamba-ssm's dots run in tf32 (METHOD.md: ~3e-4)
