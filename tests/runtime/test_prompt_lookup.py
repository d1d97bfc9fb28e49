"""runtime.lookup.PromptLookupDrafter: the incremental per-row n-gram index gives exactly the trees of a
brute-force rescan of the whole text, step by step, across rows, moves, depth limits and n-gram ranges;
trees come back as a TreeBatch padded to the plan's buckets."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from runtime.lookup import PromptLookupDrafter
from spec_compiler.tree import Provenance, TreeTopology


@dataclass
class Req:
    tokens: list[int]
    slot: int


def reference(tokens: list[int], topo: TreeTopology, min_n: int, max_n: int, num_pred: int,
              max_depth: int) -> tuple[tuple[int, ...], list[int]]:
    """Brute force: rescan the whole text for every suffix n-gram, merge the continuations into a trie."""
    depth = min(topo.max_depth, num_pred, max_depth)
    width, budget = len(topo.children[0]), topo.n
    conts: list[list[int]] = []
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        for start in range(len(tokens) - 1 - n, -1, -1):  # earlier n-grams, most recent first
            if len(conts) < width and tokens[start:start + n] == tokens[-n:]:
                cont = tokens[start + n:start + n + depth]
                if cont and cont not in conts:
                    conts.append(cont)
    parents, toks, index = [-1], [tokens[-1]], {}
    for cont in conts:
        node = 0
        for x in cont:
            if (node, x) not in index:
                if len(parents) == budget:
                    break
                index[(node, x)] = len(parents)
                parents.append(node)
                toks.append(x)
            node = index[(node, x)]
    return tuple(parents), toks


def stream(rng: random.Random, vocab: int) -> list[int]:
    """Tokens with repeats: random tokens, copies of earlier spans, and loops."""
    out = [rng.randrange(vocab)]
    while len(out) < 400:
        r = rng.random()
        if r < 0.4:
            out.append(rng.randrange(vocab))
        elif r < 0.8:
            s = rng.randrange(len(out))
            out.extend(out[s:s + rng.randint(1, 12)])
        else:
            period = rng.randint(1, 6)
            out.extend((out[-period:] * 8)[:rng.randint(1, 30)])
    return out


def check_batch(batch, expected: list[tuple[tuple[int, ...], list[int]]], buckets):
    sizes = [len(p) for p, _ in expected]
    assert batch.T == min(b for b in buckets if b >= max(sizes))
    for b, (parents, toks) in enumerate(expected):
        assert batch.topologies[b].parents == parents
        assert batch.row_tokens(b) == toks
        prov = batch.provenance[b].tolist()
        assert prov == [Provenance.root] + [Provenance.retrieved] * (len(toks) - 1) + \
            [Provenance.pad] * (batch.T - len(toks))
        assert batch.tokens[b, len(toks):].eq(0).all()


TOPOS = {"chain4": TreeTopology.chain(4), "static211": TreeTopology.static([2, 1, 1]),
         "static321": TreeTopology.static([3, 2, 1]), "chain1": TreeTopology.chain(1),
         "static4": TreeTopology.static([4, 1, 1, 1, 1, 1]),
         "skewed": TreeTopology((-1, 0, 0, 0, 1, 4))}  # width 3 x depth 3 > 5 draft nodes: the budget binds


@pytest.mark.parametrize("topo", TOPOS, ids=str)
@pytest.mark.parametrize("ngram", [(1, 3, 8), (2, 2, 4), (1, 1, 2), (3, 5, 8), (1, 4, 3)], ids=str)
def test_incremental_index_equals_rescan(topo, ngram):
    topo = TOPOS[topo]
    min_n, max_n, num_pred = ngram
    rng = random.Random(hash((topo.parents, ngram)) & 0xFFFF)
    rows = 3
    d = PromptLookupDrafter(topo, min_n, max_n, num_pred, rows)
    for vocab in (3, 12):
        streams = [stream(rng, vocab) for _ in range(rows)]
        lengths = [rng.randint(1, 20) for _ in range(rows)]
        for slot in range(rows):
            d.start(slot, streams[slot][:lengths[slot]])
        matched = 0
        for _ in range(60):
            # random depth limits, mostly the full depth (a request's last steps cut it)
            md = [rng.choice([0, 1, 2, 3, 100, 100, 100]) for _ in range(rows)]
            reqs = [Req(streams[s][:lengths[s]], s) for s in range(rows)]
            batch = d.propose(reqs, md)
            expected = [reference(r.tokens, topo, min_n, max_n, num_pred, m) for r, m in zip(reqs, md)]
            check_batch(batch, expected, d.buckets)
            matched += sum(len(p) > 1 for p, _ in expected)
            lengths = [L + rng.randint(1, 5) for L in lengths]  # the engine appends accepted tokens
        assert matched > 30  # the streams repeat: most steps draft something


def test_known_drafts():
    d = PromptLookupDrafter(TreeTopology.chain(4), 1, 3, 8, rows=1)
    d.start(0, [5, 6, 7, 8, 9, 1, 5, 6, 7])
    batch = d.propose([Req([5, 6, 7, 8, 9, 1, 5, 6, 7], 0)], [4])
    assert batch.row_tokens(0) == [7, 8, 9, 1, 5]  # matched "5 6 7", continuation "8 9 1 5"
    assert batch.T == 5
    d2 = PromptLookupDrafter(TreeTopology.static([2, 1, 1]), 1, 3, 8, rows=1)
    text = [1, 2, 3, 9, 1, 2, 4, 9, 1, 2]
    d2.start(0, text)
    b2 = d2.propose([Req(text, 0)], [3])
    # "9 1 2" matches once (-> 4 9 1); the shorter "1 2" adds the older continuation 3 9 1
    assert sorted(b2.row_tokens(0)[i] for i in b2.topologies[0].children[0]) == [3, 4]
    assert b2.T == 7 and b2.topologies[0].n == 7


def test_rows_move():
    topo = TreeTopology.static([2, 1, 1])
    d = PromptLookupDrafter(topo, 1, 3, 8, rows=3)
    rng = random.Random(3)
    texts = [stream(rng, 5)[:50 + 10 * i] for i in range(3)]
    for s in range(3):
        d.start(s, texts[s][:30])
    d.propose([Req(texts[s][:40], s) for s in range(3)], [8, 8, 8])
    d.move(2, 0)  # request 0 finished: the last row moves into its slot
    assert d.rows[2] is None
    reqs = [Req(texts[2][:45], 0), Req(texts[1][:44], 1)]
    check_batch(d.propose(reqs, [8, 8]), [reference(r.tokens, topo, 1, 3, 8, 8) for r in reqs], d.buckets)
    with pytest.raises(AssertionError, match="start"):
        d.propose([Req(texts[2][:46], 2)], [8])
    d.move(1, 1)  # moving onto itself keeps the state
    reqs = [Req(texts[1][:48], 1)]
    check_batch(d.propose(reqs, [8]), [reference(r.tokens, topo, 1, 3, 8, 8) for r in reqs], d.buckets)
    d.start(2, texts[0][:10])  # a new request on the freed row
    reqs = [Req(texts[0][:12], 2)]
    check_batch(d.propose(reqs, [8]), [reference(r.tokens, topo, 1, 3, 8, 8) for r in reqs], d.buckets)


def test_buckets():
    assert PromptLookupDrafter(TreeTopology.static([2, 2, 1]), 1, 3, 8, 1).buckets == (1, 2, 4, 8, 11)
    assert PromptLookupDrafter(TreeTopology.static([2, 1, 1, 1]), 1, 3, 8, 1).buckets == (1, 2, 4, 8, 9)
    assert PromptLookupDrafter(TreeTopology.chain(7), 1, 3, 8, 1).buckets == (1, 2, 4, 8)
    assert PromptLookupDrafter(TreeTopology.chain(1), 1, 3, 8, 1).buckets == (1, 2)
    assert PromptLookupDrafter(TreeTopology.root_only(), 1, 3, 8, 1).buckets == (1,)

    d = PromptLookupDrafter(TreeTopology.chain(7), 1, 3, 8, rows=2)
    d.start(0, [1, 2, 3, 4])
    d.start(1, [5, 6, 7, 8])
    batch = d.propose([Req([1, 2, 3, 4], 0), Req([5, 6, 7, 8], 1)], [8, 8])
    assert batch.T == 1 and batch.sizes == [1, 1]  # no match anywhere: an autoregressive step
    assert batch.provenance.tolist() == [[Provenance.root]] * 2
    batch = d.propose([Req([1, 2, 3, 4, 2], 0), Req([5, 6, 7, 8, 9], 1)], [8, 8])
    assert batch.sizes == [4, 1] and batch.T == 4  # "2" -> 3 4 2
    batch = d.propose([Req([1, 2, 3, 4, 2, 5, 1, 2, 3, 4, 2], 0), Req([5, 6, 7, 8, 9, 6], 1)], [8, 8])
    assert batch.sizes == [7, 5] and batch.T == 8  # "3 4 2" -> 5 1 2 3 4 2 (to the end of the text)
    assert batch.row_tokens(1) == [6, 7, 8, 9, 6]


def test_depth_limits():
    text = [4, 1, 2, 3, 5, 6, 7, 8, 9, 1, 2, 3]
    d = PromptLookupDrafter(TreeTopology.chain(6), 1, 3, 4, rows=1)  # num_pred_tokens caps the depth
    d.start(0, text)
    assert d.propose([Req(text, 0)], [0]).sizes == [1]  # max_depth 0: root only
    assert d.propose([Req(text, 0)], [0]).T == 1
    assert d.propose([Req(text, 0)], [2]).row_tokens(0) == [3, 5, 6]
    assert d.propose([Req(text, 0)], [100]).row_tokens(0) == [3, 5, 6, 7, 8]
    assert d.propose([Req(text, 0)], [100]).topologies[0].max_depth == 4
    d = PromptLookupDrafter(TreeTopology.chain(2), 1, 3, 8, rows=1)  # the tree's depth caps it
    d.start(0, text)
    assert d.propose([Req(text, 0)], [100]).row_tokens(0) == [3, 5, 6]
    d = PromptLookupDrafter(TreeTopology.root_only(), 1, 3, 8, rows=1)  # nothing to draft, nothing indexed
    d.start(0, text)
    assert d.propose([Req(text, 0)], [100]).sizes == [1] and d.rows[0].updates == 0


def test_ngram_edges():
    # min == max: only that n-gram size matches
    d = PromptLookupDrafter(TreeTopology.chain(3), 2, 2, 8, rows=1)
    text = [1, 2, 7, 3, 2]
    d.start(0, text)
    assert d.propose([Req(text, 0)], [8]).sizes == [1]  # "3 2" never occurred; "2" alone is below min_ngram
    text += [7, 3, 2]
    assert d.propose([Req(text, 0)], [8]).row_tokens(0) == [2, 7, 3, 2]  # "3 2" -> 7 3 2
    # texts shorter than the n-grams
    for text in ([9], [9, 9], [9, 8]):
        d = PromptLookupDrafter(TreeTopology.chain(3), 1, 5, 8, rows=1)
        d.start(0, text)
        assert d.propose([Req(text, 0)], [8]).row_tokens(0) == list(reference(text, TreeTopology.chain(3), 1, 5,
                                                                                  8, 8)[1])
    d = PromptLookupDrafter(TreeTopology.chain(3), 3, 5, 8, rows=1)
    d.start(0, [9, 9])
    assert d.propose([Req([9, 9, 9], 0)], [8]).sizes == [1]  # "9 9 9" has no earlier occurrence
    assert d.propose([Req([9, 9, 9, 9], 0)], [8]).row_tokens(0) == [9, 9]  # "9 9 9" at 0..2 -> 9
    # the longest n-gram wins over a more recent shorter one
    d = PromptLookupDrafter(TreeTopology.chain(2), 1, 2, 8, rows=1)
    text = [1, 2, 5, 6, 2, 8, 1, 2]
    d.start(0, text)
    assert d.propose([Req(text, 0)], [8]).row_tokens(0) == [2, 5, 6]  # "1 2" -> 5 6, not "2" -> 8 1
    with pytest.raises(AssertionError):
        PromptLookupDrafter(TreeTopology.chain(2), 3, 2, 8, rows=1)


def test_index_grows_incrementally():
    min_n, max_n, D = 1, 3, 4
    d = PromptLookupDrafter(TreeTopology.chain(D), min_n, max_n, 8, rows=1)

    def inserts(L: int) -> int:
        """(end e, n) pairs indexed once the text has L tokens: e + D < L, n <= e + 1."""
        return sum(min(max_n, e + 1) - min_n + 1 for e in range(max(0, L - D)))

    rng = random.Random(0)
    text = stream(rng, 6)
    d.start(0, text[:100])
    row = d.rows[0]
    assert row.updates == inserts(100) and row.done == 100 - D
    L = 100
    for step in range(50):
        before = row.updates
        k = 1 + step % 3
        L += k
        d.propose([Req(text[:L], 0)], [8])
        assert row.updates - before == k * (max_n - min_n + 1)  # the new tokens' n-grams, nothing rescanned
        assert row.updates == inserts(L) and len(row.text) == L
        before = row.updates
        d.propose([Req(text[:L], 0)], [8])  # no new tokens: no index work
        assert row.updates == before
    with pytest.raises(AssertionError, match="only grow"):
        d.propose([Req(text[:L - 1], 0)], [8])
