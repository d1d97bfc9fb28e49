"""At most one host synchronisation per speculative step (issue #11, GPU path), checked on the CPU.

A GPU step stalls the host whenever it reads a device value (`.tolist()`, `.item()`, `bool(t)`, `.cpu()`), copies
host data with a blocking copy (`torch.tensor(x, device=cuda)`, `t.to(cuda)` from pageable memory) or mixes a
host tensor into a device op (an index tensor is moved with a blocking copy). This machine has no GPU, so
`SimulatedDevice` plays one: a TorchFunctionMode that marks every tensor that would live on the device (model
parameters and buffers, caches, factory outputs given a `device=`, everything computed from those, what
`runtime.transfer.to_device` sends) and records each of the three events on a marked tensor. The engine's
transfers go through `to_device` (counted as sends, free) and `to_host` (counted: the one allowed read).

Checked for the paths a GPU step takes (the resident drafter and the fused acceptance): Llama, Mamba2 and hybrid
targets x the autoregressive step, a chain and a static tree of top-b children from a model drafter, batch 1 and
3 with ragged lengths, greedy and sampled rows (temperature, top-k, top-p; one batch mixes greedy and sampled).
Each step has exactly one read (`to_host` of the packed acceptance and the tokens), no blocking transfer and no
mixed op; greedy outputs equal the host path's, sampled ones each request's alone-run (same seeds). The law of
the resident sampled path is checked in tests/runtime/test_sampling_e2e.py (resident_* cases). Prefill (when a request joins) is
outside the count: it happens once per request, not per step.
"""
from __future__ import annotations

import contextlib
import traceback
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import runtime.compiled
import runtime.decode
import runtime.transfer
import runtime.drafters
import runtime.models.llama
import runtime.models.ssm_cache
from runtime.decode import Engine, Request, SamplingParams
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.models import mamba2
from runtime.sampling import ChildKind
from spec_compiler.tree import TreeTopology
from tests.runtime.test_batch import MAX_SEQ, V, make_drafter, make_target, new_cache, prompts

Tensor = torch.Tensor
READS = {Tensor.tolist, Tensor.item, Tensor.__bool__, Tensor.__int__, Tensor.__float__, Tensor.__index__,
         Tensor.numpy, Tensor.cpu, Tensor.__repr__, Tensor.__format__}
BLOCKING_SENDS = {torch.tensor, torch.as_tensor}
# reading metadata is free on a GPU: shapes, dtypes, devices live on the host
METADATA = {Tensor.dim, Tensor.size, Tensor.numel, Tensor.stride, Tensor.is_contiguous, Tensor.data_ptr,
            Tensor.__len__, Tensor.element_size, Tensor.storage_offset}


class _Marked:
    """A set of tensors by identity (a WeakSet compares tensors with ==, which is elementwise)."""

    def __init__(self):
        self.refs: dict[int, weakref.ref] = {}

    def add(self, t: Tensor) -> None:
        self.refs[id(t)] = weakref.ref(t)

    def __contains__(self, t) -> bool:
        r = self.refs.get(id(t))
        return r is not None and r() is t


def _has_device(args, kwargs) -> bool:
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args[1:])


class SimulatedDevice(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.on = _Marked()
        """Tensors that would live on the device."""
        self.events: list[tuple[str, str]] = []
        """(kind, where): 'read' | 'blocking send' | 'mixed' outside to_host; 'to_host' for the allowed read."""
        self.sends = 0

    def mark(self, *objs) -> None:
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                for t in list(obj.parameters()) + list(obj.buffers()):
                    self.on.add(t)
            elif isinstance(obj, Tensor):
                self.on.add(obj)
            elif obj is not None:  # a cache: every tensor it holds (KVCache k / v, SSMCache states and its kv)
                for v in vars(obj).values():
                    self.mark(v) if isinstance(v, Tensor) or hasattr(v, "__dict__") and not callable(v) else None

    def _record(self, kind: str) -> None:
        where = next((f"{f.filename.split('/work/main/')[-1]}:{f.lineno} {f.name}"
                      for f in reversed(traceback.extract_stack()[:-2])
                      if "/runtime/" in f.filename or "/codegen/" in f.filename), "?")
        self.events.append((kind, where))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA or getattr(func, "__name__", "") in ("__get__", "shape", "dtype", "device"):
            return func(*args, **kwargs)
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        on = [t for t in flat if t in self.on]
        if func in READS and args and isinstance(args[0], Tensor) and args[0] in self.on:
            self._record("read")
        if func in BLOCKING_SENDS and kwargs.get("device") is not None:
            self._record("blocking send")
        if func is Tensor.to and args and args[0] not in self.on and _has_device(args, kwargs):
            self._record("blocking send")  # a host tensor .to(device): must go through runtime.transfer.to_device
        if on and any(t not in self.on and t.dim() > 0 for t in flat):
            self._record("mixed")
        out = func(*args, **kwargs)
        if on or kwargs.get("device") is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor) and func not in READS:
                    self.on.add(t)
        return out

    # the two transfer points of runtime.transfer
    def to_device(self, t: Tensor, device) -> Tensor:
        if t in self.on:
            return t
        self.sends += 1
        out = t.clone()
        self.on.add(out)
        return out

    def to_host(self, t: Tensor) -> Tensor:
        self.events.append(("to_host", ""))
        out = t.clone()
        self.on.refs.pop(id(out), None)  # on the host now
        return out

    @contextlib.contextmanager
    def patched(self, monkeypatch):
        for mod in (runtime.transfer, runtime.decode, runtime.drafters, runtime.models.llama, runtime.models.ssm_cache,
                    runtime.compiled):
            if hasattr(mod, "to_device"):
                monkeypatch.setattr(mod, "to_device", self.to_device)
            if hasattr(mod, "to_host"):
                monkeypatch.setattr(mod, "to_host", self.to_host)
            if hasattr(mod, "on_host"):  # every block is sent and the KV commit runs spec::kv_compact, as on a GPU
                monkeypatch.setattr(mod, "on_host", lambda device: False)
        yield


