"""task=loadtest end to end on the tiny pair (two policies, two rates, a few requests): one row per (policy, rate)
with every request completed, the policies' own plans, tau 1 without a drafter; the report files; a policy
whose overrides do not compose is a user error naming it. Poisson arrivals have the requested rate. Bad
task=serve / loadtest settings are ConfigErrors naming the key."""
from __future__ import annotations

import json

import numpy as np

import main
from serve.loadtest import arrivals
from tests.serve.conftest import SMALL

POLICIES = 'task.loadtest.policies=[{name:none,overrides:["drafter=none"]},{name:k2,overrides:["serving=fixed","serving.k=2"]}]'


def args(tmp_path, *extra):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "turns": [f"def f{i}(x):"]}) + "\n" for i in range(5)))
    return ["target=tiny_random", "drafter=noisy_copy", "tree=chain",
            *[a for a in SMALL if not a.startswith("task=")], "task=loadtest", f"prompts={q}",
            "task.max_new_tokens=5", "task.loadtest.rates=[4,50]", "task.loadtest.num_requests=4",
            "task.loadtest.warmup=1", "serving.max_batch_size=4", f"hydra.run.dir={tmp_path / 'run'}", *extra]


def test_loadtest_reports_every_policy_and_rate(tmp_path, capsys):
    """Two repeats: every row pools 2 x 4 requests, with each repeat's mean latency."""
    assert main.cli(args(tmp_path, POLICIES, "task.loadtest.repeats=2")) == 0, capsys.readouterr().err[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "loadtest.json").read_text())
    rows = report["rows"]
    assert [(r["policy"], r["rate"]) for r in rows] == [("none", 4.0), ("k2", 4.0), ("none", 50.0), ("k2", 50.0)]
    for r in rows:
        assert r["completed"] == 8 and r["failed"] == 0 and r["repeats"] == 2
        assert len(r["latency_mean_per_repeat"]) == 2
        assert abs(sum(r["latency_mean_per_repeat"]) / 2 - r["latency_mean"]) < 1e-9  # equal-sized repeats
        assert 0 < r["ttft_mean"] <= r["latency_mean"] and r["latency_p50"] <= r["latency_p99"]
        assert r["completion_tokens"] == 8 * 5 and r["throughput_tok_s"] > 0
    assert all(r["tau"] == 1.0 for r in rows if r["policy"] == "none")
    assert "-ar-" in report["policies"]["none"]["plan"] and "-chain-" in report["policies"]["k2"]["plan"]
    assert min(r["vs_best"] for r in rows) == 1.0
    md = (run / "loadtest.md").read_text()
    assert "Machine:" in md and "command: `python main.py" in md and "| 50.000 | k2 |" in md
    assert (run / "loadtest.png").stat().st_size > 0


def test_bad_policy_is_a_user_error(tmp_path, capsys):
    bad = 'task.loadtest.policies=[{name:x,overrides:["tree=nosuchtree"]}]'
    assert main.cli(args(tmp_path, bad)) == 2
    assert "task.loadtest.policies[0].overrides" in capsys.readouterr().err


def test_poisson_arrivals():
    t = np.array(arrivals(5.0, 4000, seed=1))
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps > 0).all()
    assert abs(gaps.mean() - 0.2) < 0.02 and abs(gaps.std() - 0.2) < 0.03  # exponential: std == mean
    assert arrivals(5.0, 10, seed=1) == list(t[:10]) and arrivals(5.0, 10, seed=2) != list(t[:10])


def test_serve_and_loadtest_settings_are_checked():
    import pytest

    from spec_compiler.errors import ConfigError
    from tests.conftest import compose_config
    bad = {
        "task.port": ["task=serve", "task.port=70000"],
        "task.max_body_bytes": ["task=serve", "task.max_body_bytes=10"],
        "task.loadtest.rates[1]": ["task=loadtest", "task.loadtest.rates=[1,0]"],
        "task.loadtest.num_requests": ["task=loadtest", "task.loadtest.num_requests=0"],
        "task.loadtest.repeats": ["task=loadtest", "task.loadtest.repeats=0"],
        "task.loadtest.policies[1].name": ["task=loadtest", "task.loadtest.policies=[{name:a},{name:a}]"],
    }
    for key, overrides in bad.items():
        with pytest.raises(ConfigError) as e:
            main.to_spec(compose_config(overrides))
        assert e.value.where == key, (key, e.value)
    spec = main.to_spec(compose_config(["task=loadtest"], shrink=False))
    assert [p.name for p in spec.task.loadtest.policies] == ["none", "k1", "k2", "k4", "smartspec"]
    assert spec.task.host == "127.0.0.1"
