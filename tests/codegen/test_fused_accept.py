"""Fused tree verification vs its reference and vs the host verifier in runtime/sampling.py.

Greedy: node ids, path length and next token must equal `walk_greedy` exactly. Sample-match:
with a chooser whose draws are the kernel's Gumbel-max draws (draw s = argmax(log q + gumbel[s])),
`walk_sampled(rule=sample_match)` must give the same path and token draw for draw. Random trees
(depth <= 5, branching <= 3) over V = 37 with repeated tokens across and within sibling groups,
exact logit ties, a batch of different trees padded to one node count, and non-finite rows.
"""
from __future__ import annotations

import os
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from codegen.fused_accept import (AcceptMode, FusedAcceptSpec, fused_accept, fused_accept_ref,  # noqa: E402
                                  gumbel_noise)
from runtime.batch import TreeBatch  # noqa: E402
from runtime.sampling import AcceptanceRule, target_probs, walk_greedy, walk_sampled  # noqa: E402
from spec_compiler.tree import Provenance, TreeTopology  # noqa: E402
from tests.codegen.test_tree_attention import tree_topologies  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 37
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def draft_batch(topos: list[TreeTopology], seed: int, vocab: int = V, dtype=torch.float32):
    """Tokens and target logits for a batch of trees, padded to one node count with parent -1.

    Tokens come from a small pool, so siblings and branches repeat tokens; most nodes get one
    child's token boosted (deep acceptance), some get an exact two-way tie at the maximum.
    """
    g = torch.Generator().manual_seed(seed)
    N = max(t.n for t in topos)
    parents = torch.full((len(topos), N), -1, dtype=torch.int32)
    tokens = torch.full((len(topos), N), -1, dtype=torch.int64)
    logits = torch.randn(len(topos), N, vocab, generator=g)
    for b, topo in enumerate(topos):
        parents[b, :topo.n] = torch.tensor(topo.parents)
        tokens[b, :topo.n] = torch.randint(0, 6, (topo.n,), generator=g)
        for i in range(topo.n):
            kids = topo.children[i]
            r = float(torch.rand((), generator=g))
            if kids and r < 0.75:
                c = kids[int(torch.randint(len(kids), (), generator=g))]
                logits[b, i, tokens[b, c]] += 8.0
            elif r < 0.9:
                a, z = torch.randint(0, vocab, (2,), generator=g).tolist()
                logits[b, i, a] = logits[b, i, z] = logits[b, i].max() + 1.0  # tie: lowest id wins
    return logits.to(dtype), parents, tokens


def to_device(*xs):
    return [x.to(DEVICE) for x in xs]


def assert_same(out, ref):
    assert torch.equal(out.packed.cpu(), ref.packed.cpu()), f"kernel {out.packed.tolist()} != ref {ref.packed.tolist()}"


def host_tree(topo: TreeTopology, tokens: torch.Tensor) -> TreeBatch:
    return TreeBatch.build([topo], [tokens[:topo.n].tolist()], [[Provenance.root] + [Provenance.topk] * (topo.n - 1)],
                           topo.n)


class GumbelDraws:
    """A one-row chooser for walk_sampled whose s-th draw is the kernel's Gumbel-max draw s."""

    def __init__(self, gumbel_b: torch.Tensor):
        self.g, self.s = gumbel_b, 0

    def draw(self, w, nodes, active):
        y = torch.argmax(torch.log(w[0]).float() + self.g[self.s])
        self.s += 1
        return y[None]


def unpack(res, b):
    n = int(res.path_len[b])
    return res.path[b, :n].tolist(), int(res.next_token[b])


batches = st.lists(tree_topologies(), min_size=1, max_size=3)


