"""task=compile: a plan -> its compiled artifact (spec_compiler/artifact.py says what is on disk).

    1. discover  decode calibration prompts with the eager engine at each batch size, recording every model
                 call (runtime.phases.intercept): the phases this plan really runs, with example inputs
    2. export    each phase as a tensors-only program (`runtime.phases.Phase`): torch.export, the caches as
                 inputs mutated in place, attention one opaque custom op (codegen/ops.py)
    3. compile   per backend: AOTInductor -> `<phase>.pt2`; TensorRT (`torch_tensorrt.dynamo.compile` of the
                 same exported program) where installed
    4. autotune  time eager and every compiled program on the example (median of `compile.repeats` calls on
                 this device), check each against eager's output, keep the fastest per phase; the whole table
                 goes into the manifest (on the CPU eager may win a phase: a valid, recorded outcome)
    5. manifest  the plan, identity (device, versions, checkpoint sha256), file hashes, phases, autotune table

`ensure_artifact` is what `backend=compiled` calls before loading: reuse a matching artifact, refuse (or
rebuild, compile.on_mismatch=rebuild) one that does not match, build a missing one (saying so). Only this
module compiles; the runtime (runtime/compiled.py) loads.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from runtime.compiled import drafter_module as drafter_model, load_program
from runtime.device import identity_device
from runtime.phases import (BLOCK_INPUTS, AcceptPhase, Phase, PhaseKey, accept_key, cache_kind, clone_strided,
                            intercept)
from spec_compiler.artifact import (ArtifactError, artifact_dir, check, identity, read_manifest, verify_files,
                                    write_manifest)
from spec_compiler.errors import ConfigError
from spec_compiler.plan import Plan
from spec_compiler.prompts import read_question_file
from spec_compiler.schema import CompileConfig
from spec_compiler.validate import resolve_path

MAX_ABS_DIFF = 1e-3
"""A compiled program whose output on its example differs from eager's by more is rejected (recorded)."""


@dataclasses.dataclass
class Example:
    """One recorded call: inputs (cloned before the call; caches with their strides) and eager's output."""

    key: PhaseKey
    inputs: list[torch.Tensor]
    kind: str
    capacity: int
    output: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[1]) * int(self.inputs[4].shape[-1])  # T x S


# ---- 1. discover ---------------------------------------------------------------------------------------
def discover(rt, roles: list[str], batch_sizes: list[int], prompts: list[list[int]], max_new_tokens: int,
             static_tree: bool) -> tuple[dict[PhaseKey, Example], dict[PhaseKey, int]]:
    """Decode `prompts` at each batch size with the eager engine; per program key (T dynamic unless
    static_tree and a tree block) the largest call as its example, and how often each key was called."""
    examples: dict[PhaseKey, Example] = {}
    calls: dict[PhaseKey, int] = {}

    def program_key(key: PhaseKey) -> PhaseKey:
        # SSM forwards branch on T (one token: the recurrence once; a causal block: the chunked scan over
        # T // chunk chunks), so their programs keep T static
        return key if ((static_tree and not key.advance) or key.flags) else key.dynamic()

    for B in batch_sizes:
        rtb = rt.with_batch_size(B)
        removers = []
        for role in roles:
            model = rtb.target if role == "target" else drafter_model(rtb.drafter)
            if model is None:
                continue

            def on_call(key, run, inputs, cache, call):
                before = [t.clone() for t in inputs[:len(BLOCK_INPUTS)]] + \
                    [clone_strided(t) for t in inputs[len(BLOCK_INPUTS):]]
                out = run()
                pk = program_key(key)
                calls[pk] = calls.get(pk, 0) + 1
                ex = Example(pk, before, cache_kind(cache), cache.capacity, out.detach().clone())
                if pk not in examples or ex.size > examples[pk].size:
                    examples[pk] = ex
                return out
            removers.append(intercept(model, role, on_call))
        try:
            n = max(B, len(prompts))
            reqs = [rtb.request(prompts[i % len(prompts)], max_new_tokens, seed=i) for i in range(n)]
            rtb.generate_many(reqs)
        finally:
            for r in removers:
                r()
    return examples, calls


