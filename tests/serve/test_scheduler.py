"""The serving scheduler (serve/scheduler.py) over the one batched step, and the engine's admission API it uses.

- Chunked prefill interleaved with decode steps, cancellation of decoding and prefilling requests: every
  row's cache still equals a fresh prefill, and every other request's output is unchanged.
- 1000 requests with random prompts, budgets, sampling parameters and arrival times through the scheduler
  thread: none lost or duplicated, each equal to its single-request output (greedy: also under SmartSpec;
  sampled: same seed under a fixed k).
- Queue limit and bad prompts refused at submit; SmartSpec picks k = 0 for a drafter that never agrees and
  the maximum k for an exact copy of the target.
"""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import main
from runtime.batch import Block
from runtime.decode import Engine
from runtime.load import load
from runtime.sampling import SamplingParams
from serve.scheduler import Job, QueueFull, Scheduler
from serve.smartspec import Acceptance, LatencyProfile, SmartSpec, expected_tokens
from spec_compiler.errors import InputError
from spec_compiler.schema import ServingConfig, ServingPolicy
from tests.conftest import compose_config

MAX_SEQ = 96


def runtime_for(drafter: str = "noisy_copy", tree: str = "chain", extra: tuple = (), batch: int = 1):
    cfg = compose_config([f"drafter={drafter}", f"tree={tree}", f"target.max_seq_len={MAX_SEQ}", *extra])
    spec, plan, _ = main.prepare(cfg, in_run=False)
    return load(plan, batch)


SMALL = ("target.model.hidden_size=32", "target.model.num_layers=2", "target.model.intermediate_size=64", "tree.k=3")


@pytest.fixture(scope="module")
def rt():
    return runtime_for(extra=SMALL)


def alone(rt, prompt, n, sampling=SamplingParams(), seed=0):
    req = rt.request(prompt, n, seed)
    req.sampling = sampling
    return rt.with_batch_size(1).engine().generate([req])[0].output_ids


def random_prompts(n, seed=0, vocab=257):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = [rng.randrange(vocab) for _ in range(rng.randint(2, 6))]
        out.append((base * 6)[:rng.randint(2, 40)])
    return out


# ---- engine admission ---------------------------------------------------------------------------------
def test_chunked_prefill_and_cancel_keep_every_row_exact(rt):
    """Prompts prefilled a few tokens per step while others decode, then a prefilling and a decoding request
    cancelled: the rest give their alone outputs, and every row's cache equals a fresh prefill after each step."""
    rt4 = rt.with_batch_size(4)
    checks = []

    def on_step(state):
        ref = rt4.target.new_cache(1, rt4.cache.capacity)
        ids = torch.tensor([state.tokens[:state.L]])
        block = Block.causal(0, state.L, 1, rt4.cache.capacity)
        rt4.target.hidden(ids, block.positions, ref, block, num_rows=0)
        L = state.L
        checks.append(torch.allclose(state.cache.k[:, :, :, :L], ref.k[:, :, :, :L], atol=1e-5, rtol=1e-5)
                      and torch.allclose(state.cache.v[:, :, :, :L], ref.v[:, :, :, :L], atol=1e-5, rtol=1e-5))

    eng = Engine(rt4.target, rt4.cache, rt4.drafter, max_seq_len=MAX_SEQ, eos_ids=rt4.eos_ids, prefill_chunk=4,
                 on_step=on_step)
    prompts = random_prompts(5, seed=3)
    budgets = [12, 12, 40, 12, 12]
    reqs = [rt4.request(p, n, seed=i) for i, (p, n) in enumerate(zip(prompts, budgets))]
    eng.add(reqs[0])
    steps_while_prefilling = 0
    for r in reqs[1:4]:
        eng.admit(r)
    while eng.prefilling:
        eng.prefill(3)
        if eng.rows:
            eng.step()
            steps_while_prefilling += 1
    assert steps_while_prefilling >= 3
    assert reqs[2] in eng.rows
    eng.cancel(reqs[2])                      # decoding
    eng.admit(reqs[4])
    eng.prefill(2)
    eng.cancel(reqs[4])                      # prefilling
    assert reqs[2].result.stop_reason == reqs[4].result.stop_reason == "cancelled"
    while eng.rows:
        eng.step()
    for i in (0, 1, 3):
        assert reqs[i].result.output_ids == alone(rt, prompts[i], 12, seed=i), i
    assert checks and all(checks)


