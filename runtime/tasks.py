"""Tasks: `generate` (answers jsonl in Spec-Bench's format) and `bench` (baseline vs method, JSON + markdown +
plot), plus the multirun summary callback. Each returns a small result dict that `main.py` also writes
as `result.json`, which the sweep summary collects.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Optional

from hydra.experimental.callback import Callback

from runtime.decode import DecodeResult, per_position_acceptance
from runtime.drafters import NoDrafter
from runtime.load import Runtime
from spec_compiler.errors import InputError
from spec_compiler.prompts import Question, read_question_file
from spec_compiler.schema import DEFAULT_PROMPT, SpecConfig


def read_questions(cfg: SpecConfig) -> list[Question]:
    file = cfg.prompts if cfg.prompts is not None or cfg.prompt is not None else cfg.task.default_prompts
    key = "prompts" if cfg.prompts is not None else "task.default_prompts"
    if file is None:
        qs = [Question(0, "cli" if cfg.prompt is not None else "default",
                       (cfg.prompt if cfg.prompt is not None else DEFAULT_PROMPT,))]
    else:
        qs = read_question_file(file, key)
    if cfg.task.num_prompts > 0:
        qs = qs[:cfg.task.num_prompts]
    return qs


def answer(rt: Runtime, q: Question, max_new_tokens: int, seed: int) -> tuple[list[str], list[DecodeResult]]:
    """Decode every turn of a question; later turns see the earlier turns and the generated ids."""
    return answer_batch(rt, [q], max_new_tokens, seed)[0]


def answer_batch(rt: Runtime, qs: list[Question], max_new_tokens: int,
                 seed: int) -> list[tuple[list[str], list[DecodeResult]]]:
    """Every turn of every question, decoded `rt.batch_size` requests at a time: turn t of all questions
    together (each sees its own earlier turns and generated ids). Every request uses `seed`, so a
    question's answer does not depend on the batch it ran in."""
    contexts: list[list[int]] = [[] for _ in qs]
    out: list[tuple[list[str], list[DecodeResult]]] = [([], []) for _ in qs]
    for t in range(max(len(q.turns) for q in qs)):
        live = [i for i, q in enumerate(qs) if t < len(q.turns)]
        reqs = []
        for i in live:
            contexts[i] += rt.tokenizer.encode(("\n" if t else "") + qs[i].turns[t]).ids
            reqs.append(rt.request(contexts[i], max_new_tokens, seed))
        try:
            results = rt.generate_many(reqs)
        except InputError as e:
            bad = next((qs[i].question_id for i in live if len(contexts[i]) >= rt.plan.max_seq_len or not contexts[i]),
                       qs[live[0]].question_id)
            raise InputError(f"question {bad}", e.reason) from None
        for i, r in zip(live, results):
            contexts[i] += r.output_ids
            out[i][0].append(rt.tokenizer.decode(r.output_ids))
            out[i][1].append(r)
    return out


def _answer_row(rt: Runtime, q: Question, texts: list[str], results: list[DecodeResult]) -> dict:
    aid = hashlib.sha256(f"{rt.plan.plan_hash()}:{q.question_id}".encode()).hexdigest()[:22]
    return {
        "question_id": q.question_id, "category": q.category, "answer_id": aid, "model_id": rt.plan.name,
        "choices": [{
            "index": 0, "turns": texts,
            "new_tokens": [len(r.output_ids) for r in results],
            "wall_time": [r.wall_time for r in results],
            "accept_lengths": [r.accept_lengths for r in results],
            "decoding_steps": [r.steps for r in results],
            "output_ids": [r.output_ids for r in results],
        }],
        "tstamp": time.time(),
    }


def summarize(results: list[DecodeResult]) -> dict:
    new = sum(len(r.output_ids) for r in results)
    steps = sum(r.steps for r in results)
    wall = sum(r.wall_time for r in results)
    speeds = [len(r.output_ids) / r.wall_time for r in results if r.wall_time > 0]
    return {
        "new_tokens": new, "steps": steps, "tau": new / max(1, steps),
        "tokens_per_s": statistics.mean(speeds) if speeds else 0.0,
        "wall_time": wall,
        "draft_time": sum(r.draft_time for r in results), "verify_time": sum(r.verify_time for r in results),
        "other_time": sum(r.other_time for r in results),
        "per_position_acceptance": per_position_acceptance(results),
    }


def markdown_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list):
            return " ".join(f"{x:.2f}" for x in v)
        return str(v)
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(k, "")) for _, k in cols) + " |" for r in rows]
    return "\n".join(out)


SUMMARY_COLS = [("method", "method"), ("new tokens", "new_tokens"), ("steps", "steps"), ("tau", "tau"),
                ("tok/s", "tokens_per_s"), ("draft s", "draft_time"), ("verify s", "verify_time"),
                ("other s", "other_time"), ("accept/pos", "per_position_acceptance")]


