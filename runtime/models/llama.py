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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.models.init import init_random_weights, perturbed_copy  # noqa: F401  (perturbed_copy: re-exported)

from runtime.transfer import on_host, to_device
from runtime import batch as fwd  # fwd.Block: one forward's slots and mask (not the decoder Block below)
from runtime.models.norm import RMSNorm
from spec_compiler.arch import LlamaConfig

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
                     block: fwd.Block | None, mask: Tensor | None, scale: float | None = None,
                     bits: Tensor | None = None) -> Tensor:
    """Grouped-query attention of a block of T new tokens; writes their keys/values into the cache first.

    q: [B, H, T, D]; k, v: [B, Hkv, T, D] (the block's own); k_cache, v_cache: [B, Hkv, C, D], or None for
    training (the block attends causally to itself and nothing is stored); block: where the tokens go
    (`Block.slots`) and the window S they attend over; mask: [B, 1, T, S] additive (0 / -inf), made once
    per forward from `block.mask`. -> [B, T, H*D]. SDPA's enable_gqa reads each KV head in place for its
    H/Hkv query heads (bitwise equal to repeating the KV heads, without copying the cache every call).
    Under torch.export / torch.compile the cached path is the custom op `spec::cached_attention`
    (codegen/ops.py: the same arithmetic, one opaque node); eager skips the op dispatch.
    bits: [B, T, W] int64 ancestor bitsets (`tree_attention_bits`) when the forward routes to the tree-attention
    kernel: then the op `spec::tree_attention` (Triton on CUDA, its reference on the CPU) writes node i at slot
    L_b + i and attends to the prefix plus the node's ancestors, eager and exported alike; mask is unused.
    """
    B, H, T, D = q.shape
    if bits is not None:
        from codegen import ops  # noqa: F401  (registers torch.ops.spec)
        y = torch.ops.spec.tree_attention(q, k, v, k_cache, v_cache, block.lengths, bits, scale)
    elif k_cache is None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=True)
    elif torch.compiler.is_compiling():  # torch.export / dynamo: one opaque node, not a decomposed SDPA
        from codegen import ops  # noqa: F401  (registers torch.ops.spec; lazy: eager never pays for it)
        y = torch.ops.spec.cached_attention(q, k, v, k_cache, v_cache, block.slots, mask, block.S, scale)
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


def routes_tree_attention(model: nn.Module, block: fwd.Block | None) -> bool:
    """Whether `model`'s forward over `block` runs the tree-attention kernel: the block sits right after each
    row's prefix (`Block.at_prefix`, the kernel's contract) and its size T is one the plan compiled the kernel
    for (`model.tree_attention_sizes`, set at load from backend.attention: the tree buckets under triton,
    empty under sdpa). The plan, not this check, decides the device: validation allows triton on cuda only.
    A symbolic T (an exported program with T dynamic) keeps SDPA: the kernel is specialized per T."""
    sizes = getattr(model, "tree_attention_sizes", ())
    return bool(sizes) and block is not None and block.at_prefix and isinstance(block.T, int) and block.T in sizes


