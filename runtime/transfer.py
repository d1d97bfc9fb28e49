"""Moving data between the host and a device without draining the device queue.

A step on a GPU may synchronise with the host once (runtime/decode.py: the accepted tokens are read back);
everything else the host sends goes through `to_device` and everything it reads through `to_host`, so the
transfers are in two places a test can watch (tests/runtime/test_host_sync.py simulates the device on the CPU).
"""
from __future__ import annotations

import torch


def on_host(device) -> bool:
    """Whether `device` is the host itself (the CPU): no transfer is needed and reading a value costs nothing, so the
    step reads logits and walks trees there (tests/runtime/test_host_sync.py answers False to play a device)."""
    return torch.device(device).type == "cpu"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied without a host synchronisation: on CUDA from pinned memory with
    non_blocking=True (a pageable or blocking copy makes the host wait for the device queue; the caching host
    allocator keeps the pinned buffer until the copy has run). On the CPU: `t` itself."""
    device = torch.device(device)
    if t.device == device or on_host(device):
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's values on the host: the step's one synchronisation (waits for everything queued
    before it). Read as few and as small tensors as possible, once per step."""
    return t.cpu()
