"""CPU fast paths as one load-time transform: modules of a built model replaced by faster kernels for the
same map, per the plan's `CpuTransforms` (spec_compiler/plan.py), reported module by module.

The model math (runtime/models) is plain nn.Linear / RMSNorm / LMHead. `apply_cpu_transforms` swaps, in
place (the new module holds the same Parameter objects: names, tying and checkpoints are unchanged):
- fp16_weight_gemm: an nn.Linear (the LM head included) whose fp32 weight and bias fp16 holds exactly --
  a checkpoint stored in fp16 and loaded as fp32, like the trained default pair -> `Fp16WeightLinear`
  (fbgemm's fp16-weight GEMM: the same map in fp32 arithmetic, summed in another order);
- rmsnorm_layernorm: an fp32 RMSNorm over one group -> `LayerNormRMSNorm` (one LayerNorm over [x, -x]);
- gemv_head: an fp32 LM head without bias that fp16_weight_gemm did not take -> `GemvHead`.
Each fast form runs only for CPU inference in fp32 (autograd off); under autograd, for other dtypes or
devices it is the plain module's math, so training after load stays correct. Which transforms are on by
default is measured: benchmarks/cpu/transforms_bench.md.

Run it after any module surgery (VocabTrim's `trim_lm_head` builds a plain head).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.models.llama import LMHead
from runtime.models.norm import RMSNorm
from spec_compiler.plan import CpuTransforms

TRANSFORMS = ("fp16_weight_gemm", "rmsnorm_layernorm", "gemv_head")


@dataclass
class TransformReport:
    """Which modules (`named_modules` names) each transform replaced."""

    modules: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in TRANSFORMS})

    def summary(self) -> str:
        """One line: `fp16_weight_gemm 29 (layers.0.attention.wqkv, ...); ...`."""
        def part(t, names):
            return f"{t} {len(names)}" + (f" ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
                                          if names else "")
        return "; ".join(part(t, n) for t, n in self.modules.items())


def apply_cpu_transforms(model: nn.Module, transforms: CpuTransforms) -> TransformReport:
    """Replace `model`'s modules by their CPU fast forms per `transforms` (see the module docstring);
    modules on another device or in another dtype, and modules already transformed, are left alone."""
    gemm = fp16_weight_gemm() if transforms.fp16_weight_gemm else None
    report, done = TransformReport(), {}  # done: id(old module) -> new (a module reachable twice stays shared)
    for parent_name, parent in list(model.named_modules()):
        for child, m in list(parent.named_children()):
            if id(m) in done:
                setattr(parent, child, done[id(m)])
                continue
            kind, new = fast_form(m, transforms, gemm)
            if new is not None:
                setattr(parent, child, new)
                done[id(m)] = new
                report.modules[kind].append(f"{parent_name}.{child}" if parent_name else child)
    return report


def transform_models(transforms: CpuTransforms, **models: nn.Module | None) -> dict[str, TransformReport]:
    """apply_cpu_transforms on each named model that is not None (load.py: target=..., drafter=...)."""
    return {name: apply_cpu_transforms(m, transforms) for name, m in models.items() if m is not None}


def fast_form(m: nn.Module, transforms: CpuTransforms, gemm) -> tuple[str | None, nn.Module | None]:
    """(transform name, replacement) for one module, or (None, None)."""
    if type(m) is RMSNorm:
        if transforms.rmsnorm_layernorm and cpu_fp32(m.weight) and m.group_size == m.weight.shape[0]:
            return "rmsnorm_layernorm", share_parameters(m, LayerNormRMSNorm(
                m.weight.shape[0], m.eps, keep_fp64=m.keep_fp64))
        return None, None
    if type(m) not in (nn.Linear, LMHead):
        return None, None
    shape = dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None, device="meta")
    if gemm is not None and cpu_fp32(m.weight, m.bias) and fp16_exact(m.weight, m.bias):
        return "fp16_weight_gemm", share_parameters(m, Fp16WeightLinear(**shape))
    if type(m) is LMHead and transforms.gemv_head and m.bias is None and cpu_fp32(m.weight):
        return "gemv_head", share_parameters(m, GemvHead(**shape))
    return None, None


def share_parameters(old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` holding `old`'s Parameter objects (in place of its own), in old's train/eval mode."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    return new.train(old.training)


def cpu_fp32(*tensors: Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)


def fp16_exact(*tensors: Tensor | None) -> bool:
    """Every value an fp16 number (no rounding, no overflow)."""
    return all(t is None or torch.equal(t.detach().half().float(), t.detach()) for t in tensors)


def cached_derived(owner: nn.Module, name: str, sources: tuple[Tensor | None, ...], make):
    """make(), kept on `owner` under `name` and rebuilt whenever a source tensor is replaced or changed in
    place (keyed by data pointer and version counter): packed and reshaped copies of weights. A tensor
    made under inference_mode has no version counter: only its replacement is seen."""
    key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in sources if t is not None)
    hit = owner.__dict__.get(name)
    if hit is None or hit[0] != key:
        hit = owner.__dict__[name] = (key, make())
    return hit[1]


def fast_inference(x: Tensor) -> bool:
    """Whether a fast form may run: CPU, fp32, autograd off, eager. A traced program (torch.export, the compiled
    backend's phases) sees the plain module's math: the fast forms are eager kernels, Inductor picks its own."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


# ---- fp16_weight_gemm ------------------------------------------------------------------------------------

@functools.cache
def fp16_weight_gemm():
    """(pack, apply) for fbgemm's fp16-weight GEMM on CPU (fp16 weights, fp32 activations and accumulation),
    or None where this torch build or CPU lacks fbgemm: pack(weight [N, K], bias [N] | None) -> packed,
    apply(x [M, K], packed) -> [M, N] fp32.

    Why not plain F.linear: inference here is a few rows against each weight (one token, or one verify
    tree), where MKL's sgemm is slow on the 2-core AMD EPYC CI box and every step streams the weights from
    memory. fbgemm's fp16 kernels read half the bytes and are built for small M (measured:
    benchmarks/cpu/transforms_bench.md). It is the kernel behind torch.ao's dynamic fp16 Linear.
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    return fbgemm_alias_gemm() or quantized_ops_gemm()


def fbgemm_alias_gemm():
    """Through `torch.fbgemm_*` (least call overhead), or None where this torch no longer has them. They
    are deprecated aliases: their one-time warning is raised (and silenced) here."""
    pack, lin = getattr(torch, "fbgemm_pack_gemm_matrix_fp16", None), getattr(torch, "fbgemm_linear_fp16_weight", None)
    if pack is None or lin is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin(torch.zeros(1, 1), pack(torch.zeros(1, 1)), torch.zeros(1))
    return (lambda w, b: (pack(w), b if b is not None else torch.zeros(w.shape[0]))), lambda x, p: lin(x, *p)


def quantized_ops_gemm():
    """Through `torch.ops.quantized.linear_{prepack,dynamic}_fp16` (torch.ao's dynamic fp16 Linear)."""
    ops = torch.ops.quantized
    return (lambda w, b: ops.linear_prepack_fp16(w, b)), ops.linear_dynamic_fp16


@torch.library.custom_op("spec::fp16_weight_linear", mutates_args=())
def fp16_weight_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """`Fp16WeightLinear`'s fast form as one opaque op, for traced programs (the compiled backend's phases):
    fbgemm's fp16-weight GEMM of fp16-exact fp32 weights. The packed weight is kept per weight tensor (a
    compiled program's weights are its own constants)."""
    gemm = fp16_weight_gemm()
    key = (weight.data_ptr(), tuple(weight.shape), None if bias is None else bias.data_ptr())
    packed = _OP_PACKED.get(key)
    if packed is None:
        packed = _OP_PACKED[key] = gemm[0](weight.detach(), None if bias is None else bias.detach())
    out = gemm[1](x.reshape(-1, x.shape[-1]).contiguous(), packed)
    return out.view(*x.shape[:-1], out.shape[-1])


@fp16_weight_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_OP_PACKED: dict = {}


class Fp16WeightLinear(nn.Linear):
    """nn.Linear whose CPU fp32 inference runs `fp16_weight_gemm` while its weight and bias are fp16-exact.
    Anything else -- autograd, other dtypes and devices, a weight changed after load so that fp16 no longer
    holds it -- is F.linear. The packed copy is rebuilt whenever the weight changes. Traced for a compiled
    phase after eager found the weight fp16-exact, it is the opaque `spec::fp16_weight_linear` op (Inductor's
    own GEMM reads twice the bytes and is slower for these few-row products)."""

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        if torch.compiler.is_compiling():
            hit = self.__dict__.get("_packed_w")  # set by an eager call (phase discovery runs eager first)
            if hit is not None and hit[1] is not None and x.dtype == torch.float32 and x.device.type == "cpu":
                return fp16_weight_linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        packed = self._packed() if fast_inference(x) else None
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        weights, apply = packed
        out = apply(x.reshape(-1, x.shape[-1]), weights)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _packed(self):
        """(fp16-packed weight, apply), or None (no fbgemm, or a value fp16 cannot hold exactly)."""
        params = self._parameters  # (this runs for every projection of every token: no nn.Module __getattr__)
        w, b = params["weight"], params["bias"]

        def pack():
            gemm = fp16_weight_gemm()
            ok = gemm is not None and cpu_fp32(w, b) and fp16_exact(w, b)
            return (gemm[0](w.detach(), None if b is None else b.detach()), gemm[1]) if ok else None
        return cached_derived(self, "_packed_w", (w, b), pack)


# ---- rmsnorm_layernorm -----------------------------------------------------------------------------------

class LayerNormRMSNorm(RMSNorm):
    """RMSNorm whose CPU fp32 inference is LayerNorm([x, -x]) * [w, w], first half: [x, -x] has mean 0 and
    variance mean(x^2), so this is the same map to fp32 rounding. layer_norm is one native kernel where
    F.rms_norm was a composite of several ops; torch 2.13 fuses rms_norm and the two measure alike, so this
    transform is off by default (benchmarks/cpu/transforms_bench.md). One group only; the gate (Mamba2's
    mixer norm) is applied first, as in RMSNorm."""

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        # x, gate: [..., E] -> [..., E]
        w = self._parameters["weight"]
        if not (fast_inference(x) and w.dtype == torch.float32):
            return super().forward(x, gate)
        if gate is not None:
            x = x * F.silu(gate.to(torch.float32))
        E = x.shape[-1]
        w2 = cached_derived(self, "_w2", (w,), lambda: torch.cat((w.detach(), w.detach())))
        return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * E,), w2, None, self.eps)[..., :E]


# ---- gemv_head -------------------------------------------------------------------------------------------

class GemvHead(LMHead):
    """An LM head (no bias) whose CPU fp32 inference is a GEMV against the transposed weight (one row) or
    W @ h^T (several): for a few rows against a [V, E] weight, MKL's sgemm behind F.linear runs far below
    memory bandwidth on the CI box. The head is the largest matmul of a small drafter or target."""

    def forward(self, h: Tensor) -> Tensor:
        # h: [..., E] -> [..., V]
        w = self._parameters["weight"]
        if not (fast_inference(h) and w.dtype == torch.float32):
            return F.linear(h, w, self.bias)
        rows = h.reshape(-1, h.shape[-1])  # [m, E]
        out = rows @ self._transposed() if rows.shape[0] == 1 else (w @ rows.t()).t()  # [m, V]
        return out.view(*h.shape[:-1], out.shape[-1])

    def _transposed(self) -> Tensor:
        w = self._parameters["weight"]
        return cached_derived(self, "_wt", (w,), lambda: w.detach().t().contiguous())  # [E, V]
