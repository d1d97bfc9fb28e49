"""Plan -> Runtime: build or load the models, allocate caches from plan shapes, pick the drafter.

Nothing here reads the user config; everything comes from the frozen `Plan`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from tokenizers import Tokenizer

from runtime.calibrate import resolve_budget
from runtime.decode import DecodeResult, Engine, Request, SamplingParams, StepState
from runtime.drafters import ModelDrafter, NoDrafter
from runtime.datastore import open_store
from runtime.lookup import PromptLookupDrafter
from runtime.retrieval import DatastoreDrafter, FusedDrafter
from runtime.models import mamba2
from runtime.models.checkpoint import load_llama
from runtime import vocab_trim
from runtime.models.llama import LlamaConfig, init_random, perturbed_copy, trim_lm_head
from runtime.models.mamba_checkpoint import load_mamba2
from runtime.transforms import TransformReport, transform_models
from runtime.tree_policies import BeamTree, DynamicTree, Policy
from spec_compiler.checkpoint import read_eos_ids
from spec_compiler.plan import ModelPlan, Plan
from spec_compiler.schema import AcceptanceRule, ChildKind
from spec_compiler.tokenizer import EOT, get_tokenizer
from spec_compiler.tree import TreeTopology, tree_buckets

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(m: ModelPlan, device: str, target=None, plan: Optional[Plan] = None):
    """A LlamaModel or Mamba2LMModel (same forward/cache contract) from its plan, its kernels routed per
    `plan` (`route_kernels`; None: the torch paths)."""
    dtype = DTYPES[m.dtype]
    ssm = m.kind != "transformer"
    if m.source == "checkpoint":
        model = (load_mamba2 if ssm else load_llama)(m.checkpoint, dtype=dtype, device=device)
    elif m.source == "target_copy":
        assert target is not None
        noisy = (mamba2.perturbed_copy if ssm else perturbed_copy)(target, m.noise_std, m.seed)
        model = noisy.to(device=device, dtype=dtype).eval()
    else:
        arch = {k: (float(v) if v in ("inf", "-inf") else v) for k, v in m.arch}
        model = (mamba2.init_random_mamba2(mamba2.Mamba2Config.from_dict(arch), m.seed) if ssm
                 else init_random(LlamaConfig.from_dict(arch), m.seed))
        model = model.to(device=device, dtype=dtype).eval()
    return model if plan is None else route_kernels(model, plan)


def route_kernels(model, plan: Plan):
    """Set the plan's kernel choices on `model` (in place; returned): backend.attention=triton runs the
    at-prefix forwards of the plan's tree-bucket sizes through the tree-attention kernel
    (`llama.routes_tree_attention`) and a Mamba2 model's tree forwards through the Triton SSM tree scan,
    backend.ssm_prefill=mamba_ssm the Mamba2 prefill chunks through mamba-ssm.
    A target_copy drafter is a copy of the target, so both are set on each model explicitly."""
    model.tree_attention_sizes = frozenset(plan.tree_buckets) if plan.attention == "triton" else frozenset()
    for m in model.modules():
        if isinstance(m, mamba2.Mamba2Mixer):
            m.ssm_prefill = plan.ssm_prefill
            m.use_triton = plan.attention == "triton"  # the Triton SSM tree scan (codegen/ssm_tree_scan.py)
    return model


@dataclass
class Runtime:
    plan: Plan
    target: object
    """LlamaModel or Mamba2LMModel."""
    cache: object
    """KVCache or SSMCache, sized from the plan: one row per request decoded together."""
    drafter: object
    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]
    sampling: SamplingParams
    transforms: dict[str, TransformReport] = field(default_factory=dict)
    """The CPU fast paths applied at load time, per model ("target", "drafter"): runtime/transforms.py."""
    compiled: object = None
    """backend=compiled: the artifact it runs from (runtime.compiled.Compiled); None for eager."""
    tree_budget: Optional[dict] = None
    """tree.budget=auto: how the tree was chosen (runtime.calibrate.resolve_budget's record), else None."""

    @property
    def batch_size(self) -> int:
        return self.cache.rows

    def request(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0) -> Request:
        """A request with the plan's sampling; drafting and acceptance draw from separate generators
        derived from `seed`."""
        return Request(list(prompt_ids), max_new_tokens, self.sampling, torch.Generator().manual_seed(2 * seed),
                       torch.Generator().manual_seed(2 * seed + 1))

    def engine(self, on_step: Optional[Callable[[StepState], None]] = None, defer_drafter: bool = False) -> Engine:
        return Engine(self.target, self.cache, self.drafter, max_seq_len=self.plan.max_seq_len, eos_ids=self.eos_ids,
                      kv_window=self.plan.kv_window, verify_head=self.plan.verify_head, on_step=on_step,
                      acceptor=None if self.compiled is None else self.compiled.acceptor, defer_drafter=defer_drafter)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seed: int = 0,
                 on_step: Optional[Callable[[StepState], None]] = None) -> DecodeResult:
        """One request."""
        return self.engine(on_step).generate([self.request(prompt_ids, max_new_tokens, seed)])[0]

    def generate_many(self, requests: list[Request]) -> list[DecodeResult]:
        """Many requests, `batch_size` at a time (continuous batching in order)."""
        return self.engine().generate(requests)

    def with_drafter(self, drafter) -> "Runtime":
        """The same target and cache with another drafter (bench runs the baseline this way)."""
        return dataclasses.replace(self, drafter=drafter)

    def with_tree(self, parents, record: Optional[dict] = None) -> "Runtime":
        """The same models and caches drafting the static tree `parents` (tree.budget=auto's choice); the plan's
        tree_parents and tree_buckets follow, its cache stays (the tree must fit its scratch slots)."""
        topo = TreeTopology(tuple(parents))
        if topo.n > self.plan.tree_slots:
            raise ValueError(f"a tree of {topo.n} nodes exceeds the plan's {self.plan.tree_slots} tree slots")
        plan = dataclasses.replace(self.plan, tree_parents=topo.parents, tree_buckets=tree_buckets(topo.n))
        return dataclasses.replace(self, plan=plan, drafter=with_topology(self.drafter, topo),
                                   tree_budget=record if record is not None else self.tree_budget)

    def with_batch_size(self, rows: int) -> "Runtime":
        """The same models with caches for `rows` requests decoded together."""
        if rows == self.batch_size:
            return self
        return dataclasses.replace(self, cache=new_cache(self.target, self.plan, rows), drafter=self.drafter.with_rows(rows))


