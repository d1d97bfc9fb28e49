"""Retrieval (issue #13): the datastore (build, reuse, refusal, lookup against brute force), and greedy decoding
with retrieval-only (REST, context) and fused (RASD) trees equal to plain autoregressive decoding, batched, for
Llama, Mamba2 and hybrid targets, with drafts really accepted (tau > 1)."""
from __future__ import annotations

import json
from collections import Counter
import numpy as np
import pytest
import torch

import main
from runtime.datastore import Datastore, load_store, open_store, read_corpus, tokenizer_hash
from runtime.decode import Engine, Request, SamplingParams
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.lookup import PromptLookupDrafter
from runtime.models import mamba2
from runtime.models.llama import init_random
from runtime.retrieval import DatastoreDrafter, FusedDrafter, fuse, prune
from runtime.sampling import ChildKind
from spec_compiler.errors import InputError
from spec_compiler.tokenizer import byte_level_tokenizer
from spec_compiler.tree import Provenance, TreeTopology
from tests.runtime.test_batch import LLAMA, MAX_SEQ, SSM, V, make_target, prompts
from tests.test_cli_errors import BASE

MAX_NODES = 8
CANDIDATES = 16
BUDGETS = (30, 21, 12, 26, 17)


# ---------------------------------------------------------------------------------------------------
# the datastore
# ---------------------------------------------------------------------------------------------------
def brute_counts(tokens: list[int], sep: int, context: list[int], n: int, depth: int) -> Counter:
    """Occurrences of every continuation prefix (up to depth tokens, stopping at a separator) after the
    context's n-token suffix."""
    suf, out = context[-n:], Counter()
    for i in range(len(tokens) - n + 1):
        if tokens[i:i + n] == suf:
            cont = []
            for x in tokens[i + n:i + n + depth]:
                if x == sep:
                    break
                cont.append(x)
                out[tuple(cont)] += 1
    return out


