"""The inference cache of a Mamba2 / hybrid model: per row, committed SSM and conv states, node scratch, KV.

Rows and slots are those of `runtime.batch` (read its docstring first): row b has committed length L_b
(kept by the engine and passed in every `Block`, never stored here). For the SSM layers:

- **Committed**: the SSM state `ssm` and the conv window `conv` (the last d_conv - 1 pre-conv inputs)
  after slots [0, L_b). An `advance` block (a prefill chunk, one autoregressive token) continues from it
  and replaces it with its final state: L_b grows by T.
- **Scratch**: a tree block leaves the committed state alone and writes every node's state and conv
  window to `scratch_*[:, b, offset]`, offset = slot - L_b (`Block.offsets`); R = num_scratch entries,
  at least the tree bucket. `commit(lengths, paths)` then makes each row's accepted node committed.

Where a forward's token continues from (`plan`), by its parent slot p: an earlier token of the same
block (in-block parent); else the committed state when p = L_b - 1 or p = -1 (zeros when L_b = 0; a
padding token, whose output is discarded, too); else scratch entry p - L_b when p >= L_b (a drafter
growing its tree one level per forward: the previous level's forward wrote it). A slot inside the
committed prefix (0 <= p < L_b - 1) cannot be branched from: an AssertionError.

The plan is built once per forward from the Block's tensors and shared by all layers.

Shape legend: n SSM layers, B rows, R scratch entries, H heads, P head dim, N state size,
Cd conv channels (d_inner + 2 * ngroups * d_state), W d_conv, T new tokens, R' states the roots read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.batch import Block, ancestors as _ancestors, block_facts
from runtime.transfer import to_device
from runtime.models.llama import KVCache


@dataclass
class ForwardPlan:
    """Where one forward's tokens continue from (built by `SSMCache.plan`)."""

    advance: bool
    """A causal block continuing from each row's committed state; its final state becomes committed."""
    fresh: Tensor | None
    """[B] bool: rows with L_b = 0, which start from zeros (None: no such row)."""
    scratch_roots: bool = False
    """Some block root continues from scratch: the roots read one state per node (R' = T), else R' = 1."""
    init_offset: Tensor | None = None
    """[B, T] long: scratch offset of the state node t's block root continues from (scratch_roots only)."""
    from_scratch: Tensor | None = None
    """[B, T] bool: node t's block root continues from scratch (scratch_roots only)."""
    init_index: Tensor | None = None
    """[B, T] long: which of the R' read states node t's path starts from (tree blocks)."""
    anc: Tensor | None = None
    """[B, T, T] bool: in-block ancestor-or-self (tree blocks)."""
    conv_index: Tensor | None = None
    """[B, T, W] long into [the R' read windows (R' x (W - 1)) ; the block's inputs (T)] (tree blocks)."""
    offsets: Tensor | None = None
    """[B, T] long: scratch entry each node's state goes to (tree blocks)."""
    rows: Tensor | None = None
    """[B, T] long: each node's row (index for the scratch reads and writes)."""


