"""End-to-end Monte-Carlo check of sampled speculative decoding (TESTING.md layer 2): the joint law of the
first two emitted tokens equals the target's autoregressive joint, chi-square at alpha = 1e-6 with a fixed
seed (a failure reproduces; it is investigated, never re-rolled). Exactness itself is proven by the
enumeration tests in test_verifier_exact.py; this ties the whole loop (drafting, tree forward, cache
commit, verifier) to them."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from runtime.decode import Engine, Request, SamplingParams
from runtime.drafters import ModelDrafter
from runtime.lookup import PromptLookupDrafter
from runtime.models.llama import LlamaConfig, init_random, perturbed_copy
from runtime.sampling import AcceptanceRule, ChildKind, target_probs
from spec_compiler.tree import TreeTopology

V = 5
CFG = LlamaConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
PROMPT = [1, 3, 0, 3, 1]
N = 3000
ALPHA = 1e-6


@pytest.fixture(scope="module")
def models():
    target = init_random(CFG, seed=11).eval()
    return target, perturbed_copy(target, 0.6, 3).eval()


def exact_joint(target, sp: SamplingParams) -> torch.Tensor:
    """[V, V] target probability of emitting (x1, x2) after PROMPT, by enumeration."""
    def q(ctx):
        cache = target.new_cache(1, len(ctx))
        with torch.no_grad():
            logits = target(torch.tensor([ctx]), torch.arange(len(ctx))[None], cache, 0)[0, -1]
        return target_probs(logits, sp.temperature, sp.top_k, sp.top_p)
    q1 = q(PROMPT)
    return torch.stack([q1[a] * q(PROMPT + [a]) for a in range(V)])


CASES = {
    "chain_iid": (TreeTopology.chain(3), ChildKind.iid, SamplingParams(1.0)),
    "static_wor": (TreeTopology.static([3, 2]), ChildKind.wor, SamplingParams(1.0)),
    "static_iid_topk_target": (TreeTopology.static([2, 2]), ChildKind.iid, SamplingParams(0.8, top_k=3)),
    "static_topk_children_top_p": (TreeTopology.static([2, 1]), ChildKind.deterministic, SamplingParams(1.3, top_p=0.8)),
    "static_wor_sample_match": (TreeTopology.static([2, 1]), ChildKind.wor,
                                SamplingParams(1.0, acceptance=AcceptanceRule.sample_match)),
    "prompt_lookup": (TreeTopology.static([2, 2]), ChildKind.deterministic, SamplingParams(1.0)),
    # the resident step (a GPU's default): fused sample-match walk on log q + Gumbel noise from a device generator
    "resident_static_topk_children_top_p": (TreeTopology.static([2, 1]), ChildKind.deterministic,
                                            SamplingParams(1.3, top_p=0.8)),
    "resident_chain_topk_children_top_k": (TreeTopology.chain(3), ChildKind.deterministic,
                                           SamplingParams(0.8, top_k=3)),
    "resident_prompt_lookup": (TreeTopology.static([2, 2]), ChildKind.deterministic, SamplingParams(1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_token_joint_matches_target(models, case):
    target, draft = models
    topo, kind, sp = CASES[case]
    resident = case.startswith("resident_")
    if case.endswith("prompt_lookup"):
        drafter = PromptLookupDrafter(topo, 1, 2, 4, rows=1)
    else:
        drafter = ModelDrafter(draft, topo, 16 + topo.n, kind, 0.9, V)
        drafter.resident = resident
    cache = target.new_cache(1, 16 + topo.n)
    engine = Engine(target, cache, drafter, max_seq_len=16, resident=resident)
    g_draft, g_verify = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    counts = torch.zeros(V, V)
    taus = []
    for _ in range(N):
        r = engine.generate([Request(list(PROMPT), 2, sp, g_draft, g_verify)])[0]
        counts[r.output_ids[0], r.output_ids[1]] += 1
        taus.append(r.accept_lengths[0])
    expected = exact_joint(target, sp) * N
    assert (counts[expected == 0] == 0).all(), "a zero-probability sequence was emitted"
    keep = expected > 0
    stat = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    assert stat < chi2.ppf(1 - ALPHA, dof), f"chi2={stat:.1f} dof={dof}"
    assert sum(taus) / N > 1.05, "no draft was ever accepted: the test would be vacuous"
