"""Training the pair (train=tiny, 24 stdlib files): loss falls, seeded runs and resumed runs are bitwise equal,
exports load in our loader and in transformers with the same logits, and manifest.json catches corruption."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import main
import training.train as train_mod
from runtime.models.checkpoint import load_llama
from spec_compiler.checkpoint import MANIFEST_MISMATCH, read_eos_ids
from spec_compiler.errors import CheckpointError, ConfigError
from spec_compiler.tokenizer import load_tokenizer
from tests.conftest import ROOT, compose_config
from training.corpus import EOT
from training.train import lr_factor, run_train

FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def tiny(out_dir: Path, *overrides: str):
    cfg = compose_config(["task=train", "train=tiny", f"train.out_dir={out_dir}", "train.dtype=float32",
                          *overrides], shrink=False)
    return main.to_spec(cfg).train


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    return out, run_train(tiny(out), command="task=train train=tiny")


def weights(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


def assert_same_weights(a: Path, b: Path):
    for name in ("target", "drafter"):
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)


def test_loss_goes_down_and_manifest_records_the_run(pair):
    out, manifests = pair
    t = manifests["target"]
    assert t["evals"][0]["heldout_loss"] > t["evals"][-1]["heldout_loss"]
    assert t["train_loss"] < 6.0 < 6.24  # ln(512) = 6.24 at init
    d = manifests["drafter"]
    assert d["evals"][0]["heldout_distill_loss"] > d["evals"][-1]["heldout_distill_loss"]
    on_disk = json.loads((out / "target" / "manifest.json").read_text())
    assert on_disk["files"].keys() == set(FILES)
    assert on_disk["command"] == "task=train train=tiny"
    assert on_disk["corpus"]["num_train_files"] == 19 and on_disk["corpus"]["num_heldout_files"] == 5
    assert on_disk["tokens_seen"] == 30 * 8 * 32
    for key in ("tokenizer_sha256", "heldout_loss", "train_loss", "wall_time_s", "torch", "machine"):
        assert key in on_disk, key
    assert on_disk["files"]["model.safetensors"]["size"] == (out / "target" / "model.safetensors").stat().st_size


def test_exports_load_in_ours_and_transformers_alike(pair):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    out, _ = pair
    for name in ("target", "drafter"):
        d = out / name
        ours = load_llama(d)
        tok = load_tokenizer(d)
        eot = tok.token_to_id(EOT)
        assert read_eos_ids(d) == [eot]
        ids = torch.tensor([tok.encode("def main():\n    return sorted(items)\n").ids])
        T = ids.shape[1]
        with torch.no_grad():
            a = ours(ids, torch.arange(T)[None])
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
            b = hf(ids).logits
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert hf.generation_config.eos_token_id == eot


def test_same_seed_same_weights(pair, tmp_path):
    out, manifests = pair
    again = run_train(tiny(tmp_path))
    assert_same_weights(out, tmp_path)
    assert again["target"]["tokenizer_sha256"] == manifests["target"]["tokenizer_sha256"]


class Crash(Exception):
    pass


def test_resume_after_crashes_equals_uninterrupted(pair, tmp_path, monkeypatch):
    out, _ = pair
    real = train_mod.sample_windows
    calls = {"n": 0, "crash_at": None}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "sample_windows", crashing)
    cfg = tiny(tmp_path)  # 30 target steps, then 20 drafter steps; state saved every 10
    # Crash at target step 16 (state at 10); then, resumed, 20 more target steps and a crash at drafter step 14.
    for crash_at in (16, 20 + 14):
        calls.update(n=0, crash_at=crash_at)
        with pytest.raises(Crash):
            run_train(cfg)
    assert (tmp_path / "state" / "target.pt").is_file() and (tmp_path / "state" / "drafter.pt").is_file()
    calls.update(n=0, crash_at=None)
    run_train(cfg)
    assert calls["n"] == 10  # only the drafter's last 10 steps were redone
    assert_same_weights(out, tmp_path)


def test_state_from_another_config_is_refused(pair, tmp_path):
    out, _ = pair
    shutil.copytree(out / "state", tmp_path / "state")
    with pytest.raises(CheckpointError) as e:
        run_train(tiny(tmp_path, "train.lr=0.005"))
    assert e.value.where == str(tmp_path / "state" / "target.pt")
    assert "different training config" in e.value.reason


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_manifest_catches_corrupt_weights(pair, tmp_path, damage):
    out, _ = pair
    d = tmp_path / "target"
    shutil.copytree(out / "target", d)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # inside a tensor: safetensors itself would not notice
    else:
        data = data[:len(data) - 100]
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_llama(d)
    assert e.value.where == str(f) and e.value.reason == MANIFEST_MISMATCH
    load_tokenizer(d)  # only the tokenizer's own entry is checked there


def test_manifest_catches_tokenizer_and_missing_files_and_corrupt_manifest(pair, tmp_path):
    out, _ = pair
    d = tmp_path / "drafter"
    shutil.copytree(out / "drafter", d)
    (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|eot|>"', 1))
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(d)
    assert e.value.where == str(d / "tokenizer.json") and e.value.reason == MANIFEST_MISMATCH
    (d / "generation_config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        read_eos_ids(d)
    assert e.value.where == str(d / "generation_config.json")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        load_llama(d)
    assert e.value.where == str(d / "manifest.json")


def test_bad_train_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        tiny(tmp_path, "train.drafter.num_kv_heads=3")
    assert e.value.where == "train.drafter.num_kv_heads"
    with pytest.raises(ConfigError) as e:
        tiny(tmp_path, "train.min_lr=1.0")
    assert e.value.where == "train.min_lr"
    with pytest.raises(ConfigError) as e:  # one DType enum; exports are restricted by a rule
        tiny(tmp_path, "train.dtype=float64")
    assert e.value.where == "train.dtype"


def test_lr_schedule():
    f = [lr_factor(s, warmup=5, total=30, floor=0.1) for s in range(31)]
    assert f[:5] == sorted(f[:5]) and f[4] < 1.0
    assert f[5] == pytest.approx(1.0) and f[30] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))


def test_cli_train_tiny(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "main.py", "task=train", "train=tiny", f"train.out_dir={tmp_path}",
                        "train.target_steps=10", "train.drafter_steps=10", f"hydra.run.dir={tmp_path / 'hydra'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = json.loads((tmp_path / "drafter" / "manifest.json").read_text())
    assert manifest["command"] == f"task=train train=tiny train.out_dir={tmp_path} train.target_steps=10 " \
                                  "train.drafter_steps=10"
    assert manifest["dtype"] == "float16"
    assert load_llama(tmp_path / "drafter").tok_embeddings.weight.dtype == torch.float32
