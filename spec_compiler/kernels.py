"""Compile-time parameters of the Triton kernels a plan needs, as plain values (no torch).

The plan records the tree-attention kernels its attention backend will launch (`Plan.tree_attention_kernels`),
so a compiled artifact's manifest lists them. The spec lives here rather than next to the kernel
(codegen/tree_attention.py, which imports torch and Triton) because spec_compiler must not import torch;
the launcher imports this same class, so the plan's names and the launched kernel's cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass

BITS_PER_WORD = 64
KERNEL_DTYPES = ("float16", "bfloat16", "float32")
"""Model dtypes the tree-attention kernel computes in (fp64 models keep SDPA)."""


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class TreeAttentionSpec:
    """Everything that selects a compiled tree-attention kernel; the plan lists one per (model, tree bucket)."""

    head_dim: int
    """D, any size >= 1; padded internally to a power of two (>= 16, for tl.dot)."""
    num_tree_tokens: int
    """T, the tree's node count (constexpr NUM_TREE); the bitsets have ceil(T / 64) words per row."""
    dtype: str
    """"float16" | "bfloat16" | "float32": dtype of q and the cache (fp32 uses IEEE dots, no TF32)."""

    def __post_init__(self):
        assert self.head_dim >= 1 and self.num_tree_tokens >= 1, self
        assert self.dtype in KERNEL_DTYPES, f"dtype must be one of {sorted(KERNEL_DTYPES)}, got {self.dtype}"

    @property
    def block_d(self) -> int:
        return max(16, next_power_of_2(self.head_dim))

    @property
    def num_words(self) -> int:
        return -(-self.num_tree_tokens // BITS_PER_WORD)

    @property
    def name(self) -> str:
        """Readable artifact name built only from compile-time parameters (FlashInfer style)."""
        return f"tree_attention_d{self.head_dim}_t{self.num_tree_tokens}_{self.dtype}"

    def constexprs(self) -> dict[str, int]:
        return {"NUM_TREE": self.num_tree_tokens, "HEAD_DIM": self.head_dim, "BLOCK_D": self.block_d}
