"""Cross-field rules: a composed `SpecConfig` becomes a trusted, resolved config, or one `ConfigError`.

Field-local checks live in schema `__post_init__`s. Here: model sources and checkpoints (whose
`config.json` is read to resolve the architecture), drafter/target compatibility, tree limits, prompt
sources, and the sampling combinations that would bias the output (ALGORITHMS.md §8.3), each refused
with the safe alternative named. Settings that would silently do nothing raise a warning.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from spec_compiler.arch import LlamaConfig, Mamba2Config
from spec_compiler.checkpoint import read_llama_config, read_mamba2_config
from spec_compiler.errors import CheckpointError, ConfigError
from spec_compiler.kernels import KERNEL_DTYPES
from spec_compiler.schema import (HARDWARE, AcceptanceRule, Arch, ChildKind, ChildSampling, check_arch, Device, DrafterKind,
                                  ModelConfig, ModelSource, RetrievalKind, RetrievalPrune, SpecConfig, TreeConfig,
                                  TreePolicy)
from spec_compiler.tokenizer import get_tokenizer
from spec_compiler.tree import TreeTopology

PROJECT_ROOT = Path(__file__).resolve().parent.parent


ResolvedArch = LlamaConfig | Mamba2Config


class IneffectiveSettingWarning(UserWarning):
    """A config value that has no effect in this combination."""


@dataclass(frozen=True)
class Host:
    """The machine a plan is made for, as the runtime sees it (`runtime.device.host()`): spec_compiler never
    probes the hardware (it imports no torch)."""

    cuda_device: Optional[str] = None
    """The CUDA device's name and compute capability (e.g. "NVIDIA H200 sm90"); None = no usable GPU."""
    mamba_ssm: bool = False
    """mamba-ssm's chunk scan (`mamba_chunk_scan_combined`) imports here (probed on CUDA machines only)."""


@dataclass(frozen=True)
class Resolved:
    """A validated config plus what validation had to read to check it (the models' architectures)."""

    cfg: SpecConfig
    target_arch: ResolvedArch
    drafter_arch: Optional[ResolvedArch]
    topology: TreeTopology
    child_kind: ChildKind
    acceptance: AcceptanceRule
    device: str
    """backend.device resolved on the host: "cpu" | "cuda"."""
    device_name: str
    """"cpu" or the CUDA device (Host.cuda_device): compiled output depends on it."""
    attention: str = "sdpa"
    """backend.attention resolved: "sdpa" | "triton"."""
    ssm_prefill: str = "torch"
    """backend.ssm_prefill resolved: "torch" | "mamba_ssm"."""


def resolve_path(p: str) -> Path:
    """Config paths are relative to the project root (Hydra changes the working directory)."""
    path = Path(os.path.expanduser(p))
    return path if path.is_absolute() else PROJECT_ROOT / path


def _warn(key: str, msg: str) -> None:
    warnings.warn(f"{key}: {msg}", IneffectiveSettingWarning, stacklevel=3)


def _arch(m: ModelConfig, key: str, target: Optional[ResolvedArch]) -> ResolvedArch:
    if m.source is ModelSource.checkpoint:
        if not m.checkpoint:
            raise ConfigError(f"{key}.checkpoint", "required when source=checkpoint")
        path = resolve_path(m.checkpoint)
        if not path.is_dir():
            raise ConfigError(f"{key}.checkpoint", f"checkpoint directory not found: {path}", m.checkpoint)
        try:
            arch = read_llama_config(path) if m.arch is Arch.transformer else read_mamba2_config(path)
        except CheckpointError as e:
            raise ConfigError(f"{key}.checkpoint", str(e)) from e
        if isinstance(arch, Mamba2Config) and arch.is_hybrid != (m.arch is Arch.hybrid):
            found = "hybrid" if arch.is_hybrid else "mamba2"
            raise ConfigError(f"{key}.arch", f"the checkpoint is a {found} model", m.arch.value)
        return arch
    if m.source is ModelSource.target_copy:
        if target is None:
            raise ConfigError(f"{key}.source", "target_copy is only valid for the drafter")
        if m.noise_std < 0:
            raise ConfigError(f"{key}.noise_std", "must be >= 0", m.noise_std)
        return target
    if m.vocab_size < 2:
        raise ConfigError(f"{key}.vocab_size", "must be >= 2", m.vocab_size)
    check_arch(key, m)
    if m.arch is Arch.transformer:
        return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                           num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                           intermediate_size=m.intermediate_size, rope_theta=m.rope_theta,
                           tie_word_embeddings=m.tie_word_embeddings, attention_bias=m.family.value == "qwen2",
                           max_position_embeddings=1 << 20, family=m.family.value)
    return _mamba2_arch(m)


