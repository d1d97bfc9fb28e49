"""Mamba2 and Mamba2/attention hybrids whose forward verifies a whole token tree (STree) in one pass.

The block structure follows mamba-ssm's `MambaLMHeadModel` (`mamba_ssm/models/mixer_seq_simple.py`,
`modules/block.py`): an embedding, `n_layer` pre-norm residual blocks, each a mixer (Mamba2, or
multi-head attention at the indices in `attn_layer_idx`) plus an optional gated MLP (`d_intermediate`
> 0), a final RMSNorm and the LM head. The Mamba2 mixer follows `mamba_ssm/modules/mamba2.py` and the
Hugging Face `Mamba2Mixer`: in_proj -> [z, xBC, dt]; depthwise causal conv1d + SiLU on xBC -> [x, B, C];
`dt = clamp(softplus(dt + dt_bias), dt_limit)`, `A = -exp(A_log)` per head; the SSD recurrence with a
D skip; gated RMSNorm `norm(y * silu(z))` per group (norm_before_gate=False); out_proj. The attention
mixer follows `mamba_ssm/modules/mha.py` (fused in_proj q|k|v, partial rotate-half RoPE, out_proj).

`forward(input_ids, position_ids, cache, start, attn_mask)` has the Llama model's contract (slots
[start, start + T), `attn_mask[i, j]` iff slot j is an ancestor-or-self of node i). An SSM layer reads
each node's parent off the mask (the largest other visible slot) and runs one of three paths:
- causal, T > 1 (prefill, drafter catch-up): the chunked SSD scan from the committed state;
- causal, T == 1 (autoregressive step): the recurrence once;
- tree (any mask): the tree conv (windows gathered along ancestors, older entries from the state the
  block root continues from) and the tree-masked SSD (`codegen/ssm_tree_scan.py`), every node at once;
  each node's state and conv window go to the cache's scratch, from which `compact` commits.
`SSMCache` (runtime/models/ssm_cache.py) documents the slot contract. Attention layers of a hybrid use
a Llama `KVCache` held by the SSMCache.
Without a cache (`cache=None`, training) the block is one causal text from slot 0: SSM layers run the
chunked SSD scan from a zero state and window, attention layers attend causally within the block, and
nothing is stored; this path is differentiable and equals a cached prefill of the same tokens.

SSM arithmetic runs in fp32 (fp64 for fp64 models), as mamba-ssm does.

Shape legend: b batch, T new tokens, S start + T, E d_model, H SSM heads, P head dim, G groups,
N state size, Cd conv channels, W d_conv, R states a tree's roots continue from, V vocab.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codegen.ssm_tree_scan import ssm_tree_scan, ssm_tree_scan_ref
from runtime.models.llama import KVCache, LMHead, additive_mask, cached_attention, last_rows, rotate_half
from runtime.models.norm import RMSNorm
from runtime.models.ssm_cache import ForwardPlan, SSMCache

DEFAULT_NUM_SCRATCH = 64

from spec_compiler.arch import Mamba2Config

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
    xh = xp.reshape(b, nc, cs, G, R, P).permute(0, 3, 4, 1, 2, 5)  # [b, G, R, nc, cs, P]
    Bg = B.reshape(b, nc, cs, G, N).permute(0, 3, 1, 2, 4)[:, :, None]  # [b, G, 1, nc, cs, N]
    Cg = C.reshape(b, nc, cs, G, N).permute(0, 3, 1, 2, 4)[:, :, None]  # [b, G, 1, nc, cs, N]
    dth = dt.reshape(b, nc, cs, G, R).permute(0, 3, 4, 1, 2)  # [b, G, R, nc, cs]
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


def _depthwise_conv(win: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """win: [b, Cd, T, W] inputs per output, oldest first; weight: [Cd, 1, W] -> silu(conv) [b, T, Cd]."""
    out = (win * weight[:, 0, None, :]).sum(-1)  # [b, Cd, T]
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out).transpose(1, 2)


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
    """Depthwise conv + SiLU along each node's root path (ALGORITHMS.md §7.4).

    v: [b, T, Cd]; windows: [b, R, Cd, W-1] of the states the roots continue from; conv_index: [T, W]
    into [windows flattened ; v] (oldest first) -> out [b, T, Cd], node windows [b, T, Cd, W-1].
    """
    b, R, Cd, W1 = windows.shape
    buf = torch.cat([windows.to(v.dtype).permute(0, 2, 1, 3).reshape(b, Cd, R * W1), v.transpose(1, 2)], -1)
    win = buf[:, :, conv_index]  # [b, Cd, T, W]
    return _depthwise_conv(win, weight, bias), win[..., 1:].permute(0, 2, 1, 3)


# ---- modules ---------------------------------------------------------------------------------------------

class Mamba2Mixer(nn.Module):
    def __init__(self, c: Mamba2Config, use_triton: bool = False):
        super().__init__()
        self.c = c
        self.use_triton = use_triton
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
            dt = F.softplus((dt + self.dt_bias).to(cdt)).clamp(*c.dt_limit)  # [b, T, H]
            A = -torch.exp(self.A_log.to(cdt))  # [H]
            D = self.D.to(cdt).view(H, P) if c.D_has_hdim else self.D.to(cdt)
            y = ssd_chunked_scan(x.view(b, T, H, P), dt, A, Bm.view(b, T, G, N), Cm.view(b, T, G, N),
                                 c.chunk_size, D)[0]
            y = y.reshape(b, T, c.d_inner)
            y = self.norm(y, z) if c.rmsnorm else y * F.silu(z.to(cdt))
            return self.out_proj(y.to(u.dtype))
        S0, W0 = cache.read(layer, plan)  # [b, R, H, P, N], [b, R, Cd, W-1]
        if plan.chain:
            xBC, window = conv_chain(xBC, W0[:, 0], self.conv1d.weight, self.conv1d.bias)
        else:
            xBC, window = conv_tree(xBC, W0, plan.conv_index, self.conv1d.weight, self.conv1d.bias)

        cdt = torch.promote_types(u.dtype, torch.float32)
        x, Bm, Cm = xBC.to(cdt).split([c.d_inner, G * N, G * N], dim=-1)
        x, Bm, Cm = x.view(b, T, H, P), Bm.view(b, T, G, N), Cm.view(b, T, G, N)
        dt = F.softplus((dt + self.dt_bias).to(cdt)).clamp(*c.dt_limit)  # [b, T, H]
        A = -torch.exp(self.A_log.to(cdt))  # [H]
        D = self.D.to(cdt).view(H, P) if c.D_has_hdim else self.D.to(cdt)
        S0 = S0.to(cdt)
        if plan.chain and T == 1:
            y, state = ssm_step(S0[:, 0], x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D)
            y = y[:, None]
        elif plan.chain:
            y, state = ssd_chunked_scan(x, dt, A, Bm, Cm, c.chunk_size, D, S0[:, 0])
        elif self.use_triton and x.is_cuda and cdt == torch.float32 and len(plan.sources) == 1:
            y, state = ssm_tree_scan(x, dt, A, Bm, Cm, plan.anc, D=D, init_state=S0[:, 0], return_states=True)
        else:  # several roots (a drafter's level) or CPU: the torch form
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
                v_cache: Tensor | None, start: int, mask: Tensor | None) -> Tensor:
        # x: [b, T, E]; cos, sin: [b, 1, T, rd]; k_cache, v_cache: [b, Hkv, C, D] or None; mask: [T, S]
        b, T, _ = x.shape
        q, k, v = self.in_proj(x).split([self.H * self.D, self.Hkv * self.D, self.Hkv * self.D], dim=-1)
        q = q.view(b, T, self.H, self.D).transpose(1, 2)  # [b, H, T, D]
        k = k.view(b, T, self.Hkv, self.D).transpose(1, 2)  # [b, Hkv, T, D]
        v = v.view(b, T, self.Hkv, self.D).transpose(1, 2)
        if self.rd:
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        return self.out_proj(cached_attention(q, k, v, k_cache, v_cache, start, mask, self.scale))


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

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, num_scratch: int | None = None) -> SSMCache:
        """`num_scratch` bounds the tree size (default min(capacity, 64)): a tree forward of T nodes needs
        T entries, and continuing from a previous tree's node (drafting level by level, or the step after a
        root-only acceptance) needs that tree's nodes to survive: num_scratch >= tree size + 1 suffices."""
        c = self.config
        w = self.backbone.embedding.weight
        dtype, device = dtype or w.dtype, device or w.device
        n_attn = len(c.attn_layer_idx)
        kv = KVCache(n_attn, batch, c.attn_num_heads_kv, capacity, c.attn_head_dim, dtype=dtype,
                     device=device) if n_attn else None
        return SSMCache(c.num_ssm_layers, batch, c.nheads, c.headdim, c.d_state, c.conv_dim, c.d_conv, capacity,
                        num_scratch or min(capacity, DEFAULT_NUM_SCRATCH), kv, dtype=dtype, device=device)

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache: SSMCache | None = None, start: int = 0,
                attn_mask: Tensor | None = None, num_logits: int | None = None) -> Tensor:
        """Logits for a block of T new tokens at slots [start, start + T) (see the module docstring); for its
        last `num_logits` tokens only when given: `logits(hidden(...))`."""
        return self.logits(self.hidden(input_ids, position_ids, cache, start, attn_mask, num_logits))

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states [..., E] -> fp32 logits [..., V]."""
        return self.lm_head(h).float()

    def hidden(self, input_ids: Tensor, position_ids: Tensor, cache: SSMCache | None = None, start: int = 0,
               attn_mask: Tensor | None = None, num_rows: int | None = None) -> Tensor:
        """Final (normed) hidden states of a block of T new tokens, for its last `num_rows` only when given.

        With `cache=None` (training) `start` must be 0 and `attn_mask` None: the block is a causal text
        from an empty prefix (zero SSM state and conv window; attention causal within the block), nothing
        is stored, and the path is differentiable. It equals a cached prefill of the same block.
        """
        # input_ids, position_ids: [b, T]; attn_mask: [T, S] bool, True = ancestor-or-self -> [b, T or num_rows, E]
        c = self.config
        b, T = input_ids.shape
        S = start + T
        if cache is None:
            assert start == 0 and attn_mask is None, "cache=None runs one causal block from slot 0 (no mask)"
            plan = None
        else:
            assert S <= cache.capacity, f"start {start} + {T} tokens exceeds cache capacity {cache.capacity}"
            assert cache.ssm.shape[1] == b, (cache.ssm.shape, b)
            assert attn_mask is None or attn_mask.shape == (T, S), (None if attn_mask is None else attn_mask.shape,
                                                                    T, S)
            plan = cache.plan(start, T, attn_mask)

        x = self.backbone.embedding(input_ids)  # [b, T, E]
        dtype = x.dtype
        if c.residual_in_fp32:
            x = x.to(torch.promote_types(dtype, torch.float32))
        cos = sin = None
        if c.is_hybrid:
            if attn_mask is None and T > 1 and cache is not None:
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(diagonal=start)
            if c.attn_rotary_dim:
                cdt = torch.promote_types(dtype, torch.float32)
                rd = c.attn_rotary_dim
                inv_freq = 1.0 / c.attn_rotary_base ** (torch.arange(0, rd, 2, device=x.device, dtype=cdt) / rd)
                freqs = position_ids.to(cdt)[..., None] * inv_freq  # [b, T, rd/2]
                emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, T, rd]
                cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        attn_add = additive_mask(attn_mask, dtype) if c.is_hybrid else None  # the SSM plan keeps the bool mask
        ssm_i = attn_i = 0
        for blk in self.backbone.layers:
            h = blk.norm(x.to(dtype))
            if isinstance(blk.mixer, MHA):
                kv = (None, None) if cache is None else (cache.kv.k[attn_i], cache.kv.v[attn_i])
                h = blk.mixer(h, cos, sin, *kv, start, attn_add)
                attn_i += 1
            else:
                h = blk.mixer(h, cache, ssm_i, plan)
                ssm_i += 1
            x = x + h
            if c.d_intermediate:
                x = x + blk.mlp(blk.norm2(x.to(dtype)))
        if cache is not None:
            cache.finish(plan)
        return self.backbone.norm_f(last_rows(x, num_rows).to(dtype))


@torch.no_grad()
def init_random_mamba2(config: Mamba2Config, seed: int) -> Mamba2LMModel:
    """Deterministic random weights (fp32, CPU) whose greedy output depends on the context."""
    g = torch.Generator().manual_seed(seed)
    model = Mamba2LMModel(config)
    emb = model.backbone.embedding.weight

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    for name, p in model.named_parameters():
        if p is emb:
            p.copy_(torch.randn(p.shape, generator=g) * config.d_model ** -0.25)
        elif name.endswith("A_log"):
            p.copy_(torch.log(uniform(p.shape, 1.0, 16.0)))  # A in [-16, -1], mamba-ssm's A_init_range
        elif name.endswith("dt_bias"):
            dt = torch.exp(uniform(p.shape, math.log(1e-3), math.log(1e-1)))  # mamba-ssm's dt_min, dt_max
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith("mixer.D"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("norm.weight") or name.endswith("norm2.weight") or name.endswith("norm_f.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:  # linear and conv weights: unit gain over the fan-in
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model


@torch.no_grad()
def perturbed_copy(model: Mamba2LMModel, noise_std: float, seed: int) -> Mamba2LMModel:
    """A copy with Gaussian noise of `noise_std` times each tensor's own spread added to every weight."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    for p in out.parameters():
        spread = p.float().std() if p.numel() > 1 else p.float().abs().max()
        noise = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        p.add_(noise * (noise_std * spread).to(p.dtype))
    return out
