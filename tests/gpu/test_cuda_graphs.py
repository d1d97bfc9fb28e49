"""runtime/cuda_graphs.py: bucket routing and static buffers (CPU), graph replay == eager (CUDA).

On the CPU a stand-in capture backend (`RerunGraphs`) "replays" by running the captured function again over
the wrapper's static buffers: if the wrapper forgot to copy a tensor of the call into them, or keyed two
different shapes to one graph, the replayed forward reads stale data and the decoded tokens differ from
eager's. The `gpu` tests capture real `torch.cuda.CUDAGraph`s of the default pair.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.batch import Block, TreeBatch
from runtime.cuda_graphs import GraphedForward, graph_runtime
from runtime.decode import Engine, Request
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.models import mamba2
from runtime.models.llama import LlamaConfig, init_random
from runtime.sampling import ChildKind
from spec_compiler.tree import Provenance, TreeTopology

V = 61
LLAMA = LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    max_position_embeddings=512)
MAX_SEQ = 96
ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
PROV = [Provenance.root, Provenance.topk, Provenance.topk]


class RerunGraph:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


class RerunGraphs:
    """CPU stand-in for `CudaGraphs`: capture runs the function once, replay runs it again into the same output."""

    def supports(self, device):
        return True

    def capture(self, fn):
        out = fn()
        return RerunGraph(fn, out), out


def prompts(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, V, (k,), generator=g).tolist() for k in (13, 4, 21)[:n]]


def engine(target, draft, topo, rows, kv_window="full", graphs=None, **kw):
    cap = MAX_SEQ + topo.n
    if graphs is not None:
        target = GraphedForward(target, graphs, **kw)
        draft = draft if draft is None else GraphedForward(draft, graphs, **kw)
    drafter = NoDrafter() if draft is None else ModelDrafter(draft, topo, cap, ChildKind.deterministic, 1.0, V,
                                                              rows=rows, kv_window=kv_window)
    return Engine(target, target.new_cache(rows, cap), drafter, max_seq_len=MAX_SEQ, kv_window=kv_window)


def decode_all(eng, budgets=(30, 17, 25)):
    reqs = [Request(p, n) for p, n in zip(prompts(), budgets)]
    return [r.output_ids for r in eng.generate(reqs)]


@pytest.fixture(scope="module")
def pair():
    return init_random(LLAMA, seed=0).eval(), init_random(LLAMA, seed=3).eval()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("topo", [TreeTopology.chain(3), TreeTopology.static([2, 2])], ids=["chain3", "static22"])
def test_replayed_decode_equals_eager(pair, topo, rows):
    target, draft = pair
    eager = decode_all(engine(target, draft, topo, rows))
    eng = engine(target, draft, topo, rows, graphs=RerunGraphs())
    assert decode_all(eng) == eager  # bitwise: fp32 on the CPU, the same forwards over the static buffers
    t, d = eng.target.stats, eng.drafter.model.stats
    assert t["captures"] >= 1 and t["replays"] > 2 * t["captures"], t  # verify buckets are reused, not recaptured
    assert t["eager"] >= len(prompts()), t  # prefills stay eager
    assert d["captures"] >= 1 and d["replays"] > d["captures"], d


def test_buckets_are_keyed_by_shape_and_phase(pair):
    target, _ = pair
    g = GraphedForward(target, RerunGraphs())
    cache = target.new_cache(2, 64)
    g.hidden(torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5)[None], cache.view_rows(0, 1),
             Block.causal(0, 5, 1, 64), num_rows=0)  # a prefill: eager
    tree = TreeTopology.static([2])
    for L in (5, 6, 9):  # one verify bucket (B=1, T=3) at three lengths: one capture, then replays
        tb = TreeBatch.build([tree], [[7, 8, 9]], [PROV], 3)
        block = Block.tree(torch.tensor([L]), tb, 64)
        out = g(tb.tokens, block.positions, cache.view_rows(0, 1), block)
        ref = target(tb.tokens, block.positions, cache.view_rows(0, 1), block)
        assert torch.equal(out, ref)
    assert g.stats == {"captures": 1, "replays": 3, "eager": 1}
    kept = out.clone()
    tb2 = TreeBatch.build([tree], [[3, 4, 5]], [PROV], 3)
    b2 = Block.tree(torch.tensor([9]), tb2, 64)
    g.hidden(tb2.tokens, b2.positions, cache.view_rows(0, 1), b2)  # another phase: its own graph
    g(tb2.tokens, b2.positions, cache.view_rows(0, 1), b2, num_logits=1)  # another head width: its own graph
    assert torch.equal(out, kept)  # outputs are the caller's own tensors, never overwritten by later replays
    assert g.stats["captures"] == 3
    assert len({k[0] for k in g.entries}) == 2


def test_falls_back_to_eager(pair):
    target, draft = pair
    topo = TreeTopology.chain(3)
    live = engine(target, draft, topo, 1, kv_window="live", graphs=RerunGraphs())
    decode_all(live, budgets=(10,))
    assert live.target.stats["captures"] == 0 and live.target.stats["eager"] > 0  # S changes every step
    small = engine(target, draft, topo, 1, graphs=RerunGraphs(), max_tokens=2)
    assert decode_all(small, budgets=(10,)) == decode_all(engine(target, draft, topo, 1), budgets=(10,))
    assert small.target.stats["eager"] > len(prompts(1))  # full verify trees (T=4) are above max_tokens
    assert all(k[2] <= 2 for k in small.target.entries)  # only the budget-truncated ones were captured
    one = engine(target, draft, topo, 1, graphs=RerunGraphs(), max_graphs=1)
    decode_all(one, budgets=(10,))
    assert len(one.target.entries) == 1
    ssm = mamba2.init_random_mamba2(mamba2.Mamba2Config(vocab_size=V, d_model=32, n_layer=2, d_state=8, headdim=16,
                                                        chunk_size=64), seed=0).eval()
    g = GraphedForward(ssm, RerunGraphs())
    eng = Engine(g, ssm.new_cache(1, MAX_SEQ + 4, num_scratch=5), NoDrafter(), max_seq_len=MAX_SEQ, kv_window="full")
    eng.generate([Request(prompts(1)[0], 6)])
    assert g.stats["captures"] == 0 and g.stats["eager"] > 0  # SSM caches are not captured
    assert GraphedForward(target).key("logits", torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), None,
                                      None, None) is None  # training call (no cache)


def test_cuda_backend_declines_the_cpu(pair):
    target, draft = pair
    eng = engine(target, draft, TreeTopology.chain(2), 1, graphs=None)
    eng.target = GraphedForward(target)  # the real CudaGraphs backend
    decode_all(eng, budgets=(6,))
    assert eng.target.stats["captures"] == 0 and eng.target.stats["eager"] > 0


# ---------------------------------------------------------------------------------------------------
# CUDA: the default pair
# ---------------------------------------------------------------------------------------------------
def default_runtime(compose_overrides):
    import main
    from runtime.device import host
    from runtime.load import load
    from spec_compiler.plan import make_plan
    from spec_compiler.validate import validate
    from tests.conftest import compose_config

    cfg = compose_config(["target=default", "drafter=default", "task=generate", "backend.device=cuda",
                          "backend.kv_window=full", "target.max_seq_len=512"] + compose_overrides)
    return load(make_plan(validate(main.to_spec(cfg), host())))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_graph_replay_equals_eager_logits_default_target():
    from runtime.models.checkpoint import load_llama
    target = load_llama(ROOT / "models/default/target", device="cuda")
    g = GraphedForward(target)
    B, C = 3, 256
    cache = target.new_cache(B, C)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([40, 7, 120])
    prompt = torch.randint(0, target.config.vocab_size, (B, 120), generator=gen)
    for b in range(B):  # each row's prefix, eager
        L = int(lengths[b])
        blk = Block.causal(0, L, 1, C, device="cuda")
        target.hidden(prompt[b:b + 1, :L].cuda(), blk.positions, cache.view_rows(b, b + 1), blk, num_rows=0)
    topo = TreeTopology.static([3, 2, 1])
    for trial in range(3):  # the same bucket with new tokens each time: captured once, replayed after
        toks = torch.randint(0, target.config.vocab_size, (B, topo.n), generator=gen)
        tb = TreeBatch.build([topo] * B, toks.tolist(), [[Provenance.root] + [Provenance.topk] * (topo.n - 1)] * B, 16)
        block = Block.tree(lengths, tb, C, device="cuda")
        with torch.inference_mode():
            ref = target(tb.tokens.cuda(), block.positions, cache.view_rows(0, B), block)
        out = g(tb.tokens.cuda(), block.positions, cache.view_rows(0, B), block)
        err = ((out - ref).norm() / ref.norm()).item()
        print(f"trial {trial}: rel err {err:.2e}, max |diff| {(out - ref).abs().max().item():.2e}")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert g.stats["captures"] == 1 and g.stats["replays"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tree", ["top3", "chain"])
def test_greedy_through_graphs_equals_eager_default_pair(tree):
    rt = default_runtime([f"tree={tree}"])
    graphed = graph_runtime(rt)
    ids = [rt.tokenizer.encode(p).ids for p in ("def parse(line):\n", "import os\nimport sys\n\n\nclass ")]
    eager = [rt.generate(p, 48).output_ids for p in ids]
    out = [graphed.generate(p, 48).output_ids for p in ids]
    assert out == eager
    assert graphed.target.stats["replays"] > graphed.target.stats["captures"] > 0, graphed.target.stats