def _mamba2_arch(m: ModelConfig) -> Mamba2Config:
    head_dim = m.hidden_size // m.num_heads
    return Mamba2Config(vocab_size=m.vocab_size, d_model=m.hidden_size, n_layer=m.num_layers, d_state=m.d_state,
                        d_conv=m.d_conv, expand=m.expand, headdim=m.headdim, ngroups=m.ngroups,
                        chunk_size=m.chunk_size, d_intermediate=m.d_intermediate,
                        attn_layer_idx=tuple(m.attn_layer_idx), attn_num_heads=m.num_heads,
                        attn_num_heads_kv=m.num_kv_heads, attn_head_dim=head_dim, attn_rotary_dim=head_dim,
                        attn_rotary_base=m.rope_theta, tie_embeddings=m.tie_word_embeddings)


GROWN = (TreePolicy.dynamic, TreePolicy.beam)
"""Policies whose trees are grown at run time (no static topology)."""


def _topology(cfg: SpecConfig) -> TreeTopology:
    if cfg.drafter.kind is DrafterKind.none or cfg.tree.policy in GROWN:
        return TreeTopology.chain(0)  # grown trees: no static topology (see tree_slots)
    if cfg.tree.budget is not None:  # the deepest candidate, of the budget's size, until the tree is chosen
        return TreeTopology.chain(cfg.tree.max_nodes - 1)
    if cfg.tree.policy is TreePolicy.chain:
        return TreeTopology.chain(cfg.tree.k)
    return TreeTopology.static(cfg.tree.branching)


def grown_bounds(cfg: SpecConfig) -> Optional[tuple[int, int]]:
    """(most nodes of one tree, most nodes one drafter round adds) for a grown policy, else None."""
    t = cfg.tree
    if cfg.drafter.kind is DrafterKind.none or t.policy not in GROWN:
        return None
    if t.policy is TreePolicy.dynamic:
        return t.num_nodes, t.expand_per_round
    return 1 + t.beam_width * t.beam_depth, t.beam_width


def tree_slots(cfg: SpecConfig, topo: TreeTopology) -> int:
    """Cache slots past the text one step's tree may touch: the static tree's size, or a grown tree's most
    nodes plus one drafter round of padding."""
    b = grown_bounds(cfg)
    return topo.n if b is None else b[0] + b[1]


def _check_grown(cfg: SpecConfig, drafter_arch) -> None:
    """dynamic / beam: a model drafter, a beam no wider than its vocabulary, children that keep RRS exact."""
    t, d = cfg.tree, cfg.drafter
    if t.policy not in GROWN or d.kind is DrafterKind.none:  # none: plain decoding, warned about above
        return
    if d.kind is not DrafterKind.model:
        raise ConfigError("tree.policy", f"{t.policy.value} trees are grown from a draft model's distributions; "
                          f"drafter.kind={d.kind.value} has none: use drafter=model (or default), or tree=static / "
                          "tree=chain", t.policy.value)
    if t.policy is TreePolicy.beam:
        vocab = drafter_arch.vocab_size
        if d.vocab_trim.enabled:
            vocab = min(vocab, d.vocab_trim.size)
        if t.beam_width > vocab:
            raise ConfigError("tree.beam_width", f"exceeds the drafter's vocabulary ({vocab} tokens)", t.beam_width)
    if cfg.sampling.temperature > 0 and t.children is ChildSampling.iid:
        raise ConfigError("tree.children", f"biased at temperature > 0: {t.policy.value} trees keep children by "
                          "their values, which i.i.d. duplicates break; use tree.children=wor (sampled without "
                          "replacement, exact with RRS-WOR) or topk", t.children.value)


BUDGET_FIELDS = ("max_nodes", "calibration_prompts", "num_calibration_prompts", "calibration_max_new_tokens")


