"""The newcomer's bad inputs (issue #15) as one table: each exits 2 with one `error:` line naming the key path
or file and the reason, prints no traceback, and leaves nothing on disk (it is caught before Hydra makes a
run folder). Run in-process through `main.cli(argv)`, the function `python main.py` calls.
"""
import json
import os
import warnings

import pytest
import torch

import main
from spec_compiler.validate import IneffectiveSettingWarning
from tests.conftest import compose_config, write_checkpoint

BASE = ["target=tiny_random", "drafter=noisy_copy", "tree=chain", "task=generate", "task.max_new_tokens=4",
        "target.max_seq_len=64"]


def argv_of(argv: list[str], files) -> list[str]:
    """BASE, minus the keys `argv` sets itself, then `argv` (`-m` first, as it is typed)."""
    argv = [a.format(d=files) for a in argv]
    keys = {a.split("=", 1)[0] for a in argv}
    flags = [a for a in argv if a == "-m"]
    return flags + [b for b in BASE if b.split("=", 1)[0] not in keys] + [a for a in argv if a != "-m"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "latin1.txt").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (d / "empty.txt").write_text("")
    (d / "long.txt").write_text("x = 1\n" * 200)
    (d / "bad.jsonl").write_text('{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2, "turns": "no list"}\n')
    (d / "notjson.jsonl").write_text("{not json\n")
    (d / "latin1.jsonl").write_bytes(b'{"turns": ["caf\xe9"]}\n')
    (d / "emptyturn.jsonl").write_text('{"question_id": 1, "turns": [""]}\n')
    (d / "q.jsonl").write_text('{"question_id": 1, "turns": ["def f():"]}\n')
    (d / "regular_file").write_text("")
    (d / "no_config").mkdir()
    write_checkpoint(d / "small_vocab", vocab_size=200)
    write_checkpoint(d / "ctx96", max_position_embeddings=96)
    return d


# (id, argv (after BASE), key path or file in the error line, words of the reason)
CASES = [
    ("bad-group-option", ["tree=nope"], "tree/nope", "Available options"),
    ("bad-drafter-option", ["drafter=nonexistent"], "drafter/nonexistent", "Could not find"),
    ("wrong-type-int", ["tree.k=abc"], "tree.k=abc", "converted to Integer"),
    ("wrong-type-float", ["sampling.temperature=hot"], "sampling.temperature", "converted to Float"),
    ("wrong-type-enum", ["tree.children=best"], "tree.children", "Invalid value 'best'"),
    ("unknown-key", ["tree.foo=1"], "tree.foo", "not in 'TreeConfig'"),
    ("plus-unknown-key", ["+tree.depth=3"], "tree.depth", "unknown key"),
    ("plus-unknown-top-key", ["+temperature=0.5"], "temperature", "unknown key"),
    ("grammar-parenthesis", ["prompt=def parse(line):"], "prompt=def parse(line):", "mismatched input '('"),
    ("sweep-without-m", ["tree=chain,static"], "tree=chain,static", "Ambiguous value"),
    ("negative-max-new-tokens", ["task.max_new_tokens=-1"], "task.max_new_tokens", "must be >= 1"),
    ("zero-max-new-tokens", ["task.max_new_tokens=0"], "task.max_new_tokens", "must be >= 1"),
    ("zero-num-prompts", ["task.num_prompts=0"], "task.num_prompts", "-1 (all) or >= 1"),
    ("zero-repeats", ["task.repeats=0"], "task.repeats", "must be >= 1"),
    ("negative-k", ["tree.k=-1"], "tree.k", "must be >= 0"),
    ("branching-zero", ["tree=static", "tree.branching=[2,0]"], "tree.branching[1]", ">= 1 child"),
    ("branching-empty", ["tree=static", "tree.branching=[]"], "tree.branching", "at least one level"),
    ("temperature-negative", ["sampling.temperature=-1"], "sampling.temperature", "must be >= 0"),
    ("top-p-zero", ["sampling.top_p=0"], "sampling.top_p", "(0, 1]"),
    ("top-p-above-one", ["sampling.top_p=1.5"], "sampling.top_p", "(0, 1]"),
    ("top-k-negative", ["sampling.top_k=-1"], "sampling.top_k", "must be >= 0"),
    ("biased-acceptance", ["sampling=sample", "sampling.acceptance=rrs_draft_probs"], "sampling.acceptance",
     "biased"),
    ("drafter-temperature", ["drafter.temperature=0"], "drafter.temperature", "must be > 0"),
    ("max-seq-len-one", ["target.max_seq_len=1"], "target.max_seq_len", "must be >= 2"),
    ("missing-checkpoint-dir", ["target=hf", "target.model.checkpoint=/nonexistent/ckpt"],
     "target.model.checkpoint", "not found"),
    ("checkpoint-unset", ["target=hf"], "target.model.checkpoint", "required when source=checkpoint"),
    ("checkpoint-without-config", ["target=hf", "target.model.checkpoint={d}/no_config"],
     "target.model.checkpoint", "config.json"),
    ("max-seq-len-beyond-checkpoint", ["target=hf", "target.model.checkpoint={d}/ctx96", "target.max_seq_len=4096"],
     "target.max_seq_len", "max_position_embeddings (96)"),
    ("drafter-vocab-smaller", ["drafter=model", "drafter.model.checkpoint={d}/small_vocab"],
     "drafter.model.vocab_size", "smaller than the target's"),
    ("random-drafter-vocab-300", ["drafter=model", "drafter.model.source=random", "drafter.model.vocab_size=300"],
     "drafter.model.vocab_size", "larger than the target's"),
    ("vocab-trim-without-model", ["drafter=prompt_lookup", "drafter.vocab_trim.enabled=true"],
     "drafter.vocab_trim.enabled", "trims a draft model"),
    ("prompt-file-not-utf8", ["prompt_file={d}/latin1.txt"], "prompt_file", "not UTF-8"),
    ("prompt-file-empty", ["prompt_file={d}/empty.txt"], "prompt_file", "empty"),
    ("prompt-file-missing", ["prompt_file={d}/nope.txt"], "prompt_file", "not found"),
    ("prompts-missing", ["prompts={d}/nope.jsonl"], "prompts", "not found"),
    ("prompts-bad-row", ["prompts={d}/bad.jsonl"], "prompts", "bad.jsonl:2"),
    ("prompts-not-json", ["prompts={d}/notjson.jsonl"], "prompts", "notjson.jsonl:1"),
    ("prompts-not-utf8", ["prompts={d}/latin1.jsonl"], "prompts", "not UTF-8"),
    ("prompts-empty-turn", ["prompts={d}/emptyturn.jsonl"], "prompts", "a turn is empty"),
    ("prompt-empty", ["prompt="], "prompt", "is empty"),
    ("prompt-and-prompts", ["prompt=hi", "prompts={d}/q.jsonl"], "prompts", "only one of"),
    ("prompt-too-long", ["prompt_file={d}/long.txt"], "question 0", "do not fit the context"),
    ("output-dir-under-file", ["task.output_dir={d}/regular_file/out"], "task.output_dir", "is a file"),
    ("sweep-bad-job", ["-m", "tree=chain,static", "tree.k=-1"], "tree.k", "must be >= 0"),
]
if torch.cuda.is_available():
    CASES = [c for c in CASES if c[0] != "cuda-missing"]
