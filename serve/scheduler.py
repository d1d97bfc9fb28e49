"""Continuous batching for serving: a background thread drives the one batched step (runtime.decode.Engine).

Between steps the scheduler takes new requests into free rows (first come, first served), prefills at most
`serving.prefill_chunk` prompt tokens (so a long prompt does not stall the decoding rows; its prefill is
spread over steps), asks the speculation policy (serve/smartspec.py: fixed k or SmartSpec) for this step's
k, runs `Engine.step`, and hands every request its new tokens through `Job.on_event` (called on the
scheduler thread). A finished or cancelled request's row goes to the next waiting one. Requests beyond
`serving.max_queue` waiting are refused (`QueueFull`); bad prompts are refused at `submit` (`InputError`).

Each request has its own sampling parameters and seed (generators derived from it as in `Runtime.request`),
so its output is the same as alone: greedy bitwise under any policy; sampled for the same seed under a
fixed k (SmartSpec's k depends on the load, which changes how many draws a step makes, not the output
distribution).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from runtime.decode import DecodeResult, Engine, Request
from runtime.sampling import SamplingParams
from serve.smartspec import PROFILE_DIR, LatencyProfile, machine_tag, make_policy, profile_batch_sizes, profile_engine
from spec_compiler.errors import InputError
from spec_compiler.schema import DEFAULT_PROMPT, ServingConfig
from spec_compiler.validate import resolve_path


class QueueFull(Exception):
    """serving.max_queue requests are already waiting."""


@dataclass(eq=False)
class Job:
    """One completion request and what the scheduler reports back."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    on_event: Optional[Callable[["Job", list[int], bool], None]] = None
    """Called on the scheduler thread with each step's new token ids, and done=True once at the end."""
    id: int = -1
    output_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    """'eos' | 'max_new_tokens' | 'context' | 'cancelled' | 'error'."""
    result: Optional[DecodeResult] = None
    t_submit: float = 0.0
    t_first_token: Optional[float] = None
    t_done: Optional[float] = None
    request: Optional[Request] = None
    """The engine's request while the job is admitted."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Stats:
    """Counters behind /metrics."""

    def __init__(self, depth: int):
        self.requests_total = 0
        self.rejected_total = 0
        self.finished = collections.Counter()
        self.tokens_total = 0
        self.steps = 0
        self.row_steps = 0
        self.step_tokens = 0
        self.hit, self.tried = [0] * depth, [0] * depth
        self.step_time = 0.0
        self.goodput = 0.0
        self.busy_time = 0.0

    def step(self, rows: list[Request], dt: float) -> None:
        n = 0
        for r in rows:
            res = r.result
            if not res.accept_lengths:
                continue
            n += res.accept_lengths[-1]
            a, d = res.accepted_drafts[-1], res.draft_depths[-1]
            for j in range(min(d, len(self.hit))):
                self.tried[j] += 1
                self.hit[j] += a > j
        self.steps += 1
        self.row_steps += len(rows)
        self.step_tokens += n
        self.busy_time += dt
        ema = 0.1 if self.steps > 1 else 1.0
        self.step_time += ema * (dt - self.step_time)
        self.goodput += ema * (n / max(dt, 1e-9) - self.goodput)


class Scheduler:
    def __init__(self, runtime, serving: ServingConfig, profile_prompt: str = DEFAULT_PROMPT):
        """runtime: a runtime.load.Runtime (its caches are resized to serving.max_batch_size rows)."""
        self.rt = runtime.with_batch_size(serving.max_batch_size)
        self.serving = serving
        self.engine: Engine = self.rt.engine(defer_drafter=True)  # a k = 0 step (SmartSpec, serving.k=0) drafts nothing
        self.engine.prefill_chunk = serving.prefill_chunk
        self.depth = self.rt.plan.tree_depth
        self._profile_ids = self.rt.tokenizer.encode(profile_prompt).ids
        self.policy = make_policy(serving, self.depth, self._profile)
        self.counters = Stats(self.depth)
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cancels: list[Job] = []
        self._running: dict[int, Job] = {}  # id(request) -> job
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self.k: Optional[int] = None
        """The speculation length of the last step (None: the whole tree)."""

    # ---- latency profile (SmartSpec) ------------------------------------------------------------------
    def profile_path(self) -> Path:
        if self.serving.profile is not None:
            return Path(resolve_path(self.serving.profile))
        plan = self.rt.plan
        return PROFILE_DIR / f"{plan.readable_name}-{machine_tag()}-B{self.serving.max_batch_size}.json"

    def _profile(self, ks: list[int]) -> LatencyProfile:
        path = self.profile_path()
        if path.exists():
            prof = LatencyProfile.load(path)
            if prof is not None and set(ks) <= set(prof.ks) and prof.batch_sizes[-1] >= self.serving.max_batch_size:
                return prof
        sizes = profile_batch_sizes(self.serving.max_batch_size)
        steps = self.serving.profile_steps
        n = (max(ks) + 1) * (steps + 2)  # enough budget that no row finishes while timed
        top = self.rt.plan.max_seq_len - n - 1
        contexts = sorted({max(1, min(c, top)) for c in (128, 512)})  # the step cost grows with the context

        def make(ctx, i):
            return self._request(Job((self._profile_ids * ctx)[:ctx], n, seed=i))

        total = len(contexts) * len(sizes) * len(ks)
        with tqdm(total=total, desc=f"profiling step latency -> {path.name}", leave=False) as bar:
            prof = profile_engine(self.engine, make, contexts, sizes, ks, steps, bar)
        prof.meta = {"plan": self.rt.plan.readable_name, "machine": machine_tag(), "steps_per_cell": steps,
                     "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
        prof.save(path)
        return prof

    # ---- client side (any thread) --------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        if not job.prompt_ids:
            raise InputError("prompt", "is empty after tokenization")
        limit = self.rt.plan.max_seq_len
        if len(job.prompt_ids) >= limit:
            raise InputError("prompt", f"{len(job.prompt_ids)} tokens do not fit the context "
                             f"(target.max_seq_len={limit} leaves no room to generate)")
        if job.max_new_tokens < 1:
            raise InputError("max_tokens", "must be >= 1", job.max_new_tokens)
        with self._lock:
            if len(self._waiting) >= self.serving.max_queue:
                self.counters.rejected_total += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting (serving.max_queue="
                                f"{self.serving.max_queue})")
            job.id = next(self._ids)
            job.t_submit = time.perf_counter()
            self.counters.requests_total += 1
            self._waiting.append(job)
            self._lock.notify()
        return job

    def cancel(self, job: Job) -> None:
        with self._lock:
            if not job.done:
                self._cancels.append(job)
                self._lock.notify()

    def start(self) -> "Scheduler":
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="spec-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        """The scheduler thread is running (GET /health)."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        """The metrics /metrics exposes."""
        s = self.counters
        with self._lock:
            queue = len(self._waiting)
        return {
            "requests_total": s.requests_total, "rejected_total": s.rejected_total,
            "finished_by_reason": dict(s.finished), "running": len(self._running), "queue_length": queue,
            "tokens_total": s.tokens_total, "steps": s.steps,
            "tau": s.step_tokens / max(1, s.row_steps),
            "per_position_acceptance": [h / t if t else 0.0 for h, t in zip(s.hit, s.tried)],
            "goodput_tok_s": s.goodput, "step_time_s": s.step_time, "busy_time_s": s.busy_time,
            "k": self.depth if self.k is None else self.k, "max_batch_size": self.serving.max_batch_size,
            "policy": self.serving.policy.value,
        }

    # ---- the loop (scheduler thread) -----------------------------------------------------------------
    def _request(self, job: Job) -> Request:
        req = self.rt.request(job.prompt_ids, job.max_new_tokens, job.seed)
        return dataclasses.replace(req, sampling=job.sampling)

    def _emit(self, job: Job, new: list[int], finished: bool) -> None:
        if new:
            if job.t_first_token is None:
                job.t_first_token = time.perf_counter()
            job.output_ids += new
        if finished:
            job.t_done = time.perf_counter()
            self.counters.finished[job.finish_reason] += 1
        if job.on_event is not None and (new or finished):
            try:
                job.on_event(job, new, finished)
            except Exception:  # a client's callback must not stop the server
                traceback.print_exc()

    def _finish(self, job: Job, reason: str, new: list[int] = ()) -> None:
        job.finish_reason = reason
        if job.request is not None:
            self._running.pop(id(job.request), None)
            job.result = job.request.result
        self._emit(job, list(new), True)

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                while not (self._stop or self._waiting or self._cancels or eng.rows or eng.prefilling):
                    self._lock.wait()
                if self._stop:
                    break
                cancels, self._cancels = self._cancels, []
                free = eng.capacity_rows - len(eng.rows) - len(eng.prefilling)
                admit = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
                for job in cancels:
                    if job in self._waiting:
                        self._waiting.remove(job)
            try:
                self._cycle(cancels, admit)
            except Exception:  # keep serving: fail what was in flight, free every row
                traceback.print_exc()
                for job in list(self._running.values()):
                    eng.cancel(job.request)
                    self._finish(job, "error")
        for job in list(self._running.values()) + list(self._waiting):
            if job.request is not None and (job.request in eng.rows or job.request in eng.prefilling):
                eng.cancel(job.request)
            self._finish(job, "cancelled")
        self._waiting.clear()

    def _cycle(self, cancels: list[Job], admit: list[Job]) -> None:
        eng = self.engine
        for job in cancels:
            if job.done:
                continue
            if job.request is not None:
                eng.cancel(job.request)
            self._finish(job, "cancelled")
        for job in admit:
            if job.done:  # cancelled in the same cycle that took it from the queue
                continue
            job.request = self._request(job)
            eng.admit(job.request)
            self._running[id(job.request)] = job
        eng.prefill(self.serving.prefill_chunk or None)
        if not eng.rows:
            return
        rows = list(eng.rows)
        pending = getattr(eng.drafter, "pending_prefill", None)
        self.k = self.policy.choose(rows, None if pending is None else pending(rows))
        t0 = time.perf_counter()
        done = eng.step(None if self.k is None else [self.k] * len(rows))
        dt = time.perf_counter() - t0
        self.policy.observe(rows)
        self.counters.step(rows, dt)
        finished = {id(r) for r in done}
        for r in rows:
            job = self._running[id(r)]
            new = r.result.output_ids[len(job.output_ids):]
            self.counters.tokens_total += len(new)
            if id(r) in finished:
                self._finish(job, r.result.stop_reason, new)
            else:
                self._emit(job, new, False)
