"""The load-time CPU transforms (runtime/transforms.py): which modules each one takes, that every fast form
computes the plain module's map (to fp32 rounding), falls back to the plain math under autograd, and that
greedy decoding through a transformed model equals decoding through the plain one (the trained default
takes every transform)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime.batch import Block
from runtime.models import mamba2
from runtime.models.llama import LlamaConfig, LMHead, init_random, perturbed_copy, trim_lm_head
from runtime.models.norm import RMSNorm
from runtime.transforms import (Fp16WeightLinear, GemvHead, LayerNormRMSNorm, apply_cpu_transforms,
                                fbgemm_alias_gemm, fp16_weight_gemm, quantized_ops_gemm)
from spec_compiler.plan import CpuTransforms
from spec_compiler.tree import TreeTopology

needs_fbgemm = pytest.mark.skipif(fp16_weight_gemm() is None, reason="this torch build / CPU has no fbgemm")
ALL = CpuTransforms(fp16_weight_gemm=True, rmsnorm_layernorm=True, gemv_head=True)


def fp16_exact_(module: nn.Module) -> nn.Module:
    """Round every parameter to the nearest fp16 value, kept in fp32 (as loading an fp16 checkpoint does)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def make_linear(cls, n_in, n_out, bias, exact, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = cls(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return fp16_exact_(lin) if exact else lin


def wrapped(module: nn.Module, transforms: CpuTransforms = ALL):
    """(transformed module, report) of `module` as the only child of a container."""
    box = nn.Sequential(module)
    report = apply_cpu_transforms(box, transforms)
    return box[0], report


def norm_with_weight(dim, **kw):
    norm = RMSNorm(dim, 1e-5, **kw)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(dim)))
    return norm


# ---- fp16_weight_gemm ------------------------------------------------------------------------------------

