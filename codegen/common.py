"""Helpers shared by the kernel files: power-of-two buckets, interpreter detection, per-request scalars."""
from __future__ import annotations

import os

import torch

from spec_compiler.kernels import next_power_of_2  # noqa: F401  (one definition for the plan and the kernels)

DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def per_request(x: int | torch.Tensor, B: int, device) -> torch.Tensor:
    """An int, a 0-d or a [B] integer tensor -> [B] int32 on `device` (no host read of a tensor's value)."""
    if isinstance(x, torch.Tensor):
        assert x.dim() <= 1 and x.numel() in (1, B), f"expected a scalar or [{B}] tensor, got shape {tuple(x.shape)}"
        assert not x.is_floating_point(), f"expected an integer tensor, got {x.dtype}"
        return x.to(device=device, dtype=torch.int32).reshape(-1).expand(B)
    return torch.full((B,), int(x), dtype=torch.int32, device=device)
