"""The one token-tree topology (ALGORITHMS.md §0.1), used by planning, drafting, verification and tests.

A tree of `n` nodes is a tuple of parents in topological order: `parents[0] == -1` (node 0 is the root:
the last committed token, not yet in the target's cache) and `parents[i] < i`. Everything else (depths,
children, the ancestor-or-self rows, their bitsets, root-to-leaf paths) is derived here and nowhere else;
`runtime.batch` turns them into tensors. Pure Python: the planner and validator use it without torch.

Static policies (`chain`, `static`) are built in breadth-first order, so every level is a contiguous
range of node ids; drafters fill a level in one forward. Trees grown at run time (`dynamic`, `beam`:
runtime/tree_policies.py) keep ids in creation order instead (parents before children, each drafter
round's new nodes a contiguous range); they need not be level ordered.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence



class Provenance(enum.IntEnum):
    """How a tree node was made; the verifier derives the node's proposal from it (ALGORITHMS.md §0.3)."""

    root = 0
    """Node 0: the last committed token (never verified)."""
    topk = 1
    """A deterministic pick (the drafter's top-b, a static tree, an n-gram continuation): proposal δ(x)."""
    iid = 2
    """Sampled with replacement from the parent's draft distribution p: proposal p."""
    wor = 3
    """Sampled without replacement (Gumbel-top-k) from p: p minus the earlier WOR siblings, renormalised."""
    retrieved = 4
    """Copied from a retrieval source (prompt lookup, a datastore): proposal δ(x)."""
    pad = 5
    """Padding up to a size bucket: never accepted."""


def tree_buckets(n: int) -> tuple[int, ...]:
    """Tree sizes a verify forward is padded to: powers of two below n, and n (one compiled shape each)."""
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return tuple(out) + (n,)


@dataclass(frozen=True)
class TreeTopology:
    parents: tuple[int, ...]
    """parents[i] < i for i > 0; parents[0] == -1 (the root)."""

    def __post_init__(self):
        p = tuple(int(x) for x in self.parents)
        object.__setattr__(self, "parents", p)
        if not p or p[0] != -1:
            raise ValueError(f"tree parents must start with -1 (the root), got {p[:4]}")
        for i, x in enumerate(p[1:], start=1):
            if not 0 <= x < i:
                raise ValueError(f"tree parents must be topological (0 <= parent[{i}] < {i}), got {x}")

    # ---- constructors -------------------------------------------------------------------------------
    @staticmethod
    def chain(k: int) -> "TreeTopology":
        """Root plus k draft tokens in a line."""
        return TreeTopology(tuple(range(-1, k)))

    @staticmethod
    def root_only() -> "TreeTopology":
        """The one-node tree (an autoregressive step); one shared object."""
        return _ROOT_ONLY

    @staticmethod
    def static(branching: Sequence[int]) -> "TreeTopology":
        """Every node at depth d gets branching[d] children, built breadth first."""
        parents, level = [-1], [0]
        for b in branching:
            nxt = []
            for node in level:
                for _ in range(int(b)):
                    parents.append(node)
                    nxt.append(len(parents) - 1)
            level = nxt
        return TreeTopology(tuple(parents))

    # ---- derived structure -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.parents)

    @cached_property
    def depth(self) -> tuple[int, ...]:
        d = [0] * self.n
        for i in range(1, self.n):
            d[i] = d[self.parents[i]] + 1
        return tuple(d)

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """children[i]: the children of node i, in id order (the order drafts were generated)."""
        kids: list[list[int]] = [[] for _ in range(self.n)]
        for i in range(1, self.n):
            kids[self.parents[i]].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        """levels[d]: node ids at depth d, ascending."""
        out: list[list[int]] = [[] for _ in range(self.max_depth + 1)]
        for i, d in enumerate(self.depth):
            out[d].append(i)
        return tuple(tuple(x) for x in out)

    @cached_property
    def is_level_ordered(self) -> bool:
        """True if ids are sorted by depth (so each level is a contiguous id range)."""
        return all(self.depth[i] <= self.depth[i + 1] for i in range(self.n - 1))

    def path(self, node: int) -> tuple[int, ...]:
        """Root-to-node path, root first."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return tuple(reversed(out))

    @cached_property
    def leaves(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n) if not self.children[i])

    def root_to_leaf_paths(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.path(leaf) for leaf in self.leaves)

    @cached_property
    def ancestor_rows(self) -> tuple[tuple[bool, ...], ...]:
        return tuple(tuple(j in set(self.path(i)) for j in range(self.n)) for i in range(self.n))

    def bitsets(self) -> tuple[int, ...]:
        """Per-row ancestor-or-self bitsets (bit j set iff j is on root->i); kernels use 64-bit words."""
        return tuple(sum(1 << j for j in self.path(i)) for i in range(self.n))

    # ---- pruning -----------------------------------------------------------------------------------
    def select(self, nodes: Sequence[int]) -> "TreeTopology":
        """The sub-tree on `nodes` (ascending, contains 0, closed under parent), renumbered 0..m-1."""
        nodes = sorted(set(int(x) for x in nodes))
        if len(nodes) == self.n and nodes[0] == 0 and nodes[-1] == self.n - 1:
            return self  # the whole tree: keep this object and what it has cached
        if not nodes or nodes[0] != 0 or nodes[-1] >= self.n:
            raise ValueError(f"select() needs the root and ids in [0, {self.n}), got {nodes[:8]}")
        index = {old: new for new, old in enumerate(nodes)}
        if any(self.parents[x] not in index for x in nodes[1:]):
            raise ValueError("select() needs every selected node's parent")
        return TreeTopology(tuple(-1 if x == 0 else index[self.parents[x]] for x in nodes))

    def truncate(self, max_depth: int) -> "TreeTopology":
        """Keep nodes with depth <= max_depth (a prefix of the ids when level ordered); computed once per
        depth (the last steps of every request ask again)."""
        cache = self.__dict__.setdefault("_truncated", {})
        if max_depth not in cache:
            cache[max_depth] = self.select([i for i in range(self.n) if self.depth[i] <= max_depth])
        return cache[max_depth]


_ROOT_ONLY = TreeTopology((-1,))
