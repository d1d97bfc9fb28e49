"""The machine a plan is made for: `host()` describes it for `spec_compiler.validate` (which resolves
backend.device against it and keys the plan hash by the device), so spec_compiler never imports torch."""
from __future__ import annotations

import torch

from spec_compiler.validate import Host


def host() -> Host:
    """This machine. mamba-ssm is probed (imported) on CUDA machines only: it cannot run elsewhere."""
    if not torch.cuda.is_available():
        return Host()
    from runtime.models.mamba2 import mamba_chunk_scan
    return Host(f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}",
                mamba_ssm=mamba_chunk_scan() is not None)


def identity_device(device: str) -> dict:
    """The device an artifact is compiled for, as its manifest records it (spec_compiler.artifact.identity):
    CUDA name and compute capability, or the CPU's model and ISA flags."""
    from spec_compiler.artifact import cpu_identity
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return {"kind": "cuda", "name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}"}
    return cpu_identity()
