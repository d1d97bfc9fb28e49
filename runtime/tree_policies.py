"""Run-time tree growth for model drafters: dynamic (DySpec, ALGORITHMS.md §4) and beam (RSD-S, §2.2) trees.

`ModelDrafter` (runtime/drafters.py) owns the drafter model, its cache, the catch-up and the forwards; a growth
policy here owns only the decisions: which children each row's tree gets, given the draft distributions of the
nodes the last forward fed. The drafter runs rounds: `feed(node, p)` for every node the last forward fed
(the root first, from the catch-up; p its draft distribution, or for top-k dynamic children only the ranked
top tokens and their probabilities), then `grow()` returns the row's new nodes (children of fed nodes only, so
one forward feeds a whole round and each round's new nodes are a contiguous id range), then `wants(node)`
says which of them the next forward must feed. Rows are independent: a row's tree, and the draws its own
sampler makes, do not depend on the other rows of the batch.

- **Dynamic** (`DynamicTree`): per row a max-heap of *child positions* (DySpec Algorithm 1, batched per round).
  A position is "the k-th child of fed node s", keyed by an estimate of the child's path probability:
  greedy / top-k children: the exact path probability v_s * p_s(y_k) of the k-th most likely token; sampled
  children: DySpec's value v_s * (1 - sum of p_s over the k-1 siblings drawn so far), known before the child
  is drawn. Each round pops up to `expand_per_round` best positions (a popped position's next sibling
  position is pushed back at once; a new node's first-child position becomes available after the next forward
  feeds it, so the round also ends when the best position left is worth less than a node made this round:
  that child position might be better). Every pop is therefore the best of all positions, pending ones
  included, and the tree is DySpec Algorithm 1's for any `expand_per_round`, which only saves forwards. Sampled children are drawn one at a time without replacement from the parent's residual
  (`sampler.children(residual, 1, wor)`), so each stopping decision depends only on values already drawn:
  the §0.3 condition (b) that keeps RRS-WOR exact. Stops at `num_nodes` nodes (root included), at the depth
  cap, or when the best position's value is below `threshold`.
- **Beam** (`BeamTree`): stochastic beam search (Kool et al. 2019, as RSD-S): per level, every beam s scores
  every token y by phi_{s,y} = phi_s + log p_s(y) perturbed by Gumbel noise and truncated so that the best
  child's value equals the beam's (stable log1mexp form, fp64); the top `beam_width` (s, y) pairs of the row
  form the next level. A parent's kept children are a prefix of its Gumbel-top-k order (the truncation is
  monotone per parent), kept in descending-value order with provenance wor, so the RRS-WOR verifier's proposal
  is exact. Greedy / top-k children: deterministic beam search on phi (provenance topk).

Shape legend: V target vocabulary.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from spec_compiler.tree import Provenance


@dataclass(frozen=True)
class DynamicTree:
    """tree.policy=dynamic (DySpec): budget, depth cap, value threshold, positions popped per round."""

    num_nodes: int
    """Most nodes per tree, the root included (the verify forward's size)."""
    max_depth: int
    threshold: float
    """Stop when the best child position's value (path-probability estimate) is below this."""
    expand_per_round: int
    """Child positions popped per row per drafter forward (1 = DySpec Algorithm 1, one node per forward)."""
    value_temperature: Optional[float] = None
    """Top-k children only: the temperature of the drafter distribution the values (path probabilities) are
    computed from (None: the drafter's). Under greedy verification the drafter's top pick is accepted far more
    often than its probability says; a sharper value distribution estimates that better. Sampled children
    always use the distribution they are drawn from."""

    @property
    def max_nodes(self) -> int:
        return self.num_nodes

    @property
    def per_round(self) -> int:
        return self.expand_per_round

    def start(self, root: int, cap: int, sampler, sampled: bool) -> "DynamicRow":
        return DynamicRow(self, root, min(cap, self.max_depth), sampler, sampled)


@dataclass(frozen=True)
class BeamTree:
    """tree.policy=beam (RSD-S): beam width W and depth D; at most 1 + W * D nodes."""

    beam_width: int
    beam_depth: int

    @property
    def max_nodes(self) -> int:
        return 1 + self.beam_width * self.beam_depth

    @property
    def per_round(self) -> int:
        return self.beam_width

    @property
    def max_depth(self) -> int:
        return self.beam_depth

    def start(self, root: int, cap: int, sampler, sampled: bool) -> "BeamRow":
        return BeamRow(self, root, min(cap, self.beam_depth), sampler, sampled)


class GrownRow:
    """One row's tree as it grows: nodes in creation order (parents before children)."""

    def __init__(self, root: int, cap: int, sampler, sampled: bool):
        self.parents, self.tokens, self.depth = [-1], [root], [0]
        self.provs = [Provenance.root]
        self.cap, self.sampler, self.sampled = cap, sampler, sampled
        self.prov = Provenance.wor if sampled else Provenance.topk

    @property
    def n(self) -> int:
        return len(self.parents)

    def _add(self, parent: int, token: int) -> int:
        self.parents.append(parent)
        self.tokens.append(int(token))
        self.depth.append(self.depth[parent] + 1)
        self.provs.append(self.prov)
        return self.n - 1


class DynamicRow(GrownRow):
    def __init__(self, spec: DynamicTree, root: int, cap: int, sampler, sampled: bool):
        super().__init__(root, cap, sampler, sampled)
        self.spec = spec
        self.value = [1.0]  # path probability of each node under the drafter
        self.heap: list[tuple[float, int, int, int]] = []  # (-key, tie, node, k): node's k-th child position
        self.fed: dict[int, tuple] = {}  # greedy: (top probs, top tokens); sampled: [residual p, p]
        self.stopped = False
        self.pops: list[tuple[float, float]] = []  # (popped key, best key left poppable): the invariant tests
        self._pushed = 0  # ties pop in push order

    def _push(self, key: float, node: int, k: int) -> None:
        if key > 0:
            heapq.heappush(self.heap, (-key, self._pushed, node, k))
            self._pushed += 1

    def wants(self, node: int) -> bool:
        return self.depth[node] < self.cap and not self.stopped and self.n < self.spec.num_nodes

    def feed(self, node: int, p) -> None:
        """Sampled children: p [V] float64, the drafter distribution at `node` (its children's). Top-k children:
        p = (probabilities, token ids) of node's most likely children, descending (at least num_nodes - 1)."""
        if not self.wants(node):
            return
        v = self.value[node]
        if self.sampled:
            self.fed[node] = [p.clone(), p]
            self._push(v, node, 0)  # the first child's value: v * (1 - 0)
        else:
            self.fed[node] = p
            self._push(v * p[0][0], node, 0)

    def grow(self) -> list[int]:
        new: list[int] = []
        pending = 0.0  # best value a node made this round could give its first child (known after the forward)
        while len(new) < self.spec.expand_per_round and self.n < self.spec.num_nodes and self.heap \
                and not self.stopped:
            key = -self.heap[0][0]
            if key < self.spec.threshold:
                self.stopped = True  # keys never grow (a child's is <= its parent's): nothing better will come
                break
            if key < pending:
                break  # a node made this round may have a better child: the round ends, the order stays best-first
            _, _, node, k = heapq.heappop(self.heap)
            self.pops.append((key, max(pending, -self.heap[0][0] if self.heap else 0.0)))
            v = self.value[node]
            if self.sampled:
                residual, p = self.fed[node]
                y = self.sampler.children(residual, 1, Provenance.wor)[0]
                value = v * float(p[y])
                residual[y] = 0.0
                self._push(v * float(residual.sum()), node, k + 1)  # the next sibling: v * (1 - sum of drawn p)
            else:
                probs, toks = self.fed[node]
                y, value = toks[k], key
                if k + 1 < len(probs):
                    self._push(v * probs[k + 1], node, k + 1)
            c = self._add(node, y)
            self.value.append(value)
            new.append(c)
            if self.depth[c] < self.cap:
                pending = max(pending, value)  # c's first child position is worth at most c's own value
        return new


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def truncated_gumbel(g_parent: Tensor, perturbed: Tensor) -> Tensor:
    """Stochastic beam search's truncation (§2.2): G = -log(exp(-G_s) - exp(-Z) + exp(-G')) with Z = max_y G',
    so that max_y G = G_s. g_parent [m], perturbed [m, V] float64 (-inf where p = 0) -> G [m, V]."""
    Z = perturbed.max(-1, keepdim=True).values
    v = g_parent[:, None] - perturbed + log1mexp(perturbed - Z)
    return g_parent[:, None] - torch.relu(v) - torch.log1p(torch.exp(-v.abs()))


class BeamRow(GrownRow):
    def __init__(self, spec: BeamTree, root: int, cap: int, sampler, sampled: bool):
        super().__init__(root, cap, sampler, sampled)
        self.spec = spec
        self.phi = [0.0]  # log path probability
        self.g = [0.0]  # the beam's (truncated) Gumbel value
        self.level: list[tuple[int, Tensor]] = []  # fed beams of the current level: (node, p)

    def wants(self, node: int) -> bool:
        return self.depth[node] < self.cap

    def feed(self, node: int, p: Tensor) -> None:
        if self.wants(node):
            self.level.append((node, p))

    def grow(self) -> list[int]:
        if not self.level:
            return []
        beams = [s for s, _ in self.level]
        P = torch.stack([p for _, p in self.level])  # [m, V]
        self.level = []
        phi = torch.tensor([self.phi[s] for s in beams], dtype=torch.float64)[:, None] + torch.log(P)  # [m, V]
        if self.sampled:
            key = truncated_gumbel(torch.tensor([self.g[s] for s in beams], dtype=torch.float64),
                                   phi + self.sampler.gumbel(tuple(phi.shape)))
        else:
            key = phi
        flat = key.flatten()
        k = min(self.spec.beam_width, int(torch.isfinite(flat).sum()))
        top = torch.topk(flat, k)  # descending key; within one parent that is its Gumbel-top-k order
        V = P.shape[-1]
        picked = sorted(zip(top.indices.tolist(), top.values.tolist()), key=lambda t: (t[0] // V, -t[1]))
        new = []
        for i, kv in picked:
            j, y = divmod(i, V)
            c = self._add(beams[j], y)
            self.phi.append(float(phi[j, y]))
            self.g.append(kv)
            new.append(c)
        return new


Policy = Optional[DynamicTree | BeamTree]
"""What ModelDrafter takes: None = the static topology, level by level."""
