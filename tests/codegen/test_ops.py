"""The custom ops of codegen/ops.py: references, Triton implementations, export as one node, opcheck.

Per op: the dispatched CPU op equals its reference (bitwise: the same code); its CUDA implementation (the
Triton launcher) run on CPU tensors under TRITON_INTERPRET=1 equals the CPU op; `torch.export` keeps it as
exactly one call_function node and the exported program computes what eager does (outputs and mutated
caches); `torch.library.opcheck` passes. A tiny random Llama exported through a tensors-only verify
wrapper has one `spec.cached_attention` node per layer and no aten SDPA, and equals eager bitwise.
`@pytest.mark.gpu` runs each op's CUDA implementation against the CPU reference on the device.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from codegen import ops  # noqa: E402
from codegen.fused_accept import fused_accept_ref, gumbel_noise  # noqa: E402
from codegen.kv_compact import kv_compact_ref  # noqa: E402
from codegen.ssm_tree_scan import ssm_tree_scan_ref, triton  # noqa: E402
from codegen.tree_attention import pack_bitsets, tree_attention_ref  # noqa: E402
from runtime import batch as fwd  # noqa: E402
from runtime.models.llama import KVCache, LlamaConfig, additive_mask, cached_attention, init_random  # noqa: E402
from spec_compiler.tree import TreeTopology  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def tensors(x):
    return [t for t in (x if isinstance(x, (tuple, list)) else (x,)) if isinstance(t, torch.Tensor)]


def assert_same(a, b):
    for x, y in zip(tensors(a), tensors(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y), (x, y)


def ancestors(parents: list[int]) -> torch.Tensor:
    anc = torch.eye(len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    return anc


# ---------------------------------------------------------------------------------------------------
# inputs per op: (args, the names of the mutated args' positions); small, odd shapes
# ---------------------------------------------------------------------------------------------------
def tree_block(g) -> fwd.Block:
    """A ragged 3-token block: row 0 writes slots 5..7, row 1 slots 2..4, over a 10-slot window."""
    slots = torch.tensor([[5, 6, 7], [2, 3, 4]])
    mask = torch.rand(2, 3, 10, generator=g) < 0.6
    mask[torch.arange(2)[:, None], torch.arange(3)[None], slots] = True  # a token always sees itself
    return fwd.Block(slots, slots, slots - 1, mask, torch.tensor([5, 2]))


def cached_attention_args(seed=0, mask=True):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, T, D, C = 2, 4, 2, 3, 8, 16
    q = randn(g, B, T, H, D).transpose(1, 2)  # [B, H, T, D] as the model makes it: a view
    k, v = randn(g, B, Hkv, T, D), randn(g, B, Hkv, T, D)
    block = tree_block(g)
    add = additive_mask(block.mask, q.dtype) if mask else None
    return (q, k, v, randn(g, B, Hkv, C, D), randn(g, B, Hkv, C, D), block.slots, add, block.S, None), block


def tree_attention_args(seed=0, shared_tree=False):
    g = torch.Generator().manual_seed(seed)
    topos = [TreeTopology.chain(6), TreeTopology.static([2, 2])]  # 7 nodes each
    B, H, Hkv, T, D, C = 2, 6, 2, 7, 16, 19
    q = randn(g, B, T, H, D).transpose(1, 2)
    bits = pack_bitsets(topos[1].bitsets()) if shared_tree else torch.stack([pack_bitsets(t.bitsets()) for t in topos])
    return (q, randn(g, B, Hkv, T, D), randn(g, B, Hkv, T, D), randn(g, B, Hkv, C, D), randn(g, B, Hkv, C, D),
            torch.tensor([9, 3]), bits, 0.3)


def ssm_tree_scan_args(seed=0, return_states=True, init=True):
    g = torch.Generator().manual_seed(seed)
    b, T, H, P, G, N = 2, 5, 4, 8, 2, 16
    anc = torch.stack([ancestors([-1, 0, 0, 1, 2]), ancestors([-1, 0, 1, 2, 3])])  # [b, T, T]
    dt = F.softplus(randn(g, b, T, H))
    A = -torch.rand(H, generator=g) - 0.5
    init_state = randn(g, b, H, P, N) if init else None
    return (randn(g, b, T, H, P), dt, A, randn(g, b, T, G, N), randn(g, b, T, G, N), anc, randn(g, H),
            init_state, return_states)


def kv_compact_args(seed=0):
    g = torch.Generator().manual_seed(seed)
    L, B, Hkv, C, D = 2, 2, 2, 12, 8
    # row 0 keeps slots 3, 5, 6 at 3..5; row 1 keeps 1, 2 at 0..1 (a destination is an earlier source)
    return (randn(g, L, B, Hkv, C, D), randn(g, L, B, Hkv, C, D), torch.tensor([[3, 5, 6], [1, 2, 4]]),
            torch.tensor([3, 2]), torch.tensor([3, 0]))


def fused_accept_args(seed=0, sampled=False):
    g = torch.Generator().manual_seed(seed)
    B, N, V, depth = 2, 5, 11, 3
    parents = torch.tensor([[-1, 0, 0, 1, 3], [-1, 0, 1, 1, -1]])
    tokens = torch.randint(0, 3, (B, N), generator=g)
    scores = randn(g, B, N, V)
    for b in range(B):  # boost one child's token at most nodes, so walks go deep
        for c in range(1, N):
            if parents[b, c] >= 0 and c % 2:
                scores[b, parents[b, c], tokens[b, c]] += 6.0
    gumbel = gumbel_noise(B, depth, V, generator=g) if sampled else None
    return scores, parents, tokens, depth, gumbel


CASES = {
    # name: (op, args, indices of mutated args)
    "cached_attention": (torch.ops.spec.cached_attention, cached_attention_args()[0], (3, 4)),
    "cached_attention_nomask": (torch.ops.spec.cached_attention, cached_attention_args(1, mask=False)[0], (3, 4)),
    "tree_attention": (torch.ops.spec.tree_attention, tree_attention_args(), (3, 4)),
    "tree_attention_shared": (torch.ops.spec.tree_attention, tree_attention_args(1, shared_tree=True), (3, 4)),
    "ssm_tree_scan": (torch.ops.spec.ssm_tree_scan, ssm_tree_scan_args(), ()),
    "ssm_tree_scan_y_only": (torch.ops.spec.ssm_tree_scan, ssm_tree_scan_args(1, return_states=False, init=False), ()),
    "kv_compact": (torch.ops.spec.kv_compact, kv_compact_args(), (0, 1)),
    "fused_accept": (torch.ops.spec.fused_accept, fused_accept_args(), ()),
    "fused_accept_sampled": (torch.ops.spec.fused_accept, fused_accept_args(1, sampled=True), ()),
}
TRITON_IMPLS = {"tree_attention": ops.tree_attention_triton, "ssm_tree_scan": ops.ssm_tree_scan_triton,
                "kv_compact": ops.kv_compact_triton, "fused_accept": ops.fused_accept_triton}


def run(op, args, mutated):
    """(outputs, mutated args) of op on fresh copies of args."""
    args = clone(args)
    out = op(*args)
    return out, [args[i] for i in mutated]


# ---------------------------------------------------------------------------------------------------
# CPU op == reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [True, False], ids=["masked", "nomask"])
def test_cached_attention_is_eager_bitwise(mask):
    """The op is llama.cached_attention's eager arithmetic: same output, same caches, bit for bit."""
    args, block = cached_attention_args(mask=mask)
    y, (kc, vc) = run(torch.ops.spec.cached_attention, args, (3, 4))
    q, k, v, kc0, vc0, _, add, _, _ = clone(args)
    expect = cached_attention(q, k, v, kc0, vc0, block, add)  # [B, T, H*D]
    B, H, T, D = q.shape
    assert torch.equal(y.transpose(1, 2).reshape(B, T, H * D), expect)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