def _check_budget(cfg: SpecConfig) -> None:
    """tree.budget=auto chooses a chain or static tree from greedy acceptance measured with a model or
    prompt-lookup drafter; anything else is refused with the safe alternative."""
    t, d, defaults = cfg.tree, cfg.drafter, TreeConfig()
    if t.budget is None:
        changed = [f for f in BUDGET_FIELDS if getattr(t, f) != getattr(defaults, f)]
        if changed:
            _warn(f"tree.{changed[0]}", "no effect without tree.budget=auto (the tree is tree.k / tree.branching)")
        return
    off = "or tree.budget=null (the tree as given)"
    if d.kind is DrafterKind.none:
        raise ConfigError("tree.budget", f"sizes a draft tree; drafter=none drafts nothing: use drafter=default "
                          f"(or model, prompt_lookup), {off}", t.budget.value)
    if t.policy in GROWN:
        raise ConfigError("tree.budget", f"chooses a static tree; tree.policy={t.policy.value} grows one per request "
                          f"(its own budget: tree.num_nodes / beam_width): use tree=chain or tree=static with "
                          f"tree.budget=auto, {off}", t.budget.value)
    if cfg.retrieval.kind is not RetrievalKind.none:
        raise ConfigError("tree.budget", "auto does not model retrieval nodes (their number varies per step): use "
                          f"retrieval=none with tree.budget=auto, {off}", t.budget.value)
    if cfg.sampling.temperature > 0:
        raise ConfigError("tree.budget", "auto measures greedy acceptance (the drafter's top-k against the target's "
                          "argmax); at temperature > 0 set the tree by hand (tree.k / tree.branching), or use "
                          "sampling=greedy", t.budget.value)
    if not resolve_path(t.calibration_prompts).is_file():
        raise ConfigError("tree.calibration_prompts", f"calibration prompt file not found: "
                          f"{resolve_path(t.calibration_prompts)}", t.calibration_prompts)
    if t.k != defaults.k or list(t.branching) != defaults.branching:
        _warn("tree.k" if t.k != defaults.k else "tree.branching", "no effect with tree.budget=auto (the tree is "
              "chosen; tree.max_nodes bounds it)")
    if d.kind is DrafterKind.prompt_lookup and t.policy is TreePolicy.static:
        _warn("tree.policy", "static: with drafter=prompt_lookup tree.budget=auto chooses among chains (a lookup "
              "trie's branches follow the matches, not a fixed shape)")


def _child_kind(cfg: SpecConfig) -> ChildKind:
    if cfg.drafter.kind is not DrafterKind.model or cfg.sampling.temperature == 0:
        return ChildKind.deterministic  # n-gram drafts, and greedy decoding, use deterministic picks
    return {ChildSampling.topk: ChildKind.deterministic, ChildSampling.iid: ChildKind.iid,
            ChildSampling.wor: ChildKind.wor}[cfg.tree.children]


def _check_sampling(cfg: SpecConfig, topo: TreeTopology, kind: ChildKind) -> None:
    s, rule = cfg.sampling, cfg.sampling.acceptance
    if s.temperature == 0:
        if s.top_k or s.top_p < 1.0:
            _warn("sampling.top_k/top_p", "no effect under greedy decoding (temperature = 0)")
        if rule is not AcceptanceRule.auto:
            _warn("sampling.acceptance", "no effect under greedy decoding (temperature = 0)")
        if cfg.drafter.kind is DrafterKind.model and cfg.tree.children is not ChildSampling.topk \
                and not (cfg.tree.policy in GROWN and cfg.tree.children is ChildSampling.wor):  # their yaml's default
            _warn("tree.children", "no effect under greedy decoding (temperature = 0): children are the top-k")
        return
    multi = any(len(c) > 1 for c in topo.children) or cfg.tree.policy in GROWN
    safe = "use sampling.acceptance=auto (or sample_match)"
    if rule is AcceptanceRule.rrs_draft_probs and kind is ChildKind.deterministic:
        how = "prompt-lookup drafts" if cfg.drafter.kind is DrafterKind.prompt_lookup else "top-k children"
        raise ConfigError("sampling.acceptance", f"biased at temperature > 0: {how} are deterministic, so the "
                          f"drafter probabilities are not their proposal; {safe}", rule.value)
    if rule is AcceptanceRule.rrs_wor and kind is ChildKind.deterministic:
        raise ConfigError("sampling.acceptance", f"biased at temperature > 0: deterministic children are not "
                          f"sampled without replacement; {safe}", rule.value)
    if multi and rule is AcceptanceRule.rrs_draft_probs and kind is ChildKind.wor:
        raise ConfigError("sampling.acceptance", "biased at temperature > 0: children sampled without "
                          f"replacement need the WOR residual; {safe} (or rrs_wor)", rule.value)
    # i.i.d. children checked with rrs_wor stay exact (a repeated sibling has proposal 0 and is skipped, and
    # a fresh one is distributed as p minus the earlier siblings): the enumeration tests prove it, so it is
    # allowed, unlike the "i.i.d. + WOR zeroing" row of ALGORITHMS.md §8.3, which assumes repeats are tried.


