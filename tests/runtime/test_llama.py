"""LlamaModel invariants: tree-masked verify == per-path causal forward, incremental == full, compaction."""
import json

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from runtime.batch import Block, window_mask
from runtime.models.llama import LlamaConfig, init_random, perturbed_copy

CFG = LlamaConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                  rope_theta=500000.0, max_position_embeddings=64,
                  rope_scaling=(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                                ("high_freq_factor", 4.0), ("original_max_position_embeddings", 16)))
MODEL = init_random(CFG, seed=0).eval()


def causal_logits(model, ids):
    # ids: [B, T] -> [B, T, V]
    B, T = ids.shape
    return model(ids, torch.arange(T).expand(B, T), model.new_cache(B, T), 0)


@st.composite
def trees(draw):
    n = draw(st.integers(1, 7))
    parents = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, n)]
    return draw(st.integers(1, 6)), parents  # prefix length, parent of each node (-1: hangs off the prefix)


def tree_inputs(P, parents, B=1):
    """A Block for a forest of n nodes after a P-token prefix (node i at slot P + i; -1: hangs off the prefix)."""
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)  # anc[i, j]: j is i or an ancestor of i
    depth = [0] * n
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
            depth[i] = depth[p] + 1
    lengths = torch.full((B,), P)
    slots = (P + torch.arange(n)).expand(B, n)
    parent_slots = torch.tensor([P + p if p >= 0 else P - 1 for p in parents]).expand(B, n)
    block = Block(slots, (torch.tensor(depth) + P).expand(B, n), parent_slots,
                  window_mask(lengths, lengths, anc.expand(B, n, n), P + n), lengths, anc=anc.expand(B, n, n),
                  offsets=torch.arange(n).expand(B, n))
    return block, anc


def path_to(anc, i):
    return anc[i].nonzero().flatten()  # ascending = root-to-node, since parents precede children


