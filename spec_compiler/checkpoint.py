"""What a checkpoint directory says about its model, without reading a tensor (no torch).

`config.json` in three layouts <-> `spec_compiler.arch` configs: Hugging Face Llama-family
(LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM; both the legacy `rope_theta` + `rope_scaling`
keys and the transformers-5 `rope_parameters` dict), Hugging Face `Mamba2ForCausalLM`, and mamba-ssm's
`MambaLMHeadModel` (Mamba2 and hybrids); the EOS ids in `generation_config.json`; and `manifest.json`,
whose size and sha256 per file (the trained pairs, training/train.py) are checked before a file is used,
so a corrupt or truncated download fails loudly. Validation reads architectures through here; the
weight loaders (runtime/models/checkpoint.py, mamba_checkpoint.py) and the exporters use the same
functions. Every problem with a user's files is a `CheckpointError` whose `where` is the offending file.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from spec_compiler.arch import GATED_MLP_MULTIPLE, LLAMA3_ROPE_KEYS, LlamaConfig, Mamba2Config
from spec_compiler.errors import CheckpointError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# What transformers assumes when config.json leaves the key out.
DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 131072}
DEFAULT_SLIDING_WINDOW = {"llama": None, "qwen2": 4096, "mistral": 4096}


def read_json(file: Path) -> Any:
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
    m = read_json(file)
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


def checkpoint_dir(path: str | Path) -> Path:
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
        eos_token_ids=eos_list(eos, where),
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


def eos_list(eos: Any, where: str) -> tuple[int, ...]:
    if eos is None:
        return ()
    ids = [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(where, "eos_token_id must be an integer or a list of integers", eos)
    return tuple(ids)


def read_eos_ids(path: str | Path) -> list[int]:
    """EOS ids from generation_config.json, else config.json; [] when neither names one."""
    d = checkpoint_dir(path)
    verify_manifest(d, ["generation_config.json", "config.json"])
    for name in ("generation_config.json", "config.json"):
        file = d / name
        if not file.is_file():
            continue
        cfg = read_json(file)
        if isinstance(cfg, dict) and cfg.get("eos_token_id") is not None:
            return list(eos_list(cfg["eos_token_id"], str(file)))
    return []


def read_llama_config(path: str | Path) -> LlamaConfig:
    """The LlamaConfig of a checkpoint directory, from its config.json alone (no weights read)."""
    d = checkpoint_dir(path)
    verify_manifest(d, ["config.json"])
    cfg_file = d / "config.json"
    return config_from_hf(read_json(cfg_file), where=str(cfg_file))


# ---- Mamba2 and hybrids -------------------------------------------------------------------------------------

HF_ARCH = "Mamba2ForCausalLM"
# mamba_ssm/modules/mamba2.py and mha.py defaults, used when ssm_cfg / attn_cfg leave a key out
SSM_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, D_has_hdim=False,
                    rmsnorm=True, norm_before_gate=False, dt_limit=(0.0, math.inf), bias=False, conv_bias=True,
                    d_ssm=None)
SSM_INIT_ONLY = ("A_init_range", "dt_min", "dt_max", "dt_init_floor", "conv_init", "use_mem_eff_path", "layer")
ATTN_DEFAULTS = dict(num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True, out_proj_bias=True,
                     softmax_scale=None, causal=False, d_conv=0, rotary_emb_dim=0, rotary_emb_base=10000.0,
                     rotary_emb_interleaved=False)
MAMBA_SSM_EPS = 1e-5  # MixerModel's norm_epsilon default (MambaConfig has no field for it) and RMSNormGated's


def _pos_int(d: dict, key: str, where: str, default: Any = None) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CheckpointError(where, f"{key} must be an integer >= 1", v)
    return v


def _num(d: dict, key: str, where: str, default: float) -> float:
    v = d.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise CheckpointError(where, f"{key} must be a positive number", v)
    return float(v)


def _json_float(x: Any) -> Any:
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"}; older files as Infinity."""
    if isinstance(x, dict) and set(x) == {"__float__"} and isinstance(x["__float__"], str):
        try:
            return float(x["__float__"])
        except ValueError:
            return x
    return x


