"""tree.budget=auto's chooser (spec_compiler/budget.py) on synthetic acceptance and cost profiles, and the
config rules around it (schema, validation, plan).

- Expected accepted length equals a brute-force enumeration of the acceptance process; replayed walks equal
  the model for chains (the spine is measured exactly).
- Sequoia's DP equals the best of every tree (all level-ordered top-k trees) for small budgets.
- Expensive verify -> a short chain (or none); cheap verify with a strong second choice -> a wide tree;
  the table lists every chain and static branching, ranked by tau / (draft + verify).
- Bad tree.budget settings exit 2 naming the key.
"""
from __future__ import annotations

import itertools
import random

import pytest

import main
from spec_compiler.budget import (AcceptanceModel, CostModel, choose, expected_accepted, replay_accepted,
                                  sequoia_trees, static_branchings)
from spec_compiler.plan import make_plan
from spec_compiler.tree import TreeTopology
from spec_compiler.validate import Host, validate


def model(spine, off=None) -> AcceptanceModel:
    """Depth-independent acceptance rows (one list per state) repeated over 15 depths."""
    off = spine if off is None else off
    return AcceptanceModel(len(spine), tuple(tuple(spine) for _ in range(15)), tuple(tuple(off) for _ in range(15)))


def random_model(rng, D=6, R=4) -> AcceptanceModel:
    def row():
        w = [rng.random() for _ in range(R + 1)]
        return tuple(x / sum(w) for x in w[:R])  # the last weight is the miss
    return AcceptanceModel(R, tuple(row() for _ in range(D)), tuple(row() for _ in range(D)))


def brute_force_accepted(topo: TreeTopology, acc: AcceptanceModel) -> float:
    """E[accepted] by enumerating every outcome of the walk: at each accepted node the target's token is its
    rank-r child with probability prob(depth, r, spine), or a miss."""
    def walk(node, spine, p, n):
        kids = topo.children[node]
        miss = 1.0 - sum(acc.prob(topo.depth[node], r, spine) for r in range(acc.max_rank))
        total = p * miss * n
        for r in range(acc.max_rank):  # a token ranked beyond the node's children ends the walk too
            q = acc.prob(topo.depth[node], r, spine)
            if r < len(kids):
                total += walk(kids[r], spine and r == 0, p * q, n + 1)
            else:
                total += p * q * n
        return total
    return walk(0, True, 1.0, 0)


def all_trees(n: int, max_depth: int) -> list[TreeTopology]:
    """Every tree of n nodes, depth <= max_depth, children by rank, as level-ordered topologies (the drafter's)."""
    def shapes(n, depth):  # nested child tuples
        if n == 1:
            return [()]
        if depth == 0:
            return []
        out = []
        for sizes in compositions(n - 1):
            for kids in itertools.product(*(shapes(m, depth - 1) for m in sizes)):
                out.append(kids)
        return out
    from spec_compiler.budget import _level_order
    return [_level_order(s) for s in shapes(n, max_depth)]


def compositions(n: int):
    if n == 0:
        yield ()
        return
    for first in range(1, n + 1):
        for rest in compositions(n - first):
            yield (first,) + rest


FLAT = CostModel(1, ((1, 1.0), (64, 1.0)), ((1, 0.05), (64, 0.05)))


# ---- the expected value --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_expected_accepted_equals_brute_force_enumeration(seed):
    rng = random.Random(seed)
    acc = random_model(rng)
    trees = [TreeTopology.chain(4), TreeTopology.static([3, 2]), TreeTopology.static([2, 1, 2])]
    trees += [rng.choice(all_trees(7, 4)) for _ in range(3)]
    for topo in trees:
        assert expected_accepted(topo, acc) == pytest.approx(brute_force_accepted(topo, acc), abs=1e-12)


