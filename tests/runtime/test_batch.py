"""The batched step (issue #10): a request decoded in a batch gives exactly its single-request output.

Requests of different prompt lengths, budgets, temperatures and seeds share one engine (continuous
batching: fewer rows than requests, so rows are freed and refilled, and requests finish at different
steps). For Llama, Mamba2 and hybrid targets x model / noisy-copy / prompt-lookup drafters x chain and
static trees, every request's tokens equal its alone-run (greedy: also the plain autoregressive reference;
sampled: same seed, same tokens). After every step each row's cache equals a fresh prefill of its
committed tokens; within a (B, T) bucket the verify forward's shapes never change (kv_window=full); and the
metrics count only emitted tokens.
"""
from __future__ import annotations

import pytest
import torch

from runtime.batch import Block
from runtime.decode import Engine, Request, SamplingParams, decode, per_position_acceptance
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.lookup import PromptLookupDrafter
from runtime.models import mamba2
from runtime.models.llama import KVCache, LlamaConfig, init_random, perturbed_copy
from runtime.sampling import ChildKind
from spec_compiler.tree import TreeTopology

V = 61
LLAMA = LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    max_position_embeddings=4096)
SSM = mamba2.Mamba2Config(vocab_size=V, d_model=32, n_layer=2, d_state=8, headdim=16, chunk_size=64)
HYBRID = mamba2.Mamba2Config(vocab_size=V, d_model=32, n_layer=3, d_state=8, headdim=16, chunk_size=64,
                             attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2, attn_rotary_dim=8)
MAX_SEQ = 160
TREES = {"chain3": TreeTopology.chain(3), "static21": TreeTopology.static([2, 1])}
PROMPT_LENS = (17, 5, 30, 11, 2)
BUDGETS = (40, 23, 9, 31, 17)


def make_target(arch: str):
    if arch == "llama":
        return init_random(LLAMA, seed=0).eval()
    return mamba2.init_random_mamba2(SSM if arch == "mamba2" else HYBRID, seed=0).eval()


@pytest.fixture(scope="module", params=["llama", "mamba2", "hybrid"])
def target(request):
    return request.param, make_target(request.param)


