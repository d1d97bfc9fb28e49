"""Mamba2 / hybrid checkpoint directories <-> `Mamba2LMModel`.

Two layouts are read (`load_mamba2` tells them apart by config.json):
- Hugging Face `Mamba2ForCausalLM`: config.json (model_type "mamba2") + model.safetensors (or a sharded
  index). Tensors backbone.embeddings, backbone.layers.N.norm, backbone.layers.N.mixer.{in_proj, conv1d,
  dt_bias, A_log, D, norm, out_proj}, backbone.norm_f, lm_head. Pure Mamba2 only (HF has no hybrid).
- mamba-ssm `MambaLMHeadModel` (`mamba_ssm/models/mixer_seq_simple.py`): config.json with d_model,
  n_layer, vocab_size, ssm_cfg (layer "Mamba2"), attn_layer_idx, attn_cfg, d_intermediate,
  tie_embeddings, pad_vocab_size_multiple, rms_norm, residual_in_fp32 + pytorch_model.bin (read with
  `torch.load(weights_only=True)`; model.safetensors if there is no .bin). Tensor names are our own
  parameter names: backbone.embedding, backbone.layers.N.{norm, mixer.*, norm2, mlp.fc1, mlp.fc2},
  backbone.norm_f, lm_head; an attention mixer has mixer.in_proj (q|k|v) and mixer.out_proj
  (`mamba_ssm/modules/mha.py`).

`save_mamba_ssm` and `save_hf_mamba2` write those layouts. Every problem with a user's files is a
`CheckpointError` whose `where` names the offending file. A directory with a `manifest.json` (the trained
pairs, training/train.py) has every listed file's size and sha256 checked before use, as `load_llama` does.
"""
from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from runtime.models.checkpoint import _checkpoint_dir, _eos_list, _read_json, _read_tensors, verify_manifest
from runtime.models.mamba2 import Mamba2Config, Mamba2LMModel
from spec_compiler.errors import CheckpointError

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
GATED_MLP_MULTIPLE = 128  # mamba_ssm/modules/mlp.py rounds the hidden width up to this


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
        bos_token_id=bos if isinstance(bos, int) else None, eos_token_ids=_eos_list(d.get("eos_token_id"), where))


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
    d = _checkpoint_dir(path)
    verify_manifest(d, ["config.json"])
    file = d / "config.json"
    d = _read_json(file)
    if not isinstance(d, dict):
        raise CheckpointError(str(file), "config.json must hold a JSON object")
    if is_mamba_ssm_config(d):
        return config_from_mamba_ssm(d, str(file))
    return config_from_hf_mamba2(d, str(file))


# ---- tensor names ------------------------------------------------------------------------------------------