def _engine(arch: str, drafter_kind: str, topo: TreeTopology, rows: int):
    target = make_target(arch)
    cache = new_cache(target, rows, topo)
    drafter = make_drafter(drafter_kind, target, topo, rows)
    if isinstance(drafter, ModelDrafter):
        drafter.resident = True
    eng = Engine(target, cache, drafter, max_seq_len=MAX_SEQ, kv_window="full", resident=True)
    return eng, target, cache, drafter


SAMPLED = [SamplingParams(1.0), SamplingParams(0.8, top_k=5, top_p=0.9), SamplingParams()]


def _requests(ps, budgets, sampling):
    sps = [SamplingParams()] * len(ps) if sampling == "greedy" else SAMPLED[:len(ps)]
    return [Request(list(p), n, sp, torch.Generator().manual_seed(2 * i), torch.Generator().manual_seed(2 * i + 1))
            for i, (p, n, sp) in enumerate(zip(ps, budgets, sps))]


@pytest.mark.parametrize("arch", ["llama", "mamba2", "hybrid"])
@pytest.mark.parametrize("drafter_kind,tree", [("none", "root"), ("noisy_copy", "chain3"), ("noisy_copy", "static21")])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_one_host_read_per_step(arch, drafter_kind, tree, rows, sampling, monkeypatch):
    topo = {"root": TreeTopology.chain(0), "chain3": TreeTopology.chain(3),
            "static21": TreeTopology.static([2, 1])}[tree]
    ps = prompts()[:rows]
    budgets = [14, 9, 11][:rows]
    if sampling == "greedy":  # the reference: the host path (logits read, host walk), same models
        ref_eng, *_ = _engine(arch, drafter_kind, topo, rows)
        ref_eng.resident = False
        if isinstance(ref_eng.drafter, ModelDrafter):
            ref_eng.drafter.resident = False
        ref = [r.output_ids for r in ref_eng.generate(_requests(ps, budgets, sampling))]
    else:  # sampled rows draw their own noise: each request alone gives the same tokens as in the batch
        ref = []
        for i in range(rows):
            alone, *_ = _engine(arch, drafter_kind, topo, 1)
            ref.append(alone.generate([_requests(ps, budgets, sampling)[i]])[0].output_ids)

    eng, target, cache, drafter = _engine(arch, drafter_kind, topo, rows)
    sim = SimulatedDevice()
    sim.mark(target, cache, getattr(drafter, "model", None), getattr(drafter, "cache", None))
    reqs = _requests(ps, budgets, sampling)
    with sim.patched(monkeypatch), sim:
        for r in reqs:
            eng.add(r)
        sim.events.clear()
        per_step = []
        while eng.rows:
            before = len(sim.events)
            eng.step()
            per_step.append(sim.events[before:])
    bad = [e for s in per_step for e in s if e[0] != "to_host"]
    assert not bad, f"host synchronisations besides the one read: {bad[:8]}"
    assert all(sum(e[0] == "to_host" for e in s) == 1 for s in per_step), [len(s) for s in per_step]
    assert sim.sends > 0
    assert [r.result.output_ids for r in reqs] == ref
    if drafter_kind != "none":
        assert sum(map(sum, (r.result.accept_lengths for r in reqs))) > sum(len(r.result.accept_lengths)
                                                                            for r in reqs)  # drafts were accepted


def test_the_simulation_catches_each_kind_of_sync(monkeypatch):
    """The checker itself: a read, a blocking send and a mixed op on a marked tensor are each recorded."""
    sim = SimulatedDevice()
    w = torch.randn(3, 3)
    sim.mark(w)
    with sim:
        y = w @ torch.ones(3, device="cpu")  # a factory given a device: on the device
        assert not sim.events
        y.tolist()
        torch.tensor([1, 2], device="cpu")
        _ = w[torch.tensor([0, 1])]  # a host index into a device tensor
        torch.arange(3).to(torch.device("cpu"))
    assert [k for k, _ in sim.events] == ["read", "blocking send", "mixed", "blocking send"]
