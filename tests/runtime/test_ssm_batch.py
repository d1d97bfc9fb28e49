"""Mamba2 / hybrid forwards over batched Blocks (issue #10; runtime/batch.py, runtime/models/ssm_cache.py):

- batch invariance: rows with different committed lengths and different trees (padded to one bucket) in
  one forward give bitwise the logits, node states and KV each row gives alone (fp32 CPU), and so does a
  batched prefill;
- commit: after each row keeps one path, its committed SSM state, conv window and KV prefix equal a fresh
  prefill of its committed text (bitwise equal to the same step run alone), over repeated rounds;
- drafter-style growth (root committed, base = lengths - 1, one level lo..hi per forward, deeper levels
  continuing from scratch) gives the node logits of one whole-tree forward;
- the batched greedy loop (draft a tree per row with a drafter model, verify all rows in one forward,
  accept greedily, commit) emits each row's autoregressive greedy text.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from runtime.batch import Block, TreeBatch
from runtime.models.mamba2 import Mamba2Config, init_random_mamba2, perturbed_copy
from spec_compiler.tree import Provenance, TreeTopology

V = 53
CONFIGS = {
    "mamba2": Mamba2Config(vocab_size=V, d_model=32, n_layer=2, d_state=8, headdim=8, ngroups=2, chunk_size=4),
    "hybrid": Mamba2Config(vocab_size=V, d_model=32, n_layer=3, d_state=8, headdim=8, ngroups=2, chunk_size=4,
                           d_intermediate=32, attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2,
                           attn_rotary_dim=4, tie_embeddings=True),
}
MODELS = {k: init_random_mamba2(c, seed=i).eval() for i, (k, c) in enumerate(CONFIGS.items())}
STATIC = TreeTopology.static([2, 2, 1])
WIDE = TreeTopology.static([4, 1, 1])  # 4 nodes a level
CAPACITY = 48
BUCKET = 16


def provenance(topo: TreeTopology) -> list[Provenance]:
    return [Provenance.root] + [Provenance.topk] * (topo.n - 1)


def tree_batch(topos, tokens, bucket=BUCKET) -> TreeBatch:
    return TreeBatch.build(topos, tokens, [provenance(t) for t in topos], bucket)


def prefill_rows(model, texts: list[list[int]], capacity=CAPACITY, num_scratch=BUCKET):
    """A cache whose row b holds texts[b] (any lengths, 0 too), each row prefilled on its own."""
    cache = model.new_cache(len(texts), capacity, num_scratch=num_scratch)
    with torch.no_grad():
        for b, text in enumerate(texts):
            if text:
                model(torch.tensor([text]), torch.arange(len(text))[None], cache.view_rows(b, b + 1),
                      Block.causal(0, len(text)))
    return cache


def assert_row_state(cache, b, fresh, L, exact=False):
    """Row b of `cache` (committed length L) against row 0 of `fresh`: SSM state, conv window, KV prefix."""
    pairs = [(cache.ssm[:, b], fresh.ssm[:, 0]), (cache.conv[:, b], fresh.conv[:, 0])]
    if fresh.kv is not None:
        pairs += [(cache.kv.k[:, b, :, :L], fresh.kv.k[:, 0, :, :L]),
                  (cache.kv.v[:, b, :, :L], fresh.kv.v[:, 0, :, :L])]
    for got, want in pairs:
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def random_rows(seed: int, lengths: list[int], topos: list[TreeTopology]):
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randint(0, V, (L,), generator=g).tolist() for L in lengths]
    trees = [torch.randint(0, V, (t.n,), generator=g).tolist() for t in topos]
    return texts, trees


ROW_TOPOS = [STATIC, TreeTopology.chain(3), TreeTopology.root_only(), TreeTopology.static([3, 1])]


# ---- batch invariance -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tree_forward_rows_equal_each_row_alone_bitwise(kind):
    model = MODELS[kind]
    lengths = [5, 11, 0, 1]  # the third row's root starts the text (zeros), the fourth follows one token
    texts, trees = random_rows(1, lengths, ROW_TOPOS)
    kv_len = max(lengths) + BUCKET
    with torch.no_grad():
        cache = prefill_rows(model, texts)
        tb = tree_batch(ROW_TOPOS, trees)
        block = Block.tree(torch.tensor(lengths), tb, kv_len)
        out = model(tb.tokens, block.positions, cache, block)  # [B, T, V]
        for b, (L, topo) in enumerate(zip(lengths, ROW_TOPOS)):
            alone = prefill_rows(model, [texts[b]])
            tb1 = tree_batch([topo], [trees[b]])
            block1 = Block.tree(torch.tensor([L]), tb1, kv_len)
            out1 = model(tb1.tokens, block1.positions, alone, block1)
            n = topo.n
            assert torch.equal(out[b, :n], out1[0, :n]), (b, (out[b, :n] - out1[0, :n]).abs().max())
            assert torch.equal(cache.scratch_ssm[:, b, :n], alone.scratch_ssm[:, 0, :n])
            assert torch.equal(cache.scratch_conv[:, b, :n], alone.scratch_conv[:, 0, :n])
            assert torch.equal(cache.ssm[:, b], alone.ssm[:, 0])  # a tree forward leaves the committed state
            if cache.kv is not None:
                assert torch.equal(cache.kv.k[:, b, :, :L + n], alone.kv.k[:, 0, :, :L + n])
                assert torch.equal(cache.kv.v[:, b, :, :L + n], alone.kv.v[:, 0, :, :L + n])


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_batched_prefill_and_steps_equal_each_row_alone(kind):
    """Prefill chunks (advance blocks, the chunked scan) bitwise; one-token steps (the recurrence) to fp32
    rounding only: a Linear over fewer than 4 rows (a row alone) takes another MKL kernel than over 4 or more
    (runtime/models/llama.py Linear's business, not the SSM's)."""
    model = MODELS[kind]
    ids = torch.randint(0, V, (3, 15), generator=torch.Generator().manual_seed(2))
    chunks = ((0, 8), (8, 12))
    with torch.no_grad():
        cache = model.new_cache(3, CAPACITY)
        out = [model(ids[:, a:b], torch.arange(a, b).expand(3, b - a), cache,
                     Block.causal(a, b - a, B=3, kv_len=CAPACITY)) for a, b in chunks]
        alone = [model.new_cache(1, CAPACITY) for _ in range(3)]
        for b in range(3):
            for (lo, hi), got in zip(chunks, out):
                one = model(ids[b:b + 1, lo:hi], torch.arange(lo, hi)[None], alone[b],
                            Block.causal(lo, hi - lo, kv_len=CAPACITY))
                assert torch.equal(got[b], one[0])
            assert_row_state(cache, b, alone[b], 12, exact=True)
        for t in range(12, 15):
            got = model(ids[:, t:t + 1], torch.full((3, 1), t), cache, Block.causal(t, 1, B=3, kv_len=CAPACITY))
            for b in range(3):
                one = model(ids[b:b + 1, t:t + 1], torch.tensor([[t]]), alone[b], Block.causal(t, 1, kv_len=CAPACITY))
                torch.testing.assert_close(got[b], one[0], atol=1e-5, rtol=1e-5)
        for b in range(3):
            assert_row_state(cache, b, alone[b], 15)


# ---- commit == fresh prefill ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONFIGS))
def test_commit_equals_fresh_prefill_per_row_over_rounds(kind):
    model = MODELS[kind]
    g = torch.Generator().manual_seed(3)
    lengths = [4, 9, 0, 2]
    texts, _ = random_rows(4, lengths, ROW_TOPOS)
    roots = [int(torch.randint(0, V, (1,), generator=g)) for _ in lengths]  # each row's pending token
    cache = prefill_rows(model, texts)
    alone = [prefill_rows(model, [t]) for t in texts]
    with torch.no_grad():
        for rnd in range(5):
            topos = ROW_TOPOS[rnd % 4:] + ROW_TOPOS[:rnd % 4]  # every row sees every tree shape
            trees = [[r] + torch.randint(0, V, (t.n - 1,), generator=g).tolist() for r, t in zip(roots, topos)]
            # accepted node per row: the root alone, a leaf, or a middle node, varying by round
            paths = [list(t.path([0, t.leaves[-1], t.parents[t.leaves[0]] if t.n > 1 else 0][(rnd + b) % 3]))
                     for b, t in enumerate(topos)]
            kv_len = max(lengths) + BUCKET
            tb = tree_batch(topos, trees)
            block = Block.tree(torch.tensor(lengths), tb, kv_len)
            model(tb.tokens, block.positions, cache, block)
            cache.commit(lengths, paths)
            for b in range(len(lengths)):  # the same step alone, then committed
                tb1 = tree_batch([topos[b]], [trees[b]])
                block1 = Block.tree(torch.tensor([lengths[b]]), tb1, kv_len)
                model(tb1.tokens, block1.positions, alone[b], block1)
                alone[b].commit([lengths[b]], [paths[b]])
            for b, path in enumerate(paths):
                texts[b] += [trees[b][i] for i in path]
                lengths[b] += len(path)
                roots[b] = int(torch.randint(0, V, (1,), generator=g))
                assert len(texts[b]) == lengths[b]
                fresh = prefill_rows(model, [texts[b]])
                assert_row_state(cache, b, fresh, lengths[b])
                assert_row_state(cache, b, alone[b], lengths[b], exact=True)


# ---- drafter-style growth == whole-tree forward -------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONFIGS))
def test_level_by_level_growth_equals_whole_tree_forward(kind):
    model = MODELS[kind]
    topos = [WIDE, WIDE.truncate(1), WIDE.truncate(2), WIDE]  # one level order, per-row depths
    levels = [(min(ids), max(ids) + 1) for ids in WIDE.levels[1:]]
    lengths = [6, 3, 10, 1]  # committed, the root (each text's last token) included
    texts, trees = random_rows(5, lengths, topos)
    trees = [[text[-1]] + tree[1:] for text, tree in zip(texts, trees)]
    kv_len = max(lengths) + BUCKET
    with torch.no_grad():
        # the reference: the root pending at slot L - 1, the whole tree in one forward
        whole = prefill_rows(model, [t[:-1] for t in texts])
        tb = tree_batch(topos, trees)
        wblock = Block.tree(torch.tensor(lengths) - 1, tb, kv_len)
        ref = model(tb.tokens, wblock.positions, whole, wblock)
        # the drafter: the root committed, one level per forward, deeper levels continuing from scratch
        cache = prefill_rows(model, texts)
        base = torch.tensor(lengths) - 1
        for lo, hi in levels:
            block = Block.tree(torch.tensor(lengths), tb, kv_len, lo, hi, base=base)
            out = model(tb.tokens[:, lo:hi], block.positions, cache, block)
            for b, topo in enumerate(topos):
                n = min(hi, topo.n) - lo
                if n > 0:
                    torch.testing.assert_close(out[b, :n], ref[b, lo:lo + n], atol=1e-5, rtol=1e-5)
        # and each row's level forwards alone are bitwise the batch's (4 nodes a level: see the test above)
        for b, topo in enumerate(topos):
            alone = prefill_rows(model, [texts[b]])
            tb1 = tree_batch([topo], [trees[b]])
            for lo, hi in levels:
                block1 = Block.tree(torch.tensor([lengths[b]]), tb1, kv_len, lo, hi, base=base[b:b + 1])
                out1 = model(tb1.tokens[:, lo:hi], block1.positions, alone, block1)
            n = topo.n - 1
            assert torch.equal(cache.scratch_ssm[:, b, :n], alone.scratch_ssm[:, 0, :n])
            assert torch.equal(cache.scratch_conv[:, b, :n], alone.scratch_conv[:, 0, :n])
            assert torch.equal(out[b], out1[0])  # the last level's logits


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_block_without_anc_and_copy_row(kind):
    """A Block without `anc` (derived from the parent slots) gives the same forward; `copy_row` moves a row's
    committed state and KV, so the moved request continues bitwise as it would have in its old row."""
    model = MODELS[kind]
    lengths = [7, 4]
    texts, trees = random_rows(6, lengths, [STATIC, STATIC])
    with torch.no_grad():
        tb = tree_batch([STATIC] * 2, trees)
        block = Block.tree(torch.tensor(lengths), tb, 7 + BUCKET)
        a = prefill_rows(model, texts)
        out = model(tb.tokens, block.positions, a, block)
        b = prefill_rows(model, texts)
        assert torch.equal(model(tb.tokens, block.positions, b, replace(block, anc=None)), out)
        a.commit(lengths, [[0, 1, 3], [0]])
        a.copy_row(0, 1)  # row 0's request moves to row 1
        moved = [lengths[0] + 3] * 2
        nxt = tree_batch([STATIC] * 2, [trees[1]] * 2)
        nblock = Block.tree(torch.tensor(moved), nxt, moved[0] + BUCKET)
        got = model(nxt.tokens, nblock.positions, a, nblock)
        assert torch.equal(got[0], got[1])
        a.reset()
        assert not a.ssm.any() and not a.conv.any() and not a.scratch_ssm.any()


def test_scratch_smaller_than_the_tree_is_refused():
    model = MODELS["mamba2"]
    cache = prefill_rows(model, [list(range(8))], num_scratch=4)
    tb = tree_batch([STATIC], [list(range(STATIC.n))], bucket=STATIC.n)
    with pytest.raises(AssertionError, match="num_scratch"):
        model(tb.tokens, tb.depth + 8, cache, Block.tree(torch.tensor([8]), tb, 8 + STATIC.n))


# ---- the batched greedy loop --------------------------------------------------------------------------------

def greedy_ar(model, prompt: list[int], new: int) -> list[int]:
    cache = prefill_rows(model, [prompt[:-1]], capacity=len(prompt) + new)
    toks, L = list(prompt), len(prompt) - 1
    with torch.no_grad():
        for _ in range(new):
            tb = TreeBatch.roots([toks[-1]])
            block = Block.tree(torch.tensor([L]), tb, L + 1)
            toks.append(int(model(tb.tokens, block.positions, cache, block)[0, 0].argmax()))
            cache.commit([L], [[0]])
            L += 1
    return toks[len(prompt):]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_batched_greedy_loop_equals_autoregressive(kind):
    """Rows at different lengths; each step a drafter (a noised copy, with its own cache, grown level by level
    from its committed root) proposes a static tree per row, the target verifies every row in one forward, the
    longest greedy-matching path is kept, both caches commit. Every row's text equals its greedy AR text."""
    target, new = MODELS[kind], 24
    drafter = perturbed_copy(target, 0.1, 7).eval()
    topo = TreeTopology.static([2, 1, 1])
    levels = [(min(ids), max(ids) + 1) for ids in topo.levels[1:]]
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 3, 12)]
    want = [greedy_ar(target, p, new) for p in prompts]
    B, cap = len(prompts), max(map(len, prompts)) + (topo.max_depth + 1) * new + topo.n  # a fast row runs ahead
    tcache = prefill_rows(target, [p[:-1] for p in prompts], capacity=cap)  # the root pending
    dcache = prefill_rows(drafter, [p[:-1] for p in prompts], capacity=cap)
    toks = [list(p) for p in prompts]
    L = [len(p) - 1 for p in prompts]
    accepted = []
    with torch.no_grad():
        while min(len(t) - len(p) for t, p in zip(toks, prompts)) < new:
            # draft: the drafter commits the root, then fills one level per forward (top-1 per child slot)
            roots = TreeBatch.roots([t[-1] for t in toks])
            rb = Block.tree(torch.tensor(L), roots, cap)
            logits = drafter(roots.tokens, rb.positions, dcache, rb)[:, 0]  # [B, V]
            dcache.commit(L, [[0]] * B)
            drafts = [[t[-1]] + [0] * (topo.n - 1) for t in toks]
            node_logits = {0: logits}
            for lo, hi in levels:
                for b in range(B):
                    for i in range(lo, hi):
                        p = topo.parents[i]
                        rank = topo.children[p].index(i)
                        drafts[b][i] = int(node_logits[p][b].topk(rank + 1).indices[rank])
                tb = tree_batch([topo] * B, drafts, topo.n)
                block = Block.tree(torch.tensor(L) + 1, tb, cap, lo, hi, base=torch.tensor(L))
                out = drafter(tb.tokens[:, lo:hi], block.positions, dcache, block)
                node_logits.update({i: out[:, i - lo] for i in range(lo, hi)})
            # verify every row in one forward, accept greedily
            tb = tree_batch([topo] * B, drafts, topo.n)
            block = Block.tree(torch.tensor(L), tb, cap)
            best = target(tb.tokens, block.positions, tcache, block).argmax(-1)  # [B, T]
            paths, nxt = [], []
            for b in range(B):
                path = [0]
                while kids := [c for c in topo.children[path[-1]] if drafts[b][c] == int(best[b, path[-1]])]:
                    path.append(kids[0])
                paths.append(path)
                nxt.append(int(best[b, path[-1]]))
            tcache.commit(L, paths)
            # the drafter committed the root; it keeps the rest of the path by catching up (an advance block)
            for b, path in enumerate(paths):
                if len(path) > 1:
                    extra = [drafts[b][i] for i in path[1:]]
                    drafter(torch.tensor([extra]), torch.arange(L[b] + 1, L[b] + len(path))[None],
                            dcache.view_rows(b, b + 1), Block.causal(L[b] + 1, len(extra), kv_len=cap))
                toks[b] += [drafts[b][i] for i in path[1:]] + [nxt[b]]
                L[b] += len(path)
                accepted.append(len(path))
    for b in range(B):
        assert toks[b][len(prompts[b]):len(prompts[b]) + new] == want[b]
    assert max(accepted) > 1 and min(accepted) == 1  # full and root-only acceptances both ran
