"""VocabTrim (ALGORITHMS.md §6): token selection, the trimmed head, the drafter's proposals over target
ids, greedy equality through the decode loop, and the calibration file (created once, reused, refused
when stale or corrupt). Exact-enumeration losslessness is in test_verifier_exact.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import main
from runtime import vocab_trim
from runtime.device import host
from runtime.decode import decode
from runtime.drafters import ModelDrafter
from runtime.models import mamba2
from runtime.models.llama import LlamaConfig, init_random, perturbed_copy, trim_lm_head
from runtime.sampling import ChildKind, TorchDraftSampler
from spec_compiler.errors import CheckpointError, ConfigError
from spec_compiler.plan import make_plan
from spec_compiler.tree import TreeTopology
from spec_compiler.validate import IneffectiveSettingWarning, validate

CFG = LlamaConfig(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                  max_position_embeddings=4096)
MAX_SEQ = 300


def test_select_ranks_keep_then_generated_then_prompt_then_id():
    counts = {"generated": {"7": 5, "3": 9, "60": 99}, "prompt": {"1": 4, "2": 4, "5": 8, "7": 1}}
    ids = vocab_trim.select(counts, size=6, vocab=50, must_keep=[49, 49])
    # 49 (kept), 3 and 7 (generated; 60 is beyond the drafter's vocabulary), 5 then 1, 2 (prompt), sorted
    assert ids.tolist() == [1, 2, 3, 5, 7, 49]
    assert vocab_trim.select(counts, size=3, vocab=50, must_keep=[]).tolist() == [3, 5, 7]
    # a calibration that saw few tokens is filled up by id
    assert vocab_trim.select({"generated": {}, "prompt": {}}, 4, 50, [9]).tolist() == [0, 1, 2, 9]


@pytest.mark.parametrize("arch", ["llama", "mamba2"])
def test_trimmed_head_gives_the_kept_columns(arch):
    if arch == "llama":
        model = init_random(CFG, seed=3).eval()
        emb = model.tok_embeddings.weight
    else:
        c = mamba2.Mamba2Config(vocab_size=53, d_model=32, n_layer=2, d_state=8, headdim=8, chunk_size=16)
        model = mamba2.init_random_mamba2(c, seed=3).eval()
        emb = model.backbone.embedding.weight
    emb_before = emb.detach().clone()
    ids = torch.tensor([0, 4, 5, 17, 52])
    x = torch.randint(0, 53, (1, 9))
    pos = torch.arange(9)[None]
    with torch.no_grad():
        full = model(x, pos, model.new_cache(1, 16), 0)
        trim_lm_head(model, ids)
        trimmed = model(x, pos, model.new_cache(1, 16), 0)
    assert trimmed.shape == (1, 9, 5)
    torch.testing.assert_close(trimmed, full[..., ids], rtol=1e-5, atol=1e-5)
    assert torch.equal(emb, emb_before), "the input embedding must stay whole (and untied from the head)"


def _drafter(target, topo, kind, s2t):
    model = perturbed_copy(target, 0.1, 7).eval()
    if s2t is not None:
        trim_lm_head(model, s2t)
    return ModelDrafter(model, topo, MAX_SEQ + topo.n, kind, 0.8, CFG.vocab_size, s2t=s2t)


@pytest.mark.parametrize("kind", [ChildKind.iid, ChildKind.wor, ChildKind.deterministic])
def test_drafts_and_proposals_stay_inside_the_kept_ids(kind):
    target = init_random(CFG, seed=0).eval()
    s2t = torch.tensor(sorted(torch.randperm(53, generator=torch.Generator().manual_seed(1))[:12].tolist()))
    topo = TreeTopology.static([3, 2])
    d = _drafter(target, topo, kind, s2t)
    row = SimpleNamespace(tokens=list(range(10)), slot=0, sampler=TorchDraftSampler(torch.Generator().manual_seed(0)))
    d.start(0, row.tokens)
    for step in range(3):
        row.tokens = list(range(10 + step))
        tree = d.propose([row], [5])
        assert tree.topologies[0].n == topo.n
        assert set(tree.row_tokens(0)[1:]) <= set(s2t.tolist())
        if kind is ChildKind.deterministic:
            assert tree.draft_probs is None
            continue
        p = tree.draft_probs[0, 0]
        assert abs(float(p.sum()) - 1.0) < 1e-12
        outside = torch.ones(53, dtype=torch.bool)
        outside[s2t] = False
        assert float(p[outside].abs().sum()) == 0.0


@pytest.mark.parametrize("tree", ["chain4", "static321"])
def test_greedy_equality_with_a_trimmed_drafter(tree):
    """Kept ids that miss many of the target's choices: fewer acceptances, same output."""
    target = init_random(CFG, seed=0).eval()
    topo = {"chain4": TreeTopology.chain(4), "static321": TreeTopology.static([3, 2, 1])}[tree]
    prompt = torch.randint(0, 53, (20,), generator=torch.Generator().manual_seed(5)).tolist()

    def run(drafter):
        return decode(target, target.new_cache(1, MAX_SEQ + topo.n), drafter, prompt, max_new_tokens=150,
                      max_seq_len=MAX_SEQ)

    ref = run(_drafter(target, TreeTopology.chain(0), ChildKind.deterministic, None))
    full = run(_drafter(target, topo, ChildKind.deterministic, None))
    half = torch.arange(0, 53, 2)
    res = run(_drafter(target, topo, ChildKind.deterministic, half))
    assert res.output_ids == full.output_ids == ref.output_ids
    assert any(x not in set(half.tolist()) for x in ref.output_ids), "the test needs targets outside the kept ids"
    assert 1.0 < res.tau < full.tau


