"""The data one batched step moves around: `TreeBatch` (the drafts, as tensors) and `Block` (one forward).

A step serves B requests at once, one per cache *row* (slot). Each row has its own committed length
`L_b` (tokens whose KV / SSM state sits in the cache); the row's last token, the tree root, is pending.

**TreeBatch**: the trees of all rows, padded to one size bucket T. Node i of row b sits at cache slot
`L_b + i` and position `L_b + depth[b, i]`. Every node carries its *provenance* (how it was made:
`spec_compiler.tree.Provenance`), from which the verifier derives its proposal; padding nodes
(provenance PAD) are never accepted, see only themselves and hang off nothing (parent -1, depth 0).
Per-row topologies come from `spec_compiler.tree.TreeTopology`, the only place parents and ancestors
are derived; the tensors here are built from it (cached per topology).

**Block**: what one model forward writes and reads, per row: the cache slots of its T new tokens, their
positions, the *parent slot* of each token (-1: none), and the attention mask over cache slots [0, S).
Attention layers write K/V at `slots` (by index: shapes never depend on lengths) and attend per `mask`;
SSM layers read each token's parent slot (never a mask): the committed state when it is `L_b - 1`
(or -1 with L_b = 0), an earlier node of the same tree (scratch, offset `slot - L_b`) otherwise.
`advance=True` (prefill) commits as it goes: L_b grows by T; otherwise the forward leaves the
committed state alone and `commit` keeps one root-to-node path per row afterwards.

S is the KV window: the cache capacity for fixed shapes (compiled phases), or the live maximum over the
batch for CPU eager (`kv_window=live`; a measured backend choice, recorded in the plan).

Shape legend: B rows, T nodes (bucket), S attended slots, V vocabulary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch
from torch import Tensor

from runtime import transfer as devices
from spec_compiler.tree import Provenance, TreeTopology

PAD = int(Provenance.pad)


# ---------------------------------------------------------------------------------------------------
# per-topology tensors (derived once per topology object; decoding asks for the same trees every step)
# ---------------------------------------------------------------------------------------------------
def topology_tensors(topo: TreeTopology, bucket: int) -> dict[str, Tensor]:
    """parents [T], depth [T], anc [T, T] bool (ancestor-or-self) of `topo` padded to `bucket` nodes (CPU)."""
    cache = topo.__dict__.setdefault("_tensors", {})
    hit = cache.get(bucket)
    if hit is None:
        n = topo.n
        assert n <= bucket, (n, bucket)
        parents = torch.full((bucket,), -1, dtype=torch.long)
        parents[:n] = torch.tensor(topo.parents)
        depth = torch.zeros(bucket, dtype=torch.long)
        depth[:n] = torch.tensor(topo.depth)
        anc = torch.eye(bucket, dtype=torch.bool)
        anc[:n, :n] = torch.tensor(topo.ancestor_rows)
        hit = cache[bucket] = {"parents": parents, "depth": depth, "anc": anc}
    return hit


@dataclass
class TreeBatch:
    """Draft trees of B rows, padded to T nodes (see the module docstring)."""

    topologies: list[TreeTopology]
    """Each row's real tree (n_b <= T nodes, ids 0..n_b-1; node 0 is the root)."""
    tokens: Tensor
    """[B, T] long: token per node (0 at padding)."""
    parents: Tensor
    """[B, T] long: parent node id (-1: the root, and padding)."""
    depth: Tensor
    """[B, T] long (0 at padding)."""
    anc: Tensor
    """[B, T, T] bool: anc[b, i, j] iff j is on the root -> i path of row b (padding: itself only)."""
    provenance: Tensor
    """[B, T] int8 `Provenance` per node: how it was made (ROOT for node 0, PAD for padding)."""
    draft_probs: Optional[Tensor] = None
    """[B, T, V] float64: the drafter distribution node i's *children* were drawn from (sampled children
    only; rows of leaves and deterministic parents unused), or None when no node was sampled."""

    @property
    def B(self) -> int:
        return self.tokens.shape[0]

    @property
    def T(self) -> int:
        return self.tokens.shape[1]

    @cached_property
    def valid(self) -> Tensor:
        """[B, T] bool: real nodes."""
        return self.provenance != PAD

    @property
    def sizes(self) -> list[int]:
        return [t.n for t in self.topologies]

    @property
    def max_depth(self) -> list[int]:
        return [t.max_depth for t in self.topologies]

    @staticmethod
    def build(topologies: Sequence[TreeTopology], tokens: Sequence[Sequence[int]],
              provenance: Sequence[Sequence[int]], bucket: int,
              draft_probs: Optional[Tensor] = None) -> "TreeBatch":
        """Rows from their topologies, tokens and per-node provenance (lists of n_b); padded to `bucket`.
        draft_probs: [B, bucket, V] or None (rows beyond n_b ignored)."""
        for topo, t, p in zip(topologies, tokens, provenance):
            assert len(t) == len(p) == topo.n <= bucket, (len(t), len(p), topo.n, bucket)
        # one tensor call each over padded lists: this runs for every step of every request
        toks = torch.tensor([list(t) + [0] * (bucket - len(t)) for t in tokens], dtype=torch.long)
        prov = torch.tensor([[int(x) for x in p] + [PAD] * (bucket - len(p)) for p in provenance], dtype=torch.int8)
        B = len(topologies)
        first = topologies[0]
        if all(t is first or t.parents == first.parents for t in topologies):  # one shape for every row
            part = topology_tensors(first, bucket)
            parents, depth, anc = (part[k][None].expand(B, *part[k].shape) for k in ("parents", "depth", "anc"))
        else:
            parts = [topology_tensors(t, bucket) for t in topologies]
            parents, depth, anc = (torch.stack([p[k] for p in parts]) for k in ("parents", "depth", "anc"))
        return TreeBatch(list(topologies), toks, parents, depth, anc, prov, draft_probs)

    @staticmethod
    def roots(root_tokens: Sequence[int]) -> "TreeBatch":
        """Root-only trees (the autoregressive step); the structure tensors are shared constants."""
        B = len(root_tokens)
        if B not in _ROOTS:
            one = TreeBatch.build([TreeTopology.root_only()] * B, [[0]] * B, [[Provenance.root]] * B, 1)
            _ROOTS[B] = (one.topologies, one.parents, one.depth, one.anc, one.provenance, one.valid)
        topos, parents, depth, anc, prov, valid = _ROOTS[B]
        out = TreeBatch(topos, torch.tensor([[int(x)] for x in root_tokens]), parents, depth, anc, prov)
        out.__dict__["valid"] = valid
        return out

    def select_rows(self, rows: Sequence[int]) -> "TreeBatch":
        """The sub-batch of `rows` (e.g. the greedy rows of a mixed batch)."""
        idx = torch.tensor(list(rows), dtype=torch.long)
        return TreeBatch([self.topologies[b] for b in rows], self.tokens[idx], self.parents[idx], self.depth[idx],
                         self.anc[idx], self.provenance[idx],
                         None if self.draft_probs is None else self.draft_probs[idx])

    def row_tokens(self, b: int) -> list[int]:
        return self.tokens[b, :self.topologies[b].n].tolist()


