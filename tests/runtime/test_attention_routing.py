"""backend.attention=triton: at-prefix forwards run `spec::tree_attention` and give the SDPA path's logits.

`Block.at_prefix` marks the forms whose node j sits at slot L_b + j and sees the prefix plus its in-block
ancestors (the kernel's contract): causal blocks and the verify tree, never a drafter level. Routing is forced
on the CPU by setting `tree_attention_sizes` (what runtime.load.route_kernels does from the plan); the op's
CPU implementation is the reference, and `kernel` swaps in the Triton launcher (TRITON_INTERPRET=1 here) so
the model forward runs the real kernel on small shapes. The forward is also exported: the program holds the
op as one node.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import codegen.tree_attention as ta  # noqa: E402
from runtime.batch import Block, TreeBatch  # noqa: E402
from runtime.models.llama import LlamaConfig, init_random, routes_tree_attention  # noqa: E402
from runtime.models.mamba2 import Mamba2Config, init_random_mamba2  # noqa: E402
from runtime.phases import Phase, block_inputs, cache_kind, cache_tensors, call_key  # noqa: E402
from spec_compiler.tree import Provenance, TreeTopology  # noqa: E402

LLAMA = LlamaConfig(vocab_size=61, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=64)
HYBRID = Mamba2Config(vocab_size=61, d_model=32, n_layer=3, d_state=8, headdim=8, ngroups=2, chunk_size=4,
                      d_intermediate=32, attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2,
                      attn_rotary_dim=4, tie_embeddings=True)
TOPO = TreeTopology.static([3, 2, 1])  # 1 + 3 + 6 + 6 = 16 nodes
CAP = 64


def tree_batch(topos: list[TreeTopology], bucket: int, seed: int = 0) -> TreeBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, 61, (t.n,), generator=g).tolist() for t in topos]
    prov = [[Provenance.root] + [Provenance.topk] * (t.n - 1) for t in topos]
    return TreeBatch.build(topos, tokens, prov, bucket)


@pytest.fixture(params=["llama", "hybrid"])
def model(request):
    m = init_random(LLAMA, seed=3) if request.param == "llama" else init_random_mamba2(HYBRID, seed=3)
    return m.eval()


@pytest.fixture(params=["reference", "kernel"])
def impl(request, monkeypatch):
    """Which implementation the op's CPU registration runs: its reference, or the Triton launcher (interpreted)."""
    calls = []
    inner = ta.tree_attention_ref if request.param == "reference" else ta.tree_attention

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return inner(*args, **kw)
    if request.param == "kernel":
        pytest.importorskip("triton")
    monkeypatch.setattr(ta, "tree_attention_ref", spy)
    return calls


def prefilled(model, lengths: list[int], seed: int = 1):
    """A cache whose row b holds a random prompt of lengths[b] tokens (SDPA prefill, one row at a time)."""
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(len(lengths), CAP)
    for b, L in enumerate(lengths):
        ids = torch.randint(0, 61, (1, L), generator=g)
        with torch.no_grad():
            model(ids, torch.arange(L)[None], cache.view_rows(b, b + 1), Block.causal(0, L))
    return cache


def clone(cache):
    out = type(cache).__new__(type(cache))
    out.__dict__.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cache.__dict__.items()})
    return out


def both_ways(model, ids, positions, cache, block):
    """(routed logits, SDPA logits, routed cache, SDPA cache) of one forward from copies of `cache`."""
    routed_cache, sdpa_cache = clone(cache), clone(cache)
    with torch.no_grad():
        model.tree_attention_sizes = frozenset([block.T])
        assert routes_tree_attention(model, block)
        routed = model(ids, positions, routed_cache, block)
        model.tree_attention_sizes = frozenset()
        sdpa = model(ids, positions, sdpa_cache, block)
    return routed, sdpa, routed_cache, sdpa_cache


