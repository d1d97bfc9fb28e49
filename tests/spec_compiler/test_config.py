"""Layer 9 (TESTING.md): config composition, validation and the frozen plan.

Every combination of `conf/` groups composes, validates and plans; every malformed setting raises one
typed error naming its key path; misspelled keys and wrong types fail at compose time; settings with
no effect warn.
"""
import dataclasses
import itertools
import json
import shutil

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from tokenizers import Tokenizer, models

import main
from runtime.device import host
from spec_compiler.errors import CheckpointError, ConfigError, InputError
from spec_compiler.plan import Plan, make_plan
from spec_compiler.validate import IneffectiveSettingWarning, validate
from tests.conftest import write_checkpoint

ignore_ineffective = pytest.mark.filterwarnings("ignore::spec_compiler.validate.IneffectiveSettingWarning")


def plan_of(cfg) -> Plan:
    return make_plan(validate(main.to_spec(cfg), host()))


def listify(x):
    """What JSON makes of a value: tuples become lists, recursively."""
    if isinstance(x, dict):
        return {k: listify(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [listify(v) for v in x]
    return x


# ---- every combination of groups ---------------------------------------------------------------

COMBOS = list(itertools.product(["tiny_random", "hf"], ["none", "model", "noisy_copy", "prompt_lookup"],
                                ["chain", "static"], ["greedy", "sample"], ["generate", "bench"]))


@ignore_ineffective
@pytest.mark.parametrize("target,drafter,tree,sampling,task", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_group_combination_plans(compose, tiny_checkpoint, target, drafter, tree, sampling, task):
    overrides = [f"target={target}", f"drafter={drafter}", f"tree={tree}", f"sampling={sampling}", f"task={task}"]
    if target == "hf":
        overrides.append(f"target.model.checkpoint={tiny_checkpoint}")
    if drafter == "model":
        overrides.append(f"drafter.model.checkpoint={tiny_checkpoint}")
    plan = plan_of(compose(overrides))

    assert plan.drafter_kind == {"noisy_copy": "model"}.get(drafter, drafter)
    assert plan.tree_policy == tree
    assert plan.greedy == (sampling == "greedy")
    assert (plan.drafter is None) == (drafter in ("none", "prompt_lookup"))
    assert plan.target.source == ("checkpoint" if target == "hf" else "random")
    assert plan.tree_parents[0] == -1 and (len(plan.tree_parents) == 1) == (drafter == "none")
    assert plan.cache_capacity == plan.max_seq_len + len(plan.tree_parents)
    json.loads(plan.to_json())


# ---- the frozen plan ---------------------------------------------------------------------------

def test_plan_is_frozen(compose):
    plan = plan_of(compose([]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.temperature = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.target.seed = 3


@ignore_ineffective
def test_plan_json_round_trips(compose, tiny_checkpoint):
    plan = plan_of(compose(["target=hf", f"target.model.checkpoint={tiny_checkpoint}", "tree=static",
                            "sampling=sample", "tree.children=wor"]))
    text = plan.to_json()
    back = json.loads(text)
    assert back == listify(plan.to_dict())
    assert json.dumps(back, sort_keys=True, separators=(",", ":")) == text


def test_plan_hash_is_stable_and_keyed_by_the_plan(compose):
    a, b = plan_of(compose(["tree.k=4"])), plan_of(compose(["tree.k=4"]))
    assert a == b and a.plan_hash() == b.plan_hash()
    assert plan_of(compose(["tree.k=3"])).plan_hash() != a.plan_hash()
    # run-time settings are not part of the plan
    assert plan_of(compose(["tree.k=4", "task.max_new_tokens=20", "sampling.seed=7"])).plan_hash() == a.plan_hash()


def test_plan_hash_ignores_ordering(compose, monkeypatch):
    overrides = ["tree=static", "sampling=sample", "sampling.top_k=5", "drafter.model.noise_std=0.1"]
    a = plan_of(compose(overrides))
    b = plan_of(compose(overrides[::-1]))
    assert a.plan_hash() == b.plan_hash()
    reference = a.plan_hash()
    monkeypatch.setattr(Plan, "to_dict", lambda self: dict(reversed(dataclasses.asdict(self).items())))
    assert a.plan_hash() == reference


def test_branching_list_and_tuple_give_the_same_plan(compose):
    spec = main.to_spec(compose(["tree=static"]))
    assert isinstance(spec.tree.branching, list)
    as_tuple = dataclasses.replace(spec, tree=dataclasses.replace(spec.tree, branching=(4, 2, 2, 1)))
    a, b = make_plan(validate(spec, host())), make_plan(validate(as_tuple, host()))
    assert isinstance(a.tree_parents, tuple)
    assert a == b and a.to_json() == b.to_json() and a.plan_hash() == b.plan_hash()


# ---- malformed configs: one typed error naming the key path ------------------------------------

BIASED = {  # (tree / drafter overrides, acceptance rule) pairs that are biased at temperature > 0
    "static-topk-rrs_draft_probs": (["tree=static", "tree.children=topk"], "rrs_draft_probs"),
    "static-wor-rrs_draft_probs": (["tree=static", "tree.children=wor"], "rrs_draft_probs"),
    "static-topk-rrs_wor": (["tree=static", "tree.children=topk"], "rrs_wor"),
    "prompt_lookup-rrs_draft_probs": (["drafter=prompt_lookup"], "rrs_draft_probs"),
}

CONFIG_ERRORS = {  # id: (overrides, expected `where`); {ckpt} is the tiny checkpoint
    "tree.k<0": (["tree.k=-1"], "tree.k"),
    "branching-zero": (["tree=static", "tree.branching=[4,0,2]"], "tree.branching[1]"),
    "temperature<0": (["sampling.temperature=-0.5"], "sampling.temperature"),
    "top_p=0": (["sampling=sample", "sampling.top_p=0"], "sampling.top_p"),
    "top_p>1": (["sampling=sample", "sampling.top_p=1.5"], "sampling.top_p"),
    "top_k<0": (["sampling=sample", "sampling.top_k=-1"], "sampling.top_k"),
    "drafter-vocab-too-big-random": (["drafter=model", "drafter.model.source=random",
                                      "drafter.model.vocab_size=1000"], "drafter.model.vocab_size"),
    "drafter-model-without-checkpoint": (["drafter=model"], "drafter.model.checkpoint"),
    "hf-missing-checkpoint-dir": (["target=hf", "target.model.checkpoint=/nonexistent/ckpt"],
                                  "target.model.checkpoint"),
    "target_copy-target": (["target.model.source=target_copy"], "target.model.source"),
    "num_heads-not-dividing-hidden": (["target.model.num_heads=3", "target.model.num_kv_heads=1"],
                                      "target.model.hidden_size"),
    "num_kv_heads-not-dividing-heads": (["target.model.num_kv_heads=3"], "target.model.num_kv_heads"),
    "odd-head-dim": (["target.model.hidden_size=36", "target.model.num_heads=4"], "target.model.hidden_size"),
    "max_ngram<min_ngram": (["drafter=prompt_lookup", "drafter.prompt_lookup.min_ngram=3",
                             "drafter.prompt_lookup.max_ngram=2"], "drafter.prompt_lookup.max_ngram"),
    "min_ngram=0": (["drafter=prompt_lookup", "drafter.prompt_lookup.min_ngram=0"],
                    "drafter.prompt_lookup.min_ngram"),
    "max_new_tokens=0": (["task.max_new_tokens=0"], "task.max_new_tokens"),
    "num_prompts=0": (["task.num_prompts=0"], "task.num_prompts"),
    "repeats=0": (["task.repeats=0"], "task.repeats"),
    "tree-over-half-context": (["tree=static", "target.max_seq_len=64"], "tree"),
    "max_seq_len<2": (["drafter=none", "tree.k=0", "target.max_seq_len=1"], "target.max_seq_len"),
    "max_seq_len-over-checkpoint": (["target=hf", "target.model.checkpoint={ckpt}", "target.max_seq_len=4096"],
                                    "target.max_seq_len"),
    "drafter.temperature=0": (["drafter.temperature=0"], "drafter.temperature"),
    "noise_std<0": (["drafter.model.noise_std=-0.1"], "drafter.model.noise_std"),
    "prompts-file-missing": (["prompts=/nonexistent/questions.jsonl"], "prompts"),
    "prompt-and-prompts": (["prompt=hello", "prompts={ckpt}/config.json"], "prompts"),
    "tokenizer-missing": (["target.tokenizer=/nonexistent/tokenizer.json"], "target.tokenizer"),
    **{f"biased-{k}": (tree + ["sampling=sample", f"sampling.acceptance={rule}"], "sampling.acceptance")
       for k, (tree, rule) in BIASED.items()},
}


@ignore_ineffective
@pytest.mark.parametrize("overrides,where", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_malformed_config_names_its_key(compose, tiny_checkpoint, overrides, where):
    cfg = compose([o.format(ckpt=tiny_checkpoint) for o in overrides])
    with pytest.raises(ConfigError) as e:
        plan_of(cfg)
    assert e.value.where == where
    assert e.value.reason and where in str(e.value)


@pytest.mark.parametrize("overrides,rule", BIASED.values(), ids=BIASED.keys())
def test_biased_combos_are_accepted_under_greedy(compose, overrides, rule):
    with pytest.warns(IneffectiveSettingWarning) as record:
        plan = plan_of(compose(overrides + ["sampling=greedy", f"sampling.acceptance={rule}"]))
    assert any(str(w.message).startswith("sampling.acceptance") for w in record)
    assert plan.greedy and plan.acceptance == rule


@pytest.mark.parametrize("children,rule", [("wor", "rrs_wor"), ("iid", "rrs_draft_probs"), ("iid", "auto"),
                                           ("wor", "sample_match"), ("iid", "rrs_wor")])
def test_unbiased_sampling_combos_validate(compose, children, rule):
    plan = plan_of(compose(["tree=static", "sampling=sample", f"tree.children={children}",
                            f"sampling.acceptance={rule}"]))
    assert plan.child_kind == children and plan.acceptance == rule


def test_drafter_checkpoint_with_larger_vocab(compose, tmp_path, tiny_checkpoint):
    big = write_checkpoint(tmp_path / "big_vocab", vocab_size=300)
    with pytest.raises(ConfigError) as e:
        plan_of(compose(["drafter=model", f"drafter.model.checkpoint={big}"]))
    assert e.value.where == "drafter.model.vocab_size" and e.value.value == 300


@pytest.mark.parametrize("target", ["tiny_random", "hf", "hf-tokenizer-override"])
def test_drafter_checkpoint_with_other_tokenizer(compose, tmp_path, tiny_checkpoint, target):
    other = tmp_path / "other_tok"
    shutil.copytree(tiny_checkpoint, other)
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")).save(str(other / "tokenizer.json"))
    drafter = ["drafter=model", f"drafter.model.checkpoint={other}"]
    targets = {"tiny_random": [],  # the built-in byte-level tokenizer
               "hf": ["target=hf", f"target.model.checkpoint={tiny_checkpoint}"],
               "hf-tokenizer-override": ["target=hf", f"target.model.checkpoint={other}",
                                         f"target.tokenizer={tiny_checkpoint}/tokenizer.json"]}
    with pytest.raises(ConfigError) as e:
        plan_of(compose(targets[target] + drafter))
    assert e.value.where == "drafter.model.checkpoint" and "tokenizer" in e.value.reason
    # the same drafter with a matching tokenizer is fine
    plan_of(compose(targets[target] + ["drafter=model", f"drafter.model.checkpoint={tiny_checkpoint}"]))


@pytest.mark.parametrize("config_json,reason", [
    ("{not json", "not valid JSON"),
    (json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 257}),
     "unsupported architecture"),
    (json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}), "missing required keys"),
], ids=["invalid-json", "unsupported-architecture", "missing-keys"])
def test_bad_checkpoint_config_json(compose, tmp_path, tiny_checkpoint, config_json, reason):
    ckpt = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "config.json").write_text(config_json)
    with pytest.raises(ConfigError) as e:
        plan_of(compose(["target=hf", f"target.model.checkpoint={ckpt}"]))
    assert e.value.where == "target.model.checkpoint"
    assert reason in e.value.reason and "config.json" in e.value.reason


def test_missing_weights_raise_checkpoint_error_at_load(compose, tmp_path, tiny_checkpoint):
    from runtime.load import load
    ckpt = tmp_path / "no_weights"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "model.safetensors").unlink()
    plan = plan_of(compose(["target=hf", f"target.model.checkpoint={ckpt}", "drafter=none", "tree.k=0"]))
    with pytest.raises(CheckpointError) as e:
        load(plan)
    assert e.value.where.endswith("model.safetensors")


