"""Tasks: `generate` (answers jsonl in Spec-Bench's format) and `bench` (baseline vs method, JSON + markdown +
plot), plus the multirun summary callback. Each returns a small result dict that `main.py` also writes
as `result.json`, which the sweep summary collects.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.experimental.callback import Callback
from tqdm import tqdm

from runtime.decode import DecodeResult, per_position_acceptance
from runtime.drafters import NoDrafter
from runtime.load import Runtime
from spec_compiler.errors import ConfigError, InputError
from spec_compiler.plan import Plan
from spec_compiler.prompts import Question, read_question_file, read_text
from spec_compiler.schema import DEFAULT_PROMPT, SpecConfig, TaskKind
from spec_compiler.validate import IneffectiveSettingWarning, resolve_path


def read_questions(cfg: SpecConfig) -> list[Question]:
    """The run's questions: `prompt`, `prompt_file` (one prompt, the whole file), `prompts` or the task's default."""
    if cfg.prompt is not None:
        qs = [Question(0, "cli", (cfg.prompt,))]
    elif cfg.prompt_file is not None:
        qs = [Question(0, "file", (read_text(cfg.prompt_file, "prompt_file"),))]
        if not qs[0].turns[0].strip():
            raise ConfigError("prompt_file", f"{resolve_path(cfg.prompt_file)}: the file is empty", cfg.prompt_file)
    elif cfg.prompts is not None:
        qs = read_question_file(cfg.prompts, "prompts")
    elif cfg.task.default_prompts is not None:
        qs = read_question_file(cfg.task.default_prompts, "task.default_prompts")
    else:
        qs = [Question(0, "default", (DEFAULT_PROMPT,))]
    if cfg.task.num_prompts > 0:
        qs = qs[:cfg.task.num_prompts]
    return qs


@dataclass
class Job:
    """What a task needs, checked before any model is loaded."""

    questions: list[Question]
    out: Path
    answers: Optional[Path] = None
    """generate: the answers jsonl (appended to, one flushed row per question)."""
    done: frozenset = frozenset()
    """generate with task.resume: question ids the answers file already holds."""


def prepare(cfg: SpecConfig, plan: Plan, out: Optional[Path]) -> Job:
    """Every check that needs no model: questions, prompt lengths, the output directory, the answers file
    (out=None: a run folder still to be made, so the last two are left to the run)."""
    qs = read_questions(cfg)
    _check_prompt_lengths(qs, plan, cfg)
    if out is not None:
        check_output_dir(out, "task.output_dir", cfg.task.output_dir)
    if cfg.task.kind is not TaskKind.generate or out is None:
        return Job(qs, out)
    answers = out / f"answers-{plan.readable_name}.jsonl"
    return Job(qs, out, answers, frozenset(answered(answers, cfg.task.resume)))


def _check_prompt_lengths(qs: list[Question], plan: Plan, cfg: SpecConfig) -> None:
    from spec_compiler.tokenizer import get_tokenizer
    tok, limit, new = get_tokenizer(plan.tokenizer), plan.max_seq_len, cfg.task.max_new_tokens
    short = 0
    for q in qs:
        n = len(tok.encode(q.turns[0]).ids)
        if n == 0:
            raise InputError(f"question {q.question_id}", "the prompt is empty after tokenization")
        if n >= limit:
            raise InputError(f"question {q.question_id}", f"the prompt's {n} tokens do not fit the context "
                             f"(target.max_seq_len={limit} leaves no room to generate)")
        short += n + new > limit
    if short and new < limit:
        warnings.warn(f"task.max_new_tokens: {short} of {len(qs)} prompts leave fewer than {new} tokens of "
                      f"context (target.max_seq_len={limit}); their answers stop at the context limit",
                      IneffectiveSettingWarning, stacklevel=2)


def check_output_dir(out: Path, key: str, value) -> None:
    """`out` can be created (or is a directory) and written; nothing is created here."""
    p = out.resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(key, f"{p} is a file, not a directory, so {out} cannot be created", value)
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{p} is not writable", value)


def answered(answers: Path, resume: bool) -> set:
    """Question ids already in `answers`; an existing, non-empty file is only reused with task.resume=true."""
    if not answers.is_file() or answers.stat().st_size == 0:
        return set()
    text = answers.read_text(encoding="utf-8")
    lines = text.splitlines()
    if not resume:
        raise ConfigError("task.resume", f"{answers} already holds {len(lines)} answers; not overwriting it: "
                          "task.resume=true continues it, or choose another task.output_dir", False)
    done = set()
    for n, line in enumerate(lines, start=1):
        try:
            done.add(json.loads(line)["question_id"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines) and not text.endswith("\n"):  # a row cut off mid-write: drop it, redo the question
                answers.write_text("".join(x + "\n" for x in lines[:-1]), encoding="utf-8")
                break
            raise ConfigError("task.resume", f"{answers}:{n}: not an answer row; cannot resume from it", True) from None
    return done


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a task, with the one line main.py prints (what was kept)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


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
                ("other s", "other_time"), ("accept/pos", "per_position_acceptance"), ("batch", "batch_size"),
                ("throughput tok/s", "throughput")]


def show_completion(prompt: str, completion: str) -> None:
    print(f"{' prompt ':-^72}\n{prompt}")
    print(f"{' completion ':-^72}\n{completion}\n{'':-^72}\n")


class Progress:
    """tqdm over questions (or runs) on stderr, showing generated tokens/s."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="q" if desc == "generate" else "run", file=sys.stderr,
                        dynamic_ncols=True)
        self.tokens, self.seconds = 0, 0.0

    def update(self, results: list[DecodeResult]) -> None:
        self.tokens += sum(len(r.output_ids) for r in results)
        self.seconds += sum(r.wall_time for r in results)
        self.bar.set_postfix_str(f"{self.tokens / max(self.seconds, 1e-9):.0f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_generate(rt: Runtime, cfg: SpecConfig, job: Job) -> dict:
    """Answers appended to the jsonl and flushed one question at a time (as each batch of questions finishes),
    so an interruption keeps them."""
    todo = [q for q in job.questions if q.question_id not in job.done]
    job.out.mkdir(parents=True, exist_ok=True)
    mode = "a" if job.done else "x"  # "x": two runs never write one answers file
    if mode == "x" and job.answers.is_file() and job.answers.stat().st_size == 0:
        job.answers.unlink()  # an empty file left by an earlier run that answered nothing
    try:
        f = job.answers.open(mode, encoding="utf-8")
    except FileExistsError:
        raise ConfigError("task.output_dir", f"{job.answers} was created by another run meanwhile; not "
                          "overwriting it", cfg.task.output_dir) from None
    results, rows, written = [], [], 0
    progress = Progress(len(todo), "generate")
    step = rt.batch_size
    try:
        for lo in range(0, len(todo), step):  # task.batch_size questions decoded together
            chunk = todo[lo:lo + step]
            for q, (texts, rs) in zip(chunk, answer_batch(rt, chunk, cfg.task.max_new_tokens, cfg.sampling.seed)):
                row = _answer_row(rt, q, texts, rs)
                f.write(json.dumps(row) + "\n")
                f.flush()
                written += 1
                rows.append(row)
                results += rs
                progress.update(rs)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {len(job.done) + written} of {len(job.questions)} answers kept in "
                          f"{job.answers} (task.resume=true continues)") from None
    finally:
        progress.close()
        f.close()
        if written == 0 and not job.done:
            job.answers.unlink(missing_ok=True)
    s = {"method": rt.plan.name, **summarize(results)}
    if len(job.questions) == 1 and len(job.questions[0].turns) == 1 and rows:
        show_completion(job.questions[0].turns[0], rows[0]["choices"][0]["turns"][0])
    if job.done:
        print(f"resumed: {len(job.done)} questions already answered, {written} answered now")
    print(markdown_table([s], SUMMARY_COLS))
    print(f"answers: {job.answers}")
    return {"task": "generate", "plan_hash": rt.plan.plan_hash(), "answers": str(job.answers), **s}