def test_cached_attention_slice_block_is_eager_bitwise():
    """A prefill block (`block.start` set: eager writes a slice, the op scatters) and one AR token (mask None)."""
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, D, C = 2, 4, 2, 8, 16
    for block in (fwd.Block.causal(4, 5, B, kv_len=12), fwd.Block.causal(6, 1, B)):
        T = block.T
        q, k, v = randn(g, B, T, H, D).transpose(1, 2), randn(g, B, Hkv, T, D), randn(g, B, Hkv, T, D)
        kc, vc = randn(g, B, Hkv, C, D), randn(g, B, Hkv, C, D)
        add = None if block.mask_full else additive_mask(block.mask, q.dtype)
        kc0, vc0 = kc.clone(), vc.clone()
        expect = cached_attention(q, k, v, kc0, vc0, block, add, 0.25)
        y = torch.ops.spec.cached_attention(q, k, v, kc, vc, block.slots, add, block.S, 0.25)
        assert torch.equal(y.transpose(1, 2).reshape(B, T, H * D), expect)
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@pytest.mark.parametrize("shared", [False, True], ids=["per_row_trees", "shared_tree"])
def test_tree_attention_is_reference(shared):
    args = tree_attention_args(shared_tree=shared)
    out, (kc, vc) = run(torch.ops.spec.tree_attention, args, (3, 4))
    q, k, v, kc0, vc0, prefix, bits, scale = clone(args)
    for b in range(2):  # node i of row b sits at slot prefix[b] + i; every other slot is untouched
        kc0[b, :, prefix[b]:prefix[b] + 7], vc0[b, :, prefix[b]:prefix[b] + 7] = k[b], v[b]
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
    assert out.stride() == q.stride()
    assert torch.equal(out, tree_attention_ref(q, kc0, vc0, prefix, bits, scale))
    for b in range(2):  # a row alone (its own window, no masked slots past its tree) agrees
        alone = tree_attention_ref(q[b:b + 1], kc0[b:b + 1], vc0[b:b + 1], prefix[b:b + 1],
                                   bits if shared else bits[b:b + 1], scale)
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-6, rtol=1e-6)


