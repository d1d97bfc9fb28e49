"""Mamba2 and Mamba2/attention hybrids whose forward verifies a whole token tree (STree) in one pass.

The block structure follows mamba-ssm's `MambaLMHeadModel` (`mamba_ssm/models/mixer_seq_simple.py`,
`modules/block.py`): an embedding, `n_layer` pre-norm residual blocks, each a mixer (Mamba2, or
multi-head attention at the indices in `attn_layer_idx`) plus an optional gated MLP (`d_intermediate`
> 0), a final RMSNorm and the LM head. The Mamba2 mixer follows `mamba_ssm/modules/mamba2.py` and the
Hugging Face `Mamba2Mixer`: in_proj -> [z, xBC, dt]; depthwise causal conv1d + SiLU on xBC -> [x, B, C];
`dt = clamp(softplus(dt + dt_bias), dt_limit)`, `A = -exp(A_log)` per head; the SSD recurrence with a
D skip; gated RMSNorm `norm(y * silu(z))` per group (norm_before_gate=False); out_proj. The attention
mixer follows `mamba_ssm/modules/mha.py` (fused in_proj q|k|v, partial rotate-half RoPE, out_proj).

`forward(input_ids, position_ids, cache, block)` has the Llama model's contract: B cache rows, each with
its own committed length, one `runtime.batch.Block` saying where every token goes and what it continues
from. An SSM layer reads each token's *parent slot* (never a mask; `SSMCache.plan` resolves it once per
forward) and runs one of three paths:
- advance, T > 1 (prefill chunk): the chunked SSD scan from each row's committed state, which it replaces
  (ours in torch, or mamba-ssm's Triton `mamba_chunk_scan_combined` under backend.ssm_prefill=mamba_ssm);
- T == 1 (an autoregressive token, a root-only tree): the recurrence once;
- tree (advance=False): the tree conv (windows gathered along each node's path, older entries from the
  state its block root continues from) and the tree-masked SSD (`codegen/ssm_tree_scan.py`), every node
  of every row at once; each node's state and conv window go to the row's scratch, from which `commit`
  makes the accepted node's committed.
`SSMCache` (runtime/models/ssm_cache.py) documents the rules. Attention layers of a hybrid use a Llama
`KVCache` held by the SSMCache and Llama's `cached_attention` over `block.mask` (or, routed as in Llama, the
tree-attention kernel).
Without a cache (`cache=None`, training) the block is one causal text from slot 0: SSM layers run the
chunked SSD scan from a zero state and window, attention layers attend causally within the block, and
nothing is stored; this path is differentiable and equals a cached prefill of the same tokens.

SSM arithmetic runs in fp32 (fp64 for fp64 models), as mamba-ssm does.

Shape legend: b / B rows, T new tokens, S attended slots, E d_model, H SSM heads, P head dim, G groups,
N state size, Cd conv channels, W d_conv, R states the block roots continue from, V vocab.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.models.init import init_random_weights, perturbed_copy  # noqa: F401  (perturbed_copy: re-exported)

from codegen.ssm_tree_scan import ssm_tree_scan, ssm_tree_scan_ref
from runtime.batch import Block as StepBlock  # one forward's tokens (the nn.Module `Block` is mamba-ssm's)
from runtime.models.llama import (KVCache, LMHead, additive_mask, cached_attention, last_rows, rotate_half,
                                  routes_tree_attention, tree_attention_bits)
from runtime.models.norm import RMSNorm
from runtime.models.ssm_cache import ForwardPlan, SSMCache
from spec_compiler.arch import Mamba2Config

DEFAULT_NUM_SCRATCH = 64


# ---- the three SSM paths (torch) -------------------------------------------------------------------------

def _expand_groups(m: Tensor, H: int, dim: int) -> Tensor:
    return m.repeat_interleave(H // m.shape[dim], dim=dim)


def ssm_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token: h = exp(dt A) h + dt x B^T, y = h C + D x (mamba-ssm `selective_state_update_ref`).

    state: [b, H, P, N]; x: [b, H, P]; dt: [b, H]; A: [H]; B, C: [b, G, N]; D: [H] or [H, P]
    -> y [b, H, P], new state [b, H, P, N].
    """
    H = x.shape[1]
    Bh, Ch = _expand_groups(B, H, 1), _expand_groups(C, H, 1)  # [b, H, N]
    h = torch.exp(dt * A)[..., None, None] * state + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", h, Ch)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    return y, h


