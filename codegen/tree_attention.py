"""Tree attention: T new tree tokens attend to a committed prefix plus their own ancestors.

One verify forward scores a whole draft tree. Its T tokens have already written their keys and values
to cache slots [prefix_len, prefix_len + T) (node i at slot prefix_len + i); each query row i sees
every prefix slot and, inside the tree, exactly the nodes whose bit is set in its ancestor-or-self
bitset (`TreeTopology.bitsets()`, packed by `pack_bitsets` into int64 words). In attention-gym terms
the mask_mod is `kv < prefix_len or ancestor[q, kv - prefix_len]`.

The kernel is a flash-attention forward (Triton tutorial `06-fused-attention.py`) in two stages:
1. the prefix, every slot visible, only the last block bounds-masked;
2. the tree block, masked by the bitsets; a key block never straddles a 64-bit word (BLOCK_N | 64).
Grouped-query heads are packed into the rows of one program (row r = g * T + t for query head
hkv * GROUP + g), so each key/value block is loaded once per KV head rather than once per query head.
Softmax is online, in fp32 and base 2; the output has q's dtype.

Compile-time: head_dim, T (`TreeAttentionSpec`, in spec_compiler/kernels.py so the plan can name it), dtype,
block sizes. Run time: batch, the heads' ratio, and `prefix_len`, which is read from a device tensor [B]
(one value per request, so ragged batches work and CUDA graphs can replay with new lengths without
recompiling or re-capturing).

Shape legend: B batch, H query heads, Hkv key/value heads, GROUP = H // Hkv, T tree tokens,
C cache capacity (slots), D head dim, W = ceil(T / 64) bitset words per row.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from codegen.common import next_power_of_2, interpreting as _interpreting, DTYPES, per_request as _per_request
from spec_compiler.kernels import BITS_PER_WORD, TreeAttentionSpec  # noqa: F401  (re-exported: the plan's names)
import torch.nn.functional as F

try:  # Triton is an optional extra (`gpu`, `dev`): the Spec, the reference and the bitsets work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None


# ---------------------------------------------------------------------------------------------------
# bitsets <-> mask
# ---------------------------------------------------------------------------------------------------
def pack_bitsets(bitsets: Sequence[int], device=None) -> torch.Tensor:
    """Python-int row bitsets (`TreeTopology.bitsets()`) -> [T, W] int64 words, word w = bits 64w..64w+63.

    Words are stored two's complement, so bit 63 of a word is its sign bit.
    """
    T = len(bitsets)
    W = -(-T // BITS_PER_WORD)
    words = [[(int(row) >> (BITS_PER_WORD * w)) & (2**64 - 1) for w in range(W)] for row in bitsets]
    words = [[x - 2**64 if x >= 2**63 else x for x in row] for row in words]
    return torch.tensor(words, dtype=torch.int64, device=device).reshape(T, W)


def anc_to_bitsets(anc: torch.Tensor) -> torch.Tensor:
    """[..., T, T] bool ancestor mask -> [..., T, W] int64 words (`pack_bitsets`'s layout), on anc's device.

    Tensor ops only: no value is read on the host, so a forward can pack its Block's `anc` inside a CUDA
    graph or an exported program. Bit 63 is set by OR-ing the sign bit rather than summed in, so no sum
    overflows.
    """
    T = anc.shape[-1]
    W = -(-T // BITS_PER_WORD)
    bits = F.pad(anc, (0, W * BITS_PER_WORD - T)).unflatten(-1, (W, BITS_PER_WORD))  # [..., T, W, 64]
    weights = torch.ones(BITS_PER_WORD - 1, dtype=torch.int64, device=anc.device) << torch.arange(
        BITS_PER_WORD - 1, device=anc.device)  # 2^0 .. 2^62
    words = (bits[..., :-1].long() * weights).sum(-1)  # [..., T, W]: bits 0..62
    sign = torch.full((), -2**63, dtype=torch.int64, device=anc.device)
    return torch.where(bits[..., -1], words | sign, words)


def bitsets_to_mask(bits: torch.Tensor) -> torch.Tensor:
    """[..., T, W] int64 words -> [..., T, T] bool, mask[..., i, j] = bit j of row i."""
    T = bits.shape[-2]
    j = torch.arange(T, device=bits.device)
    words = bits[..., j // BITS_PER_WORD]  # [..., T, T]
    return ((words >> (j % BITS_PER_WORD)) & 1).bool()


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
def tree_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       prefix_len: int | torch.Tensor, ancestor_bits: torch.Tensor,
                       sm_scale: float | None = None) -> torch.Tensor:
    """Masked SDPA in fp32 over slots [0, max(prefix_len) + T), rounded once to q's dtype, in q's layout.

    Row b sees slots [0, prefix_len[b]) and tree node j (slot prefix_len[b] + j) where bit j of its row is set;
    slots past a row's own tree are masked. Reads max(prefix_len) on the host.
    """
    # q: [B, H, T, D]; k_cache, v_cache: [B, Hkv, C, D]; prefix_len: int | [B]; ancestor_bits: [T, W] | [B, T, W]
    B, H, T, D = q.shape
    prefix = _per_request(prefix_len, B, q.device).long()  # [B]
    S = int(prefix.max()) + T
    bits = ancestor_bits.expand(B, T, ancestor_bits.shape[-1]) if ancestor_bits.dim() == 2 else ancestor_bits
    node = torch.arange(S, device=q.device) - prefix[:, None]  # [B, S]: tree node id at each slot (< 0: prefix)
    in_tree = bitsets_to_mask(bits).gather(-1, node.clamp(0, T - 1)[:, None].expand(B, T, S))  # [B, T, S]
    mask = (node < 0)[:, None] | (in_tree & (node < T)[:, None])  # [B, T, S]
    k, v = k_cache[:, :, :S].float(), v_cache[:, :, :S].float()  # [B, Hkv, S, D]
    y = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[:, None], scale=sm_scale, enable_gqa=True)
    return torch.empty_like(q).copy_(y)


# ---------------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------------
def _tree_attention_fwd(
    # Pointers to matrices
    Q, K, V, Out, Bits, PrefixLen,
    # Matrix dimensions
    NUM_KV_HEADS, GROUP, sm_scale,
    # Strides
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kc, stride_kd,
    stride_vb, stride_vh, stride_vc, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_bitsb, stride_bitst, stride_bitsw,
    # Meta-parameters
    NUM_TREE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tl.static_assert(64 % BLOCK_N == 0)  # a key block of the tree never straddles two bitset words
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_KV_HEADS).to(tl.int64)
    hkv = (pid_bh % NUM_KV_HEADS).to(tl.int64)
    prefix = tl.load(PrefixLen + b)

    # rows: (query head in the group, tree token)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < GROUP * NUM_TREE
    t = offs_r % NUM_TREE
    head = hkv * GROUP + offs_r // NUM_TREE
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    qk_scale = sm_scale * 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # stage 1: the committed prefix, slots [0, prefix), visible to every row
    for start_n in range(0, prefix, BLOCK_N):
        slots = start_n + offs_n
        n_ok = slots < prefix
        k = tl.load(k_base + slots[None, :] * stride_kc + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(v_base + slots[:, None] * stride_vc + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # stage 2: the tree's own slots [prefix, prefix + T), visible where the row's ancestor bit is set
    bits_row = Bits + b * stride_bitsb + t * stride_bitst  # [BLOCK_M]
    for j0 in range(0, NUM_TREE, BLOCK_N):
        j = j0 + offs_n  # tree node ids
        j_ok = j < NUM_TREE
        slots = prefix + j
        k = tl.load(k_base + slots[None, :] * stride_kc + offs_d[:, None] * stride_kd,
                    mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(v_base + slots[:, None] * stride_vc + offs_d[None, :] * stride_vd,
                    mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        word = tl.load(bits_row + (j0 // 64) * stride_bitsw, mask=row_ok, other=0)  # [BLOCK_M] int64
        bit = (word[:, None] >> (j % 64).to(tl.int64)[None, :]) & 1
        visible = (bit != 0) & j_ok[None, :]
        s = tl.dot(q, k, input_precision="ieee") * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    o = acc / tl.where(row_ok, l_i, 1.0)[:, None]  # padding rows saw nothing: keep them out of 0 / 0
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------------
# autotuning
# ---------------------------------------------------------------------------------------------------
# Under TRITON_INTERPRET=1 (CPU tests) the autotuner cannot time anything, so one config runs: small
# enough that the tests cover several row blocks, several key blocks and the 64-bit word boundary.
# The interpreter's tl.dot is np.matmul, which cannot multiply bf16 (stored as uint16), so there the
# operands are widened to fp32 (DOT_FP32): the same values a bf16 MMA multiplies exactly and
# accumulates in fp32, up to summation order. P is still rounded to the cache dtype first.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


def _configs() -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm in (16, 32, 64, 128) for bn in (16, 32, 64) for w in (4, 8) for s in (1, 2, 3)]


def keep(conf, rows: int, block_d: int) -> bool:
    """Prune predicate: no row block much larger than the rows, register budget, 8 warps only for big tiles."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    return (bm <= max(16, next_power_of_2(rows)) and bm * block_d <= 128 * 128
            and (conf.num_warps == 4 or bm * bn >= 64 * 64))


