"""KV compaction: after acceptance, move the accepted tree slots' keys and values next to the prefix.

A verify forward wrote node i of the tree to slot prefix_len + i. Once a root-to-node path is
accepted, its slots (ascending: an ancestor has a smaller id) must become contiguous at
dst_start (= prefix_len), in every layer and KV head, before the next step:

    cache[..., dst_start + i, :] = cache[..., src_slots[i], :]     for i < num_slots

in place. Sources are ascending and src_slots[i] >= dst_start + i, so a destination is never a
*later* source, but it can be an *earlier* one (dst_start = 0, src = [1, 2]: row 1 writes slot 1,
which row 0 reads). One program owns one (layer, request, KV head) and gathers all of its rows into
registers, waits at a barrier, then scatters them: the gathered temp makes overlap safe. Rows
already in place (src == dst) are neither read nor written.

Everything that changes per step (the slots, their count, dst_start) is a device tensor, read only
by the kernel, so the launch is graph-capturable. The kernel mutates the cache, so it is not
autotuned; `num_warps` comes from the hand-tuned table in `KVCompactSpec.num_warps`.

Shape legend: L layers, B batch, Hkv KV heads, C cache capacity (slots), D head dim,
M max slots moved per request (max_depth + 1).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from codegen.common import next_power_of_2, interpreting as _interpreting, DTYPES, per_request as _per_request

try:  # Triton is an optional extra (`gpu`, `dev`): the Spec and the reference work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None



# ---------------------------------------------------------------------------------------------------
# compile-time parameters
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCompactSpec:
    """Everything that selects a compiled kv-compact kernel."""

    head_dim: int
    """D; padded internally to a power of two."""
    max_slots: int
    """M, the most slots one request can keep (the tree's max depth + 1)."""
    dtype: str
    """"float16" | "bfloat16" | "float32", the cache dtype (sets the bytes a program moves)."""

    def __post_init__(self):
        assert self.head_dim >= 1 and self.max_slots >= 1, self
        assert self.dtype in DTYPES.values(), f"dtype must be one of {sorted(DTYPES.values())}, got {self.dtype}"

    @property
    def block_m(self) -> int:
        return next_power_of_2(self.max_slots)

    @property
    def block_d(self) -> int:
        return next_power_of_2(self.head_dim)

    @property
    def num_warps(self) -> int:
        # Hand-tuned (not autotuned: the kernel writes the cache in place). A program holds
        # 2 * BLOCK_M * BLOCK_D elements (K and V) in registers between gather and scatter:
        #   <= 2048 elements (e.g. M 8, D 128)   -> 2 warps
        #   <= 8192 elements (e.g. M 32, D 128)  -> 4 warps
        #   larger (e.g. M 32, D 256)            -> 8 warps
        # Never timed on a GPU yet; revisit with codegen/autotune.py on scratch copies.
        n = 2 * self.block_m * self.block_d
        return 2 if n <= 2048 else 4 if n <= 8192 else 8

    @property
    def name(self) -> str:
        return f"kv_compact_d{self.head_dim}_m{self.block_m}_{self.dtype}"

    def constexprs(self) -> dict[str, int]:
        return {"HEAD_DIM": self.head_dim, "BLOCK_M": self.block_m, "BLOCK_D": self.block_d}


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
def kv_compact_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor,
                   num_slots: int | torch.Tensor, dst_start: int | torch.Tensor) -> None:
    """Index copy per request (gather first, so overlap is safe), as `KVCache.compact`; in place."""
    # k_cache, v_cache: [L, B, Hkv, C, D]; src_slots: [B, M] | [M]; num_slots, dst_start: int | [] | [B]
    B = k_cache.shape[1]
    src = src_slots.expand(B, src_slots.shape[-1]) if src_slots.dim() == 1 else src_slots
    num, dst = _per_request(num_slots, B, "cpu").tolist(), _per_request(dst_start, B, "cpu").tolist()
    for b in range(B):
        idx = src[b, :num[b]].to(device=k_cache.device, dtype=torch.long)
        assert bool((idx[1:] > idx[:-1]).all()) and bool((idx >= dst[b] + torch.arange(num[b])).all()), \
            f"request {b}: src slots {idx.tolist()} must be ascending and >= dst_start {dst[b]} + i"
        for cache in (k_cache, v_cache):
            cache[:, b, :, dst[b]:dst[b] + num[b]] = cache[:, b, :, idx]


