"""Tree-masked SSD scan for Mamba2 (scalar decay per head): every node of a token tree in one pass.

STree's observation (ALGORITHMS.md §1, §7): with a scalar transition per head, the product of decays
between two nodes on a root-to-node path is `exp(c_i - c_j)`, where `c = M @ (dt * A)` sums the
log-decays along the path (M = ancestor-or-self mask). The SSD "masked attention" form then verifies a
whole tree at once:

    y_i = exp(c_i) C_i^T S + sum_j M[i, j] exp(c_i - c_j) (C_i^T B_j) dt_j x_j + D x_i
    h_i = exp(c_i) S + sum_j M[i, j] exp(c_i - c_j) dt_j x_j B_j^T          (the state after node i)

`exp(c_i - c_j)` overflows off the path (c_j can be far below c_i), so entries are *selected* with the
mask after clamping the exponent to <= 0; never multiplied by it (inf * 0 = NaN).

This file holds, per STYLE.md habit 1:
- `ssm_tree_scan_ref`: the masked form in PyTorch (the runtime's CPU path; it also accepts several
  initial states, one per block root, which the kernel does not); per-row trees [b, T, T];
- `ssm_tree_scan_sequential`: the recurrence node by node in topological order (the test oracle);
- `_ssm_tree_scan_fwd_kernel` + `ssm_tree_scan`: the Triton kernel (one program per (row, head,
  P-block); tree size as a constexpr bucket, the ancestor mask as a small run-time tensor, one per row
  or shared) and its launcher; `SSMTreeScanSpec` names its compile-time parameters.

Triton is imported guarded, so CPU-only installs can use the references.

Shape legend: b batch, T tree nodes, H heads, P head dim, G groups (B/C shared by H // G heads),
N state size, R initial states. States are [.., H, P, N] as in mamba-ssm.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references below still work
    triton = tl = None


def _expand_groups(m: Tensor, H: int) -> Tensor:
    """[b, T, G, N] -> [b, T, H, N] (head h reads group h // (H // G))."""
    return m.repeat_interleave(H // m.shape[2], dim=2)


def ssm_tree_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, anc: Tensor, *,
                      D: Tensor | None = None, init_states: Tensor | None = None,
                      init_index: Tensor | None = None, return_states: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
    """Outputs (and optionally states) of every tree node, by the masked SSD form.

    x: [b, T, H, P]; dt: [b, T, H] (after softplus and clamp); A: [H] (negative); B, C: [b, T, G, N];
    anc: [T, T] or per row [b, T, T] bool, anc[.., i, j] iff j is i or an ancestor of i within the block;
    D: [H] or [H, P]; init_states: [b, R, H, P, N], the state before each block root (None: zeros);
    init_index: [T] or per row [b, T] long, which initial state node i's path starts from (None: all 0).
    Returns y: [b, T, H, P] and states: [b, T, H, P, N] (or None), in x's dtype promoted to fp32.
    """
    cdt = torch.promote_types(x.dtype, torch.float32)
    b, T, H, P = x.shape
    # Head-major and contiguous, so every product is a batched matmul whose per-row operands have one layout
    # whatever b is: a row's result is then bitwise the same alone or in a batch (einsum's folding of
    # strided inputs depends on the sizes).
    xh = x.to(cdt).transpose(1, 2).contiguous()  # [b, H, T, P]
    dth = dt.to(cdt).transpose(1, 2).contiguous()  # [b, H, T]
    Bh = _expand_groups(B.to(cdt), H).transpose(1, 2).contiguous()  # [b, H, T, N]
    Ch = _expand_groups(C.to(cdt), H).transpose(1, 2).contiguous()  # [b, H, T, N]
    anc = anc.to(torch.bool)
    anc = (anc.expand(b, T, T) if anc.dim() == 2 else anc)[:, None]  # [b, 1, T, T]
    c = (anc.to(cdt) @ (dth * A.to(cdt)[:, None])[..., None])[..., 0]  # [b, H, T] path-cumulative log-decay
    seg = (c[..., :, None] - c[..., None, :]).clamp(max=0)  # [b, H, T(i), T(j)]
    W = torch.where(anc, seg.exp(), torch.zeros((), dtype=cdt)) * dth[..., None, :]  # weight of j's input in i
    y = ((Ch @ Bh.transpose(-1, -2)) * W) @ xh  # [b, H, T, P]
    S = None
    if init_states is not None:
        idx = torch.zeros(T, dtype=torch.long, device=x.device) if init_index is None else init_index
        rows = torch.arange(b, device=x.device)[:, None]
        S = init_states.to(cdt)[rows, idx.expand(b, T)].transpose(1, 2).contiguous()  # [b, H, T, P, N]
        y = y + c.exp()[..., None] * (S @ Ch[..., None])[..., 0]
    if D is not None:
        y = y + (D.to(cdt)[:, None] if D.dim() == 1 else D.to(cdt))[:, None] * xh
    y = y.transpose(1, 2)  # [b, T, H, P]
    if not return_states:
        return y, None
    xB = (xh[..., None] * Bh[..., None, :]).view(b, H, T, P * Bh.shape[-1])  # [b, H, T, P*N]: j's input
    states = (W @ xB).view(b, H, T, P, -1)  # [b, H, T, P, N]
    if S is not None:
        states = states + c.exp()[..., None, None] * S
    return y, states.transpose(1, 2)


def ssm_tree_scan_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, parents: list[int], *,
                             D: Tensor | None = None, init_states: Tensor | None = None,
                             init_index: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """The oracle: h_i = exp(dt_i A) h_parent(i) + dt_i x_i B_i^T, y_i = h_i C_i + D x_i, node by node.

    parents[i] < i is node i's parent within the block, -1 for a block root (whose previous state is
    init_states[:, init_index[i]], or zeros). Other arguments as in `ssm_tree_scan_ref`.
    Returns y: [b, T, H, P] and states: [b, T, H, P, N].
    """
    cdt = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))
    b, T, H, P = x.shape
    Bh, Ch = _expand_groups(B, H), _expand_groups(C, H)
    zero = torch.zeros(b, H, P, B.shape[-1], dtype=cdt, device=x.device)
    states: list[Tensor] = []
    ys = []
    for i in range(T):
        if parents[i] >= 0:
            prev = states[parents[i]]
        elif init_states is not None:
            prev = init_states[:, 0 if init_index is None else init_index[i]].to(cdt)
        else:
            prev = zero
        a = torch.exp(dt[:, i] * A)  # [b, H]
        h = a[..., None, None] * prev + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None, :]
        states.append(h)
        y = torch.einsum("bhpn,bhn->bhp", h, Ch[:, i])
        if D is not None:
            y = y + (D.to(cdt)[:, None] if D.dim() == 1 else D.to(cdt)) * x[:, i]
        ys.append(y)
    return torch.stack(ys, 1), torch.stack(states, 1)