@SETTINGS
@given(topos=batches, seed=st.integers(0, 2**16), extra_depth=st.sampled_from([0, 1]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_greedy_equals_verify_greedy(topos, seed, extra_depth, dtype):
    logits, parents, tokens = draft_batch(topos, seed, dtype=dtype)
    max_depth = max(t.max_depth for t in topos) + extra_depth
    out = fused_accept(*to_device(logits, parents, tokens), max_depth)
    assert_same(out, fused_accept_ref(logits, parents, tokens, max_depth))
    for b, topo in enumerate(topos):
        assert unpack(out, b) == walk_greedy(host_tree(topo, tokens[b]), 0, logits[b, :topo.n])


@SETTINGS
@given(topos=batches, seed=st.integers(0, 2**16), temperature=st.sampled_from([0.7, 1.0, 1.5]),
       top_k=st.sampled_from([0, 3]))
def test_sample_match_equals_verify_sampling_draw_for_draw(topos, seed, temperature, top_k):
    logits, parents, tokens = draft_batch(topos, seed)
    max_depth = max(t.max_depth for t in topos)
    q = target_probs(logits, temperature, top_k)  # [B, N, V] float64
    scores = torch.log(q).float()  # -inf where top-k removed a token
    gumbel = gumbel_noise(len(topos), max_depth, V, torch.Generator().manual_seed(seed))
    out = fused_accept(*to_device(scores, parents, tokens), max_depth, gumbel.to(DEVICE))
    assert_same(out, fused_accept_ref(scores, parents, tokens, max_depth, gumbel))

    for b, topo in enumerate(topos):
        expect = walk_sampled(host_tree(topo, tokens[b]), 0, q[b, :topo.n], AcceptanceRule.sample_match,
                              chooser=GumbelDraws(gumbel[b]))
        assert unpack(out, b) == expect


def test_zero_noise_rows_are_greedy():
    topos = [TreeTopology.static([3, 2, 2])] * 3
    logits, parents, tokens = draft_batch(topos, seed=3)
    gumbel = gumbel_noise(3, 3, V, torch.Generator().manual_seed(0))
    gumbel[1] = 0.0  # request 1 is greedy inside a sampled batch
    out = fused_accept(*to_device(logits, parents, tokens), 3, gumbel.to(DEVICE))
    greedy = fused_accept(*to_device(logits, parents, tokens), 3)
    assert torch.equal(out.packed[1], greedy.packed[1])
    assert_same(out, fused_accept_ref(logits, parents, tokens, 3, gumbel))


def test_nonfinite_rows_stop_only_their_request():
    topo = TreeTopology.chain(3)
    tokens = torch.tensor([-1, 4, 5, 6]).expand(3, 4)
    logits = torch.full((3, 4, V), -5.0)
    logits[:, 0, 4] = logits[:, 1, 5] = logits[:, 2, 6] = logits[:, 3, 9] = 5.0  # accept the whole chain
    logits[1, 0, 7] = float("nan")  # request 1: NaN at the root
    logits[2, 2] = float("-inf")  # request 2: nothing finite at node 2
    parents = torch.tensor(topo.parents, dtype=torch.int32)
    out = fused_accept(*to_device(logits, parents, tokens), topo.max_depth)
    assert_same(out, fused_accept_ref(logits, parents, tokens, topo.max_depth))
    assert unpack(out, 0) == ([0, 1, 2, 3], 9)
    assert unpack(out, 1) == ([0], -1)
    assert unpack(out, 2) == ([0, 1, 2], -1)


def test_walk_stops_at_max_depth():
    topo = TreeTopology.chain(4)
    tokens = torch.tensor([-1, 1, 2, 3, 4])
    logits = torch.zeros(5, V)
    logits[torch.arange(5), torch.tensor([1, 2, 3, 4, 5])] = 1.0  # every draft token matches
    parents = torch.tensor(topo.parents, dtype=torch.int32)
    out = fused_accept(*to_device(logits, parents, tokens), 2)
    assert unpack(out, 0) == ([0, 1, 2], 3)  # node 3 is not accepted; its token is emitted instead
    assert out.path.shape == (1, 3)
    assert_same(out, fused_accept_ref(logits, parents, tokens, 2))


def test_spec_is_checked():
    spec = FusedAcceptSpec(max_depth=3, max_nodes=20, mode=AcceptMode.greedy)
    assert spec.name == "fused_accept_greedy_d3_n32"
    logits, parents, tokens = draft_batch([TreeTopology.static([2, 2, 2])], seed=0)  # 15 nodes fit in 20
    out = fused_accept(*to_device(logits, parents, tokens), 3, spec=spec)
    assert_same(out, fused_accept_ref(logits, parents, tokens, 3))
    with pytest.raises(AssertionError, match="do not fit"):
        fused_accept(*to_device(logits, parents, tokens), 2, spec=spec)
    with pytest.raises(AssertionError, match="gumbel must be fp32"):
        fused_accept(*to_device(logits, parents, tokens), 3, torch.zeros(1, 3, V, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vocab", [32000, 32001, 128256])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sample_match"])
def test_fused_accept_gpu(vocab, sampled):
    topos = [TreeTopology.static([4, 3, 2, 2])] * 4 + [TreeTopology.chain(5)] * 4  # 89 nodes, depth 4 and 5
    logits, parents, tokens = draft_batch(topos, seed=0, vocab=vocab, dtype=torch.bfloat16)
    gumbel = gumbel_noise(len(topos), 5, vocab, torch.Generator().manual_seed(0)) if sampled else None
    out = fused_accept(*to_device(logits, parents, tokens), 5, None if gumbel is None else gumbel.to(DEVICE))
    assert_same(out, fused_accept_ref(logits, parents, tokens, 5, gumbel))
    assert int(out.path_len.max()) > 2  # the boosted draft tokens were accepted, so the walk went deep
