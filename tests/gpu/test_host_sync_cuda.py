"""On CUDA: a greedy step synchronises with the host once (issue #11), measured by torch's own sync detector.

`torch.cuda.set_sync_debug_mode("error")` makes every synchronising CUDA call torch issues (a blocking copy in
either direction, `.item()`, `.tolist()`, `nonzero`, ...) raise; the step's one read (`runtime.transfer.to_host`)
runs with the detector off and is counted. Llama and hybrid targets, no drafter / a noisy-copy drafter on a
chain and a static tree, batch 1 and 3, greedy and sampled rows; greedy outputs equal the host path's (logits
read, host walk), sampled ones each request's alone-run. The CPU
version of this check (a simulated device) is tests/runtime/test_host_sync.py.
"""
from __future__ import annotations

import pytest
import torch

import runtime.decode
from runtime.decode import Engine, Request
from runtime.drafters import ModelDrafter
from spec_compiler.tree import TreeTopology
from tests.runtime.test_batch import MAX_SEQ, make_drafter, make_target, new_cache, prompts
from tests.runtime.test_host_sync import _requests

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _engine(arch, drafter_kind, topo, rows, resident):
    target = make_target(arch)
    drafter = make_drafter(drafter_kind, target, topo, rows)  # on the CPU, then moved with its cache rebuilt
    target = target.cuda()
    if isinstance(drafter, ModelDrafter):
        model = drafter.model.cuda()
        drafter = ModelDrafter(model, topo, MAX_SEQ + topo.n, drafter.kind, 1.0, drafter.vocab, rows=rows,
                               cache=new_cache(model, rows, topo), kv_window="full")
        drafter.resident = resident
    return Engine(target, new_cache(target, rows, topo), drafter, max_seq_len=MAX_SEQ, kv_window="full",
                  resident=resident)


@pytest.mark.parametrize("arch", ["llama", "hybrid"])
@pytest.mark.parametrize("drafter_kind,tree", [("none", "root"), ("noisy_copy", "chain3"), ("noisy_copy", "static21")])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_one_sync_per_step_on_cuda(arch, drafter_kind, tree, rows, sampling, monkeypatch):
    topo = {"root": TreeTopology.chain(0), "chain3": TreeTopology.chain(3),
            "static21": TreeTopology.static([2, 1])}[tree]
    ps, budgets = prompts()[:rows], [14, 9, 11][:rows]
    if sampling == "greedy":  # the host path: logits read, host walk
        ref = [r.output_ids for r in _engine(arch, drafter_kind, topo, rows, False).generate(
            _requests(ps, budgets, sampling))]
    else:  # each request alone on the resident path, same seeds
        ref = [_engine(arch, drafter_kind, topo, 1, True).generate([_requests(ps, budgets, sampling)[i]])[0].output_ids
               for i in range(rows)]

    eng = _engine(arch, drafter_kind, topo, rows, True)
    reads = []
    real = runtime.decode.to_host

    def counted(t):
        torch.cuda.set_sync_debug_mode(0)
        try:
            reads.append(1)
            return real(t)
        finally:
            torch.cuda.set_sync_debug_mode("error")
    monkeypatch.setattr(runtime.decode, "to_host", counted)
    warm = _engine(arch, drafter_kind, topo, rows, True)  # Triton compiles and allocator warm-up, unchecked
    warm.generate([Request(list(p), 4) for p in ps])
    reqs = _requests(ps, budgets, sampling)
    for r in reqs:
        eng.add(r)
    steps = 0
    torch.cuda.synchronize()
    reads.clear()
    try:
        torch.cuda.set_sync_debug_mode("error")
        while eng.rows:
            eng.step()
            steps += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(reads) == steps
    assert [r.result.output_ids for r in reqs] == ref