def run_generate(rt: Runtime, cfg: SpecConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    qs = read_questions(cfg)
    results, rows = [], []
    step = rt.batch_size
    for lo in range(0, len(qs), step):  # a batch of questions at a time
        chunk = qs[lo:lo + step]
        for q, (texts, rs) in zip(chunk, answer_batch(rt, chunk, cfg.task.max_new_tokens, cfg.sampling.seed)):
            rows.append(_answer_row(rt, q, texts, rs))
            results += rs
    answers = out / f"answers-{rt.plan.readable_name}.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = {"method": rt.plan.name, **summarize(results)}
    if len(qs) == 1 and len(qs[0].turns) == 1:
        print(qs[0].turns[0] + rows[0]["choices"][0]["turns"][0])
        print()
    print(markdown_table([s], SUMMARY_COLS))
    print(f"answers: {answers}")
    return {"task": "generate", "plan_hash": rt.plan.plan_hash(), "answers": str(answers), **s}


def run_bench(rt: Runtime, cfg: SpecConfig, out: Path) -> dict:
    """Autoregressive baseline and the configured method on the same prompts, same target, same run."""
    out.mkdir(parents=True, exist_ok=True)
    qs = read_questions(cfg)
    methods = {"autoregressive": rt.with_drafter(NoDrafter()), rt.plan.name: rt}
    for _ in range(cfg.task.warmup):
        for m in methods.values():
            answer(m, qs[0], min(16, cfg.task.max_new_tokens), cfg.sampling.seed)
    per: dict[str, list[DecodeResult]] = {k: [] for k in methods}
    per_cat: dict[str, dict[str, list[DecodeResult]]] = {}
    equal = 0
    for q in qs:  # interleave methods per prompt (and per repeat) so machine noise hits both alike
        outs = {}
        for _ in range(cfg.task.repeats):
            for name, m in methods.items():
                texts, rs = answer(m, q, cfg.task.max_new_tokens, cfg.sampling.seed)
                per[name] += rs
                per_cat.setdefault(q.category, {}).setdefault(name, []).extend(rs)
                outs.setdefault(name, set()).add(json.dumps([r.output_ids for r in rs]))
        equal += len(set.union(*outs.values())) == 1  # every run of every method gave the same tokens
    rows = [{"method": k, **summarize(v)} for k, v in per.items()]
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base if base else 0.0
    cats = []
    for cat, d in per_cat.items():
        crow = [{"method": k, **summarize(v)} for k, v in d.items()]
        for r in crow:
            r["category"] = cat
            r["speedup"] = r["tokens_per_s"] / crow[0]["tokens_per_s"] if crow[0]["tokens_per_s"] else 0.0
        cats += crow
    env = _environment(rt)
    batch_rows = bench_batch_sizes(rt, qs, cfg) if cfg.task.batch_sizes else []
    report = {"plan": rt.plan.to_dict(), "plan_hash": rt.plan.plan_hash(), "environment": env,
              "num_prompts": len(qs), "repeats": cfg.task.repeats, "max_new_tokens": cfg.task.max_new_tokens,
              "greedy": rt.plan.greedy, "outputs_equal_to_baseline": f"{equal}/{len(qs)}",
              "methods": rows, "per_category": cats, "batch_sizes": batch_rows}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    cols = SUMMARY_COLS[:5] + [("speedup", "speedup")] + SUMMARY_COLS[5:]
    md = [f"# bench: {rt.plan.name}", "",
          f"{len(qs)} prompts{f' x {cfg.task.repeats} runs' if cfg.task.repeats > 1 else ''}, "
          f"max_new_tokens={cfg.task.max_new_tokens}, "
          f"{'greedy' if rt.plan.greedy else f'temperature={rt.plan.temperature}'}; "
          f"outputs equal to the baseline: {equal}/{len(qs)}", "",
          f"Machine: {env['machine']}; torch {env['torch']}; device {env['device']}; {env['threads']} threads; "
          f"command: `{env['command']}`", "",
          "CPU transforms: " + ("; ".join(f"{k}: {v}" for k, v in env["cpu_transforms"].items()) or "none"), "",
          markdown_table(rows, cols), "", "## Per category", "",
          markdown_table(cats, [("category", "category")] + cols)]
    if batch_rows:
        md += ["", "## Batch sizes", "",
               "tok/s = new tokens of all prompts / wall time of the batched run (continuous batching over "
               "chunks of 4 x batch prompts, both methods in turn per chunk); decode tok/s leaves out the "
               "prefills (one request per forward at every batch size).", "",
               markdown_table(batch_rows, BATCH_COLS)]
    (out / "bench.md").write_text("\n".join(md) + "\n")
    _plot(rows, out / "bench.png")
    if len(qs) == 1 and len(qs[0].turns) == 1:  # a single prompt (the demo): show what was generated
        print(qs[0].turns[0] + texts[0] + "\n")
    print("\n".join(md[2:]))
    print(f"bench: {out / 'bench.md'}")
    method = rows[-1]
    return {"task": "bench", "plan_hash": rt.plan.plan_hash(), **method}


BATCH_COLS = [("batch", "batch_size"), ("method", "method"), ("new tokens", "new_tokens"), ("tau", "tau"),
              ("tok/s", "throughput"), ("vs batch 1", "vs_batch_1"), ("vs AR", "speedup"),
              ("decode tok/s", "decode_throughput"), ("decode vs batch 1", "decode_vs_batch_1"),
              ("decode vs AR", "decode_speedup"), ("equal to batch 1", "equal_to_batch_1")]


def bench_batch_sizes(rt: Runtime, qs: list[Question], cfg: SpecConfig) -> list[dict]:
    """Aggregate throughput of the baseline and the method at every `task.batch_sizes` entry, same run: per
    batch size, both methods decode the same chunks of prompts in turn (interleaved per chunk)."""
    rows, first = [], {}
    for B in cfg.task.batch_sizes:
        sized = rt.with_batch_size(B)
        methods = {"autoregressive": sized.with_drafter(NoDrafter()),
                   rt.plan.name: sized}
        wall = {k: 0.0 for k in methods}
        res: dict[str, list[DecodeResult]] = {k: [] for k in methods}
        for lo in range(0, len(qs), 4 * B):  # chunks of 4B prompts: rows refill within a chunk
            chunk = qs[lo:lo + 4 * B]
            for name, m in methods.items():
                t0 = time.perf_counter()
                out = answer_batch(m, chunk, cfg.task.max_new_tokens, cfg.sampling.seed)
                wall[name] += time.perf_counter() - t0
                res[name] += [r for _, rs in out for r in rs]
        for name in methods:
            new = sum(len(r.output_ids) for r in res[name])
            ids = [r.output_ids for r in res[name]]
            decode_wall = wall[name] - sum(r.prefill_time for r in res[name])  # prefills run one request each
            first.setdefault(name, (new / wall[name], new / decode_wall, ids))
            rows.append({"batch_size": B, "method": name, "new_tokens": new,
                         "tau": new / max(1, sum(r.steps for r in res[name])), "throughput": new / wall[name],
                         "vs_batch_1": new / wall[name] / first[name][0], "decode_throughput": new / decode_wall,
                         "decode_vs_batch_1": new / decode_wall / first[name][1],
                         "equal_to_batch_1": ids == first[name][2]})
        rows[-1]["speedup"] = rows[-1]["throughput"] / rows[-2]["throughput"]
        rows[-1]["decode_speedup"] = rows[-1]["decode_throughput"] / rows[-2]["decode_throughput"]
        rows[-2]["speedup"] = rows[-2]["decode_speedup"] = 1.0
    return rows


def _environment(rt: Runtime) -> dict:
    import os
    import platform

    import torch
    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "torch": torch.__version__, "device": rt.plan.device,
            "threads": torch.get_num_threads(), "command": " ".join(["python main.py"] + hydra_overrides()),
            "cpu_transforms": {name: r.summary() for name, r in rt.transforms.items()}}