def test_ssm_tree_scan_is_reference():
    for args in (CASES["ssm_tree_scan"][1], CASES["ssm_tree_scan_y_only"][1]):
        (y, states), _ = run(torch.ops.spec.ssm_tree_scan, args, ())
        x, dt, A, B, C, anc, D, init, ret = args
        ry, rs = ssm_tree_scan_ref(x, dt, A, B, C, anc, D=D, init_states=None if init is None else init[:, None],
                                   return_states=ret)
        assert torch.equal(y, ry) and y.stride() == ry.stride()
        assert torch.equal(states, rs) if ret else states.numel() == 0


def test_kv_compact_is_reference():
    _, (kc, vc) = run(torch.ops.spec.kv_compact, CASES["kv_compact"][1], (0, 1))
    kc0, vc0, src, num, dst = clone(CASES["kv_compact"][1])
    kv_compact_ref(kc0, vc0, src, num, dst)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
    assert torch.equal(kc[:, 1, :, :2], CASES["kv_compact"][1][0][:, 1, :, 1:3])  # row 1: slots 1, 2 -> 0, 1
    # one layer [B, Hkv, C, D] as in the model
    k1, v1 = kc0[0].clone(), vc0[0].clone()
    torch.ops.spec.kv_compact(k1, v1, src, num, dst)
    k2, v2 = kc0.clone(), vc0.clone()
    kv_compact_ref(k2, v2, src, num, dst)
    assert torch.equal(k1, k2[0]) and torch.equal(v1, v2[0])


@pytest.mark.parametrize("name", ["fused_accept", "fused_accept_sampled"])
def test_fused_accept_is_reference(name):
    out, _ = run(torch.ops.spec.fused_accept, CASES[name][1], ())
    assert torch.equal(out, fused_accept_ref(*CASES[name][1]).packed)
    assert int(out[:, -2].max()) >= 3  # some walk accepted two draft tokens: the walk is exercised