# ---------------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------------
def _kv_compact_kernel(
    # Pointers to matrices
    K, V, Src, NumSlots, DstStart,
    # Matrix dimensions
    B, NUM_KV_HEADS,
    # Strides (K and V share them)
    stride_l, stride_b, stride_h, stride_c, stride_d,
    stride_src_b, stride_src_m, stride_num_b, stride_dst_b,
    # Meta-parameters
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = (pid % NUM_KV_HEADS).to(tl.int64)
    b = ((pid // NUM_KV_HEADS) % B).to(tl.int64)
    layer = (pid // (NUM_KV_HEADS * B)).to(tl.int64)
    m = tl.load(NumSlots + b * stride_num_b)
    dst0 = tl.load(DstStart + b * stride_dst_b)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    src = tl.load(Src + b * stride_src_b + offs_m * stride_src_m, mask=offs_m < m, other=0).to(tl.int64)
    dst = (dst0 + offs_m).to(tl.int64)
    move = (offs_m < m) & (src != dst)
    mask = move[:, None] & (offs_d < HEAD_DIM)[None, :]
    base = layer * stride_l + b * stride_b + h * stride_h
    src_ptrs = base + src[:, None] * stride_c + offs_d[None, :] * stride_d  # [BLOCK_M, BLOCK_D]
    dst_ptrs = base + dst[:, None] * stride_c + offs_d[None, :] * stride_d  # [BLOCK_M, BLOCK_D]

    k = tl.load(K + src_ptrs, mask=mask)
    v = tl.load(V + src_ptrs, mask=mask)
    tl.debug_barrier()  # every row is read before any is written: a destination may be an earlier source
    tl.store(K + dst_ptrs, k, mask=mask)
    tl.store(V + dst_ptrs, v, mask=mask)


@functools.cache
def _kernel(interpret: bool):
    """Decorated on first launch rather than at import.

    `triton.jit` decides between compiling and interpreting when it runs, from TRITON_INTERPRET; doing
    it here lets a CPU test set the variable even if this module was imported earlier.
    """
    assert triton is not None, "kv_compact needs Triton: pip install -e '.[gpu]'"
    del interpret  # only the cache key
    return triton.jit(_kv_compact_kernel)


# ---------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------
def kv_compact(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor,
               num_slots: int | torch.Tensor, dst_start: int | torch.Tensor,
               spec: KVCompactSpec | None = None) -> None:
    """Move slots src_slots[b, :num_slots[b]] to dst_start[b], dst_start[b] + 1, ... in place.

    Preconditions (not checked: that would read device values): each request's first num_slots
    sources are ascending, src_slots[b, i] >= dst_start[b] + i, and all are < C. Entries past
    num_slots are ignored. Pass ints only outside graph capture (they become fresh tensors).
    """
    # k_cache, v_cache: [L, B, Hkv, C, D] (or one layer [B, Hkv, C, D]); src_slots: [B, M] | [M] int;
    # num_slots, dst_start: int | [] | [B] int
    if k_cache.dim() == 4:
        k_cache, v_cache = k_cache.unsqueeze(0), v_cache.unsqueeze(0)
    assert k_cache.dim() == 5 and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), \
        f"k_cache and v_cache must be [L, B, Hkv, C, D] with equal strides, " \
        f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
    L, B, Hkv, C, D = k_cache.shape
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in DTYPES, \
        f"cache dtype must be one of {list(DTYPES)}, got {k_cache.dtype} and {v_cache.dtype}"
    assert src_slots.dim() in (1, 2) and (src_slots.dim() == 1 or src_slots.shape[0] == B) \
        and not src_slots.is_floating_point(), \
        f"src_slots must be integer [M] or [{B}, M], got {src_slots.dtype} {tuple(src_slots.shape)}"
    assert src_slots.device == k_cache.device == v_cache.device, "all inputs must be on one device"
    M = src_slots.shape[-1]
    if not isinstance(num_slots, torch.Tensor):
        assert 0 <= num_slots <= M, f"num_slots {num_slots} must be in [0, {M}]"
    if not isinstance(dst_start, torch.Tensor):
        assert 0 <= dst_start < C, f"dst_start {dst_start} must be in [0, {C})"
    spec = spec or KVCompactSpec(head_dim=D, max_slots=M, dtype=DTYPES[k_cache.dtype])
    assert (spec.head_dim, spec.dtype) == (D, DTYPES[k_cache.dtype]) and M <= spec.block_m, \
        f"inputs (D={D}, {M} slots, {k_cache.dtype}) do not fit the compiled {spec}"

    src = src_slots.unsqueeze(0) if src_slots.dim() == 1 else src_slots  # [B or 1, M]
    num = _per_request(num_slots, B, k_cache.device)
    dst = _per_request(dst_start, B, k_cache.device)
    _kernel(_interpreting())[(L * B * Hkv,)](
        k_cache, v_cache, src, num, dst,
        B, Hkv,
        *k_cache.stride(),
        0 if src.shape[0] == 1 else src.stride(0), src.stride(1), num.stride(0), dst.stride(0),
        **spec.constexprs(), num_warps=spec.num_warps,
    )