# ---- the scheduler --------------------------------------------------------------------------------------
def run_jobs(sched: Scheduler, jobs: list[Job], gaps: list[float]) -> None:
    events: dict[int, list] = {}
    done = threading.Event()
    left = [len(jobs)]
    lock = threading.Lock()

    def on_event(job, new, finished):
        events.setdefault(job.id, []).extend(new)
        if finished:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    for job, gap in zip(jobs, gaps):
        job.on_event = on_event
        time.sleep(gap)
        sched.submit(job)
    assert done.wait(300), f"{left[0]} jobs never finished"
    for job in jobs:
        assert events.get(job.id, []) == job.output_ids  # streamed tokens = final tokens, none lost or repeated
        assert job.finish_reason in ("eos", "max_new_tokens", "context")


@pytest.mark.parametrize("policy", ["fixed", "smartspec"])
def test_many_requests_equal_alone(rt, policy, tmp_path):
    n = 1000 if policy == "fixed" else 200
    rng = random.Random(5)
    prompts = random_prompts(n, seed=7)
    flat_profile().save(tmp_path / "profile.json")  # drafting cheap enough that SmartSpec speculates
    serving = ServingConfig(policy=ServingPolicy(policy), max_batch_size=8, max_queue=n, prefill_chunk=16,
                            profile=str(tmp_path / "profile.json"))
    sched = Scheduler(rt, serving).start()
    jobs, gaps = [], []
    for i, p in enumerate(prompts):
        temp = 0.0 if (policy == "smartspec" or rng.random() < 0.5) else rng.choice([0.7, 1.0, 1.3])
        sp = SamplingParams(temp, rng.choice([0, 5]) if temp else 0, rng.choice([1.0, 0.9]) if temp else 1.0)
        jobs.append(Job(p, rng.randint(1, 8), sp, seed=rng.randrange(1000)))
        gaps.append(rng.expovariate(4000.0))
    try:
        run_jobs(sched, jobs, gaps)
    finally:
        sched.stop()
    assert len({j.id for j in jobs}) == n
    for j in jobs[:: (2 if policy == "smartspec" else 10)]:
        assert j.output_ids == alone(rt, j.prompt_ids, j.max_new_tokens, j.sampling, j.seed), j.id
    stats = sched.stats()
    assert stats["requests_total"] == n and sum(stats["finished_by_reason"].values()) == n
    assert stats["tau"] > 1.2  # the noisy copy agrees often


def test_queue_limit_and_bad_prompts(rt):
    sched = Scheduler(rt, ServingConfig(max_batch_size=1, max_queue=2))  # not started: nothing is taken
    sched.submit(Job([1, 2, 3], 4))
    sched.submit(Job([1, 2, 3], 4))
    with pytest.raises(QueueFull):
        sched.submit(Job([1, 2, 3], 4))
    with pytest.raises(InputError, match="prompt"):
        sched.submit(Job([], 4))
    with pytest.raises(InputError, match="context"):
        sched.submit(Job([1] * MAX_SEQ, 4))
    assert sched.stats()["rejected_total"] == 1 and sched.stats()["queue_length"] == 2


def test_cancel_frees_the_row(rt):
    sched = Scheduler(rt, ServingConfig(max_batch_size=1, max_queue=8)).start()
    try:
        first = threading.Event()
        long = Job(random_prompts(1, 1)[0], MAX_SEQ, on_event=lambda j, new, fin: first.set())
        sched.submit(long)
        assert first.wait(30)
        other = sched.submit(Job([5, 6, 7, 5, 6], 6))
        sched.cancel(long)
        deadline = time.time() + 30
        while not other.done and time.time() < deadline:
            time.sleep(0.01)
        assert long.finish_reason == "cancelled" and other.finish_reason == "max_new_tokens"
        assert other.output_ids == alone(rt, other.prompt_ids, 6)
    finally:
        sched.stop()