def validate(cfg: SpecConfig, host: Host) -> Resolved:
    """All cross-field rules; returns the resolved config or raises one ConfigError."""
    t = cfg.target
    if t.max_seq_len is not None and t.max_seq_len < 2:
        raise ConfigError("target.max_seq_len", "must be >= 2", t.max_seq_len)
    target_arch = _arch(t.model, "target.model", None)
    _check_arch_fields_unused(t.model, "target.model")
    limit = getattr(target_arch, "max_position_embeddings", None)  # SSMs have no position limit
    if t.model.source is not ModelSource.checkpoint:
        limit = None  # random weights: LlamaConfig's limit is a placeholder
    if t.max_seq_len is None:
        if limit is None:
            raise ConfigError("target.max_seq_len", "required: this target states no max_position_embeddings "
                              "(random weights or an SSM); set the context limit, e.g. target.max_seq_len=2048")
        cfg = replace(cfg, target=replace(t, max_seq_len=limit))  # None = the checkpoint's own limit
        t = cfg.target
    elif limit is not None and t.max_seq_len > limit:
        raise ConfigError("target.max_seq_len", f"exceeds the checkpoint's max_position_embeddings ({limit}); "
                          "leave it unset to use the checkpoint's", t.max_seq_len)
    if cfg.task.max_new_tokens >= t.max_seq_len:
        _warn("task.max_new_tokens", f"{cfg.task.max_new_tokens} >= target.max_seq_len ({t.max_seq_len}): "
              "every answer stops at the context limit first")
    if t.tokenizer is not None and not resolve_path(t.tokenizer).exists():
        raise ConfigError("target.tokenizer", f"not found: {resolve_path(t.tokenizer)}", t.tokenizer)

    d = cfg.drafter
    drafter_arch = None
    if d.kind is DrafterKind.model:
        drafter_arch = _arch(d.model, "drafter.model", target_arch)
        _check_arch_fields_unused(d.model, "drafter.model")
        dv, tv = drafter_arch.vocab_size, target_arch.vocab_size
        src = f" (checkpoint {d.model.checkpoint})" if d.model.source is ModelSource.checkpoint else ""
        if dv > tv:
            raise ConfigError("drafter.model.vocab_size", f"drafter vocabulary{src} is larger than the target's "
                              f"({tv}); drafts must be target ids", dv)
        if dv < tv:
            raise ConfigError("drafter.model.vocab_size", f"drafter vocabulary{src} is smaller than the target's "
                              f"({tv}); the drafter reads every target token, and ids >= {dv} have no drafter "
                              "embedding", dv)
        limit = getattr(drafter_arch, "max_position_embeddings", None)
        if limit is not None and t.max_seq_len > limit:
            raise ConfigError("target.max_seq_len", f"exceeds the drafter's max_position_embeddings ({limit})",
                              t.max_seq_len)
        _check_same_tokenizer(cfg)
    _check_vocab_trim(cfg, drafter_arch)

    topo = _topology(cfg)
    tree_defaults = TreeConfig()
    if d.kind is not DrafterKind.none and cfg.tree.policy is TreePolicy.chain and cfg.tree.budget is None \
            and list(cfg.tree.branching) != tree_defaults.branching:
        _warn("tree.branching", "no effect with tree.policy=chain (use tree=static for a branching tree)")
    if d.kind is not DrafterKind.none and cfg.tree.policy is TreePolicy.static and cfg.tree.budget is None \
            and cfg.tree.k != tree_defaults.k:
        _warn("tree.k", "no effect with tree.policy=static (tree.branching sets the shape; tree=chain uses k)")
    if d.kind is DrafterKind.none and cfg.tree.policy in (TreePolicy.static,) + GROWN:
        _warn("tree", "no effect with drafter=none (" + ("plain autoregressive decoding)" if cfg.retrieval.kind is
                                                       RetrievalKind.none else "the trees come from retrieval.*)"))
    if d.kind is DrafterKind.prompt_lookup and cfg.tree.children is not ChildSampling.topk:
        _warn("tree.children", "no effect with drafter=prompt_lookup (n-gram drafts are deterministic)")
    _check_grown(cfg, drafter_arch)
    _check_budget(cfg)
    n_tree = tree_slots(cfg, topo)
    for arch, key in ((target_arch, "target"), (drafter_arch, "drafter")):
        if isinstance(arch, Mamba2Config) and n_tree > arch.chunk_size:
            raise ConfigError("tree", f"a tree of {n_tree} nodes exceeds the {key}'s single-chunk limit "
                              f"(chunk_size={arch.chunk_size}) for SSM tree verification")
    if n_tree > t.max_seq_len // 2:
        raise ConfigError("tree", f"a tree of {n_tree} nodes does not fit target.max_seq_len={t.max_seq_len} "
                          "(at most half the context)")
    kind = _child_kind(cfg)
    _check_sampling(cfg, topo, kind)
    _check_serving(cfg, topo)
    _check_retrieval(cfg, topo, target_arch, drafter_arch)

    given = [k for k in ("prompt", "prompt_file", "prompts") if getattr(cfg, k) is not None]
    if len(given) > 1:
        raise ConfigError(given[-1], f"set only one of prompt, prompt_file, prompts (got {', '.join(given)})",
                          getattr(cfg, given[-1]))
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise ConfigError("prompt", "is empty", cfg.prompt)
    for key in ("prompts", "prompt_file"):
        value = getattr(cfg, key)
        if value is not None and not resolve_path(value).is_file():
            raise ConfigError(key, f"prompt file not found: {resolve_path(value)}", value)
    dp = cfg.task.default_prompts
    if cfg.prompts is None and cfg.prompt is None and dp is not None and not resolve_path(dp).is_file():
        raise ConfigError("task.default_prompts", f"prompt file not found: {resolve_path(dp)}", dp)
    device = _device(cfg, host)
    _check_cpu_transforms(cfg, device)
    _check_compile(cfg, device)
    models = [(target_arch, t.model.dtype.value)] + ([(drafter_arch, d.model.dtype.value)] if drafter_arch else [])
    return Resolved(cfg, target_arch, drafter_arch, topo, kind, cfg.sampling.acceptance, device,
                    host.cuda_device if device == "cuda" else "cpu", _attention(cfg, device, models),
                    _ssm_prefill(cfg, device, host, models))


