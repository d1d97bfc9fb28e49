"""task=compile and backend=compiled end to end on a tiny checkpoint pair: one artifact (built once per run:
AOTInductor takes ~30 s a phase on the 2-core box) serves every test here, so they share an xdist group."""
import json
import shutil

import pytest
import torch

import main
from aot.build import ensure_artifact, open_runtime
from runtime.load import load
from runtime.sampling import SamplingParams
from spec_compiler.artifact import ArtifactError, read_manifest, sha256_file
from tests.conftest import compose_config, write_checkpoint

pytestmark = pytest.mark.xdist_group("aot")

PROMPTS = ["def f(x):\n    return", "import os\nimport sys\n", "class A:\n    def __init__(self):", "x = [1, 2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(overrides, artifact dir): a static [2, 1] tree (5 nodes) over a tiny checkpoint target and its noisy copy,
    compiled
    (target phases, batch sizes 1 and 4) through the CLI's task=compile."""
    root = tmp_path_factory.mktemp("aot")
    ckpt = write_checkpoint(root / "ckpt", seed=3)
    base = ["target=hf", f"target.model.checkpoint={ckpt}", "drafter=noisy_copy", "tree=static",
            "tree.branching=[2,1]", "target.max_seq_len=128", "compile.num_prompts=1", "compile.max_new_tokens=8", "compile.roles=[target]",
            "compile.repeats=2", "compile.backends=[aoti]", f"compile.dir={root / 'artifacts'}", "compile.batch_sizes=[1,4]",
            f"task.output_dir={root / 'out'}"]
    assert main.cli(["task=compile"] + base) == 0
    (directory,) = (root / "artifacts").iterdir()
    return base, directory, ckpt


def runtimes(base, rows, extra=()):
    spec, plan, _ = main.prepare(compose_config(base + list(extra)), in_run=False)
    eager = load(plan, rows)
    spec_c, plan_c, _ = main.prepare(compose_config(base + ["backend=compiled"] + list(extra)), in_run=False)
    return eager, open_runtime(spec_c, plan_c, rows)


def outputs(rt, n=4, max_new=16, seed=0, sampling=None):
    reqs = [rt.request(rt.tokenizer.encode(p).ids, max_new, seed=seed + i) for i, p in enumerate(PROMPTS[:n])]
    for r in reqs:
        r.sampling = sampling or r.sampling
    return [r.output_ids for r in rt.generate_many(reqs)]


def test_manifest_records_plan_identity_phases_and_autotune(setup):
    _, directory, ckpt = setup
    m = read_manifest(directory)
    assert m["plan"]["backend"] == "compiled" and directory.name == m["name"]
    assert m["identity"]["device"]["kind"] == "cpu" and m["identity"]["versions"]["torch"] == torch.__version__
    assert m["identity"]["checkpoints"]["target"]["model.safetensors"] == sha256_file(ckpt / "model.safetensors")
    names = {p["phase"] for p in m["phases"]}
    assert "target-forward-tree-B1-Tdyn-keepall-R1" in names and "target-forward-tree-B4-Tdyn-keepall-R4" in names
    assert {"target-hidden-causal-B1-Tdyn-keep0-R1", "target-hidden-causal-B1-Tdyn-keep0-R4"} <= names  # prefill
    assert {"acceptance-greedy-tree-B1-T5-keepall-R1", "acceptance-greedy-tree-B4-T5-keepall-R1"} <= names
    for row in m["autotune"]:  # every phase timed under eager and AOTInductor, the faster chosen
        assert set(row["backends"]) == {"eager", "aoti"} and row["chosen"] == "aoti"  # eager: timed, not listed
        assert row["backends"]["eager"]["seconds"] > 0 and row["backends"]["aoti"]["seconds"] > 0
        assert row["backends"]["aoti"].get("max_abs_diff", 1) < 1e-3, row
    for p in m["phases"]:
        if p["backend"] == "aoti":
            assert (directory / p["file"]).is_file() and m["files"][p["file"]] == sha256_file(directory / p["file"])


@pytest.mark.parametrize("rows", [1, 4])
def test_compiled_greedy_equals_eager(setup, rows):
    base, _, _ = setup
    eager, compiled = runtimes(base, rows)
    assert outputs(compiled) == outputs(eager)
    stats = compiled.compiled.stats
    assert stats.hits[f"target-forward-tree-B{rows}-Tdyn-keepall-R{rows}"] > 0
    assert stats.hits[f"target-hidden-causal-B1-Tdyn-keep0-R{rows}"] == len(PROMPTS)  # every prompt's prefill
    assert stats.hits[f"acceptance-greedy-tree-B{rows}-T5-keepall-R1"] > 0  # the exported greedy acceptance


def test_compiled_sampling_equals_eager_for_the_same_seed(setup):
    base, _, _ = setup
    eager, compiled = runtimes(base, 4)  # sampled requests (per-request settings) through the same programs
    params = SamplingParams(temperature=1.0, top_p=0.9)
    sampled = outputs(compiled, seed=7, sampling=params)
    assert sampled == outputs(eager, seed=7, sampling=params)
    assert sampled != outputs(eager, seed=8, sampling=params)  # the seed matters: these really are samples


def test_compiling_twice_reuses_the_artifact(setup):
    base, directory, _ = setup
    before = (directory / "manifest.json").stat().st_mtime_ns
    spec, plan, _ = main.prepare(compose_config(["task=compile"] + base), in_run=False)
    _, _, what = ensure_artifact(plan, spec.compile, [1, 4], progress=False)
    assert what == "reused" and (directory / "manifest.json").stat().st_mtime_ns == before


def test_nothing_compiles_after_load(setup, monkeypatch):
    base, _, _ = setup
    eager, compiled = runtimes(base, 1)

    def forbidden(*a, **k):
        raise AssertionError("compiled during decoding")
    monkeypatch.setattr(torch.export, "export", forbidden)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", forbidden)
    monkeypatch.setattr(torch, "compile", forbidden)
    from torch._dynamo.utils import counters
    frames = sum(counters["frames"].values())
    outputs(compiled, n=2)
    assert sum(counters["frames"].values()) == frames  # no Dynamo frame was compiled
    assert sum(compiled.compiled.stats.hits.values()) > 0


def copy_with(directory, tmp_path, edit):
    """A copy of the artifact whose manifest `edit(manifest)` changed."""
    copy = tmp_path / directory.name
    shutil.copytree(directory, copy)
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy


@pytest.mark.parametrize("what,edit,expect", [
    ("device", lambda m: m["identity"].update(device={"kind": "cuda", "name": "NVIDIA H200", "capability": "9.0"}),
     "device: built for NVIDIA H200 (compute capability 9.0), this machine is CPU"),
    ("version", lambda m: m["identity"]["versions"].update(torch="2.11.0+cu128"), "torch: built with 2.11.0+cu128"),
    ("plan", lambda m: m["plan"].update(tree_parents=[-1, 0]), "plan.tree_parents: built for [-1, 0]"),
])
def test_mismatched_artifact_is_refused_naming_the_difference(setup, tmp_path, capsys, what, edit, expect):
    base, directory, _ = setup
    copy = copy_with(directory, tmp_path, edit)
    code = main.cli(base + ["backend=compiled", f"compile.artifact={copy}", "task.max_new_tokens=4"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and expect in err, err


def test_corrupt_program_is_refused_by_sha256(setup, tmp_path, capsys):
    base, directory, _ = setup
    copy = copy_with(directory, tmp_path, lambda m: None)
    program = next(p for p in (copy / "phases").iterdir() if p.suffix == ".pt2")
    program.write_bytes(program.read_bytes()[:-100])  # truncated
    assert main.cli(base + ["backend=compiled", f"compile.artifact={copy}", "task.max_new_tokens=4"]) == 2
    err = capsys.readouterr().err
    assert program.name in err and "sha256" in err, err


def test_mismatch_rebuilds_when_asked(setup, tmp_path, monkeypatch):
    base, directory, _ = setup
    copy = copy_with(directory, tmp_path, lambda m: m["identity"]["versions"].update(torch="0.0"))
    built = []
    monkeypatch.setattr("aot.build.build", lambda plan, cfg, bs, d, *a, **k: built.append((d, bs)) or read_manifest(d))
    spec, plan, _ = main.prepare(compose_config(base + ["backend=compiled", f"compile.artifact={copy}",
                                                        "compile.on_mismatch=rebuild"]), in_run=False)
    _, _, what = ensure_artifact(plan, spec.compile, [1], progress=False)
    assert what == "rebuilt" and built == [(copy, [1, 4])]


def test_checkpoint_changed_in_place_is_refused(setup, capsys):
    base, directory, ckpt = setup
    weights = ckpt / "model.safetensors"
    saved = weights.read_bytes()
    try:
        write_checkpoint(ckpt, seed=4)  # same path, same shapes, other weights
        assert main.cli(base + ["backend=compiled", "task.max_new_tokens=4"]) == 2
        err = capsys.readouterr().err
        assert "target checkpoint: model.safetensors changed since the build" in err, err
    finally:
        weights.write_bytes(saved)


def test_mamba2_target_compiled_equals_eager(tmp_path):
    """A Mamba2 target's tree and prefill phases export (SSM plans take their host facts from the key) and the
    compiled runtime decodes exactly as eager."""
    base = ["target=mamba2_tiny", "target.model.num_layers=2", "drafter=noisy_copy", "tree=chain", "tree.k=1",
            "target.max_seq_len=96", "compile.num_prompts=1", "compile.max_new_tokens=6", "compile.roles=[target]",
            "compile.repeats=1", "compile.backends=[aoti]", f"compile.dir={tmp_path}", "compile.batch_sizes=[1]"]
    eager, compiled = runtimes(base, 1)
    phases = {p["phase"]: p["backend"] for p in compiled.compiled.manifest["phases"]}
    assert phases["target-forward-tree-B1-T2-keepall-R1-F00"] == "aoti", phases
    assert outputs(compiled, n=2, max_new=12) == outputs(eager, n=2, max_new=12)
    assert compiled.compiled.stats.hits["target-forward-tree-B1-T2-keepall-R1-F00"] > 0


def test_tree_budget_auto_is_chosen_at_compile_and_read_from_the_manifest(tmp_path, monkeypatch):
    """tree.budget=auto: the compile step calibrates and records the chosen tree; a compiled run drafts that tree
    without calibrating again. (compile.backends=[eager]: no program needed to test the plumbing.)"""
    base = ["target=tiny_random", "drafter=noisy_copy", "tree=auto", "tree.max_nodes=4", "tree.num_calibration_prompts=2",
            "tree.calibration_max_new_tokens=8", "target.max_seq_len=96", "compile.num_prompts=1",
            "compile.max_new_tokens=6", "compile.repeats=1", "compile.backends=[eager]", f"compile.dir={tmp_path}"]
    spec, plan, _ = main.prepare(compose_config(base + ["task=compile"]), in_run=False)
    directory, manifest, what = ensure_artifact(plan, spec.compile, [1], progress=False)
    budget = manifest["budget"]
    assert what == "built" and budget["record"]["choice"] and budget["record"]["acceptance"]
    parents = tuple(budget["tree_parents"])

    def calibrating(*a, **k):
        raise AssertionError("calibrated again at load")
    monkeypatch.setattr("runtime.load.resolve_budget", calibrating)
    spec, plan, _ = main.prepare(compose_config(base + ["backend=compiled"]), in_run=False)
    rt = open_runtime(spec, plan, 1)
    assert rt.plan.tree_parents == parents and rt.tree_budget == budget["record"]


def test_calls_without_a_program_replay_graphs_with_kv_window_full(tmp_path):
    """On CUDA with kv_window=full, phases the autotuner left eager replay CUDA graphs per bucket. Here with the
    CPU stand-in capture backend (it re-runs the captured function over the static buffers): tokens equal eager's."""
    from runtime.compiled import attach
    from tests.gpu.test_cuda_graphs import RerunGraphs
    base = ["target=tiny_random", "target.model.num_layers=2", "drafter=noisy_copy", "tree=static",
            "tree.branching=[2,1]", "target.max_seq_len=64", "backend.kv_window=full", "compile.num_prompts=1",
            "compile.max_new_tokens=4", "compile.repeats=1", "compile.backends=[eager]", f"compile.dir={tmp_path}"]
    spec, plan, _ = main.prepare(compose_config(base + ["backend=compiled"]), in_run=False)
    directory, manifest, _ = ensure_artifact(plan, spec.compile, [1], progress=False)

    class Counting(RerunGraphs):
        captures = 0

        def capture(self, fn):
            Counting.captures += 1
            return super().capture(fn)
    graphed = attach(load(plan, 1), directory, manifest, graphs=Counting())
    eager = load(main.prepare(compose_config(base), in_run=False)[1], 1)
    assert outputs(graphed, n=2, max_new=10) == outputs(eager, n=2, max_new=10)
    assert Counting.captures > 0
