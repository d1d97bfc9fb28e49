"""Model proposers for the batched step: `propose(rows, max_depth) -> TreeBatch` over all rows at once.

- `NoDrafter`: root-only trees, so the step is a plain autoregressive step (the baseline runs the same step).
- `ModelDrafter`: an independent small causal LM (Llama or Mamba2 family) with its own cache, one row per
  engine row. Each step it first catches every row up on the tokens committed since its last step (one
  forward for the whole batch, ending at each row's root), then fills the plan's tree one level per
  forward for the whole batch (tree mask per row); children are the top-b picks (deterministic), i.i.d.
  samples, or samples without replacement (Gumbel-top-k) drawn by each request's own sampler, and the
  distribution they came from is kept for the verifier (`TreeBatch.draft_probs`). With a growth policy
  (`runtime.tree_policies`: dynamic / beam) each row's tree is grown at run time instead, one forward per
  round for all rows (`_propose_grown`).
- Prompt lookup (`runtime.lookup.PromptLookupDrafter`), the datastore drafter and the RASD fusion of a model
  drafter with either (`runtime.retrieval`) have the same interface; the fusion scores retrieval candidates
  with `ModelDrafter.path_logprobs` and passes the catch-up's root logits to `propose`.

Interface shared by all drafters: `start(slot, tokens, defer=False)` when a request is admitted to a row (its
prompt is prefilled now, or with `defer` at the row's first drafted step: a server whose policy may pick k = 0
pays for the drafter only when it drafts), `move(src, dst)` when the engine moves a request to another row, `propose(rows, max_depth)`
where `rows[b]` has `.tokens` (prompt + emitted; the last one is the root), `.slot` and `.sampler`, and
`max_depth[b]` caps row b's tree depth (the remaining budget). Drafters never see the target.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from runtime.batch import PAD, Block, TreeBatch
from runtime.transfer import on_host, to_device
from runtime.models.llama import KVCache
from runtime.sampling import ChildKind
from runtime.tree_policies import DynamicTree, Policy
from spec_compiler.tree import Provenance, TreeTopology, tree_buckets

PROVENANCE = {ChildKind.deterministic: Provenance.topk, ChildKind.iid: Provenance.iid, ChildKind.wor: Provenance.wor}


def bucket_for(buckets: Sequence[int], n: int) -> int:
    return next(b for b in buckets if b >= n)


class NoDrafter:
    def start(self, slot: int, tokens: list[int], defer: bool = False) -> None:
        pass

    def move(self, src: int, dst: int) -> None:
        pass

    def with_rows(self, rows: int) -> "NoDrafter":
        return self

    def propose(self, rows: Sequence, max_depth: Sequence[int]) -> TreeBatch:
        return TreeBatch.roots([r.tokens[-1] for r in rows])


class ModelDrafter:
    def __init__(self, model, topology: TreeTopology, capacity: int, child_kind: ChildKind, temperature: float,
                 target_vocab: int, rows: int = 1, s2t: torch.Tensor | None = None, kv_window: str = "live",
                 cache=None, policy: Policy = None):
        """`model`: a LlamaModel or Mamba2LMModel (same forward contract); `cache`: a prebuilt cache of `rows`
        rows and `capacity` slots, else model.new_cache(rows, capacity); `s2t`: [K] token id of each logit
        column when the model's head is trimmed (VocabTrim, runtime.models.llama.trim_lm_head), else None.
        `policy`: None grows the static `topology` level by level; a `runtime.tree_policies` policy (dynamic,
        beam) grows each row's tree at run time (then `topology` is unused; the cache needs
        policy.max_nodes + policy.per_round slots past the text, SSM scratch as many)."""
        assert topology.is_level_ordered, "drafting fills one level per forward"
        self.model, self.topology, self.kind = model, topology, ChildKind(child_kind)
        self.temperature, self.vocab, self.kv_window = temperature, target_vocab, kv_window
        self.device = next(model.parameters()).device
        self.cache = cache if cache is not None else model.new_cache(rows, capacity)
        self.cached = [0] * self.cache.rows  # row b: slots [0, cached[b]) hold the KV of tokens[0:cached[b]]
        self.s2t = s2t.cpu() if s2t is not None else None
        self.policy = policy
        self.buckets = tree_buckets(topology.n if policy is None else policy.max_nodes)
        self.resident = not on_host(self.device)
        """Top-b static trees keep their tokens on the device (`_propose_resident`; on the CPU a test sets it to
        run the same path)."""
        self.catch_up_limit = topology.max_depth if policy is None else policy.max_depth
        """Tokens behind the root a row may be and still catch up in the batched forward: a step commits at most
        the deepest tree verified (this drafter's; a fusion with retrieval raises it to its own), so a longer gap
        means steps that did not draft (deferred start, serving k = 0, retrieval-only steps); such a row is
        prefilled alone first (`_prefill`) instead of padding every row of the batch to its gap."""

    @property
    def prov(self) -> Provenance:
        """How this drafter's children are made."""
        return PROVENANCE[self.kind]

    def _kv_len(self, need: int) -> int:
        return need if self.kv_window == "live" else self.cache.capacity

    # ---- rows ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def start(self, slot: int, tokens: list[int], defer: bool = False) -> None:
        """Prefill the prompt up to (not including) the root; the first step catches up on the root. defer: leave
        the row empty; the row's first drafted step prefills it (`_catch_up`), so steps that draft nothing
        (serving k = 0) cost no drafter forward at all."""
        self.cached[slot] = 0
        if not defer:
            self._prefill(slot, tokens)

    def _prefill(self, slot: int, tokens: list[int]) -> None:
        """Causal forward over tokens[cached:-1] of row `slot` (everything before the root)."""
        lo, hi = self.cached[slot], len(tokens) - 1
        if hi > lo:
            block = Block.causal(lo, hi - lo, 1, self._kv_len(hi), device=self.device)
            self.model.hidden(to_device(torch.tensor([tokens[lo:hi]]), self.device), block.positions,
                              self.cache.view_rows(slot, slot + 1), block, num_rows=0)
            self.cached[slot] = hi

    def move(self, src: int, dst: int) -> None:
        self.cache.copy_row(src, dst)
        self.cached[dst] = self.cached[src]

    def with_rows(self, rows: int) -> "ModelDrafter":
        """The same model and tree with a cache of `rows` rows (like this one's: same slots and scratch)."""
        cache = self.model.new_cache(rows, self.cache.capacity, **(
            {"num_scratch": self.cache.num_scratch} if hasattr(self.cache, "num_scratch") else {}))
        out = ModelDrafter(self.model, self.topology, self.cache.capacity, self.kind, self.temperature, self.vocab,
                           rows, self.s2t, self.kv_window, cache, self.policy)
        out.resident = self.resident
        return out

    # ---- drafting ------------------------------------------------------------------------------------
    def _probs(self, logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """[..., Vd] logits -> [..., V] float64 proposal over target ids (zero for ids the drafter's head lacks:
        beyond its vocabulary, or trimmed away), at the drafter's temperature unless given."""
        p = torch.softmax(logits.to(torch.float64) / (temperature or self.temperature), dim=-1).cpu()
        if self.s2t is not None:
            return torch.zeros(*p.shape[:-1], self.vocab, dtype=torch.float64).index_copy_(-1, self.s2t, p)
        if p.shape[-1] < self.vocab:
            p = torch.nn.functional.pad(p, (0, self.vocab - p.shape[-1]))
        return p

    def _top(self, logits: torch.Tensor, k: int, temperature: float | None) -> tuple[list, list]:
        """[B, m, Vd] logits -> the k most likely children per node, as nested lists [B][m][k] of (probability
        at `temperature` (None: the drafter's), target token id), descending."""
        lp = torch.log_softmax(logits.to(torch.float64) / (temperature or self.temperature), dim=-1)
        top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        ids = top.indices.cpu()
        return top.values.exp().tolist(), (ids if self.s2t is None else self.s2t[ids]).tolist()

    def pending_prefill(self, rows: Sequence) -> list[int]:
        """Tokens each row's next drafted step prefills alone before the batched catch-up (`_catch_up`): a row not
        started yet (deferred) or further behind than `catch_up_limit`; 0 for the others. The serving policy
        charges this to speculating (serve/smartspec.py)."""
        out = []
        for r in rows:
            behind = len(r.tokens) - 1 - self.cached[r.slot]
            out.append(behind if behind > 0 and (self.cached[r.slot] == 0 or behind > self.catch_up_limit) else 0)
        return out

    def _catch_up(self, rows: Sequence) -> torch.Tensor:
        """Every row's tokens since its last step (ending with its root) in one forward -> root logits [B, Vd]."""
        B = len(rows)
        for r, pending in zip(rows, self.pending_prefill(rows)):  # not started (deferred), or behind by steps
            if pending:                                             # that did not draft
                self._prefill(r.slot, r.tokens)
        news = [r.tokens[self.cached[r.slot]:] for r in rows]
        cached = [self.cached[r.slot] for r in rows]
        view = self.cache.view_rows(0, B)
        if B == 1 and isinstance(self.cache, KVCache):  # attention only: a causal block is the same arithmetic
            n = len(news[0])
            block = Block.causal(cached[0], n, 1, self._kv_len(cached[0] + n), device=self.device)
            h = self.model.hidden(to_device(torch.tensor(news), self.device), block.positions, view, block, num_rows=1)
            self.cached[rows[0].slot] = len(rows[0].tokens)
            return self.model.logits(h[:, 0])
        # Chains padded to the longest, committed up to each row's root. An SSM model takes this path at batch 1
        # too (a causal block runs its chunked scan, another algorithm), so a row drafts the same in any batch.
        topos = [TreeTopology.chain(len(x) - 1) for x in news]
        T = max(len(x) for x in news)
        provs = [[Provenance.root] + [Provenance.topk] * (len(x) - 1) for x in news]
        chains = TreeBatch.build(topos, news, provs, T)
        block = Block.tree(torch.tensor(cached), chains, self._kv_len(max(cached) + T), device=self.device)
        h = self.model.hidden(to_device(chains.tokens, self.device), block.positions, view, block)  # [B, T, E]
        last = to_device(torch.tensor([len(x) - 1 for x in news]), self.device)
        logits = self.model.logits(h[torch.arange(B, device=self.device), last])
        self.cache.commit(cached, [list(range(len(x))) for x in news])
        for r in rows:
            self.cached[r.slot] = len(r.tokens)
        return logits  # [B, Vd]

    def columns(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logit column of each target id (-1: the trimmed head lacks it; ids beyond the head stay as they
        are, for the caller to bound by the logits' width)."""
        if self.s2t is None:
            return tokens
        if getattr(self, "_t2s", None) is None:
            self._t2s = torch.full((self.vocab,), -1, dtype=torch.long)
            self._t2s[self.s2t] = torch.arange(len(self.s2t))
        return self._t2s[tokens.clamp(0, self.vocab - 1)]

    @torch.inference_mode()
    def path_logprobs(self, rows: Sequence, tree: TreeBatch, root_logits: torch.Tensor) -> list[list[float]]:
        """Log-probability of every node's root path under the draft model (its drafting temperature), for
        trees drafted elsewhere (retrieval candidates): one forward over nodes 1..T-1 of every row, the root
        committed by the catch-up that gave `root_logits` [B, Vd]. A token the head lacks (beyond its
        vocabulary, trimmed away) counts as probability 1e-12, so such nodes rank last rather than vanish.
        Returns [B][n_b] (root: 0.0). Leaves the committed state alone."""
        B, T = tree.B, tree.T
        cached = torch.tensor([self.cached[r.slot] for r in rows])  # the root sits at slot cached - 1
        logits = root_logits[:, None]  # [B, 1, Vd]
        if T > 1:
            block = Block.tree(cached, tree, self._kv_len(int(cached.max()) + T - 1), 1, T, base=cached - 1,
                               device=self.device)
            view = self.cache.view_rows(0, B)
            logits = torch.cat([logits, self.model(tree.tokens[:, 1:].to(self.device), block.positions, view,
                                                   block)], 1)  # [B, T, Vd]: distribution at each node
        logp = torch.log_softmax(logits.to(torch.float64) / self.temperature, -1).cpu()
        Vd = logp.shape[-1]
        col = self.columns(tree.tokens)
        par = tree.parents.clamp(min=0)
        ok = (col >= 0) & (col < Vd)
        cond = logp[torch.arange(B)[:, None], par, col.clamp(0, Vd - 1)]  # [B, T]: log p(node | its parent's path)
        cond = torch.where(ok, cond.clamp(min=math.log(1e-12)), math.log(1e-12)).tolist()
        out = []
        for b, topo in enumerate(tree.topologies):
            lp = [0.0] * topo.n
            for i in range(1, topo.n):
                lp[i] = lp[topo.parents[i]] + cond[b][i]
            out.append(lp)
        return out

    @torch.inference_mode()
    def propose(self, rows: Sequence, max_depth: Sequence[int], root_logits: torch.Tensor | None = None) -> TreeBatch:
        """root_logits [B, Vd]: the rows were already caught up (`_catch_up`) and these are its logits."""
        if self.policy is not None:
            assert root_logits is None, "retrieval fusion with grown trees is refused at validation"
            return self._propose_grown(rows, max_depth)
        B = len(rows)
        depth = min(self.topology.max_depth, max(max_depth))
        if depth <= 0:
            return TreeBatch.roots([r.tokens[-1] for r in rows])
        topo = self.topology.truncate(depth)
        logits = (self._catch_up(rows) if root_logits is None else root_logits)[:, None]  # [B, 1, Vd]: the root level
        cached = torch.tensor([self.cached[r.slot] for r in rows])  # the root sits at slot cached - 1
        n = topo.n
        toks = torch.zeros(B, n, dtype=torch.long)
        toks[:, 0] = torch.tensor([r.tokens[-1] for r in rows])
        keep = [[True] + [False] * (n - 1) for _ in range(B)]
        provs = [Provenance.root] + [self.prov] * (n - 1)
        full = TreeBatch.build([topo] * B, toks.tolist(), [provs] * B, n)
        full.tokens = toks  # filled level by level below
        # Sampled children need the distribution they came from (the verifier's proposal); top-b children
        # need only the ranking, so they skip the fp64 softmax over the vocabulary.
        sampled = self.kind is not ChildKind.deterministic
        if self.resident and not sampled and max(map(len, topo.children)) <= logits.shape[-1]:
            return self._propose_resident(max_depth, topo, depth, logits, cached, toks, full)
        probs = torch.zeros(B, n, self.vocab, dtype=torch.float64) if sampled else None
        view = self.cache.view_rows(0, B)
        for d, level in enumerate(topo.levels[:-1]):
            if sampled:
                p_level = self._probs(logits)  # [B, m, V]: distributions at the nodes of this level
                probs[:, level[0]:level[-1] + 1] = p_level
            else:
                width = min(max(len(topo.children[node]) for node in level), logits.shape[-1])
                top = torch.topk(logits, width, dim=-1).indices.cpu()  # [B, m, width] columns
                top = (top if self.s2t is None else self.s2t[top]).tolist()  # token ids
            for b in range(B):
                if d >= max_depth[b]:
                    continue  # row b's tree ends above: draw nothing for it (its sampler stays where it would alone)
                for j, node in enumerate(level):
                    kids = topo.children[node]
                    if not kids or not keep[b][node]:
                        continue
                    picked = rows[b].sampler.children(p_level[b, j], len(kids), self.prov) if sampled \
                        else top[b][j][:len(kids)]
                    for c, x in zip(kids, picked):
                        toks[b, c] = x
                        keep[b][c] = True
            if d + 1 == len(topo.levels) - 1:
                break  # the last level's distributions are not needed
            lo, hi = topo.levels[d + 1][0], topo.levels[d + 1][-1] + 1  # a contiguous id range (level ordered)
            block = Block.tree(cached, full, self._kv_len(int(cached.max()) + hi - 1), lo, hi, base=cached - 1,
                               device=self.device)
            logits = self.model(toks[:, lo:hi].to(self.device), block.positions, view, block)  # [B, hi-lo, Vd]

        if depth == self.topology.max_depth and all(m >= depth for m in max_depth) and all(all(k) for k in keep):
            full.draft_probs = probs  # every row kept the whole plan tree: it is the batch (bucket topo.n)
            return full
        subs, sub_toks, sub_provs, kept_rows = [], [], [], []
        for b in range(B):
            t = topo if max_depth[b] >= depth else topo.truncate(max(0, max_depth[b]))
            kept = [i for i in range(t.n) if keep[b][i]]
            sub = t.select(kept)
            subs.append(sub)
            kept_rows.append(kept)
            sub_toks.append(toks[b, kept].tolist())
            sub_provs.append([provs[i] for i in kept])
        T = bucket_for(self.buckets, max(s.n for s in subs))
        dp = None
        if sampled:
            dp = torch.zeros(B, T, self.vocab, dtype=torch.float64)
            for b, kept in enumerate(kept_rows):
                dp[b, :len(kept)] = probs[b, kept]
        return TreeBatch.build(subs, sub_toks, sub_provs, T, dp)

    def _level_index(self, topo: TreeTopology, d: int):
        """(child ids, parent's index in level d, rank among its siblings) of level d + 1's nodes as device
        tensors, and the top-k width level d needs (cached per drafter and topology: a static tree asks for the
        same ones every step)."""
        cache = self.__dict__.setdefault("_level_cache", {})
        key = (topo.parents, d)
        if key not in cache:
            cids, js, ranks = [], [], []
            for j, node in enumerate(topo.levels[d]):
                for r, c in enumerate(topo.children[node]):
                    cids.append(c)
                    js.append(j)
                    ranks.append(r)
            width = max(ranks, default=-1) + 1
            cache[key] = tuple(to_device(torch.tensor(x, dtype=torch.long), self.device) for x in (cids, js, ranks)) \
                + (width,)
        return cache[key]

    def _propose_resident(self, max_depth: Sequence[int], topo: TreeTopology, depth: int, logits: torch.Tensor,
                          cached: torch.Tensor, toks: torch.Tensor, full: TreeBatch):
        """`propose` for top-b children with the tokens kept on the device: each level's top-b columns are scattered
        into the level's child slots by index and fed to the next level's forward, nothing read on the host (a
        GPU step then synchronises once, when the engine reads the accepted tokens). The same children as the
        host walk: top-b needs no sampler, so rows whose budget ends above a level are drafted there too and
        cut afterwards (a truncated level-ordered tree keeps a prefix of the node ids)."""
        B, n = toks.shape
        dev = self.device
        if self.s2t is not None and getattr(self, "_s2t_dev", None) is None:
            self._s2t_dev = to_device(self.s2t, dev)
        toks_dev = to_device(toks, dev)
        view = self.cache.view_rows(0, B)
        for d in range(len(topo.levels) - 1):
            cids, js, ranks, width = self._level_index(topo, d)
            top = torch.topk(logits, width, dim=-1).indices  # [B, m, width] columns
            if self.s2t is not None:
                top = self._s2t_dev[top]
            toks_dev[:, cids] = top[:, js, ranks]
            if d + 1 == len(topo.levels) - 1:
                break
            lo, hi = topo.levels[d + 1][0], topo.levels[d + 1][-1] + 1
            block = Block.tree(cached, full, self._kv_len(int(cached.max()) + hi - 1), lo, hi, base=cached - 1,
                               device=dev)
            logits = self.model(toks_dev[:, lo:hi], block.positions, view, block)  # [B, hi-lo, Vd]
        if depth == self.topology.max_depth and all(m >= depth for m in max_depth):
            full.tokens = toks_dev
            return full
        subs = [topo if m >= depth else topo.truncate(max(0, m)) for m in max_depth]
        T = bucket_for(self.buckets, max(s.n for s in subs))
        tree = TreeBatch.build(subs, [[0] * s.n for s in subs], [[Provenance.root] + [self.prov] * (s.n - 1)
                                                                  for s in subs], T)
        if T > n:
            toks_dev = torch.nn.functional.pad(toks_dev, (0, T - n))
        tree.tokens = toks_dev[:, :T] * to_device(tree.valid, dev)  # 0 at padding, as TreeBatch.build writes
        return tree

    def _propose_grown(self, rows: Sequence, max_depth: Sequence[int]) -> TreeBatch:
        """Trees grown at run time by `self.policy` (runtime.tree_policies): rounds of (feed the last round's
        new nodes in one forward for all rows; each row's policy picks its next nodes) until no row grows.
        Row b's nodes keep their creation ids, at slot cached_b - 1 + id; a round's new nodes are a contiguous
        id range per row (`Block.tree_ranges`), padded to the round's widest row."""
        B = len(rows)
        caps = [min(m, self.policy.max_nodes - 1) for m in max_depth]
        if max(caps) <= 0:
            return TreeBatch.roots([r.tokens[-1] for r in rows])
        sampled = self.kind is not ChildKind.deterministic
        ranked = not sampled and isinstance(self.policy, DynamicTree)  # top-k children need only their ranking
        grown = [self.policy.start(r.tokens[-1], c, r.sampler, sampled) for r, c in zip(rows, caps)]
        N = self.policy.max_nodes + self.policy.per_round  # ids a round may touch (real nodes + one round of padding)
        toks = torch.zeros(B, N, dtype=torch.long)
        toks[:, 0] = torch.tensor([r.tokens[-1] for r in rows])
        parents = torch.full((B, N), -1, dtype=torch.long)
        depth = torch.zeros(B, N, dtype=torch.long)
        anc = torch.eye(N, dtype=torch.bool).repeat(B, 1, 1)
        prov = torch.full((B, N), PAD, dtype=torch.int8)
        prov[:, 0] = int(Provenance.root)
        probs = torch.zeros(B, N, self.vocab, dtype=torch.float64) if sampled else None
        logits = self._catch_up(rows)[:, None]  # [B, 1, Vd]: the root
        cached = torch.tensor([self.cached[r.slot] for r in rows])  # the root sits at slot cached - 1
        fed = [[0] for _ in range(B)]
        view = self.cache.view_rows(0, B)
        while True:
            if logits is None:
                p = None
            elif ranked:  # ([B, m, K] probabilities, [B, m, K] token ids) of the K most likely children
                p = self._top(logits, self.policy.num_nodes - 1, self.policy.value_temperature)
            else:
                p = self._probs(logits)  # [B, m, V]: distributions at the nodes just fed
            feed: list[list[int]] = []
            grew = False
            for b, g in enumerate(grown):
                for j, node in enumerate(fed[b]):
                    if sampled:
                        probs[b, node] = p[b, j]
                    g.feed(node, probs[b, node] if sampled else (p[0][b][j], p[1][b][j]) if ranked else p[b, j])
                new = g.grow()
                grew |= bool(new)
                for c in new:
                    par = g.parents[c]
                    toks[b, c], parents[b, c], depth[b, c] = g.tokens[c], par, g.depth[c]
                    anc[b, c] = anc[b, par]
                    anc[b, c, c] = True
                    prov[b, c] = int(g.provs[c])
                want = [i for i, c in enumerate(new) if g.wants(c)]
                feed.append(new[want[0]:want[-1] + 1] if want else [])  # contiguous: the next forward's range
            if not grew:
                break
            fed = feed
            width = max(len(f) for f in feed)
            if width == 0:  # nothing to feed, but rows may still add siblings of fed nodes
                logits = None
                continue
            lo = torch.tensor([f[0] if f else g.n for f, g in zip(feed, grown)])
            work = TreeBatch([], toks, parents, depth, anc, prov)
            block = Block.tree_ranges(cached, work, self._kv_len(int(cached.max()) + N - 1), lo, width,
                                      base=cached - 1, device=self.device)
            ids = lo[:, None] + torch.arange(width)[None]
            logits = self.model(toks.gather(1, ids).to(self.device), block.positions, view, block)  # [B, width, Vd]
        n = max(g.n for g in grown)
        T = bucket_for(self.buckets, n)
        return TreeBatch([TreeTopology(tuple(g.parents)) for g in grown], toks[:, :T].clone(), parents[:, :T].clone(),
                         depth[:, :T].clone(), anc[:, :T, :T].clone(), prov[:, :T].clone(),
                         None if probs is None else probs[:, :T].clone())