def _check_serving(cfg: SpecConfig, topo: TreeTopology) -> None:
    """Serving settings that cannot act (task=serve / loadtest only: the other tasks ignore the group)."""
    if cfg.task.kind.value not in ("serve", "loadtest"):
        return
    sv, depth = cfg.serving, (0 if cfg.drafter.kind is DrafterKind.none else topo.max_depth)
    if sv.policy.value == "smartspec" and depth == 0:
        _warn("serving.policy", "smartspec has nothing to choose with drafter=none (every step is autoregressive)")
    for key in ("k", "max_k"):
        v = getattr(sv, key)
        if v is not None and v > depth:
            _warn(f"serving.{key}", f"{v} exceeds the tree's depth ({depth}): steps verify at most {depth} levels")


def retrieval_tree_sizes(cfg: SpecConfig, topo: TreeTopology) -> tuple[int, int]:
    """(largest verified tree, largest drafter forward over retrieval candidates) in nodes, root included: a
    fused tree holds the model's tree plus the pruned retrieval nodes; retrieval alone, the root plus them."""
    r = cfg.retrieval
    if r.kind is RetrievalKind.none:
        return topo.n, 0
    if cfg.drafter.kind is DrafterKind.model:  # prune=path scores the candidates in one drafter forward
        return topo.n + r.max_nodes, r.num_candidates + 1 if r.prune is RetrievalPrune.path else 0
    return 1 + r.max_nodes, 0


def corpus_matches(entry: str) -> list[Path]:
    """The paths one `retrieval.corpus` entry names: a file or directory, or every match of a glob (`**`
    recursive), relative to the project root."""
    if any(c in entry for c in "*?["):
        return sorted(Path(p) for p in glob.glob(str(resolve_path(entry)), recursive=True))
    path = resolve_path(entry)
    return [path] if path.exists() else []


