"""CUDA graphs for the step's model forwards: capture each static-shape phase once, replay it after.

With `kv_window=full` every forward of a (B, T) bucket has the same shapes whatever the lengths: the
attention window is the whole cache capacity, the cache tensors never move, and what changes per step
(tokens, positions, slots, mask) is data. `GraphedForward` wraps a model with the target's call contract
(`model(input_ids, position_ids, cache, block, num_logits)`, `.hidden(..., num_rows)`, `.logits`) and
routes each call: the first call of a bucket captures a `torch.cuda.CUDAGraph` of the forward over static
input buffers (the call's tensors and its `Block`'s tensors copied in), later calls copy their tensors
into those buffers and replay. Anything else runs eager: a `live` window (S changes every step), an int
block, a prefill (`num_rows=0`; its T follows the prompt), more than `max_tokens` tokens, an SSM cache
(a Mamba2 forward with `advance=True` commits state, so the warm-up runs that precede a capture are not
idempotent), a device the capture backend does not serve. The keying mirrors mamba-ssm's
`DecodingCGCache` (one graph per (batch, decoding length)).

A captured block attends through its mask and writes K/V by slot index (`start=None`, `mask_full=False`):
the same values an eager forward writes by slice, and the same mask semantics (a full window's mask is
all True). Warm-up forwards before a capture run the call itself (they write the same K/V at the same
slots), so capturing on first use changes no result. Outputs are returned as fresh tensors (a clone of
the graph's static output), so a caller may keep them across later replays.

Host synchronisations of a step on a GPU (the engine's `resident` mode, the default off the CPU). Every host
read of a device value waits for the device queue to drain (a launch-latency round trip each), so the step
keeps its data on the device and reads one small tensor:
- the host builds each forward's `Block` from host lengths and the static topology and sends it with
  non-blocking copies from pinned memory (`Block.to`, `runtime.transfer.to_device`), with the SSM planning
  facts taken from the host copy;
- a top-b static tree's drafter keeps its tokens on the device (`ModelDrafter._propose_resident`: each
  level's top-b columns scattered into the child slots by index and fed to the next level's forward);
- the batch accepts on the device (`spec::fused_accept`, the Triton walk, or for all-greedy batches the
  artifact's acceptance program): greedy rows by argmax, sampled rows with deterministic children (top-b,
  retrieved) by sample-match on log q with Gumbel noise from the request's device generator (the same law as
  rejection sampling with delta proposals); the host reads the packed result and the tree's tokens in one
  copy (`Engine._accept_packed`, `runtime.transfer.to_host`); KV compaction indices and the SSM commit are sent.
So a step with a model drafter of top-b children, prompt lookup or none synchronises once, greedy or sampled
(tests/runtime/test_host_sync.py checks it on the CPU against a simulated device,
tests/gpu/test_host_sync_cuda.py with torch's sync detector). Still reading per level or per round: sampled
children (i.i.d. / without replacement: their distributions go to the host sampler, and the verifier needs
them), grown trees (dynamic / beam: each round's choice is made on the host) and RASD pruning (the draft
scores of the retrieved candidates).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from runtime import batch as fwd
from runtime.models.llama import KVCache

# Block fields a captured forward replaces by constants: K/V go by slot index, the mask is always read.
_OVERRIDDEN = {"start": None, "mask_full": False}


class CudaGraphs:
    """Capture backend: warm-up runs on a side stream, then `torch.cuda.graph` capture into one shared pool.

    One pool for every graph is safe here because replays run one at a time on one stream and each
    replay's output is cloned before the next (a later graph may reuse an earlier one's intermediates)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pool = None

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def capture(self, fn: Callable[[], Tensor]):
        """-> (graph with `.replay()`, the static output tensor that replays overwrite)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # Triton autotuning and cuBLAS handle creation happen here, not in capture
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out


def _block_tensors(block: fwd.Block) -> list[tuple[str, Tensor]]:
    return [(f.name, getattr(block, f.name)) for f in dataclasses.fields(block)
            if isinstance(getattr(block, f.name), Tensor)]


class GraphedForward:
    """A model whose static-shape forwards replay from CUDA graphs (see the module docstring).

    graphs: the capture backend (default `CudaGraphs()`; tests inject one that runs on the CPU);
    max_tokens: the largest T captured (the largest tree bucket); max_graphs: captures beyond this run eager.
    `stats` counts captures, replays and eager calls; the capture table is a `GraphedCalls` (one capture
    implementation for eager forwards and compiled programs)."""

    def __init__(self, model, graphs=None, max_tokens: int = 128, max_graphs: int = 64):
        self.model = model
        self.calls = GraphedCalls(graphs, max_graphs)
        self.graphs, self.max_tokens = self.calls.graphs, max_tokens
        self.eager = 0

    @property
    def stats(self) -> dict:
        return {**self.calls.stats, "eager": self.eager}

    @property
    def entries(self) -> dict:
        """The captured graphs by bucket key (`key`)."""
        return self.calls.entries

    def __getattr__(self, name):  # config, parameters(), new_cache, ...: the wrapped model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, input_ids: Tensor, position_ids: Tensor, cache=None, block=None,
                 num_logits: Optional[int] = None) -> Tensor:
        return self._run("logits", input_ids, position_ids, cache, block, num_logits)

    def hidden(self, input_ids: Tensor, position_ids: Tensor, cache=None, block=None,
               num_rows: Optional[int] = None) -> Tensor:
        return self._run("hidden", input_ids, position_ids, cache, block, num_rows)

    def logits(self, h: Tensor) -> Tensor:
        return self.model.logits(h)

    # ---- routing -------------------------------------------------------------------------------------
    def key(self, phase: str, input_ids: Tensor, position_ids: Tensor, cache, block, num) -> Optional[tuple]:
        """The bucket of a call, or None when it must run eager."""
        if not isinstance(cache, KVCache) or not isinstance(block, fwd.Block):
            return None
        B, T = input_ids.shape
        if num == 0 or T > self.max_tokens or block.S != cache.capacity:
            return None
        if not self.graphs.supports(input_ids.device) or cache.k.device != input_ids.device:
            return None
        fields = tuple((name, tuple(t.shape), t.dtype) for name, t in _block_tensors(block))
        flags = tuple((f.name, getattr(block, f.name)) for f in dataclasses.fields(block)
                      if not isinstance(getattr(block, f.name), Tensor) and f.name not in _OVERRIDDEN)
        return (phase, B, T, num, input_ids.dtype, position_ids.dtype, fields, flags,
                cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape), cache.k.stride())

    @torch.inference_mode()
    def _run(self, phase: str, input_ids, position_ids, cache, block, num) -> Tensor:
        fn = self.model if phase == "logits" else self.model.hidden
        key = self.key(phase, input_ids, position_ids, cache, block, num)
        out = None
        if key is not None:
            names = [name for name, _ in _block_tensors(block)]

            def forward(ids, pos, *fields):  # over the static buffers (called at capture only); the cache is the key's
                return fn(ids, pos, cache, dataclasses.replace(block, **dict(zip(names, fields)), **_OVERRIDDEN), num)
            out = self.calls(key, forward, [input_ids, position_ids] + [t for _, t in _block_tensors(block)], [])
        if out is None:  # not graphable, or max_graphs held
            self.eager += 1
            return fn(input_ids, position_ids, cache, block, num)
        return out


@dataclasses.dataclass
class _CallEntry:
    graph: object
    buffers: list[Tensor]
    """Static copies of the call's copied inputs; the graph reads them."""
    passed: list[Tensor]
    """The inputs passed as themselves (caches: mutated in place, the same storage every replay)."""
    out: object