def prompts():
    g = torch.Generator().manual_seed(11)
    base = torch.randint(0, V, (8,), generator=g).tolist()
    out = []
    for n in PROMPT_LENS:  # repeated n-grams so prompt lookup finds matches
        p = (base * 8)[:n // 2] + torch.randint(0, V, (n - n // 2,), generator=g).tolist()
        out.append(p)
    return out


def new_cache(model, rows: int, topo: TreeTopology):
    if isinstance(model, mamba2.Mamba2LMModel):
        return model.new_cache(rows, MAX_SEQ + topo.n, num_scratch=topo.n + 1)
    return model.new_cache(rows, MAX_SEQ + topo.n)


def make_drafter(kind: str, target, topo: TreeTopology, rows: int, child=ChildKind.deterministic,
                 kv_window="live"):
    if kind == "none":
        return NoDrafter()
    if kind == "prompt_lookup":
        return PromptLookupDrafter(topo, 1, 3, 8, rows=rows)
    ssm = isinstance(target, mamba2.Mamba2LMModel)
    if kind == "noisy_copy":
        model = (mamba2.perturbed_copy if ssm else perturbed_copy)(target, 0.05, 7)
    else:  # an independent small model of the same family
        model = (mamba2.init_random_mamba2(SSM, seed=3) if ssm else init_random(LLAMA, seed=3))
    return ModelDrafter(model.eval(), topo, MAX_SEQ + topo.n, child, 1.0, V, rows=rows,
                        cache=new_cache(model, rows, topo), kv_window=kv_window)


def requests(sampling: list[SamplingParams], seeds=(0, 1, 2, 3, 4)) -> list[Request]:
    return [Request(p, n, sp, torch.Generator().manual_seed(2 * s), torch.Generator().manual_seed(2 * s + 1))
            for p, n, sp, s in zip(prompts(), BUDGETS, sampling, seeds)]


def run(target, kind, topo, reqs, rows, child=ChildKind.deterministic, kv_window="live", on_step=None, eos=(),
        verify_head="path"):
    eng = Engine(target, new_cache(target, rows, topo), make_drafter(kind, target, topo, rows, child, kv_window),
                 max_seq_len=MAX_SEQ, eos_ids=eos, kv_window=kv_window, on_step=on_step, record_shapes=True,
                 verify_head=verify_head)
    return eng, eng.generate(reqs)


@pytest.fixture(scope="module")
def greedy_reference(target):
    """Plain autoregressive greedy decoding of every prompt, alone."""
    _, model = target
    topo = TreeTopology.root_only()
    return [r.output_ids for r in run(model, "none", topo, requests([SamplingParams()] * 5), 1)[1]]


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("kind", ["model", "noisy_copy", "prompt_lookup"])
def test_greedy_batch_equals_alone_and_autoregressive(target, greedy_reference, kind, tree):
    arch, model = target
    topo = TREES[tree]
    alone = [run(model, kind, topo, [r], 1)[1][0] for r in requests([SamplingParams()] * 5)]
    _, batched = run(model, kind, topo, requests([SamplingParams()] * 5), rows=3)
    for a, b, ref in zip(alone, batched, greedy_reference):
        assert a.output_ids == ref
        assert b.output_ids == ref
        assert sum(b.accept_lengths) == len(b.output_ids)
    if kind == "noisy_copy":  # a drafter that agrees must be accepted
        assert sum(sum(r.accept_lengths) for r in batched) / sum(r.steps for r in batched) > 1.3


MIXED = [SamplingParams(0.8), SamplingParams(), SamplingParams(1.0, top_k=5), SamplingParams(0.6, top_p=0.9),
         SamplingParams(1.2)]


def test_verify_head_path_equals_full(target):
    """The head at the walk's nodes only (verify_head=path, the default) and at every node (full) decide alike:
    a mixed greedy / sampled batch gives the same tokens, step for step."""
    _, model = target
    topo = TREES["static21"]
    out = {h: [(r.output_ids, r.accept_lengths) for r in
               run(model, "noisy_copy", topo, requests(MIXED), rows=3, child=ChildKind.wor, verify_head=h)[1]]
           for h in ("path", "full")}
    assert out["path"] == out["full"]


@pytest.mark.parametrize("tree,child", [("chain3", ChildKind.iid), ("static21", ChildKind.wor),
                                        ("static21", ChildKind.deterministic)])
@pytest.mark.parametrize("kind", ["noisy_copy", "prompt_lookup"])
def test_sampled_batch_equals_alone(target, greedy_reference, kind, tree, child):
    _, model = target
    if kind == "prompt_lookup" and child is not ChildKind.deterministic:
        pytest.skip("prompt lookup drafts are deterministic")
    topo = TREES[tree]
    alone = [run(model, kind, topo, [r], 1, child)[1][0].output_ids for r in requests(MIXED)]
    batched = [r.output_ids for r in run(model, kind, topo, requests(MIXED), rows=4, child=child)[1]]
    assert batched == alone
    assert batched[1] == greedy_reference[1]  # the greedy row of a mixed batch is still greedy
    reseeded = [r.output_ids for r in run(model, kind, topo, requests(MIXED, seeds=(5, 6, 7, 8, 9)), 4, child)[1]]
    assert reseeded != batched


def fresh_state(model, tokens: list[int]):
    cache = new_cache(model, 1, TREES["static21"])
    with torch.inference_mode():
        model.hidden(torch.tensor([tokens]), torch.arange(len(tokens))[None], cache, 0, num_rows=0)
    return cache


def assert_cache_equal(model, row_cache, tokens: list[int]):
    fresh = fresh_state(model, tokens)
    L = len(tokens)
    kvs = [(row_cache, fresh)] if isinstance(row_cache, KVCache) else (
        [(row_cache.kv, fresh.kv)] if row_cache.kv is not None else [])
    for mine, ref in kvs:
        torch.testing.assert_close(mine.k[:, :, :, :L], ref.k[:, :, :, :L], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.v[:, :, :, :L], ref.v[:, :, :, :L], atol=1e-5, rtol=1e-5)
    if not isinstance(row_cache, KVCache):
        torch.testing.assert_close(row_cache.ssm, fresh.ssm, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(row_cache.conv, fresh.conv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["noisy_copy", "prompt_lookup"])
def test_every_row_cache_equals_fresh_prefill_after_every_step(target, kind):
    _, model = target
    checked = []

    def check(state):
        assert state.L == len(state.tokens) - 1  # only the root is pending
        assert_cache_equal(model, state.cache, state.tokens[:state.L])
        checked.append(len(state.path))

    run(model, kind, TREES["static21"], requests([SamplingParams()] * 5), rows=3, on_step=check)
    assert len(checked) > 10
    if kind == "noisy_copy":
        assert max(checked) > 1  # drafts were accepted, so commits moved entries


def test_verify_shapes_are_static_within_a_bucket(target):
    _, model = target
    topo = TREES["static21"]
    eng, res = run(model, "noisy_copy", topo, requests([SamplingParams()] * 5), rows=3, kv_window="full")
    shapes: dict = {}
    for B, T, S in eng.shapes:
        shapes.setdefault((B, T), set()).add(S)
    assert all(s == {MAX_SEQ + topo.n} for s in shapes.values()), shapes
    assert (3, topo.n) in shapes  # the full batch ran full trees
    _, live = run(model, "noisy_copy", topo, requests([SamplingParams()] * 5), rows=3)
    assert [r.output_ids for r in res] == [r.output_ids for r in live]  # the window is a speed choice only


def test_eos_inside_an_accepted_draft_counts_only_emitted_tokens(target, greedy_reference):
    _, model = target
    topo = TreeTopology.chain(4)
    ref = greedy_reference[0]
    copy = lambda: perturbed_copy(model, 0.0, 0) if not isinstance(model, mamba2.Mamba2LMModel) \
        else mamba2.perturbed_copy(model, 0.0, 0)  # noqa: E731
    # tokens first seen at output index i become EOS; a copy drafter's steps emit 5 tokens (4 drafts + bonus),
    # so i % 5 != 4 puts the EOS inside an accepted draft, with accepted tokens after it dropped
    fresh = [i for i in range(6, len(ref)) if ref[i] not in ref[:i] and i % 5 != 4]
    assert fresh
    for first in fresh[:3]:
        eos = ref[first]
        drafter = ModelDrafter(copy().eval(), topo, MAX_SEQ + topo.n, ChildKind.deterministic, 1.0, V,
                               cache=new_cache(model, 1, topo))
        res = decode(model, new_cache(model, 1, topo), drafter, prompts()[0], max_new_tokens=40, max_seq_len=MAX_SEQ,
                     eos_ids=(eos,))
        assert res.output_ids == ref[:first + 1] and res.stop_reason == "eos"
        assert sum(res.accept_lengths) == len(res.output_ids)
        assert all(a - d in (0, 1) for a, d in zip(res.accept_lengths, res.accepted_drafts))
        assert res.accept_lengths[-1] == res.accepted_drafts[-1]  # the EOS was a draft token: no bonus after it
        assert res.tau > 1  # the copy drafter agrees: whole drafts accepted
        assert per_position_acceptance([res])[0] == 1.0


def test_requests_leave_and_rows_are_reused(target, greedy_reference):
    _, model = target
    eng, res = run(model, "noisy_copy", TREES["chain3"], requests([SamplingParams()] * 5), rows=2)
    assert [r.output_ids for r in res] == greedy_reference
    assert [len(r.output_ids) for r in res] == list(BUDGETS)
    assert max(B for B, _, _ in eng.shapes) == 2 and min(B for B, _, _ in eng.shapes) == 1
    assert not eng.rows


def drive(eng: Engine, reqs: list[Request], ks) -> list:
    """Engine.generate's continuous batching with step i verifying at most ks[i] draft levels (the serving
    policy's k; None: the whole tree)."""
    waiting, i = list(reqs)[::-1], 0
    while waiting or eng.rows:
        while waiting and len(eng.rows) < eng.capacity_rows:
            eng.add(waiting.pop())
        k = ks[i % len(ks)]
        eng.step(None if k is None else [k] * len(eng.rows))
        i += 1
    return [r.result for r in reqs]


def test_deferred_drafter_prefill_and_steps_that_do_not_draft(target, greedy_reference):
    """Serving's deferred drafter start: a step with k = 0 runs no drafter forward at all; a row that joined
    during k = 0 steps, or fell further behind than a tree's depth, is prefilled alone at its next drafted step;
    greedy output stays autoregressive's, the drafter's cache equals a fresh prefill of what it has seen, and
    its drafts are still accepted. With k never 0 the deferred start decides exactly as the eager one
    (sampled rows included)."""
    _, model = target
    topo = TREES["chain3"]
    ks = [0, 0, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0, 0, 2, 3, 3, 0]  # gaps of 5-6 tokens > the chain's depth 3
    drafter = make_drafter("noisy_copy", model, topo, 3)
    calls = []
    real = drafter.model.hidden
    counted = drafter.model.hidden = lambda *a, **kw: calls.append(len(steps)) or real(*a, **kw)
    steps: list = []
    seen = []

    def check(state):
        if drafter.cached[state.row]:
            drafter.model.hidden = real  # the fresh prefill below is not the engine's
            assert_cache_equal(drafter.model, drafter.cache.view_rows(state.row, state.row + 1),
                               state.tokens[:drafter.cached[state.row]])
            drafter.model.hidden = counted
            seen.append(drafter.cached[state.row])

    eng = Engine(model, new_cache(model, 3, topo), drafter, max_seq_len=MAX_SEQ, on_step=check, defer_drafter=True)
    real_step = eng.step
    eng.step = lambda limit=None: steps.append(limit[0] if limit else None) or real_step(limit)
    res = drive(eng, requests([SamplingParams()] * 5), ks)
    assert [r.output_ids for r in res] == greedy_reference
    assert calls and all(steps[i - 1] != 0 for i in calls), (calls, steps)  # forwards only in steps that drafted
    drafted = [(a, d) for r in res for a, d in zip(r.accept_lengths, r.draft_depths) if d > 0]
    assert sum(a for a, _ in drafted) / len(drafted) > 1.3 and len(seen) > 10
    for child, sampling in ((ChildKind.deterministic, [SamplingParams()] * 5), (ChildKind.wor, MIXED)):
        out = []
        for defer in (False, True):
            e = Engine(model, new_cache(model, 3, topo), make_drafter("noisy_copy", model, topo, 3, child),
                       max_seq_len=MAX_SEQ, defer_drafter=defer)
            out.append([(r.output_ids, r.accept_lengths) for r in e.generate(requests(sampling))])
        assert out[0] == out[1]