def _check_retrieval(cfg: SpecConfig, topo: TreeTopology, target_arch, drafter_arch) -> None:
    r, d = cfg.retrieval, cfg.drafter
    if r.kind is RetrievalKind.none:
        return
    if d.kind is DrafterKind.model and cfg.tree.policy in GROWN:
        raise ConfigError("retrieval.kind", f"fusion with tree={cfg.tree.policy.value} is not supported (the grown "
                          "tree has no fixed shape to merge retrieval into); use tree=static / top3 / chain with "
                          "retrieval, or retrieval=none", r.kind.value)
    if d.kind is DrafterKind.prompt_lookup:
        raise ConfigError("retrieval.kind", "drafter=prompt_lookup already is context retrieval without a draft "
                          "model; use drafter=none (retrieval alone) or a model drafter (fused)", r.kind.value)
    if cfg.sampling.temperature > 0 and cfg.sampling.acceptance in (AcceptanceRule.rrs_draft_probs,
                                                                    AcceptanceRule.rrs_wor):
        raise ConfigError("sampling.acceptance", "biased at temperature > 0: retrieved nodes are deterministic "
                          "proposals; use sampling.acceptance=auto (or sample_match)", cfg.sampling.acceptance.value)
    if d.kind is DrafterKind.none:
        if r.num_candidates != type(r)().num_candidates:
            _warn("retrieval.num_candidates", "no effect with drafter=none (nothing prunes: the tree keeps "
                  "retrieval.max_nodes)")
    elif r.num_candidates < r.max_nodes:
        _warn("retrieval.max_nodes", f"{r.max_nodes} > retrieval.num_candidates ({r.num_candidates}): pruning keeps "
              "at most the candidates")
    if r.skip_model_after and d.kind is not DrafterKind.model:
        _warn("retrieval.skip_model_after", "no effect without a model drafter")
    elif r.skip_model_after and cfg.sampling.temperature > 0 and max([cfg.task.batch_size, *cfg.task.batch_sizes]) > 1:
        _warn("retrieval.skip_model_after", "skips the draft model per batch: at temperature > 0 a request's tokens "
              "may then depend on its batch (still exact in distribution)")
    if r.kind is RetrievalKind.datastore and r.store is not None:
        if not resolve_path(r.store).is_dir():
            raise ConfigError("retrieval.store", f"datastore directory not found: {resolve_path(r.store)}", r.store)
    elif r.kind is RetrievalKind.datastore:
        for i, entry in enumerate(r.corpus):
            if not corpus_matches(entry):
                raise ConfigError(f"retrieval.corpus[{i}]", f"no such file, directory or glob match "
                                  f"({resolve_path(entry)})", entry)
        if resolve_path(r.cache_dir).is_file():
            raise ConfigError("retrieval.cache_dir", "is a file (a directory for the datastores)", r.cache_dir)
    elif r.corpus:
        _warn("retrieval.corpus", "no effect with retrieval=context (it reads the request's own text)")
    verify, score = retrieval_tree_sizes(cfg, topo)
    for arch, key, n in ((target_arch, "target", verify), (drafter_arch, "drafter", score)):
        if isinstance(arch, Mamba2Config) and n > arch.chunk_size:
            raise ConfigError("retrieval.max_nodes" if key == "target" else "retrieval.num_candidates",
                              f"a tree of {n} nodes exceeds the {key}'s single-chunk limit (chunk_size="
                              f"{arch.chunk_size}) for SSM tree verification")
    if max(verify, score) > cfg.target.max_seq_len // 2:
        raise ConfigError("retrieval.max_nodes", f"trees of up to {max(verify, score)} nodes do not fit "
                          f"target.max_seq_len={cfg.target.max_seq_len} (at most half the context)", r.max_nodes)


