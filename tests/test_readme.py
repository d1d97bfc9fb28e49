"""Every command in README.md's ```bash blocks runs and succeeds, with small limits appended (so the README
cannot drift from the CLI). Inference commands keep their groups and paths and get `task.max_new_tokens=4
task.num_prompts=1 task.repeats=1 task.warmup=0`; `task=train` commands run the matching tiny pair for two
steps; run and sweep folders go to tmp. `. .venv/bin/activate` is the only line not run (the test already
runs inside the environment); `bash scripts/*.sh` run only where setup.sh has stamped .venv (CI does).
"""
import itertools
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch

import main
from tests.conftest import ROOT

SMALL = ["task.max_new_tokens=4", "task.num_prompts=1", "task.repeats=1", "task.warmup=0"]
COMPILE_SMALL = ["compile.backends=[eager]", "compile.num_prompts=1", "compile.max_new_tokens=4", "compile.repeats=1"]
NUMBER = itertools.count()
TINY_TRAIN = {"default": "tiny", "mamba2": "tiny_mamba2", "hybrid": "tiny_hybrid"}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, flags=re.S | re.M):
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and line != ". .venv/bin/activate":
                cmds.append(line)
    return cmds


COMMANDS = readme_commands()


def test_readme_has_the_commands():
    assert any("task=generate" in c for c in COMMANDS) and any(" -m " in c for c in COMMANDS)
    assert any(c.startswith("python main.py --help") for c in COMMANDS)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """README folder -> tmp folder, the same for every command (so resume finds the first run's answers)."""
    return {"root": tmp_path_factory.mktemp("readme")}


def small_argv(argv: list[str], dirs: dict) -> list[str]:
    root = dirs["root"]
    n = next(NUMBER)
    out = []
    for a in argv:
        key, _, value = a.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir", "task.output_dir") and not value.startswith("/"):
            a = f"{key}={dirs.setdefault(value, root / f'd{n}')}"
        out.append(a)
    if "--help" in argv or "--cfg" in argv:
        return out
    if "task=train" in argv:
        train = next((a.split("=", 1)[1] for a in argv if a.startswith("train=")), "default")
        out = [a for a in out if not a.startswith("train=")] + [
            f"train={TINY_TRAIN[train]}", f"train.out_dir={root / f'train{n}'}", "train.target_steps=2",
            "train.drafter_steps=2", "train.eval_every=2", "train.checkpoint_every=2"]
    else:
        out += SMALL
    if "task=compile" in argv or "backend=compiled" in argv:  # the plumbing; AOTInductor itself: tests/aot
        out += COMPILE_SMALL + [f"compile.dir={root / 'artifacts'}"]
    if "-m" in argv and not any(a.startswith("hydra.sweep.dir=") for a in argv):
        dirs["sweep"] = root / f"sweep{n}"
        out += [f"hydra.sweep.dir={dirs['sweep']}"]
        if "hydra/launcher=joblib" in argv:
            out += ["hydra.launcher.n_jobs=2"]
    elif not any(a.startswith("hydra.run.dir=") for a in argv):
        out += [f"hydra.run.dir={root / f'run{n}'}"]
    return out


def stamped_venv() -> bool:
    return any((ROOT / ".venv").glob(".spec-setup-*"))


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, dirs, capsys, monkeypatch, tmp_path):
    argv = shlex.split(command, comments=True)
    if argv[:2] == ["bash", "scripts/run.sh"] or argv[:2] == ["bash", "scripts/test.sh"]:
        if not stamped_venv():
            pytest.skip("no .venv set up by scripts/setup.sh here (CI has one)")
        extra = (["tests/spec_compiler/test_layers.py", "-x", "-n", "0"] if argv[1] == "scripts/test.sh"
                 else ["target=tiny_random", "drafter=noisy_copy", *SMALL, f"hydra.run.dir={tmp_path}"])
        p = subprocess.run([*argv, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return
    if argv[:2] in (["bash", "scripts/gpu_check.sh"], ["bash", "scripts/gpu_wheels.sh"]):
        # GPU-machine preparation (downloads wheels; needs CUDA): here only checked to parse
        p = subprocess.run(["bash", "-n", argv[1]], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        if argv[1] == "scripts/gpu_check.sh" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA machine (scripts/gpu_check.sh)")
        return
    if argv[:3] == ["python", "-m", "training.prompt_suite"]:
        import training.prompt_suite as ps
        monkeypatch.setattr(ps, "SUITE", tmp_path / "suite.jsonl")
        monkeypatch.setattr(ps, "CALIBRATION", tmp_path / "calibration.jsonl")
        ps.main()
        rows = [json.loads(line) for line in (tmp_path / "suite.jsonl").read_text().splitlines()]
        assert rows and {"question_id", "category", "turns"} <= set(rows[0])
        return
    if argv[:3] == ["python", "-m", "aot.bench"]:
        import aot.bench
        assert aot.bench.main(argv[3:] + COMPILE_SMALL + [f"compile.dir={dirs['root'] / 'artifacts'}", "--prompts=1",
                                                          "--max-new-tokens=4", f"--out={tmp_path / 'bench'}"]) == 0
        assert json.loads((tmp_path / "bench.json").read_text())["outputs_equal"] == "1/1"
        return
    assert argv[:2] == ["python", "main.py"], f"a README command this test does not know how to run: {command}"
    args = small_argv(argv[2:], dirs)
    code = main.cli(args)
    out, err = capsys.readouterr()
    assert code == 0, f"{args}\n{out[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in err
    if "--help" in args:
        assert "Config groups" in out and "tree:" in out and "Exit status" in out
    elif "-m" in args:
        jobs = 1
        for a in args:
            if "=" in a and "," in a.split("=", 1)[1]:
                jobs *= len(a.split("=", 1)[1].split(","))
        summary = (dirs["sweep"] / "summary.md").read_text().strip().splitlines()
        assert len(summary) == 2 + jobs, summary  # every job of the sweep is collected, parallel or not
    elif "task=generate" in args:
        [answers] = [a for a in err.splitlines() + out.splitlines() if a.startswith("answers: ")]
        rows = (ROOT / answers.split(": ", 1)[1]).read_text().splitlines()
        assert len(rows) == 1 and json.loads(rows[0])["choices"][0]["new_tokens"][0] >= 1


def test_cluster_launcher_configs_compose():
    """The slurm / ray launcher configs the README shows compose (their plugins are not installed here)."""
    from hydra import compose, initialize_config_dir
    for launcher, target in (("slurm", "SlurmLauncher"), ("ray", "RayLauncher")):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith(target)
    assert "untested here" in (ROOT / "README.md").read_text()