# ---------------------------------------------------------------------------------------------------
# one forward
# ---------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """One forward's T new tokens per row: where they go, where they sit, what they continue from."""

    slots: Tensor
    """[B, T] long: cache slot each token's K/V (and SSM scratch state) is written to."""
    positions: Tensor
    """[B, T] long: RoPE positions."""
    parent_slots: Tensor
    """[B, T] long: slot of each token's parent (-1: none: the start of a text, or a padding token)."""
    mask: Tensor
    """[B, T, S] bool: token t of row b may attend to slot s."""
    lengths: Tensor
    """[B] long: committed length of each row when the forward runs."""
    advance: bool = False
    """True: a causal block that extends every row's committed text by T (prefill); the forward commits
    (SSM state, L_b += T). False: a tree / draft block; `commit` keeps a path afterwards."""
    anc: Optional[Tensor] = None
    """[B, T, T] bool in-block ancestor-or-self mask (None: derive causal order from parent_slots)."""
    offsets: Optional[Tensor] = None
    """[B, T] long: `slots - lengths`, the node's scratch index (tree blocks)."""
    start: Optional[int] = None
    """When every row writes slots start..start+T-1 (a prefill, batch 1): attention writes a slice."""
    mask_full: bool = False
    """Every token may attend to every slot of the window (attention may skip the mask)."""
    host_facts: Optional[tuple[bool, bool]] = None
    """(some row has L_b = 0, some block root continues from SSM scratch), taken from the host copy when the block
    was sent to a device (`to`): an SSM cache plans the forward from them instead of reading the device tensors
    (runtime.models.ssm_cache.SSMCache.plan; a read would synchronise). None: read them when needed."""
    at_prefix: bool = False
    """Token j of row b sits at slot lengths_b + j and `mask` is the prefix [0, L_b) plus its in-block ancestors
    (`anc`): the tree-attention kernel's contract (codegen/tree_attention.py). True for `causal` and for `tree`
    with base = lengths and lo = 0 (the verify forward); not for drafter levels or `tree_ranges`."""

    def to(self, device: Optional[torch.device]) -> "Block":
        """This host-built block on `device`: every tensor sent without a host synchronisation
        (runtime.transfer.to_device), the SSM planning facts taken on the host first. The CPU: itself."""
        if device is None or devices.on_host(device):
            return self
        moved = {f: devices.to_device(getattr(self, f), device) for f in _TENSOR_FIELDS if getattr(self, f) is not None}
        return dataclasses.replace(self, **moved, host_facts=block_facts(self))

    @property
    def B(self) -> int:
        return self.slots.shape[0]

    @property
    def T(self) -> int:
        return self.slots.shape[1]

    @property
    def S(self) -> int:
        return self.mask.shape[-1]

    @staticmethod
    def causal(start: int, T: int, B: int = 1, kv_len: Optional[int] = None, device=None) -> "Block":
        """T tokens continuing every row's text from slot `start` (= its committed length): a prefill chunk,
        or one autoregressive token. kv_len: the KV window S (default start + T)."""
        S = kv_len if kv_len is not None else start + T
        assert S >= start + T, (S, start, T)
        slots = torch.arange(start, start + T, device=device)
        mask = torch.arange(S, device=device)[None, :] <= slots[:, None]  # [T, S]: prefix + causal
        lengths = torch.full((B,), start, dtype=torch.long, device=device)
        return Block(slots[None].expand(B, T), slots[None].expand(B, T), (slots - 1)[None].expand(B, T),
                     mask[None].expand(B, T, S), lengths, advance=True,
                     anc=torch.ones(T, T, dtype=torch.bool, device=device).tril()[None].expand(B, T, T),
                     offsets=torch.arange(T, device=device)[None].expand(B, T), start=start,
                     mask_full=T == 1 and S == start + 1, at_prefix=True)

    @staticmethod
    def _tree_one_row(L: int, base: int, tree: TreeBatch, kv_len: int, lo: int, hi: int) -> "Block":
        return _tree_one_row_impl(L, base, tree, kv_len, lo, hi)

    @staticmethod
    def tree(lengths: Tensor, tree: TreeBatch, kv_len: int, lo: int = 0, hi: Optional[int] = None,
             base: Optional[Tensor] = None, device=None) -> "Block":
        """Nodes lo..hi-1 of every row's tree, node j at slot base_b + j (default base = lengths: the verify
        forward, whose root is pending at slot L_b). A drafter whose root is already committed passes
        base = lengths - 1 and lo >= 1 (one level per forward). Node j continues from its parent's slot,
        the root from the committed slot L_b - 1; padding from nothing."""
        hi = tree.T if hi is None else hi
        dev = torch.device(device) if device is not None else torch.device("cpu")
        assert lengths.device.type == "cpu" and (base is None or base.device.type == "cpu"), \
            "lengths and base are host tensors (the host knows every row's length; reading them back would sync)"
        if tree.B == 1 and devices.on_host(dev):
            L = int(lengths[0])
            return Block._tree_one_row(L, L if base is None else int(base[0]), tree, kv_len, lo, hi)
        at_prefix = base is None and lo == 0
        # Built on the host from host tensors and sent to the device once (runtime.transfer.to_device: no sync)
        base = lengths if base is None else base
        B, T = tree.tokens.shape[0], hi - lo
        ids = torch.arange(lo, hi)
        slots = base[:, None] + ids[None]  # [B, T]
        parents = tree.parents[:, lo:hi]
        parent_slots = torch.where(parents >= 0, base[:, None] + parents, lengths[:, None] - 1)
        parent_slots = torch.where(tree.valid[:, lo:hi], parent_slots, torch.full_like(parent_slots, -1))
        anc = tree.anc[:, lo:hi, :hi]  # [B, T, hi]: visible tree nodes 0..hi-1
        start = int(base[0]) + lo if B == 1 else None
        full = start is not None and T == 1 and lo == 0 and kv_len == start + 1  # the root alone sees every slot
        mask = torch.ones(B, T, kv_len, dtype=torch.bool) if full else window_mask(lengths, base, anc, kv_len)
        block = Block(slots, base[:, None] + tree.depth[:, lo:hi], parent_slots, mask, lengths, advance=False,
                      anc=anc[:, :, lo:hi], offsets=slots - lengths[:, None], start=start, mask_full=full,
                      at_prefix=at_prefix)
        return block.to(dev)


    @staticmethod
    def tree_ranges(lengths: Tensor, tree: TreeBatch, kv_len: int, lo: Tensor, T: int, base: Tensor,
                    device=None) -> "Block":
        """Nodes lo_b..lo_b+T-1 of row b (one width, a start per row: a drafter growing trees whose rounds add a
        different number of nodes per row; ids past a row's real nodes are its padding and must be < tree.T).
        Node j at slot base_b + j, as in `tree`; no node of the range may be another's parent (in-block
        ancestry is each node itself)."""
        B, N = tree.tokens.shape
        ids = lo[:, None] + torch.arange(T)[None]  # [B, T]
        assert int(ids.max()) < N, (int(ids.max()), N)
        parents = tree.parents.gather(1, ids)
        valid = tree.valid.gather(1, ids)
        parent_slots = torch.where(parents >= 0, base[:, None] + parents, lengths[:, None] - 1)
        parent_slots = torch.where(valid, parent_slots, torch.full_like(parent_slots, -1))
        anc = tree.anc.gather(1, ids[:, :, None].expand(B, T, N))  # [B, T, N]
        slots = base[:, None] + ids
        mask = window_mask(lengths, base, anc, kv_len)
        eye = torch.eye(T, dtype=torch.bool)[None].expand(B, T, T)
        positions = base[:, None] + tree.depth.gather(1, ids)
        return Block(slots, positions, parent_slots, mask, lengths, advance=False, anc=eye,
                     offsets=slots - lengths[:, None]).to(torch.device(device) if device is not None else None)


