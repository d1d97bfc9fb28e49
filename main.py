"""spec-compiler entry point: `python main.py [group=option ...] [key=value ...]` (`-m` for sweeps).

config -> OmegaConf.to_object (typed, __post_init__ checks) -> validate -> make_plan -> prepare (questions,
output files) -> load -> task; `task=train` instead trains and exports the model pair (training/train.py).

`cli(argv)` checks every composed config (each job of a sweep) before Hydra starts a run, so a user mistake
creates no run directory and loads no model. Exit status: 0 done, 2 a user error (one `error:` line naming
the key path or file, the value and the reason; Hydra's composition errors included), 130 interrupted
(Ctrl-C; finished answers are kept), 1 a bug (with its traceback).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional, Union

import hydra
from omegaconf import DictConfig, OmegaConf

from spec_compiler.errors import ConfigError, SpecError
from spec_compiler.schema import SpecConfig, TaskKind, register_configs

register_configs()
# Run directories: outputs/DATE/TIME-<pid> (conf/config.yaml), so runs started in the same second never share one.
# Cached, and Hydra copies resolver caches into each job's config, so every job of a sweep sees the same value.
OmegaConf.register_new_resolver("run_id", lambda: str(os.getpid()), use_cache=True, replace=True)

CONF_DIR = Path(__file__).resolve().parent / "conf"
_PRECHECKED = False
"""cli() already validated (and warned about) this process's configs; the job does not warn again."""


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys the schema does not have (`+tree.depth=3` adds them; OmegaConf.to_object would drop them)."""
    t = OmegaConf.get_type(cfg)
    fields = {f.name for f in dataclasses.fields(t)} if dataclasses.is_dataclass(t) else None
    out = []
    for k in cfg.keys():
        if k == "hydra":
            continue
        if fields is not None and k not in fields:
            out.append(f"{prefix}{k}")
            continue
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            out += unknown_keys(node, f"{prefix}{k}.")
    return out


def to_spec(cfg: Union[DictConfig, SpecConfig]) -> SpecConfig:
    """DictConfig -> SpecConfig dataclasses; unwraps our typed errors raised inside __post_init__."""
    if isinstance(cfg, SpecConfig):
        return cfg
    extra = unknown_keys(cfg)
    if extra:
        group = extra[0].rsplit(".", 1)[0] if "." in extra[0] else "the config"
        raise ConfigError(extra[0], f"unknown key (no such field in {group}; `python main.py --cfg job` lists "
                          "the keys)", OmegaConf.select(cfg, extra[0]))
    try:
        return OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConf wraps errors from __post_init__; surface ours unchanged
        inner = e
        while inner is not None and not isinstance(inner, SpecError):
            inner = inner.__cause__ or inner.__context__
        if inner is not None:
            raise inner from None
        raise


def output_dir(spec: SpecConfig, in_run: bool = True) -> Optional[Path]:
    """task.output_dir resolved against Hydra's run directory (None: relative, and no run started yet)."""
    out = Path(os.path.expanduser(spec.task.output_dir))
    if out.is_absolute():
        return out
    from hydra.core.hydra_config import HydraConfig
    if not in_run:
        return None
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / out
    return out  # outside a Hydra run (tests calling run() directly): relative to the working directory


def prepare(cfg: Union[DictConfig, SpecConfig], in_run: bool = True):
    """Everything short of loading models: (spec, plan, job); job is None for task=train. in_run=False (cli's
    check before Hydra starts): a relative task.output_dir is not checked, its run folder does not exist yet."""
    from runtime.device import host
    from runtime.tasks import prepare as prepare_job
    from spec_compiler.plan import make_plan
    from spec_compiler.validate import validate

    spec = to_spec(cfg)
    if spec.task.kind is TaskKind.train:  # the inference groups play no part in training
        return spec, None, None
    if spec.task.kind is TaskKind.compile:  # the artifact is the compiled backend's: its plan says so
        from spec_compiler.schema import BackendKind
        spec.backend.kind = BackendKind.compiled
    resolved = validate(spec, host())
    spec, plan = resolved.cfg, make_plan(resolved)
    return spec, plan, prepare_job(spec, plan, output_dir(spec, in_run))