def new_cache(model, plan: Plan, rows: int = 1):
    """A cache of `rows` rows of plan.cache_capacity slots; SSM caches also keep per-node scratch states for
    one tree per row."""
    if isinstance(model, mamba2.Mamba2LMModel):  # scratch for the largest tree a forward writes
        return model.new_cache(rows, plan.cache_capacity, num_scratch=plan.tree_slots + 1)
    return model.new_cache(rows, plan.cache_capacity)


def make_retrieval(plan: Plan, tokenizer, rows: int, fused: bool):
    """The plan's retrieval drafter: trees of up to retrieval.max_nodes retrieved nodes, or num_candidates when
    `fused` (RASD prunes them to max_nodes)."""
    r = plan.retrieval
    budget = r.num_candidates if fused else r.max_nodes
    if r.kind == "context":  # prompt lookup: max_candidates continuations of cont_len tokens
        topo = TreeTopology.static([r.max_candidates] + [1] * (r.cont_len - 1))
        return PromptLookupDrafter(topo, r.min_ngram, r.max_ngram, r.cont_len, rows, budget=budget + 1)
    store = open_store(r.corpus, tokenizer, r.cache_dir, r.store)
    return DatastoreDrafter(store, r.min_ngram, r.max_ngram, r.cont_len, r.max_candidates, budget)


