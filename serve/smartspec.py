"""Speculation-length policies for the serving scheduler: fixed k, and SmartSpec (ALGORITHMS.md §5).

SmartSpec picks, before each step, the speculation length k (draft levels verified; 0 = none) that
maximises estimated goodput

    G(k) = sum_i E_i(k) / T(B, k),    E_i(k) = sum_{j=0..min(k, r_i - 1)} alpha_i^j

where alpha_i is request i's per-level acceptance rate (the geometric model: a level is accepted with
probability alpha_i given the one above was), r_i its remaining budget, and T(B, k) the step latency for B
rows measured on this machine (`LatencyProfile`, profiled once and saved as JSON).

k is batch-uniform, as in the reference code (dsd.py) and vLLM's Dynamic SD: every row of a step is padded
to one tree-size bucket and the drafter runs a level for all rows, so a row speculating less than the
batch maximum saves no time. Per-request acceptance still enters through sum_i E_i(k). The choice is made
before drafting and never looks at the tokens it gates, so it is lossless whenever the verifier is (§5.3).

alpha_i is the maximum-likelihood estimate under the geometric model, A / (A + R) (A accepted levels, R
steps that ended in a rejection; steps that accept every level add nothing to R, §5.6), with a prior of
`prior_steps` pseudo-rejections at the server-wide rate (an EMA over steps, starting at `alpha_prior`).
"""
from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from spec_compiler.schema import ServingConfig, ServingPolicy
from spec_compiler.tree import tree_buckets

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILE_DIR = PROJECT_ROOT / "artifacts" / "profiles"


def machine_tag() -> str:
    """A short fingerprint of the CPU (latency profiles are per machine)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return hashlib.sha256(name.encode()).hexdigest()[:8]


PROFILE_VERSION = 3


@dataclass
class LatencyProfile:
    """Median seconds of one engine step (draft + verify + commit) per (context length, batch size, k)."""

    contexts: list[int]
    """Tokens in each row's context when profiled (the attention window grows with it)."""
    batch_sizes: list[int]
    ks: list[int]
    seconds: list[list[list[float]]]
    """seconds[c][i][j]: contexts[c] tokens per row, batch_sizes[i] rows, speculation length ks[j]."""
    meta: dict = field(default_factory=dict)
    """What was profiled: plan, machine, steps per cell, date."""
    prefill_per_token: float = 0.0
    """Seconds per token of a deferred drafter prefill (a row's first drafted step after steps that did not draft:
    `runtime.drafters.ModelDrafter.pending_prefill`), from each k > 0 cell's first step over its median."""
    version: int = PROFILE_VERSION

    def predict(self, B: int, k: int, context: int | None = None) -> float:
        """T(B, k) at `context` tokens (None: the first profiled context), from a least-squares fit per context of
        seconds ~ a + b*B + c*k + d*B*k over the table (the reference code fits regressions too: single timed
        cells are noisy, and a non-monotone table would make goodput pick a k by noise), linear in the context
        between (and beyond) the profiled contexts."""
        if getattr(self, "_coef", None) is None:
            self._coef = [_fit(self.batch_sizes, self.ks, table) for table in self.seconds]
        if context is None or len(self._coef) == 1:
            c = self._coef[0]
            return max(1e-9, c[0] + c[1] * B + c[2] * k + c[3] * B * k)
        at = [c[0] + c[1] * B + c[2] * k + c[3] * B * k for c in self._coef]
        return max(1e-9, _interp(self.contexts, at, context))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Optional["LatencyProfile"]:
        """The saved profile, or None when the file is of another format version."""
        d = json.loads(Path(path).read_text())
        if d.get("version") != PROFILE_VERSION:
            return None
        return cls(d["contexts"], d["batch_sizes"], d["ks"], d["seconds"], d.get("meta", {}), d["prefill_per_token"])