@needs_fbgemm
@pytest.mark.parametrize("gemm", [fbgemm_alias_gemm, quantized_ops_gemm])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 37, 53), (3, 256, 768), (2, 5, 128, 4096)])
def test_each_fp16_gemm_equals_f_linear(gemm, bias, shape):
    impl = gemm()
    if impl is None:
        pytest.skip("this torch has no such entry point")
    *lead, n_in, n_out = shape
    lin = make_linear(nn.Linear, n_in, n_out, bias, exact=True)
    x = torch.randn(*lead, n_in)
    packed = impl[0](lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
    got = impl[1](x.reshape(-1, n_in), packed).view(*lead, n_out)
    want = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_fbgemm
@pytest.mark.parametrize("cls", [nn.Linear, LMHead])
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_exact_weights_take_the_packed_path(cls, bias):
    lin = make_linear(cls, 64, 200, bias, exact=True)
    fast, report = wrapped(lin)
    assert type(fast) is Fp16WeightLinear and report.modules["fp16_weight_gemm"] == ["0"]
    assert fast.weight is lin.weight and fast.bias is lin.bias  # the same Parameters: tying and names kept
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        got = fast(x)
        assert fast._packed() is not None
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [nn.Linear, LMHead])
@pytest.mark.parametrize("rows", [1, 4])
def test_other_weights_keep_fp32_arithmetic(cls, rows):
    """A weight fp16 cannot hold exactly is never rounded: a Linear is left as it is, a head (no bias) becomes
    the GEMV head, which agrees with F.linear to fp32 rounding."""
    lin = make_linear(cls, 64, 300, False, exact=False)
    fast, report = wrapped(lin)
    x = torch.randn(1, rows, 64)
    assert report.modules["fp16_weight_gemm"] == []
    with torch.no_grad():
        got = fast(x)
    if cls is nn.Linear:
        assert fast is lin and report.modules["gemv_head"] == []
        assert torch.equal(got, F.linear(x, lin.weight))
    else:
        assert type(fast) is GemvHead and report.modules["gemv_head"] == ["0"]
        torch.testing.assert_close(got, F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


def test_a_head_with_bias_or_off_switch_is_left_alone():
    head = make_linear(LMHead, 16, 40, True, exact=False)
    assert wrapped(head)[0] is head
    head = make_linear(LMHead, 16, 40, False, exact=False)
    assert wrapped(head, CpuTransforms(fp16_weight_gemm=True, rmsnorm_layernorm=True))[0] is head


@needs_fbgemm
def test_switches_select_transforms():
    lin, head = make_linear(nn.Linear, 16, 24, True, exact=True), make_linear(LMHead, 16, 40, False, exact=True)
    assert wrapped(copy.deepcopy(lin), CpuTransforms(rmsnorm_layernorm=True, gemv_head=True))[0].__class__ is nn.Linear
    assert type(wrapped(copy.deepcopy(head), CpuTransforms(gemv_head=True))[0]) is GemvHead  # fp16 off: GEMV
    assert type(wrapped(head, ALL)[0]) is Fp16WeightLinear  # both on: the fp16 GEMM wins


@pytest.mark.parametrize("cls", [nn.Linear, LMHead])
def test_training_after_transform_uses_f_linear_and_gets_gradients(cls):
    lin = make_linear(cls, 16, 24, cls is nn.Linear, exact=True)
    fast, _ = wrapped(copy.deepcopy(lin))
    x = torch.randn(3, 16, requires_grad=True)
    y = fast(x)
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert fast.weight.grad is not None and x.grad is not None


def test_other_dtypes_use_the_plain_math():
    lin, head = make_linear(nn.Linear, 16, 24, True, exact=True), make_linear(LMHead, 16, 40, False, exact=False)
    norm = norm_with_weight(16)
    fast = [wrapped(copy.deepcopy(m))[0].to(torch.float64) for m in (lin, head, norm)]
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.inference_mode():
        for plain, f in zip((lin, head, norm), fast):
            assert torch.equal(f(x), plain.to(torch.float64)(x))


@needs_fbgemm
def test_packed_weight_follows_weight_updates():
    fast, _ = wrapped(make_linear(nn.Linear, 32, 48, False, exact=True))
    x = torch.randn(2, 32)
    with torch.no_grad():
        before = fast(x)
        fast.weight.mul_(2.0)  # still fp16-exact: repacked
        torch.testing.assert_close(fast(x), 2 * before, rtol=1e-5, atol=1e-5)
        fast.weight.add_(1e-4 * torch.randn_like(fast.weight))  # no longer fp16-exact: F.linear
        assert fast._packed() is None
        assert torch.equal(fast(x), F.linear(x, fast.weight))


# ---- rmsnorm_layernorm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 128), (2, 7, 256), (5, 48)])
def test_layernorm_rmsnorm_equals_rms_norm(shape):
    E = shape[-1]
    fast, report = wrapped(norm_with_weight(E))
    assert type(fast) is LayerNormRMSNorm and report.modules["rmsnorm_layernorm"] == ["0"]
    x = torch.randn(*shape) * 3
    want = F.rms_norm(x, (E,), fast.weight, 1e-5)
    with torch.inference_mode():
        got = fast(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    with torch.no_grad():
        fast.weight.mul_(2.0)  # the cached doubled weight follows the parameter
        torch.testing.assert_close(fast(x), 2 * want, rtol=2e-6, atol=4e-6)
    assert torch.equal(fast(x), F.rms_norm(x, (E,), fast.weight, 1e-5))  # autograd on: the plain math


def test_layernorm_rmsnorm_gated_and_grouped():
    """Mamba2's gated norm (one group) takes the transform and applies the gate first; a grouped one is
    left alone."""
    gated = norm_with_weight(64, keep_fp64=True)
    fast, _ = wrapped(copy.deepcopy(gated))
    x, z = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x, z), gated(x, z), rtol=2e-6, atol=2e-6)
    grouped = norm_with_weight(64, group_size=16, keep_fp64=True)
    assert wrapped(grouped)[0] is grouped


def test_modules_built_under_inference_mode_run():
    """Weights that are inference tensors (a model built inside inference_mode) have no version counter;
    the cached packed / transposed / doubled copies still work, and empty blocks pass through."""
    with torch.inference_mode():
        lin, _ = wrapped(make_linear(nn.Linear, 16, 24, True, exact=True))
        head, _ = wrapped(make_linear(LMHead, 16, 40, False, exact=False))
        norm, _ = wrapped(RMSNorm(16, 1e-5))
        x = torch.randn(2, 3, 16)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, 1e-5), rtol=2e-6, atol=2e-6)
        assert lin(x[:, :0]).shape == (2, 0, 24) and norm(x[:, :0]).shape == (2, 0, 16)


# ---- whole models ----------------------------------------------------------------------------------------

CFG = LlamaConfig(vocab_size=211, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                  max_position_embeddings=1024, tie_word_embeddings=True)
LINEARS = {f"layers.{i}.{n}" for i in range(2) for n in ("attention.wqkv", "attention.wo", "feed_forward.w1",
                                                         "feed_forward.w2", "feed_forward.w3")}
