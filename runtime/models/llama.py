"""A compact Llama-family decoder (Llama 2/3, Qwen2, Mistral) whose forward takes positions and mask.

One definition serves the target and the drafters. Unlike the Hugging Face classes, `forward` is
told explicitly where each token sits (`position_ids`, for RoPE) and what it may attend to
(`attn_mask` over cache slots), so a whole token tree is verified in one call: node i gets position
`prefix_len + depth(i)` and sees the prefix plus its own ancestors. Keys and values go to a
preallocated `KVCache` written by slot index, and `KVCache.compact` keeps an accepted path.
Without a cache (`cache=None`, training) a block attends causally to itself and nothing is stored.

The arithmetic follows `transformers` (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM):
RMSNorm in fp32, rotate-half RoPE with optional Llama-3 frequency scaling, grouped-query attention,
SwiGLU MLP. References: gpt-fast `model.py` (layout, KVCache), nanoGPT `model.py`.

Shape legend: B batch, T new tokens, S attended cache slots (start + T), C cache capacity,
H query heads, Hkv key/value heads, D head dim, V vocab.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.batch import Block

FAMILIES = ("llama", "qwen2", "mistral")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_heads."""
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    """None (plain RoPE) or sorted (key, value) pairs with rope_type "llama3" and LLAMA3_ROPE_KEYS."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v. HF Llama puts it on o_proj as well, Qwen2 (always True) does not: see `o_bias`."""
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    family: str = "llama"
    """"llama" | "qwen2" | "mistral"."""

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        elif self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(sorted(tuple(kv) for kv in self.rope_scaling)))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        assert self.family in FAMILIES, self.family
        assert self.num_heads % self.num_kv_heads == 0, (self.num_heads, self.num_kv_heads)

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.family == "llama"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def rope_inv_freq(config: LlamaConfig, device: torch.device | str = "cpu") -> Tensor:
    """Inverse RoPE frequencies in fp32, [D // 2], with Llama-3 scaling when configured."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D))
    if config.rope_scaling is None:
        return inv_freq
    s = dict(config.rope_scaling)
    assert s["rope_type"] == "llama3", s
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                     block: Block | None, mask: Tensor | None, scale: float | None = None) -> Tensor:
    """Grouped-query attention of a block of T new tokens; writes their keys/values into the cache first.

    q: [B, H, T, D]; k, v: [B, Hkv, T, D] (the block's own); k_cache, v_cache: [B, Hkv, C, D], or None for
    training (the block attends causally to itself and nothing is stored); block: where the tokens go
    (`Block.slots`) and the window S they attend over; mask: [B, 1, T, S] additive (0 / -inf), made once
    per forward from `block.mask`. -> [B, T, H*D]. SDPA's enable_gqa reads each KV head in place for its
    H/Hkv query heads (bitwise equal to repeating the KV heads, without copying the cache every call).
    """
    B, H, T, D = q.shape
    if k_cache is None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)
    else:
        if block.start is not None:  # every row writes slots start..start+T-1: a plain slice
            k_cache[:, :, block.start:block.start + T] = k
            v_cache[:, :, block.start:block.start + T] = v
        else:  # written by index: [B, Hkv, T, D] at slots [B, T]
            idx = block.slots[:, None, :, None].expand(B, k.shape[1], T, D)
            k_cache.scatter_(2, idx, k)
            v_cache.scatter_(2, idx, v)
        k, v = k_cache[:, :, :block.S], v_cache[:, :, :block.S]  # [B, Hkv, S, D] views of the cache
        if torch.is_grad_enabled():  # autograd must keep what it saw, not a view later steps overwrite
            k, v = k.clone(), v.clone()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)  # [B, H, T, D]
    return y.transpose(1, 2).reshape(B, T, H * D)


def cached_derived(owner: nn.Module, name: str, sources: tuple[Tensor | None, ...], make):
    """make(), kept on `owner` under `name` and rebuilt whenever a source tensor is replaced or changed in
    place (keyed by data pointer and version counter): packed and reshaped copies of weights. A tensor
    made under inference_mode has no version counter: only its replacement is seen."""
    key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in sources if t is not None)
    hit = owner.__dict__.get(name)
    if hit is None or hit[0] != key:
        hit = owner.__dict__[name] = (key, make())
    return hit[1]


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool attention mask (True = may attend) as SDPA's additive form (0 / -inf), made once per forward
    rather than by SDPA in every layer; SDPA's result is bitwise the same. [B, T, S] -> [B, 1, T, S]."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return add[:, None] if add.dim() == 3 else add


class KVCache:
    """Keys and values for every layer and cache row, allocated once and written by slot index."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, C, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, C, D]

    @classmethod
    def _view(cls, k: Tensor, v: Tensor) -> "KVCache":
        out = cls.__new__(cls)
        out.k, out.v = k, v
        return out

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def view_rows(self, lo: int, hi: int) -> "KVCache":
        """Rows lo..hi-1 as a cache of their own (a view: writes go to this cache)."""
        return KVCache._view(self.k[:, lo:hi], self.v[:, lo:hi])

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst := row src (a request moving to another row)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def commit(self, lengths: list[int], paths: list[list[int]]) -> None:
        """Keep each row's accepted path: slot L_b + paths[b][j] moves to L_b + j (paths[b] ascending from 0,
        the node offsets of a tree forward at slots L_b + i). Slots already in place are not touched."""
        rows, src, dst = [], [], []
        for b, (L, path) in enumerate(zip(lengths, paths)):
            for j, node in enumerate(path):
                if node != j:
                    rows.append(b)
                    src.append(L + node)
                    dst.append(L + j)
        if not rows:
            return  # a chain's accepted path, or a path through every first child
        dev = self.k.device
        rows, src, dst = (torch.tensor(x, device=dev) for x in (rows, src, dst))
        # Indexing gathers into a new tensor first, so overlapping source and target are safe.
        self.k[:, rows, :, dst] = self.k[:, rows, :, src]
        self.v[:, rows, :, dst] = self.v[:, rows, :, src]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32, cast back, then scale (HF Llama's order); in fp32 that is one op with the weight
        w = self._parameters["weight"]
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            if not torch.is_grad_enabled() and x.device.type == "cpu":
                return self._cpu_inference(x, w)
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return w * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _cpu_inference(self, x: Tensor, w: Tensor) -> Tensor:
        """RMSNorm(x) * w as LayerNorm([x, -x]) * [w, w], first half: [x, -x] has mean 0 and variance
        mean(x^2), so this is the same map to fp32 rounding. Why: on CPU F.rms_norm is a composite of
        about six dispatched ops and layer_norm one native kernel (one 128-wide row on the CI box: ~36 us
        vs ~16 us per call), and decoding runs 2 * layers + 1 norms per token."""
        E = x.shape[-1]
        w2 = cached_derived(self, "_w2", (w,), lambda: torch.cat((w.detach(), w.detach())))
        return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * E,), w2, None, self.eps)[..., :E]


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.H, self.Hkv, self.D = c.num_heads, c.num_kv_heads, c.head_dim
        self.wqkv = Linear(c.hidden_size, (self.H + 2 * self.Hkv) * self.D, bias=c.attention_bias)
        self.wo = Linear(self.H * self.D, c.hidden_size, bias=c.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                block: Block | None, mask: Tensor | None) -> Tensor:
        # x: [B, T, hidden]; cos, sin: [B, 1, T, D]; k_cache, v_cache: [B, Hkv, C, D] or None; mask: [B, 1, T, S]
        B, T, _ = x.shape
        qk, v = self.wqkv(x).split([(self.H + self.Hkv) * self.D, self.Hkv * self.D], dim=-1)
        qk = qk.view(B, T, self.H + self.Hkv, self.D).transpose(1, 2)  # [B, H + Hkv, T, D]
        qk = qk * cos + rotate_half(qk) * sin  # RoPE on queries and keys in one pass
        q, k = qk.split([self.H, self.Hkv], dim=1)  # [B, H, T, D], [B, Hkv, T, D]
        v = v.view(B, T, self.Hkv, self.D).transpose(1, 2)  # [B, Hkv, T, D]
        return self.wo(cached_attention(q, k, v, k_cache, v_cache, block, mask))