def run(cfg: Union[DictConfig, SpecConfig]) -> dict:
    """The whole pipeline for one config; returns the task's result dict (also written as result.json)."""
    from runtime.tasks import hydra_overrides, run_bench, run_generate

    spec, plan, job = prepare(cfg)
    if spec.task.kind is TaskKind.train:
        from training.train import run_train
        return run_train(spec.train, command=" ".join(hydra_overrides()))
    if spec.task.kind is TaskKind.loadtest:  # a fresh server (own plan, own runtime) per policy
        from serve.loadtest import run_loadtest
        result = run_loadtest(spec, job)
    elif spec.task.kind is TaskKind.compile:
        from aot.build import compile_batch_sizes, main_compile
        result = main_compile(plan, spec.compile, compile_batch_sizes(spec), job.out,
                              "python main.py " + " ".join(hydra_overrides()))
    else:
        from aot.build import open_runtime
        serving = spec.task.kind is TaskKind.serve
        rt = open_runtime(spec, plan, spec.serving.max_batch_size if serving else spec.task.batch_size,
                          "python main.py " + " ".join(hydra_overrides()))
        if serving:
            from serve.server import run_serve as task
        else:
            task = run_bench if spec.task.kind is TaskKind.bench else run_generate
        result = task(rt, spec, job)
        if rt.tree_budget is not None:  # tree.budget=auto: the choice, its inputs and every candidate
            result["tree_budget"] = rt.tree_budget
    result["overrides"] = " ".join(hydra_overrides())
    (job.out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _short_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def report(e: BaseException) -> int:
    """One `error:` line (plus a hint) for a user mistake; returns the exit status."""
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException
    if isinstance(e, SpecError):
        shown = "" if e.value is None else f" = {e.value!r}"
        print(f"error: {e.where}{shown}: {e.reason}"[:600], file=sys.stderr)
        print("(fix the value above; `python main.py --cfg job` shows the composed config, `--help` the options)",
              file=sys.stderr)
        return 2
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        causes = [e] + ([e.__cause__] if isinstance(e.__cause__, OmegaConfBaseException) else [])
        lines = [ln.strip() for c in causes for ln in str(c).split("Config search path:")[0].splitlines()]
        keep = [ln for ln in lines if ln and not ln.startswith(("full_key:", "object_type", "reference_type",
                                                                   "To append to your config", "Set the environment"))]
        msg = "; ".join(dict.fromkeys(keep)).replace(":; ", ": ")
        if isinstance(e, OverrideParseException) and e.override not in msg:
            msg = f"override {e.override!r}: {msg}"
        print(f"error: {msg}"[:600], file=sys.stderr)
        if isinstance(e, OverrideParseException):
            print("(quote a value with spaces or ( ) [ ] { } , = : for Hydra: python main.py 'prompt=\"def f(x):\"', "
                  "or put a prompt in a file: prompt_file=PATH)", file=sys.stderr)
        else:
            print("(`python main.py --help` lists the groups and options; `--cfg job` shows the composed config)",
                  file=sys.stderr)
        return 2
    raise e


def precheck(argv: list[str]) -> None:
    """Compose and validate every job's config before Hydra starts (raises the first user error)."""
    global _PRECHECKED
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun:
        return
    overrides = args.overrides
    if args.multirun:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    else:
        jobs = [overrides]
    for job in jobs:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=job)
        if args.cfg:
            continue  # printing the config only needs it to compose
        prepare(cfg, in_run=False)
    _PRECHECKED = True


def _remove_if_empty_run_dir(d: Path) -> None:
    """Remove a run directory that holds only what Hydra wrote at its start (.hydra/, the job's log)."""
    try:
        entries = list(d.iterdir())
    except OSError:
        return
    if all(p.name == ".hydra" or (p.suffix == ".log" and p.stat().st_size == 0) for p in entries):
        shutil.rmtree(d, ignore_errors=True)
        for parent in (d.parent, d.parent.parent):  # outputs/DATE, then outputs, if now empty
            try:
                parent.rmdir()
            except OSError:
                break


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    warnings.formatwarning = _short_warning
    if _PRECHECKED:
        from spec_compiler.validate import IneffectiveSettingWarning
        warnings.simplefilter("ignore", IneffectiveSettingWarning)
    try:
        run(cfg)
    except (SpecError, OmegaConfBaseError) as e:  # found only after the run started (e.g. at model load)
        code = report(e)
        from hydra.core.hydra_config import HydraConfig
        if HydraConfig.get().mode.name == "RUN":
            _remove_if_empty_run_dir(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(code)
    except KeyboardInterrupt as e:
        print(getattr(e, "message", "interrupted"), file=sys.stderr)
        sys.exit(130)


from omegaconf.errors import OmegaConfBaseException as OmegaConfBaseError  # noqa: E402


def cli(argv: Optional[list[str]] = None) -> int:
    """`python main.py argv...` in-process; returns the exit status (tests call this)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = _short_warning
    try:
        precheck(argv)
        saved, sys.argv = sys.argv, [str(Path(__file__).resolve()), *argv]
        try:
            main()
        finally:
            sys.argv = saved
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt as e:
        print(getattr(e, "message", "interrupted"), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (report() re-raises anything that is not a user error)
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
