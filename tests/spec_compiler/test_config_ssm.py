"""Config surface for SSM and hybrid targets: the shipped options run end to end (greedy output equal to the
autoregressive baseline through run(cfg)), checkpoints in both layouts resolve, and bad SSM settings give
typed errors naming their key."""
from __future__ import annotations

import json

import pytest

import main
from runtime.device import host
from runtime.models.mamba2 import init_random_mamba2
from runtime.models.mamba_checkpoint import save_hf_mamba2, save_mamba_ssm
from spec_compiler.arch import Mamba2Config
from spec_compiler.errors import ConfigError
from spec_compiler.plan import make_plan
from spec_compiler.tokenizer import byte_level_tokenizer
from spec_compiler.validate import validate

SSM = dict(vocab_size=257, d_model=32, n_layer=2, d_state=8, headdim=16, chunk_size=64)


def plan_of(cfg):
    return make_plan(validate(main.to_spec(cfg), host()))


@pytest.mark.parametrize("target", ["mamba2_tiny", "hybrid_tiny"])
@pytest.mark.parametrize("drafter,tree", [("noisy_copy", "chain"), ("noisy_copy", "static"),
                                          ("prompt_lookup", "static")])
def test_ssm_targets_bench_greedy_equal(compose, tmp_path, target, drafter, tree):
    cfg = compose([f"target={target}", f"drafter={drafter}", f"tree={tree}", "task=demo",
                   "task.max_new_tokens=24", "drafter.model.noise_std=0.1", f"task.output_dir={tmp_path}"])
    main.run(cfg)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["outputs_equal_to_baseline"] == "1/1"
    assert report["plan"]["target"]["kind"] == target.split("_")[0]


@pytest.mark.parametrize("layout", ["hf", "mamba_ssm"])
def test_ssm_checkpoint_targets_resolve(compose, tmp_path, layout):
    arch = dict(SSM, attn_layer_idx=(1,), attn_num_heads=2, attn_rotary_dim=16, d_intermediate=0) \
        if layout == "mamba_ssm" else SSM
    model = init_random_mamba2(Mamba2Config(**arch), seed=0)
    (save_hf_mamba2 if layout == "hf" else save_mamba_ssm)(model, tmp_path)
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    option = "mamba2_ckpt" if layout == "hf" else "hybrid_ckpt"
    cfg = compose([f"target={option}", f"target.model.checkpoint={tmp_path}", "drafter=prompt_lookup",
                   f"task.output_dir={tmp_path / 'out'}"])
    result = main.run(cfg)
    assert result["new_tokens"] > 0
    with pytest.raises(ConfigError) as e:  # the checkpoint's kind must match the config's
        plan_of(compose([f"target={'hybrid_ckpt' if layout == 'hf' else 'mamba2_ckpt'}",
                         f"target.model.checkpoint={tmp_path}"]))
    assert e.value.where == "target.model.arch"


@pytest.mark.parametrize("overrides,where", [
    (["target=mamba2_tiny", "target.model.chunk_size=16", "tree=static"], "tree"),
    (["target=mamba2_tiny", "target.model.attn_layer_idx=[1]"], "target.model.attn_layer_idx"),
    (["target=hybrid_tiny", "target.model.attn_layer_idx=[]"], "target.model.attn_layer_idx"),
    (["target=hybrid_tiny", "target.model.attn_layer_idx=[9]"], "target.model.attn_layer_idx"),
    (["target=mamba2_tiny", "target.model.headdim=48"], "target.model.headdim"),
    (["target=mamba2_tiny", "target.model.ngroups=3"], "target.model.ngroups"),
    (["target=mamba2_tiny", "target.model.d_conv=1"], "target.model.d_conv"),
    (["target=mamba2_ckpt", "target.model.checkpoint=/nonexistent"], "target.model.checkpoint"),
])
def test_bad_ssm_settings(compose, overrides, where):
    with pytest.raises(ConfigError) as e:
        plan_of(compose(overrides))
    assert e.value.where == where


def test_unknown_arch_fails_at_compose(compose):
    with pytest.raises(Exception, match="arch"):
        compose(["target.model.arch=rwkv"])
