"""Mamba2 / hybrid checkpoint directories <-> `Mamba2LMModel`: the tensors (config.json and manifest.json
are read and written by `spec_compiler.checkpoint`, no torch).

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
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from runtime.models.checkpoint import _read_tensors
from runtime.models.mamba2 import Mamba2LMModel
from spec_compiler.arch import Mamba2Config
from spec_compiler.checkpoint import (checkpoint_dir, hf_mamba2_config, is_mamba_ssm_config, mamba_ssm_config, read_json,
                                      read_mamba2_config, verify_manifest)
from spec_compiler.errors import CheckpointError


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
    d = checkpoint_dir(path)
    verify_manifest(d)
    c = read_mamba2_config(d)
    wanted = param_shapes(c)
    if is_mamba_ssm_config(read_json(d / "config.json")):
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


def save_mamba_ssm(model: Mamba2LMModel, path: str | Path) -> None:
    """Write config.json + pytorch_model.bin as mamba-ssm's `MambaLMHeadModel.save_pretrained` does."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = mamba_ssm_config(model.config)
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    torch.save(_state_dict(model), d / "pytorch_model.bin")


def save_hf_mamba2(model: Mamba2LMModel, path: str | Path) -> None:
    """Write config.json + model.safetensors loadable by transformers' Mamba2ForCausalLM."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = hf_mamba2_config(model.config)
    cfg["torch_dtype"] = str(model.backbone.embedding.weight.dtype).removeprefix("torch.")
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({_hf_name(k): v for k, v in _state_dict(model).items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
