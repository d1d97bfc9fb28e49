"""Hugging Face checkpoint directories <-> `LlamaModel`.

Reads `config.json` (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM; both the legacy
`rope_theta` + `rope_scaling` keys and the transformers-5 `rope_parameters` dict), weights from
`model.safetensors` or a sharded `model.safetensors.index.json`, `tokenizer.json` and the EOS ids
in `generation_config.json`. `save_llama` writes the same layout, loadable by
`transformers.AutoModelForCausalLM`. Every problem with a user's files is a `CheckpointError`
whose `where` is the offending file (or directory).

A directory with a `manifest.json` (the trained pairs, training/train.py) has the size and sha256 of
each listed file checked before the file is used, so a corrupt or truncated download fails loudly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import Tensor

from runtime.models.llama import LLAMA3_ROPE_KEYS, LlamaConfig, LlamaModel
from spec_compiler.errors import CheckpointError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# What transformers assumes when config.json leaves the key out.
DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 131072}
DEFAULT_SLIDING_WINDOW = {"llama": None, "qwen2": 4096, "mistral": 4096}


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(str(file), "file not found")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(str(file), f"not valid JSON ({e})") from None


MANIFEST = "manifest.json"
MANIFEST_MISMATCH = "sha256 mismatch with manifest.json (corrupt or truncated)"


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_manifest(d: Path, names: Optional[Iterable[str]] = None) -> None:
    """Check size and sha256 of every file `d/manifest.json` lists (only those in `names` if given).

    No manifest, nothing to check. A listed file that is missing or differs raises CheckpointError naming it.
    """
    file = d / MANIFEST
    if not file.is_file():
        return
    m = _read_json(file)
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
            for e in files.values()):
        raise CheckpointError(str(file), 'corrupt manifest: needs a "files" object of {"sha256", "size"} entries')
    wanted = None if names is None else set(names)
    for name, entry in files.items():
        if wanted is not None and name not in wanted:
            continue
        f = d / name
        if not f.is_file():
            raise CheckpointError(str(f), "missing, but listed in manifest.json (corrupt or truncated checkpoint)")
        if f.stat().st_size != entry["size"] or sha256_file(f) != entry["sha256"]:
            raise CheckpointError(str(f), MANIFEST_MISMATCH)


def _checkpoint_dir(path: str | Path) -> Path:
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(str(d), "checkpoint directory does not exist")
    return d


def _int(d: dict, key: str, where: str, default: int | None = None, minimum: int = 1) -> int:
    v = d.get(key)
    v = default if v is None else v
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise CheckpointError(where, f"{key} must be an integer >= {minimum}", v)
    return v


def _float(d: dict, key: str, where: str, default: float) -> float:
    v = d.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise CheckpointError(where, f"{key} must be a positive number", v)
    return float(v)


def _rope(d: dict, where: str) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling) from either the legacy or the transformers-5 layout."""
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise CheckpointError(where, "rope_parameters / rope_scaling must be an object", params)
    theta = _float(params, "rope_theta", where, 10000.0)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(where, "partial_rotary_factor != 1 is not supported", params["partial_rotary_factor"])
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise CheckpointError(where, "unsupported rope_type (supported: default, llama3)", kind)
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in params]
    if missing:
        raise CheckpointError(where, f"llama3 rope scaling lacks {', '.join(missing)}")
    for k in LLAMA3_ROPE_KEYS:
        _float(params, k, where, 1.0)
    if params["high_freq_factor"] <= params["low_freq_factor"]:
        raise CheckpointError(where, "llama3 rope scaling needs high_freq_factor > low_freq_factor",
                              (params["low_freq_factor"], params["high_freq_factor"]))
    return theta, (("rope_type", "llama3"),) + tuple((k, params[k]) for k in LLAMA3_ROPE_KEYS)


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> LlamaConfig:
    """LlamaConfig from a parsed HF config.json; `where` names the file in errors."""
    if not isinstance(d, dict):
        raise CheckpointError(where, "config.json must hold a JSON object")
    archs = d.get("architectures") or []
    family = d.get("model_type")
    if family is None and isinstance(archs, list) and archs:
        family = ARCHITECTURES.get(str(archs[0]))
    if (not isinstance(archs, list) or (archs and not any(a in ARCHITECTURES for a in archs))
            or not isinstance(family, str) or family not in DEFAULT_MAX_POSITIONS):
        raise CheckpointError(where, f"unsupported architecture (supported: {', '.join(ARCHITECTURES)})",
                              archs or d.get("model_type"))
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise CheckpointError(where, f"missing required keys: {', '.join(missing)}")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(where, "only hidden_act silu is supported", d["hidden_act"])
    if d.get("mlp_bias", False):
        raise CheckpointError(where, "mlp_bias is not supported")

    hidden, heads = _int(d, "hidden_size", where), _int(d, "num_attention_heads", where)
    kv_heads = _int(d, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise CheckpointError(where, f"num_attention_heads {heads} is not a multiple of num_key_value_heads", kv_heads)
    if d.get("head_dim") is None and hidden % heads:
        raise CheckpointError(where, f"hidden_size {hidden} is not a multiple of num_attention_heads", heads)
    head_dim = _int(d, "head_dim", where, default=hidden // heads)
    if head_dim % 2:
        raise CheckpointError(where, "head_dim must be even for RoPE", head_dim)
    max_pos = _int(d, "max_position_embeddings", where, default=DEFAULT_MAX_POSITIONS[family])
    num_layers = _int(d, "num_hidden_layers", where)

    window = d.get("sliding_window", DEFAULT_SLIDING_WINDOW[family])
    if family == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    layer_types = d.get("layer_types")
    if family == "qwen2" and layer_types is None and window is not None:
        first_sliding = _int(d, "max_window_layers", where, default=28, minimum=0)
        layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
    sliding = family == "mistral" or (isinstance(layer_types, list) and "sliding_attention" in layer_types)
    if sliding and window is not None and (not isinstance(window, int) or window < max_pos):
        raise CheckpointError(where, f"sliding-window attention (window {window} < max_position_embeddings "
                                     f"{max_pos}) is not implemented", window)

    theta, scaling = _rope(d, where)
    eos = d.get("eos_token_id")
    bos = d.get("bos_token_id")
    return LlamaConfig(
        vocab_size=_int(d, "vocab_size", where),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=_int(d, "intermediate_size", where),
        head_dim=head_dim,
        rms_norm_eps=_float(d, "rms_norm_eps", where, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(d.get("attention_bias", False)),
        max_position_embeddings=max_pos,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=_eos_list(eos, where),
        family=family,
    )


def config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    """HF config.json for `c`, in the legacy rope layout that transformers 4 and 5 both read."""
    arch = {v: k for k, v in ARCHITECTURES.items()}[c.family]
    eos = list(c.eos_token_ids)
    d = {
        "architectures": [arch],
        "model_type": c.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_scaling is None else dict(c.rope_scaling),
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }
    if c.family == "llama":
        d["attention_bias"] = c.attention_bias
        d["mlp_bias"] = False
    else:
        d["sliding_window"] = None
        d["use_sliding_window"] = False
    return d


def _eos_list(eos: Any, where: str) -> tuple[int, ...]:
    if eos is None:
        return ()
    ids = [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(where, "eos_token_id must be an integer or a list of integers", eos)
    return tuple(ids)


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
        idx = _read_json(index)
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
    d = _checkpoint_dir(path)
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The `tokenizer.json` of a checkpoint directory (checked against its manifest.json, if any)."""
    d = _checkpoint_dir(path)
    verify_manifest(d, ["tokenizer.json"])
    return load_tokenizer_file(d / "tokenizer.json")


def load_tokenizer_file(file: Path) -> Tokenizer:
    if not file.is_file():
        raise CheckpointError(str(file), "file not found")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises bare Exception subclasses for malformed files
        raise CheckpointError(str(file), f"not a valid tokenizers file ({e})") from None


def read_eos_ids(path: str | Path) -> list[int]:
    """EOS ids from generation_config.json, else config.json; [] when neither names one."""
    d = _checkpoint_dir(path)
    verify_manifest(d, ["generation_config.json", "config.json"])
    for name in ("generation_config.json", "config.json"):
        file = d / name
        if not file.is_file():
            continue
        cfg = _read_json(file)
        if isinstance(cfg, dict) and cfg.get("eos_token_id") is not None:
            return list(_eos_list(cfg["eos_token_id"], str(file)))
    return []


def read_llama_config(path: str | Path) -> LlamaConfig:
    """The LlamaConfig of a checkpoint directory, from its config.json alone (no weights read)."""
    d = _checkpoint_dir(path)
    verify_manifest(d, ["config.json"])
    cfg_file = d / "config.json"
    return config_from_hf(_read_json(cfg_file), where=str(cfg_file))