def test_profile_measured_once_and_reused(rt, tmp_path):
    serving = ServingConfig(policy=ServingPolicy.smartspec, max_batch_size=2, profile=str(tmp_path / "p.json"),
                            profile_steps=2)
    first = Scheduler(rt, serving).policy.profile
    assert first.batch_sizes == [1, 2] and first.ks == [0, 1, 2, 3]
    assert first.contexts == [MAX_SEQ - 4 * 4 - 1]  # 128 and 512 tokens do not fit: the longest that does
    assert all(t > 0 for table in first.seconds for row in table for t in row)
    again = Scheduler(rt, serving).policy.profile
    assert again.seconds == first.seconds  # loaded, not re-measured


# ---- SmartSpec ------------------------------------------------------------------------------------------
def flat_profile(draft_cost: float = 0.15, max_k: int = 4) -> LatencyProfile:
    """A step costs 1 + draft_cost per draft level (times a mild batch factor), at any context."""
    bs, ks = [1, 2, 4, 8], list(range(max_k + 1))
    table = [[(1 + 0.05 * b) * (1 + draft_cost * k) for k in ks] for b in bs]
    return LatencyProfile([64, 512], bs, ks, [table, table])


def test_latency_profile_interpolates():
    prof = LatencyProfile([100, 300], [1, 4], [0, 2], [[[1.0, 2.0], [4.0, 5.0]], [[3.0, 4.0], [6.0, 9.0]]])
    assert prof.predict(1, 0, 100) == pytest.approx(1.0) and prof.predict(4, 2, 300) == pytest.approx(9.0)
    assert prof.predict(2, 0, 100) == pytest.approx(2.0)   # linear in B
    assert prof.predict(1, 2, 200) == pytest.approx(3.0)   # linear in the context
    assert prof.predict(8, 0, 100) == pytest.approx(8.0)   # extended past the last batch size
    assert prof.predict(1, 1, 100) == pytest.approx(1.5)   # and between profiled k


def test_latency_fit_smooths_a_noisy_cell():
    """One cell timed 40 % low does not make its k look cheaper than a smaller k."""
    bs, ks = [1, 2, 4, 8], [0, 1, 2, 3]
    table = [[1 + 0.1 * b + (0.5 + 0.1 * b) * k for k in ks] for b in bs]
    table[3][2] *= 0.6
    prof = LatencyProfile([128], bs, ks, [table])
    assert prof.predict(8, 2) > prof.predict(8, 1) > prof.predict(8, 0)


def test_expected_tokens_and_estimator():
    assert expected_tokens(0.0, 4, 100) == 1.0 and expected_tokens(1.0, 4, 100) == 5.0
    assert expected_tokens(0.5, 4, 2) == pytest.approx(1.5)  # cut at the remaining budget
    a = Acceptance()
    for acc in (4, 4, 1, 0):
        a.observe(acc, 4)
    assert a.accepted == 9 and a.rejected == 2
    assert a.alpha(0.7, 1e-9) == pytest.approx(9 / 11)


@pytest.mark.parametrize("noise,expect", [(100.0, 0), (0.0, 4)])
def test_smartspec_k_follows_acceptance(noise, expect, tmp_path):
    """A drafter that never agrees (the target's weights drowned in noise) ends at k = 0, an exact copy of the
    target at the maximum k, after some steps of real decoding (measured acceptance), on a fixed cost profile."""
    rt = runtime_for(extra=(f"drafter.model.noise_std={noise}",))
    path = tmp_path / "profile.json"
    flat_profile(0.05).save(path)
    sched = Scheduler(rt, ServingConfig(policy=ServingPolicy.smartspec, max_batch_size=4, profile=str(path),
                                        prior_steps=0.5))
    assert isinstance(sched.policy, SmartSpec) and sched.policy.max_k == 4
    ks = []
    eng = sched.engine
    rng = random.Random(2)
    for i in range(4):
        eng.add(sched._request(Job([rng.randrange(257) for _ in range(8)], 80)))
    while eng.rows and len(ks) < 40:
        rows = list(eng.rows)
        ks.append(sched.policy.choose(rows))
        eng.step([ks[-1]] * len(rows))
        sched.policy.observe(rows)
    assert ks[0] == 4 and ks[-1] == expect, ks


