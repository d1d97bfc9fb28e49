"""Prompt lookup (PLD) for the batched step: per cache row, an n-gram index grown with each accepted token.

Drafts for a row: for n from `max_ngram` down to `min_ngram`, the earlier occurrences of the text's
suffix n-gram (not the suffix itself), most recent first, give continuations (the up-to-D tokens after
each occurrence, D = min(tree depth, num_pred_tokens, the row's max_depth)); the first `width` distinct
ones (width = the root's children in the plan topology) are merged into a trie with distinct children
per node and at most `budget` (= the plan topology's n) nodes. Every draft node is `Provenance.retrieved`.

This is also `retrieval=context` (runtime/load.py: make_retrieval): alone with `drafter=none`, width
`retrieval.max_candidates`, depth `cont_len`, budget `max_nodes + 1`; as the candidate source of the RASD
fusion (runtime/retrieval.py) with budget `num_candidates + 1`.

The index never rescans the text. Per row it maps each n-gram to its distinct D-token continuations,
most recent last (a dict used as an ordered set, value: the end position of that continuation's latest
occurrence). An occurrence ending at e enters the index once its continuation is complete (e + D is
text), i.e. when token e + D is appended; the at most D - 1 occurrences that end later are checked
directly against the text at lookup. A lookup then walks only distinct continuations, so a step costs
O(new tokens * n-gram sizes * D + levels * width * D), even in a text that repeats itself.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

from runtime.batch import TreeBatch
from spec_compiler.tree import Provenance, TreeTopology, tree_buckets

_MAX_CACHED_TOPOLOGIES = 4096


@dataclass
class _Row:
    """One request's lookup state."""

    text: list[int] = field(default_factory=list)
    """Its tokens so far (a copy: prompt + emitted; the last is the pending root)."""
    index: dict[tuple[int, ...], dict[tuple[int, ...], int]] = field(default_factory=dict)
    """n-gram -> {D-token continuation: end position of its latest occurrence}, most recent last."""
    done: int = 0
    """Occurrences ending at e < done are in `index`."""
    updates: int = 0
    """Index insertions so far (one per (occurrence end, n)): the index only ever grows by new tokens."""