def _prune(configs, named_args, **kwargs):
    if _interpreting():
        return [c for c in configs if c.kwargs == INTERPRET_CONFIG][:1]
    args = {**named_args, **kwargs}
    return [c for c in configs if keep(c, args["GROUP"] * args["NUM_TREE"], args["BLOCK_D"])]


@functools.cache
def _kernel(interpret: bool):
    """The autotuned kernel, decorated on first launch rather than at import.

    `triton.jit` decides between compiling and interpreting when it runs, from TRITON_INTERPRET; doing
    it here lets a CPU test set the variable even if this module was imported earlier.
    """
    assert triton is not None, "tree_attention needs Triton: pip install -e '.[gpu]'"
    del interpret  # only the cache key
    # key: only what changes the best block sizes; dtypes are appended by the autotuner.
    return triton.autotune(configs=_configs(), key=["NUM_TREE", "HEAD_DIM", "GROUP"],
                           prune_configs_by={"early_config_prune": _prune})(triton.jit(_tree_attention_fwd))


# ---------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------
def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   prefix_len: int | torch.Tensor, ancestor_bits: torch.Tensor,
                   sm_scale: float | None = None, spec: TreeAttentionSpec | None = None) -> torch.Tensor:
    """Attention of T tree tokens over the prefix and their ancestors; returns [B, H, T, D] in q's dtype.

    The tree's keys/values must already be in slots [prefix_len, prefix_len + T) of the cache, and
    prefix_len + T <= C (checked only when prefix_len is an int: a tensor is never read on the host).
    Pass `spec` (from the plan) to assert that these inputs select the kernel the plan compiled.
    """
    # q: [B, H, T, D] (any strides); k_cache, v_cache: [B, Hkv, C, D]; prefix_len: int | [] | [B] int;
    # ancestor_bits: [T, W] or [B, T, W] int64 (`pack_bitsets`)
    assert q.dim() == 4, f"q must be [B, H, T, D], got shape {tuple(q.shape)}"
    B, H, T, D = q.shape
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, \
        f"k_cache and v_cache must both be [B, Hkv, C, D], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
    _, Hkv, C, _ = k_cache.shape
    assert k_cache.shape[0] == B and k_cache.shape[3] == D, \
        f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch or head dim"
    assert H % Hkv == 0, f"query heads ({H}) must be a multiple of kv heads ({Hkv})"
    assert q.dtype in DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, \
        f"q, k_cache, v_cache must share one of {list(DTYPES)}, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
    derived = TreeAttentionSpec(head_dim=D, num_tree_tokens=T, dtype=DTYPES[q.dtype])
    assert spec is None or spec == derived, f"inputs select {derived}, but the plan compiled {spec}"
    W = derived.num_words
    assert ancestor_bits.dtype == torch.int64 and ancestor_bits.shape[-2:] == (T, W) \
        and ancestor_bits.dim() in (2, 3) and (ancestor_bits.dim() == 2 or ancestor_bits.shape[0] == B), \
        f"ancestor_bits must be int64 [{T}, {W}] or [{B}, {T}, {W}], " \
        f"got {ancestor_bits.dtype} {tuple(ancestor_bits.shape)}"
    assert q.device == k_cache.device == v_cache.device == ancestor_bits.device, "all inputs must be on one device"
    if not isinstance(prefix_len, torch.Tensor):
        assert 0 <= prefix_len and prefix_len + T <= C, \
            f"prefix_len {prefix_len} + {T} tree tokens exceeds capacity {C}"

    prefix = _per_request(prefix_len, B, q.device).contiguous()  # [B]
    bits = ancestor_bits.unsqueeze(0) if ancestor_bits.dim() == 2 else ancestor_bits  # [B or 1, T, W]
    stride_bitsb = 0 if bits.shape[0] == 1 else bits.stride(0)
    out = torch.empty_like(q)  # keeps q's layout: for a transposed [B, T, H, D] q the output reshape is free
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    group = H // Hkv

    def grid(meta):
        return (triton.cdiv(group * T, meta["BLOCK_M"]), B * Hkv)

    interpret = _interpreting()
    _kernel(interpret)[grid](
        q, k_cache, v_cache, out, bits, prefix,
        Hkv, group, sm_scale,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        stride_bitsb, bits.stride(1), bits.stride(2),
        **derived.constexprs(), DOT_FP32=interpret,
    )
    return out