def ssd_chunked_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                     D: Tensor | None = None, init_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The causal SSD scan (mamba-ssm `ssd_minimal_discrete` with an initial state): quadratic within
    chunks of `chunk_size`, a recurrence over chunk states between them. Differentiable (the training path).

    Heads are laid out as [G, H / G] so each group's B and C (and C B^T) broadcast over its heads instead of
    being repeated per head, and every contraction is a batched matmul.

    x: [b, T, H, P]; dt: [b, T, H]; A: [H]; B, C: [b, T, G, N]; D: [H] or [H, P]; init_state: [b, H, P, N]
    -> y [b, T, H, P], final state [b, H, P, N].
    """
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G  # heads per group
    pad = (-T) % chunk_size  # zero dt at the padding: decay 1 and no input, so the final state is unchanged
    xp, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc, cs = (T + pad) // chunk_size, chunk_size
    # contiguous, so each row's matmul operands have one layout whatever b is (bitwise batch invariance)
    xh = xp.reshape(b, nc, cs, G, R, P).permute(0, 3, 4, 1, 2, 5).contiguous()  # [b, G, R, nc, cs, P]
    Bg = B.reshape(b, nc, cs, G, N).permute(0, 3, 1, 2, 4).contiguous()[:, :, None]  # [b, G, 1, nc, cs, N]
    Cg = C.reshape(b, nc, cs, G, N).permute(0, 3, 1, 2, 4).contiguous()[:, :, None]  # [b, G, 1, nc, cs, N]
    dth = dt.reshape(b, nc, cs, G, R).permute(0, 3, 4, 1, 2).contiguous()  # [b, G, R, nc, cs]
    cum = torch.cumsum(dth * A.view(G, R, 1, 1), dim=-1)  # [b, G, R, nc, cs] log-decay from the chunk start
    causal = torch.ones(cs, cs, dtype=torch.bool, device=x.device).tril()
    # L[i, j] = exp(cum_i - cum_j) for j <= i, else 0 (masked to -inf before exp: no overflow, zero gradient)
    L = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -math.inf).exp()  # [b, G, R, nc, cs, cs]
    CB = Cg @ Bg.transpose(-1, -2)  # [b, G, 1, nc, cs(i), cs(j)]
    y = (L * CB * dth[..., None, :]) @ xh  # [b, G, R, nc, cs, P]
    # what each chunk adds to the state at its end, then the recurrence over chunks
    to_end = torch.exp(cum[..., -1:] - cum) * dth  # [b, G, R, nc, cs]
    chunk_states = (xh * to_end[..., None]).transpose(-1, -2) @ Bg  # [b, G, R, nc, P, N]
    S = x.new_zeros(b, H, P, N) if init_state is None else init_state
    S = S.reshape(b, G, R, P, N)
    decay = torch.exp(cum[..., -1])  # [b, G, R, nc]
    starts = []
    for c in range(nc):
        starts.append(S)
        S = decay[..., c, None, None] * S + chunk_states[..., c, :, :]
    y = y + torch.exp(cum)[..., None] * (Cg @ torch.stack(starts, 3).transpose(-1, -2))  # [b, G, R, nc, cs, P]
    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * cs, H, P)[:, :T]
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    return y, S.reshape(b, H, P, N)


@functools.cache
def mamba_chunk_scan():
    """mamba-ssm's `mamba_chunk_scan_combined`, or None where it does not import. Imported lazily and once:
    `import mamba_ssm` takes seconds and fails without its CUDA extension (an ImportError, or an OSError /
    RuntimeError from the extension itself), so every failure counts as "not here"."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # noqa: BLE001  (any import failure: see the docstring)
        return None
    return mamba_chunk_scan_combined