_TENSOR_FIELDS = ("slots", "positions", "parent_slots", "mask", "lengths", "anc", "offsets")
_ROOTS: dict = {}  # B -> the structure tensors of B root-only trees


def _tree_one_row_impl(L: int, base: int, tree: TreeBatch, kv_len: int, lo: int, hi: int) -> Block:
    """`Block.tree` for one row on the CPU with Python-int lengths: the same tensors from a handful of ops (this
    runs for every forward of a batch-1 decode, where each small op costs as much as a layer's GEMM)."""
    T = hi - lo
    if T == 1 and lo == 0 and kv_len == base + 1 and base == L:  # the root alone, seeing every slot (AR step)
        here = torch.tensor([[L, L, L - 1]])
        return Block(here[:, 0:1], here[:, 1:2], here[:, 2:3], torch.ones(1, 1, kv_len, dtype=torch.bool),
                     here[0, 0:1], advance=False, anc=tree.anc[:, :1, :1], offsets=here[:, 0:1] - L, start=L,
                     mask_full=True, at_prefix=True)
    slots = torch.arange(base + lo, base + hi)[None]  # [1, T]
    parents = tree.parents[:, lo:hi]
    valid = tree.valid[:, lo:hi]
    parent_slots = torch.where(parents >= 0, parents + base, L - 1).masked_fill_(~valid, -1)
    anc = tree.anc[:, lo:hi, :hi]  # [1, T, hi]
    full = T == 1 and lo == 0 and kv_len == base + 1  # the root alone, seeing every slot (an AR step)
    if full:
        mask = torch.ones(1, 1, kv_len, dtype=torch.bool)
    else:
        mask = torch.zeros(1, T, kv_len, dtype=torch.bool)
        mask[:, :, :L] = True
        mask[:, :, base:base + hi] |= anc
    lengths = torch.tensor([L])
    return Block(slots, tree.depth[:, lo:hi] + base, parent_slots, mask, lengths, advance=False,
                 anc=anc[:, :, lo:hi], offsets=slots - L, start=base + lo, mask_full=full,
                 at_prefix=base == L and lo == 0)