else:
    CASES.append(("cuda-missing", ["backend.device=cuda"], "backend.device", "CUDA is not available"))
    CASES.append(("triton-on-cpu", ["backend.attention=triton"], "backend.attention", "CUDA only"))
    CASES.append(("mamba-ssm-on-cpu", ["backend.ssm_prefill=mamba_ssm"], "backend.ssm_prefill", "CUDA only"))


@pytest.mark.parametrize("argv,where,reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_line(argv, where, reason, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # Hydra's default run folders would appear here
    before = sorted(p.name for p in files.iterdir())
    code = main.cli(argv_of(argv, files))
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err + out
    assert len(lines) == 1, err
    assert where in lines[0] and reason in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # no outputs/DATE/TIME (or multirun) folder
    assert sorted(p.name for p in files.iterdir()) == before


def test_the_table_covers_the_issue():
    assert len(CASES) >= 39


@pytest.mark.parametrize("argv,key", [
    (["tree=chain", "tree.branching=[2,2]"], "tree.branching"),
    (["tree=static", "tree.branching=[2]", "tree.k=2"], "tree.k"),
    (["task.max_new_tokens=64", "target.max_seq_len=64"], "task.max_new_tokens"),
    (["target=hf", "target.model.checkpoint={d}/ctx96", "target.model.hidden_size=999"], "target.model.hidden_size"),
    (["prompt_file={d}/long.txt", "target.max_seq_len=1400", "task.max_new_tokens=900"], "task.max_new_tokens"),
])
def test_setting_without_effect_warns(argv, key, files):
    cfg = compose_config(argv_of(argv, files), shrink=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        main.prepare(cfg)
    assert any(issubclass(x.category, IneffectiveSettingWarning) and str(x.message).startswith(key) for x in w), \
        [str(x.message) for x in w]


def test_max_seq_len_defaults_to_the_checkpoint(files):
    spec, plan, _ = main.prepare(compose_config(argv_of(["target=hf", "target.model.checkpoint={d}/ctx96", "target.max_seq_len=null"], files),
                                                shrink=False))
    assert spec.target.max_seq_len == 96 and plan.max_seq_len == 96


def test_existing_answers_are_not_overwritten(files, tmp_path, capsys):
    out = tmp_path / "out"
    args = BASE + [f"prompts={files}/q.jsonl", f"task.output_dir={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    _, plan, job = main.prepare(compose_config(args, shrink=False))
    out.mkdir()
    job.answers.write_text(json.dumps({"question_id": 9}) + "\n")
    before = job.answers.read_bytes()
    assert main.cli(args) == 2
    assert "task.resume" in capsys.readouterr().err
    assert job.answers.read_bytes() == before
    job.answers.write_text("{broken\n" + json.dumps({"question_id": 9}) + "\n")
    assert main.cli(args + ["task.resume=true"]) == 2
    assert "not an answer row" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
