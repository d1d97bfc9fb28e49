"""The load benchmark (`task=loadtest`): latency under Poisson arrivals, each serving policy side by side.

Every `task.loadtest.policies` entry gets its config (the run's plus the policy's overrides), a runtime, a
scheduler and an HTTP server on 127.0.0.1 (a free port), all started (and warmed up with `warmup` requests sent
one by one) before anything is measured. Then for each rate and each of `repeats` repeats, every policy in turn
(the order rotated per repeat, so no policy always runs first) gets `num_requests` streamed /v1/completions
requests whose arrival times are a Poisson process (exponential gaps, seeded per rate and repeat: the same
arrivals and prompts for every policy). Interleaving the policies per repeat keeps a slow drift of a shared
machine out of their ratios; the servers not being measured sit idle.

The client runs in another process (`ClientProcess`: httpx over real HTTP), so its event loop and JSON parsing
do not take the server process's GIL from the scheduler thread. Per (policy, rate), pooled over the repeats:
mean / p50 / p99 latency, time to first token, throughput, tau (completion tokens / decode steps, from
/metrics), and each repeat's mean latency. Writes loadtest.json, loadtest.md and loadtest.png (latency vs rate)
after every rate.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import numpy as np

from spec_compiler.errors import ConfigError
from spec_compiler.schema import LoadPolicy, SpecConfig


@dataclass
class Sent:
    """One request of a run, as the client saw it (seconds from the run's start)."""

    t_send: float
    t_first: Optional[float] = None
    t_done: Optional[float] = None
    completion_tokens: int = 0
    status: int = 0
    """HTTP status (0: no response, e.g. timed out)."""


def arrivals(rate: float, n: int, seed: int | str) -> list[float]:
    """n Poisson arrival times at `rate` per second, from 0."""
    rng = random.Random(f"{seed}:{rate}")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def drive(url: str, model: str, prompts: list[str], times: list[float], max_tokens: int,
                timeout: float, headers: Optional[dict] = None) -> list[Sent]:
    """Send prompts[i] at times[i] (streamed, greedy unless the server's sampling says otherwise)."""
    sent = [Sent(t) for t in times]

    async def one(client: httpx.AsyncClient, i: int, t0: float) -> None:
        s = sent[i]
        await asyncio.sleep(max(0.0, t0 + s.t_send - time.perf_counter()))
        s.t_send = time.perf_counter() - t0  # the actual send time
        body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
                s.status = r.status_code
                if r.status_code != 200:
                    await r.aread()
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if s.t_first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        s.t_first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        s.completion_tokens = chunk["usage"]["completion_tokens"]
                s.t_done = time.perf_counter() - t0
                if s.t_first is None:
                    s.t_first = s.t_done
        except httpx.HTTPError:
            s.status = 0

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i, t0) for i in range(len(times))))
    return sent


def scrape(url: str) -> dict[str, float]:
    from serve.server import parse_prometheus
    return parse_prometheus(httpx.get(f"{url}/metrics", timeout=30).text)


def summarize(policy: str, rate: float, runs: list[tuple[list[Sent], dict, dict]]) -> dict:
    """One row from the repeats of (policy, rate): each run's requests and the /metrics before and after it."""
    def done(run: list[Sent]) -> list[Sent]:
        return [s for s in run if s.status == 200 and s.t_done is not None]

    sent = [s for run, _, _ in runs for s in run]
    ok = done(sent)
    lat = np.array([s.t_done - s.t_send for s in ok]) if ok else np.array([np.nan])
    ttft = np.array([s.t_first - s.t_send for s in ok]) if ok else np.array([np.nan])
    tokens = sum(s.completion_tokens for s in ok)
    # each repeat's busy span (first send to last done), summed
    span = sum(max(s.t_done for s in done(run)) - min(s.t_send for s in run) for run, _, _ in runs if done(run))
    keys = ("spec_completion_tokens_total", "spec_request_steps_total")
    d = {k: sum(after.get(k, 0.0) - before.get(k, 0.0) for _, before, after in runs) for k in keys}
    per_repeat = [float(np.mean([s.t_done - s.t_send for s in done(run)])) if done(run) else float("nan")
                  for run, _, _ in runs]
    return {
        "policy": policy, "rate": rate, "repeats": len(runs), "requests": len(sent), "completed": len(ok),
        "failed": len(sent) - len(ok),
        "latency_mean": float(lat.mean()), "latency_p50": float(np.percentile(lat, 50)),
        "latency_p99": float(np.percentile(lat, 99)), "latency_mean_per_repeat": per_repeat,
        "ttft_mean": float(ttft.mean()), "ttft_p50": float(np.percentile(ttft, 50)),
        "ttft_p99": float(np.percentile(ttft, 99)),
        "throughput_tok_s": tokens / span if span > 0 else 0.0,
        "achieved_rate": len(ok) / span if span > 0 else 0.0,
        "tau": d["spec_completion_tokens_total"] / max(1.0, d["spec_request_steps_total"]),
        "completion_tokens": tokens,
    }


