"""Shared fixtures: compose the real `conf/` tree (shrunk for CPU) and write tiny checkpoints.

Modelled on lightning-hydra-template `tests/conftest.py`: tests compose the shipped configs rather than
hand-written ones, then shrink the expensive knobs for a CPU run.
"""
import json
import os
from pathlib import Path
from typing import Callable

# Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot; subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in the interpreter. Triton reads this when it decorates functions, including
# its own tl.* helpers at import time, so it must be set before anything (transformers does) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

import main  # noqa: E402,F401  (registers the schemas in Hydra's ConfigStore)
from runtime.models.checkpoint import save_llama  # noqa: E402
from runtime.models.llama import LlamaConfig, init_random  # noqa: E402
from spec_compiler.tokenizer import byte_level_tokenizer  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"

# Group choices for tests unless a test picks its own (the shipped default is the trained pair).
TEST_GROUPS = {"target": "tiny_random", "drafter": "noisy_copy", "task": "generate", "tree": "chain"}

# Applied after composition unless the test overrides the same key itself.
CPU_SHRINK = {"task.max_new_tokens": 8, "target.max_seq_len": 128, "task.warmup": 0}

TINY_ARCH = dict(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def compose_config(overrides: list[str] = (), shrink: bool = True) -> DictConfig:
    """The composed primary config with `overrides`, as `python main.py <overrides>` would see it."""
    overrides = list(overrides)
    if shrink:  # tests are written against the small random pair, not the trained default
        groups = {o.split("=", 1)[0] for o in overrides}
        overrides = [f"{g}={v}" for g, v in TEST_GROUPS.items() if g not in groups] + overrides
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=False)
    if shrink:
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        with open_dict(cfg):
            for key, value in CPU_SHRINK.items():
                if key not in given:
                    OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture
def compose() -> Callable[..., DictConfig]:
    return compose_config


def write_checkpoint(path: Path, seed: int = 0, **arch) -> Path:
    """A random Llama checkpoint dir: config.json, model.safetensors, tokenizer.json, generation_config.json."""
    config = LlamaConfig(**{**TINY_ARCH, **arch}, eos_token_ids=(256,))
    save_llama(init_random(config, seed), path)
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 256}))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))