class SSMCache:
    def __init__(self, num_ssm_layers: int, rows: int, num_heads: int, head_dim: int, d_state: int, conv_dim: int,
                 d_conv: int, capacity: int, num_scratch: int, kv: KVCache | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        assert d_conv >= 2, d_conv
        n, B, R, W1 = num_ssm_layers, rows, num_scratch, d_conv - 1
        self.capacity = capacity  # slots; SSM layers keep no per-slot memory but honour the KV bound
        self.ssm = torch.zeros(n, B, num_heads, head_dim, d_state, dtype=dtype, device=device)  # [n, B, H, P, N]
        self.conv = torch.zeros(n, B, conv_dim, W1, dtype=dtype, device=device)  # [n, B, Cd, W-1]
        self.scratch_ssm = torch.zeros(n, B, R, num_heads, head_dim, d_state, dtype=dtype,
                                       device=device)  # [n, B, R, H, P, N]
        self.scratch_conv = torch.zeros(n, B, R, conv_dim, W1, dtype=dtype, device=device)  # [n, B, R, Cd, W-1]
        self.kv = kv  # attention layers of a hybrid (None for pure Mamba2)

    @classmethod
    def _view(cls, capacity: int, ssm: Tensor, conv: Tensor, scratch_ssm: Tensor, scratch_conv: Tensor,
              kv: KVCache | None) -> "SSMCache":
        out = cls.__new__(cls)
        out.capacity, out.ssm, out.conv, out.scratch_ssm, out.scratch_conv, out.kv = (
            capacity, ssm, conv, scratch_ssm, scratch_conv, kv)
        return out

    @property
    def rows(self) -> int:
        return self.ssm.shape[1]

    @property
    def num_scratch(self) -> int:
        return self.scratch_ssm.shape[2]

    @property
    def d_conv(self) -> int:
        return self.conv.shape[-1] + 1

    def view_rows(self, lo: int, hi: int) -> "SSMCache":
        """Rows lo..hi-1 as a cache of their own (a view: writes go to this cache)."""
        return SSMCache._view(self.capacity, self.ssm[:, lo:hi], self.conv[:, lo:hi], self.scratch_ssm[:, lo:hi],
                              self.scratch_conv[:, lo:hi], None if self.kv is None else self.kv.view_rows(lo, hi))

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst := row src (a request moving to another row between steps; scratch is not carried: no
        forward reads it before a tree forward of the same step writes it)."""
        self.ssm[:, dst].copy_(self.ssm[:, src])
        self.conv[:, dst].copy_(self.conv[:, src])
        if self.kv is not None:
            self.kv.copy_row(src, dst)

    def reset(self) -> None:
        for t in (self.ssm, self.conv, self.scratch_ssm, self.scratch_conv):
            t.zero_()
        if self.kv is not None:
            self.kv.reset()

    # ---- planning a forward ----------------------------------------------------------------------------
    def plan(self, block: Block) -> ForwardPlan:
        """Resolve where every token of `block` continues from (see the module docstring): vectorised over
        the B x T tokens (a few host reads for the checks and the choice of path)."""
        B, T = block.slots.shape
        lengths = block.lengths
        flags = self.host_flags if self.host_flags is not None else block.host_facts
        if flags is not None:  # host facts given (a traced phase, a block built on the host): no device reads
            return self._plan_given(block, *flags)
        if block.advance:
            if block.start is not None:
                fresh = torch.full((B,), True, device=lengths.device) if block.start == 0 else None
            else:
                fresh = lengths == 0
                fresh = fresh if bool(fresh.any()) else None
            return ForwardPlan(True, fresh)

        slots, parent_slots, offsets = block.slots, block.parent_slots, block.offsets
        L = lengths[:, None]  # [B, 1]
        anc = block.anc if block.anc is not None else _ancestors(slots, parent_slots)  # [B, T, T]
        root_parent = parent_slots.gather(1, anc.to(torch.uint8).argmax(-1))  # [B, T]: where each block root continues
        bad_branch = ((root_parent >= 0) & (root_parent < L - 1)).any()
        lo_off, hi_off = offsets.aminmax()
        fresh = lengths == 0
        scratch_roots, any_fresh, branch = (bool((root_parent >= L).any()), bool(fresh.any()), bool(bad_branch))
        assert not branch, ("a token's parent slot lies inside the committed prefix (before L_b - 1): a forward "
                            "can only continue from the last committed slot, the block, or scratch")
        assert 0 <= int(lo_off) and int(hi_off) < self.num_scratch, (
            f"tree nodes write scratch offsets {int(lo_off)}..{int(hi_off)}, outside [0, {self.num_scratch}): "
            "new_cache(num_scratch=...) must cover the tree bucket")
        return self._tree_plan(block, fresh if any_fresh else None, scratch_roots)

    def _tree_plan(self, block: Block, fresh: Tensor | None, scratch_roots: bool) -> ForwardPlan:
        """A tree block's plan once its host facts are known (no host reads)."""
        B, T = block.slots.shape
        slots, parent_slots, offsets = block.slots, block.parent_slots, block.offsets
        L = block.lengths[:, None]  # [B, 1]
        anc = block.anc if block.anc is not None else _ancestors(slots, parent_slots)  # [B, T, T]
        rank = anc.cumsum(-1) - 1  # [B, T, T]: at node t's in-block ancestors, their depth 0..depth_t
        depth = rank[..., -1]  # [B, T] in-block depth
        root = anc.to(torch.uint8).argmax(-1)  # [B, T]: the first ancestor-or-self (topological order)
        root_parent = parent_slots.gather(1, root)  # [B, T]: the slot each node's block root continues from
        from_scratch = root_parent >= L

        # conv windows: entry r (oldest first) of node t is its k-th newest path input, k = W-1-r: the in-block
        # ancestor at depth depth_t - k when that is >= 0, else entry k - depth_t from the end of the window
        # its root read (R' windows of W-1 entries, then the block's T inputs)
        W1 = self.d_conv - 1
        init_index = root if scratch_roots else torch.zeros_like(root)  # [B, T]
        R_read = T if scratch_roots else 1
        need = depth[..., None] - torch.arange(W1, -1, -1, device=slots.device)  # [B, T, W] depth of entry r
        at = (anc[:, :, None, :] & (rank[:, :, None, :] == need[..., None])).to(torch.uint8).argmax(-1)  # [B, T, W]
        conv_index = torch.where(need >= 0, R_read * W1 + at, init_index[..., None] * W1 + W1 + need)
        return ForwardPlan(False, fresh, scratch_roots,
                           (root_parent - L).clamp(min=0) if scratch_roots else None,
                           from_scratch if scratch_roots else None, init_index, anc, conv_index, offsets,
                           torch.arange(B, device=slots.device)[:, None].expand(B, T))

    host_flags: tuple[bool, bool] | None = None
    """(some row has L_b = 0, some block root continues from scratch) when known without reading tensors: a traced
    phase (runtime/phases.py) sets them on its cache view, from `facts(block)` taken on the host at dispatch."""

    def facts(self, block: Block) -> tuple[bool, bool]:
        """The two host facts `plan` branches on (see host_flags): the block's own (`Block.host_facts`) when it was
        built on the host, else read from its tensors."""
        return block.host_facts if block.host_facts is not None else block_facts(block)

    def _plan_given(self, block: Block, any_fresh: bool, scratch_roots: bool) -> ForwardPlan:
        """`plan` with its host facts given: the same tensors, computed without a host read."""
        fresh = (block.lengths == 0) if any_fresh else None
        if block.advance:
            return ForwardPlan(True, fresh)
        return self._tree_plan(block, fresh, scratch_roots)

    # ---- per layer ---------------------------------------------------------------------------------------
    def read(self, layer: int, plan: ForwardPlan) -> tuple[Tensor, Tensor]:
        """(ssm [B, R', H, P, N], conv [B, R', Cd, W-1]): the states the block's roots continue from.
        R' = 1 (each row's committed state) unless some root continues from scratch (R' = T, per node)."""
        ssm, conv = self.ssm[layer][:, None], self.conv[layer][:, None]  # [B, 1, ...] views
        if torch.is_grad_enabled():  # autograd must keep what it read, not a view `write` overwrites
            ssm, conv = ssm.clone(), conv.clone()
        if plan.fresh is not None:
            keep = ~plan.fresh[:, None, None, None]
            ssm = torch.where(keep[..., None], ssm, torch.zeros((), dtype=ssm.dtype, device=ssm.device))
            conv = torch.where(keep, conv, torch.zeros((), dtype=conv.dtype, device=conv.device))
        if not plan.scratch_roots:
            return ssm, conv
        s = self.scratch_ssm[layer][plan.rows, plan.init_offset]  # [B, T, H, P, N]
        w = self.scratch_conv[layer][plan.rows, plan.init_offset]  # [B, T, Cd, W-1]
        pick = plan.from_scratch[:, :, None, None]
        return torch.where(pick[..., None], s, ssm), torch.where(pick, w, conv)

    def write(self, layer: int, plan: ForwardPlan, ssm: Tensor, conv: Tensor) -> None:
        """Advance: the final ssm [B, H, P, N] and conv [B, Cd, W-1] become the committed state.
        Tree: each node's ssm [B, T, H, P, N] and conv [B, T, Cd, W-1] go to its scratch entry."""
        if plan.advance:
            self.ssm[layer].copy_(ssm)
            self.conv[layer].copy_(conv)
            return
        self.scratch_ssm[layer][plan.rows, plan.offsets] = ssm.to(self.scratch_ssm.dtype)
        self.scratch_conv[layer][plan.rows, plan.offsets] = conv.to(self.scratch_conv.dtype)

    # ---- after verification --------------------------------------------------------------------------
    def commit(self, lengths: list[int], paths: list[list[int]]) -> None:
        """Keep each row's accepted path (node offsets of the tree forward, ascending from 0, as in
        `KVCache.commit`): the state after its last node becomes committed (its scratch entry holds the whole
        path's state and conv window); the attention layers' KV is compacted. L_b grows by len(paths[b]).
        paths may cover the first B <= rows rows only."""
        B = len(paths)  # rows 0..B-1 (the engine's active rows come first)
        assert len(lengths) == B <= self.rows, (len(paths), len(lengths), self.rows)
        rows = torch.arange(B, device=self.ssm.device)
        last = to_device(torch.tensor([p[-1] for p in paths]), self.ssm.device)
        self.ssm[:, :B] = self.scratch_ssm[:, rows, last]
        self.conv[:, :B] = self.scratch_conv[:, rows, last]
        if self.kv is not None:
            self.kv.commit(lengths, paths)
