"""backend=compiled at run time: load an artifact's programs and route each phase's call to its program.

The artifact (aot/build.py) lists, per phase key (runtime/phases.py), the backend the autotuner chose and the
program file. `attach(runtime, directory, manifest)` loads every non-eager program (AOTInductor `.pt2`
packages through `torch._inductor.aoti_load_package`; TensorRT programs through `torch.export.load` after
importing torch_tensorrt) and installs a dispatcher on the target and the drafter model: a call whose key
has a program, with the cache layout the program was built for (strides, dtypes, KV window below the
capacity), runs it; any other call runs the model's own forward and is counted as a miss (`CompiledStats`).
Nothing here compiles: loading a package is reading compiled code.

On CUDA with kv_window=full the programs replay from CUDA graphs: a `graphable` program (the whole cache as
its window, not a prefill nor an SSM commit: the verify forward of each (B, T) bucket, the drafter's levels
and KV catch-up, the acceptance walk) is captured on its first call per input layout and cache storage
(`runtime.cuda_graphs.GraphedCalls`: the block tensors copied into static buffers, the cache tensors passed
as themselves) and replayed after; prefill programs and SSM advance blocks run as they are, and calls
no program takes replay graphs of the eager forward (`GraphedForward`). `CompiledStats.graphed` counts replays.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from runtime.cuda_graphs import layout_key
from runtime.transfer import to_device
from runtime.phases import BLOCK_INPUTS, PhaseKey, accept_key, intercept


def load_program(backend: str, path: Path) -> Callable:
    """A compiled phase program: fn(*phase inputs) -> output."""
    import codegen.ops  # noqa: F401  (the spec:: custom ops a program calls back into must be registered)
    if backend == "aoti":
        return torch._inductor.aoti_load_package(str(path))
    if backend == "tensorrt":
        try:
            import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the program calls)
        except ImportError as e:
            from spec_compiler.artifact import ArtifactError
            raise ArtifactError(str(path), f"a TensorRT program, but torch_tensorrt does not import here ({e})") from None
        return torch.export.load(str(path)).module()
    raise ValueError(f"unknown program backend {backend!r}")


@dataclass
class Program:
    key: PhaseKey
    backend: str
    run: Callable
    cache_strides: list[tuple[int, ...]]
    dtypes: list[str]
    live_window: bool
    capacity: int

    def accepts(self, inputs: list[torch.Tensor]) -> bool:
        """Whether this call's inputs have the layout the program was compiled for."""
        caches = inputs[len(BLOCK_INPUTS):]
        if len(caches) != len(self.cache_strides):
            return False
        if any(tuple(t.stride()) != s for t, s in zip(caches, self.cache_strides)):
            return False
        if any(str(t.dtype) != d for t, d in zip(inputs, self.dtypes)):
            return False
        if self.key.role == "acceptance":
            return True
        T, S = inputs[0].shape[1], inputs[4].shape[-1]
        if self.live_window:
            return 2 <= S < self.capacity and T < self.capacity
        return S == self.capacity


@dataclass
class CompiledStats:
    """Calls per phase that ran a compiled program (hits) or the eager forward (misses: no program for the key,
    or another layout)."""

    hits: Counter = field(default_factory=Counter)
    misses: Counter = field(default_factory=Counter)
    graphed: Counter = field(default_factory=Counter)
    """Hits that replayed a CUDA graph of the program (runtime.cuda_graphs.GraphedCalls)."""

    def summary(self) -> str:
        n, m, g = sum(self.hits.values()), sum(self.misses.values()), sum(self.graphed.values())
        top = ", ".join(f"{k} x{v}" for k, v in self.misses.most_common(3))
        return f"{n} compiled calls ({g} from CUDA graphs), {m} eager" + (f" ({top})" if m else "")


def load_programs(directory: Path, manifest: dict) -> dict[str, dict[PhaseKey, Program]]:
    """role -> key -> Program for every phase whose chosen backend is not eager."""
    out: dict[str, dict[PhaseKey, Program]] = {}
    for entry in manifest["phases"]:
        if entry["backend"] == "eager":
            continue
        key = PhaseKey.from_dict(entry["key"])
        run = load_program(entry["backend"], Path(directory) / entry["file"])
        out.setdefault(key.role, {})[key] = Program(key, entry["backend"], run,
                                                    [tuple(s) for s in entry["cache_strides"]], entry["dtypes"],
                                                    entry["live_window"], entry["capacity"])
    return out


def graphable(prog: Program) -> bool:
    """Whether a program's calls replay from CUDA graphs (one per input layout: a T-dynamic program gets one per
    T it is called with): the KV window is the whole cache (fixed shapes), and the call is not a prefill (keep 0:
    its T follows each prompt) nor an SSM model's advance block (it commits state, so the warm-up runs before a
    capture would not be idempotent; a KV catch-up rewrites the same K/V at the same slots)."""
    key = prog.key
    return not prog.live_window and not (key.advance and (key.keep == 0 or key.flags))


