"""The inference cache of a Mamba2 / hybrid model: committed SSM and conv states, per-node scratch, KV.

Slots are the same as in the Llama `KVCache`: the token at cache slot s is the s-th token of the text,
and a tree forward at `start` puts node i at slot start + i. For the SSM layers:

- **Committed**: `length` (ℓ), the SSM state `ssm` and the conv window `conv` (the last d_conv - 1
  pre-conv inputs) after slots [0, ℓ). A causal forward (no mask) continuing from slot start - 1
  *advances* it: afterwards ℓ = start + T. `compact` also sets it.
- **Scratch**: a tree forward (with a mask) leaves the committed state alone and writes each node's
  state and conv window to a small ring of `num_scratch` entries, tagged with the node's slot. A
  later forward can continue from any tagged slot: this is how a drafter grows a tree level by level,
  and how the decode loop goes on after a step that accepted only the root (it calls no `compact`).
  Entries hold whole states (H * P * N per SSM layer and batch row), so size the ring from the plan:
  tree size + 1 entries let one tree continue from the previous tree's root.

Every forward resolves, for each node whose parent lies before the block, where the parent's state
is: slot -1 (nothing before) is zeros, a slot >= ℓ is read from scratch (its tag must match), slot
ℓ - 1 is the committed state; any other slot is inside the committed prefix and cannot be branched
from (an AssertionError: the caller broke the slot contract). A forward at start 0 resets the cache.

`compact(src_slots, dst_start)` commits the state after the last of `src_slots` (its scratch entry
already holds the whole path's state and conv window), sets ℓ = dst_start + len(src_slots), drops the
scratch, and moves the attention layers' KV as `KVCache.compact` does.

Shape legend: n SSM layers, R scratch entries, b batch, H heads, P head dim, N state size,
Cd conv channels (d_inner + 2 * ngroups * d_state), W d_conv, T new tokens, S start + T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.models.llama import KVCache


@dataclass
class ForwardPlan:
    """How one forward's nodes continue from earlier slots (built by `SSMCache.plan`)."""

    start: int
    T: int
    chain: bool
    """No mask: a causal block continuing from slot start - 1; it advances the committed state."""
    sources: list[int]
    """Distinct slots whose states the block's roots continue from (-1: the empty prefix)."""
    parents: list[int]
    """In-block parent of each node (-1: a block root, continuing from sources[init_index[i]])."""
    init_index: Tensor | None = None
    """[T] long: which source node i's path starts from (tree forwards only)."""
    anc: Tensor | None = None
    """[T, T] bool: in-block ancestor-or-self mask (tree forwards only)."""
    conv_index: Tensor | None = None
    """[T, W] long into [the sources' windows (R' x (W - 1)) ; the block's inputs (T)] (tree forwards)."""


