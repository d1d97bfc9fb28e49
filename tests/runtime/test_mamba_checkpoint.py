"""Mamba2 checkpoints: HF Mamba2ForCausalLM logits equal ours; mamba-ssm layout round-trips and uses mamba-ssm's
names; every bad input is a CheckpointError naming the file."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from runtime.batch import Block
from runtime.models.mamba2 import Mamba2Config, init_random_mamba2
from runtime.models.mamba_checkpoint import (load_mamba2, mamba_ssm_config, param_shapes, read_mamba2_config,
                                             save_hf_mamba2, save_mamba_ssm)
from spec_compiler.errors import CheckpointError

HYBRID = Mamba2Config(vocab_size=61, d_model=16, n_layer=3, d_state=8, headdim=8, ngroups=2, chunk_size=8,
                      d_intermediate=128, attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2,
                      attn_rotary_dim=2, D_has_hdim=True)
PURE = Mamba2Config(vocab_size=50, d_model=16, n_layer=2, d_state=8, headdim=8, ngroups=2, chunk_size=8)


def logits(model, ids):
    with torch.no_grad():
        B, T = ids.shape
        return model(ids, torch.arange(T).expand_as(ids), model.new_cache(B, T), Block.causal(0, T, B))


@pytest.fixture(scope="module")
def transformers_mamba2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.Mamba2Config, transformers.Mamba2ForCausalLM


@pytest.mark.parametrize("tie", [False, True])
def test_hf_mamba2_logits_equal_transformers(tmp_path, transformers_mamba2, tie):
    HFConfig, HFModel = transformers_mamba2
    torch.manual_seed(0)
    hc = HFConfig(vocab_size=50, hidden_size=16, num_heads=4, head_dim=8, expand=2, n_groups=2, state_size=8,
                  num_hidden_layers=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=tie, eos_token_id=7)
    hf = HFModel(hc).float().eval()
    with torch.no_grad():  # HF initialises norms to 1, D to 1, conv bias to 0: move them off those values
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".D") or name.endswith("conv1d.bias"):
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model = load_mamba2(tmp_path)
    assert model.config.tie_embeddings == tie and model.config.eos_token_ids == (7,)
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(1))  # 3 chunks of 8
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf(ids).logits
    out = logits(model, ids)
    print(f"max |dlogit| {(out - ref).abs().max():.2e}")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_our_hf_writer_loads_in_transformers(tmp_path, transformers_mamba2):
    _, HFModel = transformers_mamba2
    ours = init_random_mamba2(PURE, seed=2).eval()
    save_hf_mamba2(ours, tmp_path)
    hf = HFModel.from_pretrained(tmp_path).float().eval()
    ids = torch.randint(0, 50, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hf(ids).logits
    torch.testing.assert_close(logits(ours, ids), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        save_hf_mamba2(init_random_mamba2(HYBRID, seed=0), tmp_path / "hybrid")


@pytest.mark.parametrize("tie", [False, True])
def test_mamba_ssm_round_trip(tmp_path, tie):
    from dataclasses import replace
    config = replace(HYBRID, tie_embeddings=tie)
    model = init_random_mamba2(config, seed=3).eval()
    save_mamba_ssm(model, tmp_path)
    assert read_mamba2_config(tmp_path) == config
    loaded = load_mamba2(tmp_path)
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tie
    for (n, p), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)


def test_mamba_ssm_names_match_its_source():
    """Names and config keys written out by hand from state-spaces/mamba: models/config_mamba.py (MambaConfig),
    models/mixer_seq_simple.py (backbone.embedding, layers, norm_f, lm_head), modules/block.py (norm, mixer,
    norm2, mlp), modules/mamba2.py (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj; Mamba2.__init__
    arguments), modules/mha.py (in_proj q|k|v, out_proj; MHA.__init__ arguments), modules/mlp.py (fc1, fc2)."""
    model = init_random_mamba2(HYBRID, seed=0)
    sd = model.state_dict()
    assert set(sd) - {"lm_head.weight"} == set(param_shapes(HYBRID)) - {"lm_head.weight"}
    assert all(tuple(sd[k].shape) == v for k, v in param_shapes(HYBRID).items())
    expected = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for n in range(3):
        p = f"backbone.layers.{n}."
        expected |= {p + "norm.weight", p + "norm2.weight", p + "mlp.fc1.weight", p + "mlp.fc2.weight"}
        if n == 1:
            expected |= {p + "mixer." + x for x in ("in_proj.weight", "in_proj.bias", "out_proj.weight",
                                                    "out_proj.bias")}
        else:
            expected |= {p + "mixer." + x for x in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias",
                                                    "A_log", "D", "norm.weight", "out_proj.weight")}
    assert set(sd) == expected
    mixer = model.backbone.layers[0].mixer
    c = HYBRID
    assert mixer.in_proj.weight.shape == (2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads, c.d_model)  # z x B C dt
    assert mixer.conv1d.weight.shape == (c.conv_dim, 1, c.d_conv)
    assert mixer.D.shape == (c.d_inner,)  # D_has_hdim
    assert model.backbone.layers[1].mixer.in_proj.weight.shape == ((4 + 2 * 2) * 4, c.d_model)  # q | k | v

    cfg = mamba_ssm_config(HYBRID)
    mamba_config_fields = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                           "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                           "tie_embeddings"}
    mamba2_args = {"d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
                   "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit",
                   "bias", "conv_bias", "chunk_size", "use_mem_eff_path"}
    mha_args = {"num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias",
                "softmax_scale", "causal", "d_conv", "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved"}
    assert set(cfg) == mamba_config_fields
    assert set(cfg["ssm_cfg"]) - {"layer"} <= mamba2_args and cfg["ssm_cfg"]["layer"] == "Mamba2"
    assert set(cfg["attn_cfg"]) <= mha_args and cfg["attn_cfg"]["causal"] is True


def test_mamba_ssm_reader_applies_its_defaults_and_padding(tmp_path):
    """A config.json as mamba-ssm users write it: vocab padded to the multiple, d_intermediate rounded to 128."""
    d = {"d_model": 16, "n_layer": 2, "vocab_size": 50, "d_intermediate": 100, "pad_vocab_size_multiple": 8,
         "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "dt_min": 0.01}, "attn_layer_idx": [0],
         "attn_cfg": {"num_heads": 2, "causal": True, "rotary_emb_dim": 8}, "rms_norm": True}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = read_mamba2_config(tmp_path)
    assert (c.vocab_size, c.d_intermediate, c.d_conv, c.expand, c.ngroups, c.chunk_size) == (56, 128, 4, 2, 1, 256)
    assert (c.attn_num_heads_kv, c.attn_head_dim, c.attn_qkv_bias, c.tie_embeddings) == (2, 8, True, True)


def _bad(tmp_path, name, **edits):
    """A saved mamba-ssm checkpoint with config.json keys replaced (None deletes)."""
    d = tmp_path / name
    save_mamba_ssm(init_random_mamba2(HYBRID, seed=0), d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in edits.items():
        section, _, key = k.partition("__")
        target = cfg[section] if key else cfg
        key = key or section
        if v is None:
            target.pop(key)
        else:
            target[key] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("edit,reason", [
    (dict(ssm_cfg__layer=None), "Mamba1"),
    (dict(attn_cfg__d_conv=4), "d_conv"),
    (dict(attn_cfg__causal=False), "causal"),
    (dict(ssm_cfg__d_ssm=8), "d_ssm"),
    (dict(ssm_cfg__headdim=5), "head dim"),
    (dict(ssm_cfg__norm_before_gate=True), "norm_before_gate"),
    (dict(ssm_cfg__dt_limit=[1, 0]), "dt_limit"),
    (dict(attn_layer_idx=[7]), "attn_layer_idx"),
    (dict(rms_norm=False), "rms_norm"),
    (dict(d_model="16"), "d_model"),
    (dict(ssm_cfg__mystery=1), "mystery"),
])
def test_bad_mamba_ssm_config_names_the_file(tmp_path, edit, reason):
    d = _bad(tmp_path, "ckpt", **edit)
    with pytest.raises(CheckpointError, match=reason) as e:
        load_mamba2(d)
    assert e.value.where == str(d / "config.json")


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_mamba2(tmp_path / "nowhere")
    assert e.value.where == str(tmp_path / "nowhere")

    d = tmp_path / "a"
    d.mkdir()
    with pytest.raises(CheckpointError, match="not found") as e:
        load_mamba2(d)
    assert e.value.where == str(d / "config.json")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON") as e:
        load_mamba2(d)
    assert e.value.where == str(d / "config.json")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="Mamba2ForCausalLM") as e:
        load_mamba2(d)

    d = _bad(tmp_path, "corrupt")
    (d / "pytorch_model.bin").write_bytes(b"garbage" * 20)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_mamba2(d)
    assert e.value.where == str(d / "pytorch_model.bin")

    d = _bad(tmp_path, "missing")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    del sd["backbone.layers.2.mixer.A_log"]
    sd["backbone.layers.0.mixer.dt_bias"] = torch.zeros(3)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="A_log") as e:
        load_mamba2(d)
    assert e.value.where == str(d / "pytorch_model.bin")
    sd["backbone.layers.2.mixer.A_log"] = torch.zeros(4)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="dt_bias has shape") as e:
        load_mamba2(d)

    d = tmp_path / "hf"
    save_hf_mamba2(init_random_mamba2(PURE, seed=0), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_heads": 3}))
    with pytest.raises(CheckpointError, match="num_heads") as e:
        load_mamba2(d)
    assert e.value.where == str(d / "config.json")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights") as e:
        load_mamba2(d)
    assert e.value.where == str(d / "model.safetensors")