def _dt_limit(v: Any, where: str) -> tuple[float, float]:
    if isinstance(v, (list, tuple)):
        v = [_json_float(x) for x in v]
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or not 0 <= v[0] <= v[1]):
        raise CheckpointError(where, "dt_limit / time_step_limit must be [min, max] with 0 <= min <= max", v)
    return float(v[0]), float(v[1])


def _check_ssm_dims(where: str, d_model: int, expand: Any, headdim: int, ngroups: int) -> int:
    if not isinstance(expand, (int, float)) or isinstance(expand, bool) or expand < 1 or int(expand) != expand:
        raise CheckpointError(where, "expand must be a positive integer", expand)
    d_inner = int(expand) * d_model
    if d_inner % headdim:
        raise CheckpointError(where, f"d_inner {d_inner} (expand * d_model) is not a multiple of the head dim", headdim)
    if (d_inner // headdim) % ngroups:
        raise CheckpointError(where, f"{d_inner // headdim} heads do not split into ngroups", ngroups)
    return d_inner


def config_from_hf_mamba2(d: dict[str, Any], where: str = "config.json") -> Mamba2Config:
    """Mamba2Config from a parsed HF Mamba2 config.json; `where` names the file in errors."""
    archs = d.get("architectures") or []
    if d.get("model_type") != "mamba2" and HF_ARCH not in archs:
        raise CheckpointError(where, f"not a {HF_ARCH} config", d.get("model_type"))
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(where, "only hidden_act silu is supported", d["hidden_act"])
    hidden = _pos_int(d, "hidden_size", where)
    headdim = _pos_int(d, "head_dim", where, 64)
    ngroups = _pos_int(d, "n_groups", where, 8)
    d_inner = _check_ssm_dims(where, hidden, d.get("expand", 2), headdim, ngroups)
    heads = _pos_int(d, "num_heads", where, 128)
    if heads * headdim != d_inner:
        raise CheckpointError(where, f"num_heads * head_dim must equal expand * hidden_size ({d_inner})", heads)
    eps = _num(d, "layer_norm_epsilon", where, 1e-5)
    bos = d.get("bos_token_id")
    return Mamba2Config(
        vocab_size=_pos_int(d, "vocab_size", where), d_model=hidden, n_layer=_pos_int(d, "num_hidden_layers", where),
        d_state=_pos_int(d, "state_size", where, 128), d_conv=_conv_width(d, "conv_kernel", where),
        expand=d_inner // hidden, headdim=headdim, ngroups=ngroups, chunk_size=_pos_int(d, "chunk_size", where, 256),
        norm_epsilon=eps, gated_norm_epsilon=eps, bias=bool(d.get("use_bias", False)),
        conv_bias=bool(d.get("use_conv_bias", True)),
        dt_limit=_dt_limit(d.get("time_step_limit", (0.0, math.inf)), where),
        residual_in_fp32=bool(d.get("residual_in_fp32", True)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=bos if isinstance(bos, int) else None, eos_token_ids=eos_list(d.get("eos_token_id"), where))


def _conv_width(d: dict, key: str, where: str, default: int = 4) -> int:
    w = _pos_int(d, key, where, default)
    if w < 2:
        raise CheckpointError(where, f"{key} must be >= 2", w)
    return w


def config_from_mamba_ssm(d: dict[str, Any], where: str = "config.json") -> Mamba2Config:
    """Mamba2Config from a parsed mamba-ssm (MambaLMHeadModel) config.json."""
    ssm = d.get("ssm_cfg") or {}
    attn = d.get("attn_cfg") or {}
    if not isinstance(ssm, dict) or not isinstance(attn, dict):
        raise CheckpointError(where, "ssm_cfg and attn_cfg must be objects")
    if ssm.get("layer", "Mamba1") != "Mamba2":
        raise CheckpointError(where, "only ssm_cfg.layer Mamba2 is supported (mamba-ssm defaults to Mamba1)",
                              ssm.get("layer"))
    unknown = sorted(set(ssm) - set(SSM_DEFAULTS) - set(SSM_INIT_ONLY))
    if unknown:
        raise CheckpointError(where, f"unsupported ssm_cfg keys: {', '.join(unknown)}")
    s = {**SSM_DEFAULTS, **ssm}
    if not d.get("rms_norm", True):
        raise CheckpointError(where, "rms_norm false (LayerNorm blocks) is not supported")
    if s["norm_before_gate"]:
        raise CheckpointError(where, "ssm_cfg.norm_before_gate true is not supported")
    d_model = _pos_int(d, "d_model", where)
    n_layer = _pos_int(d, "n_layer", where)
    headdim, ngroups = _pos_int(s, "headdim", where), _pos_int(s, "ngroups", where)
    d_inner = _check_ssm_dims(where, d_model, s["expand"], headdim, ngroups)
    if s["d_ssm"] not in (None, d_inner):
        raise CheckpointError(where, f"ssm_cfg.d_ssm != d_inner ({d_inner}) is not supported", s["d_ssm"])

    vocab = _pos_int(d, "vocab_size", where)
    multiple = _pos_int(d, "pad_vocab_size_multiple", where, 8)
    vocab += (-vocab) % multiple  # MambaLMHeadModel pads the embedding rows
    d_int = d.get("d_intermediate", 0)
    if not isinstance(d_int, int) or isinstance(d_int, bool) or d_int < 0:
        raise CheckpointError(where, "d_intermediate must be an integer >= 0", d_int)
    d_int = -(-d_int // GATED_MLP_MULTIPLE) * GATED_MLP_MULTIPLE  # GatedMLP's rounding

    layers = d.get("attn_layer_idx") or []
    if not isinstance(layers, list) or not all(isinstance(i, int) and 0 <= i < n_layer for i in layers):
        raise CheckpointError(where, f"attn_layer_idx must list layer indices in [0, {n_layer})", layers)
    a: dict[str, Any] = {}
    if layers:
        unknown = sorted(set(attn) - set(ATTN_DEFAULTS) - {"num_heads"})
        if unknown:
            raise CheckpointError(where, f"unsupported attn_cfg keys: {', '.join(unknown)}")
        at = {**ATTN_DEFAULTS, **attn}
        for key, ok, why in (("causal", True, "attention must be causal"),
                             ("d_conv", 0, "attn_cfg.d_conv > 0 (conv on qkv) is not supported"),
                             ("mlp_dim", 0, "attn_cfg.mlp_dim > 0 is not supported"),
                             ("rotary_emb_interleaved", False, "interleaved rotary is not supported")):
            if at[key] != ok:
                raise CheckpointError(where, why, at[key])
        heads = _pos_int(at, "num_heads", where)
        kv = _pos_int(at, "num_heads_kv", where, heads) if at["num_heads_kv"] is not None else heads
        if heads % kv:
            raise CheckpointError(where, "attn_cfg.num_heads is not a multiple of num_heads_kv", kv)
        if at["head_dim"] is None and d_model % heads:
            raise CheckpointError(where, "d_model is not a multiple of attn_cfg.num_heads", heads)
        hd = _pos_int(at, "head_dim", where) if at["head_dim"] is not None else d_model // heads
        rd = at["rotary_emb_dim"]
        if not isinstance(rd, int) or rd < 0 or rd % 2 or rd > hd:
            raise CheckpointError(where, "attn_cfg.rotary_emb_dim must be even, >= 0 and <= head_dim", rd)
        scale = at["softmax_scale"]
        if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
            raise CheckpointError(where, "attn_cfg.softmax_scale must be a positive number or null", scale)
        a = dict(attn_num_heads=heads, attn_num_heads_kv=kv, attn_head_dim=hd, attn_rotary_dim=rd,
                 attn_rotary_base=_num(at, "rotary_emb_base", where, 10000.0),
                 attn_qkv_bias=bool(at["qkv_proj_bias"]), attn_out_bias=bool(at["out_proj_bias"]),
                 attn_softmax_scale=None if scale is None else float(scale))
    return Mamba2Config(
        vocab_size=vocab, d_model=d_model, n_layer=n_layer, d_state=_pos_int(s, "d_state", where),
        d_conv=_conv_width(s, "d_conv", where), expand=d_inner // d_model, headdim=headdim, ngroups=ngroups,
        chunk_size=_pos_int(s, "chunk_size", where), d_intermediate=d_int, attn_layer_idx=tuple(layers), **a,
        norm_epsilon=MAMBA_SSM_EPS, gated_norm_epsilon=MAMBA_SSM_EPS, rmsnorm=bool(s["rmsnorm"]),
        D_has_hdim=bool(s["D_has_hdim"]), conv_bias=bool(s["conv_bias"]), bias=bool(s["bias"]),
        dt_limit=_dt_limit(s["dt_limit"], where), residual_in_fp32=bool(d.get("residual_in_fp32", True)),
        tie_embeddings=bool(d.get("tie_embeddings", True)))


def is_mamba_ssm_config(d: dict[str, Any]) -> bool:
    return "d_model" in d or "ssm_cfg" in d


def read_mamba2_config(path: str | Path) -> Mamba2Config:
    """The Mamba2Config of a checkpoint directory (either layout), from its config.json alone."""
    d = checkpoint_dir(path)
    verify_manifest(d, ["config.json"])
    file = d / "config.json"
    d = read_json(file)
    if not isinstance(d, dict):
        raise CheckpointError(str(file), "config.json must hold a JSON object")
    if is_mamba_ssm_config(d):
        return config_from_mamba_ssm(d, str(file))
    return config_from_hf_mamba2(d, str(file))


def mamba_ssm_config(c: Mamba2Config) -> dict[str, Any]:
    """mamba-ssm config.json (MambaConfig fields) for `c`."""
    if c.d_intermediate % GATED_MLP_MULTIPLE:
        raise ValueError(f"d_intermediate {c.d_intermediate} is not a multiple of {GATED_MLP_MULTIPLE}: "
                         "mamba-ssm's GatedMLP would round it up")
    if c.gated_norm_epsilon != MAMBA_SSM_EPS or c.norm_epsilon != MAMBA_SSM_EPS:
        raise ValueError(f"mamba-ssm's MambaLMHeadModel fixes every RMSNorm epsilon at {MAMBA_SSM_EPS}")
    ssm = dict(layer="Mamba2", d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, headdim=c.headdim,
               ngroups=c.ngroups, chunk_size=c.chunk_size, D_has_hdim=c.D_has_hdim, rmsnorm=c.rmsnorm,
               norm_before_gate=False, bias=c.bias, conv_bias=c.conv_bias)
    if c.dt_limit != (0.0, math.inf):
        ssm["dt_limit"] = list(c.dt_limit)
    attn = {}
    if c.is_hybrid:
        attn = dict(num_heads=c.attn_num_heads, num_heads_kv=c.attn_num_heads_kv, head_dim=c.attn_head_dim,
                    rotary_emb_dim=c.attn_rotary_dim, rotary_emb_base=c.attn_rotary_base,
                    qkv_proj_bias=c.attn_qkv_bias, out_proj_bias=c.attn_out_bias,
                    softmax_scale=c.attn_softmax_scale, causal=True)
    # exactly MambaConfig's fields: mamba-ssm builds MambaConfig(**config) and rejects any other key
    return dict(d_model=c.d_model, d_intermediate=c.d_intermediate, n_layer=c.n_layer, vocab_size=c.vocab_size,
                ssm_cfg=ssm, attn_layer_idx=list(c.attn_layer_idx), attn_cfg=attn, rms_norm=True,
                residual_in_fp32=c.residual_in_fp32, fused_add_norm=True, pad_vocab_size_multiple=1,
                tie_embeddings=c.tie_embeddings)


def hf_mamba2_config(c: Mamba2Config) -> dict[str, Any]:
    """HF Mamba2 config.json for a pure Mamba2 `c` (ValueError for what HF's Mamba2 cannot express)."""
    if c.is_hybrid or c.d_intermediate or c.D_has_hdim or not c.rmsnorm or c.gated_norm_epsilon != c.norm_epsilon:
        raise ValueError("HF Mamba2ForCausalLM holds pure Mamba2 blocks only (no attention, no MLP, D per head, "
                         "gated RMSNorm with the blocks' epsilon)")
    eos = list(c.eos_token_ids)
    return {"architectures": [HF_ARCH], "model_type": "mamba2", "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "num_hidden_layers": c.n_layer, "state_size": c.d_state,
            "conv_kernel": c.d_conv, "expand": c.expand, "num_heads": c.nheads, "head_dim": c.headdim,
            "n_groups": c.ngroups, "chunk_size": c.chunk_size, "use_bias": c.bias, "use_conv_bias": c.conv_bias,
            "time_step_limit": list(c.dt_limit), "layer_norm_epsilon": c.norm_epsilon, "hidden_act": "silu",
            "residual_in_fp32": c.residual_in_fp32, "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}
