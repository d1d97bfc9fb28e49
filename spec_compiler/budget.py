"""tree.budget=auto: the draft tree that maximises expected tokens per second, from measured acceptance and cost.

Pure Python (no torch, no runtime): `runtime/calibrate.py` measures the two inputs on the engine's own models
and the compile step records them, the choice and every candidate in the artifact's manifest.

- `AcceptanceModel` (Sequoia / EAGLE-2 positional acceptance): `prob(depth, rank, spine)` = P(the target's
  greedy token is a node's rank-`rank` child | the node, at depth `depth`, was accepted). Two states: `spine`
  nodes (every node on their path is its parent's top child: the chain case, measured exactly) and the rest.
  Estimated from *walks*: per calibration position, the drafter rank of each target token along the accepted
  path, ending at the first rank >= max_rank (a miss) or where the text ends.
- `CostModel`: one step's verify seconds per tree size (the target forward, acceptance and commit; interpolated
  between measured sizes) and the drafter's seconds per level forward of w nodes (a static tree drafts one
  level per forward: depth forwards, the first being the catch-up that ends at the root).
- `choose(acceptance, costs, max_nodes, family)`: every chain of 0..max_nodes-1 draft tokens, every static
  branching of at most max_nodes nodes, and (family "static") Sequoia's optimal tree for each (node count, depth
  bound), by the exact expected accepted length (the sum over nodes of the product of acceptance probabilities
  along the path) over expected step seconds. Returns the best `Candidate` and the whole table.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Optional, Sequence

from spec_compiler.tree import TreeTopology

FAMILIES = ("chain", "static")
"""chain: chains only (prompt lookup, tree.policy=chain); static: chains, static branchings and Sequoia trees."""


@dataclass(frozen=True)
class AcceptanceModel:
    max_rank: int
    """R: ranks 0..R-1 are measured; a target token ranked >= R (or missing from the drafter's head) is a miss."""
    spine: tuple[tuple[float, ...], ...]
    """[D][R]: P(rank-r child accepted | its parent at depth d accepted, the parent's path all top children)."""
    off: tuple[tuple[float, ...], ...]
    """[D][R]: the same for a parent whose path has a lower-ranked child (row 0 unused: the root is on the spine)."""
    spine_samples: tuple[int, ...] = ()
    """Walks behind each spine row (0: nothing measured there; the probabilities are 0)."""
    off_samples: tuple[int, ...] = ()

    @property
    def max_depth(self) -> int:
        return len(self.spine)

    def prob(self, depth: int, rank: int, spine: bool) -> float:
        """P(the rank-`rank` child of an accepted node at `depth` is accepted); 0 beyond what was measured."""
        if depth >= self.max_depth or rank >= self.max_rank:
            return 0.0
        return (self.spine if spine else self.off)[depth][rank]

    @staticmethod
    def from_walks(walks: Sequence[Sequence[int]], max_depth: int, max_rank: int) -> "AcceptanceModel":
        """walks[i][d]: the rank of the target's token at depth d after start i (its parent accepted), in
        [0, max_rank], max_rank = a miss (then the walk ends); a walk also ends where the text ends."""
        D, R = max_depth, max_rank
        hits = {s: [[0] * R for _ in range(D)] for s in (True, False)}
        tried = {s: [0] * D for s in (True, False)}
        for w in walks:
            spine = True
            for d, r in enumerate(w[:D]):
                assert 0 <= r <= R, (r, R)
                tried[spine][d] += 1
                if r == R:
                    break
                hits[spine][d][r] += 1
                spine = spine and r == 0
        rate = lambda s: tuple(tuple(h / t if t else 0.0 for h in hs) for hs, t in zip(hits[s], tried[s]))  # noqa: E731
        return AcceptanceModel(R, rate(True), rate(False), tuple(tried[True]), tuple(tried[False]))

    def to_dict(self) -> dict:
        return asdict(self)


def expected_accepted(topo: TreeTopology, acc: AcceptanceModel) -> float:
    """E[draft tokens accepted] = sum over non-root nodes of P(node accepted), the product of the acceptance
    probabilities along its path (children ranked in id order, as the drafter makes them)."""
    reach = [1.0] * topo.n
    spine = [True] * topo.n
    total = 0.0
    for node in range(topo.n):
        for rank, c in enumerate(topo.children[node]):
            reach[c] = reach[node] * acc.prob(topo.depth[node], rank, spine[node])
            spine[c] = spine[node] and rank == 0
            total += reach[c]
    return total


def replay_accepted(topo: TreeTopology, walks: Sequence[Sequence[int]]) -> float:
    """Mean accepted draft tokens of `topo` replayed on measured walks (exact for deterministic top-k children
    under greedy verification; walks cut short by the text end count what they reached)."""
    total = 0
    for w in walks:
        node = 0
        for r in w:
            kids = topo.children[node]
            if r >= len(kids):
                break
            node = kids[r]
            total += 1
    return total / max(1, len(walks))


@dataclass(frozen=True)
class CostModel:
    rows: int
    """Requests per step the costs were measured at (every row drafting the same tree)."""
    verify: tuple[tuple[int, float], ...]
    """(tree size T, seconds of one step past drafting: the target's verify forward over T nodes per row, the
    acceptance and the cache commit), ascending T."""
    draft_level: tuple[tuple[int, float], ...] = ()
    """(w, seconds of one drafter forward of w nodes per row plus its top-k), ascending w; empty: no model."""
    draft_fixed: float = 0.0
    """Seconds per drafted step whatever the shape: prompt lookup's whole propose; a model drafter's propose
    beyond its level forwards (catch-up bookkeeping, building the tree)."""

    def verify_time(self, n: int) -> float:
        return _interp(self.verify, n)

    def draft_time(self, topo: TreeTopology) -> float:
        """0 without draft levels; else the fixed part, the catch-up forward (about one token per row; it ends
        at the root and gives the first level's children) and one forward per further level of its width."""
        if topo.max_depth == 0:
            return 0.0
        if not self.draft_level:
            return self.draft_fixed
        widths = [1] + [len(level) for level in topo.levels[1:-1]]
        return self.draft_fixed + sum(_interp(self.draft_level, w) for w in widths)

    def to_dict(self) -> dict:
        return asdict(self)


def _interp(table: Sequence[tuple[int, float]], x: int) -> float:
    """Piecewise-linear in x through the table (distinct sizes), extended linearly past its ends; never below 0."""
    pts = sorted(table)
    assert pts, "empty cost table"
    if len(pts) == 1:
        return pts[0][1]
    i = next((i for i in range(1, len(pts)) if x <= pts[i][0]), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class Candidate:
    kind: str
    """chain | static (uniform branching per level) | sequoia (the optimal tree for its node count and depth)."""
    parents: tuple[int, ...]
    branching: Optional[tuple[int, ...]]
    """Children per node at each level (chain and static); None for a Sequoia tree."""
    n: int
    depth: int
    tau: float
    """Expected tokens per step: accepted drafts + 1 (the bonus token)."""
    draft_s: float
    verify_s: float

    @property
    def step_s(self) -> float:
        return self.draft_s + self.verify_s

    @property
    def tokens_per_s(self) -> float:
        return 0.0 if self.step_s <= 0 else self.tau / self.step_s

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class Choice:
    best: Candidate
    candidates: tuple[Candidate, ...]
    """Every candidate considered, best first (tokens/s descending)."""
    rows: int

    @property
    def parents(self) -> tuple[int, ...]:
        return self.best.parents

    def to_dict(self) -> dict:
        """The manifest record: tokens/s are per row (every row runs the same tree)."""
        return {"best": self.best.to_dict(), "rows": self.rows, "candidates": [c.to_dict() for c in self.candidates]}


def static_branchings(max_nodes: int) -> list[tuple[int, ...]]:
    """Every branching (b_1..b_D), b >= 1, with 1 + b_1 + b_1 b_2 + ... <= max_nodes, not all ones (chains are
    listed as such), in lexicographic order."""
    out = []

    def grow(prefix: tuple[int, ...], width: int, used: int):
        if prefix and any(b > 1 for b in prefix):
            out.append(prefix)
        b = 1
        while used + width * b <= max_nodes:
            grow(prefix + (b,), width * b, used + width * b)
            b += 1

    grow((), 1, 1)
    return sorted(out)


def sequoia_trees(acc: AcceptanceModel, max_nodes: int) -> dict[tuple[int, int], tuple[float, TreeTopology]]:
    """Sequoia's dynamic program, with depth-dependent two-state acceptance: for every node count n in
    2..max_nodes and depth bound D in 1..n-1, the tree of n nodes and depth <= D with the largest expected
    accepted length, and that value. A node's children are its top-k (ranks 0..k-1: a drafter cannot skip a
    rank). Returns {(n, D): (value, topology in level order, children by rank)}."""
    R = min(acc.max_rank, max_nodes - 1)
    NEG = float("-inf")

    @lru_cache(maxsize=None)
    def best(spine: bool, depth: int, left: int, n: int) -> float:
        """Value below a node at `depth` heading a subtree of exactly n nodes at most `left` levels deep."""
        if n == 1:
            return 0.0
        return NEG if left == 0 else kids(spine, depth, left, 0, n - 1)[0]

    @lru_cache(maxsize=None)
    def kids(spine: bool, depth: int, left: int, rank: int, budget: int) -> tuple[float, int]:
        """(best value, nodes given to the rank-`rank` child) for children of rank >= `rank` holding exactly
        `budget` nodes with their subtrees."""
        if budget == 0:
            return 0.0, 0
        if rank >= R:
            return NEG, 0
        p = acc.prob(depth, rank, spine)
        top = (NEG, 0)
        for m in range(1, budget + 1):
            v = p * (1.0 + best(spine and rank == 0, depth + 1, left - 1, m)) + kids(spine, depth, left, rank + 1,
                                                                                    budget - m)[0]
            if v > top[0]:
                top = (v, m)
        return top

    def build(spine: bool, depth: int, left: int, n: int) -> tuple:
        """The argmax subtree as nested child tuples, children by rank."""
        out, rank, budget = [], 0, n - 1
        while budget:
            m = kids(spine, depth, left, rank, budget)[1]
            out.append(build(spine and rank == 0, depth + 1, left - 1, m))
            rank, budget = rank + 1, budget - m
        return tuple(out)

    out = {}
    for n in range(2, max_nodes + 1):
        for D in range(1, n):
            v = best(True, 0, D, n)
            if v > NEG:
                out[(n, D)] = (v, _level_order(build(True, 0, D, n)))
    return out


def _level_order(root_kids: tuple) -> TreeTopology:
    """Nested child tuples (children by rank) -> parents in breadth-first order, children by rank."""
    parents, frontier = [-1], [(0, root_kids)]
    while frontier:
        nxt = []
        for node, kids in frontier:
            for sub in kids:
                parents.append(node)
                nxt.append((len(parents) - 1, sub))
        frontier = nxt
    return TreeTopology(tuple(parents))


def choose(acc: AcceptanceModel, costs: CostModel, max_nodes: int, family: str = "static") -> Choice:
    """The candidate with the most expected tokens per second: tau / (draft seconds + verify seconds)."""
    assert family in FAMILIES, family
    assert max_nodes >= 1, max_nodes
    shapes: dict[tuple[int, ...], tuple[str, Optional[tuple[int, ...]]]] = {}
    for k in range(max_nodes):
        shapes[TreeTopology.chain(k).parents] = ("chain", (1,) * k)
    if family == "static":
        for b in static_branchings(max_nodes):
            shapes.setdefault(TreeTopology.static(b).parents, ("static", b))
        for _, topo in sequoia_trees(acc, max_nodes).values():
            shapes.setdefault(topo.parents, ("sequoia", None))
    cands = []
    for parents, (kind, branching) in shapes.items():
        topo = TreeTopology(parents)
        cands.append(Candidate(kind, parents, branching, topo.n, topo.max_depth, 1.0 + expected_accepted(topo, acc),
                               costs.draft_time(topo), costs.verify_time(topo.n)))
    cands.sort(key=lambda c: (-c.tokens_per_s, c.n, c.parents))
    return Choice(cands[0], tuple(cands), costs.rows)