def assert_same(routed, sdpa, routed_cache, sdpa_cache):
    print(f"max |routed - sdpa| = {(routed - sdpa).abs().max():.2e}")
    torch.testing.assert_close(routed, sdpa, atol=1e-5, rtol=1e-5)
    assert torch.equal(routed.argmax(-1), sdpa.argmax(-1))
    for a, b in zip(cache_tensors(routed_cache), cache_tensors(sdpa_cache)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- which blocks are at the prefix ------------------------------------------------------------------------

def test_at_prefix_marks_exactly_the_kernel_contract():
    one, three = tree_batch([TOPO], 16), tree_batch([TOPO] * 3, 16)
    lengths = torch.tensor([5, 9, 7])
    assert Block.causal(4, 3, 2).at_prefix and Block.causal(4, 1, 1, kv_len=5).at_prefix
    assert Block.tree(torch.tensor([5]), one, 32).at_prefix  # batch-1 CPU fast path
    assert Block.tree(lengths, three, 32).at_prefix  # the general construction
    assert Block.tree(torch.tensor([5]), TreeBatch.roots([7]), 6).at_prefix  # the AR step (mask_full)
    assert not Block.tree(torch.tensor([5]), one, 32, 1, 4, base=torch.tensor([4])).at_prefix  # a drafter level
    assert not Block.tree(lengths, three, 32, 1, 4, base=lengths - 1).at_prefix
    assert not Block.tree(torch.tensor([5]), one, 32, 1, 4).at_prefix  # lo > 0: not node 0 at L_b
    assert not Block.tree(lengths, three, 32, 1, 4).at_prefix
    ranges = Block.tree_ranges(lengths, three, 40, torch.tensor([1, 1, 4]), 3, lengths - 1)
    assert not ranges.at_prefix


def test_a_block_at_the_prefix_matches_the_kernel_slots_and_mask():
    """What at_prefix promises, checked on the tensors: slot L_b + j, mask = prefix + in-block ancestors."""
    lengths = torch.tensor([5, 9, 7])
    for block in (Block.causal(6, 4, 3), Block.tree(lengths, tree_batch([TOPO] * 3, 16), 32),
                  Block.tree(torch.tensor([5]), tree_batch([TOPO], 16), 32)):
        B, T = block.slots.shape
        L = block.lengths
        assert torch.equal(block.slots, L[:, None] + torch.arange(T))
        s = torch.arange(block.S)
        node = s[None] - L[:, None]  # [B, S]
        want = (node < 0)[:, None] | block.anc.gather(2, node.clamp(0, T - 1)[:, None].expand(B, T, block.S)) \
            & ((node >= 0) & (node < T))[:, None]
        assert torch.equal(block.mask, want)


# ---- routed forwards equal SDPA ----------------------------------------------------------------------------

def test_verify_tree_block(model, impl):
    cache = prefilled(model, [11])
    tree = tree_batch([TOPO], 16)
    block = Block.tree(torch.tensor([11]), tree, 11 + 16)
    assert_same(*both_ways(model, tree.tokens, block.positions, cache, block))
    assert impl  # the op ran


def test_causal_chunk(model, impl):
    cache = prefilled(model, [9])
    ids = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(4))
    block = Block.causal(9, 6, 1)
    assert_same(*both_ways(model, ids, block.positions, cache, block))
    assert impl


def test_ragged_batch_verify(model, impl):
    lengths = [4, 13, 8]
    cache = prefilled(model, lengths)
    tree = tree_batch([TOPO, TreeTopology.chain(5), TreeTopology.static([2, 2])], 16, seed=2)
    block = Block.tree(torch.tensor(lengths), tree, max(lengths) + 16)
    assert_same(*both_ways(model, tree.tokens, block.positions, cache, block))
    assert impl and impl[0][0] == 3


def test_drafter_levels_keep_sdpa(model, impl):
    """A level block (base = L - 1, lo >= 1) breaks the kernel's contract: it must not route, whatever its size."""
    tree = tree_batch([TOPO], 16)
    block = Block.tree(torch.tensor([10]), tree, 32, 1, 4, base=torch.tensor([9]))
    model.tree_attention_sizes = frozenset([block.T])
    assert not routes_tree_attention(model, block)
    cache = prefilled(model, [10])
    with torch.no_grad():
        model(tree.tokens[:, 1:4], block.positions, cache, block)
    assert not impl


def test_greedy_decode_is_the_same_routed(impl):
    """A short greedy AR decode (prefill chunk, then T = 1 steps: all at the prefix) emits the same tokens."""
    model = init_random(LLAMA, seed=5).eval()
    prompt = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(6))

    def decode(sizes):
        model.tree_attention_sizes = frozenset(sizes)
        cache, out, ids, L = model.new_cache(1, CAP), [], prompt, 0
        with torch.no_grad():
            for _ in range(6):
                T = ids.shape[1]
                logits = model(ids, torch.arange(L, L + T)[None], cache, Block.causal(L, T, 1))
                L += T
                ids = logits[:, -1:].argmax(-1)
                out.append(int(ids))
        return out
    assert decode({1, 7}) == decode(())
    assert impl


# ---- the phase program holds the op ------------------------------------------------------------------------

def test_exported_phase_holds_tree_attention(model):
    from codegen import ops  # noqa: F401
    cache = prefilled(model, [11])
    tree = tree_batch([TOPO], 16)
    block = Block.tree(torch.tensor([11]), tree, CAP)
    model.tree_attention_sizes = frozenset([16])
    key = call_key("target", "forward", block, tree.tokens, None, cache, model)
    assert key.tree_attention and key.name.endswith("-TA") and not key.dynamic().tree_attention
    kind = cache_kind(cache)
    if kind == "ssm":
        cache.host_flags = cache.facts(block)
    phase = Phase(model, key, kind, CAP)
    inputs = block_inputs(tree.tokens, block) + cache_tensors(cache)
    with torch.no_grad():
        want = model(tree.tokens, block.positions, clone(cache), block)
        ep = torch.export.export(phase, tuple(t.clone() for t in inputs))
    graph = str(ep.graph)
    assert "spec.tree_attention" in graph and "spec.cached_attention" not in graph
    torch.testing.assert_close(ep.module()(*[t.clone() for t in inputs]), want, atol=1e-5, rtol=1e-5)
