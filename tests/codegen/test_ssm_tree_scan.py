"""The tree-masked SSD scan (codegen/ssm_tree_scan.py): the masked torch form and the Triton kernel equal the
node-by-node recurrence along every root-to-node path (TESTING.md layer 5; ALGORITHMS.md §7.5 tests 1, 2, 4).
Without a GPU the kernel runs under TRITON_INTERPRET=1 on CPU (small shapes). Triton reads that variable when
it is first imported (its own tl.* helpers are jitted then), so tests/conftest.py sets it before anything
imports triton; the setdefault below covers running this file alone."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is first decorated

import hypothesis.strategies as st  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402

from codegen.ssm_tree_scan import (SSMTreeScanSpec, ssm_tree_scan, ssm_tree_scan_ref,  # noqa: E402
                                   ssm_tree_scan_sequential, triton)
from runtime.models.mamba2 import ssd_chunked_scan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None)


@st.composite
def forests(draw, max_nodes=16, max_roots=3):
    """Parents in topological order (-1: a block root) and, per root, which initial state it continues from."""
    n = draw(st.integers(1, max_nodes))
    roots = draw(st.integers(1, max_roots))
    parents = [-1] + [draw(st.integers(-1 if roots > 1 else 0, i - 1)) for i in range(1, n)]
    init_of_root = [draw(st.integers(0, roots - 1)) for _ in range(n)]
    return parents, init_of_root, roots


def ancestors(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    return anc


def init_index(parents: list[int], init_of_root: list[int]) -> list[int]:
    out = []
    for i, p in enumerate(parents):
        out.append(init_of_root[i] if p < 0 else out[p])
    return out


def inputs(seed: int, b: int, T: int, H: int, P: int, G: int, N: int, R: int, dtype=torch.float32, device="cpu",
           D_has_hdim=False):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    dt = torch.nn.functional.softplus(r(b, T, H) - 1)
    A = -torch.exp(r(H))  # some heads decay fast, so off-path exp(c_i - c_j) would overflow if not selected
    D = r(H, P) if D_has_hdim else r(H)
    return dict(x=r(b, T, H, P), dt=dt, A=A, B=r(b, T, G, N), C=r(b, T, G, N), D=D), r(b, R, H, P, N)


@SETTINGS
@given(forests(), st.sampled_from([torch.float32, torch.float64]), st.booleans(), st.integers(0, 2**31 - 1))
def test_masked_form_equals_recurrence(forest, dtype, D_has_hdim, seed):
    parents, roots_init, R = forest
    T = len(parents)
    kw, S = inputs(seed, 2, T, 4, 3, 2, 5, R, dtype, D_has_hdim=D_has_hdim)
    idx = init_index(parents, roots_init)
    y, states = ssm_tree_scan_ref(**kw, anc=ancestors(parents), init_states=S, init_index=torch.tensor(idx),
                                  return_states=True)
    y_seq, states_seq = ssm_tree_scan_sequential(**kw, parents=parents, init_states=S, init_index=idx)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, y_seq, **tol)
    torch.testing.assert_close(states, states_seq, **tol)  # states[a] is the commit after accepting path(a)
    assert torch.isfinite(y).all()


@SETTINGS
@given(st.lists(forests(max_nodes=8), min_size=2, max_size=3), st.integers(0, 2**31 - 1))
def test_per_row_trees_equal_each_row_alone(rows, seed):
    """anc [b, T, T] and init_index [b, T]: every row its own forest (padded to one T with lone nodes), each
    row equal to the recurrence on its own forest and bitwise equal to the same row computed alone."""
    T = max(len(p) for p, _, _ in rows)
    R = max(r for _, _, r in rows)
    parents = [p + [-1] * (T - len(p)) for p, _, _ in rows]
    idx = [init_index(p, init + [0] * (T - len(init))) for p, (_, init, _) in zip(parents, rows)]
    b = len(rows)
    kw, S = inputs(seed, b, T, 4, 3, 2, 5, R)
    anc = torch.stack([ancestors(p) for p in parents])
    y, states = ssm_tree_scan_ref(**kw, anc=anc, init_states=S, init_index=torch.tensor(idx), return_states=True)
    for r in range(b):
        one = {k: v if k in ("A", "D") else v[r:r + 1] for k, v in kw.items()}  # row r alone
        y_seq, st_seq = ssm_tree_scan_sequential(**one, parents=parents[r], init_states=S[r:r + 1], init_index=idx[r])
        torch.testing.assert_close(y[r:r + 1], y_seq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states[r:r + 1], st_seq, atol=1e-5, rtol=1e-5)
        y1, st1 = ssm_tree_scan_ref(**one, anc=anc[r], init_states=S[r:r + 1], init_index=torch.tensor(idx[r]),
                                    return_states=True)
        assert torch.equal(y1, y[r:r + 1]) and torch.equal(st1, states[r:r + 1])


def test_chain_reduces_to_chunked_scan():
    T = 11
    kw, S = inputs(0, 2, T, 4, 3, 2, 5, 1, torch.float64)
    chain = torch.ones(T, T, dtype=torch.bool).tril()
    y, states = ssm_tree_scan_ref(**kw, anc=chain, init_states=S, return_states=True)
    for chunk in (1, 4, 16):
        y_c, final = ssd_chunked_scan(kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk, kw["D"], S[:, 0])
        torch.testing.assert_close(y, y_c, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(states[:, -1], final, atol=1e-12, rtol=1e-12)


def test_off_path_overflow_is_selected_away():
    """A sibling with a huge decay: exp(c_i - c_j) = exp(+800) off the path must not turn into inf * 0 = NaN."""
    parents = [-1, 0, 0, 2]
    kw, S = inputs(1, 1, 4, 2, 3, 1, 5, 1)
    kw["dt"][:, 1] = 400.0
    kw["A"][:] = -2.0
    y, states = ssm_tree_scan_ref(**kw, anc=ancestors(parents), init_states=S, return_states=True)
    assert torch.isfinite(y).all() and torch.isfinite(states).all()
    y_seq, _ = ssm_tree_scan_sequential(**kw, parents=parents, init_states=S)
    torch.testing.assert_close(y, y_seq, atol=1e-5, rtol=1e-5)
    if triton is None:
        return
    yk, sk = ssm_tree_scan(**{k: v.to(DEVICE) for k, v in kw.items()}, anc=ancestors(parents).to(DEVICE),
                           init_state=S[:, 0].to(DEVICE), return_states=True)
    assert torch.isfinite(yk).all() and torch.isfinite(sk).all()
    torch.testing.assert_close(yk.cpu(), y, atol=1e-4, rtol=1e-4)


@needs_triton
@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(forests(max_nodes=16, max_roots=1), st.sampled_from([(1, 4, 16, 1, 16), (2, 2, 5, 2, 7), (1, 3, 16, 3, 9)]),
       st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_kernel_matches_reference(forest, dims, has_state, D_has_hdim, seed):
    parents, _, _ = forest
    b, H, P, G, N = dims
    T = len(parents)
    kw, S = inputs(seed, b, T, H, P, G, N, 1, device=DEVICE, D_has_hdim=D_has_hdim)
    anc = ancestors(parents).to(DEVICE)
    init = S if has_state else None
    y_ref, st_ref = ssm_tree_scan_ref(**kw, anc=anc, init_states=init, return_states=True)
    y, states = ssm_tree_scan(**kw, anc=anc, init_state=None if init is None else init[:, 0], return_states=True)
    print(f"max |dy| {(y - y_ref).abs().max():.2e}, max |dstate| {(states - st_ref).abs().max():.2e}")
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states, st_ref, atol=1e-4, rtol=1e-4)
    y_only, none = ssm_tree_scan(**kw, anc=anc, init_state=None if init is None else init[:, 0])
    assert none is None
    torch.testing.assert_close(y_only, y, atol=0, rtol=0)


@needs_triton
def test_kernel_per_row_trees():
    """anc [b, T, T]: each row its own tree (a verify batch of different trees, padded with lone nodes)."""
    trees = [[-1, 0, 0, 1, 1, 2], [-1, 0, 1, 2, -1, -1], [-1, -1, -1, -1, -1, -1]]
    T = len(trees[0])
    kw, S = inputs(3, len(trees), T, 2, 5, 2, 7, 1, device=DEVICE)
    anc = torch.stack([ancestors(p) for p in trees]).to(DEVICE)
    y_ref, st_ref = ssm_tree_scan_ref(**kw, anc=anc, init_states=S, return_states=True)
    y, states = ssm_tree_scan(**kw, anc=anc, init_state=S[:, 0], return_states=True)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(states, st_ref, atol=1e-4, rtol=1e-4)


def test_spec_buckets_tree_sizes():
    assert SSMTreeScanSpec.for_tree(1, 64, 128).block_t == 16
    assert SSMTreeScanSpec.for_tree(17, 64, 128).block_t == 32
    s = SSMTreeScanSpec.for_tree(13, 80, 100)
    assert (s.block_p, s.block_n) == (64, 128)
    with pytest.raises(ValueError):
        SSMTreeScanSpec.for_tree(1000, 64, 128)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_on_gpu_realistic_shapes():
    """Mamba2-2.7B-like head shapes (P 64, N 128, ngroups 1) and the STree trees (13 and 32 nodes)."""
    for parents in ([-1, 0, 0, 0, 1, 1, 2, 4, 5, 6, 7, 8, 9], [-1] + [i // 2 for i in range(31)]):
        T = len(parents)
        kw, S = inputs(0, 1, T, 16, 64, 1, 128, 1, device="cuda")
        anc = ancestors(parents).cuda()
        y_ref, st_ref = ssm_tree_scan_ref(**kw, anc=anc, init_states=S, return_states=True)
        y, states = ssm_tree_scan(**kw, anc=anc, init_state=S[:, 0], return_states=True)
        print(f"T={T}: max |dy| {(y - y_ref).abs().max():.2e}, max |dstate| {(states - st_ref).abs().max():.2e}")
        torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(states, st_ref, atol=1e-3, rtol=1e-3)
