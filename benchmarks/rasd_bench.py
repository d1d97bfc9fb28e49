"""Retrieval benchmark (issue #13): autoregressive, the model drafter alone, retrieval alone and RASD (the two fused)
on the same target, the same prompts and in the same run, interleaved per prompt (method order rotates), greedy.

Every method's output is checked equal to the autoregressive one. tok/s = new tokens / wall time per prompt
(prefill included), averaged over prompts; ratios compare methods of this one run (the box is shared and noisy).

    python -m benchmarks.rasd_bench --prompts benchmarks/ood_prompts.jsonl \
        --corpus /path/to/site-packages/transformers --out benchmarks/cpu/rasd_ood
    python -m benchmarks.rasd_bench --prompts data/prompts/local_suite.jsonl --retrieval context datastore \
        --out benchmarks/cpu/rasd_local                      (datastore: the training files)

Writes <out>.json and <out>.md (machine, versions, command, per method and per category tables).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import main
from runtime.drafters import NoDrafter
from runtime.load import load, make_retrieval
from runtime.retrieval import FusedDrafter


def plan_for(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(main.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return main.prepare(cfg, in_run=False)[1]


def methods(args) -> tuple[object, dict]:
    """The runtime (its target and tokenizer) and {method: drafter}; fused drafters share one model drafter."""
    base = ["task=generate", f"tree={args.tree}"] + args.override
    rt, drafters = None, {}
    for kind in args.retrieval:
        over = base + [f"retrieval={kind}", f"retrieval.max_nodes={args.max_nodes}",
                       f"retrieval.num_candidates={args.num_candidates}"]
        over += [f"retrieval.{k}" for k in args.retrieval_set]
        if kind == "datastore" and args.corpus:
            over.append(f"retrieval.corpus=[{','.join(args.corpus)}]")
        plan = plan_for(over)
        if rt is None:
            rt = load(plan)
            model = rt.drafter.model
            drafters = {"autoregressive": NoDrafter(), "model": model}
        drafters[f"retrieval-{kind}"] = make_retrieval(plan, rt.tokenizer, 1, fused=False)
        for prune in args.prune:
            name = f"rasd-{kind}" + (f"-{prune}" if len(args.prune) > 1 else "")
            drafters[name] = FusedDrafter(model, make_retrieval(plan, rt.tokenizer, 1, fused=True),
                                          plan.retrieval.max_nodes, prune, 0)
            if args.skip_model_after:
                drafters[name + f"-skip{args.skip_model_after}"] = FusedDrafter(
                    model, make_retrieval(plan, rt.tokenizer, 1, fused=True), plan.retrieval.max_nodes, prune,
                    args.skip_model_after)
    return rt, drafters


def summarize(results: list) -> dict:
    new = sum(len(r.output_ids) for r in results)
    steps = sum(r.steps for r in results)
    return {"new_tokens": new, "steps": steps, "tau": new / max(1, steps),
            "tokens_per_s": statistics.mean(len(r.output_ids) / r.wall_time for r in results),
            "draft_s": sum(r.draft_time for r in results), "verify_s": sum(r.verify_time for r in results),
            "wall_s": sum(r.wall_time for r in results)}


def table(rows: list[dict], keys: list[str]) -> str:
    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(fmt(r[k]) for k in keys) + " |\n" for r in rows)


def main_(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--corpus", nargs="*", default=[], help="datastore corpus entries ([] = the training files)")
    ap.add_argument("--retrieval", nargs="+", default=["datastore"], choices=["datastore", "context"])
    ap.add_argument("--tree", default="top3")
    ap.add_argument("--max-nodes", type=int, default=8)
    ap.add_argument("--num-candidates", type=int, default=24)
    ap.add_argument("--prune", nargs="+", default=["root"], choices=["path", "root"])
    ap.add_argument("--skip-model-after", type=int, default=0,
                    help="also run RASD with this retrieval.skip_model_after")
    ap.add_argument("--retrieval-set", nargs="*", default=[], help="extra retrieval.KEY=VALUE settings")
    ap.add_argument("--num-prompts", type=int, default=0, help="0 = all")
    ap.add_argument("--per-category", type=int, default=0, help="the first N prompts of each category (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides (e.g. drafter.vocab_trim...)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    rt, drafters = methods(args)
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if args.per_category:
        seen: dict = {}
        rows = [r for r in rows if seen.setdefault(r.get("category", ""), []).append(r) or
                len(seen[r.get("category", "")]) <= args.per_category]
    if args.num_prompts:
        rows = rows[:args.num_prompts]
    names = list(drafters)
    runs = {m: {} for m in names}  # method -> {category: [DecodeResult]}
    equal = {m: 0 for m in names}
    warm = rt.tokenizer.encode(rows[0]["turns"][0]).ids
    for m in names:  # untimed warm-up
        rt.with_drafter(drafters[m]).generate(warm, 8)
    t0 = time.time()
    for i, row in enumerate(rows):
        ids = rt.tokenizer.encode(row["turns"][0]).ids
        order = names[i % len(names):] + names[:i % len(names)]
        outs = {}
        for m in order:
            res = rt.with_drafter(drafters[m]).generate(ids, args.max_new_tokens)
            outs[m] = res
            runs[m].setdefault(row.get("category", "all"), []).append(res)
        for m in names:
            equal[m] += outs[m].output_ids == outs["autoregressive"].output_ids
        line = " ".join(f"{m}={outs[m].tau:.2f}" for m in names)
        print(f"[{i + 1}/{len(rows)}] {row.get('category', '')} tau {line}", file=sys.stderr)
    elapsed = time.time() - t0

    def summary_rows(select):
        out = []
        ar = None
        for m in names:
            s = summarize(select(m))
            if m == "autoregressive":
                ar = s
            s["method"] = m
            s["speedup_vs_ar"] = s["tokens_per_s"] / ar["tokens_per_s"]
            out.append(s)
        model = next(r for r in out if r["method"] == "model")
        for s in out:
            s["tau_vs_model"] = s["tau"] / model["tau"]
            s["tok_s_vs_model"] = s["tokens_per_s"] / model["tokens_per_s"]
        return out

    overall = summary_rows(lambda m: [r for rs in runs[m].values() for r in rs])
    cats = sorted({c for m in names for c in runs[m]})
    per_cat = {c: summary_rows(lambda m, c=c: runs[m][c]) for c in cats}
    env = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "command": "python -m benchmarks.rasd_bench " + " ".join(sys.argv[1:] if argv is None else argv),
           "plan": rt.plan.name, "tree": args.tree, "max_new_tokens": args.max_new_tokens, "prompts": len(rows),
           "retrieval": {k: v for k, v in rt.plan.retrieval.__dict__.items()}, "elapsed_s": elapsed,
           "outputs_equal_to_ar": equal}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "overall": overall, "per_category": per_cat},
                                                   indent=1))
    keys = ["method", "new_tokens", "steps", "tau", "tau_vs_model", "tokens_per_s", "tok_s_vs_model", "speedup_vs_ar",
            "draft_s", "verify_s"]
    md = [f"# RASD benchmark: {Path(args.prompts).name}\n",
          f"Machine: {env['machine']}; python {env['python']}; torch {env['torch']}; {env['threads']} thread; "
          f"greedy; {len(rows)} prompts x {args.max_new_tokens} new tokens; tree={args.tree}; plan {env['plan']}\n",
          f"Command: `{env['command']}`\n",
          f"Retrieval settings: {env['retrieval']}\n",
          f"Outputs equal to autoregressive: {equal} (of {len(rows)})\n",
          "Methods run back to back per prompt (order rotating); tok/s = mean over prompts of new tokens / wall time "
          "(prefill included); *_vs_model = ratio to the model drafter alone in this same run.\n",
          "## Overall\n", table(overall, keys)]
    for c in cats:
        md += [f"\n## {c}\n", table(per_cat[c], keys)]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main_()