NORMS = {f"layers.{i}.{n}" for i in range(2) for n in ("attention_norm", "ffn_norm")} | {"norm"}


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding through the model's own cached forward: prefill, then one token at a time."""
    cache = model.new_cache(1, len(prompt) + n)
    ids = torch.tensor([prompt])
    out = []
    with torch.inference_mode():
        logits = model(ids, torch.arange(len(prompt))[None], cache, Block.causal(0, len(prompt)), num_logits=1)
        for t in range(n):
            out.append(int(logits[0, -1].argmax()))
            L = len(prompt) + t
            logits = model(torch.tensor([[out[-1]]]), torch.tensor([[L]]), cache, Block.causal(L, 1))
    return out


@needs_fbgemm
def test_llama_report_and_greedy_tokens_equal_plain():
    """Every projection and the (tied, fp16-exact) head take the fp16 GEMM, every norm the LayerNorm form;
    the embedding stays tied to the head; greedy tokens equal the plain model's."""
    plain = fp16_exact_(init_random(CFG, seed=0)).eval()
    fast = copy.deepcopy(plain)
    report = apply_cpu_transforms(fast, ALL)
    assert set(report.modules["fp16_weight_gemm"]) == LINEARS | {"output"}
    assert set(report.modules["rmsnorm_layernorm"]) == NORMS and report.modules["gemv_head"] == []
    assert fast.output.weight is fast.tok_embeddings.weight
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert apply_cpu_transforms(fast, ALL).modules == {k: [] for k in report.modules}  # idempotent
    prompt = torch.randint(0, CFG.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    assert greedy_tokens(fast, prompt, 60) == greedy_tokens(plain, prompt, 60)


def test_llama_fp32_weights_take_gemv_head_and_norms():
    plain = init_random(CFG, seed=0).eval()
    fast = copy.deepcopy(plain)
    report = apply_cpu_transforms(fast, ALL)
    assert report.modules["fp16_weight_gemm"] == [] and report.modules["gemv_head"] == ["output"]
    assert set(report.modules["rmsnorm_layernorm"]) == NORMS
    assert "gemv_head 1 (output)" in report.summary()
    prompt = torch.randint(0, CFG.vocab_size, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    assert greedy_tokens(fast, prompt, 60) == greedy_tokens(plain, prompt, 60)


def test_training_a_transformed_model_matches_the_plain_one():
    """With autograd on every transformed module is the plain math: same loss, same gradients, bitwise."""
    plain = fp16_exact_(init_random(CFG, seed=0))
    fast = copy.deepcopy(plain)
    apply_cpu_transforms(fast, ALL)
    ids = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(17)[None].expand(2, 17)
    losses = []
    for m in (plain, fast):
        loss = F.cross_entropy(m(ids, pos).flatten(0, 1), ids.flatten())
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_vocab_trim_then_transform():
    """trim_lm_head finds the plain head; transforming afterwards takes the trimmed head."""
    model = init_random(CFG, seed=0).eval()
    trim_lm_head(model, torch.arange(0, 211, 2))
    report = apply_cpu_transforms(model, ALL)
    assert report.modules["gemv_head"] == ["output"] and model.output.out_features == 106


@needs_fbgemm
@pytest.mark.parametrize("topo", [TreeTopology.chain(4), TreeTopology.static([3, 2, 1]), TreeTopology.static([3])],
                         ids=["chain4", "static321", "static3"])
def test_greedy_speculative_equals_autoregressive_through_transforms(topo):
    from runtime.decode import decode
    from runtime.drafters import ModelDrafter, NoDrafter
    from runtime.sampling import ChildKind
    target = fp16_exact_(init_random(CFG, seed=0)).eval()
    drafter = fp16_exact_(perturbed_copy(target, 0.1, 7)).eval()
    for m in (target, drafter):
        apply_cpu_transforms(m, ALL)
    prompt = torch.randint(0, CFG.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    kw = dict(max_new_tokens=120, max_seq_len=400)
    ar = decode(target, target.new_cache(1, 400), NoDrafter(), prompt, **kw)
    spec = decode(target, target.new_cache(1, 400 + topo.n),
                  ModelDrafter(drafter, topo, 400 + topo.n, ChildKind.deterministic, 1.0, CFG.vocab_size), prompt, **kw)
    assert spec.output_ids == ar.output_ids
    assert spec.tau > 1.2  # the drafter really is accepted


@needs_fbgemm
def test_mamba2_hybrid_transformed_logits_match_plain():
    cfg = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=97, d_state=16, headdim=16, expand=2, ngroups=1,
                              chunk_size=8, attn_layer_idx=(1,), attn_num_heads=4, attn_num_heads_kv=2,
                              attn_head_dim=16, attn_rotary_dim=16, d_intermediate=128)
    plain = fp16_exact_(mamba2.init_random_mamba2(cfg, seed=3)).eval()
    fast = copy.deepcopy(plain)
    report = apply_cpu_transforms(fast, ALL)
    assert set(report.modules["fp16_weight_gemm"]) == {"lm_head"} | {
        f"backbone.layers.{i}.{n}" for i in range(2) for n in ("mixer.in_proj", "mixer.out_proj", "mlp.fc1", "mlp.fc2")}
    assert set(report.modules["rmsnorm_layernorm"]) == {"backbone.norm_f", "backbone.layers.0.mixer.norm", *(
        f"backbone.layers.{i}.{n}" for i in range(2) for n in ("norm", "norm2"))}
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12)[None]
    with torch.inference_mode():
        got, want = fast(ids, pos), plain(ids, pos)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- the plan --------------------------------------------------------------------------------------------

def plan_on(cfg, cuda_device=None):
    import main
    from spec_compiler.plan import make_plan
    from spec_compiler.validate import Host, validate
    return make_plan(validate(main.to_spec(cfg), Host(cuda_device)))


def test_plan_records_the_transforms(compose):
    from spec_compiler.plan import CPU_TRANSFORM_DEFAULTS
    default = plan_on(compose(["backend.device=cpu"]))
    assert default.cpu_transforms == CPU_TRANSFORM_DEFAULTS
    assert default.to_dict()["cpu_transforms"] == {"fp16_weight_gemm": CPU_TRANSFORM_DEFAULTS.fp16_weight_gemm,
                                                   "rmsnorm_layernorm": CPU_TRANSFORM_DEFAULTS.rmsnorm_layernorm,
                                                   "gemv_head": CPU_TRANSFORM_DEFAULTS.gemv_head}
    flip = not CPU_TRANSFORM_DEFAULTS.gemv_head
    other = plan_on(compose(["backend.device=cpu", f"backend.cpu_transforms.gemv_head={flip}"]))
    assert other.cpu_transforms.gemv_head is flip and other.plan_hash() != default.plan_hash()
    same = plan_on(compose(["backend.device=cpu",
                            f"backend.cpu_transforms.gemv_head={CPU_TRANSFORM_DEFAULTS.gemv_head}"]))
    assert same.plan_hash() == default.plan_hash()  # naming the default is the default


def test_transforms_are_off_and_warn_on_cuda(compose):
    from spec_compiler.validate import IneffectiveSettingWarning
    assert plan_on(compose([]), cuda_device="GPU sm90").cpu_transforms == CpuTransforms()
    with pytest.warns(IneffectiveSettingWarning, match="backend.cpu_transforms.fp16_weight_gemm"):
        plan = plan_on(compose(["backend.cpu_transforms.fp16_weight_gemm=true"]), cuda_device="GPU sm90")
    assert plan.cpu_transforms == CpuTransforms()


def test_runtime_records_the_transforms_of_both_models(compose):
    """load() transforms the target and the drafter (random fp32 weights: GEMV heads and LayerNorm norms when
    on) and keeps the reports; a plan with them off leaves the models plain."""
    from runtime.load import load
    on = load(plan_on(compose(["backend.device=cpu", "backend.cpu_transforms.gemv_head=true",
                               "backend.cpu_transforms.rmsnorm_layernorm=true"])))
    assert set(on.transforms) == {"target", "drafter"}
    for name, model in (("target", on.target), ("drafter", on.drafter.model)):
        r = on.transforms[name].modules
        assert r["gemv_head"] == ["output"] and type(model.output) is GemvHead
        assert len(r["rmsnorm_layernorm"]) == 2 * model.config.num_layers + 1
    off = load(plan_on(compose(["backend.device=cpu", "backend.cpu_transforms.gemv_head=false",
                                "backend.cpu_transforms.rmsnorm_layernorm=false"])))
    assert all(not names for r in off.transforms.values() for names in r.modules.values())
    assert type(off.target.output) is LMHead
