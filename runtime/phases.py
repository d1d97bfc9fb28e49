"""Phases: the model forwards of the batched step as tensor-only programs, keyed by what fixes their shapes.

Every forward the engine and the drafters make is `model.hidden(...)` or `model(...)` (logits) with a
`runtime.batch.Block` and a cache view (runtime/decode.py, runtime/drafters.py). A *phase* is one such call
site with its static facts: which model (`role`), logits or hidden states (`method`), a causal block
(`advance`: prefill chunk, drafter catch-up) or a tree block, the batch B, the token count T (a program may
keep it dynamic: `PhaseKey.dynamic`), how many tokens' outputs it keeps (`keep`: num_logits / num_rows), the
cache's row count R (a view of rows of an R-row cache has R's strides, which a compiled program fixes), and
for SSM caches the host facts their plan branches on (`flags`).

`Phase` wraps a model as a function of tensors only (the Block's tensors, then the cache's), so
`torch.export` captures it whole: cache tensors are inputs mutated in place (K/V written by slot index), the
attention stays one opaque `spec.cached_attention` node (codegen/ops.py; `spec.tree_attention` for the
at-prefix blocks backend.attention=triton routes to the kernel: `PhaseKey.tree_attention`). `AcceptPhase` is
greedy acceptance as such a function. `intercept` routes a model's calls through a callback with their key: the compile step
(aot/build.py) records examples with it, the compiled backend (runtime/compiled.py) dispatches with it.

Shape legend: B rows, T tokens of the block, S attended slots, C cache capacity.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from runtime.batch import Block
from runtime.models.llama import KVCache, routes_tree_attention
from runtime.models.ssm_cache import SSMCache

BLOCK_INPUTS = ("input_ids", "positions", "slots", "parent_slots", "mask", "lengths", "anc", "offsets")
"""A phase's leading inputs (then the cache tensors, `cache_tensors` order)."""


@dataclass(frozen=True)
class PhaseKey:
    role: str
    """target | drafter."""
    method: str
    """forward (fp32 logits) | hidden (final hidden states)."""
    advance: bool
    """A causal block that commits (prefill chunk, catch-up) | a tree block."""
    B: int
    T: Optional[int]
    """The block's token count; None in a program's key when T is a dynamic dimension (causal blocks always;
    tree blocks too unless the plan wants a program per tree bucket: static shapes for CUDA graphs)."""
    keep: Optional[int]
    """Outputs kept: None every token, 0 none (prefill), n the last n."""
    R: int = 1
    """Rows of the whole cache the call's view is taken from."""
    flags: tuple = ()
    """SSM caches: the host facts the forward's plan branches on (`SSMCache.facts`), fixed in the program."""
    tree_attention: bool = False
    """The forward's attention is the tree-attention kernel (`llama.routes_tree_attention`: an at-prefix block of
    a size backend.attention=triton compiled it for); the program rebuilds its Block with at_prefix so."""

    @property
    def name(self) -> str:
        kind = "causal" if self.advance else "tree"
        keep = "all" if self.keep is None else str(self.keep)
        flags = "-F" + "".join(str(int(f)) for f in self.flags) if self.flags else ""
        ta = "-TA" if self.tree_attention else ""
        return f"{self.role}-{self.method}-{kind}-B{self.B}-T{self.T or 'dyn'}-keep{keep}-R{self.R}{flags}{ta}"

    def to_dict(self) -> dict:
        return asdict(self)

    def dynamic(self) -> "PhaseKey":
        """This key with T dynamic (SDPA attention: the tree-attention kernel is specialized per T)."""
        return dataclasses.replace(self, T=None, tree_attention=False)

    @staticmethod
    def from_dict(d: dict) -> "PhaseKey":
        return PhaseKey(**{**d, "flags": tuple(d.get("flags", ()))})


def call_key(role: str, method: str, block, input_ids: Tensor, keep: Optional[int], cache,
             model: Optional[nn.Module] = None) -> Optional[PhaseKey]:
    """The phase of one model call, or None for a call no phase covers (training, an int block)."""
    if not isinstance(block, Block) or block.anc is None or block.offsets is None:
        return None
    B, T = input_ids.shape
    flags = cache.facts(block) if isinstance(cache, SSMCache) else ()
    return PhaseKey(role, method, bool(block.advance), B, T, keep, cache_rows(cache), flags,
                    model is not None and routes_tree_attention(model, block))


# ---- caches as tensors ---------------------------------------------------------------------------------
def cache_tensors(cache) -> list[Tensor]:
    """The tensors a cache (view) holds, in a fixed order: KVCache (k, v); SSMCache (ssm, conv, scratch_ssm,
    scratch_conv[, kv.k, kv.v])."""
    if isinstance(cache, KVCache):
        return [cache.k, cache.v]
    out = [cache.ssm, cache.conv, cache.scratch_ssm, cache.scratch_conv]
    return out + ([cache.kv.k, cache.kv.v] if cache.kv is not None else [])


