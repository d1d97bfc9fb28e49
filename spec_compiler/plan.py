"""The frozen plan: everything downstream (codegen, runtime) reads from here, never from the config.

`make_plan(resolved)` is a pure function of the validated config (and the host it was resolved on). The
plan is JSON-serialisable and has a stable hash over its canonical JSON (sorted keys, tuples), which holds
a PLAN_VERSION, the library versions and the device kind, so a compiled artifact can be keyed by it. Run-time settings (prompts, max_new_tokens, seed)
are not part of the plan.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

from spec_compiler.arch import Mamba2Config
from spec_compiler.kernels import TreeAttentionSpec
from spec_compiler.schema import DrafterKind, ModelConfig, ModelSource
from spec_compiler.tree import TreeTopology, tree_buckets
from spec_compiler.validate import Resolved, corpus_matches, grown_bounds, resolve_path, retrieval_tree_sizes, tree_slots

PLAN_VERSION = 1


@dataclass(frozen=True)
class ModelPlan:
    kind: str
    """transformer | mamba2 | hybrid."""
    source: str
    checkpoint: Optional[str]
    """Absolute checkpoint directory (source=checkpoint)."""
    arch: tuple
    """LlamaConfig / Mamba2Config as sorted (key, value) pairs (lists as tuples)."""
    dtype: str
    seed: int
    noise_std: float


@dataclass(frozen=True)
class VocabTrimPlan:
    size: int
    prompts: str
    """Absolute calibration prompt file."""
    num_prompts: int
    max_new_tokens: int
    keep: tuple[str, ...]
    artifact: Optional[str]
    """Absolute calibration file, or None for artifacts/vocab_trim/<key>.json."""


@dataclass(frozen=True)
class RetrievalPlan:
    """The retrieval source (runtime/retrieval.py); fused with the model drafter when there is one."""

    kind: str
    """context | datastore."""
    min_ngram: int
    max_ngram: int
    cont_len: int
    max_candidates: int
    max_nodes: int
    num_candidates: int
    corpus: tuple[str, ...]
    """datastore: absolute paths (globs expanded, sorted); () = the project corpus's training files."""
    cache_dir: str
    """Absolute datastore directory."""
    store: Optional[str] = None
    """Absolute prebuilt store directory (used as is), or None."""
    prune: str = "root"
    """root | path (RetrievalPrune)."""
    skip_model_after: int = 0
    """Steps after one that emitted at least this many tokens draft from retrieval alone (0 = never)."""


@dataclass(frozen=True)
class CpuTransforms:
    """Which load-time CPU fast paths runtime/transforms.py applies (all off on other devices)."""

    fp16_weight_gemm: bool = False
    rmsnorm_layernorm: bool = False
    gemv_head: bool = False


CPU_TRANSFORM_DEFAULTS = CpuTransforms(fp16_weight_gemm=True, rmsnorm_layernorm=True, gemv_head=True)
"""Each transform on where it measured faster (benchmarks/cpu/transforms_bench.md): the fp16 GEMM and the GEMV
head are; RMSNorm as LayerNorm is not (torch 2.13's fused rms_norm is as fast)."""


@dataclass(frozen=True)
class GrownTreePlan:
    """tree.policy=dynamic | beam: the run-time tree builder's settings (runtime/tree_policies.py)."""

    policy: str
    num_nodes: int
    """dynamic: node budget (root included)."""
    max_depth: int
    threshold: float
    expand_per_round: int
    value_temperature: float
    beam_width: int
    beam_depth: int

    @property
    def max_nodes(self) -> int:
        return self.num_nodes if self.policy == "dynamic" else 1 + self.beam_width * self.beam_depth

    @property
    def per_round(self) -> int:
        return self.expand_per_round if self.policy == "dynamic" else self.beam_width


@dataclass(frozen=True)
class TreeBudgetPlan:
    """tree.budget=auto: the tree is chosen by runtime/calibrate.py (resolve_budget) before decoding; until then
    the plan's tree_parents hold the deepest candidate, a chain of max_nodes nodes (the cache is sized for it)."""

    family: str
    """chain (chains only: tree.policy=chain, or prompt lookup) | static (chains, branchings, Sequoia trees)."""
    max_nodes: int
    calibration_prompts: str
    """Absolute Spec-Bench question file."""
    num_calibration_prompts: int
    calibration_max_new_tokens: int