def run_bench(rt: Runtime, cfg: SpecConfig, job: Job) -> dict:
    """Autoregressive baseline and the configured method on the same prompts, same target, same run."""
    out, qs = job.out, job.questions
    out.mkdir(parents=True, exist_ok=True)
    methods = {"autoregressive": rt.with_drafter(NoDrafter()), rt.plan.name: rt}
    for _ in range(cfg.task.warmup):
        for m in methods.values():
            answer(m, qs[0], min(16, cfg.task.max_new_tokens), cfg.sampling.seed)
    per: dict[str, list[DecodeResult]] = {k: [] for k in methods}
    per_cat: dict[str, dict[str, list[DecodeResult]]] = {}
    wall = {k: 0.0 for k in methods}
    equal, paired = 0, []  # paired: method tok/s over baseline tok/s, per chunk and repeat
    B = rt.batch_size
    progress = Progress(len(qs) * cfg.task.repeats, "bench")
    try:
        # interleave methods per chunk of task.batch_size prompts (one prompt at batch 1) and per repeat, so
        # machine noise hits both alike
        for lo in range(0, len(qs), B):
            chunk = qs[lo:lo + B]
            outs: list[dict] = [{} for _ in chunk]
            for _ in range(cfg.task.repeats):
                speed = {}
                for name, m in methods.items():
                    t0 = time.perf_counter()
                    answers = answer_batch(m, chunk, cfg.task.max_new_tokens, cfg.sampling.seed)
                    dt = time.perf_counter() - t0
                    wall[name] += dt
                    rs = [r for _, a in answers for r in a]
                    per[name] += rs
                    for q, o, (_, a) in zip(chunk, outs, answers):
                        per_cat.setdefault(q.category, {}).setdefault(name, []).extend(a)
                        o.setdefault(name, set()).add(json.dumps([r.output_ids for r in a]))
                    speed[name] = summarize(rs)["tokens_per_s"] if B == 1 else sum(len(r.output_ids) for r in rs) / dt
                    if name != "autoregressive":
                        for _, a in answers:
                            progress.update(a)
                base_speed, method_speed = speed.values()
                paired.append(method_speed / base_speed if base_speed else 0.0)
            equal += sum(len(set.union(*o.values())) == 1 for o in outs)  # every run of every method: same tokens
    except KeyboardInterrupt:
        raise Interrupted("interrupted: bench stopped before writing its report") from None
    finally:
        progress.close()
    rows = [{"method": k, **summarize(v), "batch_size": B,
             "throughput": sum(len(r.output_ids) for r in v) / max(wall[k], 1e-9)} for k, v in per.items()]
    key = "tokens_per_s" if B == 1 else "throughput"  # Spec-Bench's per-prompt mean at batch 1; aggregate above
    base = rows[0][key]
    for r in rows:
        r["speedup"] = r[key] / base if base else 0.0
    spread = [min(paired), statistics.median(paired), max(paired)]
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
              "speedup_min_median_max": spread, "methods": rows, "per_category": cats, "batch_sizes": batch_rows}
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
          markdown_table(rows, cols), "",
          f"speedup over {len(paired)} paired runs (each prompt and repeat, AR and method back to back): "
          f"min {spread[0]:.2f}x / median {spread[1]:.2f}x / max {spread[2]:.2f}x", "",
          "## Per category", "",
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
        show_completion(qs[0].turns[0], answers[0][0][0])  # the method's text (the last run)
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