def test_lookup_matches_brute_force():
    rng = np.random.default_rng(0)
    sep = 6
    tokens = rng.integers(0, 7, 3000).tolist()  # small alphabet: long repeated n-grams, separators inside
    ds = Datastore.from_tokens(tokens, sep)
    for trial in range(40):
        ctx = rng.integers(0, 6, 12).tolist()
        n, lo, hi = ds.longest_suffix(ctx, 1, 6)
        occurs = [k for k in range(1, 7) if any(tokens[i:i + k] == ctx[-k:] for i in range(len(tokens)))]
        assert n == (max(occurs) if occurs else 0)
        parents, toks, counts = ds.candidates(ctx, 1, 6, 4, 64, 1000)  # no budget: every continuation prefix
        want = brute_counts(tokens, sep, ctx, n, 4)
        paths = []
        for i, (p, x) in enumerate(zip(parents, toks)):
            paths.append((paths[p - 1] if p else ()) + (x,))
        assert dict(zip(paths, counts)) == dict(want)
        # a budget keeps the most frequent nodes first; siblings are distinct
        parents, toks, counts = ds.candidates(ctx, 1, 6, 4, 3, 7)
        assert len(toks) <= 7 and sum(1 for i in range(len(toks)) if (i + 1) not in parents) <= 3
        assert len(set(zip(parents, toks))) == len(toks)
        assert counts == sorted(counts, reverse=True)  # best first: a child never outranks its parent


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "pkg").mkdir(parents=True)
    (d / "pkg" / "a.py").write_text("def add(x, y):\n    return x + y\n\n\ndef sub(x, y):\n    return x - y\n")
    (d / "pkg" / "b.py").write_text("class Point:\n    def __init__(self, x, y):\n        self.x = x\n")
    (d / "pkg" / "skip.bin").write_bytes(b"\x00\x01")  # not a text suffix: a directory leaves it out
    rows = [{"text": "return x + y"}, {"turns": ["a", "b"]}]
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_store_is_deterministic_reused_and_refused_for_another_tokenizer(corpus_dir, tmp_path, monkeypatch):
    tok = byte_level_tokenizer()
    entries = [str(corpus_dir / "pkg"), str(corpus_dir / "docs.jsonl")]
    a = open_store(entries, tok, str(tmp_path / "c1"), progress=False)
    b = open_store(entries, tok, str(tmp_path / "c2"), progress=False)
    assert a.path.name == b.path.name  # keyed by corpus and tokenizer only
    for f in ("tokens.npy", "sa.npy"):
        assert (a.path / f).read_bytes() == (b.path / f).read_bytes()
    assert isinstance(a.tokens.base, np.memmap) and isinstance(a.sa.base, np.memmap)  # memory-mapped
    docs, _ = read_corpus(entries)
    text = "\x00".join(d.text for d in docs)
    assert "def add" in text and "return x + y" in text and "b" in [d.text for d in docs]
    assert a.N == sum(len(d.text.encode()) for d in docs) + len(docs)  # bytes + one separator per document
    suffixes = [tuple(a.tokens[i:].tolist()) for i in a.sa]
    assert suffixes == sorted(suffixes)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt an existing store")
    monkeypatch.setattr("runtime.datastore.build_store", no_rebuild)
    again = open_store(entries, tok, str(tmp_path / "c1"), progress=False)
    assert again.path == a.path
    (corpus_dir / "pkg" / "a.py").write_text("def add(x, y):\n    return y + x\n")  # new content: a new key
    with pytest.raises(AssertionError, match="rebuilt"):
        open_store(entries, tok, str(tmp_path / "c1"), progress=False)

    other = byte_level_tokenizer()
    other.add_special_tokens(["<|extra|>"])
    with pytest.raises(InputError) as e:
        open_store(entries, other, str(tmp_path / "c1"), store=str(a.path))
    assert e.value.where == "retrieval.store" and "another tokenizer" in e.value.reason
    meta = json.loads((a.path / "meta.json").read_text())
    meta["tokenizer_hash"] = tokenizer_hash(other)
    (a.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="another tokenizer"):
        load_store(a.path, tokenizer_hash(tok), "retrieval.cache_dir")


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    (d / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (d / "blob.py").write_bytes(b"x = 1\x00\x00\x01")
    (d / "empty").mkdir()
    (d / "empty" / "blank.txt").write_text("  \n")
    (d / "rows.jsonl").write_text('{"title": "no text"}\n')
    return d


@pytest.mark.parametrize("corpus,reason", [
    ("{d}/nope", "no such file"),
    ("{d}/empty", "the corpus is empty"),
    ("{d}/blob.py", "binary file"),
    ("{d}/latin1.py", "not UTF-8"),
    ("{d}/rows.jsonl", "a corpus row needs"),
], ids=["missing", "empty", "binary", "not-utf8", "jsonl-row"])
def test_bad_corpus_exits_2_naming_the_key(corpus, reason, bad_corpora, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [b for b in BASE if not b.startswith("drafter=")] + [
        "drafter=none", "retrieval=datastore", f"retrieval.corpus=[{corpus.format(d=bad_corpora)}]",
        f"retrieval.cache_dir={tmp_path / 'stores'}"]
    code = main.cli(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err + out and len(lines) == 1, err
    assert "retrieval.corpus" in lines[0] and reason in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # no run folder, no store


# ---------------------------------------------------------------------------------------------------
# greedy equality, batched
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "mamba2", "hybrid"])
def target(request):
    return request.param, make_target(request.param)


def new_cache(model, rows: int, nodes: int):
    if isinstance(model, mamba2.Mamba2LMModel):
        return model.new_cache(rows, MAX_SEQ + nodes, num_scratch=nodes + 1)
    return model.new_cache(rows, MAX_SEQ + nodes)


def requests():
    return [Request(p, n, SamplingParams()) for p, n in zip(prompts(), BUDGETS)]


def generate(model, drafter, nodes: int, rows: int):
    eng = Engine(model, new_cache(model, rows, nodes), drafter, max_seq_len=MAX_SEQ)
    return eng.generate(requests())


@pytest.fixture(scope="module")
def reference(target):
    """Greedy autoregressive outputs, and a datastore holding the texts they continue into (in domain)."""
    _, model = target
    outs = [r.output_ids for r in generate(model, NoDrafter(), 1, 1)]
    corpus = []
    for p, o in zip(prompts(), outs):
        corpus += p + o + [V]
    return outs, Datastore.from_tokens(corpus, V)


def draft_model(model, topo: TreeTopology, rows: int, child=ChildKind.deterministic):
    """An independent random model of the target's family: it rarely agrees with the target."""
    ssm = isinstance(model, mamba2.Mamba2LMModel)
    m = (mamba2.init_random_mamba2(SSM, seed=3) if ssm else init_random(LLAMA, seed=3)).eval()
    nodes = topo.n + CANDIDATES + 1
    return ModelDrafter(m, topo, MAX_SEQ + nodes, child, 1.0, V, rows=rows,
                        cache=new_cache(m, rows, nodes))


@pytest.mark.parametrize("method", ["datastore", "context", "rasd-datastore", "rasd-context", "rasd-datastore-skip"])
def test_greedy_retrieval_equals_autoregressive(target, reference, method):
    arch, model = target
    ref, store = reference
    rows, topo = 3, TreeTopology.static([2, 1])
    if method == "datastore":
        drafter, nodes = DatastoreDrafter(store, 1, 8, 6, 3, MAX_NODES), MAX_NODES + 1
    elif method == "context":
        drafter = PromptLookupDrafter(TreeTopology.static([3, 1, 1, 1, 1, 1]), 1, 3, 6, rows, budget=MAX_NODES + 1)
        nodes = MAX_NODES + 1
    else:
        source = DatastoreDrafter(store, 1, 8, 6, 3, CANDIDATES) if method.startswith("rasd-datastore") else \
            PromptLookupDrafter(TreeTopology.static([3, 1, 1, 1, 1, 1]), 1, 3, 6, rows, budget=CANDIDATES + 1)
        skip = 3 if method.endswith("-skip") else 0
        drafter = FusedDrafter(draft_model(model, topo, rows), source, MAX_NODES, skip_model_after=skip)
        nodes = topo.n + MAX_NODES
    calls, steps = [], []
    if method.endswith("-skip"):  # count the steps, and those the draft model drafted in
        real, real_propose = drafter.model._catch_up, drafter.propose
        drafter.model._catch_up = lambda rs: calls.append(len(rs)) or real(rs)
        drafter.propose = lambda rs, md: steps.append(len(rs)) or real_propose(rs, md)
    res = generate(model, drafter, nodes, rows)
    assert [r.output_ids for r in res] == ref
    if method.endswith("-skip"):
        assert 0 < len(calls) < len(steps), (len(calls), len(steps))  # some steps drafted from retrieval alone
    tau = sum(len(r.output_ids) for r in res) / sum(r.steps for r in res)
    if "datastore" in method:
        assert tau > 1.5, tau  # the store holds these very texts
    elif arch == "llama":  # random Llama outputs repeat themselves; random SSM outputs need not (test_batch.py)
        assert tau > 1.0, tau


def test_fusion_merges_by_longest_prefix_and_orders_drafted_first():
    """Model tree root -> {5, 7}, 5 -> {9}; candidates 5 -> 9 -> 2, 7 -> 3, 4: the fused tree shares the
    5 -> 9 prefix, hangs 2 under it, 3 under 7, and 4 after the drafted children of the root."""
    from runtime.batch import TreeBatch
    P = Provenance
    mt = TreeTopology((-1, 0, 0, 1))
    model = TreeBatch.build([mt], [[1, 5, 7, 9]], [[P.root, P.wor, P.wor, P.iid]], 4,
                            torch.rand(1, 4, 11, dtype=torch.float64))
    ct = TreeTopology((-1, 0, 1, 2, 0, 4, 0))
    cand = TreeBatch.build([ct], [[1, 5, 9, 2, 7, 3, 4]], [[P.root] + [P.retrieved] * 6], 7)
    keep = prune(cand, [[0.0, -1, -2, -3, -1.5, -2.5, -0.5]], 5)
    assert keep == [[0, 1, 2, 4, 5, 6]]  # node 3 (path -3) dropped
    out = fuse(model, cand, keep, (8, 16))
    topo = out.topologies[0]
    toks, prov = out.row_tokens(0), out.provenance[0, :topo.n].tolist()
    got = {(toks[topo.parents[i]] if i else None, toks[i], P(prov[i]).name) for i in range(topo.n)}
    assert got == {(None, 1, "root"), (1, 5, "wor"), (1, 7, "wor"), (1, 4, "retrieved"), (5, 9, "iid"),
                   (7, 3, "retrieved")}
    assert [toks[c] for c in topo.children[0]] == [5, 7, 4]  # drafted first, in the model's order
    assert topo.is_level_ordered and out.T == 8
    for i in range(topo.n):  # draft_probs follow their model node; retrieved-only nodes have none
        src = {1: 0, 5: 1, 7: 2, 9: 3}.get(toks[i]) if prov[i] != P.retrieved else None
        want = model.draft_probs[0, src] if src is not None else torch.zeros(11, dtype=torch.float64)
        assert torch.equal(out.draft_probs[0, i], want)


# ---------------------------------------------------------------------------------------------------
# config -> plan
# ---------------------------------------------------------------------------------------------------
def plan_of(overrides):
    from tests.conftest import compose_config
    return main.prepare(compose_config(overrides), in_run=False)[1]


def test_plan_sizes_trees_and_caches_for_fusion():
    fused = plan_of(["retrieval=context", "tree=chain", "tree.k=3", "retrieval.max_nodes=5",
                     "retrieval.num_candidates=20", "retrieval.prune=path"])
    r = fused.retrieval
    assert (r.kind, r.max_nodes, r.num_candidates, r.prune) == ("context", 5, 20, "path")
    assert fused.tree_buckets[-1] == 4 + 5  # the model's chain plus the kept retrieved nodes
    assert fused.cache_capacity == fused.max_seq_len + 21  # the candidates' drafter forward is the largest
    root = plan_of(["retrieval=context", "tree=chain", "tree.k=3", "retrieval.max_nodes=5"])
    assert root.retrieval.prune == "root" and root.cache_capacity == root.max_seq_len + 9  # no scoring forward
    alone = plan_of(["drafter=none", "retrieval=context", "retrieval.max_nodes=6"])
    assert alone.tree_buckets[-1] == 7 and alone.drafter_kind == "none" and "context" in alone.name
    assert plan_of([]).retrieval is None


@pytest.mark.parametrize("overrides,key,words", [
    (["drafter=prompt_lookup", "retrieval=context"], "retrieval.kind", "already is context retrieval"),
    (["retrieval=context", "sampling=sample", "tree.children=iid", "sampling.acceptance=rrs_draft_probs"],
     "sampling.acceptance", "retrieved nodes are deterministic"),
    (["retrieval=context", "retrieval.max_ngram=0"], "retrieval.max_ngram", "must be >= min_ngram"),
    (["retrieval=datastore", "retrieval.store=/nonexistent/store"], "retrieval.store", "not found"),
    (["target=mamba2_tiny", "drafter=none", "retrieval=context", "retrieval.max_nodes=300"], "retrieval.max_nodes",
     "single-chunk limit"),
])
def test_bad_retrieval_config_is_refused(overrides, key, words):
    from spec_compiler.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        plan_of(overrides)
    assert e.value.where == key and words in e.value.reason, str(e.value)


def test_sampled_fused_batch_equals_alone(target, reference):
    """Temperature > 0 (mixed settings per row): a request's fused-tree output is the same in a batch as alone."""
    from tests.runtime.test_batch import MIXED
    _, model = target
    _, store = reference
    topo = TreeTopology.static([2, 1])

    def run(reqs, rows):
        d = FusedDrafter(draft_model(model, topo, rows, ChildKind.wor), DatastoreDrafter(store, 1, 8, 6, 3, CANDIDATES),
                         MAX_NODES)
        eng = Engine(model, new_cache(model, rows, topo.n + MAX_NODES), d, max_seq_len=MAX_SEQ)
        return [r.output_ids for r in eng.generate(reqs)]

    def reqs():
        return [Request(p, n, sp, torch.Generator().manual_seed(2 * s), torch.Generator().manual_seed(2 * s + 1))
                for s, (p, n, sp) in enumerate(zip(prompts()[:3], (12, 10, 8), MIXED[:3]))]
    alone = [run([r], 1)[0] for r in reqs()]
    assert run(reqs(), 2) == alone


def test_prompt_lookup_drafter_is_context_retrieval_alone():
    """drafter=prompt_lookup and retrieval=context with drafter=none build the same drafter (one implementation)."""
    from runtime.load import make_drafter
    a = make_drafter(plan_of(["drafter=prompt_lookup", "tree=static", "tree.branching=[4,1,1]",
                              "drafter.prompt_lookup.num_pred_tokens=3"]), None)
    b = make_drafter(plan_of(["drafter=none", "retrieval=context", "retrieval.max_candidates=4",
                              "retrieval.cont_len=3", "retrieval.max_nodes=12"]), None)
    assert type(a) is type(b) is PromptLookupDrafter
    assert [(d.width, d.depth, d.budget, d.min_n, d.max_n) for d in (a, b)] == [(4, 3, 13, 1, 3)] * 2
