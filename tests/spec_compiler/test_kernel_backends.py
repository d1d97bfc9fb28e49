"""backend.attention and backend.ssm_prefill: resolved at validation against the host, recorded in the plan.

Validation is run against described hosts (`Host`), not this machine, so the CUDA rules are checked on the CPU:
auto picks the kernels on cuda, triton / mamba_ssm on the CPU (or mamba_ssm where it does not import) is one
ConfigError naming the key and the safe alternative (exit 2: tests/test_cli_errors.py), and the plan lists the tree-attention kernels it launches.
"""
import importlib.util

import pytest

import main
from spec_compiler.errors import ConfigError
from spec_compiler.kernels import TreeAttentionSpec
from spec_compiler.plan import make_plan
from spec_compiler.validate import Host, IneffectiveSettingWarning, validate

H200 = "NVIDIA H200 sm90"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def plan_on(cfg, host: Host):
    return make_plan(validate(main.to_spec(cfg), host))


def test_auto_is_sdpa_and_torch_on_the_cpu(compose):
    plan = plan_on(compose([]), Host())
    assert (plan.attention, plan.ssm_prefill, plan.tree_attention_kernels) == ("sdpa", "torch", ())


@pytest.mark.skipif(not HAVE_TRITON, reason="auto picks triton only where Triton is installed")
def test_auto_is_triton_on_cuda_and_the_plan_lists_its_kernels(compose):
    cfg = compose(["tree=static", "tree.branching=[2,2]"])
    plan = plan_on(cfg, Host(H200))
    assert plan.attention == "triton"
    head_dim = dict(plan.target.arch)["head_dim"]
    want = {TreeAttentionSpec(head_dim, T, plan.target.dtype).name for T in plan.tree_buckets}
    want |= {TreeAttentionSpec(dict(plan.drafter.arch)["head_dim"], T, plan.drafter.dtype).name
             for T in plan.tree_buckets}
    assert set(plan.tree_attention_kernels) == want and len(plan.tree_buckets) > 1
    assert "tree_attention_d32_t7_float32" in plan.tree_attention_kernels  # the tiny pair: D = 32, 7 nodes
    sdpa = plan_on(compose(["tree=static", "tree.branching=[2,2]", "backend.attention=sdpa"]), Host(H200))
    assert (sdpa.attention, sdpa.tree_attention_kernels) == ("sdpa", ())
    assert sdpa.plan_hash() != plan.plan_hash()


@pytest.mark.parametrize("override, key", [("backend.attention=triton", "backend.attention"),
                                           ("backend.ssm_prefill=mamba_ssm", "backend.ssm_prefill")])
def test_cuda_kernels_on_the_cpu_are_refused_naming_the_key(compose, override, key):
    with pytest.raises(ConfigError) as e:
        plan_on(compose(["target=mamba2_tiny", "drafter=none", override]), Host())
    assert e.value.where == key
    assert "CUDA only" in str(e.value) and ("sdpa" in str(e.value) or "torch" in str(e.value))


def test_ssm_prefill_follows_whether_mamba_ssm_imports(compose):
    cfg = compose(["target=mamba2_tiny", "drafter=none"])
    assert plan_on(cfg, Host(H200, mamba_ssm=True)).ssm_prefill == "mamba_ssm"
    assert plan_on(cfg, Host(H200, mamba_ssm=False)).ssm_prefill == "torch"
    with pytest.raises(ConfigError) as e:
        plan_on(compose(["target=mamba2_tiny", "drafter=none", "backend.ssm_prefill=mamba_ssm"]),
                Host(H200, mamba_ssm=False))
    assert e.value.where == "backend.ssm_prefill" and "does not import" in str(e.value)


def test_ssm_prefill_on_a_transformer_plan_is_torch(compose):
    """A transformer plan's hash must not depend on whether mamba-ssm happens to be installed."""
    assert plan_on(compose([]), Host(H200, mamba_ssm=True)).ssm_prefill == "torch"
    with pytest.warns(IneffectiveSettingWarning, match="backend.ssm_prefill"):
        plan = plan_on(compose(["backend.ssm_prefill=mamba_ssm"]), Host(H200, mamba_ssm=True))
    assert plan.ssm_prefill == "torch"


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton installed")
def test_triton_refuses_fp64_models(compose):
    with pytest.raises(ConfigError) as e:
        plan_on(compose(["target.model.dtype=float64", "drafter=none", "backend.attention=triton"]), Host(H200))
    assert e.value.where == "backend.attention" and "float64" in str(e.value)
    plan = plan_on(compose(["target.model.dtype=float64", "drafter=none"]), Host(H200))
    assert plan.attention == "sdpa"