@dataclass(frozen=True)
class Plan:
    name: str
    target: ModelPlan
    tokenizer: Optional[str]
    """tokenizer.json path; None = built-in byte-level tokenizer."""
    drafter_kind: str
    drafter: Optional[ModelPlan]
    drafter_temperature: float
    prompt_lookup: tuple[int, int, int]
    """(min_ngram, max_ngram, num_pred_tokens)."""
    tree_policy: str
    tree_parents: tuple[int, ...]
    """The static topology (the largest tree a step may verify); root only for grown trees (grown_tree)."""
    child_kind: str
    acceptance: str
    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    backend: str
    device: str
    max_seq_len: int
    cache_capacity: int
    """KV slots: max_seq_len plus one tree's worth of scratch slots."""
    kv_window: str = "live"
    """Attention window per forward: live | full (runtime.decode)."""
    verify_head: str = "full"
    """Where the verify forward runs the LM head: path | full (runtime.decode.Engine)."""
    attention: str = "sdpa"
    """Attention kernel (backend.attention resolved): sdpa | triton (forwards at the prefix whose size is a tree
    bucket run spec::tree_attention; runtime.load.route_kernels)."""
    ssm_prefill: str = "torch"
    """SSM prefill-chunk scan (backend.ssm_prefill resolved): torch | mamba_ssm."""
    tree_attention_kernels: tuple[str, ...] = ()
    """attention=triton: the tree-attention kernels the plan launches (`spec_compiler.kernels.TreeAttentionSpec`
    names, one per (model head dim, tree bucket, dtype)), so the artifact's manifest lists them; else ()."""
    tree_buckets: tuple[int, ...] = (1,)
    """Tree sizes a verify forward is padded to (powers of two below the tree size, and the size)."""
    vocab_trim: Optional[VocabTrimPlan] = None
    """The drafter's LM head is trimmed (VocabTrim); None = full head."""
    grown_tree: Optional[GrownTreePlan] = None
    """tree.policy=dynamic | beam: trees grown per request at run time (tree_parents is then root only)."""
    cpu_transforms: CpuTransforms = CpuTransforms()
    """Load-time CPU fast paths (runtime/transforms.py); all off unless device is cpu."""
    retrieval: Optional[RetrievalPlan] = None
    """The retrieval source (alone with drafter_kind none, else fused: RASD); None = no retrieval."""
    tree_budget: Optional[TreeBudgetPlan] = None
    """tree.budget=auto settings; None = tree_parents is the tree."""
    environment: tuple[tuple[str, Optional[str]], ...] = ()
    """(name, value) pairs that determine compiled output: library versions and the device (`environment`)."""
    plan_version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def plan_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def tree_slots(self) -> int:
        """Cache slots past the text one step's tree may touch (SSM caches keep as many scratch states)."""
        return self.cache_capacity - self.max_seq_len

    @property
    def tree_depth(self) -> int:
        """The most draft levels one step verifies (0: no drafter)."""
        if self.drafter_kind == "none":
            return 0
        g = self.grown_tree
        if g is None:
            return TreeTopology(self.tree_parents).max_depth
        return min(g.max_depth, g.num_nodes - 1) if g.policy == "dynamic" else g.beam_depth

    @property
    def readable_name(self) -> str:
        return f"{self.name}-{self.plan_hash()}"


