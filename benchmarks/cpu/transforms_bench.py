"""Each load-time CPU transform (runtime/transforms.py) on vs off: one forward of T = 1 and 4 new tokens at
~600 tokens of context through the default pair (fp32, as loaded), median of N calls, variants interleaved
so machine noise hits them alike. The defaults (spec_compiler.plan.CPU_TRANSFORM_DEFAULTS) keep the ones
measured faster here.

    OMP_NUM_THREADS=1 python benchmarks/cpu/transforms_bench.py [--calls 200] [--out benchmarks/cpu/transforms_bench.md]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from runtime.batch import Block  # noqa: E402
from runtime.models.checkpoint import load_llama  # noqa: E402
from runtime.transforms import apply_cpu_transforms  # noqa: E402
from spec_compiler.plan import CPU_TRANSFORM_DEFAULTS, CpuTransforms  # noqa: E402

CONTEXT = 600
VARIANTS = {
    "off (plain)": CpuTransforms(),
    "fp16_weight_gemm": CpuTransforms(fp16_weight_gemm=True),
    "rmsnorm_layernorm": CpuTransforms(rmsnorm_layernorm=True),
    "gemv_head": CpuTransforms(gemv_head=True),
    "fp16_weight_gemm + rmsnorm_layernorm": CpuTransforms(fp16_weight_gemm=True, rmsnorm_layernorm=True),
    "rmsnorm_layernorm + gemv_head": CpuTransforms(rmsnorm_layernorm=True, gemv_head=True),
    "all": CpuTransforms(True, True, True),
}


def timed_calls(models: dict, T: int, calls: int) -> dict[str, float]:
    """Median ms of one forward of T tokens at CONTEXT tokens of context, per variant (interleaved)."""
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values()))[0].config.vocab_size
    ids = torch.randint(0, vocab, (1, T), generator=g)
    pos = torch.arange(CONTEXT, CONTEXT + T)[None]
    block = Block.causal(CONTEXT, T)
    times = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(5):  # warm-up (packing, caches)
            for model, cache in models.values():
                model(ids, pos, cache, block)
        for _ in range(calls):
            for k, (model, cache) in models.items():
                t0 = time.perf_counter()
                model(ids, pos, cache, block)
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench(path: Path, calls: int) -> tuple[list[str], dict]:
    base = load_llama(path, dtype=torch.float32).eval()
    prompt = torch.randint(0, base.config.vocab_size, (1, CONTEXT), generator=torch.Generator().manual_seed(1))
    models, reports = {}, {}
    for name, t in VARIANTS.items():
        m = copy.deepcopy(base)
        reports[name] = apply_cpu_transforms(m, t).summary()
        cache = m.new_cache(1, CONTEXT + 8)
        with torch.inference_mode():
            m(prompt, torch.arange(CONTEXT)[None], cache, Block.causal(0, CONTEXT), num_logits=1)
        models[name] = (m, cache)
    ms = {T: timed_calls(models, T, calls) for T in (1, 4)}
    off = {T: ms[T]["off (plain)"] for T in ms}
    rows = [f"| {name} | {ms[1][name]:.2f} | {off[1] / ms[1][name]:.2f}x | {ms[4][name]:.2f} | "
            f"{off[4] / ms[4][name]:.2f}x | {reports[name]} |" for name in VARIANTS]
    return rows, ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200, help="timed forwards per variant and T (median)")
    ap.add_argument("--models", nargs="+", default=["models/default/target", "models/default/drafter"])
    ap.add_argument("--out", default=None, help="write the markdown table here as well")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    md = ["# CPU transforms: each on vs off", "",
          f"One forward of T new tokens at {CONTEXT} tokens of context (KV cache filled by a prefill), fp32 "
          f"weights as loaded (the checkpoints are fp16, so every weight is fp16-exact), median of "
          f"{args.calls} calls per variant, variants interleaved.", "",
          f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; {torch.get_num_threads()} thread(s); "
          f"command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
          f"benchmarks/cpu/transforms_bench.py --calls {args.calls}`", ""]
    for p in args.models:
        rows, _ = bench(ROOT / p, args.calls)
        md += [f"## {p}", "", "| transforms on | T=1 ms | speedup | T=4 ms | speedup | modules replaced |",
               "|---|---|---|---|---|---|", *rows, ""]
    md += [f"Defaults (spec_compiler.plan.CPU_TRANSFORM_DEFAULTS): {CPU_TRANSFORM_DEFAULTS}."]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