@settings(max_examples=25, deadline=None)
@given(trees(), st.integers(0, 2**31 - 1))
def test_tree_mask_matches_path_forward(tree, seed):
    P, parents = tree
    n = len(parents)
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, CFG.vocab_size, (2, P), generator=g)
    nodes = torch.randint(0, CFG.vocab_size, (2, n), generator=g)
    block, anc = tree_inputs(P, parents, B=2)
    with torch.no_grad():
        cache = MODEL.new_cache(2, P + n)
        MODEL(prefix, torch.arange(P).expand(2, P), cache, 0)
        out = MODEL(nodes, block.positions, cache, block)  # [2, n, V]
        for i in range(n):
            ref = causal_logits(MODEL, torch.cat([prefix, nodes[:, path_to(anc, i)]], dim=1))[:, -1]
            torch.testing.assert_close(out[:, i], ref, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(trees(), st.integers(0, 2**31 - 1))
def test_compact_keeps_accepted_path(tree, seed):
    P, parents = tree
    n = len(parents)
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, CFG.vocab_size, (1, P), generator=g)
    nodes = torch.randint(0, CFG.vocab_size, (1, n), generator=g)
    block, anc = tree_inputs(P, parents)
    path = path_to(anc, int(torch.randint(0, n, (1,), generator=g)))
    m = path.numel()
    nxt = torch.randint(0, CFG.vocab_size, (1, 1), generator=g)
    with torch.no_grad():
        cache = MODEL.new_cache(1, P + n + 1)
        MODEL(prefix, torch.arange(P)[None], cache, 0)
        MODEL(nodes, block.positions, cache, block)
        cache.commit([P], [path.tolist()])
        ids = torch.cat([prefix, nodes[:, path]], dim=1)
        fresh = MODEL.new_cache(1, P + m + 1)
        MODEL(ids, torch.arange(P + m)[None], fresh, 0)
        torch.testing.assert_close(cache.k[:, :, :, :P + m], fresh.k[:, :, :, :P + m], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache.v[:, :, :, :P + m], fresh.v[:, :, :, :P + m], atol=1e-5, rtol=0)
        # decoding continues from the compacted cache as if the path had been prefilled
        step = MODEL(nxt, torch.tensor([[P + m]]), cache, P + m)
        ref = causal_logits(MODEL, torch.cat([ids, nxt], dim=1))[:, -1:]
        torch.testing.assert_close(step, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefill", [1, 5])
def test_incremental_decode_matches_full_forward(prefill):
    ids = torch.randint(0, CFG.vocab_size, (3, 13), generator=torch.Generator().manual_seed(1))
    B, T = ids.shape
    with torch.no_grad():
        full = causal_logits(MODEL, ids)
        cache = MODEL.new_cache(B, T)
        steps = [MODEL(ids[:, :prefill], torch.arange(prefill).expand(B, prefill), cache, 0)]
        for t in range(prefill, T):
            steps.append(MODEL(ids[:, t:t + 1], torch.full((B, 1), t), cache, t))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_block_default_mask_sees_whole_prefix():
    # A multi-token block after a prefix (mask None) equals the full causal forward.
    ids = torch.randint(0, CFG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = MODEL.new_cache(1, 10)
        MODEL(ids[:, :4], torch.arange(4)[None], cache, 0)
        out = MODEL(ids[:, 4:], torch.arange(4, 10)[None], cache, 4)
        torch.testing.assert_close(out, causal_logits(MODEL, ids)[:, 4:], atol=1e-5, rtol=0)


def test_capacity_overflow_asserts():
    cache = MODEL.new_cache(1, 4)
    with pytest.raises(AssertionError):
        MODEL(torch.zeros(1, 3, dtype=torch.long), torch.arange(2, 5)[None], cache, 2)


def test_config_roundtrip_and_head_dim():
    assert CFG.head_dim == 16
    d = json.loads(json.dumps(CFG.to_dict()))
    assert LlamaConfig.from_dict(d) == CFG
    assert hash(LlamaConfig.from_dict(d)) == hash(CFG)


def test_init_random_is_deterministic_and_not_degenerate():
    again = init_random(CFG, seed=0)
    for a, b in zip(MODEL.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    ids = torch.randint(0, CFG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        greedy = causal_logits(MODEL, ids).argmax(-1)
    assert greedy.unique().numel() > 8


def test_tied_embeddings_share_storage():
    m = init_random(LlamaConfig(**{**CFG.to_dict(), "tie_word_embeddings": True}), seed=1)
    assert m.output.weight is m.tok_embeddings.weight
    p = perturbed_copy(m, 0.1, seed=0)
    assert p.output.weight is p.tok_embeddings.weight


def test_perturbed_copy_partially_agrees():
    ids = torch.randint(0, CFG.vocab_size, (4, 32), generator=torch.Generator().manual_seed(4))
    a, b = perturbed_copy(MODEL, 0.1, seed=5), perturbed_copy(MODEL, 0.1, seed=5)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    with torch.no_grad():
        agree = (causal_logits(a, ids).argmax(-1) == causal_logits(MODEL, ids).argmax(-1)).float().mean()
    assert 0.3 < agree < 0.95, agree


def test_bf16_cast_keeps_rope_in_fp32():
    m = init_random(CFG, seed=0).to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32
    torch.testing.assert_close(m.inv_freq, MODEL.inv_freq, atol=0, rtol=0)
    ids = torch.randint(0, CFG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = causal_logits(m, ids)
    assert out.dtype == torch.float32
    assert m.new_cache(1, 8).k.dtype == torch.bfloat16
    torch.testing.assert_close(out, causal_logits(MODEL, ids), atol=0.3, rtol=0.1)


def test_cache_free_forward_matches_cached_and_trains():
    # cache=None (training) attends causally within the block: same logits as a fresh cache, and differentiable.
    ids = torch.randint(0, CFG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(17).expand(3, 17)
    with torch.no_grad():
        cached = causal_logits(MODEL, ids)
    m = init_random(CFG, seed=0)
    free = m(ids, pos)
    torch.testing.assert_close(free, cached, atol=1e-5, rtol=0)
    free[:, -1].logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with pytest.raises(AssertionError):
        m(ids, pos, None, 4)  # start must be 0 without a cache