def mamba_ssm_chunked_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                           D: Tensor | None, init_state: Tensor) -> tuple[Tensor, Tensor]:
    """`ssd_chunked_scan`'s contract (same shapes) through mamba-ssm's Triton chunk scan (backend.ssm_prefill).

    dt arrives softplused and clamped, so it goes in with dt_softplus=False and no dt_bias. Every argument
    after chunk_size is passed by keyword: mamba-ssm 2.0 to 2.3 share these names, but later versions add
    positional parameters (cu_seqlens, state_dtype) between them. The final state comes back in C's dtype.
    """
    scan = mamba_chunk_scan()
    assert scan is not None, "backend.ssm_prefill=mamba_ssm, but mamba_ssm does not import (validation checks it)"
    y, state = scan(x, dt, A, B, C, chunk_size, D=D, initial_states=init_state, dt_softplus=False,
                    return_final_states=True)[:2]
    return y, state.to(init_state.dtype)


def rowwise(fn, x: Tensor) -> Tensor:
    """fn(x) for an elementwise fn, computed so each row (dim 0) gets bitwise the same result alone or in a
    batch. Why: a CPU kernel runs its vector loop over the flattened tensor and a scalar loop over the last
    few elements, and some functions (softplus, silu, sigmoid, log1p, rsqrt) round differently in the two,
    so a row's values would depend on where the row starts. Rows padded to 64 elements keep every value at
    the same vector lane whatever the batch (a no-op when rows are already multiples of 64)."""
    B, M = x.shape[0], x[0].numel()
    pad = (-M) % 64
    if pad == 0:
        return fn(x)
    return fn(F.pad(x.reshape(B, M), (0, pad)))[:, :M].reshape(x.shape)