def window_mask(lengths: Tensor, base: Tensor, anc: Tensor, kv_len: int) -> Tensor:
    """[B, T, S] bool: every token sees its row's committed prefix [0, L_b) and the slots base_b + j of the
    tree nodes j it descends from (anc [B, T, n]: row t may see node j). Host tensors in and out (`Block.to`)."""
    B, T, n = anc.shape
    s = torch.arange(kv_len)
    mask = (s[None, :] < lengths[:, None])[:, None, :].expand(B, T, kv_len).clone()  # [B, T, S]
    cols = (base[:, None] + torch.arange(n)[None])[:, None, :].expand(B, T, n)
    mask.scatter_(2, cols, anc | mask.gather(2, cols))  # keep prefix slots a tree node may alias (a committed root)
    return mask


def block_facts(block: Block) -> tuple[bool, bool]:
    """(some row has L_b = 0, some block root continues from scratch): what `SSMCache.plan` branches on, read from
    the block's tensors (host reads when they are on a device: take them from the host copy, `Block.to`)."""
    if block.advance and block.start is not None:  # every row continues from slot `start`: nothing to read
        return block.start == 0, False
    fresh = bool((block.lengths == 0).any())
    if block.advance:
        return fresh, False
    anc = block.anc if block.anc is not None else ancestors(block.slots, block.parent_slots)
    root = anc.to(torch.uint8).argmax(-1)
    return fresh, bool((block.parent_slots.gather(1, root) >= block.lengths[:, None]).any())


def ancestors(slots: Tensor, parent_slots: Tensor) -> Tensor:
    """[B, T, T] bool in-block ancestor-or-self from each token's parent slot (for a Block built without
    `anc`; Block.causal and Block.tree give it), tokens in topological order."""
    B, T = slots.shape
    is_parent = parent_slots[:, :, None] == slots[:, None, :]  # [B, T(i), T(j)]: j is i's in-block parent
    anc = torch.eye(T, dtype=torch.bool, device=slots.device).expand(B, T, T).clone()
    for t in range(1, T):
        anc[:, t] |= (is_parent[:, t, :t, None] & anc[:, :t]).any(1)
    return anc
