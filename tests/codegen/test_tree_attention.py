"""Tree-attention kernel vs its masked-SDPA reference, and vs plain attention along each root-to-node path.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set below, before any launch; the launcher
decorates its kernel on first use, so an earlier `import triton` elsewhere does not matter). CPU
shapes are tiny but odd: D = 24 (padded to 32), H = 6 over Hkv = 2, prefix lengths 0 and 37, a
69-node tree spanning two bitset words. `@pytest.mark.gpu` repeats the check at Llama sizes.

`tree_topologies` is reused by the other kernel tests in this folder.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from codegen.tree_attention import (TreeAttentionSpec, anc_to_bitsets, bitsets_to_mask, pack_bitsets,  # noqa: E402
                                    tree_attention, tree_attention_ref)
from spec_compiler.tree import TreeTopology
from tests.spec_compiler.test_tree import parent_lists  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# atol = rtol, per dtype: a few ulps of the output (flash-style kernels round P to the cache dtype)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def tree_topologies(max_nodes: int = 24):
    """Random topological trees: depth <= 5, branching <= 3, any sibling / id order; single nodes too."""
    return parent_lists(max_nodes=max_nodes, max_depth=5, max_branch=3).map(TreeTopology)


def make_inputs(B, H, Hkv, T, D, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as the model produces it: a [B, H, T, D] view of a [B, T, H, D] tensor
    q = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, C, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, C, D, generator=g).to(DEVICE, dtype)
    return q, k, v


def report(name, out, ref):
    diff = (out.float() - ref.float()).abs()
    print(f"{name}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}")


# ---------------------------------------------------------------------------------------------------
# bitsets
# ---------------------------------------------------------------------------------------------------
@SETTINGS
@given(tree_topologies(max_nodes=40))
def test_packed_bitsets_are_the_ancestor_mask(topo):
    assert torch.equal(bitsets_to_mask(pack_bitsets(topo.bitsets())), torch.tensor(topo.ancestor_rows))


@pytest.mark.parametrize("topo", [TreeTopology.chain(63), TreeTopology.chain(64), TreeTopology.chain(129),
                                  TreeTopology.static([4, 4, 3])], ids=["T64", "T65", "T130", "T69"])
def test_packed_bitsets_across_words(topo):
    bits = pack_bitsets(topo.bitsets())  # bit 63 of a word is its sign bit
    assert bits.shape == (topo.n, -(-topo.n // 64))
    assert torch.equal(bitsets_to_mask(bits), torch.tensor(topo.ancestor_rows))


@pytest.mark.parametrize("topo", [TreeTopology.chain(0), TreeTopology.chain(63), TreeTopology.chain(64),
                                  TreeTopology.chain(129), TreeTopology.static([4, 4, 3])],
                         ids=["T1", "T64", "T65", "T130", "T69"])
def test_anc_to_bitsets_packs_on_the_device_as_pack_bitsets_does(topo):
    """The model packs its Block's anc tensor (no host read); the words must be pack_bitsets' exactly."""
    anc = torch.tensor(topo.ancestor_rows).to(DEVICE)
    want = pack_bitsets(topo.bitsets(), device=DEVICE)
    assert torch.equal(anc_to_bitsets(anc), want)
    assert torch.equal(anc_to_bitsets(anc[None].expand(3, -1, -1)), want[None].expand(3, -1, -1))


# ---------------------------------------------------------------------------------------------------
# kernel vs reference
# ---------------------------------------------------------------------------------------------------
CASES = {
    # name: (B, H, Hkv, D, prefix_len, tree)
    "gqa3_d24_prefix37": (2, 6, 2, 24, 37, TreeTopology.static([2, 2, 2])),
    "mha_d32_prefix0_chain": (1, 4, 4, 32, 0, TreeTopology.chain(5)),
    "two_words_ragged_prefix": (2, 2, 1, 16, torch.tensor([0, 37]), TreeTopology.static([4, 4, 3])),
    "single_node": (1, 2, 1, 24, 37, TreeTopology.chain(0)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_tree_attention_matches_ref(case, dtype):
    B, H, Hkv, D, prefix_len, topo = CASES[case]
    T = topo.n
    C = 37 + T + 3
    q, k, v = make_inputs(B, H, Hkv, T, D, C, dtype)
    bits = pack_bitsets(topo.bitsets(), device=DEVICE)
    prefix = prefix_len.to(DEVICE) if isinstance(prefix_len, torch.Tensor) else prefix_len
    out = tree_attention(q, k, v, prefix, bits)
    ref = tree_attention_ref(q, k, v, prefix, bits)
    report(f"{case} {dtype}", out, ref)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_per_request_trees():
    # [B, T, W] bitsets: each request verifies its own tree shape (both 9 nodes here)
    trees = [TreeTopology.chain(8), TreeTopology.static([2, 3])]
    bits = torch.stack([pack_bitsets(t.bitsets()) for t in trees]).to(DEVICE)
    q, k, v = make_inputs(2, 6, 2, 9, 24, 50, torch.float32, seed=1)
    out = tree_attention(q, k, v, torch.tensor([37, 5], device=DEVICE), bits)
    ref = tree_attention_ref(q, k, v, torch.tensor([37, 5]), bits)
    report("per-request trees", out, ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(topo=tree_topologies(), prefix_len=st.sampled_from([0, 5, 37]), seed=st.integers(0, 2**16))
def test_random_trees_equal_attention_along_each_path(topo, prefix_len, seed):
    """Node i's output = plain softmax attention over the prefix plus the root-to-i path (TESTING.md §5)."""
    B, H, Hkv, D, T = 1, 4, 2, 24, topo.n
    q, k, v = make_inputs(B, H, Hkv, T, D, prefix_len + T, torch.float32, seed)
    bits = pack_bitsets(topo.bitsets(), device=DEVICE)
    out = tree_attention(q, k, v, prefix_len, bits)
    torch.testing.assert_close(out, tree_attention_ref(q, k, v, prefix_len, bits), atol=1e-5, rtol=1e-5)
    for i in range(T):
        slots = list(range(prefix_len)) + [prefix_len + j for j in topo.path(i)]
        for h in range(H):
            qi = q[0, h, i].double()  # [D]
            ks, vs = k[0, h // (H // Hkv), slots].double(), v[0, h // (H // Hkv), slots].double()  # [S, D]
            expect = torch.softmax(ks @ qi / D ** 0.5, dim=0) @ vs
            torch.testing.assert_close(out[0, h, i].double(), expect, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# launcher checks
# ---------------------------------------------------------------------------------------------------
def test_spec_is_checked_and_named():
    topo = TreeTopology.static([2, 2])
    q, k, v = make_inputs(1, 2, 1, topo.n, 24, 16, torch.float16)
    bits = pack_bitsets(topo.bitsets(), device=DEVICE)
    spec = TreeAttentionSpec(head_dim=24, num_tree_tokens=topo.n, dtype="float16")
    assert spec.name == "tree_attention_d24_t7_float16"
    assert spec.constexprs() == {"NUM_TREE": 7, "HEAD_DIM": 24, "BLOCK_D": 32}
    with pytest.raises(AssertionError, match="plan compiled"):
        tree_attention(q, k, v, 3, bits, spec=TreeAttentionSpec(head_dim=24, num_tree_tokens=8, dtype="float16"))
    with pytest.raises(AssertionError, match="exceeds capacity"):
        tree_attention(q, k, v, 10, bits)
    with pytest.raises(AssertionError, match="multiple of kv heads"):
        tree_attention(q[:, :1].expand(1, 3, -1, -1), k.expand(1, 2, -1, -1), v.expand(1, 2, -1, -1), 3, bits)
    with pytest.raises(AssertionError, match="ancestor_bits must be int64"):
        tree_attention(q, k, v, 3, bits[:-1])


# ---------------------------------------------------------------------------------------------------
# GPU, Llama-sized
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("topo", [TreeTopology.static([4, 3, 2, 2]), TreeTopology.static([2] * 6),
                                  TreeTopology.chain(127)], ids=["T63", "T127", "T128"])
def test_tree_attention_gpu(topo, dtype):
    B, H, Hkv, D, C = 4, 32, 8, 128, 4096
    q, k, v = make_inputs(B, H, Hkv, topo.n, D, C, dtype)
    bits = pack_bitsets(topo.bitsets(), device=DEVICE)
    prefix = torch.tensor([1000, 0, 517, 2048], device=DEVICE)
    out = tree_attention(q, k, v, prefix, bits)
    ref = tree_attention_ref(q, k, v, prefix, bits)
    report(f"gpu T={topo.n} {dtype}", out, ref)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