def _drive_in_child(url: str, model: str, prompts: list[str], times: list[float], max_tokens: int,
                    timeout: float) -> list[dict]:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return [dataclasses.asdict(s) for s in asyncio.run(drive(url, model, prompts, times, max_tokens, timeout))]


class ClientProcess:
    """The load generator in its own process (spawned once, reused for every run): `drive` there, `Sent` back."""

    def __init__(self):
        import concurrent.futures
        import multiprocessing
        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def drive(self, url: str, model: str, prompts: list[str], times: list[float], max_tokens: int,
              timeout: float) -> list[Sent]:
        rows = self.pool.submit(_drive_in_child, url, model, prompts, times, max_tokens, timeout).result()
        return [Sent(**r) for r in rows]

    def __enter__(self) -> "ClientProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def policy_config(cfg_overrides: list[str], policy: LoadPolicy, index: int) -> SpecConfig:
    """The run's config with the policy's overrides after the run's own (Hydra composition, as on the CLI)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import main
    overrides = list(cfg_overrides) + list(policy.overrides)
    saved = HydraConfig.instance().cfg  # compose() replaces the job's Hydra config, which lacks runtime.output_dir
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra job
            composed = compose(config_name="config", overrides=overrides)
        else:
            with initialize_config_dir(config_dir=str(main.CONF_DIR), version_base="1.3"):
                composed = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"task.loadtest.policies[{index}].overrides", f"does not compose: {e}".split("\n")[0],
                          list(policy.overrides)) from None
    finally:
        HydraConfig.instance().cfg = saved
    return main.to_spec(composed)


def run_loadtest(cfg: SpecConfig, job) -> dict:
    import contextlib

    from aot.build import open_runtime
    from runtime.device import host
    from runtime.tasks import _environment, hydra_overrides
    from serve.scheduler import Scheduler
    from serve.server import BackgroundServer, ServerConfig, create_app
    from spec_compiler.plan import make_plan
    from spec_compiler.validate import validate

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise (Hydra logs INFO)
    lt, out = cfg.task.loadtest, job.out
    out.mkdir(parents=True, exist_ok=True)
    texts = [q.turns[0] for q in job.questions]
    run_overrides = hydra_overrides()
    # Every policy's config and plan first: a policy that does not compose or validate fails before any runs.
    specs = [policy_config(run_overrides, policy, i) for i, policy in enumerate(lt.policies)]
    plans_of = [make_plan(validate(spec, host())) for spec in specs]
    rows, plans, env = [], {}, None
    import fastapi
    import uvicorn
    names = [p.name for p in lt.policies]
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(ClientProcess())
        servers = {}
        for policy, spec, plan in zip(lt.policies, specs, plans_of):
            serving = {k: getattr(v, "value", v) for k, v in dataclasses.asdict(spec.serving).items()}
            plans[policy.name] = {"plan": plan.name, "plan_hash": plan.plan_hash(),
                                  "overrides": list(policy.overrides), "serving": serving}
            rt = open_runtime(spec, plan, spec.serving.max_batch_size)
            env = env or {**_environment(rt), "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
                          "httpx": httpx.__version__}
            scheduler = Scheduler(rt, spec.serving)
            scheduler.start()
            stack.callback(scheduler.stop)
            srv = stack.enter_context(BackgroundServer(create_app(rt, scheduler, ServerConfig(plan.name))))
            servers[policy.name] = (srv, plan.name)
            for w in range(lt.warmup):
                client.drive(srv.url, plan.name, [texts[w % len(texts)]], [0.0], cfg.task.max_new_tokens,
                             lt.request_timeout_s)
        for rate in lt.rates:
            runs: dict[str, list] = {n: [] for n in names}
            for rep in range(lt.repeats):
                key = lt.seed if rep == 0 else f"{lt.seed}:{rep}"
                draw = random.Random(key)
                prompts = [draw.choice(texts) for _ in range(lt.num_requests)]
                times = arrivals(rate, lt.num_requests, key)
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    srv, model = servers[name]
                    before = scrape(srv.url)
                    sent = client.drive(srv.url, model, prompts, times, cfg.task.max_new_tokens,
                                        lt.request_timeout_s)
                    runs[name].append((sent, before, scrape(srv.url)))
            for name in names:
                row = summarize(name, rate, runs[name])
                rows.append(row)
                print(f"{name:>12} rate {rate:g}/s: mean {row['latency_mean']:.2f}s p99 "
                      f"{row['latency_p99']:.2f}s ttft {row['ttft_mean']:.2f}s {row['throughput_tok_s']:.0f} tok/s "
                      f"tau {row['tau']:.2f}" + (f" ({row['failed']} failed)" if row["failed"] else ""), flush=True)
            md = write_report(out, env, cfg, lt, texts, plans, rows)  # finished rates are on disk before the next
    print(md)
    print(f"loadtest: {out / 'loadtest.md'}")
    return {"task": "loadtest", "rows": rows}


def write_report(out: Path, env: dict, cfg: SpecConfig, lt, texts: list[str], plans: dict, rows: list[dict]) -> str:
    """loadtest.json / .md / .png of the policies run so far; returns the markdown."""
    for r in rows:  # each policy's mean latency over the best at the same rate
        best = min(x["latency_mean"] for x in rows if x["rate"] == r["rate"])
        r["vs_best"] = r["latency_mean"] / best if best > 0 else float("nan")
    report = {"environment": env, "max_new_tokens": cfg.task.max_new_tokens, "num_requests": lt.num_requests,
              "repeats": lt.repeats, "rates": list(lt.rates), "seed": lt.seed, "num_prompts": len(texts), "policies": plans, "rows": rows}
    (out / "loadtest.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "loadtest.md").write_text(md)
    plot(rows, out / "loadtest.png")
    return md


COLS = [("rate /s", "rate"), ("policy", "policy"), ("mean s", "latency_mean"), ("p50 s", "latency_p50"),
        ("p99 s", "latency_p99"), ("TTFT mean s", "ttft_mean"), ("TTFT p99 s", "ttft_p99"),
        ("tok/s", "throughput_tok_s"), ("req/s", "achieved_rate"), ("tau", "tau"), ("vs best", "vs_best"),
        ("per repeat s", "per_repeat"), ("failed", "failed")]


def markdown(report: dict) -> str:
    from runtime.tasks import markdown_table
    env = report["environment"]
    rows = sorted(report["rows"], key=lambda r: (r["rate"], list(report["policies"]).index(r["policy"])))
    rows = [dict(r, per_repeat=" / ".join(f"{x:.3f}" for x in r.get("latency_mean_per_repeat", []))) for r in rows]
    reps = report.get("repeats", 1)
    lines = [f"# loadtest", "",
             f"{report['num_requests']} streamed requests per rate and repeat, {reps} repeat(s) with every policy in "
             f"turn (rotated order; Poisson arrivals and prompts seeded per repeat from seed {report['seed']}, the "
             f"same for every policy), max_tokens={report['max_new_tokens']}, prompts drawn from "
             f"{report['num_prompts']}; the client runs in its own process. Latency = send to last token, TTFT = "
             "send to the first text, both pooled over the repeats (per repeat: each repeat's mean latency); tok/s = "
             "completion tokens / busy time (first send to last done, summed over repeats); tau = completion tokens "
             "/ decode steps; vs best = mean latency over the best policy's at that rate.", "",
             f"Machine: {env['machine']}; python {env['python']}; torch {env['torch']}; fastapi {env['fastapi']}; "
             f"uvicorn {env['uvicorn']}; httpx {env['httpx']}; device {env['device']}; {env['threads']} threads; "
             f"command: `{env['command']}`", "",
             "Policies: " + "; ".join(f"{k} = `{' '.join(v['overrides']) or '(the run config)'}` ({v['plan']})"
                                      for k, v in report["policies"].items()), "",
             "Serving: " + "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v["serving"].items() if b is not None)
                                     for k, v in report["policies"].items()), "",
             markdown_table(rows, COLS)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in dict.fromkeys(r["policy"] for r in rows):
        rs = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["rate"])
        a.plot([r["rate"] for r in rs], [r["latency_mean"] for r in rs], marker="o", label=name)
        b.plot([r["rate"] for r in rs], [r["latency_p99"] for r in rs], marker="o", label=name)
    for ax, title in ((a, "mean latency"), (b, "p99 latency")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