def cache_from(kind: str, capacity: int, tensors) -> object:
    """`cache_tensors`'s inverse over (possibly traced) tensors: kind "kv" | "ssm"."""
    if kind == "kv":
        return KVCache._view(*tensors)
    kv = KVCache._view(*tensors[4:6]) if len(tensors) > 4 else None
    return SSMCache._view(capacity, *tensors[:4], kv)


def cache_rows(cache) -> int:
    """Rows of the whole cache a (row-view) cache's tensors come from: its row stride says how many."""
    t = cache_tensors(cache)[0]  # [layers, rows, ...]
    return t.stride(0) // t.stride(1) if t.dim() > 1 and t.stride(1) else t.shape[1]


def cache_kind(cache) -> str:
    return "kv" if isinstance(cache, KVCache) else "ssm"


def block_inputs(input_ids: Tensor, block: Block) -> list[Tensor]:
    """The BLOCK_INPUTS tensors of one call."""
    return [input_ids, block.positions, block.slots, block.parent_slots, block.mask, block.lengths, block.anc,
            block.offsets]


# ---- the traced function -------------------------------------------------------------------------------
class Phase(nn.Module):
    """`model` as a function of tensors: (BLOCK_INPUTS..., cache tensors...) -> logits or hidden states.
    The Block is rebuilt from its tensors with no host-side shortcuts (K/V always written by index)."""

    def __init__(self, model: nn.Module, key: PhaseKey, kind: str, capacity: int):
        super().__init__()
        self.model, self.key, self.kind, self.capacity = model, key, kind, capacity

    def forward(self, input_ids, positions, slots, parent_slots, mask, lengths, anc, offsets, *cache):
        block = Block(slots, positions, parent_slots, mask, lengths, advance=self.key.advance, anc=anc,
                      offsets=offsets, at_prefix=self.key.tree_attention)
        view = cache_from(self.kind, self.capacity, cache)
        if self.kind == "ssm":
            view.host_flags = self.key.flags
        if self.key.method == "hidden":
            return self.model.hidden(input_ids, positions, view, block, num_rows=self.key.keep)
        return self.model(input_ids, positions, view, block, num_logits=self.key.keep)


class AcceptPhase(nn.Module):
    """Greedy acceptance of a verified batch as a tensors-only program: (logits [B, T, V], parents [B, T],
    tokens [B, T]) -> packed [B, T + 2] (`codegen.fused_accept.FusedAcceptResult`: path node ids padded with
    -1, path length, next token), one opaque `spec::fused_accept` node (the Triton kernel on CUDA)."""

    def forward(self, logits, parents, tokens):
        from codegen import ops  # noqa: F401  (registers torch.ops.spec)
        return torch.ops.spec.fused_accept(logits, parents, tokens, logits.shape[1] - 1, None)


def accept_key(B: int, T: int) -> PhaseKey:
    return PhaseKey("acceptance", "greedy", False, B, T, None, 1)


def intercept(model: nn.Module, role: str, on_call) -> Callable[[], None]:
    """Route `model.hidden` and `model(...)` (its forward) through `on_call(key, run, inputs, cache, call)` where
    key is the call's PhaseKey (T given), run() the model's own method, inputs the phase inputs and call the
    raw arguments (method, input_ids, position_ids, cache, block, num); calls no
    phase covers, and the hidden call inside a forward, go straight to the model. Set on the instance (the
    class, isinstance checks and parameters are untouched); returns the function that removes it."""
    cls = type(model)
    depth = [0]

    def wrap(method: str, fn, num_kw: str):
        def call(input_ids, position_ids, cache=None, block=None, num=None, **kw):
            num = kw.pop(num_kw, num)
            key = None if cache is None or depth[0] else call_key(role, method, block, input_ids, num, cache, model)
            if key is None:
                return fn(model, input_ids, position_ids, cache, block, num)

            def run():
                depth[0] += 1
                try:
                    return fn(model, input_ids, position_ids, cache, block, num)
                finally:
                    depth[0] -= 1
            return on_call(key, run, block_inputs(input_ids, block) + cache_tensors(cache), cache,
                           (method, input_ids, position_ids, cache, block, num))
        return call
    saved = {k: model.__dict__[k] for k in ("hidden", "forward") if k in model.__dict__}
    model.hidden = wrap("hidden", cls.hidden, "num_rows")
    model.__dict__["unintercepted"] = Unintercepted(model)
    model.forward = wrap("forward", cls.forward, "num_logits")

    def remove():
        for k in ("hidden", "forward", "unintercepted"):
            model.__dict__.pop(k, None)
        model.__dict__.update(saved)
    return remove


class Unintercepted:
    """A model's own forward and hidden (bypassing `intercept`), everything else the model's: what a fallback
    that wraps the model (CUDA graphs) calls."""

    def __init__(self, model: nn.Module):
        self.__dict__["_model"] = model

    def __call__(self, *args, **kw):
        return type(self._model).forward(self._model, *args, **kw)

    def hidden(self, *args, **kw):
        return type(self._model).hidden(self._model, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._model, name)


def clone_strided(t: Tensor) -> Tensor:
    """A copy of `t` with the same strides (a cache row view's strides are what a compiled program sees)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)
