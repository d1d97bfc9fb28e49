"""The TensorRT phase backend: `torch_tensorrt.dynamo.compile` of the same exported program AOTInductor gets.

UNVERIFIED: TensorRT cannot be installed on any machine this project has run on, so this path has never
executed. It is import-gated: `compile.backends=[..., tensorrt]` is refused at validation where
torch_tensorrt does not import (spec_compiler/validate.py), and `compile_tensorrt` raises the same error
if called anyway. The custom ops (codegen/ops.py) reach TensorRT as opaque nodes; torch_tensorrt runs
them in PyTorch (its fallback for unsupported ops), so attention stays one kernel.
"""
from __future__ import annotations

from pathlib import Path

from spec_compiler.errors import ConfigError


def available() -> bool:
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def compile_tensorrt(ep, inputs, path: Path) -> Path:
    """Compile exported program `ep` for the example `inputs` and save it (a TensorRT-embedding ExportedProgram)."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise ConfigError("compile.backends", f"tensorrt needs torch_tensorrt, which does not import here ({e}); "
                          "use [eager, aoti]", "tensorrt") from None
    import codegen.ops  # noqa: F401  (the custom ops the program calls)
    trt = torch_tensorrt.dynamo.compile(ep, inputs=list(inputs), min_block_size=1,
                                        torch_executed_ops={"torch.ops.spec.cached_attention.default",
                                                            "torch.ops.spec.tree_attention.default"})
    torch_tensorrt.save(trt, str(path), output_format="exported_program", inputs=list(inputs))
    return path
