"""Hugging Face checkpoint directories <-> `LlamaModel`: the tensors.

Weights from `model.safetensors` or a sharded `model.safetensors.index.json`, renamed to our layout
(q, k, v fused). config.json, manifest.json and the EOS ids are read by `spec_compiler.checkpoint`
(no torch; validation reads architectures there). `save_llama` writes the same layout, loadable by
`transformers.AutoModelForCausalLM`. Every problem with a user's files is a `CheckpointError`
whose `where` is the offending file (or directory).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from runtime.models.llama import LlamaModel
from spec_compiler.arch import LlamaConfig
from spec_compiler.checkpoint import checkpoint_dir, config_to_hf, read_json, read_llama_config, verify_manifest
from spec_compiler.errors import CheckpointError


def hf_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name this config needs, with its shape."""
    H, Hkv, D, E, I = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    s = {"model.embed_tokens.weight": (c.vocab_size, E), "model.norm.weight": (E,)}
    if not c.tie_word_embeddings:
        s["lm_head.weight"] = (c.vocab_size, E)
    for n in range(c.num_layers):
        p = f"model.layers.{n}."
        for proj, rows in (("q", H * D), ("k", Hkv * D), ("v", Hkv * D)):
            s[p + f"self_attn.{proj}_proj.weight"] = (rows, E)
            if c.attention_bias:
                s[p + f"self_attn.{proj}_proj.bias"] = (rows,)
        s[p + "self_attn.o_proj.weight"] = (E, H * D)
        if c.o_bias:
            s[p + "self_attn.o_proj.bias"] = (E,)
        s[p + "mlp.gate_proj.weight"] = (I, E)
        s[p + "mlp.up_proj.weight"] = (I, E)
        s[p + "mlp.down_proj.weight"] = (E, I)
        s[p + "input_layernorm.weight"] = (E,)
        s[p + "post_attention_layernorm.weight"] = (E,)
    return s


def hf_to_ours(c: LlamaConfig, w: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename HF tensors to LlamaModel's state dict (q, k, v fused into wqkv)."""
    sd = {"tok_embeddings.weight": w["model.embed_tokens.weight"], "norm.weight": w["model.norm.weight"]}
    sd["output.weight"] = sd["tok_embeddings.weight"] if c.tie_word_embeddings else w["lm_head.weight"]
    for n in range(c.num_layers):
        p, q = f"model.layers.{n}.", f"layers.{n}."
        a = p + "self_attn."
        sd[q + "attention.wqkv.weight"] = torch.cat([w[a + f"{x}_proj.weight"] for x in "qkv"])
        if c.attention_bias:
            sd[q + "attention.wqkv.bias"] = torch.cat([w[a + f"{x}_proj.bias"] for x in "qkv"])
        sd[q + "attention.wo.weight"] = w[a + "o_proj.weight"]
        if c.o_bias:
            sd[q + "attention.wo.bias"] = w[a + "o_proj.bias"]
        sd[q + "feed_forward.w1.weight"] = w[p + "mlp.gate_proj.weight"]
        sd[q + "feed_forward.w3.weight"] = w[p + "mlp.up_proj.weight"]
        sd[q + "feed_forward.w2.weight"] = w[p + "mlp.down_proj.weight"]
        sd[q + "attention_norm.weight"] = w[p + "input_layernorm.weight"]
        sd[q + "ffn_norm.weight"] = w[p + "post_attention_layernorm.weight"]
    return sd


def ours_to_hf(model: LlamaModel) -> dict[str, Tensor]:
    c = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    w = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = sd["output.weight"]
    split = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
    for n in range(c.num_layers):
        p, q = f"model.layers.{n}.", f"layers.{n}."
        a = p + "self_attn."
        for x, t in zip("qkv", sd[q + "attention.wqkv.weight"].split(split)):
            w[a + f"{x}_proj.weight"] = t
        if c.attention_bias:
            for x, t in zip("qkv", sd[q + "attention.wqkv.bias"].split(split)):
                w[a + f"{x}_proj.bias"] = t
        w[a + "o_proj.weight"] = sd[q + "attention.wo.weight"]
        if c.o_bias:
            w[a + "o_proj.bias"] = sd[q + "attention.wo.bias"]
        w[p + "mlp.gate_proj.weight"] = sd[q + "feed_forward.w1.weight"]
        w[p + "mlp.up_proj.weight"] = sd[q + "feed_forward.w3.weight"]
        w[p + "mlp.down_proj.weight"] = sd[q + "feed_forward.w2.weight"]
        w[p + "input_layernorm.weight"] = sd[q + "attention_norm.weight"]
        w[p + "post_attention_layernorm.weight"] = sd[q + "ffn_norm.weight"]
    # Own contiguous storage per tensor: q/k/v are views of wqkv, and safetensors refuses shared storage.
    return {k: v.cpu().clone(memory_format=torch.contiguous_format) for k, v in w.items()}


def _weight_files(d: Path) -> tuple[Path, dict[Path, list[str]]]:
    """(file blamed for absent tensors, safetensors files -> tensor names the index places there)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = read_json(index)
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(str(index), "no weight_map object")
        files: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(d / str(shard), []).append(name)
        for f in files:
            if not f.is_file():
                raise CheckpointError(str(f), f"shard listed in {index.name} is missing")
        return index, files
    single = d / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(str(single), "no weights: neither model.safetensors nor "
                                           "model.safetensors.index.json exists (only safetensors are read)")
    return single, {single: []}


def _read_shard(f: Path, promised: list[str], wanted: dict[str, tuple[int, ...]],
                dtype: torch.dtype) -> dict[str, Tensor]:
    w: dict[str, Tensor] = {}
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            keys = set(sf.keys())
            absent = [n for n in promised if n in wanted and n not in keys]
            if absent:
                raise CheckpointError(str(f), f"tensor {absent[0]} listed in the index is not in this shard")
            for n in sorted(keys & wanted.keys()):
                shape = tuple(sf.get_slice(n).get_shape())
                if shape != wanted[n]:
                    raise CheckpointError(str(f), f"tensor {n} has shape {shape}, expected {wanted[n]}")
                w[n] = sf.get_tensor(n).to(dtype)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(str(f), f"corrupt or truncated safetensors file ({e})") from None
    return w


def _read_tensors(d: Path, wanted: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, Tensor]:
    """The `wanted` tensors, shape-checked and cast to `dtype`; extra tensors are ignored."""
    blame, files = _weight_files(d)
    w: dict[str, Tensor] = {}
    for f, promised in files.items():
        w |= _read_shard(f, promised, wanted, dtype)
    missing = sorted(wanted.keys() - w.keys())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(str(blame), f"tensor missing: {shown}")
    return w


def load_llama(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LlamaModel:
    """A LlamaModel from a Hugging Face checkpoint directory, in `dtype` on `device`, in eval mode."""
    d = checkpoint_dir(path)
    verify_manifest(d)
    config = read_llama_config(d)
    w = _read_tensors(d, hf_shapes(config), dtype)
    with torch.device("meta"):
        model = LlamaModel(config)
    model.load_state_dict(hf_to_ours(config, w), assign=True)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()


def save_llama(model: LlamaModel, path: str | Path) -> None:
    """Write config.json + model.safetensors, loadable by load_llama and AutoModelForCausalLM."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.config)
    hf["torch_dtype"] = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    (d / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(ours_to_hf(model), str(d / "model.safetensors"), metadata={"format": "pt"})


