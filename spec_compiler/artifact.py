"""Compiled artifacts on disk: where a plan's artifact lives, what its manifest records, and whether it may be used.

An artifact is a directory `<root>/<plan name>-<plan hash>/` (aot/build.py writes it, runtime/compiled.py
loads it) holding one file per compiled phase and `manifest.json`:

    artifact_version, plan (the whole plan), plan_hash, identity {device, versions, checkpoints},
    files {name: sha256}, phases [...], autotune [...], budget (tree.budget=auto), profile, created, command

`identity` is what must match for the artifact to be used: the device (CUDA: name and compute capability;
CPU: model name, architecture and ISA flags), library versions (python, torch, triton, torch_tensorrt), and
the sha256 of every checkpoint file (a checkpoint changed in place must not reuse a stale artifact).
`check` lists every difference by name; `verify_files` refuses a missing, truncated or corrupt file by its
sha256. The manifest is written last (atomically): a directory without one is an unfinished build.

No torch here: the runtime passes its device description in (`runtime.device.identity`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Optional

from spec_compiler.errors import SpecError

ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
"""CPU flags that change the code Inductor generates (vector width, bf16/int8 instructions)."""
LIBRARIES = ("torch", "triton", "torch_tensorrt", "mamba_ssm")


class ArtifactError(SpecError):
    """An artifact that cannot be used: names the file (or artifact) and why."""

    def __init__(self, where: str, reason: str):
        super().__init__(where, reason)


def artifact_dir(root: str | os.PathLike, readable_name: str) -> Path:
    return Path(root) / readable_name


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_digest(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of a checkpoint directory (weights, config, tokenizer) by relative name, or of
    one file by its name."""
    d = Path(path)
    if d.is_file():
        return {d.name: sha256_file(d)}
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


def cpu_identity() -> dict:
    """This CPU: architecture, model name and the ISA flags in ISA_FLAGS it has (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif name in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {"kind": "cpu", "arch": platform.machine(), "name": model, "isa": sorted(f for f in ISA_FLAGS if f in flags)}


CODE = ("runtime/models", "runtime/phases.py", "runtime/transforms.py", "runtime/batch.py", "codegen", "aot")
"""This project's sources that a compiled program is traced from (models, phases, kernels, the compiler)."""


def code_digest(root: Path = Path(__file__).resolve().parent.parent) -> str:
    """sha256 over the CODE sources: a program traced from older model code is stale like an older torch's."""
    h = hashlib.sha256()
    for entry in CODE:
        p = root / entry
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def library_versions() -> dict[str, Optional[str]]:
    """Installed versions (read without importing), Python's, and this project's traced code (`code_digest`)."""
    out = {"python": ".".join(map(str, sys.version_info[:3])), "artifact_version": str(ARTIFACT_VERSION),
           "spec_compiler_code": code_digest()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def identity(device: dict, checkpoints: dict[str, Optional[str]]) -> dict:
    """What an artifact is built for: the device, library versions, and the content of each checkpoint
    (role -> directory, or None for models built from config)."""
    return {"device": device, "versions": library_versions(),
            "checkpoints": {role: (None if d is None else checkpoint_digest(d)) for role, d in checkpoints.items()}}


def check(manifest: dict, plan: dict, want: dict) -> list[str]:
    """Every reason the artifact of `manifest` is not the one for `plan` on this machine (`want` = identity()):
    plan fields, device, versions, checkpoint files; [] when it fits."""
    out = []
    if manifest.get("artifact_version") != ARTIFACT_VERSION:
        out.append(f"artifact format {manifest.get('artifact_version')} (this build reads {ARTIFACT_VERSION})")
    built, plan = manifest.get("plan", {}), json.loads(json.dumps(plan))  # as the manifest stores it (lists)
    for k in sorted(set(built) | set(plan)):
        if built.get(k) != plan.get(k):
            out.append(f"plan.{k}: built for {_short(built.get(k))}, this config has {_short(plan.get(k))}")
    have = manifest.get("identity", {})
    if have.get("device") != want["device"]:
        out.append(f"device: built for {_device(have.get('device'))}, this machine is {_device(want['device'])}")
    for lib in sorted(set(have.get("versions", {})) | set(want["versions"])):
        a, b = have.get("versions", {}).get(lib), want["versions"].get(lib)
        if a != b:
            out.append(f"{lib}: built with {a}, this machine has {b}")
    for role in sorted(set(have.get("checkpoints", {})) | set(want["checkpoints"])):
        a, b = have.get("checkpoints", {}).get(role) or {}, want["checkpoints"].get(role) or {}
        changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
        if changed:
            out.append(f"{role} checkpoint: {', '.join(changed)} changed since the build (sha256)")
    return out


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def _device(d: Optional[dict]) -> str:
    if not d:
        return "an unknown device"
    if d.get("kind") == "cuda":
        return f"{d.get('name')} (compute capability {d.get('capability')})"
    return f"CPU {d.get('name')} ({d.get('arch')}; {' '.join(d.get('isa', [])) or 'no listed ISA flags'})"


def read_manifest(directory: str | os.PathLike) -> Optional[dict]:
    """The manifest, or None when the directory holds no finished artifact; unreadable JSON is an error."""
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(str(p), f"unreadable manifest ({e}); delete the directory to rebuild it") from None


def verify_files(directory: str | os.PathLike, manifest: dict) -> None:
    """Every file the manifest lists exists with its sha256; a missing, truncated or corrupt one is refused."""
    d = Path(directory)
    for name, digest in manifest.get("files", {}).items():
        p = d / name
        if not p.is_file():
            raise ArtifactError(str(p), "missing (the manifest lists it); delete the artifact directory to rebuild it")
        if sha256_file(p) != digest:
            raise ArtifactError(str(p), "sha256 does not match the manifest: the file is corrupt or truncated; "
                                "delete the artifact directory (or compile.on_mismatch=rebuild) to rebuild it")


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """manifest.json with the sha256 of every other file in the directory, written atomically and last."""
    d = Path(directory)
    files = {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    out = dict(manifest, artifact_version=ARTIFACT_VERSION, files=files)
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, sort_keys=True))
    os.replace(tmp, d / MANIFEST)
    return d / MANIFEST
