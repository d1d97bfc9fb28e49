"""backend=compiled on CUDA replays its phase programs from CUDA graphs (runtime/compiled.py, issue #11).

Without a GPU the programs and the capture backend are stand-ins with the real dispatch around them: each
program is the function AOTInductor compiles (`runtime.phases.Phase` over a copy of the model, `AcceptPhase`),
and the capture backend (`RerunGraphs`) replays by re-running the captured closure over the static buffers, so
a replay whose buffers were not refreshed with the new call's inputs would give wrong tokens. Checked: greedy
tokens equal eager's; each graphable program (verify and drafter levels per bucket, the acceptance walk) is
captured once per (key, layout, cache storage) and replayed after; prefill programs are never graphed. tests/gpu/test_cuda_graphs.py runs the real thing on CUDA.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

import main
from runtime.compiled import Compiled, CompiledStats, Program, drafter_module, graphable, install
from runtime.cuda_graphs import GraphedCalls
from runtime.load import load
from runtime.phases import BLOCK_INPUTS, AcceptPhase, Phase, accept_key, cache_kind, intercept
from tests.conftest import compose_config
from tests.gpu.test_cuda_graphs import RerunGraphs

BASE = ["target=tiny_random", "target.model.num_layers=2", "drafter=noisy_copy", "tree=static",
        "tree.branching=[2,1]", "target.max_seq_len=64", "backend.kv_window=full"]
PROMPTS = [[5, 9, 2, 7, 7, 1, 3], [4, 4, 8, 1], [2, 6, 6, 6, 1, 9, 9, 3, 5]]


def _outputs(rt, n_new=10):
    return [r.output_ids for r in rt.generate_many([rt.request(p, n_new, seed=i) for i, p in enumerate(PROMPTS)])]


def _programs_for(rt) -> dict:
    """role -> key -> Program for every phase call a decode makes (discovered by intercepting one)."""
    seen: dict = {}
    models = {"target": rt.target, "drafter": drafter_module(rt.drafter)}
    copies = {role: copy.deepcopy(model) for role, model in models.items()}  # what a program computes with
    removers = []
    for role, model in models.items():
        def on_call(key, run, inputs, cache, call, role=role, model=copies[role]):
            if key not in seen.setdefault(role, {}):
                n = len(BLOCK_INPUTS)
                seen[role][key] = Program(key, "aoti", Phase(model, key, cache_kind(cache),
                                                             inputs[n].shape[3] if cache_kind(cache) == "kv"
                                                             else cache.capacity).eval(),
                                          [tuple(t.stride()) for t in inputs[n:]], [str(t.dtype) for t in inputs],
                                          False, rt.plan.cache_capacity)
            return run()
        removers.append(intercept(model, role, on_call))
    _outputs(rt, 4)
    for remove in removers:
        remove()
    return seen


def test_graphable_programs_replay_from_graphs():
    spec, plan, _ = main.prepare(compose_config(BASE), in_run=False)
    eager = load(plan, 3)
    want = _outputs(eager)
    rt = load(plan, 3)
    programs = _programs_for(rt)
    assert any(not graphable(p) for ps in programs.values() for p in ps.values())  # prefill programs present
    programs["acceptance"] = {accept_key(B, T): Program(accept_key(B, T), "aoti", AcceptPhase(), [], [], False, 0)
                              for B in (1, 2, 3) for T in (1, 2, 4, 5)}
    stats, calls = CompiledStats(), GraphedCalls(RerunGraphs())
    for role in ("target", "drafter"):
        model = rt.target if role == "target" else drafter_module(rt.drafter)
        install(model, role, programs[role], stats, None, calls)
    rt = dataclasses.replace(rt, compiled=Compiled(None, {"phases": []}, stats, programs, calls))
    assert _outputs(rt) == want
    graphed_keys = {k[0] for k in calls.entries}
    assert graphed_keys and all(not (k.advance and (k.keep == 0 or k.flags)) for k in graphed_keys)
    assert any(k.role == "acceptance" for k in graphed_keys) and any(k.role == "target" for k in graphed_keys)
    assert calls.stats["captures"] == len(calls.entries) < calls.stats["replays"]  # captured once, replayed after
    assert sum(stats.graphed.values()) == calls.stats["replays"]
    for key in (k for ps in programs.values() for k in ps):  # every prefill program ran as itself
        if key.advance and key.keep == 0:
            assert stats.graphed[key.name] == 0 and stats.hits[key.name] > 0, key.name
    assert "from CUDA graphs" in stats.summary()