class PromptLookupDrafter:
    def __init__(self, topology: TreeTopology, min_ngram: int, max_ngram: int, num_pred_tokens: int, rows: int,
                 budget: int | None = None):
        """budget: the most nodes of a tree, root included (default topology.n)."""
        assert 1 <= min_ngram <= max_ngram, (min_ngram, max_ngram)
        self.min_n, self.max_n = min_ngram, max_ngram
        self.depth = min(topology.max_depth, num_pred_tokens)
        self.width = len(topology.children[0])  # chain: 1 continuation; static: up to branching[0]
        self.budget = topology.n if budget is None else budget
        self.topology, self.num_pred = topology, num_pred_tokens
        self.buckets: tuple[int, ...] = tree_buckets(self.budget)
        """TreeBatch sizes: powers of two below the budget, then the budget."""
        self.rows: list[_Row | None] = [None] * rows
        self._topologies: dict[tuple[int, ...], TreeTopology] = {}  # one object per shape: its tensors are cached

    # ---- row lifecycle ---------------------------------------------------------------------------------
    def start(self, slot: int, tokens: Sequence[int], defer: bool = False) -> None:
        """A new request on row `slot`: index its prompt (always now: indexing is cheap; `defer` is ignored)."""
        row = self.rows[slot] = _Row()
        self._extend(row, tokens)

    def move(self, src: int, dst: int) -> None:
        """The request on row src now lives on row dst (dst's old state is dropped)."""
        if src != dst:
            self.rows[dst], self.rows[src] = self.rows[src], None

    def with_rows(self, rows: int) -> "PromptLookupDrafter":
        """The same settings for `rows` cache rows (no request state)."""
        return PromptLookupDrafter(self.topology, self.min_n, self.max_n, self.num_pred, rows, self.budget)

    # ---- drafting --------------------------------------------------------------------------------------
    def propose(self, rows: Sequence, max_depth: Sequence[int]) -> TreeBatch:
        """rows[b].tokens (prompt + emitted, the last is the root) and rows[b].slot; trees no deeper than
        max_depth[b]. Padded to the smallest bucket that holds the largest tree (1: no row matched)."""
        assert rows and len(rows) == len(max_depth), (len(rows), len(max_depth))
        topos, toks, provs = [], [], []
        for r, md in zip(rows, max_depth):
            row = self.rows[r.slot]
            assert row is not None, f"row {r.slot} has no request (start() it first)"
            self._extend(row, r.tokens)
            parents, t = self._trie(self._continuations(row, min(self.depth, md)), row.text[-1])
            topos.append(self._topology(parents))
            toks.append(t)
            provs.append([Provenance.root] + [Provenance.retrieved] * (len(t) - 1))
        bucket = self.buckets[bisect.bisect_left(self.buckets, max(t.n for t in topos))]
        return TreeBatch.build(topos, toks, provs, bucket)

    def _extend(self, row: _Row, tokens: Sequence[int]) -> None:
        """Append the tokens beyond row.text and index the occurrences whose continuation they complete."""
        text, L0 = row.text, len(row.text)
        assert len(tokens) >= L0 and (L0 == 0 or tokens[L0 - 1] == text[-1]), \
            f"tokens only grow between calls for a row (had {L0}, got {len(tokens)})"
        text.extend(tokens[L0:])
        D = self.depth
        if D == 0:
            return  # the plan's tree has no draft nodes: never looked up
        index, min_n, max_n, updates = row.index, self.min_n, self.max_n, 0
        for e in range(row.done, len(text) - D):  # occurrence ending at e, continuation text[e+1 : e+1+D]
            cont = tuple(text[e + 1:e + 1 + D])
            for n in range(min_n, min(max_n, e + 1) + 1):
                key = tuple(text[e - n + 1:e + 1])
                seen = index.get(key)
                if seen is None:
                    index[key] = {cont: e}
                else:
                    seen.pop(cont, None)  # re-insert: most recent last
                    seen[cont] = e
                updates += 1
        row.updates += updates
        row.done = max(row.done, len(text) - D)

    def _continuations(self, row: _Row, depth: int) -> list[tuple[int, ...]]:
        """Up to `width` distinct continuations of <= depth tokens: longest matching suffix n-gram first,
        most recent occurrence first."""
        text, L, D = row.text, len(row.text), self.depth
        conts: list[tuple[int, ...]] = []
        if depth <= 0 or self.width == 0:
            return conts
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            suffix = text[L - n:]
            for e in range(L - 2, max(L - D, n - 1) - 1, -1):  # recent occurrences, not yet in the index
                if text[e - n + 1:e + 1] == suffix:
                    cont = tuple(text[e + 1:e + 1 + depth])
                    if cont not in conts:
                        conts.append(cont)
                        if len(conts) == self.width:
                            return conts
            for cont in reversed(row.index.get(tuple(suffix), ())):  # distinct, most recent first
                cont = cont[:depth]  # shorter than D only in a request's last steps
                if cont not in conts:
                    conts.append(cont)
                    if len(conts) == self.width:
                        return conts
        return conts

    def _trie(self, conts: list[tuple[int, ...]], root: int) -> tuple[tuple[int, ...], list[int]]:
        """Merge continuations into a trie of <= budget nodes (children of a node are distinct tokens)."""
        parents, toks, index = [-1], [root], {}
        for cont in conts:
            node = 0
            for x in cont:
                if (node, x) not in index:
                    if len(parents) == self.budget:
                        break
                    index[(node, x)] = len(parents)
                    parents.append(node)
                    toks.append(x)
                node = index[(node, x)]
        return tuple(parents), toks

    def _topology(self, parents: tuple[int, ...]) -> TreeTopology:
        if len(parents) == 1:
            return TreeTopology.root_only()
        topo = self._topologies.get(parents)
        if topo is None:
            if len(self._topologies) >= _MAX_CACHED_TOPOLOGIES:
                self._topologies.clear()
            topo = self._topologies[parents] = TreeTopology(parents)
        return topo
