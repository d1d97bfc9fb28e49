"""The CPU inference paths of runtime.models.llama: `Linear` / `LMHead` take fbgemm's fp16-weight GEMM for
weights fp16 holds exactly, the transposed-GEMV head otherwise, F.linear whenever autograd records;
`RMSNorm` takes the LayerNorm identity. Greedy speculative == autoregressive decoding through them (the
trained default takes every one)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.decode import decode
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.models import mamba2
from runtime.models.llama import (Linear, LlamaConfig, LMHead, RMSNorm, fbgemm_alias_gemm, fp16_weight_gemm,
                                  init_random, perturbed_copy, quantized_ops_gemm)
from runtime.sampling import ChildKind
from spec_compiler.tree import TreeTopology

needs_fbgemm = pytest.mark.skipif(fp16_weight_gemm() is None, reason="this torch build / CPU has no fbgemm")


def fp16_exact_(module: torch.nn.Module) -> torch.nn.Module:
    """Round every parameter to the nearest fp16 value, kept in fp32 (as loading an fp16 checkpoint does)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def make_linear(cls, n_in, n_out, bias, exact, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = cls(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return fp16_exact_(lin) if exact else lin


@needs_fbgemm
@pytest.mark.parametrize("gemm", [fbgemm_alias_gemm, quantized_ops_gemm])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 37, 53), (3, 256, 768), (2, 5, 128, 4096)])
def test_each_fp16_gemm_equals_f_linear(gemm, bias, shape):
    impl = gemm()
    if impl is None:
        pytest.skip("this torch has no such entry point")
    *lead, n_in, n_out = shape
    lin = make_linear(torch.nn.Linear, n_in, n_out, bias, exact=True)
    x = torch.randn(*lead, n_in)
    packed = impl[0](lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
    got = impl[1](x.reshape(-1, n_in), packed).view(*lead, n_out)
    want = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_fbgemm
@pytest.mark.parametrize("cls", [Linear, LMHead])
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_exact_weights_take_the_packed_path(cls, bias):
    lin = make_linear(cls, 64, 200, bias, exact=True)
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        got = lin(x)
        assert lin._packed() is not None
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [Linear, LMHead])
@pytest.mark.parametrize("rows", [1, 4])
def test_other_weights_keep_fp32_arithmetic(cls, rows):
    """A weight fp16 cannot hold exactly is never rounded: F.linear, or (head) a GEMV / W @ h^T, which
    agree with F.linear to fp32 rounding."""
    lin = make_linear(cls, 64, 300, False, exact=False)
    x = torch.randn(1, rows, 64)
    with torch.no_grad():
        got = lin(x)
        assert lin._packed() is None
    if cls is Linear:
        assert torch.equal(got, F.linear(x, lin.weight))
    else:
        torch.testing.assert_close(got, F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [Linear, LMHead])
def test_training_uses_f_linear_and_gets_gradients(cls):
    lin = make_linear(cls, 16, 24, True, exact=True)
    x = torch.randn(3, 16, requires_grad=True)
    y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert lin.weight.grad is not None and x.grad is not None


@needs_fbgemm
def test_packed_weight_follows_weight_updates():
    lin = make_linear(Linear, 32, 48, False, exact=True)
    x = torch.randn(2, 32)
    with torch.no_grad():
        before = lin(x)
        lin.weight.mul_(2.0)  # still fp16-exact: repacked
        torch.testing.assert_close(lin(x), 2 * before, rtol=1e-5, atol=1e-5)
        lin.weight.add_(1e-4 * torch.randn_like(lin.weight))  # no longer fp16-exact: fp32 path
        assert lin._packed() is None
        assert torch.equal(lin(x), F.linear(x, lin.weight))


CFG = LlamaConfig(vocab_size=211, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                  max_position_embeddings=1024, tie_word_embeddings=True)


@needs_fbgemm
@pytest.mark.parametrize("topo", [TreeTopology.chain(4), TreeTopology.static([3, 2, 1]), TreeTopology.static([3])],
                         ids=["chain4", "static321", "static3"])
def test_greedy_speculative_equals_autoregressive_through_fp16_path(topo):
    target = fp16_exact_(init_random(CFG, seed=0)).eval()
    drafter = fp16_exact_(perturbed_copy(target, 0.1, 7)).eval()
    prompt = torch.randint(0, CFG.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = dict(max_new_tokens=120, max_seq_len=400)
    ar = decode(target, target.new_cache(1, 400), NoDrafter(), prompt, **kw)
    spec = decode(target, target.new_cache(1, 400 + topo.n),
                  ModelDrafter(drafter, topo, 400 + topo.n, ChildKind.deterministic, 1.0, CFG.vocab_size), prompt, **kw)
    assert spec.output_ids == ar.output_ids
    assert spec.tau > 1.2  # the drafter really is accepted
    assert all(m._packed() is not None for m in target.modules() if isinstance(m, Linear))


@needs_fbgemm
def test_mamba2_fp16_exact_logits_match_fp32_path():
    cfg = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=97, d_state=16, headdim=16, expand=2, ngroups=1,
                              chunk_size=8, attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2,
                              attn_head_dim=16, attn_rotary_dim=16, d_intermediate=96)
    model = fp16_exact_(mamba2.init_random_mamba2(cfg, seed=3)).eval()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)[None]
    with torch.inference_mode():
        fast = model(ids, pos, model.new_cache(1, 32), 0)
        assert all(m._packed() is not None for m in model.modules() if isinstance(m, Linear))
    with torch.no_grad(), torch.enable_grad():  # autograd on: every Linear takes F.linear
        slow = model(ids, pos, model.new_cache(1, 32), 0)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 128), (2, 7, 256), (5, 48)])
def test_rmsnorm_inference_path_equals_rms_norm(shape):
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(shape[-1]))
    x = torch.randn(*shape) * 3
    want = F.rms_norm(x, (shape[-1],), norm.weight, 1e-5)
    with torch.inference_mode():
        got = norm(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    with torch.no_grad():
        norm.weight.mul_(2.0)  # the cached doubled weight follows the parameter
        torch.testing.assert_close(norm(x), 2 * want, rtol=2e-6, atol=4e-6)
    assert torch.equal(norm(x), F.rms_norm(x, (shape[-1],), norm.weight, 1e-5))  # autograd on: the op itself


def test_modules_built_under_inference_mode_run():
    """Weights that are inference tensors (a model built inside inference_mode) have no version counter;
    the cached packed / doubled copies still work, and empty blocks pass through."""
    with torch.inference_mode():
        lin, head = make_linear(Linear, 16, 24, True, exact=True), make_linear(LMHead, 16, 40, False, exact=False)
        norm = RMSNorm(16, 1e-5)
        x = torch.randn(2, 3, 16)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, 1e-5), rtol=2e-6, atol=2e-6)
        assert lin(x[:, :0]).shape == (2, 0, 24) and norm(x[:, :0]).shape == (2, 0, 16)
