"""Retrieval drafting (ALGORITHMS.md §3): a datastore drafter (REST) and the RASD fusion of a model drafter with
any retrieval drafter. Both have the drafter interface of runtime/drafters.py.

- `DatastoreDrafter`: per row, the trie of the most frequent continuations of the longest context suffix found
  in a `runtime.datastore.Datastore` (every node `Provenance.retrieved`). Stateless across steps.
- Context retrieval is `runtime.lookup.PromptLookupDrafter` (the request's own text); `drafter=prompt_lookup`
  and `retrieval=context drafter=none` are that one implementation with different settings.
- `FusedDrafter` (RASD), one step for all rows:
    1. the retrieval drafter's candidate trees (up to `num_candidates` nodes per row);
    2. the model drafter's catch-up (root logits) and the candidates' scores: `prune="path"`, one draft-model
       forward over every row's candidate tree, each node's path log-probability
       (`ModelDrafter.path_logprobs`); `prune="root"`, no forward: the draft model's root probability of
       the node's first token, then its count rank (`root_logprobs`);
    3. pruning: per row the `max_nodes` candidates of highest score (closed under parents: a path's
       probability never exceeds its prefix's, a child ranks after its parent; ties go to the shallower node);
    4. the model's own tree, grown from the same root logits;
    5. fusion by longest-prefix trie insertion: each kept candidate walks down from its parent's fused node and
       merges into a child with its token, or becomes a new child there. Nodes are renumbered breadth first
       with every node's children in the order *drafted first (the model's order), retrieved-only after (in
       candidate order)*.

`skip_model_after` (off by default): after a step that emitted a long run, the next step drafts from
retrieval alone (no draft-model forward; the model catches up on the skipped tokens in its next forward). The
choice depends on the history only, never on the step's own draws or target.

Exactness at temperature > 0 (§0.3, §3.3): a merged node, both drafted and retrieved, keeps the drafter's
provenance (topk / iid / wor): it was drawn from the drafter's law whatever retrieval proposed, so (a) holds
for it; a retrieved-only child is δ(x), tried after every drafted sibling, and whether it exists depends only
on the context, the draft model's probabilities (not its samples) and the tokens of the drafted siblings
before it, so (b) holds. Once the drafted siblings are rejected the residual is zero on their tokens, which is
why a retrieved duplicate needs no step of its own. Nothing is trimmed after sampling: the fused tree has at
most topology.n + max_nodes nodes. Proven by exact enumeration in tests/runtime/test_retrieval_exact.py.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch

from runtime.batch import TreeBatch
from runtime.datastore import Datastore
from spec_compiler.tree import Provenance, TreeTopology, tree_buckets

RETRIEVED = int(Provenance.retrieved)


class DatastoreDrafter:
    def __init__(self, store: Datastore, min_ngram: int, max_ngram: int, cont_len: int, max_candidates: int,
                 max_nodes: int):
        """Trees of at most max_nodes retrieved nodes (root excluded), cont_len deep, max_candidates leaves."""
        self.store, self.min_n, self.max_n = store, min_ngram, max_ngram
        self.cont_len, self.max_candidates, self.max_nodes = cont_len, max_candidates, max_nodes
        self.buckets = tree_buckets(max_nodes + 1)
        self._topologies: dict[tuple[int, ...], TreeTopology] = {}

    def start(self, slot: int, tokens: list[int], defer: bool = False) -> None:
        pass

    def move(self, src: int, dst: int) -> None:
        pass

    def with_rows(self, rows: int) -> "DatastoreDrafter":
        return self

    def propose(self, rows: Sequence, max_depth: Sequence[int]) -> TreeBatch:
        topos, toks, provs = [], [], []
        for r, md in zip(rows, max_depth):
            parents, tokens, _ = self.store.candidates(r.tokens, self.min_n, self.max_n, min(self.cont_len, md),
                                                       self.max_candidates, self.max_nodes)
            key = (-1, *parents)
            topo = self._topologies.get(key)
            if topo is None:
                topo = self._topologies[key] = TreeTopology(key) if parents else TreeTopology.root_only()
                if len(self._topologies) > 4096:
                    self._topologies.clear()
            topos.append(topo)
            toks.append([r.tokens[-1], *tokens])
            provs.append([Provenance.root] + [Provenance.retrieved] * len(tokens))
        bucket = self.buckets[bisect.bisect_left(self.buckets, max(t.n for t in topos))]
        return TreeBatch.build(topos, toks, provs, bucket)


def prune(tree: TreeBatch, logp: list[list[float]], max_nodes: int) -> list[list[int]]:
    """Per row, the kept node ids (ascending, root included): the max_nodes non-root nodes of highest path
    log-probability, ties to the shallower then lower id, so every kept node's parent is kept."""
    out = []
    for b, topo in enumerate(tree.topologies):
        lp, depth = logp[b], topo.depth
        best = sorted(range(1, topo.n), key=lambda i: (-lp[i], depth[i], i))[:max_nodes]
        out.append([0] + sorted(best))
    return out