def test_chain_tau_from_walks_equals_replay_and_counts():
    rng = random.Random(3)
    R, D = 3, 5
    walks = []
    for _ in range(400):
        w = []
        for _ in range(rng.randint(1, D)):  # some end at the text's end without a miss
            r = rng.choice([0, 0, 0, 1, 2, R])
            w.append(r)
            if r == R:
                break
        walks.append(w)
    acc = AcceptanceModel.from_walks(walks, D, R)
    assert acc.spine_samples[0] == len(walks)
    assert acc.spine[0][1] == sum(w[0] == 1 for w in walks) / len(walks)
    assert acc.off_samples[0] == 0 and sum(acc.off_samples) > 0
    full = [w for w in walks if len(w) == D or w[-1] == R]  # walks that ended by a miss or reached the depth
    exact = AcceptanceModel.from_walks(full, D, R)
    for k in range(D + 1):
        topo = TreeTopology.chain(k)
        assert expected_accepted(topo, exact) == pytest.approx(replay_accepted(topo, full), abs=1e-12)


def test_replay_of_a_tree_follows_ranks():
    walks = [[1, 0, 0], [0, 1], [2], [0, 0, 3]]  # R = 3: the last one misses at depth 2
    topo = TreeTopology.static([2, 2])
    assert replay_accepted(topo, walks) == (2 + 2 + 0 + 2) / 4


# ---- the search ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_sequoia_dp_is_the_best_tree_for_each_size_and_depth(seed):
    acc = random_model(random.Random(10 + seed), D=6, R=4)
    trees = sequoia_trees(acc, 7)
    for n in range(2, 8):
        for D in range(1, n):
            fits = [t for t in all_trees(n, D) if all(len(c) <= acc.max_rank for c in t.children)]
            if not fits:  # e.g. 6 nodes at depth 1 need 5 root children: more than the 4 measured ranks
                assert (n, D) not in trees
                continue
            value, topo = trees[(n, D)]
            assert topo.n == n and topo.max_depth <= D and topo.is_level_ordered
            assert value == pytest.approx(expected_accepted(topo, acc), abs=1e-12)
            assert value == pytest.approx(max(expected_accepted(t, acc) for t in fits), abs=1e-12)


def test_static_branchings_are_every_fitting_non_chain():
    def size(b):  # nodes of TreeTopology.static(b), without building it
        return 1 + sum(itertools.accumulate(b, lambda x, y: x * y))
    got = static_branchings(8)
    brute = [b for D in range(1, 8) for b in itertools.product(range(1, 8), repeat=D)
             if size(b) <= 8 and any(x > 1 for x in b)]
    assert all(TreeTopology.static(b).n == size(b) for b in got)
    assert sorted(got) == sorted(brute) and len(set(got)) == len(got)


def test_expensive_verify_picks_a_short_chain():
    acc = model([0.8, 0.1])
    steep = CostModel(1, ((1, 1.0), (2, 1.9), (16, 15.0)), ((1, 0.01), (16, 0.01)))
    best = choose(acc, steep, 16).best
    assert best.kind == "chain" and best.n <= 2, best
    steeper = CostModel(1, ((1, 1.0), (2, 2.5), (16, 30.0)), ((1, 0.01), (16, 0.01)))
    assert choose(acc, steeper, 16).best.parents == (-1,)  # autoregressive: nothing pays for itself


def test_cheap_verify_with_a_strong_second_choice_picks_a_wide_tree():
    acc = model([0.45, 0.35, 0.1])
    costly_levels = CostModel(1, ((1, 1.0), (16, 1.0)), ((1, 0.5), (16, 0.5)))
    best = choose(acc, costly_levels, 16).best
    topo = TreeTopology(best.parents)
    assert len(topo.children[0]) >= 3, best
    # a chain of the same depth does worse under the same costs
    chain = next(c for c in choose(acc, costly_levels, 16).candidates if c.parents == TreeTopology.chain(best.depth).parents)
    assert chain.tokens_per_s < best.tokens_per_s


def test_high_top1_acceptance_and_cheap_drafting_picks_a_deep_tree():
    best = choose(model([0.95, 0.03]), FLAT, 16).best
    assert best.depth >= 8, best


