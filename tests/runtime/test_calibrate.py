"""tree.budget=auto's measurements (runtime/calibrate.py) on the committed default pair.

- The walks are the engine's own acceptance: decoding with a chain or a static tree accepts, at every step,
  exactly what the walk at that position says (deterministic top-k children, greedy verification).
- The distilled drafter agrees with its target often enough for tau > 1; cost tables have the asked shape.
- load() with tree.budget=auto calibrates, drafts the chosen tree (output equal to autoregressive), and
  records the choice; an explicit tree_parents skips calibration; prompt lookup chooses among chains.
"""
from __future__ import annotations

import pytest

import main
from runtime.calibrate import calibrate, calibration_prompts, measure_walks, profile_costs
from runtime.device import host
from runtime.drafters import NoDrafter
from runtime.load import load
from spec_compiler.budget import AcceptanceModel, expected_accepted
from spec_compiler.plan import make_plan
from spec_compiler.tree import TreeTopology
from spec_compiler.validate import PROJECT_ROOT, validate

pytestmark = pytest.mark.skipif(not (PROJECT_ROOT / "models/default/target/model.safetensors").is_file(),
                                reason="no trained pair")

PAIR = ["target=default", "drafter=default", "target.max_seq_len=256"]
SMALL = ["tree.num_calibration_prompts=2", "tree.calibration_max_new_tokens=16", "tree.max_nodes=6"]


def plan_of(compose, overrides):
    return make_plan(validate(main.to_spec(compose(PAIR + overrides)), host()))


@pytest.fixture(scope="module")
def rt():
    from tests.conftest import compose_config
    return load(make_plan(validate(main.to_spec(compose_config(PAIR + ["tree=static"])), host())))


@pytest.fixture(scope="module")
def prompts(rt):
    ids = [rt.tokenizer.encode(t).ids for t in ("def fibonacci(n):\n    ", "import os\n\n\ndef main(argv):\n",
                                                  "class Stack:\n    def __init__(self):\n        self.items = []\n")]
    return [p[-48:] for p in ids]


def leading(walk, width):
    """Draft tokens a tree of `width` children per level accepts on this walk."""
    n = 0
    for r in walk:
        if r >= width:
            break
        n += 1
    return n


@pytest.mark.parametrize("branching", [[1, 1, 1], [2, 2]])
def test_walks_are_the_engines_acceptance(rt, prompts, branching):
    depth, width = len(branching), max(branching)
    spec = rt.with_tree(TreeTopology.static(branching).parents)
    accepted = 0
    for p in prompts:
        walks = measure_walks(rt, [p], 24, depth, 4)
        res = spec.generate(p, 24)
        assert len(walks) == len(res.output_ids)
        emitted = 0
        for step, (acc, n) in enumerate(zip(res.accepted_drafts, res.accept_lengths)):
            cap = min(depth, 24 - emitted - 1)
            if step < res.steps - 1:  # the last step may be cut by EOS
                assert acc == min(cap, leading(walks[emitted], width)), (step, walks[emitted])
            emitted += n
        accepted += sum(res.accepted_drafts)
    assert accepted > 0  # the comparison saw accepted drafts, not only misses


def test_the_distilled_drafter_agrees_with_its_target(rt, prompts):
    acc = calibrate(rt, prompts, 24, 5, 4)
    assert acc == AcceptanceModel.from_walks(measure_walks(rt, prompts, 24, 5, 4), 5, 4)  # greedy: reproducible
    assert acc.spine_samples[0] == 3 * 24
    assert 0 < acc.spine[0][0] <= 1 and all(0 <= x <= 1 for row in acc.spine + acc.off for x in row)
    assert 1 + expected_accepted(TreeTopology.chain(3), acc) > 1.2
    assert expected_accepted(TreeTopology.static([3]), acc) >= expected_accepted(TreeTopology.chain(1), acc)


@pytest.mark.parametrize("rows", [1, 2])
def test_cost_tables_have_the_asked_shape(rt, rows):
    costs = profile_costs(rt.with_batch_size(rows), [1, 2, 4], repeats=3, warmup=1)
    assert costs.rows == rows and [t for t, _ in costs.verify] == [1, 2, 4]
    assert [w for w, _ in costs.draft_level] == [1, 2] and costs.draft_fixed >= 0.0
    assert all(s > 0 for _, s in costs.verify + costs.draft_level)


def test_load_with_budget_auto_drafts_the_chosen_tree(compose, capfd):
    plan = plan_of(compose, ["tree=auto"] + SMALL)
    rt = load(plan)
    err = capfd.readouterr().err
    assert "tree.budget=auto: measuring" in err and "tree.budget=auto: chose" in err
    rec = rt.tree_budget
    best = tuple(rec["choice"]["best"]["parents"])
    assert rt.plan.tree_parents == best == rt.drafter.topology.parents and len(best) <= 6
    assert rec["positions"] > 0 and rec["settings"]["max_nodes"] == 6
    assert {c["kind"] for c in rec["choice"]["candidates"]} >= {"chain", "static", "sequoia"}
    assert len(calibration_prompts(plan, rt.tokenizer)) == 2
    ids = rt.tokenizer.encode("def fibonacci(n):\n    ").ids
    assert rt.generate(ids, 20).output_ids == rt.with_drafter(NoDrafter()).generate(ids, 20).output_ids

    fixed = load(plan, tree_parents=(-1, 0, 0, 1))
    assert "tree.budget=auto" not in capfd.readouterr().err
    assert fixed.plan.tree_parents == (-1, 0, 0, 1) == fixed.drafter.topology.parents and fixed.tree_budget is None
    assert fixed.plan.tree_buckets == (1, 2, 4)
    with pytest.raises(ValueError, match="tree slots"):
        fixed.with_tree(TreeTopology.chain(6).parents)


def test_prompt_lookup_chooses_a_chain(compose, capfd):
    rt = load(plan_of(compose, ["drafter=prompt_lookup", "tree=chain", "tree.budget=auto"] + SMALL))
    rec = rt.tree_budget
    assert rec["settings"]["family"] == "chain" and rec["acceptance"]["max_rank"] == 1
    assert {c["kind"] for c in rec["choice"]["candidates"]} == {"chain"} and rec["costs"]["draft_fixed"] > 0
    assert rt.plan.tree_parents == TreeTopology.chain(rec["choice"]["best"]["depth"]).parents
    ids = rt.tokenizer.encode("x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n").ids
    assert rt.generate(ids, 16).output_ids == rt.with_drafter(NoDrafter()).generate(ids, 16).output_ids