def last_rows(x: Tensor, n: int | None) -> Tensor:
    """x [B, T, E] -> its last n tokens [B, n, E] (all of them for None)."""
    return x if n is None else x[:, x.shape[1] - n:]


@functools.cache
def fp16_weight_gemm():
    """(pack, apply) for fbgemm's fp16-weight GEMM on CPU (fp16 weights, fp32 activations and accumulation),
    or None where this torch build or CPU lacks fbgemm: pack(weight [N, K], bias [N] | None) -> packed,
    apply(x [M, K], packed) -> [M, N] fp32.

    Why not plain F.linear: inference here is a few rows against each weight (one token, or one verify
    tree), where MKL's sgemm is slow on the 2-core AMD EPYC CI box and every step streams the weights from
    memory. fbgemm's fp16 kernels read half the bytes and are built for small M: the default 7.3 M target's
    forward at 600 tokens of context took 4.6 ms (1 token) and 8-9 ms (5 tokens) with F.linear, 3.5 ms and
    4.7 ms this way (torch 2.13 CPU, one thread). It is the kernel behind torch.ao's dynamic fp16 Linear.
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    return fbgemm_alias_gemm() or quantized_ops_gemm()


def fbgemm_alias_gemm():
    """Through `torch.fbgemm_*` (least call overhead), or None where this torch no longer has them. They
    are deprecated aliases: their one-time warning is raised (and silenced) here."""
    pack, lin = getattr(torch, "fbgemm_pack_gemm_matrix_fp16", None), getattr(torch, "fbgemm_linear_fp16_weight", None)
    if pack is None or lin is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin(torch.zeros(1, 1), pack(torch.zeros(1, 1)), torch.zeros(1))
    return (lambda w, b: (pack(w), b if b is not None else torch.zeros(w.shape[0]))), lambda x, p: lin(x, *p)


def quantized_ops_gemm():
    """Through `torch.ops.quantized.linear_{prepack,dynamic}_fp16` (torch.ao's dynamic fp16 Linear)."""
    ops = torch.ops.quantized
    return (lambda w, b: ops.linear_prepack_fp16(w, b)), ops.linear_dynamic_fp16


class Linear(nn.Linear):
    """nn.Linear (same parameters, tying and checkpoints) with a CPU inference path.

    Under no_grad on CPU with fp32 activations, a weight (and bias) whose every value is exactly an fp16
    number -- a checkpoint stored in fp16 and loaded as fp32, like the trained default pair -- runs through
    fbgemm's fp16-weight GEMM (`fp16_weight_gemm`): the same linear map in fp32 arithmetic, summed in
    another order. Any other weight, training, other dtypes and devices use F.linear. The packed copy is
    rebuilt whenever the weight changes.
    """

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return super().forward(x)
        packed = self._packed()
        if packed is None:
            return self._cpu_fp32(x)
        weights, apply = packed
        out = apply(x.reshape(-1, x.shape[-1]), weights)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _cpu_fp32(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def _packed(self):
        """(fp16-packed weight, apply), or None (no fbgemm, or a value fp16 cannot hold exactly)."""
        params = self._parameters  # (this runs for every projection of every token: no nn.Module __getattr__)
        w, b = params["weight"], params["bias"]

        def pack():
            gemm = fp16_weight_gemm()
            exact = w.dtype == torch.float32 and all(
                t is None or torch.equal(t.detach().half().float(), t.detach()) for t in (w, b))
            return (gemm[0](w.detach(), None if b is None else b.detach()), gemm[1]) if gemm and exact else None
        return cached_derived(self, "_packed_w", (w, b), pack)


class LMHead(Linear):
    """The vocabulary projection (a Linear: same parameter names, tying and checkpoints).

    For an fp32 weight that fp16 cannot hold (no fbgemm path), CPU inference still avoids F.linear: for a
    few rows against a [V, E] weight, MKL's sgemm runs far below memory bandwidth on the CI box (V=16384,
    E=256, fp32, one thread: one row 2.7 ms via F.linear vs 0.6 ms as a GEMV against the transposed weight;
    five rows 5.3 ms vs 2.4 ms as W @ h^T). The head is the largest matmul of a small drafter or target.
    """

    def _cpu_fp32(self, h: Tensor) -> Tensor:
        # h: [..., E] -> [..., V]
        if self.bias is not None:
            return F.linear(h, self.weight, self.bias)
        rows = h.reshape(-1, h.shape[-1])  # [m, E]
        out = rows @ self._transposed() if rows.shape[0] == 1 else (self.weight @ rows.t()).t()  # [m, V]
        return out.view(*h.shape[:-1], out.shape[-1])

    def _transposed(self) -> Tensor:
        w = self.weight
        return cached_derived(self, "_wt", (w,), lambda: w.detach().t().contiguous())  # [E, V]


def trim_lm_head(model: nn.Module, ids: Tensor) -> None:
    """Replace the model's LMHead (Llama `output`, Mamba2 `lm_head`) by one over rows `ids` only (VocabTrim):
    logits[..., j] then belong to token ids[j]. The copy unties a tied head; the input embedding stays whole,
    because the model must still embed every accepted token."""
    for parent in list(model.modules()):
        for name, head in parent.named_children():
            if isinstance(head, LMHead):
                w = head.weight.detach()
                new = LMHead(head.in_features, len(ids), bias=head.bias is not None, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    new.weight.copy_(w[ids.to(w.device)])
                    if head.bias is not None:
                        new.bias.copy_(head.bias.detach()[ids.to(w.device)])
                setattr(parent, name, new.requires_grad_(False))
                return
    raise TypeError(f"{type(model).__name__} has no LMHead to trim")


class FeedForward(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.w1 = Linear(c.hidden_size, c.intermediate_size, bias=False)  # gate
        self.w3 = Linear(c.hidden_size, c.intermediate_size, bias=False)  # up
        self.w2 = Linear(c.intermediate_size, c.hidden_size, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward = FeedForward(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                block: Block | None, mask: Tensor | None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, k_cache, v_cache, block, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would round the RoPE frequencies too (and `to_empty` would clear them):
        # recompute them in fp32 on the new device after every such move.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config, self.tok_embeddings.weight.device)
        return self

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        w = self.tok_embeddings.weight
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim,
                       dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache | None = None,
                block: Block | None = None, num_logits: int | None = None) -> Tensor:
        """Logits for a block of T new tokens (for its last `num_logits` tokens only, when given: a prefill
        needs none, a drafter's catch-up one): `logits(hidden(...))`."""
        return self.logits(self.hidden(input_ids, position_ids, cache, block, num_logits))

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states [..., hidden] -> fp32 logits [..., V]."""
        return self.output(h).float()

    def hidden(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache | None = None,
               block: Block | None = None, num_rows: int | None = None) -> Tensor:
        """Final (normed) hidden states of a block of T new tokens, for its last `num_rows` only when given.

        With a `cache`, `block` (runtime.batch.Block) says where each row's tokens go (their K/V are written
        at `block.slots`) and what they attend to (`block.mask` over slots [0, S)). With `cache=None`
        (training) nothing is stored and the block attends causally to itself; this path is differentiable.
        """
        # input_ids, position_ids: [B, T] -> [B, T or num_rows, hidden]
        B, T = input_ids.shape
        if cache is None:
            assert block is None, "cache=None attends causally within the block; no Block"
            mask = None
        else:
            assert block is not None and block.slots.shape == (B, T), "a cached forward needs its Block"
            assert block.S <= cache.capacity, f"KV window {block.S} exceeds cache capacity {cache.capacity}"
            assert cache.k.shape[1] == B, (cache.k.shape, B)
            mask = None if block.mask_full else additive_mask(block.mask, self.tok_embeddings.weight.dtype)

        x = self.tok_embeddings(input_ids)  # [B, T, hidden]
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = (None, None) if cache is None else (cache.k[i], cache.v[i])
            x = layer(x, cos, sin, k_cache, v_cache, block, mask)
        return self.norm(last_rows(x, num_rows))


@torch.no_grad()
def init_random(config: LlamaConfig, seed: int) -> LlamaModel:
    """Deterministic random weights (fp32, CPU) whose greedy output depends on the context."""
    g = torch.Generator().manual_seed(seed)
    model = LlamaModel(config)
    emb = model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if p is emb:
            # Tied or not, hidden**-0.25 keeps both the residual stream and the logits O(1)-ish.
            p.copy_(torch.randn(p.shape, generator=g) * config.hidden_size ** -0.25)
        elif name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


@torch.no_grad()
def perturbed_copy(model: LlamaModel, noise_std: float, seed: int) -> LlamaModel:
    """A copy with Gaussian noise of `noise_std` times each tensor's own std added to every weight."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    for p in out.parameters():
        noise = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        p.add_(noise * (noise_std * p.float().std()).to(p.dtype))
    return out