def _depthwise_conv(win: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """win: [b, Cd, T, W] inputs per output, oldest first; weight: [Cd, 1, W] -> silu(conv) [b, T, Cd]."""
    out = (win * weight[:, 0, None, :]).sum(-1)  # [b, Cd, T]
    if bias is not None:
        out = out + bias[:, None]
    return rowwise(F.silu, out).transpose(1, 2)


def conv_chain(v: Tensor, window: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv + SiLU continuing from `window`.

    v: [b, T, Cd] pre-conv inputs; window: [b, Cd, W-1] the previous inputs; weight: [Cd, 1, W]
    -> out [b, T, Cd], new window [b, Cd, W-1].
    """
    W = weight.shape[-1]
    full = torch.cat([window.to(v.dtype), v.transpose(1, 2)], dim=-1)  # [b, Cd, W-1+T]
    return _depthwise_conv(full.unfold(-1, W, 1), weight, bias), full[..., 1 - W:]


def conv_tree(v: Tensor, windows: Tensor, conv_index: Tensor, weight: Tensor,
              bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise conv + SiLU along each node's root path (ALGORITHMS.md §7.4), per row.

    v: [b, T, Cd]; windows: [b, R, Cd, W-1] of the states the roots continue from; conv_index: [b, T, W]
    into row b's [windows flattened ; v] (oldest first) -> out [b, T, Cd], node windows [b, T, Cd, W-1].
    """
    b, R, Cd, W1 = windows.shape
    T, W = conv_index.shape[1:]
    buf = torch.cat([windows.to(v.dtype).permute(0, 2, 1, 3).reshape(b, Cd, R * W1), v.transpose(1, 2)], -1)
    win = buf.gather(2, conv_index.reshape(b, 1, T * W).expand(b, Cd, T * W)).view(b, Cd, T, W)  # [b, Cd, T, W]
    return _depthwise_conv(win, weight, bias), win[..., 1:].permute(0, 2, 1, 3)


# ---- modules ---------------------------------------------------------------------------------------------

class Mamba2Mixer(nn.Module):
    def __init__(self, c: Mamba2Config, use_triton: bool = False):
        super().__init__()
        self.c = c
        self.use_triton = use_triton
        self.ssm_prefill = "torch"  # backend.ssm_prefill (runtime.load.route_kernels): torch | mamba_ssm
        H = c.nheads
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner + 2 * c.ngroups * c.d_state + H, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(c.d_inner if c.D_has_hdim else H))
        if c.rmsnorm:
            self.norm = RMSNorm(c.d_inner, c.gated_norm_epsilon, group_size=c.d_inner // c.ngroups, keep_fp64=True)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)

    def forward(self, u: Tensor, cache: SSMCache | None, layer: int, plan: ForwardPlan | None) -> Tensor:
        # u: [b, T, E] -> [b, T, E]; cache=None: a causal block from a zero state (training), nothing stored
        c = self.c
        b, T, _ = u.shape
        H, P, G, N = c.nheads, c.headdim, c.ngroups, c.d_state
        z, xBC, dt = self.in_proj(u).split([c.d_inner, c.conv_dim, H], dim=-1)
        if cache is None:
            xBC = conv_chain(xBC, xBC.new_zeros(b, c.conv_dim, c.d_conv - 1), self.conv1d.weight,
                             self.conv1d.bias)[0]
            cdt = torch.promote_types(u.dtype, torch.float32)
            x, Bm, Cm = xBC.to(cdt).split([c.d_inner, G * N, G * N], dim=-1)
            dt = rowwise(F.softplus, (dt + self.dt_bias).to(cdt)).clamp(*c.dt_limit)  # [b, T, H]
            A = -torch.exp(self.A_log.to(cdt))  # [H]
            D = self.D.to(cdt).view(H, P) if c.D_has_hdim else self.D.to(cdt)
            y = ssd_chunked_scan(x.view(b, T, H, P), dt, A, Bm.view(b, T, G, N), Cm.view(b, T, G, N),
                                 c.chunk_size, D)[0]
            y = y.reshape(b, T, c.d_inner)
            y = self.norm(y, z) if c.rmsnorm else y * F.silu(z.to(cdt))
            return self.out_proj(y.to(u.dtype))
        S0, W0 = cache.read(layer, plan)  # [b, R, H, P, N], [b, R, Cd, W-1]
        if plan.advance:
            xBC, window = conv_chain(xBC, W0[:, 0], self.conv1d.weight, self.conv1d.bias)
        else:
            xBC, window = conv_tree(xBC, W0, plan.conv_index, self.conv1d.weight, self.conv1d.bias)

        cdt = torch.promote_types(u.dtype, torch.float32)
        x, Bm, Cm = xBC.to(cdt).split([c.d_inner, G * N, G * N], dim=-1)
        x, Bm, Cm = x.view(b, T, H, P), Bm.view(b, T, G, N), Cm.view(b, T, G, N)
        dt = rowwise(F.softplus, (dt + self.dt_bias).to(cdt)).clamp(*c.dt_limit)  # [b, T, H]
        A = -torch.exp(self.A_log.to(cdt))  # [H]
        D = self.D.to(cdt).view(H, P) if c.D_has_hdim else self.D.to(cdt)
        S0 = S0.to(cdt)
        if T == 1:  # one token per row: the recurrence once (R = 1 here: a lone node is its own root)
            y, state = ssm_step(S0[:, 0], x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D)
            y = y[:, None]
            if not plan.advance:
                state = state[:, None]  # [b, 1, H, P, N]: the node's scratch entry
        elif plan.advance and self.ssm_prefill == "mamba_ssm" and not torch.compiler.is_compiling():
            # mamba-ssm's scan is an autograd.Function of Triton launches, not an op export can keep: an
            # exported prefill program holds the torch scan
            y, state = mamba_ssm_chunked_scan(x, dt, A, Bm, Cm, c.chunk_size, D, S0[:, 0])
        elif plan.advance:
            y, state = ssd_chunked_scan(x, dt, A, Bm, Cm, c.chunk_size, D, S0[:, 0])
        elif self.use_triton and x.is_cuda and cdt == torch.float32 and not plan.scratch_roots:
            if torch.compiler.is_compiling():  # torch.export: the kernel as one opaque node (codegen/ops.py)
                from codegen import ops  # noqa: F401  (registers torch.ops.spec)
                y, state = torch.ops.spec.ssm_tree_scan(x, dt, A, Bm, Cm, plan.anc, D, S0[:, 0], True)
            else:
                y, state = ssm_tree_scan(x, dt, A, Bm, Cm, plan.anc, D=D, init_state=S0[:, 0], return_states=True)
        else:  # roots continuing from scratch (a drafter's level: one state per node), or CPU: the torch form
            y, state = ssm_tree_scan_ref(x, dt, A, Bm, Cm, plan.anc, D=D, init_states=S0,
                                         init_index=plan.init_index, return_states=True)
        cache.write(layer, plan, state, window)
        y = y.reshape(b, T, c.d_inner)
        y = self.norm(y, z) if c.rmsnorm else y * F.silu(z.to(cdt))
        return self.out_proj(y.to(u.dtype))


class MHA(nn.Module):
    """mamba-ssm's attention mixer (`modules/mha.py`): fused q|k|v in_proj, partial rotate-half RoPE."""

    def __init__(self, c: Mamba2Config):
        super().__init__()
        self.H, self.Hkv, self.D = c.attn_num_heads, c.attn_num_heads_kv, c.attn_head_dim
        self.rd, self.scale = c.attn_rotary_dim, c.attn_softmax_scale
        self.in_proj = nn.Linear(c.d_model, (self.H + 2 * self.Hkv) * self.D, bias=c.attn_qkv_bias)
        self.out_proj = nn.Linear(self.H * self.D, c.d_model, bias=c.attn_out_bias)

    def _rope(self, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        r = t[..., :self.rd]
        return torch.cat([r * cos + rotate_half(r) * sin, t[..., self.rd:]], dim=-1)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, k_cache: Tensor | None,
                v_cache: Tensor | None, block: StepBlock | None, mask: Tensor | None,
                bits: Tensor | None = None) -> Tensor:
        # x: [b, T, E]; cos, sin: [b, 1, T, rd]; k_cache, v_cache: [b, Hkv, C, D] or None; mask: [b, 1, T, S];
        # bits: [b, T, W] (the tree-attention kernel, llama.cached_attention) or None
        b, T, _ = x.shape
        q, k, v = self.in_proj(x).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], dim=-1)
        q = q.view(b, T, self.H, self.D).transpose(1, 2)  # [b, H, T, D]
        k = k.view(b, T, self.Hkv, self.D).transpose(1, 2)  # [b, Hkv, T, D]
        v = v.view(b, T, self.Hkv, self.D).transpose(1, 2)
        if self.rd:
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        return self.out_proj(cached_attention(q, k, v, k_cache, v_cache, block, mask, self.scale, bits))