def fuse(model: TreeBatch, cand: TreeBatch, keep: list[list[int]], buckets: Sequence[int],
         topologies: dict | None = None) -> TreeBatch:
    """The model's trees with each row's kept candidates inserted by longest-prefix matching (module docstring),
    renumbered breadth first, drafted children before retrieved-only ones; padded to a bucket. topologies: a
    cache of TreeTopology objects by parents (their derived tensors are cached on them)."""
    topologies = {} if topologies is None else topologies
    B = model.B
    mtoks, mprov = model.tokens.tolist(), model.provenance.tolist()
    ctoks = cand.tokens.tolist()
    topos, toks, provs, src = [], [], [], []
    for b in range(B):
        mt = model.topologies[b]
        parents, tokens, prov = list(mt.parents), mtoks[b][:mt.n], mprov[b][:mt.n]
        kids = [list(c) for c in mt.children]
        child = {}  # (fused parent, token) -> the first such child
        for i in range(1, mt.n):
            child.setdefault((parents[i], tokens[i]), i)
        where = {0: 0}  # candidate node -> fused node
        ct = cand.topologies[b]
        for i in keep[b][1:]:
            p, x = where[ct.parents[i]], ctoks[b][i]
            j = child.get((p, x))
            if j is None:
                j = child[(p, x)] = len(tokens)
                parents.append(p)
                tokens.append(x)
                prov.append(RETRIEVED)
                kids[p].append(j)
                kids.append([])
            where[i] = j
        order, new = [0], {0: 0}  # breadth first; children already in drafted-then-retrieved order
        for node in order:
            for c in kids[node]:
                new[c] = len(order)
                order.append(c)
        key = tuple(-1 if i == 0 else new[parents[i]] for i in order)
        topo = topologies.get(key)
        if topo is None:
            if len(topologies) > 4096:
                topologies.clear()
            topo = topologies[key] = TreeTopology(key)
        topos.append(topo)
        toks.append([tokens[i] for i in order])
        provs.append([prov[i] for i in order])
        src.append([i if i < mt.n else -1 for i in order])  # the model node each fused node is, or -1
    T = buckets[bisect.bisect_left(buckets, max(t.n for t in topos))]
    dp = None
    if model.draft_probs is not None:
        dp = torch.zeros(B, T, model.draft_probs.shape[-1], dtype=model.draft_probs.dtype)
        for b, s in enumerate(src):
            ids = [k for k, i in enumerate(s) if i >= 0]
            dp[b, ids] = model.draft_probs[b, [s[k] for k in ids]]
    return TreeBatch.build(topos, toks, provs, T, dp)