def environment(device_name: str) -> tuple[tuple[str, Optional[str]], ...]:
    """Library versions (installed distributions, read without importing them) and the device kind."""
    env = {"device": device_name}
    for lib in ("torch", "triton"):
        try:
            env[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            env[lib] = None
    return tuple(sorted(env.items()))


def _canonical(v):
    """Lists -> tuples, and infinities -> strings (canonical JSON has no Infinity)."""
    if isinstance(v, (list, tuple)):
        return tuple(_canonical(x) for x in v)
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _model_plan(m: ModelConfig, arch, kind: str) -> ModelPlan:
    ckpt = str(resolve_path(m.checkpoint)) if m.source is ModelSource.checkpoint else None
    return ModelPlan(kind, m.source.value, ckpt, tuple(sorted((k, _canonical(v)) for k, v in arch.to_dict().items())),
                     m.dtype.value, m.seed, m.noise_std)


def _kind(m: ModelConfig, target: ModelConfig) -> str:
    return (target if m.source is ModelSource.target_copy else m).arch.value


def _vocab_trim_plan(resolved: Resolved) -> Optional[VocabTrimPlan]:
    vt = resolved.cfg.drafter.vocab_trim
    if not vt.enabled or vt.size >= resolved.drafter_arch.vocab_size:
        return None
    return VocabTrimPlan(vt.size, str(resolve_path(vt.prompts)), vt.num_prompts, vt.max_new_tokens, tuple(vt.keep),
                         None if vt.artifact is None else str(resolve_path(vt.artifact)))


def _cpu_transforms(resolved: Resolved, device: str) -> CpuTransforms:
    """The configured transforms, unset ones at their measured default; none off the CPU."""
    if device != "cpu":
        return CpuTransforms()
    t = resolved.cfg.backend.cpu_transforms
    return CpuTransforms(**{k: default if getattr(t, k) is None else bool(getattr(t, k))
                            for k, default in asdict(CPU_TRANSFORM_DEFAULTS).items()})


def _tree_attention_kernels(resolved: Resolved, buckets: tuple[int, ...]) -> tuple[str, ...]:
    """The TreeAttentionSpec names attention=triton launches: every attention model at every tree bucket."""
    if resolved.attention != "triton":
        return ()
    cfg = resolved.cfg
    models = [(resolved.target_arch, cfg.target.model.dtype.value)]
    if resolved.drafter_arch is not None:
        models.append((resolved.drafter_arch, cfg.drafter.model.dtype.value))
    names = set()
    for arch, dtype in models:
        if isinstance(arch, Mamba2Config) and not arch.attn_layer_idx:
            continue  # a pure SSM: no attention layer
        head_dim = arch.attn_head_dim if isinstance(arch, Mamba2Config) else arch.head_dim
        names |= {TreeAttentionSpec(head_dim, T, dtype).name for T in buckets}
    return tuple(sorted(names))


def _grown_tree_plan(cfg) -> Optional[GrownTreePlan]:
    if grown_bounds(cfg) is None:
        return None
    t = cfg.tree
    return GrownTreePlan(t.policy.value, t.num_nodes, t.max_depth, float(t.threshold), t.expand_per_round,
                         float(t.value_temperature), t.beam_width, t.beam_depth)


def _tree_budget_plan(cfg) -> Optional[TreeBudgetPlan]:
    t = cfg.tree
    if t.budget is None:
        return None
    family = "chain" if t.policy.value == "chain" or cfg.drafter.kind is DrafterKind.prompt_lookup else "static"
    return TreeBudgetPlan(family, t.max_nodes, str(resolve_path(t.calibration_prompts)), t.num_calibration_prompts,
                          t.calibration_max_new_tokens)


def _retrieval_plan(resolved: Resolved) -> Optional[RetrievalPlan]:
    r = resolved.cfg.retrieval
    if r.kind.value == "none":
        return None
    corpus = tuple(str(p) for entry in r.corpus for p in corpus_matches(entry)) if r.kind.value == "datastore" else ()
    return RetrievalPlan(r.kind.value, r.min_ngram, r.max_ngram, r.cont_len, r.max_candidates, r.max_nodes,
                         r.num_candidates, corpus, str(resolve_path(r.cache_dir)),
                         None if r.store is None else str(resolve_path(r.store)), r.prune.value, r.skip_model_after)


def make_plan(resolved: Resolved) -> Plan:
    cfg = resolved.cfg
    d, s, topo = cfg.drafter, cfg.sampling, resolved.topology
    tok = cfg.target.tokenizer
    if tok is not None:
        tok = str(resolve_path(tok))
    elif cfg.target.model.source is ModelSource.checkpoint:
        tok = str(resolve_path(cfg.target.model.checkpoint) / "tokenizer.json")
    pl = d.prompt_lookup
    retrieval = _retrieval_plan(resolved)
    verify_nodes, score_nodes = retrieval_tree_sizes(cfg, topo)
    buckets = tree_buckets(verify_nodes if grown_bounds(cfg) is None else grown_bounds(cfg)[0])
    name = "-".join([cfg.target.name, d.name] + ([retrieval.kind] if retrieval else []) +
                    [cfg.tree.policy.value if d.kind is not DrafterKind.none else "ar"] +
                    (["auto"] if cfg.tree.budget is not None else []) + [cfg.backend.kind.value])
    return Plan(
        name=name,
        target=_model_plan(cfg.target.model, resolved.target_arch, cfg.target.model.arch.value),
        tokenizer=tok,
        drafter_kind=d.kind.value,
        drafter=(_model_plan(d.model, resolved.drafter_arch, _kind(d.model, cfg.target.model))
                 if resolved.drafter_arch is not None else None),
        drafter_temperature=float(d.temperature),
        prompt_lookup=(pl.min_ngram, pl.max_ngram, pl.num_pred_tokens),
        tree_policy=cfg.tree.policy.value,
        tree_parents=topo.parents,
        child_kind=resolved.child_kind.value,
        acceptance=resolved.acceptance.value,
        greedy=s.temperature == 0,
        temperature=float(s.temperature),
        top_k=int(s.top_k),
        top_p=float(s.top_p),
        backend=cfg.backend.kind.value,
        device=resolved.device,
        max_seq_len=cfg.target.max_seq_len,
        cache_capacity=cfg.target.max_seq_len + (tree_slots(cfg, topo) if grown_bounds(cfg) is not None
                                                 else max(verify_nodes, score_nodes)),
        kv_window=cfg.backend.kv_window.value,
        verify_head=cfg.backend.verify_head.value,
        tree_buckets=buckets,
        attention=resolved.attention,
        ssm_prefill=resolved.ssm_prefill,
        tree_attention_kernels=_tree_attention_kernels(resolved, buckets),
        grown_tree=_grown_tree_plan(cfg),
        vocab_trim=_vocab_trim_plan(resolved),
        cpu_transforms=_cpu_transforms(resolved, resolved.device),
        retrieval=retrieval,
        tree_budget=_tree_budget_plan(cfg),
        environment=environment(resolved.device_name),
    )
