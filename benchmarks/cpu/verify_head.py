"""A/B of `backend.verify_head` (path vs full) on the default pair, same process, runs interleaved.

    python benchmarks/cpu/verify_head.py [num_prompts] [max_new_tokens] [repeats]

For each batch size and method (autoregressive, the default top-3 tree), every repeat runs the same prompts
with verify_head=full then path on one loaded runtime; reports decode-only tokens/s (prefills excluded) and
the path/full ratio, and checks the outputs are equal. Writes verify_head.json and verify_head.md here.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from runtime.decode import Engine  # noqa: E402
from runtime.drafters import NoDrafter  # noqa: E402
from runtime.load import load  # noqa: E402
from spec_compiler.prompts import read_question_file  # noqa: E402


def decode_tok_s(rt, drafter, head: str, prompts, n: int, B: int):
    eng = Engine(rt.target, rt.cache, drafter, max_seq_len=rt.plan.max_seq_len, eos_ids=(), verify_head=head)
    reqs = [rt.request(p, n, i) for i, p in enumerate(prompts)]
    results = eng.generate(reqs)
    decode = sum(r.wall_time - r.prefill_time for r in results) / B  # rows run side by side
    return sum(len(r.output_ids) for r in results) / decode, [r.output_ids for r in results]


def main_(num_prompts: int = 16, n: int = 64, repeats: int = 3) -> None:
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["task=bench"])
    spec, plan, _ = main.prepare(cfg, in_run=False)
    qs = read_question_file(str(ROOT / "data/prompts/local_suite.jsonl"), "prompts")[:num_prompts]
    base = load(plan, 1)
    prompts = [base.tokenizer.encode(q.turns[0]).ids for q in qs]
    rows = []
    for B in (1, 8):
        rt = base.with_batch_size(B)
        for method, drafter in (("autoregressive", NoDrafter()), ("top3", rt.drafter)):
            speed = {"full": [], "path": []}
            outs = {}
            for _ in range(repeats):
                for head in ("full", "path"):
                    s, outs[head] = decode_tok_s(rt, drafter, head, prompts, n, B)
                    speed[head].append(s)
            full, path = (sum(v) / len(v) for v in (speed["full"], speed["path"]))
            rows.append({"batch": B, "method": method, "full tok/s": round(full, 1), "path tok/s": round(path, 1),
                         "path / full": round(path / full, 3), "equal": outs["full"] == outs["path"]})
            print(rows[-1], flush=True)
    env = {"machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s)", "torch": torch.__version__,
           "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": f"python benchmarks/cpu/verify_head.py {num_prompts} {n} {repeats}"}
    out = Path(__file__).parent
    (out / "verify_head.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    cols = list(rows[0])
    md = [f"# verify_head: path vs full (decode-only tokens/s, {num_prompts} local-suite prompts x {n} tokens, "
          f"{repeats} interleaved repeats)", "", f"{env['machine']}; torch {env['torch']}; `{env['command']}`; "
          f"{env['date']}; shared 2-core box: compare the ratios, measured in the same run.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "verify_head.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main_(*[int(a) for a in sys.argv[1:]])