# ---- through the config: calibration file ---------------------------------------------------------
def _overrides(tmp_path, **kw):
    vt = {"enabled": "true", "size": 64, "num_prompts": 2, "max_new_tokens": 6,
          "artifact": str(tmp_path / "vt.json"), **kw}
    return [f"drafter.vocab_trim.{k}={v}" for k, v in vt.items()] + [f"task.output_dir={tmp_path / 'out'}"]


def test_calibration_is_written_once_then_reused(compose, tmp_path, monkeypatch):
    from runtime.load import load
    plan = make_plan(validate(main.to_spec(compose(_overrides(tmp_path))), host()))
    assert plan.vocab_trim is not None and plan.vocab_trim.size == 64
    rt = load(plan)
    art = json.loads((tmp_path / "vt.json").read_text())
    assert art["meta"]["num_prompts"] == 2 and art["counts"]["generated_tokens"] > 0
    s2t = rt.drafter.s2t
    assert s2t.shape == (64,) and torch.equal(s2t, s2t.sort().values)
    assert set(rt.eos_ids) <= set(s2t.tolist())
    assert rt.drafter.model.output.weight.shape[0] == 64

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again instead of reading the file")
    monkeypatch.setattr(vocab_trim, "calibrate", no_calibration)
    again = load(plan)
    assert torch.equal(again.drafter.s2t, s2t)
    result = main.run(compose(_overrides(tmp_path, size=200) + ["task=bench", "prompt=import os and sys",
                                                      "drafter.model.noise_std=0.02", "task.max_new_tokens=24"]))
    assert result["tau"] > 1  # drafts were accepted, so the equality is not vacuous
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["outputs_equal_to_baseline"] == "1/1"


def test_stale_or_corrupt_calibration_is_refused(compose, tmp_path):
    from runtime.load import load
    load(make_plan(validate(main.to_spec(compose(_overrides(tmp_path))), host())))
    other = make_plan(validate(main.to_spec(compose(_overrides(tmp_path, max_new_tokens=7))), host()))
    with pytest.raises(CheckpointError) as e:
        load(other)
    assert e.value.where.endswith("vt.json") and "another target" in e.value.reason
    (tmp_path / "vt.json").write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        load(other)
    assert "unreadable" in e.value.reason


def test_default_artifact_location_is_keyed(compose, tmp_path, monkeypatch):
    from runtime.load import load
    monkeypatch.setattr(vocab_trim, "ARTIFACT_DIR", tmp_path / "artifacts")
    ov = [o for o in _overrides(tmp_path) if ".artifact=" not in o]
    plan = make_plan(validate(main.to_spec(compose(ov)), host()))
    load(plan)
    key, _ = vocab_trim.calibration_key(plan)
    assert (tmp_path / "artifacts" / f"{key}.json").is_file()


@pytest.mark.parametrize("overrides,key", [
    (["drafter=prompt_lookup", "drafter.vocab_trim.enabled=true"], "drafter.vocab_trim.enabled"),
    (["drafter.vocab_trim.enabled=true", "drafter.vocab_trim.size=64", "drafter.vocab_trim.prompts=nope.jsonl"],
     "drafter.vocab_trim.prompts"),
    (["drafter.vocab_trim.enabled=true", "drafter.vocab_trim.size=0"], "drafter.vocab_trim.size"),
    (["drafter.vocab_trim.enabled=true", "drafter.vocab_trim.num_prompts=-1"], "drafter.vocab_trim.num_prompts"),
])
def test_bad_settings_name_the_key(compose, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(main.to_spec(compose(overrides)), host())
    assert e.value.where == key


def test_unknown_keep_token_names_the_key(compose, tmp_path):
    from runtime.load import load
    plan = make_plan(validate(main.to_spec(compose(_overrides(tmp_path, keep="[no_such_token_xyz]"))), host()))
    with pytest.raises(ConfigError) as e:
        load(plan)
    assert e.value.where == "drafter.vocab_trim.keep"


def test_size_at_least_the_vocabulary_warns_and_trims_nothing(compose, tmp_path):
    with pytest.warns(IneffectiveSettingWarning, match="drafter.vocab_trim.size"):
        plan = make_plan(validate(main.to_spec(compose(_overrides(tmp_path, size=257))), host()))
    assert plan.vocab_trim is None


def test_malformed_calibration_prompts_name_the_key(compose, tmp_path):
    from runtime.load import load
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"turns": ["fine"]}\n{"no_turns": 1}\n')
    plan = make_plan(validate(main.to_spec(compose(_overrides(tmp_path, prompts=str(bad)))), host()))
    with pytest.raises(ConfigError) as e:
        load(plan)
    assert e.value.where == "drafter.vocab_trim.prompts" and "calib.jsonl:2" in e.value.reason