def hydra_overrides() -> list[str]:
    """The command-line overrides of the current Hydra job ([] outside one, e.g. in tests)."""
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.bar([r["method"][:24] for r in rows], [r["tokens_per_s"] for r in rows])
    a.set_ylabel("tokens/s")
    for r in rows[1:]:
        b.plot(range(1, len(r["per_position_acceptance"]) + 1), r["per_position_acceptance"], marker="o",
               label=r["method"][:24])
    b.set_xlabel("draft position")
    b.set_ylabel("acceptance")
    b.set_ylim(0, 1.05)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_sweep_summary(sweep_dir: Path) -> Optional[Path]:
    """Collect every job's result.json under a multirun directory into summary.md / summary.json."""
    rows = []
    for f in sorted(sweep_dir.glob("*/result.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        r = json.loads(f.read_text())
        r["job"] = f.parent.name
        rows.append(r)
    if not rows:
        return None
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    cols = [("job", "job"), ("overrides", "overrides")] + SUMMARY_COLS + [("speedup", "speedup")]
    table = markdown_table(rows, cols)
    (sweep_dir / "summary.md").write_text(table + "\n")
    print(table)
    return sweep_dir / "summary.md"


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write one summary table of all runs in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        write_sweep_summary(Path(config.hydra.sweep.dir))
