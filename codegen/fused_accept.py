"""Fused tree verification: walk each request's draft tree on the device, one program per request.

The host learns the outcome from one small tensor (`FusedAcceptResult.packed`), so a verify step
needs a single device-to-host copy, and with a pre-drawn noise tensor the step is graph-capturable.

The walk (runtime/sampling.py, `walk_greedy` and `walk_sampled(rule=sample_match)`): start at
the root (node 0); at the current node draw y; follow the lowest-id child whose token is y; when no
child matches, stop and emit y as the next token (recovered if the node has children, bonus if it is
a leaf). Step s of the walk (0 <= s <= max_depth) draws

    y_s = argmax_v(scores[node, v] + gumbel[s, v])      (first index on exact ties)

- GREEDY (`gumbel=None`): y = argmax(logits[node]), exactly `greedy_token`.
- SAMPLE_MATCH (`gumbel` given): with scores = log q (q after temperature/top-k/top-p, -inf where q
  is 0) or simply logits / temperature, the Gumbel-max trick makes y_s an exact draw from q[node].
  This is `walk_sampled(tree, b, q, AcceptanceRule.sample_match, chooser=...)` with the chooser's
  s-th draw replaced by that argmax, which tests/codegen/test_fused_accept.py checks
  draw for draw. For deterministic (delta-proposal) children, sample-match has the same law as
  recursive rejection sampling (`AcceptanceRule.auto`): P(child x) = q(x), and a rejection
  leaves q restricted to the other tokens. For i.i.d. or WOR children it is still lossless but
  accepts less than RRS; that rule is not fused here.
  Rows of zeros in `gumbel` make that request greedy, so one launch serves a mixed batch.

Each program reads at most max_depth + 1 rows of V scores. A non-finite visited row (any NaN, a
+inf, or no finite entry) stops that request's walk with next token -1 (a placeholder: the host
must raise or resample for that request only); other requests are unaffected.

Compile-time: max_depth, the node block, the vocab block (`FusedAcceptSpec`). Run time: batch, node
count, vocab size, the tree itself (parents and tokens are tensors, so dynamic trees need no
recompile).

Shape legend: B batch, N tree nodes (root = node 0), V vocab, S = max_depth + 1 walk steps.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from codegen.common import next_power_of_2, interpreting as _interpreting

try:  # Triton is an optional extra (`gpu`, `dev`): the Spec and the reference work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None


class AcceptMode(str, enum.Enum):
    greedy = "greedy"
    """y = argmax of the target logits at each visited node."""
    sample_match = "sample_match"
    """y = a draw from q at each visited node (Gumbel-max over pre-drawn noise)."""


# ---------------------------------------------------------------------------------------------------
# compile-time parameters
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedAcceptSpec:
    """Everything that selects a compiled fused-accept kernel."""

    max_depth: int
    """Deepest node the walk may accept (the tree's max depth); the walk takes max_depth + 1 steps."""
    max_nodes: int
    """Upper bound on the tree's node count N (sets the node block, a power of two)."""
    mode: AcceptMode

    def __post_init__(self):
        assert self.max_depth >= 0 and self.max_nodes >= 1, self
        object.__setattr__(self, "mode", AcceptMode(self.mode))

    @property
    def block_nodes(self) -> int:
        return next_power_of_2(self.max_nodes)

    @property
    def name(self) -> str:
        return f"fused_accept_{self.mode.value}_d{self.max_depth}_n{self.block_nodes}"

    def constexprs(self) -> dict[str, int | bool]:
        return {"MAX_DEPTH": self.max_depth, "BLOCK_NODES": self.block_nodes,
                "BLOCK_PATH": next_power_of_2(self.max_depth + 1),
                "HAS_GUMBEL": self.mode is AcceptMode.sample_match}


class FusedAcceptResult(NamedTuple):
    """Views into one int64 buffer, so the host reads everything with a single copy of `packed`."""

    path: torch.Tensor
    """[B, S] accepted node ids, root first, padded with -1."""
    path_len: torch.Tensor
    """[B] entries of `path` in use (>= 1: the root); accepted draft tokens = path_len - 1."""
    next_token: torch.Tensor
    """[B] the recovered or bonus token; -1 where a visited row was non-finite."""
    packed: torch.Tensor
    """[B, S + 2] = path | path_len | next_token."""

    @staticmethod
    def from_packed(packed: torch.Tensor) -> "FusedAcceptResult":
        S = packed.shape[1] - 2
        return FusedAcceptResult(packed[:, :S], packed[:, S], packed[:, S + 1], packed)


def gumbel_noise(batch: int, max_depth: int, vocab: int, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """[B, max_depth + 1, V] fp32 standard Gumbel noise, one row per walk step.

    Uniforms are drawn in fp64 and kept in (0, 1), so no draw is infinite.
    """
    u = torch.rand(batch, max_depth + 1, vocab, generator=generator, dtype=torch.float64)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny)
    return (-torch.log(-torch.log(u))).to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
def fused_accept_ref(scores: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor, max_depth: int,
                     gumbel: torch.Tensor | None = None) -> FusedAcceptResult:
    """The same walk in plain PyTorch, one request at a time (reads values on the host)."""
    # scores: [B, N, V] | [N, V]; parents, tokens: [B, N] | [N]; gumbel: [B, S, V] | None
    scores, parents, tokens = _batched(scores, parents, tokens)
    B, N, V = scores.shape
    packed = torch.full((B, max_depth + 3), -1, dtype=torch.int64)
    for b in range(B):
        par, tok = parents[b].tolist(), tokens[b].tolist()
        node, path, nxt = 0, [0], -1
        for step in range(max_depth + 1):
            x = scores[b, node].float()
            if gumbel is not None:
                x = x + gumbel[b, step].float()
            if torch.isnan(x).any() or not torch.isfinite(x.max()):
                break  # non-finite row: placeholder -1
            y = int(torch.argmax(x))
            child = next((c for c in range(N) if par[c] == node and tok[c] == y), None)
            if child is None or step == max_depth:
                nxt = y
                break
            path.append(child)
            node = child
        packed[b, :len(path)] = torch.tensor(path)
        packed[b, max_depth + 1] = len(path)
        packed[b, max_depth + 2] = nxt
    return FusedAcceptResult.from_packed(packed.to(scores.device))


def _batched(scores, parents, tokens):
    if scores.dim() == 2:
        scores = scores.unsqueeze(0)
    B, N = scores.shape[:2]
    parents = parents.expand(B, N) if parents.dim() == 1 else parents
    tokens = tokens.expand(B, N) if tokens.dim() == 1 else tokens
    return scores, parents, tokens


# ---------------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------------
def _fused_accept_kernel(
    # Pointers to matrices
    Scores, Gumbel, Parents, Tokens, Out,
    # Matrix dimensions
    N, V,
    # Strides
    stride_sb, stride_sn, stride_sv,
    stride_gb, stride_gs, stride_gv,
    stride_pb, stride_pn,
    stride_tb, stride_tn,
    stride_ob,
    # Meta-parameters
    MAX_DEPTH: tl.constexpr, BLOCK_NODES: tl.constexpr, BLOCK_PATH: tl.constexpr,
    HAS_GUMBEL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_NODES)
    n_ok = offs_n < N
    parents = tl.load(Parents + b * stride_pb + offs_n * stride_pn, mask=n_ok, other=-1)  # [BLOCK_NODES]
    tokens = tl.load(Tokens + b * stride_tb + offs_n * stride_tn, mask=n_ok, other=-1)  # [BLOCK_NODES]
    offs_p = tl.arange(0, BLOCK_PATH)
    offs_v = tl.arange(0, BLOCK_V)

    node = b * 0  # int64 scalars carried through the walk
    path_len = node + 1
    next_token = node - 1
    path = tl.where(offs_p == 0, node, -1)  # [BLOCK_PATH]: the root is always on the path
    active = node == 0

    for step in range(MAX_DEPTH + 1):
        # y = first argmax over the vocab of scores[node] (+ gumbel[step]); skipped once the walk stopped
        row = Scores + b * stride_sb + node * stride_sn
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = node * 0
        num_nan = node * 0
        for v0 in range(0, tl.where(active, V, 0), BLOCK_V):
            v = v0 + offs_v
            v_ok = v < V
            x = tl.load(row + v * stride_sv, mask=v_ok, other=float("-inf")).to(tl.float32)
            if HAS_GUMBEL:
                x += tl.load(Gumbel + b * stride_gb + step * stride_gs + v * stride_gv, mask=v_ok, other=0.0)
            num_nan += tl.sum((x != x).to(tl.int64), 0)
            x = tl.where(x != x, float("-inf"), x)
            chunk_max = tl.max(x, 0)
            chunk_idx = tl.min(tl.where(x == chunk_max, v, V), 0).to(tl.int64)
            take = chunk_max > best  # strict: an earlier chunk keeps a tie
            best_idx = tl.where(take, chunk_idx, best_idx)
            best = tl.where(take, chunk_max, best)
        finite = (num_nan == 0) & (best > float("-inf")) & (best < float("inf"))

        # follow the lowest-id child carrying y; the last step may not go deeper than MAX_DEPTH
        match = n_ok & (parents == node) & (tokens == best_idx)
        child = tl.min(tl.where(match, offs_n, BLOCK_NODES), 0).to(tl.int64)
        follow = active & finite & (child < BLOCK_NODES) & (step < MAX_DEPTH)
        stop = active & (follow == 0)
        next_token = tl.where(stop, tl.where(finite, best_idx, -1), next_token)
        path = tl.where(follow & (offs_p == step + 1), child, path)
        path_len += follow.to(tl.int64)
        node = tl.where(follow, child, node)
        active = follow

    out = Out + b * stride_ob
    tl.store(out + offs_p, path, mask=offs_p < MAX_DEPTH + 1)
    tl.store(out + MAX_DEPTH + 1, path_len)
    tl.store(out + MAX_DEPTH + 2, next_token)


# ---------------------------------------------------------------------------------------------------
# autotuning
# ---------------------------------------------------------------------------------------------------
# CPU tests: one config (the autotuner cannot time the interpreter), several vocab chunks even at V = 37.
INTERPRET_CONFIG = {"BLOCK_V": 16}


def _configs() -> list:
    return [triton.Config({"BLOCK_V": bv}, num_warps=w) for bv in (16, 256, 1024, 4096) for w in (1, 2, 4, 8)]


def keep(conf, vocab: int) -> bool:
    """Prune predicate: >= 8 vocab items a thread, no block wider than the vocab needs, <= 64 chunks."""
    bv = conf.kwargs["BLOCK_V"]
    return bv >= 8 * 32 * conf.num_warps and bv <= max(256, next_power_of_2(vocab)) and (bv * 64 >= vocab or bv == 4096)


def _prune(configs, named_args, **kwargs):
    if _interpreting():
        return [c for c in configs if c.kwargs == INTERPRET_CONFIG][:1]
    vocab = {**named_args, **kwargs}["V"]
    return [c for c in configs if keep(c, vocab)]


@functools.cache
def _kernel(interpret: bool):
    """The autotuned kernel, decorated on first launch (reads TRITON_INTERPRET then, not at import)."""
    assert triton is not None, "fused_accept needs Triton: pip install -e '.[gpu]'"
    del interpret  # only the cache key
    return triton.autotune(configs=_configs(), key=["V"],
                           prune_configs_by={"early_config_prune": _prune})(triton.jit(_fused_accept_kernel))


# ---------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------
def fused_accept(scores: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor, max_depth: int,
                 gumbel: torch.Tensor | None = None, spec: FusedAcceptSpec | None = None) -> FusedAcceptResult:
    """Verify B draft trees on the device (see the module docstring for the rule); no host sync.

    `parents[c]` is node c's parent (-1 for the root and for padding nodes, which are never reached);
    `tokens[c]` is node c's draft token (the root's is unused). A tree deeper than `max_depth` is
    walked only to that depth.
    """
    # scores: [B, N, V] | [N, V] float; parents, tokens: [B, N] | [N] int; gumbel: [B, max_depth + 1, V] fp32 | None
    assert scores.dim() in (2, 3) and scores.is_floating_point(), \
        f"scores must be float [B, N, V] or [N, V], got {scores.dtype} {tuple(scores.shape)}"
    scores, parents, tokens = _batched(scores, parents, tokens)
    B, N, V = scores.shape
    assert parents.shape == (B, N) and tokens.shape == (B, N), \
        f"parents and tokens must be [{N}] or [{B}, {N}], got {tuple(parents.shape)} and {tuple(tokens.shape)}"
    assert not parents.is_floating_point() and not tokens.is_floating_point(), "parents and tokens must be integer"
    assert gumbel is None or (gumbel.shape == (B, max_depth + 1, V) and gumbel.dtype == torch.float32), \
        f"gumbel must be fp32 [{B}, {max_depth + 1}, {V}], " \
        f"got {None if gumbel is None else (gumbel.dtype, tuple(gumbel.shape))}"
    assert scores.device == parents.device == tokens.device and (gumbel is None or gumbel.device == scores.device), \
        "all inputs must be on one device"
    mode = AcceptMode.greedy if gumbel is None else AcceptMode.sample_match
    spec = spec or FusedAcceptSpec(max_depth=max_depth, max_nodes=N, mode=mode)
    assert (spec.max_depth, spec.mode) == (max_depth, mode) and N <= spec.max_nodes, \
        f"inputs (max_depth={max_depth}, {mode.value}, {N} nodes) do not fit the compiled {spec}"

    packed = torch.empty(B, max_depth + 3, dtype=torch.int64, device=scores.device)
    g = scores if gumbel is None else gumbel  # a dummy pointer when HAS_GUMBEL is off
    g_strides = (0, 0, 0) if gumbel is None else gumbel.stride()
    _kernel(_interpreting())[(B,)](
        scores, g, parents, tokens, packed,
        N, V,
        *scores.stride(), *g_strides, *parents.stride(), *tokens.stride(), packed.stride(0),
        **spec.constexprs(),
    )
    return FusedAcceptResult.from_packed(packed)
