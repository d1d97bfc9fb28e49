"""Each load-time CPU transform (runtime/transforms.py) on vs off: one forward of T = 1 and 4 new tokens at
~600 tokens of context through the default pair (fp32, as loaded), and each transformed module alone.
The defaults (spec_compiler.plan.CPU_TRANSFORM_DEFAULTS) keep the ones measured faster here.

Timing: variants alternate in blocks of `--per-block` calls, `--blocks` times; a block's mean is one sample.
The table gives the median block and the best block: on a shared box other processes only ever add time,
so the best block is the steadier estimate of a variant's own cost, and the speedups use it.

    OMP_NUM_THREADS=1 python benchmarks/cpu/transforms_bench.py --out benchmarks/cpu/transforms_bench.md
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
    "fp16_weight_gemm + gemv_head (= all but the norm)": CpuTransforms(fp16_weight_gemm=True, gemv_head=True),
}


def interleaved(fns: dict, blocks: int, per_block: int) -> dict[str, tuple[float, float]]:
    """(median, best) block-mean seconds per call of each no-argument function, blocks alternating."""
    for f in fns.values():  # warm-up: packing, cached copies
        for _ in range(3):
            f()
    samples = {k: [] for k in fns}
    for _ in range(blocks):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_block):
                f()
            samples[k].append((time.perf_counter() - t0) / per_block)
    return {k: (statistics.median(v), min(v)) for k, v in samples.items()}


def cell(t: tuple[float, float], base: tuple[float, float], unit: float) -> str:
    return f"{t[0] * unit:.2f} ({t[1] * unit:.2f}) | {base[1] / t[1]:.2f}x"


def forward_rows(path: Path, blocks: int, per_block: int) -> list[str]:
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
    res = {}
    for T in (1, 4):
        ids = torch.randint(0, base.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        pos, block = torch.arange(CONTEXT, CONTEXT + T)[None], Block.causal(CONTEXT, T)  # rewrites the same slots
        with torch.inference_mode():
            res[T] = interleaved({k: (lambda m=m, c=c: m(ids, pos, c, block)) for k, (m, c) in models.items()},
                                 blocks, per_block)
    off = "off (plain)"
    return [f"| {k} | {cell(res[1][k], res[1][off], 1e3)} | {cell(res[4][k], res[4][off], 1e3)} | {reports[k]} |"
            for k in VARIANTS]


def module_rows(path: Path, blocks: int, per_block: int) -> list[str]:
    """Each transformed module of the model alone against its plain form (layer 0 and the head)."""
    model = load_llama(path, dtype=torch.float32).eval()
    layer = model.layers[0]
    cases = [("layers.0.attention_norm", layer.attention_norm, CpuTransforms(rmsnorm_layernorm=True)),
             ("layers.0.attention.wqkv", layer.attention.wqkv, CpuTransforms(fp16_weight_gemm=True)),
             ("layers.0.feed_forward.w1", layer.feed_forward.w1, CpuTransforms(fp16_weight_gemm=True)),
             ("layers.0.feed_forward.w2", layer.feed_forward.w2, CpuTransforms(fp16_weight_gemm=True)),
             ("output", model.output, CpuTransforms(fp16_weight_gemm=True)),
             ("output", model.output, CpuTransforms(gemv_head=True))]
    rows = []
    for name, plain, t in cases:
        box = torch.nn.Sequential(copy.deepcopy(plain))
        apply_cpu_transforms(box, t)
        fast = box[0]
        n_in = plain.in_features if hasattr(plain, "in_features") else plain.weight.shape[0]
        cells = []
        for T in (1, 4):
            x = torch.randn(1, T, n_in)
            with torch.inference_mode():
                r = interleaved({"plain": lambda: plain(x), "fast": lambda: fast(x)}, blocks, per_block)
            cells.append(f"{r['plain'][0] * 1e6:.1f} ({r['plain'][1] * 1e6:.1f}) | "
                         f"{r['fast'][0] * 1e6:.1f} ({r['fast'][1] * 1e6:.1f}) | {r['plain'][1] / r['fast'][1]:.2f}x")
        rows.append(f"| {name} -> {type(fast).__name__} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=30, help="alternating blocks per variant")
    ap.add_argument("--per-block", type=int, default=10, help="forwards per block (x20 for single modules)")
    ap.add_argument("--models", nargs="+", default=["models/default/target", "models/default/drafter"])
    ap.add_argument("--out", default=None, help="write the markdown here as well")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    md = ["# CPU transforms: each on vs off", "",
          f"Machine: {cpu}, {os.cpu_count()} cores (load average {load:.1f} at the start); torch "
          f"{torch.__version__}; {torch.get_num_threads()} thread(s); command: `OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/cpu/transforms_bench.py --blocks "
          f"{args.blocks} --per-block {args.per_block}`", "",
          f"Whole forward: T new tokens at {CONTEXT} tokens of context (KV cache filled by a prefill), fp32 weights "
          "as loaded (the checkpoints are stored in fp16, so every weight is fp16-exact: fp16_weight_gemm takes the "
          "head before gemv_head can; `gemv_head` alone measures the head a non-fp16 checkpoint would get). "
          f"Cells: ms per forward, median block (best block) of {args.blocks} blocks of {args.per_block}; speedup "
          "= best block off / best block on.", ""]
    for p in args.models:
        md += [f"## {p}", "", "| transforms on | T=1 ms | speedup | T=4 ms | speedup | modules replaced |",
               "|---|---|---|---|---|---|", *forward_rows(ROOT / p, args.blocks, args.per_block), "",
               f"Each module alone, us per call, median block (best block) of {args.blocks} blocks of "
               f"{20 * args.per_block}:", "",
               "| module | T=1 plain | T=1 transformed | speedup | T=4 plain | T=4 transformed | speedup |",
               "|---|---|---|---|---|---|---|", *module_rows(ROOT / p, args.blocks, 20 * args.per_block), ""]
    md += [f"Defaults (spec_compiler.plan.CPU_TRANSFORM_DEFAULTS): {CPU_TRANSFORM_DEFAULTS}."]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
