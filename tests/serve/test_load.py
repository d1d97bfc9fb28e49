"""Cancellations and a full queue under load (tests/serve/test_scheduler.py has the plain 1000-request run):
bursts of random requests (prompts, budgets, sampling parameters) against a short queue, retried on
QueueFull, and 1 in 10 cancelled while waiting or running. None is lost or duplicated; each job's events add
up to its output and end with exactly one done; a cancelled job stops with a prefix of its output; every
other greedy output equals the runtime's single-request output and every sampled one the same job run
alone (same seed)."""
from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

from runtime.sampling import SamplingParams
from serve.scheduler import Job, QueueFull
from tests.serve.conftest import make_scheduler

N = 300
MAX_NEW = 10
ROWS = 8


def test_cancel_and_full_queue_under_load(runtime, alone, spec):
    rng = random.Random(0)
    eos = set(alone.eos_ids)
    pool = [[rng.randrange(256) for _ in range(rng.randint(1, 20))] for _ in range(16)]
    greedy_ref = [alone.generate(p, MAX_NEW).output_ids for p in pool]
    acceptance = runtime.sampling.acceptance
    sampled = [(rng.randrange(len(pool)), SamplingParams(rng.choice([0.6, 1.0, 1.5]), rng.choice([0, 8]),
                                                         rng.choice([1.0, 0.9]), acceptance),
                rng.randrange(1 << 30), rng.randint(1, MAX_NEW)) for _ in range(10)]
    scheduler = make_scheduler(runtime.with_batch_size(ROWS), spec, max_queue=8)
    scheduler.start()
    try:
        def run_alone(p, sp, seed, n):
            done = threading.Event()
            job = scheduler.submit(Job(list(pool[p]), n, sp, seed=seed, on_event=lambda j, new, d: d and done.set()))
            assert done.wait(60)
            return list(job.output_ids)
        sampled_ref = [run_alone(*s) for s in sampled]

        events = defaultdict(list)
        lock = threading.Lock()

        def on_event(job, new, done):
            with lock:
                events[id(job)].append((list(new), done))

        jobs, specs, cancelled = [], [], set()
        for i in range(N):
            if rng.random() < 0.65:  # greedy: any budget (the seed plays no part)
                p, n = rng.randrange(len(pool)), rng.randint(1, MAX_NEW)
                specs.append(("greedy", p, n))
                jobs.append(Job(list(pool[p]), n, SamplingParams(0.0, 0, 1.0, acceptance), seed=rng.randrange(99),
                                on_event=on_event))
            else:
                s = rng.randrange(len(sampled))
                p, sp, seed, n = sampled[s]
                specs.append(("sampled", s, n))
                jobs.append(Job(list(pool[p]), n, sp, seed=seed, on_event=on_event))
        to_cancel = set(rng.sample(range(N), N // 10))

        full = 0
        for i, job in enumerate(jobs):
            if rng.random() < 0.05:
                time.sleep(rng.expovariate(1 / 0.02))  # an idle gap now and then; otherwise bursts
            while True:
                try:
                    scheduler.submit(job)
                    break
                except QueueFull:
                    full += 1
                    time.sleep(0.002)
            if i in to_cancel:
                if rng.random() < 0.5:
                    time.sleep(0.003)
                scheduler.cancel(job)
                cancelled.add(i)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with lock:
                finished = sum(1 for j in jobs if events[id(j)] and events[id(j)][-1][1])
            if finished == N:
                break
            time.sleep(0.02)
        assert finished == N, f"{N - finished} jobs never finished"
    finally:
        scheduler.stop()

    assert len({j.id for j in jobs}) == N  # no duplicates
    stats = scheduler.stats()
    assert stats["running"] == 0 and stats["queue_length"] == 0
    for i, (job, (kind, a, n)) in enumerate(zip(jobs, specs)):
        evs = events[id(job)]
        assert [d for _, d in evs].count(True) == 1 and evs[-1][1], (i, evs)
        assert [t for new, _ in evs for t in new] == job.output_ids, i
        want = greedy_ref[a][:n] if kind == "greedy" else sampled_ref[a]
        if job.finish_reason == "cancelled":
            assert i in cancelled and job.output_ids == want[:len(job.output_ids)], i
            continue
        assert job.output_ids == want, (i, kind, job.finish_reason)
        assert job.finish_reason == ("eos" if want and want[-1] in eos else "max_new_tokens"), i
    assert sum(j.finish_reason == "cancelled" for j in jobs) >= 1 and full > 0  # both paths were taken
    assert stats["finished_by_reason"].get("cancelled", 0) >= sum(j.finish_reason == "cancelled" for j in jobs)