class GraphedCalls:
    """CUDA graphs of arbitrary tensor functions (a compiled phase program, the acceptance program), one per key.

    `__call__(key, fn, copied, passed)`: the first call of a key captures `fn(*buffers, *passed)` where the buffers
    are static copies of `copied` (warm-up runs, then capture, through the backend: `CudaGraphs`); later calls copy
    their `copied` tensors into the buffers (non-blocking) and replay. `passed` tensors (caches) must be the same
    storage at every call of a key: the key names their data pointers. Outputs (a tensor or a tuple of them) are
    cloned after the replay. Returns None when the key is new and `max_graphs` are held (the caller runs eager).
    Warm-up runs before a capture run the call itself, so a function that writes its inputs' slots (K/V by index)
    must be idempotent for equal inputs; one that commits state (an SSM prefill) must not be graphed."""

    def __init__(self, graphs=None, max_graphs: int = 64):
        self.graphs = graphs if graphs is not None else CudaGraphs()
        self.max_graphs = max_graphs
        self.entries: dict = {}
        self.stats = {"captures": 0, "replays": 0}

    def __call__(self, key, fn, copied: list[Tensor], passed: list[Tensor]):
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_graphs:
                return None
            buffers = [torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t) for t in copied]  # dense
            graph, out = self.graphs.capture(lambda: fn(*buffers, *passed))
            entry = self.entries[key] = _CallEntry(graph, buffers, list(passed), out)
            self.stats["captures"] += 1
        else:
            for buf, t in zip(entry.buffers, copied):
                buf.copy_(t, non_blocking=True)
        entry.graph.replay()
        self.stats["replays"] += 1
        out = entry.out
        return tuple(t.clone() for t in out) if isinstance(out, (tuple, list)) else out.clone()


def layout_key(tensors: list[Tensor]) -> tuple:
    """Shapes, strides and dtypes of a call's tensors: a captured graph replays only calls laid out alike."""
    return tuple((tuple(t.shape), t.stride(), t.dtype) for t in tensors)


def graph_runtime(rt, **kw):
    """`rt` (runtime.load.Runtime) with its target, and its model drafter's model, replayed from CUDA graphs.
    The drafter is a shallow copy (same cache and state) so `rt` itself stays eager. Needs a plan with
    `backend.kv_window=full`; with `live` every call falls back to eager."""
    import copy

    drafter = rt.drafter
    inner = getattr(drafter, "model", None)
    if hasattr(inner, "propose"):  # FusedDrafter: the model drafter inside it
        inner_copy = copy.copy(inner)
        inner_copy.model = GraphedForward(inner.model, **kw)
        drafter = copy.copy(drafter)
        drafter.model = inner_copy
    elif isinstance(inner, torch.nn.Module):
        drafter = copy.copy(drafter)
        drafter.model = GraphedForward(inner, **kw)
    return dataclasses.replace(rt, target=GraphedForward(rt.target, **kw), drafter=drafter)
