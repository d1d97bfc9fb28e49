"""backend=compiled vs backend=eager, same plan, same prompts, same run: `python -m aot.bench [overrides...]`.

Loads the plan twice in one process (eager, and compiled from its artifact, built first when missing), then
per prompt runs, back to back: eager AR, compiled AR, eager method, compiled method (the AR baselines are the
same runtime with no drafter). Every speed is a same-run ratio; outputs must be equal token for token.
Writes JSON + markdown + plot (default benchmarks/cpu/compiled_bench.*) naming machine, versions, command.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (as for main.py)")
    ap.add_argument("--prompts", type=int, default=16, help="local-suite prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/cpu/compiled_bench")
    args = ap.parse_intermixed_args(argv)

    import main as entry
    from aot.build import open_runtime
    from runtime.drafters import NoDrafter
    from runtime.load import load
    from runtime.tasks import _environment, summarize
    from spec_compiler.prompts import read_question_file
    from hydra import compose, initialize_config_dir

    torch.set_num_threads(1)

    def cfg(extra):
        with initialize_config_dir(config_dir=str(entry.CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(args.overrides) + extra)
    _, plan_e, _ = entry.prepare(cfg(["backend=eager"]), in_run=False)
    spec_c, plan_c, _ = entry.prepare(cfg(["backend=compiled"]), in_run=False)
    eager = load(plan_e, 1)
    compiled = open_runtime(spec_c, plan_c, 1, "python -m aot.bench " + " ".join(args.overrides))
    runs = {"eager AR": eager.with_drafter(NoDrafter()), "compiled AR": compiled.with_drafter(NoDrafter()),
            "eager " + plan_e.name: eager, "compiled " + plan_c.name: compiled}
    qs = read_question_file("data/prompts/local_suite.jsonl", "prompts")[:args.prompts]
    prompts = [eager.tokenizer.encode(q.turns[0]).ids for q in qs]
    for rt in runs.values():  # warm-up
        rt.generate(prompts[0], 8)
    per = {k: [] for k in runs}
    equal = 0
    for p in prompts:
        outs = {}
        for name, rt in runs.items():
            r = rt.generate(p, args.max_new_tokens)
            per[name].append(r)
            outs[name] = r.output_ids
        names = list(runs)
        equal += outs[names[0]] == outs[names[1]] and outs[names[2]] == outs[names[3]]
    rows = [{"run": k, **summarize(v)} for k, v in per.items()]
    by = {r["run"]: r for r in rows}
    pairs = [("AR", "eager AR", "compiled AR"), ("method", names[2], names[3])]
    ratios = {}
    for label, e, c in pairs:  # per-prompt ratios (same prompt, back to back), then their median
        per_prompt = [(len(b.output_ids) / b.wall_time) / (len(a.output_ids) / a.wall_time)
                      for a, b in zip(per[e], per[c])]
        ratios[label] = {"mean_tok_s_ratio": by[c]["tokens_per_s"] / by[e]["tokens_per_s"],
                         "per_prompt_median": statistics.median(per_prompt),
                         "per_prompt_min": min(per_prompt), "per_prompt_max": max(per_prompt)}
    env = _environment(eager)
    env["command"] = "python -m aot.bench " + " ".join(args.overrides + [f"--prompts={args.prompts}",
                                                                         f"--max-new-tokens={args.max_new_tokens}"])
    table = compiled.compiled.manifest["autotune"]
    report = {"plan": plan_c.name, "artifact": str(compiled.compiled.directory), "environment": env,
              "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "outputs_equal": f"{equal}/{len(prompts)}", "rows": rows, "ratios": ratios,
              "compiled_calls": dict(compiled.compiled.stats.hits), "eager_calls": dict(compiled.compiled.stats.misses),
              "autotune": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    from aot.build import compile_summary
    md = [f"# compiled vs eager: {plan_c.name}", "",
          f"{len(prompts)} local-suite prompts, max_new_tokens={args.max_new_tokens}, batch 1, greedy; per prompt "
          "eager AR, compiled AR, eager method, compiled method back to back in one process. "
          f"Outputs equal (eager == compiled, AR and method): {equal}/{len(prompts)}.", "",
          f"Machine: {env['machine']}; python {env['python']}; torch {env['torch']}; {env['threads']} thread(s); "
          f"command: `{env['command']}`", "",
          "| run | new tokens | tau | tok/s |", "|---|---|---|---|"]
    md += [f"| {r['run']} | {r['new_tokens']} | {r['tau']:.3f} | {r['tokens_per_s']:.1f} |" for r in rows]
    md += ["", "| compiled / eager | mean tok/s ratio | per-prompt median (min..max) |", "|---|---|---|"]
    md += [f"| {k} | {v['mean_tok_s_ratio']:.3f} | {v['per_prompt_median']:.3f} ({v['per_prompt_min']:.2f}.."
           f"{v['per_prompt_max']:.2f}) |" for k, v in ratios.items()]
    md += ["", f"Calls that ran a compiled program: {sum(report['compiled_calls'].values())}; eager: "
           f"{sum(report['eager_calls'].values())}.", "", "## Autotune table (from the artifact's manifest)", "",
           compile_summary(compiled.compiled.directory, compiled.compiled.manifest)]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar([r["run"][:28] for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set_ylabel("tok/s (mean per prompt)")
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
