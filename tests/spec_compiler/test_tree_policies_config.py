"""tree=dynamic | beam | rsd_c through config -> validate -> plan -> load (issue #12).

The groups compose and plan (the plan records the policy, its settings, the tree-size buckets of the largest
grown tree and cache room for it); out-of-range settings and combinations that would bias sampling or that
have no draft distributions are refused with ConfigError naming the key; the loaded runtime's drafter grows
the configured trees.
"""
import pytest

from runtime.load import load
from runtime.tree_policies import BeamTree, DynamicTree
from spec_compiler.errors import ConfigError
from spec_compiler.tree import tree_buckets
from tests.spec_compiler.test_config import plan_of

ignore_ineffective = pytest.mark.filterwarnings("ignore::spec_compiler.validate.IneffectiveSettingWarning")


@ignore_ineffective
@pytest.mark.parametrize("sampling", ["greedy", "sample"])
@pytest.mark.parametrize("tree", ["dynamic", "beam"])
def test_grown_policies_plan(compose, tree, sampling):
    plan = plan_of(compose([f"tree={tree}", f"sampling={sampling}"]))
    g = plan.grown_tree
    assert plan.tree_policy == tree and g.policy == tree
    n = 16 if tree == "dynamic" else 1 + 4 * 5
    assert g.max_nodes == n and plan.tree_buckets == tree_buckets(n)
    assert plan.cache_capacity == plan.max_seq_len + n + g.per_round == plan.max_seq_len + plan.tree_slots
    assert plan.child_kind == ("wor" if sampling == "sample" else "deterministic")
    assert plan.tree_parents == (-1,)


def test_rsd_c_is_static_with_wor_children(compose):
    plan = plan_of(compose(["tree=rsd_c", "sampling=sample"]))
    assert plan.tree_policy == "static" and plan.child_kind == "wor" and plan.grown_tree is None
    assert len(plan.tree_parents) == 1 + 4 + 8 + 8 + 8


def test_settings_reach_the_plan(compose):
    g = plan_of(compose(["tree=dynamic", "tree.num_nodes=40", "tree.max_depth=3", "tree.threshold=0.01",
                         "tree.expand_per_round=2"])).grown_tree
    assert (g.num_nodes, g.max_depth, g.threshold, g.expand_per_round) == (40, 3, 0.01, 2)
    g = plan_of(compose(["tree=beam", "tree.beam_width=3", "tree.beam_depth=2"])).grown_tree
    assert (g.beam_width, g.beam_depth, g.max_nodes) == (3, 2, 7)


@pytest.mark.parametrize("override,key", [
    ("tree.num_nodes=1", "tree.num_nodes"), ("tree.max_depth=0", "tree.max_depth"),
    ("tree.threshold=1.0", "tree.threshold"), ("tree.threshold=-0.1", "tree.threshold"),
    ("tree.expand_per_round=0", "tree.expand_per_round"), ("tree.beam_width=0", "tree.beam_width"),
    ("tree.beam_depth=0", "tree.beam_depth")])
def test_out_of_range_settings_are_refused(compose, override, key):
    with pytest.raises(ConfigError) as e:
        plan_of(compose(["tree=dynamic", override]))
    assert e.value.key_path == key


@ignore_ineffective
@pytest.mark.parametrize("overrides,key,hint", [
    (["tree=beam", "tree.beam_width=300"], "tree.beam_width", "vocabulary"),  # tiny_random: 257 tokens
    (["tree=dynamic", "drafter=prompt_lookup"], "tree.policy", "drafter=model"),
    (["tree=beam", "sampling=sample", "tree.children=iid"], "tree.children", "tree.children=wor"),
    (["tree=dynamic", "sampling=sample", "tree.children=iid"], "tree.children", "tree.children=wor"),
    (["tree=dynamic", "sampling=sample", "sampling.acceptance=rrs_draft_probs"], "sampling.acceptance", "auto"),
    (["tree=beam", "sampling=sample", "tree.children=topk", "sampling.acceptance=rrs_wor"], "sampling.acceptance",
     "auto"),
    (["tree=dynamic", "tree.num_nodes=100", "target.max_seq_len=128"], "tree", "max_seq_len"),
])
def test_biased_or_impossible_combinations_are_refused(compose, overrides, key, hint):
    with pytest.raises(ConfigError) as e:
        plan_of(compose(overrides))
    assert e.value.key_path == key and hint in str(e.value)


def test_beam_width_is_checked_against_the_trimmed_vocabulary(compose, tiny_checkpoint):
    with pytest.raises(ConfigError) as e:
        plan_of(compose(["tree=beam", "drafter=model", f"drafter.model.checkpoint={tiny_checkpoint}",
                         "drafter.vocab_trim.enabled=true", "drafter.vocab_trim.size=3",
                         "drafter.vocab_trim.artifact=none.json"]))
    assert e.value.key_path == "tree.beam_width"


@pytest.mark.parametrize("tree,cls", [("dynamic", DynamicTree), ("beam", BeamTree)])
def test_loaded_drafter_grows_the_configured_tree(compose, tree, cls):
    plan = plan_of(compose([f"tree={tree}", "tree.num_nodes=6", "tree.beam_width=2", "tree.beam_depth=2"]))
    rt = load(plan)
    assert isinstance(rt.drafter.policy, cls)
    res = rt.generate(list(b"hello hello hello"), 12)
    assert len(res.output_ids) == 12 and max(res.draft_depths) >= 1
