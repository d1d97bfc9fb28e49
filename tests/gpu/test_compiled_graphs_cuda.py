"""On CUDA: backend=compiled replays its AOTInductor phase programs from CUDA graphs (issue #11).

A tiny random pair compiled on the GPU (target phases, batch 1, a [2, 1] static tree, kv_window=full: one
program per tree bucket) through the CLI's task=compile; decoding from the artifact captures each graphable
program once and replays it after (`CompiledStats.graphed`), with greedy tokens equal to eager's. Its own part
of scripts/gpu_check.sh (AOTInductor compiles for a minute or so). The CPU version of the dispatch:
tests/runtime/test_compiled_graphs.py.
"""
from __future__ import annotations

import pytest
import torch

import main
from aot.build import open_runtime
from runtime.load import load
from tests.conftest import compose_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_compiled_programs_replay_from_cuda_graphs(tmp_path):
    base = ["target=tiny_random", "target.model.num_layers=1", "drafter=noisy_copy", "tree=static",
            "tree.branching=[2,1]", "target.max_seq_len=64", "backend.device=cuda", "backend.kv_window=full",
            "compile.num_prompts=1", "compile.max_new_tokens=6", "compile.repeats=2", "compile.backends=[aoti]",
            "compile.roles=[target]", "compile.batch_sizes=[1]", f"compile.dir={tmp_path / 'artifacts'}",
            f"task.output_dir={tmp_path / 'out'}"]
    assert main.cli(["task=compile"] + base) == 0
    spec, plan, _ = main.prepare(compose_config(base + ["backend=compiled"]), in_run=False)
    rt = open_runtime(spec, plan, 1)
    eager = load(main.prepare(compose_config(base), in_run=False)[1], 1)
    prompts = [[5, 9, 2, 7, 7, 1, 3], [4, 4, 8, 1, 2, 6]]
    want = [eager.generate(p, 12).output_ids for p in prompts]
    got = [rt.generate(p, 12).output_ids for p in prompts]
    assert got == want
    stats = rt.compiled.stats
    assert sum(stats.graphed.values()) > rt.compiled.graphed_calls.stats["captures"] > 0, stats.summary()