def acceptance_examples(examples: dict[PhaseKey, Example]) -> dict[PhaseKey, Example]:
    """Greedy acceptance phases, one per target verify example (its logits and tree): inputs (logits,
    parents, tokens), output the packed walk (`runtime.phases.AcceptPhase`)."""
    from codegen.fused_accept import fused_accept_ref
    out = {}
    for key, ex in examples.items():
        if key.role != "target" or key.method != "forward" or key.advance or ex.output.shape[1] < 2:
            continue
        tokens, parent_slots, lengths = ex.inputs[0], ex.inputs[3], ex.inputs[5]
        parents = torch.where(parent_slots >= lengths[:, None], parent_slots - lengths[:, None],
                              torch.full_like(parent_slots, -1))
        logits = ex.output
        k = accept_key(*tokens.shape)
        out[k] = Example(k, [logits, parents.contiguous(), tokens.contiguous()], "accept", 0,
                         fused_accept_ref(logits, parents, tokens, tokens.shape[1] - 1).packed)
    return out


def eager_acceptance(ex: Example):
    """The engine's own greedy acceptance (runtime.sampling.accept_greedy) over the example's trees."""
    from runtime.batch import TreeBatch
    from runtime.sampling import accept_greedy
    from spec_compiler.tree import Provenance, TreeTopology
    logits, parents, tokens = ex.inputs
    topos, toks, provs = [], [], []
    for par, tok in zip(parents.tolist(), tokens.tolist()):
        n = 1 + sum(p >= 0 for p in par)
        topos.append(TreeTopology(tuple(par[:n])))
        toks.append(tok[:n])
        provs.append([Provenance.root] + [Provenance.topk] * (n - 1))
    tree = TreeBatch.build(topos, toks, provs, tokens.shape[1])
    return lambda logits, parents, tokens: accept_greedy(tree, logits)


# ---- 2. export -----------------------------------------------------------------------------------------
def dynamic_shapes(key: PhaseKey, num_cache: int, live_window: bool, capacity: int) -> tuple:
    """torch.export's dynamic_shapes for a phase's inputs: T dynamic unless the key fixes it, S under a live
    window, both below the capacity C (a window of all C slots is another layout; the runtime checks)."""
    Dim = torch.export.Dim
    T = Dim("T", min=1, max=capacity - 1) if key.T is None else None
    S = Dim("S", min=2, max=capacity - 1) if live_window else None
    bt = {1: T} if T is not None else None
    mask = {d: v for d, v in ((1, T), (2, S)) if v is not None} or None
    anc = {d: v for d, v in ((1, T), (2, T)) if v is not None} or None
    return (bt, bt, bt, bt, mask, None, anc, bt, (None,) * num_cache)  # the cache tensors: Phase's *cache


def export_phase(model: torch.nn.Module, ex: Example, live_window: bool):
    """torch.export of `model` at `ex`'s phase -> ExportedProgram."""
    if ex.kind == "accept":
        with torch.no_grad():
            return torch.export.export(AcceptPhase(), tuple(ex.inputs), strict=False)
    phase = Phase(model, ex.key, ex.kind, ex.capacity).eval()
    inputs = tuple(clone_strided(t) for t in ex.inputs)
    shapes = dynamic_shapes(ex.key, len(inputs) - len(BLOCK_INPUTS), live_window, ex.capacity)
    with torch.no_grad():
        return torch.export.export(phase, inputs, dynamic_shapes=shapes, strict=False)


# ---- 3. compile ----------------------------------------------------------------------------------------
def compile_aoti(ep, path: Path) -> Path:
    return Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(path)))


