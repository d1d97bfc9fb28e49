"""The entry point: short error reports from the CLI, a tiny end-to-end `run(cfg)` on CPU, multirun, seeding.

Modelled on lightning-hydra-template `tests/test_train.py`: the `@hydra.main` wrapper is exercised through
a subprocess, the pipeline itself through `main.run(cfg)` with a composed, shrunk config.
"""
import json
import os
import subprocess
import sys

import pytest

import main
from tests.conftest import ROOT

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about trees.", "Now make it rhyme."]},
    {"question_id": 82, "category": "coding", "turns": ["def add(a, b):\n"]},
]
DEFAULT_TAU = 128 / 70  # measured: `python main.py` (top3 tree, greedy, CPU); a change here is a regression
ANSWER_FIELDS = ("new_tokens", "wall_time", "accept_lengths", "output_ids", "decoding_steps")


def cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "main.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


# ---- CLI error reports ---------------------------------------------------------------------------

def test_cli_bad_value_is_two_lines_without_traceback(tmp_path):
    p = cli("tree.k=-1", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert 1 <= sum("tree.k" in line for line in p.stderr.splitlines()) <= 2
    assert p.stderr.splitlines()[0].startswith("error: tree.k")


def test_cli_unknown_group_option(tmp_path):
    p = cli("drafter=nonexistent", f"hydra.run.dir={tmp_path}")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert "drafter/nonexistent" in p.stderr


def test_cli_missing_checkpoint(tmp_path):
    p = cli("target=hf", "target.model.checkpoint=/nonexistent", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "target.model.checkpoint" in p.stderr.splitlines()[0]


def test_multirun_writes_a_summary(tmp_path):
    p = cli("-m", "tree=chain,static", "task.max_new_tokens=4", f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text().strip().splitlines()
    assert len(summary) == 2 + 2  # header, separator, one row per job
    assert "tree=chain" in summary[2] and "tree=static" in summary[3]
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 2


# ---- end to end through run(cfg) -----------------------------------------------------------------

def test_run_generate(compose, tmp_path, prompts):
    out = tmp_path / "out"
    result = main.run(compose(["task=generate", f"prompts={prompts}", "task.num_prompts=2",
                               f"task.output_dir={out}"]))
    assert result["task"] == "generate" and result["new_tokens"] > 0
    rows = [json.loads(line) for line in (out / os.path.basename(result["answers"])).read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 82]
    assert [r["category"] for r in rows] == ["writing", "coding"]
    for row, q in zip(rows, QUESTIONS):
        choice = row["choices"][0]
        assert len(choice["turns"]) == len(q["turns"])
        for field in ANSWER_FIELDS:
            assert len(choice[field]) == len(q["turns"]), field
        assert all(1 <= n <= 8 for n in choice["new_tokens"])
        assert [len(ids) for ids in choice["output_ids"]] == choice["new_tokens"]
        assert [sum(a) for a in choice["accept_lengths"]] == choice["new_tokens"]
    assert json.loads((out / "result.json").read_text())["plan_hash"] == result["plan_hash"]


@pytest.mark.parametrize("tree", ["chain", "static"])
def test_run_bench_greedy_matches_baseline(compose, tmp_path, prompts, tree):
    out = tmp_path / "out"
    result = main.run(compose(["task=bench", f"tree={tree}", f"prompts={prompts}", "task.num_prompts=2",
                               "task.max_new_tokens=16", f"task.output_dir={out}"]))
    assert result["task"] == "bench"
    assert result["tau"] > 1  # drafts were accepted, so the equality below is not vacuous
    for name in ("bench.json", "bench.md", "result.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "bench.json").read_text())
    assert report["greedy"] and report["num_prompts"] == 2
    assert report["outputs_equal_to_baseline"] == "2/2"
    assert [m["method"] for m in report["methods"]] == ["autoregressive", report["plan"]["name"]]


def test_bench_repeats_time_every_prompt_several_times(compose, tmp_path, prompts):
    """task.repeats: each method decodes each prompt that many times (interleaved); tau is unchanged."""
    reports = []
    for repeats in (1, 3):
        out = tmp_path / f"r{repeats}"
        main.run(compose(["task=bench", f"prompts={prompts}", "task.num_prompts=1", "task.max_new_tokens=16",
                          f"task.repeats={repeats}", f"task.output_dir={out}"]))
        reports.append(json.loads((out / "bench.json").read_text()))
        assert f"x {repeats} runs" in (out / "bench.md").read_text() or repeats == 1
    one, three = reports
    assert three["repeats"] == 3 and three["outputs_equal_to_baseline"] == "1/1"
    for a, b in zip(one["methods"], three["methods"]):
        assert b["new_tokens"] == 3 * a["new_tokens"] and b["steps"] == 3 * a["steps"] and b["tau"] == a["tau"]


def test_seeded_sampling_is_deterministic(compose, tmp_path, prompts):
    def output_ids(seed, run):
        out = tmp_path / f"run{run}"
        main.run(compose(["sampling=sample", f"sampling.seed={seed}", "task.max_new_tokens=24",
                          "task.num_prompts=1", f"prompts={prompts}", f"task.output_dir={out}"]))
        [answers] = out.glob("answers-*.jsonl")
        return [json.loads(line)["choices"][0]["output_ids"] for line in answers.read_text().splitlines()]

    first = output_ids(seed=3, run=0)
    assert output_ids(seed=3, run=1) == first
    assert output_ids(seed=4, run=2) != first


# ---- the embedded default ------------------------------------------------------------------------

@pytest.mark.skipif(not (ROOT / "models/default/target/model.safetensors").is_file(), reason="no trained pair")
def test_default_run_end_to_end(tmp_path):
    """`python main.py` with no arguments: the committed trained pair, offline, AR vs speculative."""
    p = cli(f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| autoregressive |" in p.stdout and "tau" in p.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["outputs_equal_to_baseline"] == "1/1"
    method = report["methods"][1]
    # greedy decoding on CPU is deterministic: tau is pinned exactly (TESTING.md layer 10)
    assert method["tau"] == pytest.approx(DEFAULT_TAU, abs=1e-9), method["tau"]