def install(model: torch.nn.Module, role: str, programs: dict[PhaseKey, Program], stats: CompiledStats,
            graphs=None, graphed_calls=None):
    """Dispatch `model`'s phase calls to `programs` (see the module docstring); returns the remover. graphs:
    a capture backend (runtime.cuda_graphs.CudaGraphs) for the calls no program takes: they replay CUDA graphs
    of the eager forward per bucket (kv_window=full), else run eager; graphed_calls
    (runtime.cuda_graphs.GraphedCalls): the calls a `graphable` program takes replay CUDA graphs of the program."""
    graphed = None
    if graphs is not None:
        from runtime.cuda_graphs import GraphedForward
        graphed = GraphedForward(None, graphs=graphs)

    def on_call(key: PhaseKey, run, inputs, cache, call):
        prog = programs.get(key) or programs.get(key.dynamic())
        if prog is None or not prog.accepts(inputs):
            stats.misses[key.name] += 1
            if graphed is not None:
                method, *args = call
                graphed.model = model.unintercepted
                return graphed._run("logits" if method == "forward" else "hidden", *args)
            return run()
        stats.hits[prog.key.name] += 1
        if graphed_calls is not None and graphable(prog):
            n = len(BLOCK_INPUTS)
            out = graphed_calls((prog.key, layout_key(inputs), tuple(t.data_ptr() for t in inputs[n:])), prog.run,
                                inputs[:n], inputs[n:])
            if out is not None:
                stats.graphed[prog.key.name] += 1
                return out
        return prog.run(*inputs)
    return intercept(model, role, on_call)


@dataclass
class Compiled:
    """What a runtime runs from (Runtime.compiled)."""

    directory: Path
    manifest: dict
    stats: CompiledStats
    programs: dict[str, dict[PhaseKey, Program]]
    graphed_calls: object = None
    """runtime.cuda_graphs.GraphedCalls replaying the graphable programs (CUDA, kv_window=full), else None."""

    def acceptor(self, tree, logits):
        """Greedy acceptance by the artifact's acceptance program for this (B, T): its packed result [B, T + 2]
        (read by the engine, runtime.decode.Engine._accept_packed), or None (eager's)."""
        key = accept_key(tree.B, tree.T)
        prog = self.programs.get("acceptance", {}).get(key)
        if prog is None:
            return None
        self.stats.hits[key.name] += 1
        dev = logits.device
        inputs = [logits.contiguous(), to_device(tree.parents.contiguous(), dev), to_device(tree.tokens.contiguous(), dev)]
        if self.graphed_calls is not None:  # (B, T) fixes every shape: the walk replays from a graph
            out = self.graphed_calls((key, layout_key(inputs)), prog.run, inputs, [])
            if out is not None:
                self.stats.graphed[key.name] += 1
                return out
        return prog.run(*inputs)

    def summary(self) -> str:
        chosen = Counter(p["backend"] for p in self.manifest["phases"])
        return (f"artifact {self.directory.name}: " + ", ".join(f"{n} phases {b}" for b, n in sorted(chosen.items()))
                + f"; {self.stats.summary()}")


def attach(rt, directory: Path, manifest: dict, graphs=None):
    """`rt` (runtime.load.Runtime) running from the artifact: its target and drafter model dispatch to the
    artifact's programs (the models are shared by `with_batch_size` / `with_drafter` copies). On CUDA with
    kv_window=full, calls no program takes replay CUDA graphs (`graphs`: the capture backend, default
    runtime.cuda_graphs.CudaGraphs there; tests pass a CPU stand-in)."""
    programs = load_programs(directory, manifest)
    stats = CompiledStats()
    if graphs is None and rt.plan.device == "cuda" and rt.plan.kv_window == "full":
        from runtime.cuda_graphs import CudaGraphs
        graphs = CudaGraphs()
    calls = None
    if graphs is not None:
        from runtime.cuda_graphs import GraphedCalls
        calls = GraphedCalls(graphs)
    models = {"target": rt.target, "drafter": drafter_module(rt.drafter)}
    for role, model in models.items():
        if model is not None and (programs.get(role) or graphs is not None):
            install(model, role, programs.get(role, {}), stats, graphs, calls)
    return dataclasses.replace(rt, compiled=Compiled(Path(directory), manifest, stats, programs, calls))


def drafter_module(drafter):
    """The drafter's nn.Module (a fused RASD drafter's model drafter's), or None (no model)."""
    inner = getattr(drafter, "model", None)
    if inner is not None and not isinstance(inner, torch.nn.Module):
        inner = getattr(inner, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else None
