"""The GPU benchmark of issue #11: one process per part, each writing its JSON as soon as it is done.

Parts (`--part`, repeatable; `report` merges the parts' files into gpu_bench.json and gpu_bench.md):
- `llama`: a 1.10 B random-weight Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
  vocab 32000) after a 512-token prompt: the AR step (one-token verify forward) against the weight-read
  floor (weight bytes / the device-to-device copy bandwidth measured in the same run, bytes read + written),
  verify forwards of 1, 2, 4, ..., 128-node trees as a ratio to the AR step, each eager and replayed from a
  CUDA graph (runtime/cuda_graphs.py), and our engine's own AR decode tokens/s.
- `pair`: the default pair (models/default, the plan composed from conf/ with backend.kv_window=full):
  speculative vs its own AR baseline, tokens/s and tau, eager and graphed, outputs compared with AR's.
- `hf`: transformers `generate` (greedy) and assisted generation (`assistant_model=`) on the same 1.1 B
  weights (our state dict in a LlamaForCausalLM; the assistant is the target's first 2 layers, since random
  weights have no real drafter: it times the machinery) and on the default pair's checkpoints.

On CUDA the models run in bf16 (the default pair in its plan's dtype); `--tiny` shrinks every size so the
whole script runs on a CPU in seconds (tests/benchmarks/test_gpu_bench.py). Timing: CUDA events around each
call, warm-up first, the median of the repeats (METHOD.md); on the CPU, perf_counter.

    python benchmarks/gpu_bench.py --part llama --part pair --part hf --part report   # writes to $OUT or benchmarks/gpu
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from runtime.batch import Block, TreeBatch  # noqa: E402
from runtime.cuda_graphs import GraphedForward, graph_runtime  # noqa: E402
from runtime.decode import Engine, Request  # noqa: E402
from runtime.drafters import NoDrafter  # noqa: E402
from runtime.models.init import init_random_weights  # noqa: E402
from runtime.models.llama import LlamaConfig, LlamaModel  # noqa: E402
from spec_compiler.tree import Provenance, TreeTopology  # noqa: E402

PARTS = ("llama", "pair", "hf", "report")
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                intermediate_size=8192, max_position_embeddings=2048)
LLAMA_TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=128, max_position_embeddings=512)


# ---------------------------------------------------------------------------------------------------
# setup and timing
# ---------------------------------------------------------------------------------------------------
def settings(args) -> dict:
    tiny = args.tiny
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return dict(tiny=tiny, device=dev, dtype=args.dtype or ("bfloat16" if dev == "cuda" else "float32"),
                arch=LLAMA_TINY if tiny else LLAMA_1B, prompt_len=32 if tiny else 512,
                trees=[1, 2, 4] if tiny else [1, 2, 4, 8, 16, 32, 64, 128], iters=3 if tiny else 30,
                max_new=8 if tiny else args.max_new, prompts=1 if tiny else args.prompts,
                pair_trees=["chain"] if tiny else args.pair_trees, copy_mb=16 if tiny else 2048)


def machine() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "command": " ".join([Path(sys.executable).name] + sys.argv),
           "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    from importlib import metadata
    for key, dist in (("triton", "triton"), ("transformers", "transformers"), ("mamba_ssm", "mamba-ssm"),
                      ("hydra", "hydra-core")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "not installed"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), capability=f"sm{p.major}{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   cuda=torch.version.cuda)
    return out


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, dev: str, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` over `iters` calls (CUDA events on cuda, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(iters):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(dev: str, mb: int, iters: int) -> dict:
    """Device-to-device copy of an `mb` MiB tensor: GB/s counting bytes read plus bytes written."""
    n = mb * 2**20 // 2
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)  # random data, never zeros (METHOD.md)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), dev, max(iters, 10))
    return {"bytes": 2 * src.numel() * 2, "ms": ms, "gb_s": 2 * src.numel() * 2 / ms / 1e6}


def random_llama(arch: dict, dev: str, dtype: torch.dtype, seed: int = 0) -> LlamaModel:
    """A random-weight Llama built on `dev` (runtime.models.init's scheme), then cast to `dtype`."""
    config = LlamaConfig(**arch)
    with torch.device(dev):
        model = LlamaModel(config)
    init_random_weights(model, model.tok_embeddings.weight, config.hidden_size, seed)
    return model.to(dtype).eval()


def tree_inputs(n: int, L: int, C: int, dev: str, vocab: int, gen: torch.Generator):
    """A chain tree of n nodes (its root the pending token at slot L) as (tokens, Block) for one verify forward."""
    topo = TreeTopology.chain(n - 1)
    toks = torch.randint(0, vocab, (1, n), generator=gen).tolist()
    tb = TreeBatch.build([topo], toks, [[Provenance.root] + [Provenance.topk] * (n - 1)], n)
    return tb.tokens.to(dev), Block.tree(torch.tensor([L]), tb, C, device=dev)


def write(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# part llama: AR step vs floor, verify latency per tree size, eager and graphed
# ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def part_llama(s: dict) -> dict:
    dev, dtype = s["device"], getattr(torch, s["dtype"])
    t0 = time.perf_counter()
    model = random_llama(s["arch"], dev, dtype)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res = {"arch": s["arch"], "dtype": s["dtype"], "params": params, "weight_bytes": weight_bytes,
           "build_s": round(time.perf_counter() - t0, 2), "prompt_len": s["prompt_len"]}
    bw = copy_bandwidth(dev, s["copy_mb"], s["iters"])
    res["copy"] = bw
    res["floor_ms"] = weight_bytes / bw["gb_s"] / 1e6
    P, V = s["prompt_len"], s["arch"]["vocab_size"]
    C = P + max(s["trees"]) + 16
    gen = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, C)
    prompt = torch.randint(0, V, (1, P), generator=gen)
    L = P - 1  # the prompt's last token is the pending root
    blk = Block.causal(0, L, 1, C, device=dev)
    model.hidden(prompt[:, :L].to(dev), blk.positions, cache, blk, num_rows=0)
    graphed = GraphedForward(model, max_tokens=max(s["trees"]))
    # backend.attention=triton: the same model with its at-prefix forwards on the Triton tree-attention kernel
    # (runtime.load.route_kernels sets this from the plan); CUDA, or the interpreter on the CPU for a dry run
    triton = (dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") and importlib.util.find_spec("triton") is not None
    sizes = frozenset(s["trees"])

    def with_triton(fn):
        def call(*a):
            model.tree_attention_sizes = sizes
            try:
                return fn(*a)
            finally:
                model.tree_attention_sizes = frozenset()
        return call
    modes = [("eager", model), ("graph", graphed)]
    if triton:
        modes += [("triton", with_triton(model)), ("triton_graph", with_triton(GraphedForward(model, max_tokens=max(s["trees"]))))]
    rows = []
    for n in s["trees"]:
        toks, block = tree_inputs(n, L, C, dev, V, gen)
        row = {"nodes": n}
        for name, fn in modes:
            row[f"{name}_ms"] = time_ms(lambda: fn(toks, block.positions, cache, block), dev, s["iters"])
        rows.append(row)
    ar = rows[0]
    for row in rows:
        for name, _ in modes:
            row[f"{name}_vs_ar"] = row[f"{name}_ms"] / ar[f"{name}_ms"]
    res["verify"] = rows
    res["verify_modes"] = [name for name, _ in modes]
    res["ar_step_ms"] = {name: ar[f"{name}_ms"] for name, _ in modes}
    res["ar_vs_floor"] = {k: v / res["floor_ms"] for k, v in res["ar_step_ms"].items()}
    res["graph_stats"] = dict(graphed.stats)
    # our engine's AR decode (one request, NoDrafter), eager and graphed, after the same prompt
    n_new = s["max_new"]
    for name, target in (("eager", model), ("graph", GraphedForward(model))):
        eng = Engine(target, cache, NoDrafter(), max_seq_len=C, kv_window="full")
        eng.generate([Request(prompt[0].tolist(), 2)])  # warm-up (and graph capture)
        sync(dev)
        r = eng.generate([Request(prompt[0].tolist(), n_new)])[0]
        res[f"engine_ar_{name}_tok_s"] = len(r.output_ids) / max(1e-9, r.wall_time - r.prefill_time)
    return res


# ---------------------------------------------------------------------------------------------------
# part pair: speculative vs own AR on the default pair
# ---------------------------------------------------------------------------------------------------
def compose_plan(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import main
    from runtime.device import host
    from spec_compiler.plan import make_plan
    from spec_compiler.validate import validate
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return make_plan(validate(main.to_spec(cfg), host()))


def suite_prompts(n: int) -> list[str]:
    lines = (ROOT / "data/prompts/local_suite.jsonl").read_text().splitlines()
    return [json.loads(x)["turns"][0] for x in lines[:n]]


def run_requests(rt, prompts_ids: list[list[int]], max_new: int) -> dict:
    results = [rt.generate(p, max_new) for p in prompts_ids]
    decode_s = sum(r.wall_time - r.prefill_time for r in results)
    toks = sum(len(r.output_ids) for r in results)
    return {"tok_s": toks / max(1e-9, decode_s), "tokens": toks, "tau": toks / max(1, sum(r.steps for r in results)),
            "outputs": [r.output_ids for r in results]}


def part_pair(s: dict) -> dict:
    from runtime.load import load
    res = {"trees": {}, "max_new": s["max_new"], "prompts": s["prompts"]}
    base = ["task=generate", f"backend.device={s['device']}", "backend.kv_window=full"]
    if s["tiny"]:  # a random pair of the shipped test options: seconds on a CPU
        base += ["target=tiny_random", "drafter=noisy_copy", "target.max_seq_len=128"]
    texts = suite_prompts(s["prompts"])
    for tree in s["pair_trees"]:
        plan = compose_plan(base + [f"tree={tree}"])
        rt = load(plan)
        ids = [rt.tokenizer.encode(t).ids[-(plan.max_seq_len // 2):] for t in texts]
        ar_rt = rt.with_drafter(NoDrafter())
        row = {"dtype": plan.target.dtype}
        for name, r in (("eager", rt), ("graph", graph_runtime(rt))):
            a = graph_runtime(ar_rt) if name == "graph" else ar_rt
            run_requests(a, ids[:1], 16)  # warm-up (and the graph captures of most buckets)
            run_requests(r, ids[:1], 16)
            sync(s["device"])
            ar, sp = run_requests(a, ids, s["max_new"]), run_requests(r, ids, s["max_new"])
            row[name] = {"ar_tok_s": ar["tok_s"], "spec_tok_s": sp["tok_s"], "tau": sp["tau"],
                         "speedup": sp["tok_s"] / ar["tok_s"], "outputs_equal_ar": sp["outputs"] == ar["outputs"]}
            if name == "graph":
                row[name]["target_graph_stats"] = dict(r.target.stats)
                row["graph_equals_eager"] = sp["outputs"] == row["_eager_outputs"]
            else:
                row["_eager_outputs"] = sp["outputs"]
        row.pop("_eager_outputs")
        res["trees"][tree] = row
    return res


# ---------------------------------------------------------------------------------------------------
# part hf: transformers generate and assisted generation
# ---------------------------------------------------------------------------------------------------
def to_hf(model: LlamaModel, layers: int | None = None):
    """Our Llama as a transformers LlamaForCausalLM on the same device and dtype (optionally its first
    `layers` layers only: an assistant sharing the target's weights)."""
    import transformers

    from runtime.models.checkpoint import ours_to_hf
    from spec_compiler.checkpoint import config_to_hf
    hf_cfg = {k: v for k, v in config_to_hf(model.config).items() if k not in ("architectures", "torch_dtype")}
    if layers is not None:
        hf_cfg["num_hidden_layers"] = layers
    w = model.tok_embeddings.weight
    config = transformers.LlamaConfig(**hf_cfg)
    with torch.device(w.device):
        hf = transformers.LlamaForCausalLM(config).to(w.dtype).eval()
    sd = {k: v for k, v in ours_to_hf(model).items()
          if layers is None or not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k or (k == "lm_head.weight" and config.tie_word_embeddings)
                                  for k in missing), (missing, unexpected)
    return hf


def hf_generate(hf, ids: torch.Tensor, n: int, dev: str, **kw) -> dict:
    """Decode tokens/s of greedy `generate` (prefill excluded: timed against a 1-token generate)."""
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    hf.generate(ids, max_new_tokens=2, min_new_tokens=2, **common, **kw)  # warm-up
    sync(dev)

    def timed(k):
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=k, min_new_tokens=k, **common, **kw)
        sync(dev)
        return time.perf_counter() - t0, out

    t1, _ = timed(1)
    tn, out = timed(n)
    new = out[0, ids.shape[1]:].tolist()
    return {"tok_s": (len(new) - 1) / max(1e-9, tn - t1), "tokens": len(new), "output": new}


@torch.inference_mode()
def part_hf(s: dict) -> dict:
    dev, dtype = s["device"], getattr(torch, s["dtype"])
    import transformers
    transformers.logging.set_verbosity_error()
    res = {}
    model = random_llama(s["arch"], dev, dtype)
    hf = to_hf(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["arch"]["vocab_size"], (1, s["prompt_len"]), generator=gen).to(dev)
    ours = model(ids, torch.arange(ids.shape[1], device=dev)[None], model.new_cache(1, ids.shape[1]), 0).float()
    ref = hf(ids).logits.float()
    res["llama_logits_rel_err"] = ((ours - ref).norm() / ref.norm()).item()
    g = hf_generate(hf, ids, s["max_new"], dev)
    asst = to_hf(model, layers=min(2, s["arch"]["num_layers"]))
    a = hf_generate(hf, ids, s["max_new"], dev, assistant_model=asst)
    res["llama"] = {"generate_tok_s": g["tok_s"], "assisted_tok_s": a["tok_s"], "assistant": "target's first 2 layers",
                    "assisted_equals_generate": a["output"] == g["output"]}
    del hf, asst, model
    if dev == "cuda":
        torch.cuda.empty_cache()
    # the default pair (tiny: a random pair written to a temporary checkpoint)
    if s["tiny"]:
        import tempfile

        from runtime.models.checkpoint import save_llama
        tmp = Path(tempfile.mkdtemp())
        save_llama(random_llama(s["arch"], "cpu", torch.float32, 0), tmp / "target")
        save_llama(random_llama({**s["arch"], "num_layers": 1}, "cpu", torch.float32, 1), tmp / "drafter")
        paths = tmp / "target", tmp / "drafter"
        prompt_ids = [torch.randint(0, s["arch"]["vocab_size"], (16,), generator=gen).tolist()]
    else:
        from spec_compiler.tokenizer import load_tokenizer
        paths = ROOT / "models/default/target", ROOT / "models/default/drafter"
        tok = load_tokenizer(paths[0])
        prompt_ids = [tok.encode(t).ids for t in suite_prompts(s["prompts"])]
    pair_dtype = torch.float32  # the plan's compute dtype for the default pair (its checkpoints are stored fp16)
    target = transformers.AutoModelForCausalLM.from_pretrained(paths[0], dtype=pair_dtype).to(dev).eval()
    drafter = transformers.AutoModelForCausalLM.from_pretrained(paths[1], dtype=pair_dtype).to(dev).eval()
    rows = {"generate": [], "assisted": [], "equal": []}
    for p in prompt_ids:
        x = torch.tensor([p], device=dev)
        g = hf_generate(target, x, s["max_new"], dev)
        a = hf_generate(target, x, s["max_new"], dev, assistant_model=drafter)
        rows["generate"].append(g["tok_s"])
        rows["assisted"].append(a["tok_s"])
        rows["equal"].append(a["output"] == g["output"])
    res["pair"] = {"dtype": str(pair_dtype).removeprefix("torch."), "generate_tok_s": statistics.mean(rows["generate"]),
                   "assisted_tok_s": statistics.mean(rows["assisted"]),
                   "assisted_equals_generate": f"{sum(rows['equal'])}/{len(rows['equal'])}"}
    res["pair"]["assisted_speedup"] = res["pair"]["assisted_tok_s"] / res["pair"]["generate_tok_s"]
    return res


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------
def fmt(x, nd=2):
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def report(out: Path) -> dict:
    merged = {}
    for part in PARTS[:-1] + ("machine",):
        f = out / f"gpu_bench_{part}.json"
        merged[part] = json.loads(f.read_text()) if f.is_file() else {"error": "not run (no result file)"}
    m = merged["machine"]
    lines = ["# GPU benchmark (issue #11)", "",
             f"{m.get('gpu', 'no GPU')} {m.get('capability', '')}, torch {m.get('torch')}, triton {m.get('triton')}, "
             f"transformers {m.get('transformers')}, mamba_ssm {m.get('mamba_ssm')}, {m.get('time_utc')} UTC", ""]
    a = merged["llama"]
    if "error" in a:
        lines += [f"**llama**: {a['error']}", ""]
    else:
        lines += [f"## Random-weight Llama ({a['params'] / 1e9:.3f} B params, {a['dtype']}, {a['prompt_len']}-token prompt)",
                  "", f"Copy bandwidth {a['copy']['gb_s']:.0f} GB/s (read + write); weight-read floor "
                  f"{a['floor_ms']:.3f} ms. AR step: eager {a['ar_step_ms']['eager']:.3f} ms "
                  f"({a['ar_vs_floor']['eager']:.2f}x floor), graph {a['ar_step_ms']['graph']:.3f} ms "
                  f"({a['ar_vs_floor']['graph']:.2f}x floor; bar: <= 1.3x). Engine AR decode: eager "
                  f"{a['engine_ar_eager_tok_s']:.1f} tok/s, graph {a['engine_ar_graph_tok_s']:.1f} tok/s.", "",
                  ]
        modes = a.get("verify_modes", ["eager", "graph"])
        if "triton" in modes:
            lines += [f"AR step with backend.attention=triton: eager {a['ar_step_ms']['triton']:.3f} ms, graph "
                          f"{a['ar_step_ms']['triton_graph']:.3f} ms ({a['ar_vs_floor']['triton_graph']:.2f}x floor).",
                          ""]
        lines += ["| nodes | " + " | ".join(f"{m} ms | {m} / AR" for m in modes) + " |",
                  "| --- |" + " --- | --- |" * len(modes)]
        lines += [f"| {r['nodes']} | " + " | ".join(f"{r[m + '_ms']:.3f} | {r[m + '_vs_ar']:.2f}" for m in modes) + " |"
                  for r in a["verify"]]
        lines += ["", "Bar: verify of 64 nodes <= 1.15x the AR step (sdpa: eager / graph; triton: the Triton "
                  "tree-attention kernel).", ""]
    b = merged["pair"]
    if "error" in b:
        lines += [f"**pair**: {b['error']}", ""]
    else:
        lines += [f"## Default pair: speculative vs own AR ({b['prompts']} prompts x {b['max_new']} tokens)", "",
                  "| tree | mode | AR tok/s | spec tok/s | speedup | tau | = AR |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for tree, row in b["trees"].items():
            for mode in ("eager", "graph"):
                r = row[mode]
                lines.append(f"| {tree} | {mode} | {r['ar_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f} | "
                             f"{r['tau']:.2f} | {r['outputs_equal_ar']} |")
        lines += ["", "Bar: speculative >= 2x own AR.", ""]
    c = merged["hf"]
    if "error" in c:
        lines += [f"**hf**: {c['error']}", ""]
    else:
        lines += ["## transformers generate / assisted generation", "",
                  "| model | generate tok/s | assisted tok/s | assisted == generate |", "| --- | --- | --- | --- |",
                  f"| the random Llama above (assistant: its first 2 layers) | {c['llama']['generate_tok_s']:.1f} | "
                  f"{c['llama']['assisted_tok_s']:.1f} | {c['llama']['assisted_equals_generate']} |",
                  f"| default pair ({c['pair']['dtype']}) | {c['pair']['generate_tok_s']:.1f} | "
                  f"{c['pair']['assisted_tok_s']:.1f} | {c['pair']['assisted_equals_generate']} |", "",
                  f"Our logits vs transformers' on the 1.1 B weights: relative error {c['llama_logits_rel_err']:.2e}.", ""]
    lines += [f"Command: `{m.get('command')}`", ""]
    (out / "gpu_bench.md").write_text("\n".join(lines))
    write(out, "gpu_bench.json", merged)
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", action="append", choices=PARTS, help="parts to run, in order (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU smoke run")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else benchmarks/gpu)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--max-new", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=4, help="local-suite prompts for the default pair")
    ap.add_argument("--pair-trees", nargs="+", default=["top3", "chain"], help="tree options for the default pair")
    args = ap.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks/gpu")
    s = settings(args)
    write(out, "gpu_bench_machine.json", {**machine(), "settings": s})
    status = 0
    for part in args.part or list(PARTS):
        t0 = time.perf_counter()
        if part == "report":
            report(out)
            print((out / "gpu_bench.md").read_text())
            continue
        try:
            data = {"llama": part_llama, "pair": part_pair, "hf": part_hf}[part](s)
        except Exception as e:  # noqa: BLE001  (a failed part is recorded; the other parts still run)
            traceback.print_exc()
            data, status = {"error": f"{type(e).__name__}: {e}"}, 1
        data["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{part}: {data['seconds']} s -> {write(out, f'gpu_bench_{part}.json', data)}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