def _fit(batch_sizes: Sequence[int], ks: Sequence[int], table: Sequence[Sequence[float]]) -> list[float]:
    """Least-squares (a, b, c, d) of t ~ a + b*B + c*k + d*B*k over table[i][j] = t(batch_sizes[i], ks[j])
    (terms a one-row or one-k table cannot determine are left at 0)."""
    import numpy as np
    X, y = [], []
    for i, B in enumerate(batch_sizes):
        for j, k in enumerate(ks):
            X.append([1.0, B, k, B * k])
            y.append(table[i][j])
    coef, *_ = np.linalg.lstsq(np.array(X), np.array(y), rcond=None)
    return [float(c) for c in coef]


def _interp(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended linearly past both ends (constant through one point)."""
    if len(xs) == 1:
        return ys[0]
    i = 0
    while i < len(xs) - 2 and x > xs[i + 1]:
        i += 1
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def expected_tokens(alpha: float, k: int, remaining: int) -> float:
    """E[tokens emitted] by one row verifying k levels: 1 + alpha + ... + alpha^k, cut at the remaining budget."""
    n = max(1, min(k + 1, remaining))
    if alpha >= 1.0:
        return float(n)
    return (1.0 - alpha ** n) / (1.0 - alpha)


@dataclass
class Acceptance:
    """One request's acceptance history under the geometric model."""

    accepted: int = 0
    """A: draft levels accepted."""
    rejected: int = 0
    """R: steps whose accepted path ended before the tree's depth."""

    def observe(self, accepted: int, depth: int) -> None:
        if depth <= 0:
            return
        self.accepted += accepted
        self.rejected += accepted < depth

    def alpha(self, prior: float, weight: float) -> float:
        a0 = weight * prior / (1.0 - prior)  # pseudo-accepts matching `weight` pseudo-rejections at rate `prior`
        return (self.accepted + a0) / (self.accepted + a0 + self.rejected + weight)


class FixedK:
    """The same speculation length every step (None: the tree's depth)."""

    def __init__(self, k: Optional[int]):
        self.k = k

    def choose(self, rows: Sequence, pending: Optional[Sequence[int]] = None) -> Optional[int]:
        return self.k

    def observe(self, rows: Sequence) -> None:
        pass


class SmartSpec:
    """Goodput-maximising k per step (module docstring)."""

    def __init__(self, profile: LatencyProfile, max_k: int, alpha_prior: float = 0.7, prior_steps: float = 2.0,
                 no_spec_bias: float = 1.0):
        self.profile, self.max_k = profile, max_k
        self.prior, self.weight, self.bias = alpha_prior, prior_steps, no_spec_bias
        self.k = max_k

    def alphas(self, rows: Sequence) -> list[float]:
        """Each row's estimate; its prior is the server-wide rate (`self.prior`, updated after every step)."""
        return [self._stats(r).alpha(min(self.prior, 1 - 1e-6), self.weight) for r in rows]

    @staticmethod
    def _stats(req) -> Acceptance:
        if getattr(req, "acceptance", None) is None:
            req.acceptance = Acceptance()
        return req.acceptance

    def goodput(self, rows: Sequence, k: int, pending: Optional[Sequence[int]] = None) -> float:
        """Estimated tokens per second of a step verifying k levels for these rows."""
        return self._goodputs(rows, pending)[k]

    def _goodputs(self, rows: Sequence, pending: Optional[Sequence[int]] = None) -> list[float]:
        """goodput(rows, k) for k = 0..max_k (the estimates computed once: this runs before every step, whose
        own cost is about a millisecond at batch 1 on this CPU).

        pending[b]: tokens row b's drafter must prefill before it can draft (its deferred start, or steps at
        k = 0 since). A step with k > 0 pays that prefill once; it is charged amortised over the row's steps
        left at that k (remaining / E_b(k)), so a short gain does not buy a long prefill, and a request with
        many tokens to go still switches to speculation when it pays."""
        alphas = self.alphas(rows)
        remaining = [r.max_new_tokens - r.emitted for r in rows]
        context = max(len(r.tokens) for r in rows)  # the live attention window: the longest row
        B = len(rows)
        per_token = self.profile.prefill_per_token if pending is not None else 0.0
        out = []
        for k in range(self.max_k + 1):
            E = [expected_tokens(a, k, m) for a, m in zip(alphas, remaining)]
            t = self.profile.predict(B, k, context)
            if k > 0 and per_token > 0:
                t += sum(p * per_token * e / max(1, m) for p, e, m in zip(pending, E, remaining))
            out.append(sum(E) / t * (self.bias if k == 0 else 1.0))
        return out

    def choose(self, rows: Sequence, pending: Optional[Sequence[int]] = None) -> int:
        g = self._goodputs(rows, pending)
        self.k = max(range(self.max_k + 1), key=g.__getitem__)  # no unimodality assumed
        return self.k

    def observe(self, rows: Sequence) -> None:
        """After a step: each row's accepted levels against the depth it verified; the server-wide rate moves
        toward this step's (α ← 0.85 α + 0.15 α_step, as the reference code), the prior of every request."""
        acc = rej = 0
        for r in rows:
            res = r.result
            if res.draft_depths and res.draft_depths[-1] > 0:
                a, d = res.accepted_drafts[-1], res.draft_depths[-1]
                self._stats(r).observe(a, d)
                acc, rej = acc + a, rej + (a < d)
        if acc + rej:
            self.prior = 0.85 * self.prior + 0.15 * acc / (acc + rej)


def profile_engine(engine, make_request, contexts: Sequence[int], batch_sizes: Sequence[int], ks: Sequence[int],
                   steps: int, progress=None) -> LatencyProfile:
    """Time `steps` engine steps (after one untimed) for every (context, B, k): B requests from
    make_request(context, i), each step verifying k levels. The engine must be empty; it is left empty. With a
    deferred drafter (`Engine(defer_drafter=True)`) the untimed first step of a k > 0 cell prefills every row's
    drafter: its excess over the cell's median, per prefilled token, is the profile's `prefill_per_token`."""
    assert not engine.rows and not engine.prefilling
    seconds, prefill = [], []
    for ctx in contexts:
        table = []
        for B in batch_sizes:
            row = []
            for k in ks:
                for i in range(B):
                    engine.add(make_request(ctx, i))
                times = []
                for _ in range(steps + 1):
                    t0 = time.perf_counter()
                    engine.step([k] * len(engine.rows))
                    times.append(time.perf_counter() - t0)
                    if len(engine.rows) < B:
                        break
                for r in list(engine.rows) + list(engine.prefilling):
                    engine.cancel(r)
                row.append(statistics.median(times[1:] or times))
                if k > 0 and len(times) > 1:  # the first drafted step prefilled the deferred drafter rows
                    prefill.append(max(0.0, times[0] - row[-1]) / (B * ctx))
                if progress is not None:
                    progress.update(1)
            table.append(row)
        seconds.append(table)
    return LatencyProfile(list(contexts), list(batch_sizes), list(ks), seconds,
                          prefill_per_token=statistics.median(prefill) if prefill else 0.0)


def profile_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, and max_batch_size (the same doubling as the tree buckets)."""
    return list(tree_buckets(max_batch_size))


def make_policy(serving: ServingConfig, tree_depth: int, profile_fn=None):
    """FixedK or SmartSpec from the config. profile_fn(ks) -> LatencyProfile measures one when none is saved."""
    if serving.policy is ServingPolicy.fixed or tree_depth == 0:
        k = serving.k if serving.policy is ServingPolicy.fixed else 0
        return FixedK(None if k is None else min(k, tree_depth))
    max_k = tree_depth if serving.max_k is None else min(serving.max_k, tree_depth)
    return SmartSpec(profile_fn(list(range(max_k + 1))), max_k, serving.alpha_prior, serving.prior_steps,
                     serving.no_spec_bias)
