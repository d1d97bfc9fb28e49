"""Greedy speculative output == greedy autoregressive output, token for token (fp32, CPU), for every drafter
kind x tree shape, with EOS, max_new_tokens and the context limit landing inside a draft; the KV cache
equals a fresh prefill after every step (TESTING.md layers 3 and 6)."""
from __future__ import annotations

import pytest
import torch

from runtime.decode import SamplingParams, decode, per_position_acceptance
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.lookup import PromptLookupDrafter
from runtime.models.llama import LlamaConfig, init_random, perturbed_copy
from runtime.sampling import ChildKind
from spec_compiler.tree import TreeTopology

CFG = LlamaConfig(vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                  max_position_embeddings=4096)
MAX_SEQ = 400
TREES = {"chain4": TreeTopology.chain(4), "static321": TreeTopology.static([3, 2, 1])}


@pytest.fixture(scope="module")
def target():
    return init_random(CFG, seed=0).eval()


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, CFG.vocab_size, (24,), generator=g).tolist()


def make_drafter(kind: str, target, topo: TreeTopology):
    cap = MAX_SEQ + topo.n
    if kind == "none":
        return NoDrafter()
    if kind == "prompt_lookup":
        return PromptLookupDrafter(topo, 1, 3, 8, rows=1)
    model = {"copy": lambda: perturbed_copy(target, 0.0, 0),
             "random": lambda: init_random(CFG, seed=123),
             "noised": lambda: perturbed_copy(target, 0.1, 7)}[kind]()
    return ModelDrafter(model.eval(), topo, cap, ChildKind.deterministic, 1.0, CFG.vocab_size)


def run(target, drafter, prompt, topo_n=45, **kw):
    cache = target.new_cache(1, MAX_SEQ + topo_n)
    kw.setdefault("max_new_tokens", 240)
    kw.setdefault("max_seq_len", MAX_SEQ)
    return decode(target, cache, drafter, prompt, **kw)


@pytest.fixture(scope="module")
def reference(target, prompt):
    """Plain greedy decoding by full recomputation (no cache reuse, no speculation)."""
    toks = list(prompt)
    with torch.no_grad():
        for _ in range(240):
            cache = target.new_cache(1, len(toks))
            logits = target(torch.tensor([toks]), torch.arange(len(toks))[None], cache, 0)[0, -1]
            toks.append(int(torch.argmax(logits)))
    return toks[len(prompt):]


def test_ar_loop_matches_full_recomputation(target, prompt, reference):
    assert run(target, NoDrafter(), prompt).output_ids == reference


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("kind", ["copy", "random", "noised", "prompt_lookup"])
def test_greedy_equality(target, prompt, reference, kind, tree):
    res = run(target, make_drafter(kind, target, TREES[tree]), prompt)
    assert res.output_ids == reference
    assert len(res.output_ids) == 240 and res.stop_reason == "max_new_tokens"
    tau = res.tau
    if kind == "copy":  # every draft accepted: depth + bonus per step (except where the budget cuts it)
        assert tau > TREES[tree].max_depth + 0.9
        assert per_position_acceptance([res]) == [1.0] * TREES[tree].max_depth
    elif kind == "random":
        assert tau < 1.3
    elif kind == "noised":
        assert 1.2 < tau < TREES[tree].max_depth + 0.9, tau  # partial acceptance


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("kind", ["copy", "noised", "prompt_lookup"])
def test_eos_inside_draft(target, prompt, reference, kind, tree):
    # pick EOS ids that occur mid-output; with a copy drafter they are inside an accepted draft
    for cut in (37, 101, 150):
        eos = reference[cut]
        first = reference.index(eos)
        res = run(target, make_drafter(kind, target, TREES[tree]), prompt, eos_ids=(eos,))
        assert res.output_ids == reference[:first + 1]
        assert res.stop_reason == "eos"


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("limit", [1, 2, 5, 203])
def test_max_new_tokens_inside_draft(target, prompt, reference, tree, limit):
    res = run(target, make_drafter("copy", target, TREES[tree]), prompt, max_new_tokens=limit)
    assert res.output_ids == reference[:limit]
    assert res.stop_reason == "max_new_tokens"


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("room", [1, 3, 38])
def test_context_limit_inside_draft(target, prompt, reference, tree, room):
    """The context holds len(prompt) + room tokens: output stops exactly there and no slot past the cache
    capacity is written (the model asserts on any write beyond it)."""
    topo = TREES[tree]
    limit = len(prompt) + room
    drafter = make_drafter("copy", target, topo)
    drafter.cache = drafter.model.new_cache(1, limit + topo.n)
    cache = target.new_cache(1, limit + topo.n)
    res = decode(target, cache, drafter, prompt, max_new_tokens=500, max_seq_len=limit)
    assert res.output_ids == reference[:room]
    assert res.stop_reason == "context"


@pytest.mark.parametrize("kind,tree", [("noised", "chain4"), ("noised", "static321"), ("prompt_lookup", "static321"),
                                       ("random", "chain4"), ("copy", "static321")])
def test_cache_equals_fresh_prefill_after_every_step(target, prompt, kind, tree):
    checked = []

    def check(state):
        fresh = target.new_cache(1, state.L)
        with torch.no_grad():
            target(torch.tensor([state.tokens[:state.L]]), torch.arange(state.L)[None], fresh, 0)
        torch.testing.assert_close(state.cache.k[:, :, :, :state.L], fresh.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.cache.v[:, :, :, :state.L], fresh.v, atol=1e-5, rtol=1e-5)
        assert state.L == len(state.tokens) - 1  # only the root is pending
        checked.append(len(state.path))

    run(target, make_drafter(kind, target, TREES[tree]), prompt, max_new_tokens=60, on_step=check)
    assert len(checked) > 3
    if kind in ("noised", "copy"):
        assert max(checked) > 1  # some steps accepted drafts, so compaction was exercised


def test_prompt_longer_than_context_is_refused(target):
    from spec_compiler.errors import InputError
    with pytest.raises(InputError) as e:
        run(target, NoDrafter(), list(range(10)) * 40)
    assert e.value.where == "prompt"


def test_sampling_is_seeded(target, prompt):
    sp = SamplingParams(temperature=1.0)

    def sample(seed):
        drafter = make_drafter("noised", target, TREES["static321"])
        drafter.kind = ChildKind.wor
        return run(target, drafter, prompt, max_new_tokens=40, sampling=sp,
                   draft_gen=torch.Generator().manual_seed(seed),
                   verify_gen=torch.Generator().manual_seed(seed + 1)).output_ids

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
