"""Model architectures: the frozen dataclasses every layer agrees on (no torch).

`LlamaConfig` (Llama, Qwen2, Mistral) and `Mamba2Config` (Mamba2 and Mamba2/attention hybrids) are what
validation resolves a target or drafter to (from a checkpoint's config.json, spec_compiler/checkpoint.py,
or from the config's architecture fields, `from_fields`), what the plan records, and what the runtime
builds models from (runtime/models/llama.py, mamba2.py) and training exports.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

FAMILIES = ("llama", "qwen2", "mistral")
GATED_MLP_MULTIPLE = 128
"""mamba-ssm's GatedMLP (mamba_ssm/modules/mlp.py) rounds its width up to this; a trained d_intermediate must
already be a multiple."""
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



@dataclass(frozen=True)
class Mamba2Config:
    vocab_size: int
    """Rows of the embedding and the LM head (mamba-ssm's vocab after pad_vocab_size_multiple)."""
    d_model: int
    n_layer: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    """SSD chunk length of the causal (prefill) scan."""
    d_intermediate: int = 0
    """Hidden width of the gated MLP after every mixer; 0 = no MLP (pure Mamba2 blocks)."""
    attn_layer_idx: tuple[int, ...] = ()
    """Layers whose mixer is attention instead of Mamba2 (a hybrid); () = pure Mamba2."""
    attn_num_heads: int = 0
    attn_num_heads_kv: int | None = None
    """None = attn_num_heads."""
    attn_head_dim: int | None = None
    """None = d_model // attn_num_heads."""
    attn_rotary_dim: int = 0
    """Leading head dims rotated by RoPE (rotate-half); 0 = no RoPE."""
    attn_rotary_base: float = 10000.0
    attn_qkv_bias: bool = True
    attn_out_bias: bool = True
    attn_softmax_scale: float | None = None
    """None = head_dim ** -0.5."""
    norm_epsilon: float = 1e-5
    """Block and final RMSNorms."""
    gated_norm_epsilon: float = 1e-5
    """The mixer's gated RMSNorm (mamba-ssm hard-codes 1e-5; HF uses layer_norm_epsilon)."""
    rmsnorm: bool = True
    """Gated RMSNorm after the scan; False = plain `y * silu(z)`."""
    D_has_hdim: bool = False
    conv_bias: bool = True
    bias: bool = False
    """Bias on the mixer's in_proj and out_proj."""
    dt_limit: tuple[float, float] = (0.0, math.inf)
    residual_in_fp32: bool = True
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "attn_layer_idx", tuple(sorted(int(i) for i in self.attn_layer_idx)))
        object.__setattr__(self, "dt_limit", tuple(float(x) for x in self.dt_limit))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if self.attn_layer_idx:
            if self.attn_num_heads_kv is None:
                object.__setattr__(self, "attn_num_heads_kv", self.attn_num_heads)
            if self.attn_head_dim is None:
                object.__setattr__(self, "attn_head_dim", self.d_model // self.attn_num_heads)
            assert self.attn_num_heads > 0 and self.attn_num_heads % self.attn_num_heads_kv == 0, self
            assert self.attn_rotary_dim % 2 == 0 and self.attn_rotary_dim <= self.attn_head_dim, self
            assert all(0 <= i < self.n_layer for i in self.attn_layer_idx), self.attn_layer_idx
        assert self.d_inner % self.headdim == 0, (self.d_inner, self.headdim)
        assert self.nheads % self.ngroups == 0 and self.d_inner % self.ngroups == 0, (self.nheads, self.ngroups)
        assert self.d_conv >= 2, self.d_conv

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def is_hybrid(self) -> bool:
        return bool(self.attn_layer_idx)

    @property
    def num_ssm_layers(self) -> int:
        return self.n_layer - len(self.attn_layer_idx)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("attn_layer_idx", "dt_limit", "eos_token_ids"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mamba2Config:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
