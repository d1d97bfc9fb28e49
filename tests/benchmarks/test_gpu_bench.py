"""benchmarks/gpu_bench.py end to end at --tiny sizes on the CPU: every part writes its JSON, the report merges
them, and a failing part is recorded without losing the others (what scripts/gpu_check.sh relies on)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks/gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_writes_every_field(bench, tmp_path):
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {"python", "torch", "command", "settings"} <= set(res["machine"])
    a = res["llama"]
    assert a["weight_bytes"] == 4 * a["params"] and a["copy"]["gb_s"] > 0 and a["floor_ms"] > 0
    assert [r["nodes"] for r in a["verify"]] == [1, 2, 4]
    assert all(r["eager_ms"] > 0 and r["graph_ms"] > 0 for r in a["verify"])
    assert a["verify"][0]["eager_vs_ar"] == 1.0 and a["ar_vs_floor"]["eager"] > 0
    assert a["graph_stats"]["captures"] == 0  # no CUDA: the wrapper ran every call eager
    assert a["engine_ar_eager_tok_s"] > 0 and a["engine_ar_graph_tok_s"] > 0
    row = res["pair"]["trees"]["chain"]
    for mode in ("eager", "graph"):  # lossless: greedy speculative output is the AR output
        assert row[mode]["outputs_equal_ar"] is True and row[mode]["tau"] >= 1 and row[mode]["speedup"] > 0
    assert row["graph_equals_eager"] is True
    c = res["hf"]
    assert c["llama_logits_rel_err"] < 1e-5  # fp32: our forward is transformers' forward
    assert c["llama"]["assisted_equals_generate"] is True and c["pair"]["assisted_equals_generate"] == "1/1"
    assert c["llama"]["generate_tok_s"] > 0 and c["pair"]["assisted_tok_s"] > 0
    md = (tmp_path / "gpu_bench.md").read_text()
    for heading in ("## Random-weight Llama", "## Default pair", "## transformers generate"):
        assert heading in md
    assert "| 4 |" in md and "**" not in md  # no part reported a failure


def test_a_failing_part_keeps_the_others(bench, tmp_path, monkeypatch):
    def boom(s):
        raise RuntimeError("no device")
    monkeypatch.setattr(bench, "part_pair", boom)
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--part", "pair", "--part", "llama",
                       "--part", "report"]) == 1
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert res["pair"]["error"] == "RuntimeError: no device"
    assert res["llama"]["verify"] and "not run" in res["hf"]["error"]
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "**pair**: RuntimeError: no device" in md and "## Random-weight Llama" in md
