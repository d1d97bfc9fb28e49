"""The machine a plan is made for: `host()` describes it for `spec_compiler.validate` (which resolves
backend.device against it and keys the plan hash by the device), so spec_compiler never imports torch."""
from __future__ import annotations

import torch

from spec_compiler.validate import Host


def host() -> Host:
    if not torch.cuda.is_available():
        return Host()
    return Host(f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}")