class GatedMLP(nn.Module):
    """mamba-ssm `modules/mlp.py`: fc1 -> [y, gate], fc2(y * silu(gate))."""

    def __init__(self, c: Mamba2Config):
        super().__init__()
        self.fc1 = nn.Linear(c.d_model, 2 * c.d_intermediate, bias=False)
        self.fc2 = nn.Linear(c.d_intermediate, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class Block(nn.Module):
    def __init__(self, c: Mamba2Config, attention: bool, use_triton: bool):
        super().__init__()
        self.norm = RMSNorm(c.d_model, c.norm_epsilon, keep_fp64=True)
        self.mixer = MHA(c) if attention else Mamba2Mixer(c, use_triton)
        if c.d_intermediate:
            self.norm2 = RMSNorm(c.d_model, c.norm_epsilon, keep_fp64=True)
            self.mlp = GatedMLP(c)


class Backbone(nn.Module):
    def __init__(self, c: Mamba2Config, use_triton: bool):
        super().__init__()
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c, i in c.attn_layer_idx, use_triton) for i in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_epsilon, keep_fp64=True)


class Mamba2LMModel(nn.Module):
    """Parameter names mirror mamba-ssm's MambaLMHeadModel (backbone.embedding, backbone.layers.N.{norm,
    mixer,norm2,mlp}, backbone.norm_f, lm_head), so its checkpoints load by name."""

    def __init__(self, config: Mamba2Config, use_triton: bool = False):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, use_triton)
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.tree_attention_sizes: frozenset[int] = frozenset()  # T run by the tree-attention kernel (load sets it)

    def new_cache(self, rows: int, capacity: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, num_scratch: int | None = None) -> SSMCache:
        """`num_scratch` (default min(capacity, 64)) bounds the tree bucket: a tree forward's node at scratch
        offset slot - L_b needs offset < num_scratch (a verify tree of T nodes: T; a drafter's tree grown
        level by level from a committed root: T - 1)."""
        c = self.config
        w = self.backbone.embedding.weight
        dtype, device = dtype or w.dtype, device or w.device
        n_attn = len(c.attn_layer_idx)
        kv = KVCache(n_attn, rows, c.attn_num_heads_kv, capacity, c.attn_head_dim, dtype=dtype,
                     device=device) if n_attn else None
        return SSMCache(c.num_ssm_layers, rows, c.nheads, c.headdim, c.d_state, c.conv_dim, c.d_conv, capacity,
                        num_scratch or min(capacity, DEFAULT_NUM_SCRATCH), kv, dtype=dtype, device=device)

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache: SSMCache | None = None,
                block: StepBlock | int | None = None, num_logits: int | None = None) -> Tensor:
        """Logits for a block of T new tokens per row (for its last `num_logits` tokens only, when given):
        `logits(hidden(...))`."""
        return self.logits(self.hidden(input_ids, position_ids, cache, block, num_logits))

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states [..., E] -> fp32 logits [..., V]."""
        return self.lm_head(h).float()

    def hidden(self, input_ids: Tensor, position_ids: Tensor, cache: SSMCache | None = None,
               block: StepBlock | int | None = None, num_rows: int | None = None) -> Tensor:
        """Final (normed) hidden states of a block of T new tokens per row, for its last `num_rows` only when given.

        With a `cache`, `block` (runtime.batch.Block) says where each row's tokens go and what they continue
        from (see the module docstring); an int `block` is `Block.causal(block, T, B)`: every row continues
        its text from that slot. With `cache=None` (training) the block is a causal text from an empty
        prefix (zero SSM state and conv window; attention causal within the block), nothing is stored, and
        the path is differentiable. It equals a cached prefill of the same block.
        """
        # input_ids, position_ids: [B, T] -> [B, T or num_rows, E]
        c = self.config
        B, T = input_ids.shape
        if cache is None:
            assert block is None or (isinstance(block, int) and block == 0), \
                "cache=None runs one causal block from slot 0"
            block = plan = attn_add = bits = None
        else:
            if isinstance(block, int):  # a causal continuation of every row from slot `block` (prefill, one token)
                block = StepBlock.causal(block, T, B, device=input_ids.device)
            assert block is not None and block.slots.shape == (B, T), "a cached forward needs its Block"
            assert block.S <= cache.capacity, f"KV window {block.S} exceeds cache capacity {cache.capacity}"
            assert cache.rows == B, (cache.rows, B)
            plan = cache.plan(block)
            bits = tree_attention_bits(block) if c.is_hybrid and routes_tree_attention(self, block) else None
            attn_add = None if block.mask_full or not c.is_hybrid or bits is not None else additive_mask(
                block.mask, self.backbone.embedding.weight.dtype)

        x = self.backbone.embedding(input_ids)  # [B, T, E]
        dtype = x.dtype
        if c.residual_in_fp32:
            x = x.to(torch.promote_types(dtype, torch.float32))
        cos = sin = None
        if c.is_hybrid and c.attn_rotary_dim:
            cdt = torch.promote_types(dtype, torch.float32)
            rd = c.attn_rotary_dim
            inv_freq = 1.0 / c.attn_rotary_base ** (torch.arange(0, rd, 2, device=x.device, dtype=cdt) / rd)
            freqs = position_ids.to(cdt)[..., None] * inv_freq  # [B, T, rd/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, rd]
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        ssm_i = attn_i = 0
        for blk in self.backbone.layers:
            h = blk.norm(x.to(dtype))
            if isinstance(blk.mixer, MHA):
                kv = (None, None) if cache is None else (cache.kv.k[attn_i], cache.kv.v[attn_i])
                h = blk.mixer(h, cos, sin, *kv, block, attn_add, bits)
                attn_i += 1
            else:
                h = blk.mixer(h, cache, ssm_i, plan)
                ssm_i += 1
            x = x + h
            if c.d_intermediate:
                x = x + blk.mlp(blk.norm2(x.to(dtype)))
        return self.backbone.norm_f(last_rows(x, num_rows).to(dtype))


def init_random_mamba2(config: Mamba2Config, seed: int) -> Mamba2LMModel:
    """Deterministic random weights (fp32, CPU) whose greedy output depends on the context (runtime.models.init)."""
    model = Mamba2LMModel(config)
    return init_random_weights(model, model.backbone.embedding.weight, config.d_model, seed)
