"""The one RMSNorm (runtime/models/norm.py) computes, bitwise, what each model's own norm computed before:
HF Llama's (fp32 normalise, cast back, scale) and Mamba2's gated, grouped one (mamba-ssm, promoted dtype)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.models.norm import RMSNorm

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def llama_reference(x, w, eps):
    """runtime/models/llama.py RMSNorm.forward before the unification (its plain math)."""
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def mamba2_reference(x, w, eps, group_size, gate=None):
    """runtime/models/mamba2.py RMSNorm.forward before the unification."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    h = x.to(cdt)
    if gate is not None:
        h = h * F.silu(gate.to(cdt))
    h = h.unflatten(-1, (-1, group_size))
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    return w * h.to(x.dtype)


def make(dim, dtype, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-5, **kw)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    return norm.to(dtype), g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 128), (2, 7, 256), (5, 96), (3, 4, 1000)])
def test_llama_form_is_bitwise_the_previous_one(dtype, shape):
    norm, g = make(shape[-1], dtype, 0)
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    assert torch.equal(norm(x), llama_reference(x, norm.weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group_size", [((1, 1, 128), None), ((2, 7, 256), 64), ((3, 5, 96), 32),
                                              ((4, 9, 512), 512), ((1, 3, 1024), 256)])
@pytest.mark.parametrize("gated", [False, True])
def test_mamba2_form_is_bitwise_the_previous_one(dtype, shape, group_size, gated):
    norm, g = make(shape[-1], dtype, 1, group_size=group_size, keep_fp64=True)
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    z = torch.randn(*shape, generator=g).to(dtype) if gated else None
    want = mamba2_reference(x, norm.weight, 1e-5, group_size or shape[-1], z)
    assert torch.equal(norm(x, z), want)


def test_the_forms_differ_only_in_fp64():
    """HF Llama normalises fp64 inputs in fp32, mamba-ssm in fp64: the flag is what separates them."""
    llama, g = make(64, torch.float64, 2)
    x = torch.randn(2, 64, generator=g, dtype=torch.float64)
    mamba = RMSNorm(64, 1e-5, keep_fp64=True).to(torch.float64)
    with torch.no_grad():
        mamba.weight.copy_(llama.weight)
    assert not torch.equal(llama(x), mamba(x))
    assert torch.equal(llama.float()(x.float()), mamba.float()(x.float()))


def test_gradients_flow():
    norm, g = make(32, torch.float32, 3, group_size=8, keep_fp64=True)
    x = torch.randn(4, 32, generator=g, requires_grad=True)
    z = torch.randn(4, 32, generator=g, requires_grad=True)
    norm(x, z).square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, z, norm.weight))