# ---------------------------------------------------------------------------------------------------
# Triton implementations under TRITON_INTERPRET=1 == the CPU op
# ---------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("cached")])
def test_triton_impl_matches_cpu_op(name):
    op, args, mutated = CASES[name]
    impl = next(fn for prefix, fn in TRITON_IMPLS.items() if name.startswith(prefix))
    out, muts = run(impl, args, mutated)
    ref, ref_muts = run(op, args, mutated)
    for a, b in zip(tensors(out) + muts, tensors(ref) + ref_muts, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if name.startswith(("tree_attention", "ssm")):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# export: one opaque node; the exported program computes what eager does
# ---------------------------------------------------------------------------------------------------
class Call(nn.Module):
    """Calls one op on its tensor inputs; the non-tensor arguments are constants of the graph."""

    def __init__(self, op, args):
        super().__init__()
        self.op, self.args = op, args

    def forward(self, *tensor_args):
        it = iter(tensor_args)
        return self.op(*[next(it) if isinstance(a, torch.Tensor) else a for a in self.args])


def op_nodes(gm: torch.fx.GraphModule, op) -> list:
    """Nodes calling `op`, directly or through export's functionalization wrapper."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and (n.target is op.default or (n.args and n.args[0] is op.default))]


@pytest.mark.parametrize("name", list(CASES))
def test_export_keeps_one_node(name):
    op, args, mutated = CASES[name]
    inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
    want, want_muts = run(op, args, mutated)
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    ep = torch.export.export(Call(op, args), clone(inputs))
    # the training IR and the functional ATen IR AOTInductor compiles (a mutating op under auto_functionalized)
    for ep in (ep, ep.run_decompositions()):
        assert len(op_nodes(ep.graph_module, op)) == 1, ep.graph
        assert not [n for n in ep.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
        got_inputs = clone(inputs)
        got = ep.module()(*got_inputs)
        assert_same(got, want)
        assert_same([got_inputs[tensor_pos.index(i)] for i in mutated], want_muts)


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name):
    op, args, _ = CASES[name]
    torch.library.opcheck(op.default, clone(args))


def test_import_without_triton():
    """codegen.ops registers every op with triton unimportable (and no CUDA here); the CPU ops run."""
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch, codegen.ops\n"
            "from codegen import tree_attention as ta; assert ta.triton is None\n"
            "p = torch.ops.spec.fused_accept(torch.zeros(1, 2, 3), torch.tensor([[-1, 0]]), torch.tensor([[0, 0]]), 1)\n"
            "assert p.tolist() == [[0, 1, 2, 0]], p\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)


# ---------------------------------------------------------------------------------------------------
# a tiny Llama verify forward exports with attention as the op
# ---------------------------------------------------------------------------------------------------
class Verify(nn.Module):
    """A tensors-only tree verify forward: what the compile step exports per (B, T) bucket."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, k_cache, v_cache, slots, mask, lengths):
        # input_ids, position_ids, slots: [B, T]; k_cache, v_cache: [L, B, Hkv, C, D]; mask: [B, T, S] bool
        block = fwd.Block(slots, position_ids, slots - 1, mask, lengths)
        return self.model(input_ids, position_ids, KVCache._view(k_cache, v_cache), block)


def test_llama_export_has_one_cached_attention_per_layer():
    config = LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64)
    model = init_random(config, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    block = tree_block(g)
    B, T = block.slots.shape
    cache = model.new_cache(B, 16)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    ids = torch.randint(0, 97, (B, T), generator=g)
    inputs = (ids, block.positions, cache.k, cache.v, block.slots, block.mask, block.lengths)
    with torch.no_grad():
        ep = torch.export.export(Verify(model), clone(inputs))
        nodes = op_nodes(ep.graph_module, torch.ops.spec.cached_attention)
        assert len(nodes) == config.num_layers, ep.graph
        assert not [n for n in ep.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
        got_inputs = clone(inputs)
        got = ep.module()(*got_inputs)
        want_cache = KVCache._view(cache.k.clone(), cache.v.clone())
        want = model(ids, block.positions, want_cache, block)  # eager: the plain code path
    assert torch.equal(got, want)
    assert torch.equal(got_inputs[2], want_cache.k) and torch.equal(got_inputs[3], want_cache.v)


# ---------------------------------------------------------------------------------------------------
# GPU: each op's CUDA implementation vs the CPU reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_impl_matches_reference(name):
    op, args, mutated = CASES[name]
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    out, muts = run(op, cuda_args, mutated)
    ref, ref_muts = run(op, args, mutated)
    for a, b in zip(tensors(out) + muts, tensors(ref) + ref_muts, strict=True):
        assert a.is_cuda and a.shape == b.shape
        if name.startswith(("cached", "tree_attention", "ssm")):
            torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)
        else:
            assert torch.equal(a.cpu(), b)