def _device(cfg: SpecConfig, host: Host) -> str:
    dev = cfg.backend.device
    if dev is Device.cuda and host.cuda_device is None:
        raise ConfigError("backend.device", "CUDA is not available on this machine (use auto or cpu)", "cuda")
    hw = cfg.hardware.kind.value
    if hw == "cpu":
        if dev is Device.cuda:
            raise ConfigError("backend.device", "hardware=cpu compiles for the CPU (use backend.device=auto or cpu, "
                              "or hardware=auto)", "cuda")
        return "cpu"
    if hw in HARDWARE:
        name, cap = HARDWARE[hw]
        want = f"sm{cap.replace('.', '')}"
        if host.cuda_device is None or name not in host.cuda_device or not host.cuda_device.endswith(want):
            raise ConfigError("hardware", f"{hw} needs an NVIDIA {name} (compute capability {cap}); this machine has "
                              f"{host.cuda_device or 'no CUDA device'}: compile on that machine, or use hardware=auto",
                              hw)
        if dev is Device.cpu:
            raise ConfigError("backend.device", f"hardware={hw} runs on its GPU (use backend.device=auto or cuda)", "cpu")
        return "cuda"
    return "cpu" if dev is Device.cpu or host.cuda_device is None else "cuda"


def _check_compile(cfg: SpecConfig, device: str) -> None:
    """compile.* settings that cannot work on this machine (task=compile / backend=compiled only)."""
    if cfg.task.kind.value != "compile" and cfg.backend.kind.value != "compiled":
        return
    backends = [b.value for b in cfg.compile.backends]
    if "tensorrt" in backends:
        if device != "cuda":
            raise ConfigError("compile.backends", "tensorrt runs on CUDA only; on the CPU use [eager, aoti]", backends)
        if importlib.util.find_spec("torch_tensorrt") is None:
            raise ConfigError("compile.backends", "tensorrt needs torch_tensorrt, which is not installed here "
                              "(pip install torch-tensorrt matching this torch; the backend is unverified in this "
                              "project): use [eager, aoti]", backends)
    if cfg.compile.artifact is not None and not resolve_path(cfg.compile.artifact).is_dir():
        raise ConfigError("compile.artifact", f"no such artifact directory: {resolve_path(cfg.compile.artifact)}",
                          cfg.compile.artifact)
    if not resolve_path(cfg.compile.calibration_prompts).is_file():
        raise ConfigError("compile.calibration_prompts",
                          f"prompt file not found: {resolve_path(cfg.compile.calibration_prompts)}",
                          cfg.compile.calibration_prompts)


def _has_attention(arch: ResolvedArch) -> bool:
    return isinstance(arch, LlamaConfig) or bool(arch.attn_layer_idx)


def _attention(cfg: SpecConfig, device: str, models: list[tuple[ResolvedArch, str]]) -> str:
    """backend.attention -> "sdpa" | "triton". The Triton kernel needs CUDA, Triton, and an fp16/bf16/fp32 model."""
    want = cfg.backend.attention.value
    wide = [dtype for arch, dtype in models if _has_attention(arch) and dtype not in KERNEL_DTYPES]
    have_triton = importlib.util.find_spec("triton") is not None
    if want == "auto":
        return "triton" if device == "cuda" and have_triton and not wide else "sdpa"
    if want == "triton":
        if device != "cuda":
            raise ConfigError("backend.attention", "the Triton tree-attention kernel runs on CUDA only; on the CPU "
                              "use backend.attention=sdpa (or auto)", want)
        if not have_triton:
            raise ConfigError("backend.attention", "triton is not installed here (pip install -e '.[gpu]'): use "
                              "backend.attention=sdpa", want)
        if wide:
            raise ConfigError("backend.attention", f"the Triton kernel computes in {'/'.join(KERNEL_DTYPES)}, not "
                              f"{wide[0]}: use backend.attention=sdpa or another model dtype", want)
        if not any(_has_attention(arch) for arch, _ in models):
            _warn("backend.attention", "no effect: no model has attention layers")
    return want


def _ssm_prefill(cfg: SpecConfig, device: str, host: Host, models: list[tuple[ResolvedArch, str]]) -> str:
    """backend.ssm_prefill -> "torch" | "mamba_ssm". Resolved to torch when no model has SSM layers, so a
    transformer plan does not depend on whether mamba-ssm is installed."""
    want = cfg.backend.ssm_prefill.value
    ssm = any(isinstance(arch, Mamba2Config) for arch, _ in models)
    if want == "auto":
        return "mamba_ssm" if ssm and device == "cuda" and host.mamba_ssm else "torch"
    if want == "mamba_ssm":
        if device != "cuda":
            raise ConfigError("backend.ssm_prefill", "mamba-ssm's chunk scan runs on CUDA only; on the CPU use "
                              "backend.ssm_prefill=torch (or auto)", want)
        if not host.mamba_ssm:
            raise ConfigError("backend.ssm_prefill", "mamba-ssm does not import here (pip install mamba-ssm "
                              "matching this torch): use backend.ssm_prefill=torch (or auto)", want)
        if not ssm:
            _warn("backend.ssm_prefill", "no effect: no model has SSM layers")
            return "torch"
    return want


