"""Proposers behind one small interface: `propose(tokens, max_depth, gen) -> DraftTree`.

- `NoDrafter`: root only, so the step is a plain autoregressive step (the baseline runs the same loop).
- `ModelDrafter`: an independent small causal LM with its own KV cache. Each step it first catches up
  on the tokens committed since the last step (one causal forward that ends at the root), then fills
  the tree one level per forward with a tree mask; children are top-b picks (deterministic), i.i.d.
  samples, or samples without replacement (Gumbel-top-k), and the distribution they came from is kept
  for the verifier.
- `PromptLookupDrafter`: n-gram match of the text's suffix against earlier text (PLD); the
  continuations after the most recent matches form a chain or a trie (deterministic children).

Drafters never see the target; the decode loop passes `max_depth` so drafts never run past a limit.
"""
from __future__ import annotations

import torch

from runtime.models.llama import LlamaModel
from runtime.sampling import ChildKind
from spec_compiler.tree import DraftTree, TreeTopology


class NoDrafter:
    def reset(self) -> None:
        pass

    def propose(self, tokens: list[int], max_depth: int, gen: torch.Generator | None) -> DraftTree:
        return DraftTree.root_only(tokens[-1])


class ModelDrafter:
    def __init__(self, model: LlamaModel, topology: TreeTopology, capacity: int, child_kind: ChildKind,
                 temperature: float, target_vocab: int, cache=None, s2t: torch.Tensor | None = None):
        """`model`: a LlamaModel or Mamba2LMModel (same forward contract); `cache`: a prebuilt cache of
        `capacity` slots, else model.new_cache(1, capacity); `s2t`: [K] token id of each logit column when
        the model's head is trimmed (VocabTrim, runtime.models.llama.trim_lm_head), else None."""
        assert topology.is_level_ordered, "drafting fills one level per forward"
        self.model, self.topology, self.kind = model, topology, child_kind
        self.temperature, self.vocab = temperature, target_vocab
        self.device = next(model.parameters()).device
        self.cache = cache if cache is not None else model.new_cache(1, capacity)
        self.cached = 0  # slots [0, cached) hold the KV of tokens[0:cached]
        self.s2t = s2t.cpu() if s2t is not None else None

    def reset(self) -> None:
        self.cached = 0

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[m, Vd] logits -> [m, V] float64 proposal over target ids (zero for ids the drafter's head lacks:
        beyond its vocabulary, or trimmed away)."""
        p = torch.softmax(logits.to(torch.float64) / self.temperature, dim=-1).cpu()
        if self.s2t is not None:
            return torch.zeros(p.shape[0], self.vocab, dtype=torch.float64).index_copy_(1, self.s2t, p)
        if p.shape[-1] < self.vocab:
            p = torch.nn.functional.pad(p, (0, self.vocab - p.shape[-1]))
        return p

    def _children(self, p: torch.Tensor, b: int, gen: torch.Generator | None) -> list[int]:
        """b sampled child tokens from one [V] distribution, in generation order (fewer if p's support is
        smaller): i.i.d., or without replacement."""
        b = min(b, int((p > 0).sum()))
        if self.kind is ChildKind.iid:
            return torch.multinomial(p, b, replacement=True, generator=gen).tolist()
        u = torch.rand(p.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        keys = torch.log(p) - torch.log(-torch.log(u))  # Gumbel-top-k: an ordered sample without replacement
        return torch.topk(keys, b).indices.tolist()

    @torch.no_grad()
    def propose(self, tokens: list[int], max_depth: int, gen: torch.Generator | None) -> DraftTree:
        topo = self.topology.truncate(max_depth) if max_depth < self.topology.max_depth else self.topology
        if topo.n == 1:
            return DraftTree.root_only(tokens[-1])
        # catch up: tokens[cached:] (ending with the root) in one causal forward
        new = torch.tensor([tokens[self.cached:]], device=self.device)
        pos = torch.arange(self.cached, len(tokens), device=self.device)[None]
        logits = self.model(new, pos, self.cache, self.cached, num_logits=1)[0]
        self.cached = len(tokens)
        L = self.cached - 1  # the root's slot; node i sits at slot L + i

        n = topo.n
        toks, keep = [tokens[-1]] + [0] * (n - 1), [True] + [False] * (n - 1)
        # Sampled children need the distribution they came from (the verifier's proposal); top-b children
        # need only the ranking, so they skip the fp64 softmax over the vocabulary (DraftTree.draft_probs None).
        sampled = self.kind is not ChildKind.deterministic
        probs = torch.zeros(n, self.vocab, dtype=torch.float64) if sampled else None
        anc = topo.ancestor_mask(self.device)
        for d, level in enumerate(topo.levels):
            if sampled:
                p_level = self._probs(logits)  # distributions at the nodes of this level
            else:
                width = min(max(len(topo.children[node]) for node in level), logits.shape[-1])
                top = torch.topk(logits, width, dim=-1).indices.cpu() if width else None  # [m, width] columns
                top = (top if self.s2t is None else self.s2t[top]).tolist() if width else None  # token ids
            for j, node in enumerate(level):
                kids = topo.children[node]
                if sampled:
                    probs[node] = p_level[j]
                if not kids or not keep[node]:
                    continue
                picked = self._children(p_level[j], len(kids), gen) if sampled else top[j][:len(kids)]
                for c, x in zip(kids, picked):
                    toks[c], keep[c] = x, True
            if d + 1 == len(topo.levels) - 1:
                break  # the last level's distributions are not needed
            nxt = topo.levels[d + 1]
            lo, hi = nxt[0], nxt[-1] + 1  # a contiguous id range (level ordered)
            mask = torch.zeros(hi - lo, L + hi, dtype=torch.bool, device=self.device)
            mask[:, :L] = True
            mask[:, L:] = anc[lo:hi, :hi]
            ids = torch.tensor([toks[lo:hi]], device=self.device)
            pos = torch.tensor([[L + topo.depth[i] for i in range(lo, hi)]], device=self.device)
            logits = self.model(ids, pos, self.cache, L + lo, mask)[0]

        kept = [i for i in range(n) if keep[i]]
        sub = topo.select(kept)
        kinds = [self.kind.value if sub.children[i] else "" for i in range(sub.n)]
        return DraftTree(sub, [toks[i] for i in kept], kinds, probs[kept] if sampled else None)


class PromptLookupDrafter:
    def __init__(self, topology: TreeTopology, min_ngram: int, max_ngram: int, num_pred_tokens: int):
        self.min_n, self.max_n, self.num_pred = min_ngram, max_ngram, num_pred_tokens
        self.depth = min(topology.max_depth, num_pred_tokens)
        self.width = len(topology.children[0])  # chain: 1 continuation; static: up to branching[0]
        self.budget = topology.n

    def reset(self) -> None:
        pass

    def _continuations(self, tokens: list[int], depth: int) -> list[list[int]]:
        """Up to `width` distinct continuations: longest matching suffix n-gram first, most recent match first."""
        t = torch.tensor(tokens)
        conts: list[list[int]] = []
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            windows = t[:-1].unfold(0, n, 1)  # [len-n, n]: every earlier n-gram (not the suffix itself)
            hits = (windows == t[-n:]).all(dim=1).nonzero().flatten().tolist()
            for start in reversed(hits):
                cont = tokens[start + n:start + n + depth]
                if cont and cont not in conts:
                    conts.append(cont)
                if len(conts) == self.width:
                    return conts
        return conts

    def propose(self, tokens: list[int], max_depth: int, gen: torch.Generator | None) -> DraftTree:
        conts = self._continuations(tokens, min(self.depth, max_depth))
        parents, toks, index = [-1], [tokens[-1]], {}
        for cont in conts:  # merge into a trie; children of a node are distinct tokens
            node = 0
            for x in cont:
                if (node, x) not in index:
                    if len(parents) == self.budget:
                        break
                    index[(node, x)] = len(parents)
                    parents.append(node)
                    toks.append(x)
                node = index[(node, x)]
        topo = TreeTopology(tuple(parents))
        kinds = [ChildKind.deterministic.value if topo.children[i] else "" for i in range(topo.n)]
        return DraftTree(topo, toks, kinds, None)