def test_candidate_table_is_complete_and_ranked():
    acc = model([0.7, 0.2, 0.05])
    costs = CostModel(2, ((1, 1.0), (2, 1.1), (4, 1.2), (8, 1.5), (12, 1.9)), ((1, 0.1), (4, 0.12), (8, 0.2)))
    ch = choose(acc, costs, 12)
    parents = {c.parents for c in ch.candidates}
    assert len(parents) == len(ch.candidates)
    assert all(TreeTopology.chain(k).parents in parents for k in range(12))
    assert all(TreeTopology.static(b).parents in parents for b in static_branchings(12))
    assert all(t.parents in parents for _, t in sequoia_trees(acc, 12).values())
    rates = [c.tokens_per_s for c in ch.candidates]
    assert rates == sorted(rates, reverse=True) and ch.best == ch.candidates[0]
    for c in ch.candidates:
        topo = TreeTopology(c.parents)
        assert c.n == topo.n <= 12 and topo.is_level_ordered
        assert c.tau == pytest.approx(1 + expected_accepted(topo, acc))
        assert c.verify_s == pytest.approx(costs.verify_time(topo.n))
        assert c.tokens_per_s == pytest.approx(c.tau / (c.draft_s + c.verify_s))
    d = ch.to_dict()
    assert d["best"]["parents"] == ch.best.parents and len(d["candidates"]) == len(ch.candidates)


def test_chain_family_lists_chains_only():
    ch = choose(model([0.9, 0.5]), FLAT, 10, family="chain")
    assert {c.kind for c in ch.candidates} == {"chain"} and len(ch.candidates) == 10


def test_costs_interpolate_and_count_draft_levels():
    c = CostModel(1, ((1, 1.0), (4, 1.3), (8, 2.1)), ((1, 0.1), (3, 0.3)), draft_fixed=0.01)
    assert c.verify_time(2) == pytest.approx(1.1) and c.verify_time(6) == pytest.approx(1.7)
    assert c.verify_time(10) == pytest.approx(2.5)  # extended past the last size
    assert c.draft_time(TreeTopology.chain(0)) == 0.0
    assert c.draft_time(TreeTopology.chain(1)) == pytest.approx(0.11)  # the catch-up only
    # [2, 1]: catch-up, then one forward of the 2 nodes at depth 1
    assert c.draft_time(TreeTopology.static([2, 1])) == pytest.approx(0.01 + 0.1 + 0.2)


# ---- config ------------------------------------------------------------------------------------------
def test_plan_records_the_budget(compose):
    plan = make_plan(validate(main.to_spec(compose(["tree=auto", "tree.max_nodes=12"])), Host()))
    b = plan.tree_budget
    assert b.family == "static" and b.max_nodes == 12 and b.calibration_prompts.endswith("calibration.jsonl")
    assert plan.tree_parents == TreeTopology.chain(11).parents and plan.tree_slots == 12 and "auto" in plan.name
    other = make_plan(validate(main.to_spec(compose(["tree=auto", "tree.max_nodes=13"])), Host()))
    assert other.plan_hash() != plan.plan_hash()
    chain = make_plan(validate(main.to_spec(compose(["tree=chain", "tree.budget=auto"])), Host()))
    assert chain.tree_budget.family == "chain"
    assert make_plan(validate(main.to_spec(compose(["tree=chain"])), Host())).tree_budget is None


@pytest.mark.parametrize("args,key", [
    (["tree=auto", "tree.max_nodes=1"], "tree.max_nodes"),
    (["tree=auto", "tree.max_nodes=65"], "tree.max_nodes"),
    (["tree=auto", "tree.num_calibration_prompts=-1"], "tree.num_calibration_prompts"),
    (["tree=auto", "tree.calibration_max_new_tokens=0"], "tree.calibration_max_new_tokens"),
    (["tree=auto", "tree.calibration_prompts=no/such.jsonl"], "tree.calibration_prompts"),
    (["tree=auto", "drafter=none"], "tree.budget"),
    (["tree=dynamic", "tree.budget=auto"], "tree.budget"),
    (["tree=auto", "sampling=sample"], "tree.budget"),
    (["tree=auto", "retrieval=context"], "tree.budget"),
    (["tree=auto", "tree.budget=sometimes"], "tree.budget"),
])
def test_bad_budget_settings_exit_2_naming_the_key(args, key, capsys, tmp_path):
    code = main.cli(["target=tiny_random", "drafter=noisy_copy", "task=generate", "task.max_new_tokens=4", *args,
                     f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and key in err.split("\n")[0], err