class SSMCache:
    def __init__(self, num_ssm_layers: int, batch: int, num_heads: int, head_dim: int, d_state: int, conv_dim: int,
                 d_conv: int, capacity: int, num_scratch: int, kv: KVCache | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        assert d_conv >= 2, d_conv
        n, b, W1 = num_ssm_layers, batch, d_conv - 1
        self.d_conv = d_conv
        self.capacity = capacity  # slots; SSM layers keep no per-slot memory but honour the KV bound
        self.ssm = torch.zeros(n, b, num_heads, head_dim, d_state, dtype=dtype, device=device)  # [n, b, H, P, N]
        self.conv = torch.zeros(n, b, conv_dim, W1, dtype=dtype, device=device)  # [n, b, Cd, W-1]
        self.scratch_ssm = torch.zeros(n, num_scratch, b, num_heads, head_dim, d_state, dtype=dtype,
                                       device=device)  # [n, R, b, H, P, N]
        self.scratch_conv = torch.zeros(n, num_scratch, b, conv_dim, W1, dtype=dtype,
                                        device=device)  # [n, R, b, Cd, W-1]
        self.tags = [-1] * num_scratch  # the slot each scratch entry holds (-1: free)
        self.length = 0
        self.kv = kv  # attention layers of a hybrid (None for pure Mamba2)

    @property
    def num_scratch(self) -> int:
        return len(self.tags)

    def reset(self) -> None:
        self.length = 0
        self.tags = [-1] * self.num_scratch
        self.ssm.zero_()
        self.conv.zero_()
        if self.kv is not None:
            self.kv.reset()

    # ---- planning a forward ----------------------------------------------------------------------------
    def plan(self, start: int, T: int, attn_mask: Tensor | None) -> ForwardPlan:
        """Resolve where every node of a forward at `start` continues from. attn_mask: [T, start + T] bool."""
        if start == 0:  # a new text
            self.length = 0
            self.tags = [-1] * self.num_scratch
        if attn_mask is None:
            src = start - 1
            self._check_source(src)
            return ForwardPlan(start, T, True, [src], list(range(-1, T - 1)))
        assert T <= self.num_scratch, f"a tree of {T} nodes needs num_scratch >= {T} (have {self.num_scratch})"
        parents_abs = _parents_from_mask(attn_mask, start)
        parents = [p - start if p >= start else -1 for p in parents_abs]
        sources = sorted({p for p in parents_abs if p < start})
        for s in sources:
            self._check_source(s)
        root = list(range(T))  # index of node i's block root
        for i, q in enumerate(parents):
            assert q < i, f"node {i} has in-block parent {q}: nodes must come in topological order"
            if q >= 0:
                root[i] = root[q]
        init_index = [sources.index(parents_abs[root[i]]) for i in range(T)]
        anc = [[False] * T for _ in range(T)]
        for i, q in enumerate(parents):
            if q >= 0:
                anc[i] = list(anc[q])
            anc[i][i] = True
        W, W1 = self.d_conv, self.d_conv - 1
        conv_index = []
        for i in range(T):
            chain, j = [], i  # i and its in-block ancestors, newest first
            while j >= 0 and len(chain) < W:
                chain.append(len(sources) * W1 + j)
                j = parents[j]
            k = W - len(chain)  # the oldest k inputs come from the root's source window
            src = init_index[i] * W1
            conv_index.append(list(range(src + W1 - k, src + W1)) + chain[::-1])
        dev = attn_mask.device
        return ForwardPlan(start, T, False, sources, parents, torch.tensor(init_index, device=dev),
                           torch.tensor(anc, device=dev), torch.tensor(conv_index, device=dev))

    def _check_source(self, slot: int) -> None:
        if slot == -1 or slot == self.length - 1:
            return
        assert slot >= self.length, (f"slot {slot} lies inside the committed prefix (length {self.length}): "
                                     "a forward can only continue from the last committed slot or from scratch")
        assert self.tags[slot % self.num_scratch] == slot, f"slot {slot} is not in scratch (was it ever written?)"

    # ---- per layer ---------------------------------------------------------------------------------------
    def read(self, layer: int, plan: ForwardPlan) -> tuple[Tensor, Tensor]:
        """(ssm [b, R', H, P, N], conv [b, R', Cd, W-1]): the states the block's roots continue from.

        Copies (torch.stack), so a node may reuse the ring entry of its own source when the layer writes."""
        ssm, conv = [], []
        for s in plan.sources:
            if s == -1:
                ssm.append(torch.zeros_like(self.ssm[layer]))
                conv.append(torch.zeros_like(self.conv[layer]))
            elif s >= self.length:
                r = s % self.num_scratch
                ssm.append(self.scratch_ssm[layer, r])
                conv.append(self.scratch_conv[layer, r])
            else:
                ssm.append(self.ssm[layer])
                conv.append(self.conv[layer])
        return torch.stack(ssm, 1), torch.stack(conv, 1)

    def write(self, layer: int, plan: ForwardPlan, ssm: Tensor, conv: Tensor) -> None:
        """Chain: the final ssm [b, H, P, N] and conv [b, Cd, W-1] become the committed state.
        Tree: each node's ssm [b, T, H, P, N] and conv [b, T, Cd, W-1] go to its scratch entry."""
        if plan.chain:
            self.ssm[layer].copy_(ssm)
            self.conv[layer].copy_(conv)
            return
        ring = torch.tensor([(plan.start + i) % self.num_scratch for i in range(plan.T)], device=ssm.device)
        self.scratch_ssm[layer].index_copy_(0, ring, ssm.transpose(0, 1).to(self.scratch_ssm.dtype))
        self.scratch_conv[layer].index_copy_(0, ring, conv.transpose(0, 1).to(self.scratch_conv.dtype))

    def finish(self, plan: ForwardPlan) -> None:
        """After every layer ran: advance the committed length (chain) or tag the scratch (tree)."""
        if plan.chain:
            self.length = plan.start + plan.T
            self.tags = [-1] * self.num_scratch
        else:
            for i in range(plan.T):
                self.tags[(plan.start + i) % self.num_scratch] = plan.start + i

    # ---- after verification --------------------------------------------------------------------------
    def compact(self, src_slots: Tensor, dst_start: int) -> None:
        """Keep `src_slots` (a root-to-node path, src_slots[0] == dst_start) as slots dst_start, dst_start+1, ..."""
        # src_slots: [m]
        m = src_slots.numel()
        last = int(src_slots[-1])
        assert dst_start >= self.length or (m == 1 and last == self.length - 1), (dst_start, self.length)
        if last != self.length - 1:
            r = last % self.num_scratch
            assert self.tags[r] == last, f"slot {last} is not in scratch"
            self.ssm.copy_(self.scratch_ssm[:, r])
            self.conv.copy_(self.scratch_conv[:, r])
        self.length = dst_start + m
        self.tags = [-1] * self.num_scratch
        if self.kv is not None:
            self.kv.compact(src_slots, dst_start)

    def prefix_state(self, length: int) -> tuple[Tensor, Tensor]:
        """(ssm [n, b, H, P, N], conv [n, b, Cd, W-1]) after slots [0, length), committed or in scratch."""
        if length == self.length:
            return self.ssm, self.conv
        r = (length - 1) % self.num_scratch
        assert length > self.length and self.tags[r] == length - 1, (length, self.length)
        return self.scratch_ssm[:, r], self.scratch_conv[:, r]


def _parents_from_mask(attn_mask: Tensor, start: int) -> list[int]:
    """Node i's parent slot: the largest j != start + i with attn_mask[i, j] (-1 if none)."""
    # attn_mask: [T, S]
    T, S = attn_mask.shape
    assert S == start + T, (attn_mask.shape, start)
    m = attn_mask.clone()
    rows = torch.arange(T, device=m.device)
    assert bool(m[rows, start + rows].all()), "every node must see itself"
    m[rows, start + rows] = False
    slots = torch.arange(S, device=m.device).expand(T, S)
    return torch.where(m, slots, -1).amax(dim=1).tolist()
