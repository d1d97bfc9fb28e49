"""The one RMSNorm of every model here: Llama's (HF `LlamaRMSNorm`) and Mamba2's gated, grouped one
(mamba-ssm `RMSNormGated` with norm_before_gate=False).

    y = weight * rmsnorm(x * silu(gate), per group of group_size channels).to(x.dtype)

normalised in fp32 (and in fp64 for fp64 inputs when `keep_fp64`: mamba-ssm computes in the promoted
type, HF Llama always in fp32), cast back to x's dtype, then scaled (HF Llama's order). A faster CPU
inference form of the same map is a load-time transform (runtime/transforms.py), not part of this math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm, optionally gated (`forward(x, gate)`: norm(x * silu(gate))) and per group of `group_size`
    channels (None: one group)."""

    def __init__(self, dim: int, eps: float, group_size: int | None = None, keep_fp64: bool = False):
        super().__init__()
        self.eps, self.group_size, self.keep_fp64 = eps, group_size or dim, keep_fp64
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        # x, gate: [..., dim] -> [..., dim]
        w = self._parameters["weight"]  # (runs 2 * layers + 1 times a token: no nn.Module __getattr__)
        cdt = torch.promote_types(x.dtype, torch.float32) if self.keep_fp64 else torch.float32
        E, g = x.shape[-1], self.group_size
        if gate is None and g == E and x.dtype == cdt and w.dtype == cdt:
            return F.rms_norm(x, (E,), w, self.eps)  # the same arithmetic as below, in one op
        h = x.to(cdt)
        if gate is not None:
            h = h * F.silu(gate.to(cdt))
        if g == E:
            h = F.rms_norm(h, (E,), eps=self.eps)
        else:
            h = F.rms_norm(h.unflatten(-1, (-1, g)), (g,), eps=self.eps).flatten(-2)
        return w * h.to(x.dtype)