def root_logprobs(model, tree: TreeBatch, root_logits: torch.Tensor) -> list[list[float]]:
    """`prune="root"` scores: log(count-rank weight) + log p_root(the path's first token), with p_root the draft
    model's root distribution (no forward). Candidates come best first (descending count), so a node's rank
    stands in for its count; a child ranks after its parent, which keeps the kept set closed."""
    logp = torch.log_softmax(root_logits.to(torch.float64) / model.temperature, -1).cpu()  # [B, Vd]
    Vd = logp.shape[-1]
    out = []
    cols = model.columns(tree.tokens)  # [B, T] logit column of each node's token
    for b, topo in enumerate(tree.topologies):
        first = [0] * topo.n  # the depth-1 ancestor of each node
        for i in range(1, topo.n):
            first[i] = i if topo.parents[i] == 0 else first[topo.parents[i]]
        c = cols[b, first]
        lp = torch.where((c >= 0) & (c < Vd), logp[b, c.clamp(0, Vd - 1)], math.log(1e-12)).tolist()
        out.append([0.0] + [lp[i] - 1e-6 * i for i in range(1, topo.n)])  # the rank breaks ties
    return out


class FusedDrafter:
    def __init__(self, model, retrieval, max_nodes: int, prune: str = "root", skip_model_after: int = 0):
        """model: a runtime.drafters.ModelDrafter; retrieval: a retrieval drafter (DatastoreDrafter or
        PromptLookupDrafter) whose trees are the candidates; max_nodes: retrieved nodes kept after pruning;
        prune: "path" (path probability, one drafter forward) or "root" (`root_logprobs`, no forward);
        skip_model_after: when every row's previous step emitted at least this many tokens and retrieval has
        candidates, the step drafts from retrieval alone (the max_nodes best-ranked candidates) and the model
        catches up at its next forward (0 = never). It looks only at the history, never at this step's target."""
        self.model, self.retrieval, self.max_nodes, self.prune = model, retrieval, max_nodes, prune
        self.skip_model_after = skip_model_after
        self.buckets = tree_buckets(model.topology.n + max_nodes)
        self._topologies: dict[tuple[int, ...], TreeTopology] = {}
        self.seen = [0] * len(model.cached)  # per row: its token count at the previous step (0: none yet)
        # a fused step may commit a retrieved chain of up to max_nodes tokens: the model catches up on it batched
        model.catch_up_limit = max(model.catch_up_limit, max_nodes)

    def pending_prefill(self, rows) -> list[int]:
        """The model drafter's (`ModelDrafter.pending_prefill`): retrieval needs no prefill."""
        return self.model.pending_prefill(rows)

    def start(self, slot: int, tokens: list[int], defer: bool = False) -> None:
        self.model.start(slot, tokens, defer)
        self.retrieval.start(slot, tokens)
        self.seen[slot] = 0

    def move(self, src: int, dst: int) -> None:
        self.model.move(src, dst)
        self.retrieval.move(src, dst)
        self.seen[dst] = self.seen[src]

    def with_rows(self, rows: int) -> "FusedDrafter":
        return FusedDrafter(self.model.with_rows(rows), self.retrieval.with_rows(rows), self.max_nodes, self.prune,
                            self.skip_model_after)

    @torch.inference_mode()
    def propose(self, rows: Sequence, max_depth: Sequence[int]) -> TreeBatch:
        if max(max_depth) <= 0:
            return TreeBatch.roots([r.tokens[-1] for r in rows])
        cand = self.retrieval.propose(rows, max_depth)
        g = self.skip_model_after
        streak = g > 0 and cand.T > 1 and all(self.seen[r.slot] and len(r.tokens) - self.seen[r.slot] >= g
                                              for r in rows)
        for r in rows:
            self.seen[r.slot] = len(r.tokens)
        if streak:  # retrieval alone: candidates come best first, so the first max_nodes are closed under parents
            keep = [list(range(min(t.n, self.max_nodes + 1))) for t in cand.topologies]
            return fuse(TreeBatch.roots([r.tokens[-1] for r in rows]), cand, keep, self.buckets, self._topologies)
        root_logits = self.model._catch_up(rows)  # [B, Vd]
        if cand.T > 1:
            score = self.model.path_logprobs(rows, cand, root_logits) if self.prune == "path" else \
                root_logprobs(self.model, cand, root_logits)
            keep = prune(cand, score, self.max_nodes)
        else:
            keep = [[0]] * len(rows)
        tree = self.model.propose(rows, max_depth, root_logits=root_logits)
        if all(len(k) == 1 for k in keep):
            return tree
        return fuse(tree, cand, keep, self.buckets, self._topologies)
