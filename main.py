"""spec-compiler entry point: `python main.py [group=option ...] [key=value ...]` (`-m` for sweeps).

config -> OmegaConf.to_object (typed, __post_init__ checks) -> validate -> make_plan -> load -> task;
`task=train` instead trains and exports the model pair (training/train.py).
User mistakes print as at most two lines and exit with status 2; nothing prints a traceback for them.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Union

import hydra
from omegaconf import DictConfig, OmegaConf

from spec_compiler.errors import SpecError
from spec_compiler.schema import SpecConfig, TaskKind, register_configs

register_configs()


def to_spec(cfg: Union[DictConfig, SpecConfig]) -> SpecConfig:
    """DictConfig -> SpecConfig dataclasses; unwraps our typed errors raised inside __post_init__."""
    if isinstance(cfg, SpecConfig):
        return cfg
    try:
        return OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConf wraps errors from __post_init__; surface ours unchanged
        inner = e
        while inner is not None and not isinstance(inner, SpecError):
            inner = inner.__cause__ or inner.__context__
        if inner is not None:
            raise inner from None
        raise


def output_dir(spec: SpecConfig) -> Path:
    out = Path(spec.task.output_dir)
    if out.is_absolute():
        return out
    from hydra.core.hydra_config import HydraConfig
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / out
    return out


def run(cfg: Union[DictConfig, SpecConfig]) -> dict:
    """The whole pipeline for one config; returns the task's result dict (also written as result.json)."""
    from runtime.device import host
    from runtime.load import load
    from runtime.tasks import hydra_overrides, run_bench, run_generate
    from spec_compiler.plan import make_plan
    from spec_compiler.validate import validate

    spec = to_spec(cfg)
    if spec.task.kind is TaskKind.train:  # the inference groups play no part in training
        from training.train import run_train
        return run_train(spec.train, command=" ".join(hydra_overrides()))
    plan = make_plan(validate(spec, host()))
    rt = load(plan, spec.task.batch_size)
    out = output_dir(spec)
    task = run_bench if spec.task.kind is TaskKind.bench else run_generate
    result = task(rt, spec, out)
    result["overrides"] = " ".join(hydra_overrides())
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _short_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    warnings.formatwarning = _short_warning
    try:
        run(cfg)
    except SpecError as e:
        print(f"error: {e.where}: {e.reason}"[:400], file=sys.stderr)
        print("(fix the value above; `python main.py --cfg job` shows the composed config)", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # OmegaConf missing mandatory values and similar config-level mistakes
        from omegaconf.errors import OmegaConfBaseException
        if isinstance(e, OmegaConfBaseException):
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            print(f"(config key: {getattr(e, 'full_key', '?')})", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