def _check_cpu_transforms(cfg: SpecConfig, device: str) -> None:
    ct = cfg.backend.cpu_transforms
    named = [k for k in ("fp16_weight_gemm", "rmsnorm_layernorm", "gemv_head") if getattr(ct, k) is not None]
    if named and device == "cuda":
        _warn(f"backend.cpu_transforms.{'/'.join(named)}", "no effect on cuda (CPU fast paths, device=cpu only)")


RANDOM_WEIGHT_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                        "intermediate_size", "rope_theta", "tie_word_embeddings", "d_state", "d_conv", "expand",
                        "headdim", "ngroups", "d_intermediate", "attn_layer_idx")


def _check_arch_fields_unused(m: ModelConfig, key: str) -> None:
    """A checkpoint states its own architecture: the random-weight fields (`--cfg job` shows them) do nothing."""
    if m.source is not ModelSource.checkpoint:
        return
    defaults = ModelConfig()
    changed = [f for f in RANDOM_WEIGHT_FIELDS if getattr(m, f) != getattr(defaults, f)]
    if changed:
        _warn(f"{key}.{changed[0]}", f"no effect with source=checkpoint (config.json sets the architecture; "
              f"random-weight fields set: {', '.join(changed)})")


def _check_vocab_trim(cfg: SpecConfig, drafter_arch: Optional[ResolvedArch]) -> None:
    vt = cfg.drafter.vocab_trim
    if not vt.enabled:
        return
    if cfg.drafter.kind is not DrafterKind.model:
        raise ConfigError("drafter.vocab_trim.enabled", f"trims a draft model's LM head; drafter.kind="
                          f"{cfg.drafter.kind.value} has none", True)
    if vt.size >= drafter_arch.vocab_size:
        _warn("drafter.vocab_trim.size", f"{vt.size} >= the drafter's vocabulary ({drafter_arch.vocab_size}): "
              "nothing is trimmed")
    has_artifact = vt.artifact is not None and resolve_path(vt.artifact).is_file()
    if not has_artifact and not resolve_path(vt.prompts).is_file():
        raise ConfigError("drafter.vocab_trim.prompts", f"calibration prompt file not found: "
                          f"{resolve_path(vt.prompts)}", vt.prompts)


def _check_same_tokenizer(cfg: SpecConfig) -> None:
    """A checkpoint drafter must share the target's tokenizer (we do not map between vocabularies).

    The target's tokenizer is the one it will run with: `target.tokenizer`, else its checkpoint's, else the
    built-in byte-level one (random weights)."""
    t, dm = cfg.target, cfg.drafter.model
    if dm.source is not ModelSource.checkpoint:
        return  # random and target_copy drafters speak the target's ids
    b = resolve_path(dm.checkpoint) / "tokenizer.json"
    if not b.is_file():
        return
    if t.tokenizer is not None:
        a = resolve_path(t.tokenizer)
        a = a / "tokenizer.json" if a.is_dir() else a
    elif t.model.source is ModelSource.checkpoint:
        a = resolve_path(t.model.checkpoint) / "tokenizer.json"
    else:
        a = None
    if a is not None and (not a.is_file() or a.read_bytes() == b.read_bytes()):
        return
    try:
        target_vocab = get_tokenizer(None if a is None else str(a)).get_vocab()
    except CheckpointError as e:
        raise ConfigError("target.tokenizer" if t.tokenizer is not None else "target.model.checkpoint",
                          str(e)) from e
    try:
        drafter_vocab = get_tokenizer(str(b)).get_vocab()
    except CheckpointError as e:
        raise ConfigError("drafter.model.checkpoint", str(e)) from e
    if target_vocab != drafter_vocab:
        raise ConfigError("drafter.model.checkpoint", f"tokenizer differs from the target's ({b} vs "
                          f"{a or 'the built-in byte-level tokenizer'}); cross-vocabulary drafting is not supported",
                          dm.checkpoint)