def test_prompt_longer_than_context(compose, tmp_path):
    cfg = compose(["drafter=none", "tree.k=0", "target.max_seq_len=16", f"prompt={'x' * 40}",
                   f"task.output_dir={tmp_path}"])
    with pytest.raises(InputError) as e:
        main.run(cfg)
    assert e.value.where == "question 0"
    assert "target.max_seq_len=16" in e.value.reason


@pytest.mark.parametrize("rows", [
    [{"question_id": 1, "category": "qa"}],
    [{"question_id": 1, "turns": []}],
    [{"question_id": 1, "turns": ["ok"]}, {"question_id": 2, "turns": [3]}],
    ["not json"],
    [],
], ids=["no-turns", "empty-turns", "non-string-turn", "not-json", "empty-file"])
def test_malformed_prompts_file(compose, tmp_path, rows):
    from runtime.tasks import read_questions
    path = tmp_path / "q.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    spec = main.to_spec(compose([f"prompts={path}"]))
    validate(spec, host())  # the file exists; its rows are read by the task
    with pytest.raises(ConfigError) as e:
        read_questions(spec)
    assert e.value.where == "prompts"


# ---- composition rejects unknown keys, wrong types, unknown options ------------------------------

@pytest.mark.parametrize("override,pattern", [
    ("tree.dpeth=3", "tree.dpeth"),
    ("tree.k=abc", "tree.k"),
    ("sampling.temperature=hot", "sampling.temperature"),
    ("tree.children=beam", "tree.children"),
    ("sampling.acceptance=magic", "sampling.acceptance"),
    ("tree.branching=[4,x]", "tree.branching"),
])
def test_misspelled_keys_and_wrong_types_fail_at_compose(compose, override, pattern):
    with pytest.raises(ConfigCompositionException, match=pattern):
        compose([override])


