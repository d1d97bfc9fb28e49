"""KV-compaction kernel vs its index-copy reference: the mutated caches must be bit-identical.

Covers overlapping moves (a destination that is an earlier source), rows already in place, zero
rows, per-request and shared slot lists, one-layer caches, every cache dtype, accepted paths of
random trees, and the end-to-end property of TESTING.md §5: after a tree verify forward and
compaction, the cache equals a fresh prefill of prefix + accepted path.
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

from codegen.kv_compact import KVCompactSpec, kv_compact, kv_compact_ref  # noqa: E402
from runtime.models.llama import KVCache, LlamaConfig, init_random  # noqa: E402
from runtime.batch import Block, TreeBatch  # noqa: E402
from spec_compiler.tree import Provenance, TreeTopology  # noqa: E402
from tests.codegen.test_tree_attention import tree_topologies  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def random_caches(L, B, Hkv, C, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, B, Hkv, C, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(L, B, Hkv, C, D, generator=g).to(DEVICE, dtype)
    return k, v


def check(k, v, *args):
    """Run kernel and reference on copies; both caches must match bit for bit."""
    k_in = k.cpu()
    k_ref, v_ref = k.cpu().clone(), v.cpu().clone()
    kv_compact_ref(k_ref, v_ref, *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    kv_compact(k, v, *[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    print(f"compaction changed {(k_ref != k_in).sum().item()} of {k_in.numel()} key elements")
    assert torch.equal(k.cpu(), k_ref) and torch.equal(v.cpu(), v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_overlapping_ragged_batch(dtype):
    L, B, Hkv, C, D = 2, 4, 2, 16, 24
    k, v = random_caches(L, B, Hkv, C, D, dtype)
    before = k.clone()
    src = torch.tensor([[5, 6, 9, 12],   # first row already in place, then a gap
                        [1, 2, 3, 0],    # dst 0: every destination is the previous row's source
                        [4, 8, 0, 0],    # num 0: nothing moves
                        [3, 7, 8, 15]])  # the last cache slot moves
    num = torch.tensor([4, 3, 0, 4])
    dst = torch.tensor([5, 0, 2, 3])
    check(k, v, src, num, dst)
    assert torch.equal(k[:, 1, :, :3], before[:, 1, :, 1:4])
    assert torch.equal(k[:, 2], before[:, 2])


def test_shared_slots_and_single_layer():
    k, v = random_caches(1, 3, 2, 12, 16, torch.float32, seed=1)
    check(k, v, torch.tensor([4, 6, 7]), 3, 4)  # one slot list, ints for count and start
    k4, v4 = k[0].clone(), v[0].clone()  # [B, Hkv, C, D]: one layer's view
    kv_compact(k4, v4, torch.tensor([2, 5], device=DEVICE), torch.tensor(2, device=DEVICE), 1)
    expect = k[0].clone()
    expect[:, :, 1:3] = k[0][:, :, [2, 5]]
    assert torch.equal(k4, expect)


@SETTINGS
@given(topos=st.lists(tree_topologies(), min_size=1, max_size=3), prefix_len=st.sampled_from([0, 1, 37]),
       data=st.data())
def test_accepted_paths_of_random_trees(topos, prefix_len, data):
    """src = prefix_len + (accepted root-to-node path), dst = prefix_len, per request; also == KVCache.commit."""
    B, N = len(topos), max(t.n for t in topos)
    M = max(t.max_depth for t in topos) + 1
    src = torch.zeros(B, M, dtype=torch.int64)
    num = torch.zeros(B, dtype=torch.int32)
    for b, topo in enumerate(topos):
        path = topo.path(data.draw(st.integers(0, topo.n - 1)))
        src[b, :len(path)] = prefix_len + torch.tensor(path)
        num[b] = len(path)
    k, v = random_caches(2, B, 2, prefix_len + N + 2, 24, torch.bfloat16, seed=prefix_len)
    cache = KVCache(2, B, 2, prefix_len + N + 2, 24, dtype=torch.bfloat16)
    cache.k.copy_(k.cpu())
    cache.v.copy_(v.cpu())
    check(k, v, src, num, prefix_len)
    # the engine's torch implementation, every row at once: KVCache.commit of each row's path (node offsets)
    cache.commit([prefix_len] * B, [(src[b, :num[b]] - prefix_len).tolist() for b in range(B)])
    assert torch.equal(cache.k, k.cpu()) and torch.equal(cache.v, v.cpu())


def test_compaction_equals_prefill_of_the_path():
    """Verify a tree, accept a path, compact: the cache equals prefilling prefix + path (fp32, CPU model)."""
    cfg = LlamaConfig(vocab_size=53, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=64)
    model = init_random(cfg, seed=0).eval()
    topo = TreeTopology.static([3, 2, 2])
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 53, (1, 9), generator=g)
    nodes = torch.randint(0, 53, (1, topo.n), generator=g)  # node 0 is the last committed token
    P, C = prefix.shape[1], prefix.shape[1] + topo.n

    with torch.no_grad():
        cache = model.new_cache(1, C)
        model(prefix, torch.arange(P)[None], cache, 0)
        tree = TreeBatch.build([topo], nodes.tolist(), [[Provenance.root] + [Provenance.topk] * (topo.n - 1)], topo.n)
        block = Block.tree(torch.tensor([P]), tree, C)
        model(nodes, block.positions, cache, block)
        path = topo.path(topo.leaves[-1])
        k, v = cache.k.clone().to(DEVICE), cache.v.clone().to(DEVICE)
        kv_compact(k, v, torch.tensor(path, device=DEVICE) + P, len(path), P)

        fresh = model.new_cache(1, C)
        ids = torch.cat([prefix, nodes[:, list(path)]], dim=1)
        model(ids, torch.arange(ids.shape[1])[None], fresh, 0)
    S = P + len(path)
    assert not torch.allclose(cache.k[:, :, :, :S], fresh.k[:, :, :, :S])  # before compaction it differs
    torch.testing.assert_close(k[:, :, :, :S].cpu(), fresh.k[:, :, :, :S], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[:, :, :, :S].cpu(), fresh.v[:, :, :, :S], atol=1e-5, rtol=1e-5)


def test_spec_table_and_checks():
    spec = KVCompactSpec(head_dim=128, max_slots=6, dtype="bfloat16")
    assert (spec.block_m, spec.block_d, spec.num_warps, spec.name) == (8, 128, 2, "kv_compact_d128_m8_bfloat16")
    assert KVCompactSpec(head_dim=256, max_slots=32, dtype="float16").num_warps == 8
    k, v = random_caches(1, 1, 1, 8, 24, torch.float32)
    with pytest.raises(AssertionError, match="do not fit"):
        kv_compact(k, v, torch.tensor([1, 2], device=DEVICE), 2, 0, spec=spec)
    with pytest.raises(AssertionError, match="num_slots 3"):
        kv_compact(k, v, torch.tensor([1, 2], device=DEVICE), 3, 0)
    with pytest.raises(AssertionError, match="equal strides"):
        kv_compact(k, v.transpose(3, 4).contiguous().transpose(3, 4), torch.tensor([1], device=DEVICE), 1, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kv_compact_gpu(dtype):
    L, B, Hkv, C, D, M = 4, 8, 8, 2048, 128, 6
    k, v = random_caches(L, B, Hkv, C, D, dtype)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, C - 64, (B,), generator=g)
    num = torch.randint(0, M + 1, (B,), generator=g)
    src = torch.stack([prefix[b] + torch.sort(torch.randperm(63, generator=g)[:M]).values for b in range(B)])
    check(k, v, src, num, prefix)