def compile_backend(backend: str, ep, ex: Example, path_stem: Path) -> Path:
    if backend == "aoti":
        return compile_aoti(ep, path_stem.with_suffix(".pt2"))
    if backend == "tensorrt":
        from aot.tensorrt import compile_tensorrt
        return compile_tensorrt(ep, ex.inputs, path_stem.with_suffix(".trt.ep"))
    raise ValueError(backend)


# ---- 4. autotune ---------------------------------------------------------------------------------------
def time_call(fn, inputs: list[torch.Tensor], repeats: int) -> float:
    """Median seconds of fn(*inputs) over `repeats` calls after 3 warm-up calls (synchronised on CUDA)."""
    cuda = inputs[0].device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(3 + repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(*inputs)
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def eager_call(model, ex: Example):
    """The eager reference of a model phase: the model's own forward over the example's tensors."""
    return Phase(model, ex.key, ex.kind, ex.capacity).eval()


# ---- the whole build -----------------------------------------------------------------------------------
def calibration_prompts(cfg: CompileConfig, tokenizer, max_len: int) -> list[list[int]]:
    qs = read_question_file(cfg.calibration_prompts, "compile.calibration_prompts")[:cfg.num_prompts]
    out = []
    for q in qs:
        ids = tokenizer.encode(q.turns[0]).ids[-(max_len // 2):]
        if ids:
            out.append(ids)
    if not out:
        raise ConfigError("compile.calibration_prompts", "no prompt tokenizes to at least one token",
                          cfg.calibration_prompts)
    return out


def checkpoints(plan: Plan) -> dict[str, Optional[str]]:
    """The files whose content the artifact depends on: checkpoint directories, a separate tokenizer file."""
    out = {"target": plan.target.checkpoint}
    if plan.drafter is not None:
        out["drafter"] = plan.drafter.checkpoint
    if plan.tokenizer is not None and plan.target.checkpoint is not None \
            and Path(plan.tokenizer).parent != Path(plan.target.checkpoint):
        out["tokenizer"] = plan.tokenizer
    if plan.vocab_trim is not None and plan.vocab_trim.artifact is not None:
        out["vocab_trim"] = plan.vocab_trim.artifact
    return out


def build(plan: Plan, cfg: CompileConfig, batch_sizes: list[int], directory: Path, command: str = "",
          progress: bool = True) -> dict:
    """Compile `plan` into `directory` (emptied first); returns the manifest."""
    from runtime.load import load
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "phases").mkdir(parents=True)
    t_start = time.perf_counter()
    rt = load(plan, max(batch_sizes))
    dev = identity_device(plan.device)
    static_tree = cfg.static_tree if cfg.static_tree is not None else plan.device == "cuda"
    live = plan.kv_window == "live"
    prompts = calibration_prompts(cfg, rt.tokenizer, plan.max_seq_len)
    examples, calls = discover(rt, list(cfg.roles), batch_sizes, prompts, cfg.max_new_tokens, static_tree)
    if plan.greedy and "target" in cfg.roles:
        accepts = acceptance_examples(examples)
        examples.update(accepts)
        calls.update({k: 0 for k in accepts})  # (not counted: one per verify call of that shape)
    backends = [b.value for b in cfg.backends if b.value != "eager"]
    models = {"target": rt.target, "drafter": drafter_model(rt.drafter), "acceptance": None}
    phases, table = [], []
    bar = tqdm(total=len(examples) * (1 + len(backends)), desc=f"compile {plan.readable_name}", unit="step",
               disable=not progress, file=sys.stderr)
    for key, ex in sorted(examples.items(), key=lambda kv: kv[0].name):
        model = models[key.role]
        row = {"phase": key.name, "key": key.to_dict(), "calls": calls[key],
               "example": {"T": int(ex.inputs[0].shape[1]),
                           "S": int(ex.inputs[4].shape[-1]) if ex.kind != "accept" else 0}, "backends": {}}
        ref = eager_acceptance(ex) if ex.kind == "accept" else eager_call(model, ex)
        row["backends"]["eager"] = {"seconds": time_call(ref, [clone_strided(t) for t in ex.inputs], cfg.repeats)}
        bar.update(1)
        try:
            ep = export_phase(model, ex, live)
            export_error = None
        except Exception as e:  # recorded: this phase runs eager
            ep, export_error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        for backend in backends:
            bar.set_postfix_str(f"{key.name} {backend}")
            entry = row["backends"][backend] = {}
            if ep is None:
                entry["error"] = f"export failed: {export_error}"
                bar.update(1)
                continue
            try:
                path = compile_backend(backend, ep, ex, directory / "phases" / f"{key.name}.{backend}")
                run = load_program(backend, path)
                inputs = [clone_strided(t) for t in ex.inputs]
                with torch.inference_mode():
                    out = run(*inputs)
                diff = float((out.float() - ex.output.float()).abs().max()) if out.numel() else 0.0
                entry.update(file=str(path.relative_to(directory)), max_abs_diff=diff,
                             seconds=time_call(run, [clone_strided(t) for t in ex.inputs], cfg.repeats))
                if not diff <= MAX_ABS_DIFF:
                    entry["error"] = f"output differs from eager by {diff:.3g} (> {MAX_ABS_DIFF})"
            except Exception as e:  # recorded: another backend (eager at worst) takes the phase
                entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if "--debug" in sys.argv:
                    traceback.print_exc()
            bar.update(1)
        listed = [b.value for b in cfg.backends]
        ok = {b: e for b, e in row["backends"].items() if "error" not in e and "seconds" in e and b in listed}
        row["chosen"] = min(ok, key=lambda b: ok[b]["seconds"]) if ok else "eager"  # eager: the fallback
        for b, e in row["backends"].items():  # unchosen programs are not kept
            if b != row["chosen"] and "file" in e:
                (directory / e.pop("file")).unlink(missing_ok=True)
        table.append(row)
        phases.append({"phase": key.name, "key": key.to_dict(), "backend": row["chosen"],
                       "file": row["backends"][row["chosen"]].get("file"),
                       "cache_strides": [list(t.stride()) for t in ex.inputs[len(BLOCK_INPUTS):]],
                       "dtypes": [str(t.dtype) for t in ex.inputs], "live_window": live,
                       "capacity": ex.capacity})
    bar.close()
    manifest = {
        "plan": plan.to_dict(), "plan_hash": plan.plan_hash(), "name": plan.readable_name,
        "identity": identity(dev, checkpoints(plan)),
        "budget": None if plan.tree_budget is None else {"tree_parents": list(rt.plan.tree_parents),
                                                          "record": rt.tree_budget},
        "batch_sizes": list(batch_sizes), "roles": list(cfg.roles), "static_tree": static_tree,
        "backends": [b.value for b in cfg.backends], "phases": phases, "autotune": table,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.perf_counter() - t_start, 1),
        "command": command,
    }
    write_manifest(directory, manifest)
    return read_manifest(directory)


def ensure_artifact(plan: Plan, cfg: CompileConfig, batch_sizes: list[int], command: str = "",
                    progress: bool = True) -> tuple[Path, dict, str]:
    """(directory, manifest, what happened: reused | built | rebuilt) for `plan` on this machine."""
    directory = resolve_path(cfg.artifact) if cfg.artifact is not None else \
        artifact_dir(resolve_path(cfg.dir), plan.readable_name)
    manifest = read_manifest(directory)
    if manifest is not None:
        want = identity(identity_device(plan.device), checkpoints(plan))
        diffs = check(manifest, plan.to_dict(), want)
        missing = sorted(set(batch_sizes) - set(manifest.get("batch_sizes", [])))
        if missing and not diffs:
            diffs = [f"batch sizes {missing} not compiled (the artifact has {manifest.get('batch_sizes')})"]
        if not diffs:
            verify_files(directory, manifest)
            return directory, manifest, "reused"
        if cfg.on_mismatch.value == "refuse":
            raise ArtifactError(str(directory), "built for something else: " + "; ".join(diffs[:6]) +
                                ("; ..." if len(diffs) > 6 else "") + ". Delete it or set compile.on_mismatch=rebuild")
        print(f"rebuilding {directory}: " + "; ".join(diffs[:3]), file=sys.stderr)
        batch_sizes = sorted(set(batch_sizes) | set(manifest.get("batch_sizes", [])))
        what = "rebuilt"
    else:
        what = "built"
        if directory.exists() and any(directory.iterdir()):
            print(f"{directory} holds no finished artifact (no manifest.json): building it again", file=sys.stderr)
    print(f"compiling {plan.readable_name} into {directory} (batch sizes {batch_sizes}; reused on later runs)",
          file=sys.stderr)
    return directory, build(plan, cfg, batch_sizes, directory, command, progress), what


def compile_summary(directory: Path, manifest: dict) -> str:
    """The autotune table as markdown (per phase: seconds per backend, the choice)."""
    backends = ["eager"] + [b for b in manifest["backends"] if b != "eager"]
    lines = [f"artifact `{directory}` ({manifest['name']}, built in {manifest['build_seconds']} s)", "",
             "| phase | calls | T x S | " + " | ".join(f"{b} ms" for b in backends) + " | chosen |",
             "|---|---|---|" + "---|" * len(backends) + "---|"]
    for row in manifest["autotune"]:
        cells = []
        for b in backends:
            e = row["backends"].get(b, {})
            cells.append("-" if "seconds" not in e else f"{1e3 * e['seconds']:.3f}" + (" (rejected)" if "error" in e else ""))
            if "seconds" not in e and "error" in e:
                cells[-1] = "failed"
        ex = row["example"]
        lines.append(f"| {row['phase']} | {row['calls']} | {ex['T']} x {ex['S']} | " + " | ".join(cells) +
                     f" | {row['chosen']} |")
    return "\n".join(lines)


def main_compile(plan: Plan, cfg: CompileConfig, batch_sizes: list[int], out: Path, command: str) -> dict:
    """task=compile: ensure the artifact; write the autotune table next to the run's result."""
    directory, manifest, what = ensure_artifact(plan, cfg, batch_sizes, command)
    text = compile_summary(directory, manifest)
    print(f"{what}: {directory}\n\n{text}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "autotune.md").write_text(text + "\n")
        (out / "autotune.json").write_text(json.dumps(manifest["autotune"], indent=2))
    return {"artifact": str(directory), "status": what, "phases": len(manifest["phases"]),
            "chosen": {r["phase"]: r["chosen"] for r in manifest["autotune"]}}


def compile_batch_sizes(spec) -> list[int]:
    """The batch sizes to compile for: compile.batch_sizes, else the run's (task.batch_size(s); serving: 1 and
    serving.max_batch_size, the batch sizes a server spends most steps at under low and high load)."""
    if spec.compile.batch_sizes:
        return sorted(set(spec.compile.batch_sizes))
    if spec.task.kind.value in ("serve", "loadtest"):
        return sorted({1, spec.serving.max_batch_size})
    return sorted(set(spec.task.batch_sizes or [spec.task.batch_size]))


def open_runtime(spec, plan: Plan, rows: int, command: str = ""):
    """The run's runtime: `runtime.load.load`, then, for backend=compiled, its artifact attached (built first
    when missing)."""
    from runtime.compiled import attach
    from runtime.load import load
    if plan.backend != "compiled":
        return load(plan, rows)
    directory, manifest, _ = ensure_artifact(plan, spec.compile, compile_batch_sizes(spec), command)
    budget = manifest.get("budget")  # tree.budget=auto: the tree chosen at compile time (no calibration now)
    rt = load(plan, rows, tree_parents=None if budget is None else budget["tree_parents"])
    if budget is not None:
        rt = dataclasses.replace(rt, tree_budget=budget["record"])
    rt = attach(rt, directory, manifest)
    print(rt.compiled.summary(), file=sys.stderr)
    return rt