# ---- Triton kernel -------------------------------------------------------------------------------------

MAX_TREE_SIZE = 128
"""Largest tree (one program holds the whole [T, T] mask and a [T, P-block] accumulator)."""


def _bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (and >= 16, the smallest tl.dot operand)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclass(frozen=True)
class SSMTreeScanSpec:
    """What one compiled specialization of the kernel is keyed by (the rest is run time)."""

    block_t: int
    """Tree-size bucket: trees of up to block_t nodes run on this specialization (power of two >= 16)."""
    head_dim: int
    d_state: int
    has_D: bool = True
    d_has_hdim: bool = False
    has_init_state: bool = True
    store_states: bool = False

    @property
    def block_p(self) -> int:
        return min(64, _bucket(self.head_dim))

    @property
    def block_n(self) -> int:
        return _bucket(self.d_state)

    @staticmethod
    def for_tree(num_nodes: int, head_dim: int, d_state: int, **flags) -> "SSMTreeScanSpec":
        if num_nodes > MAX_TREE_SIZE:
            raise ValueError(f"tree of {num_nodes} nodes exceeds the kernel's MAX_TREE_SIZE {MAX_TREE_SIZE}")
        return SSMTreeScanSpec(_bucket(num_nodes), head_dim, d_state, **flags)


def _ssm_tree_scan_fwd_kernel(  # a @triton.jit kernel, decorated by _jit_kernel()
    # Pointers to matrices
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, anc_ptr, D_ptr, state_ptr, y_ptr, states_ptr,
    # Matrix dimensions
    T, H, P, N, heads_per_group,
    # Strides
    stride_x_b, stride_x_t, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_t, stride_dt_h,
    stride_B_b, stride_B_t, stride_B_g, stride_B_n,
    stride_C_b, stride_C_t, stride_C_g, stride_C_n,
    stride_anc_b, stride_anc_i, stride_anc_j,
    stride_D_h, stride_D_p,
    stride_s_b, stride_s_h, stride_s_p, stride_s_n,
    stride_y_b, stride_y_t, stride_y_h, stride_y_p,
    stride_st_b, stride_st_t, stride_st_h, stride_st_p, stride_st_n,
    # Meta-parameters
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_INIT_STATE: tl.constexpr, STORE_STATES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    g = h // heads_per_group
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t_ok = offs_t < T
    p_ok = offs_p < P
    n_ok = offs_n < N

    dt = tl.load(dt_ptr + b * stride_dt_b + offs_t * stride_dt_t + h * stride_dt_h, mask=t_ok, other=0.0)
    dt = dt.to(tl.float32)
    A = tl.load(A_ptr + h).to(tl.float32)
    anc_ptr = anc_ptr + b * stride_anc_b  # this row's tree (stride 0: one tree for every row)
    anc = tl.load(anc_ptr + offs_t[:, None] * stride_anc_i + offs_t[None, :] * stride_anc_j,
                  mask=t_ok[:, None] & t_ok[None, :], other=0) != 0  # [BLOCK_T, BLOCK_T]
    # c_i = sum over i's ancestors-or-self j of dt_j * A
    c = tl.sum(tl.where(anc, (dt * A)[None, :], 0.0), axis=1)
    # exp(c_i - c_j) on the path, 0 elsewhere: clamp, exponentiate, then select
    decay = tl.where(anc, tl.exp(tl.minimum(c[:, None] - c[None, :], 0.0)), 0.0)

    Cm = tl.load(C_ptr + b * stride_C_b + offs_t[:, None] * stride_C_t + g * stride_C_g
                 + offs_n[None, :] * stride_C_n, mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    Bm = tl.load(B_ptr + b * stride_B_b + offs_t[:, None] * stride_B_t + g * stride_B_g
                 + offs_n[None, :] * stride_B_n, mask=t_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * stride_x_b + offs_t[:, None] * stride_x_t + h * stride_x_h
                + offs_p[None, :] * stride_x_p, mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)

    cb = tl.dot(Cm, tl.trans(Bm), input_precision="ieee")  # [BLOCK_T, BLOCK_T]
    acc = tl.dot(cb * decay * dt[None, :], x, input_precision="ieee")  # [BLOCK_T, BLOCK_P]
    if HAS_INIT_STATE:
        s = tl.load(state_ptr + b * stride_s_b + h * stride_s_h + offs_p[:, None] * stride_s_p
                    + offs_n[None, :] * stride_s_n, mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        s = s.to(tl.float32)  # [BLOCK_P, BLOCK_N]
        acc += tl.dot(Cm, tl.trans(s), input_precision="ieee") * tl.exp(c)[:, None]
    if HAS_D:
        if D_HAS_HDIM:
            Dv = tl.load(D_ptr + h * stride_D_h + offs_p * stride_D_p, mask=p_ok, other=0.0).to(tl.float32)
            acc += x * Dv[None, :]
        else:
            acc += x * tl.load(D_ptr + h * stride_D_h).to(tl.float32)
    tl.store(y_ptr + b * stride_y_b + offs_t[:, None] * stride_y_t + h * stride_y_h
             + offs_p[None, :] * stride_y_p, acc, mask=t_ok[:, None] & p_ok[None, :])

    if STORE_STATES:
        # h_i = exp(c_i) S + x^T diag(w_i) B with w_i[j] = M[i, j] exp(c_i - c_j) dt_j: one GEMM per node
        for i in range(0, T):
            c_i = tl.sum(tl.where(offs_t == i, c, 0.0))
            anc_i = tl.load(anc_ptr + i * stride_anc_i + offs_t * stride_anc_j, mask=t_ok, other=0) != 0
            w = tl.where(anc_i, tl.exp(tl.minimum(c_i - c, 0.0)), 0.0) * dt  # [BLOCK_T]
            st = tl.dot(tl.trans(x * w[:, None]), Bm, input_precision="ieee")  # [BLOCK_P, BLOCK_N]
            if HAS_INIT_STATE:
                st += tl.exp(c_i) * s
            tl.store(states_ptr + b * stride_st_b + i * stride_st_t + h * stride_st_h
                     + offs_p[:, None] * stride_st_p + offs_n[None, :] * stride_st_n, st,
                     mask=p_ok[:, None] & n_ok[None, :])


@functools.cache
def _jit_kernel():
    # Decorated at first launch rather than import: triton.jit reads TRITON_INTERPRET when it runs.
    return triton.jit(_ssm_tree_scan_fwd_kernel, do_not_specialize=["T"])


def ssm_tree_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, anc: Tensor, *,
                  D: Tensor | None = None, init_state: Tensor | None = None, return_states: bool = False
                  ) -> tuple[Tensor, Tensor | None]:
    """The Triton kernel: same arguments and results as `ssm_tree_scan_ref` with one block root per row,
    whose previous state is init_state: [b, H, P, N] (None: zeros); anc: [T, T] (every row) or [b, T, T].
    Outputs are fp32."""
    if triton is None:
        raise ImportError("ssm_tree_scan needs triton (pip install 'spec-compiler[gpu]'); "
                          "use ssm_tree_scan_ref on CPU")
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    assert dt.shape == (b, T, H) and A.shape == (H,), (dt.shape, A.shape, x.shape)
    assert B.shape == C.shape == (b, T, G, N) and H % G == 0, (B.shape, C.shape, H)
    assert anc.shape in ((T, T), (b, T, T)), (anc.shape, b, T)
    assert init_state is None or init_state.shape == (b, H, P, N), (init_state.shape, (b, H, P, N))
    assert D is None or D.shape in ((H,), (H, P)), (D.shape, H, P)
    spec = SSMTreeScanSpec.for_tree(T, P, N, has_D=D is not None, d_has_hdim=D is not None and D.dim() == 2,
                                    has_init_state=init_state is not None, store_states=return_states)
    dev = x.device
    y = torch.empty(b, T, H, P, device=dev, dtype=torch.float32)
    states = torch.empty(b, T, H, P, N, device=dev, dtype=torch.float32) if return_states else None
    anc = anc.to(device=dev, dtype=torch.int8)
    anc_strides = (0, *anc.stride()) if anc.dim() == 2 else tuple(anc.stride())
    Dt = D if D is not None else A  # dummy pointers when absent (never read)
    St = init_state if init_state is not None else x
    Dst = states if states is not None else y
    D_strides = (Dt.stride(0), Dt.stride(1) if Dt.dim() == 2 else 0)
    s_strides = (St.stride(0), St.stride(1), St.stride(2), St.stride(3)) if init_state is not None else (0,) * 4
    st_strides = tuple(states.stride()) if states is not None else (0,) * 5
    grid = (b * H, triton.cdiv(P, spec.block_p))
    _jit_kernel()[grid](
        x, dt, A, B, C, anc, Dt, St, y, Dst,
        T, H, P, N, H // G,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *anc_strides,
        *D_strides, *s_strides, *y.stride(), *st_strides,
        HAS_D=spec.has_D, D_HAS_HDIM=spec.d_has_hdim, HAS_INIT_STATE=spec.has_init_state,
        STORE_STATES=spec.store_states, BLOCK_T=spec.block_t, BLOCK_P=spec.block_p, BLOCK_N=spec.block_n,
    )
    return y, states