def tree_attention_bits(block: fwd.Block) -> Tensor:
    """block.anc [B, T, T] as the kernel's ancestor bitsets [B, T, W] int64, packed on its device (no host
    read), once per forward rather than per layer."""
    from codegen.tree_attention import anc_to_bitsets  # lazy: SDPA plans never import the kernel module
    return anc_to_bitsets(block.anc)


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
        the node offsets of a tree forward at slots L_b + i). Slots already in place are not touched. On a
        device: the `spec::kv_compact` kernel (Triton on CUDA: one launch for every layer, row and head, its
        indices sent without a host synchronisation); on the host: one indexed copy per tensor."""
        if all(p == list(range(len(p))) for p in paths):
            return  # a chain's accepted path, or a path through every first child
        if not on_host(self.k.device):
            from codegen import ops  # noqa: F401  (registers torch.ops.spec)
            M = max(map(len, paths))
            src = torch.tensor([[L + x for x in p] + [L + p[-1]] * (M - len(p)) for L, p in zip(lengths, paths)])
            num = torch.tensor([len(p) for p in paths])
            dev = self.k.device
            B = len(paths)  # rows 0..B-1: the engine's active rows come first
            torch.ops.spec.kv_compact(self.k[:, :B], self.v[:, :B], to_device(src, dev), to_device(num, dev),
                                      to_device(torch.tensor(lengths), dev))
            return
        rows, src, dst = [], [], []
        for b, (L, path) in enumerate(zip(lengths, paths)):
            for j, node in enumerate(path):
                if node != j:
                    rows.append(b)
                    src.append(L + node)
                    dst.append(L + j)
        rows, src, dst = (to_device(torch.tensor(x), self.k.device) for x in (rows, src, dst))
        # Indexing gathers into a new tensor first, so overlapping source and target are safe.
        self.k[:, rows, :, dst] = self.k[:, rows, :, src]
        self.v[:, rows, :, dst] = self.v[:, rows, :, src]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.H, self.Hkv, self.D = c.num_heads, c.num_kv_heads, c.head_dim
        self.wqkv = nn.Linear(c.hidden_size, (self.H + 2 * self.Hkv) * self.D, bias=c.attention_bias)
        self.wo = nn.Linear(self.H * self.D, c.hidden_size, bias=c.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor | None, v_cache: Tensor | None,
                block: fwd.Block | None, mask: Tensor | None, bits: Tensor | None = None) -> Tensor:
        # x: [B, T, hidden]; cos, sin: [B, 1, T, D]; k_cache, v_cache: [B, Hkv, C, D] or None; mask: [B, 1, T, S];
        # bits: [B, T, W] (tree-attention kernel) or None
        B, T, _ = x.shape
        qk, v = self.wqkv(x).split([(self.H + self.Hkv) * self.D, self.Hkv * self.D], dim=-1)
        qk = qk.view(B, T, self.H + self.Hkv, self.D).transpose(1, 2)  # [B, H + Hkv, T, D]
        qk = qk * cos + rotate_half(qk) * sin  # RoPE on queries and keys in one pass
        q, k = qk.split([self.H, self.Hkv], dim=1)  # [B, H, T, D], [B, Hkv, T, D]
        v = v.view(B, T, self.Hkv, self.D).transpose(1, 2)  # [B, Hkv, T, D]
        return self.wo(cached_attention(q, k, v, k_cache, v_cache, block, mask, bits=bits))


def last_rows(x: Tensor, n: int | None) -> Tensor:
    """x [B, T, E] -> its last n tokens [B, n, E] (all of them for None)."""
    return x if n is None else x[:, x.shape[1] - n:]


class LMHead(nn.Linear):
    """The vocabulary projection: an nn.Linear (same parameters, tying and checkpoints) marked as the head, so
    VocabTrim (`trim_lm_head`) and the GEMV-head CPU transform (runtime/transforms.py) find it."""


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
        self.w1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)  # down

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
                block: fwd.Block | None, mask: Tensor | None, bits: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, k_cache, v_cache, block, mask, bits)
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
        self.tree_attention_sizes: frozenset[int] = frozenset()  # T run by the tree-attention kernel (load sets it)

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
                block: fwd.Block | int | None = None, num_logits: int | None = None) -> Tensor:
        """Logits for a block of T new tokens (for its last `num_logits` tokens only, when given: a prefill
        needs none, a drafter's catch-up one): `logits(hidden(...))`."""
        return self.logits(self.hidden(input_ids, position_ids, cache, block, num_logits))

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states [..., hidden] -> fp32 logits [..., V]."""
        return self.output(h).float()

    def hidden(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache | None = None,
               block: fwd.Block | int | None = None, num_rows: int | None = None) -> Tensor:
        """Final (normed) hidden states of a block of T new tokens, for its last `num_rows` only when given.

        With a `cache`, `block` (runtime.batch.Block) says where each row's tokens go (their K/V are written
        at `block.slots`) and what they attend to (`block.mask` over slots [0, S)); an int `block` is
        `Block.causal(block, T, B)`: every row continues its text from that slot. With `cache=None`
        (training) nothing is stored and the block attends causally to itself; this path is differentiable.
        """
        # input_ids, position_ids: [B, T] -> [B, T or num_rows, hidden]
        B, T = input_ids.shape
        if cache is None:
            assert block is None or (isinstance(block, int) and block == 0), \
                "cache=None attends causally within the block from slot 0"
            block = mask = bits = None
        else:
            if isinstance(block, int):  # a causal continuation of every row from slot `block` (prefill, one token)
                block = fwd.Block.causal(block, T, B, device=input_ids.device)
            assert block is not None and block.slots.shape == (B, T), "a cached forward needs its Block"
            assert block.S <= cache.capacity, f"KV window {block.S} exceeds cache capacity {cache.capacity}"
            assert cache.k.shape[1] == B, (cache.k.shape, B)
            bits = tree_attention_bits(block) if routes_tree_attention(self, block) else None
            mask = None if block.mask_full or bits is not None else additive_mask(block.mask,
                                                                                  self.tok_embeddings.weight.dtype)

        x = self.tok_embeddings(input_ids)  # [B, T, hidden]
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = (None, None) if cache is None else (cache.k[i], cache.v[i])
            x = layer(x, cos, sin, k_cache, v_cache, block, mask, bits)
        return self.norm(last_rows(x, num_rows))


def init_random(config: LlamaConfig, seed: int) -> LlamaModel:
    """Deterministic random weights (fp32, CPU) whose greedy output depends on the context (runtime.models.init)."""
    model = LlamaModel(config)
    return init_random_weights(model, model.tok_embeddings.weight, config.hidden_size, seed)