def make_drafter(plan: Plan, target, cache=None, tokenizer=None, eos_ids: tuple[int, ...] = (), rows: int = 1):
    """The plan's drafter for `rows` cache rows. A VocabTrim plan also needs the target, its cache (calibration
    runs the target when no calibration file exists yet), the tokenizer and the EOS ids. A retrieval plan needs
    the tokenizer (a datastore is tokenized with the target's); with a model drafter it is fused (RASD)."""
    topo = TreeTopology(plan.tree_parents)
    retrieval = plan.retrieval
    if retrieval is not None and plan.drafter_kind == "none":
        return make_retrieval(plan, tokenizer, rows, fused=False)
    if plan.drafter_kind == "none":
        return NoDrafter()
    if plan.drafter_kind == "prompt_lookup":
        return PromptLookupDrafter(topo, *plan.prompt_lookup, rows=rows)
    model = build_model(plan.drafter, plan.device, target, plan)
    s2t = None
    if plan.vocab_trim is not None:
        s2t, _ = vocab_trim.resolve(plan, target, cache, tokenizer, eos_ids, model.config.vocab_size)
        trim_lm_head(model, s2t)
    drafter = ModelDrafter(model, topo, plan.cache_capacity, ChildKind(plan.child_kind), plan.drafter_temperature,
                           target.config.vocab_size, rows=rows, s2t=s2t, kv_window=plan.kv_window,
                           cache=new_cache(model, plan, rows), policy=grown_policy(plan))
    if retrieval is not None:
        return FusedDrafter(drafter, make_retrieval(plan, tokenizer, rows, fused=True), retrieval.max_nodes,
                            retrieval.prune, retrieval.skip_model_after)
    return drafter


def with_topology(drafter, topo: TreeTopology):
    """The same static-tree drafter (model or prompt lookup) drafting `topo` instead; rows start afresh."""
    if isinstance(drafter, ModelDrafter) and drafter.policy is None:
        return ModelDrafter(drafter.model, topo, drafter.cache.capacity, drafter.kind, drafter.temperature,
                            drafter.vocab, drafter.cache.rows, drafter.s2t, drafter.kv_window, drafter.cache)
    if isinstance(drafter, PromptLookupDrafter):
        return PromptLookupDrafter(topo, drafter.min_n, drafter.max_n, drafter.num_pred, len(drafter.rows))
    raise ValueError(f"{type(drafter).__name__} has no static tree to replace")


def grown_policy(plan: Plan) -> Policy:
    """The plan's run-time tree builder (tree=dynamic | beam), or None for a static tree."""
    g = plan.grown_tree
    if g is None:
        return None
    if g.policy == "dynamic":
        return DynamicTree(g.num_nodes, g.max_depth, g.threshold, g.expand_per_round, g.value_temperature)
    return BeamTree(g.beam_width, g.beam_depth)


def load(plan: Plan, batch_size: int = 1, tree_parents: Optional[Sequence[int]] = None) -> Runtime:
    """The plan's models, with caches for `batch_size` requests decoded together. `tree_parents`: the static
    tree to draft instead of the plan's (an artifact's tree.budget=auto choice); without it a tree.budget=auto
    plan is calibrated now (runtime.calibrate.resolve_budget: seconds on the default pair, said on stderr)."""
    target = build_model(plan.target, plan.device, plan=plan)
    cache = new_cache(target, plan, batch_size)
    tokenizer = get_tokenizer(plan.tokenizer)
    if plan.target.source == "checkpoint":
        eos = tuple(read_eos_ids(plan.target.checkpoint))
    else:
        eot = tokenizer.token_to_id(EOT)
        eos = (eot,) if eot is not None and eot < target.config.vocab_size else ()
    sampling = SamplingParams(plan.temperature, plan.top_k, plan.top_p, AcceptanceRule(plan.acceptance))
    drafter = make_drafter(plan, target, cache, tokenizer, eos, rows=batch_size)
    draft_model = drafter.model.model if isinstance(drafter, FusedDrafter) else getattr(drafter, "model", None)
    transforms = transform_models(plan.cpu_transforms, target=target, drafter=draft_model)
    rt = Runtime(plan, target, cache, drafter, tokenizer, eos, sampling, transforms)
    if tree_parents is not None:
        return rt.with_tree(tree_parents)
    if plan.tree_budget is not None:
        return rt.with_tree(*resolve_budget(plan, rt))
    return rt
