"""The kernels as `torch.library` custom ops (namespace `spec`): what torch.export, AOTInductor and TensorRT see.

Each op is one opaque node in an exported graph: Inductor must not decompose attention over a large static
KV cache (on the CPU that made GQA SDPA 2.5x slower than eager). Per op:
- a CPU implementation: the torch reference (or SDPA), bitwise what the eager runtime computes;
- a CUDA implementation: the Triton kernel's launcher (`*_triton` below; callable on CPU tensors under
  TRITON_INTERPRET=1, which is how the tests check it);
- a fake (meta) implementation for export: output shapes, dtypes and strides only.

    spec::cached_attention  write the block's K/V at `slots`, GQA SDPA over slots [0, kv_len)
    spec::tree_attention    write the tree's K/V at prefix_len + i, attend to the prefix + own ancestors
    spec::ssm_tree_scan     Mamba2's tree-masked SSD scan (one initial state per row)
    spec::kv_compact        move each row's accepted slots next to its prefix, in place
    spec::fused_accept      walk each row's draft tree (greedy / Gumbel sample-match) -> packed result

Why `custom_op` and not `triton_op`: a triton_op is decomposed into its body whenever FunctionalTensorMode
runs (AOTInductor does), on every device, so on the CPU the op would not stay one node and its fake would
need Triton. Here the CUDA implementations launch the kernels directly; AOTInductor calls them through its
proxy executor. Importing this module needs neither Triton nor CUDA: the launchers check for Triton when
called.

Shape legend: B batch, H query heads, Hkv key/value heads, T new tokens, C cache capacity (slots),
S attended slots, D head dim, W = ceil(T / 64) bitset words, L layers, M slots moved per row.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import custom_op

from codegen import fused_accept as _fa
from codegen import kv_compact as _kc
from codegen import ssm_tree_scan as _ss
from codegen import tree_attention as _ta


def _write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> None:
    """k, v: [B, Hkv, T, D] into k_cache, v_cache: [B, Hkv, C, D] at slots [B, T] (by index)."""
    B, Hkv, T, D = k.shape
    idx = slots[:, None, :, None].expand(B, Hkv, T, D)
    k_cache.scatter_(2, idx, k)
    v_cache.scatter_(2, idx, v)


def _tree_slots(prefix_len: Tensor, T: int) -> Tensor:
    """[B] prefix lengths -> [B, T] slots prefix_len + i."""
    return prefix_len.long()[:, None] + torch.arange(T, device=prefix_len.device)


# ---------------------------------------------------------------------------------------------------
# cached_attention: the model's attention over its static KV cache (runtime/models/llama.py)
# ---------------------------------------------------------------------------------------------------
@custom_op("spec::cached_attention", mutates_args=("k_cache", "v_cache"))
def cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                     mask: Optional[Tensor], kv_len: int, scale: Optional[float] = None) -> Tensor:
    """Write the block's keys/values at `slots`, then GQA SDPA over cache slots [0, kv_len); every device.

    q: [B, H, T, D]; k, v: [B, Hkv, T, D]; k_cache, v_cache: [B, Hkv, C, D]; slots: [B, T] long;
    mask: [B, 1, T, kv_len] additive (0 / -inf) in q's dtype, or None (every slot visible). -> [B, H, T, D].
    The same arithmetic as `llama.cached_attention` in eager, so its result is bitwise the same.
    """
    _write_kv(k, v, k_cache, v_cache, slots)
    return F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask,
                                          scale=scale, enable_gqa=True)


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, slots, mask, kv_len, scale=None):
    # SDPA on the fake cache window gives the real output's strides (CPU flash attention returns [B, T, H, D]
    # memory transposed)
    return F.scaled_dot_product_attention(q, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask,
                                          scale=scale, enable_gqa=True)


# ---------------------------------------------------------------------------------------------------
# tree_attention
# ---------------------------------------------------------------------------------------------------
@custom_op("spec::tree_attention", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def tree_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor,
                   ancestor_bits: Tensor, scale: Optional[float] = None) -> Tensor:
    """Write tree node i's key/value at slot prefix_len + i, then attend to the prefix and its ancestors.

    q: [B, H, T, D]; k, v: [B, Hkv, T, D]; k_cache, v_cache: [B, Hkv, C, D]; prefix_len: [B] long;
    ancestor_bits: [B, T, W] or [T, W] int64 (`tree_attention.pack_bitsets`). -> [B, H, T, D] in q's dtype
    and layout. CPU: `tree_attention_ref` (fp32 SDPA; reads max(prefix_len) on the host).
    """
    _write_kv(k, v, k_cache, v_cache, _tree_slots(prefix_len, q.shape[2]))
    return _ta.tree_attention_ref(q, k_cache, v_cache, prefix_len, ancestor_bits, scale)


@tree_attention.register_kernel("cuda")
def tree_attention_triton(q, k, v, k_cache, v_cache, prefix_len, ancestor_bits, scale=None):
    """The Triton kernel (codegen/tree_attention.py); prefix_len stays on the device."""
    _write_kv(k, v, k_cache, v_cache, _tree_slots(prefix_len, q.shape[2]))
    return _ta.tree_attention(q, k_cache, v_cache, prefix_len, ancestor_bits, scale)


@tree_attention.register_fake
def _(q, k, v, k_cache, v_cache, prefix_len, ancestor_bits, scale=None):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------------
# ssm_tree_scan
# ---------------------------------------------------------------------------------------------------
@custom_op("spec::ssm_tree_scan", mutates_args=(), device_types="cpu")
def ssm_tree_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, anc: Tensor, D: Optional[Tensor],
                  init_state: Optional[Tensor], return_states: bool) -> tuple[Tensor, Tensor]:
    """Outputs y: [b, T, H, P] (and states [b, T, H, P, N]) of every tree node; one block root per row.

    Arguments as `ssm_tree_scan.ssm_tree_scan` (anc: [T, T] or [b, T, T] bool; init_state: [b, H, P, N] or
    None for zeros). states is an empty tensor when return_states is False (an op returns no None).
    CPU: `ssm_tree_scan_ref`.
    """
    y, states = _ss.ssm_tree_scan_ref(x, dt, A, B, C, anc, D=D,
                                      init_states=None if init_state is None else init_state[:, None],
                                      return_states=return_states)
    return y, (states if return_states else y.new_empty(0))


@ssm_tree_scan.register_kernel("cuda")
def ssm_tree_scan_triton(x, dt, A, B, C, anc, D, init_state, return_states):
    """The Triton kernel (codegen/ssm_tree_scan.py); fp32 outputs, contiguous."""
    y, states = _ss.ssm_tree_scan(x, dt, A, B, C, anc, D=D, init_state=init_state, return_states=return_states)
    return y, (states if return_states else y.new_empty(0))


@ssm_tree_scan.register_fake
def _(x, dt, A, B, C, anc, D, init_state, return_states):
    b, T, H, P = x.shape
    N = B.shape[-1]
    cdt = torch.promote_types(x.dtype, torch.float32)
    if x.device.type == "cpu":  # the reference computes head-major and returns transposed views
        y = x.new_empty(b, H, T, P, dtype=cdt).transpose(1, 2)
        states = x.new_empty(b, H, T, P, N, dtype=cdt).transpose(1, 2) if return_states else None
    else:
        y = x.new_empty(b, T, H, P, dtype=torch.float32)
        states = x.new_empty(b, T, H, P, N, dtype=torch.float32) if return_states else None
    return y, (states if return_states else y.new_empty(0))


# ---------------------------------------------------------------------------------------------------
# kv_compact
# ---------------------------------------------------------------------------------------------------
@custom_op("spec::kv_compact", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def kv_compact(k_cache: Tensor, v_cache: Tensor, src_slots: Tensor, num_slots: Tensor, dst_start: Tensor) -> None:
    """cache[..., b, :, dst_start[b] + i] = cache[..., b, :, src_slots[b, i]] for i < num_slots[b], in place.

    k_cache, v_cache: [L, B, Hkv, C, D] or [B, Hkv, C, D]; src_slots: [B, M] or [M] long (ascending,
    src_slots[b, i] >= dst_start[b] + i); num_slots, dst_start: [B] long. CPU: `kv_compact_ref`.
    """
    if k_cache.dim() == 4:
        k_cache, v_cache = k_cache.unsqueeze(0), v_cache.unsqueeze(0)
    _kc.kv_compact_ref(k_cache, v_cache, src_slots, num_slots, dst_start)


@kv_compact.register_kernel("cuda")
def kv_compact_triton(k_cache, v_cache, src_slots, num_slots, dst_start):
    """The Triton kernel (codegen/kv_compact.py); nothing is read on the host."""
    _kc.kv_compact(k_cache, v_cache, src_slots, num_slots, dst_start)


@kv_compact.register_fake
def _(k_cache, v_cache, src_slots, num_slots, dst_start):
    return None


# ---------------------------------------------------------------------------------------------------
# fused_accept
# ---------------------------------------------------------------------------------------------------
@custom_op("spec::fused_accept", mutates_args=(), device_types="cpu")
def fused_accept(scores: Tensor, parents: Tensor, tokens: Tensor, max_depth: int,
                 gumbel: Optional[Tensor] = None) -> Tensor:
    """Walk each row's draft tree; -> packed [B, max_depth + 3] int64 (`FusedAcceptResult.from_packed`).

    scores: [B, N, V] or [N, V]; parents, tokens: [B, N] or [N]; gumbel: [B, max_depth + 1, V] fp32 or None
    (greedy). CPU: `fused_accept_ref`.
    """
    return _fa.fused_accept_ref(scores, parents, tokens, max_depth, gumbel).packed


@fused_accept.register_kernel("cuda")
def fused_accept_triton(scores, parents, tokens, max_depth, gumbel=None):
    """The Triton kernel (codegen/fused_accept.py): one program per row, no host sync."""
    return _fa.fused_accept(scores, parents, tokens, max_depth, gumbel).packed


@fused_accept.register_fake
def _(scores, parents, tokens, max_depth, gumbel=None):
    B = scores.shape[0] if scores.dim() == 3 else 1
    return scores.new_empty(B, max_depth + 3, dtype=torch.int64)