def param_shapes(c: Mamba2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of our model (= mamba-ssm's MambaLMHeadModel names) with its shape; lm_head only if untied."""
    E, H, Cd = c.d_model, c.nheads, c.conv_dim
    s = {"backbone.embedding.weight": (c.vocab_size, E), "backbone.norm_f.weight": (E,)}
    if not c.tie_embeddings:
        s["lm_head.weight"] = (c.vocab_size, E)
    for n in range(c.n_layer):
        p = f"backbone.layers.{n}."
        s[p + "norm.weight"] = (E,)
        if n in c.attn_layer_idx:
            qkv = (c.attn_num_heads + 2 * c.attn_num_heads_kv) * c.attn_head_dim
            out = c.attn_num_heads * c.attn_head_dim
            s[p + "mixer.in_proj.weight"] = (qkv, E)
            if c.attn_qkv_bias:
                s[p + "mixer.in_proj.bias"] = (qkv,)
            s[p + "mixer.out_proj.weight"] = (E, out)
            if c.attn_out_bias:
                s[p + "mixer.out_proj.bias"] = (E,)
        else:
            proj = 2 * c.d_inner + 2 * c.ngroups * c.d_state + H
            s[p + "mixer.in_proj.weight"] = (proj, E)
            s[p + "mixer.conv1d.weight"] = (Cd, 1, c.d_conv)
            if c.conv_bias:
                s[p + "mixer.conv1d.bias"] = (Cd,)
            s[p + "mixer.dt_bias"] = (H,)
            s[p + "mixer.A_log"] = (H,)
            s[p + "mixer.D"] = (c.d_inner,) if c.D_has_hdim else (H,)
            if c.rmsnorm:
                s[p + "mixer.norm.weight"] = (c.d_inner,)
            s[p + "mixer.out_proj.weight"] = (E, c.d_inner)
            if c.bias:
                s[p + "mixer.in_proj.bias"] = (proj,)
                s[p + "mixer.out_proj.bias"] = (E,)
        if c.d_intermediate:
            s[p + "norm2.weight"] = (E,)
            s[p + "mlp.fc1.weight"] = (2 * c.d_intermediate, E)
            s[p + "mlp.fc2.weight"] = (E, c.d_intermediate)
    return s


def _hf_name(ours: str) -> str:
    return ours.replace("backbone.embedding.", "backbone.embeddings.")


def _build(c: Mamba2Config, w: dict[str, Tensor], device, use_triton: bool) -> Mamba2LMModel:
    with torch.device("meta"):
        model = Mamba2LMModel(c, use_triton=use_triton)
    sd = dict(w)
    if c.tie_embeddings:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    model.load_state_dict(sd, assign=True)
    if c.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    return model.to(device).eval()


def _read_bin(file: Path, wanted: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, Tensor]:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(str(file), "corrupt, or not a plain state dict (torch.load(weights_only=True) "
                                         "refused it)") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError) as e:
        raise CheckpointError(str(file), f"corrupt or truncated torch checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(str(file), "does not hold a state dict")
    missing = sorted(wanted.keys() - sd.keys())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(str(file), f"tensor missing: {shown}")
    out = {}
    for name, shape in wanted.items():
        t = sd[name]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise CheckpointError(str(file), f"tensor {name} has shape {tuple(getattr(t, 'shape', ()))}, "
                                             f"expected {shape}")
        out[name] = t.to(dtype)
    return out


def load_mamba2(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                use_triton: bool = False) -> Mamba2LMModel:
    """A Mamba2LMModel from an HF Mamba2ForCausalLM or a mamba-ssm checkpoint directory, in eval mode."""
    d = _checkpoint_dir(path)
    verify_manifest(d)
    c = read_mamba2_config(d)
    wanted = param_shapes(c)
    if is_mamba_ssm_config(_read_json(d / "config.json")):
        if (d / "pytorch_model.bin").is_file():
            w = _read_bin(d / "pytorch_model.bin", wanted, dtype)
        else:
            w = _read_tensors(d, wanted, dtype)
    else:
        hf = _read_tensors(d, {_hf_name(k): v for k, v in wanted.items()}, dtype)
        w = {k: hf[_hf_name(k)] for k in wanted}
    return _build(c, w, device, use_triton)


def _state_dict(model: Mamba2LMModel) -> dict[str, Tensor]:
    # own contiguous storage per tensor (safetensors refuses shared storage, e.g. a tied head)
    sd = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


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


def save_mamba_ssm(model: Mamba2LMModel, path: str | Path) -> None:
    """Write config.json + pytorch_model.bin as mamba-ssm's `MambaLMHeadModel.save_pretrained` does."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = mamba_ssm_config(model.config)
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.save(_state_dict(model), d / "pytorch_model.bin")


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


def save_hf_mamba2(model: Mamba2LMModel, path: str | Path) -> None:
    """Write config.json + model.safetensors loadable by transformers' Mamba2ForCausalLM."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = hf_mamba2_config(model.config)
    cfg["torch_dtype"] = str(model.backbone.embedding.weight.dtype).removeprefix("torch.")
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({_hf_name(k): v for k, v in _state_dict(model).items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
