"""Random weights and noisy copies for every model family (tests, smoke runs, synthetic drafters).

One scheme for Llama and Mamba2 / hybrid models, keyed by parameter name, so a seed gives the same weights
whichever family asks: embeddings at width**-0.25 (the residual stream and the tied logits stay O(1)), norm
weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1), Mamba2's A_log / dt_bias / D as mamba-ssm initialises them,
and every other matrix (linear and conv weights) unit gain over its fan-in.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

NORM_SUFFIXES = ("norm.weight", "norm2.weight", "norm_f.weight")


@torch.no_grad()
def init_random_weights(model: nn.Module, embedding: Tensor, width: int, seed: int) -> nn.Module:
    """Fill `model`'s parameters in place (named_parameters order, one generator) and return it."""
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    for name, p in model.named_parameters():
        if p is embedding:  # tied or not
            p.copy_(torch.randn(p.shape, generator=g) * width ** -0.25)
        elif name.endswith("A_log"):
            p.copy_(torch.log(uniform(p.shape, 1.0, 16.0)))  # A in [-16, -1], mamba-ssm's A_init_range
        elif name.endswith("dt_bias"):
            dt = torch.exp(uniform(p.shape, math.log(1e-3), math.log(1e-1)))  # mamba-ssm's dt_min, dt_max
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith("mixer.D") or name.endswith(NORM_SUFFIXES):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:  # linear and conv weights: unit gain over the fan-in
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model


@torch.no_grad()
def perturbed_copy(model: nn.Module, noise_std: float, seed: int) -> nn.Module:
    """A copy with Gaussian noise of `noise_std` times each tensor's own spread (its std; |max| for a scalar)
    added to every weight."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    for p in out.parameters():
        spread = p.float().std() if p.numel() > 1 else p.float().abs().max()
        noise = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        p.add_(noise * (noise_std * spread).to(p.dtype))
    return out