def test_smartspec_charges_the_deferred_drafter_prefill():
    """Switching to k > 0 prefills every drafter row that waited at k = 0: charged amortised over the row's steps
    left, it keeps k = 0 for a short remainder and a long wait, and is no obstacle when nothing is pending or the
    request has far to go."""
    prof = flat_profile(0.05)
    prof.prefill_per_token = 0.05  # a 300-token prefill costs ~14 steps
    pol = SmartSpec(prof, 4, alpha_prior=0.8, prior_steps=50.0)

    class Row:
        def __init__(self, remaining):
            self.max_new_tokens, self.emitted, self.tokens, self.acceptance = remaining, 0, [1] * 300, None
    short, long_ = [Row(8)], [Row(5000)]
    assert pol.choose(short) == 4 and pol.choose(short, [0]) == 4  # nothing pending: speculate
    assert pol.choose(short, [300]) == 0  # 300 tokens to prefill for 8 tokens to go: not worth it
    assert pol.choose(long_, [300]) == 4  # amortised over ~1000 steps: worth it


def test_profile_measures_the_deferred_prefill(rt, tmp_path):
    """The profile's first k > 0 step of each cell prefills the deferred drafter rows; its excess per token is
    prefill_per_token (> 0), saved and loaded with the table."""
    from serve.smartspec import profile_engine
    rt = rt.with_batch_size(2)
    eng = rt.engine(defer_drafter=True)
    rng = random.Random(0)

    def make(ctx, i):
        return rt.request([rng.randrange(257) for _ in range(ctx)], 40)
    prof = profile_engine(eng, make, [48], [1, 2], [0, 2], 3)
    assert prof.prefill_per_token > 0
    prof.save(tmp_path / "p.json")
    assert LatencyProfile.load(tmp_path / "p.json").prefill_per_token == prof.prefill_per_token


@pytest.mark.parametrize("tree,depth", [("dynamic", 7), ("beam", 5), ("top3", 1)])
def test_serving_grown_and_static_trees(tree, depth, tmp_path):
    """SmartSpec's k ranges over the plan's tree depth for every policy; served outputs equal alone."""
    rt = runtime_for(tree=tree, extra=SMALL[:3] + (("tree.num_nodes=8",) if tree == "dynamic" else ()))
    flat_profile(0.05, max_k=depth).save(tmp_path / "p.json")
    sched = Scheduler(rt, ServingConfig(policy=ServingPolicy.smartspec, max_batch_size=2,
                                        profile=str(tmp_path / "p.json"))).start()
    try:
        assert sched.policy.max_k == depth == rt.plan.tree_depth
        assert sched.policy.profile.ks == list(range(depth + 1))  # the saved profile, not re-measured
        jobs = [sched.submit(Job(p, 12)) for p in random_prompts(3, seed=9)]
        deadline = time.time() + 60
        while not all(j.done for j in jobs) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        sched.stop()
    for j in jobs:
        assert j.output_ids == alone(rt, j.prompt_ids, 12)


@pytest.mark.parametrize("arg,key", [("serving.k=-1", "serving.k"), ("serving.max_batch_size=0", "serving.max_batch_size"),
                                     ("serving.max_queue=-1", "serving.max_queue"),
                                     ("serving.prefill_chunk=-5", "serving.prefill_chunk"),
                                     ("serving.alpha_prior=1.0", "serving.alpha_prior"),
                                     ("serving.prior_steps=0", "serving.prior_steps"),
                                     ("serving.profile_steps=0", "serving.profile_steps")])
def test_bad_serving_settings_exit_2_naming_the_key(arg, key, capsys, tmp_path):
    code = main.cli(["target=tiny_random", "drafter=noisy_copy", "task=serve", arg, f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {key}" in err and "Traceback" not in err, err