def test_unknown_group_option_fails_at_compose(compose):
    with pytest.raises(MissingConfigException, match="drafter/nonexistent"):
        compose(["drafter=nonexistent"])


# ---- settings with no effect warn ---------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    (["drafter=none", "tree=static"], "tree"),
    (["sampling=greedy", "sampling.top_k=5"], "top_k"),
    (["sampling=greedy", "sampling.top_p=0.5"], "top_p"),
    (["drafter=prompt_lookup", "tree.children=iid"], "tree.children"),
    (["sampling=greedy", "tree=static", "tree.children=wor"], "tree.children"),
])
def test_ineffective_settings_warn(compose, overrides, match):
    with pytest.warns(IneffectiveSettingWarning, match=match):
        plan_of(compose(overrides))


def test_default_config_validates_without_warnings(compose, recwarn):
    plan_of(compose([]))
    assert not [w for w in recwarn if issubclass(w.category, IneffectiveSettingWarning)]


def test_shipped_default_is_the_trained_pair_with_a_top3_tree(recwarn):
    """`python main.py` with no overrides: the trained pair, VocabTrim, and the depth-1 tree of 3 siblings."""
    from tests.conftest import compose_config
    plan = plan_of(compose_config([], shrink=False))
    assert plan.tree_policy == "static" and plan.tree_parents == (-1, 0, 0, 0)
    assert plan.target.source == "checkpoint" and plan.drafter_kind == "model" and plan.vocab_trim is not None
    assert plan.greedy
    assert not [w for w in recwarn if issubclass(w.category, IneffectiveSettingWarning)]
