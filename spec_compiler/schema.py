"""The only definition of user-facing knobs.

Mutable dataclasses (Hydra cannot merge into frozen ones) with Enums for every choice, registered in
Hydra's ConfigStore as `base_config` and `base_<group>` per group; each YAML option under `conf/<group>/`
starts with `defaults: [base_<group>]` so it is type-checked against its schema. Field-local checks run
in `__post_init__` (OmegaConf.to_object calls it); cross-field rules live in `validate.py`. After
validation the config is frozen into a `Plan` (plan.py) and never mutated.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from spec_compiler.arch import GATED_MLP_MULTIPLE
from spec_compiler.errors import ConfigError


class ModelSource(str, enum.Enum):
    checkpoint = "checkpoint"
    """Hugging Face directory: config.json + (sharded) safetensors + tokenizer.json."""
    random = "random"
    """Random weights from the architecture fields and `seed` (tests, smoke runs, GPU speed bars)."""
    target_copy = "target_copy"
    """Drafter only: the target's weights plus Gaussian noise of relative size `noise_std`."""


class Arch(str, enum.Enum):
    transformer = "transformer"
    """Llama family (Llama, Qwen2, Mistral): attention + SwiGLU."""
    mamba2 = "mamba2"
    """Mamba2 (SSD) blocks only; trees are verified by tree-conv + tree-scan (STree)."""
    hybrid = "hybrid"
    """Mamba2 blocks with attention blocks at `attn_layer_idx` (mamba-ssm's hybrid)."""


class Family(str, enum.Enum):
    llama = "llama"
    qwen2 = "qwen2"
    mistral = "mistral"


class DType(str, enum.Enum):
    float32 = "float32"
    float64 = "float64"
    bfloat16 = "bfloat16"
    float16 = "float16"


class DrafterKind(str, enum.Enum):
    none = "none"
    """No speculation: plain autoregressive decoding through the same loop (the baseline)."""
    model = "model"
    """An independent small causal LM with its own KV cache."""
    prompt_lookup = "prompt_lookup"
    """n-gram match over prompt + generated text (PLD); deterministic drafts."""


class RetrievalKind(str, enum.Enum):
    none = "none"
    """No retrieval: the drafter's trees alone."""
    context = "context"
    """n-gram lookup in the request's own text (prompt + generated: prompt lookup, runtime/lookup.py)."""
    datastore = "datastore"
    """Suffix lookup in a corpus datastore (REST): a suffix array over the corpus's token ids."""


class RetrievalPrune(str, enum.Enum):
    path = "path"
    """Rank candidates by their path probability under the draft model: one drafter forward over the candidates."""
    root = "root"
    """Rank by count x the draft model's probability of the path's first token (the root distribution the
    drafter computes anyway): no extra forward."""


class TreePolicy(str, enum.Enum):
    chain = "chain"
    """k draft tokens in a line."""
    static = "static"
    """A fixed tree: every node at depth d has branching[d] children (tree=rsd_c: RSD-C, with children=wor)."""
    dynamic = "dynamic"
    """DySpec: each request's tree grown at run time by a max-heap on path probability (num_nodes, max_depth,
    threshold, expand_per_round)."""
    beam = "beam"
    """RSD-S: stochastic beam search without replacement over sequences (beam_width, beam_depth)."""


class TreeBudget(str, enum.Enum):
    auto = "auto"
    """Measure acceptance on calibration prompts and the verify / draft latencies, then use the chain or static
    tree of at most tree.max_nodes nodes with the most expected tokens/s (spec_compiler/budget.py)."""


class ChildSampling(str, enum.Enum):
    topk = "topk"
    """Children are the drafter's top-b tokens (deterministic; δ proposal)."""
    iid = "iid"
    """Children sampled with replacement from the drafter distribution."""
    wor = "wor"
    """Children sampled without replacement (Gumbel-top-k), in draw order."""


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class KVWindow(str, enum.Enum):
    live = "live"
    """Attend over the cache up to the longest live row (fastest in CPU eager; the shape changes each step)."""
    full = "full"
    """Attend over the whole cache capacity: fixed shapes per (batch, tree) bucket, for compiled phases."""


class VerifyHead(str, enum.Enum):
    path = "path"
    """The LM head runs only at the tree nodes the acceptance walk reaches (B rows per accepted level)."""
    full = "full"
    """The LM head runs at every tree node of the verify forward (one [B*T, V] matmul)."""


class AttentionBackend(str, enum.Enum):
    auto = "auto"
    """triton on cuda (where Triton is installed and the model dtype is fp16/bf16/fp32), else sdpa."""
    sdpa = "sdpa"
    """torch SDPA over the block's mask, for every forward."""
    triton = "triton"
    """Forwards whose tokens sit right after the prefix (verify trees, prefill chunks, AR tokens) of a tree-bucket
    size run the Triton tree-attention kernel (codegen/tree_attention.py); other forwards keep SDPA. CUDA only."""


class SsmPrefill(str, enum.Enum):
    auto = "auto"
    """mamba_ssm on cuda where mamba-ssm's chunk scan imports, else torch."""
    torch = "torch"
    """Our chunked SSD scan (runtime/models/mamba2.py `ssd_chunked_scan`)."""
    mamba_ssm = "mamba_ssm"
    """mamba-ssm's Triton `mamba_chunk_scan_combined` for prefill chunks. CUDA only."""


class BackendKind(str, enum.Enum):
    eager = "eager"
    """Plain torch on CPU or GPU; the reference backend."""
    compiled = "compiled"
    """Run from the plan's compiled artifact (task=compile; built on first use): each phase by its autotuned
    program (aot/build.py, runtime/compiled.py)."""


class HardwareKind(str, enum.Enum):
    auto = "auto"
    """Whatever this machine has (CUDA when available, else the CPU)."""
    cpu = "cpu"
    h100 = "h100"
    h200 = "h200"
    a100 = "a100"
    l4 = "l4"


HARDWARE = {"h100": ("H100", "9.0"), "h200": ("H200", "9.0"), "a100": ("A100", "8.0"), "l4": ("L4", "8.9")}
"""GPU hardware choices: (a substring of the device name, compute capability)."""


class PhaseBackend(str, enum.Enum):
    eager = "eager"
    """The model's own forward (the reference)."""
    aoti = "aoti"
    """torch.export + AOTInductor (`.pt2` package)."""
    tensorrt = "tensorrt"
    """torch_tensorrt.dynamo.compile of the same exported program (import-gated; unverified in this project)."""


class OnMismatch(str, enum.Enum):
    refuse = "refuse"
    """An artifact built for another device, library version, plan or checkpoint is an error naming what differs."""
    rebuild = "rebuild"
    """Rebuild it in place."""


class TaskKind(str, enum.Enum):
    generate = "generate"
    """Decode the prompts, write answers jsonl, print a summary table."""
    bench = "bench"
    """Run the autoregressive baseline and the configured method on the same prompts; write JSON + markdown."""
    train = "train"
    """Train the target and distill the drafter per the `train` group; the inference groups are ignored."""
    serve = "serve"
    """An OpenAI-compatible HTTP server (serve/server.py) over the continuous-batching scheduler."""
    loadtest = "loadtest"
    """Poisson arrivals at each `task.loadtest.rates` against a fresh in-process server per policy; JSON + md + plot."""
    compile = "compile"
    """Compile the plan into its artifact (artifacts/<name>-<hash>/, manifest.json); reused when it exists."""


class ServingPolicy(str, enum.Enum):
    fixed = "fixed"
    """Every step verifies the tree up to `serving.k` levels (None: the whole tree)."""
    smartspec = "smartspec"
    """Each step picks the speculation length that maximises estimated goodput (SmartSpec, ALGORITHMS.md §5)."""


class DistillLoss(str, enum.Enum):
    kl = "kl"
    """KL(target || drafter) of the temperature-softened distributions, times temperature² (Hinton et al.)."""
    tvd = "tvd"
    """Total variation distance; 1 - TVD is the per-token acceptance rate of speculative sampling."""


# Lower-case names are canonical (config files spell them so); upper-case names are aliases.
class ChildKind(str, enum.Enum):
    """How a node's children were drawn from the drafter: what the verifier takes as their proposal."""
    deterministic = "deterministic"
    """top-k / static / retrieval / n-gram pick: proposal δ(x)."""
    iid = "iid"
    """sampled with replacement from p: proposal p for every sibling."""
    wor = "wor"
    """sampled without replacement (Gumbel-top-k): p minus earlier siblings, renormalised."""
    DETERMINISTIC = "deterministic"
    IID = "iid"
    WOR = "wor"


class AcceptanceRule(str, enum.Enum):
    auto = "auto"
    """RRS with each child's true proposal (derived from ChildKind). Always lossless."""
    sample_match = "sample_match"
    """Draw y ~ q at each node and follow the child equal to y. Always lossless, accepts less."""
    rrs_draft_probs = "rrs_draft_probs"
    """RRS using the raw drafter p for every child. Lossless only for i.i.d. children."""
    rrs_wor = "rrs_wor"
    """RRS using p minus earlier siblings for every child. Lossless only for WOR children."""
    AUTO = "auto"
    SAMPLE_MATCH = "sample_match"
    RRS_DRAFT_PROBS = "rrs_draft_probs"
    RRS_WOR = "rrs_wor"


@dataclass
class ModelArch:
    """An architecture: the fields a model built from config (random weights, or one to train) is made of.
    Shared by the target/drafter `ModelConfig` and `TrainConfig.target/drafter`; each conf/ option sets its
    own sizes. Attention fields apply to transformer and hybrid, SSM fields to mamba2 and hybrid
    (`check_arch`)."""

    arch: Arch = Arch.transformer
    """Model kind: transformer (Llama family) | mamba2 (Mamba2 blocks only) | hybrid (attention at attn_layer_idx);
    a checkpoint must match it."""
    hidden_size: int = 64
    """Model width (d_model); with attention num_heads times an even head dim."""
    num_layers: int = 2
    """Decoder layers (blocks), attention layers of a hybrid included."""
    num_heads: int = 4
    """Attention heads (transformer, and the attention layers of a hybrid)."""
    num_kv_heads: int = 2
    """Key/value heads for grouped-query attention; divides num_heads."""
    intermediate_size: int = 128
    """transformer: SwiGLU hidden size."""
    rope_theta: float = 10000.0
    """RoPE base (a hybrid's attention rotates the whole head dim)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head."""
    d_state: int = 16
    """mamba2/hybrid: SSM state size N per head."""
    d_conv: int = 4
    """mamba2/hybrid: causal depthwise conv1d width; >= 2."""
    expand: int = 2
    """mamba2/hybrid: d_inner = expand * hidden_size."""
    headdim: int = 16
    """mamba2/hybrid: SSM head dim P; divides d_inner (d_inner / headdim SSM heads)."""
    ngroups: int = 1
    """mamba2/hybrid: groups sharing B and C; divides the number of SSM heads."""
    chunk_size: int = 256
    """mamba2/hybrid: SSD chunk length of the causal scan (training, prefill); a verified tree must fit in one chunk."""
    d_intermediate: int = 0
    """mamba2/hybrid: gated-MLP width after every mixer, a multiple of 128 (mamba-ssm's rounding); 0 = no MLP."""
    attn_layer_idx: list[int] = field(default_factory=list)
    """hybrid: indices of the attention layers (distinct, in [0, num_layers), at least one Mamba2 layer left)."""


@dataclass
class ModelConfig(ModelArch):
    """A causal LM: where its weights come from and, for random weights, its architecture (`ModelArch`)."""

    source: ModelSource = ModelSource.checkpoint
    """Where the weights come from."""
    checkpoint: Optional[str] = None
    """Checkpoint directory (source=checkpoint): HF layout, or mamba-ssm's for mamba2/hybrid; relative to the project root."""
    family: Family = Family.llama
    """Architecture family for random weights (checkpoints state their own)."""
    vocab_size: int = 257
    """Vocabulary size (random weights)."""
    seed: int = 0
    """Seed for random weights / drafter noise."""
    noise_std: float = 0.0
    """source=target_copy: noise added to each weight, relative to that weight's std."""
    dtype: DType = DType.float32
    """Compute dtype."""


@dataclass
class TargetConfig:
    name: str = MISSING
    """Readable name used in artifact and output names."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The target model."""
    max_seq_len: Optional[int] = None
    """Context limit: prompt + generated tokens never exceed it (the KV cache is sized from it); None = the
    checkpoint's max_position_embeddings (models without one, random weights and SSMs, need it set)."""
    tokenizer: Optional[str] = None
    """tokenizer.json path or directory; None = the checkpoint's, or the built-in byte-level tokenizer for random weights."""


@dataclass
class PromptLookupConfig:
    min_ngram: int = 1
    """Shortest suffix n-gram to match."""
    max_ngram: int = 3
    """Longest suffix n-gram to match (tried first)."""
    num_pred_tokens: int = 8
    """Continuation length copied after a match (capped by the tree depth)."""


@dataclass
class RetrievalConfig:
    """A retrieval source (ALGORITHMS.md §3, RASD). With `drafter=none` it drafts alone (REST / prompt lookup
    style); with a model drafter its candidate tree is pruned by the draft model's path probabilities and fused
    into the model's tree (longest-prefix trie insertion), verified in one target pass. Retrieved nodes are
    deterministic proposals (δ); a retrieved token equal to a drafted sibling merges into it (it stays drafted)."""

    kind: RetrievalKind = RetrievalKind.none
    """none | context (the request's own text) | datastore (a corpus)."""
    min_ngram: int = 1
    """Shortest context suffix (tokens) to look up."""
    max_ngram: int = 3
    """Longest context suffix to look up (tried first; the first length that matches is used)."""
    cont_len: int = 8
    """Tokens per retrieved continuation: the depth of a retrieval tree."""
    max_candidates: int = 8
    """Continuations per lookup: context = the most recent distinct ones; datastore = the most frequent
    (a trie of at most this many leaves)."""
    max_nodes: int = 8
    """Retrieved nodes (root excluded) a step verifies: the retrieval-only tree's size, or what pruning keeps."""
    num_candidates: int = 24
    """With a model drafter: candidate nodes scored by the draft model before pruning to max_nodes (RASD)."""
    prune: RetrievalPrune = RetrievalPrune.root
    """With a model drafter: how candidates are ranked (root: no forward, the default: on the 2-core CPU it kept
    the same tau as path and ran faster, benchmarks/cpu/rasd_*.md; path: one drafter forward)."""
    skip_model_after: int = 0
    """With a model drafter: a step drafts from retrieval alone when every row's previous step emitted at least
    this many tokens (a long retrieved run is being accepted; the draft model catches up later); 0 = never.
    No consistent gain measured (benchmarks/cpu/rasd_*.md, the -skip3 rows); the choice is per batch: greedy
    output is unchanged, sampled output stays exact in distribution yet may depend on the batch."""
    corpus: list[str] = field(default_factory=list)
    """datastore: files, directories (their .py/.txt/.md files), globs, or .jsonl text corpora (a `text` field,
    or Spec-Bench `turns`), relative to the project root; empty = the project corpus's training files (the
    Python standard library split of training/corpus.py)."""
    cache_dir: str = "artifacts/datastores"
    """datastore: where built stores live, keyed by corpus content hash + tokenizer hash."""
    store: Optional[str] = None
    """datastore: a prebuilt store directory to use as is (corpus and cache_dir unused); refused unless it was
    built with the target's tokenizer."""

    def __post_init__(self):
        for name in ("min_ngram", "cont_len", "max_candidates", "max_nodes", "num_candidates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"retrieval.{name}", "must be >= 1", getattr(self, name))
        if self.max_ngram < self.min_ngram:
            raise ConfigError("retrieval.max_ngram", f"must be >= min_ngram ({self.min_ngram})", self.max_ngram)
        if self.skip_model_after < 0:
            raise ConfigError("retrieval.skip_model_after", "must be >= 0 (0 = never)", self.skip_model_after)


@dataclass
class VocabTrimConfig:
    """VocabTrim (ALGORITHMS.md §6): the draft model's LM head keeps only the `size` tokens the target emits
    most on calibration prompts. Training-free and lossless (a trimmed-away token has draft probability 0,
    so the target's mass on it stays in the residual); it makes every draft forward cheaper."""

    enabled: bool = False
    """Trim the drafter's output head (its input embedding stays whole)."""
    size: int = 4096
    """K: head rows kept, the calibration's most frequent target tokens (+ EOS and `keep`)."""
    prompts: str = "data/prompts/calibration.jsonl"
    """Calibration prompts, Spec-Bench question format (ours: cut from the corpus's TRAINING files)."""
    num_prompts: int = 48
    """How many of them to complete with the target (0 = all)."""
    max_new_tokens: int = 128
    """Target tokens generated per calibration prompt (with the run's sampling settings)."""
    keep: list[str] = field(default_factory=list)
    """Token strings always kept (chat-template and control tokens); the target's EOS ids always are."""
    artifact: Optional[str] = None
    """Calibration file (token counts + the target's identity) to reuse, or to write if missing;
    None = artifacts/vocab_trim/<key>.json."""

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError("drafter.vocab_trim.size", "must be >= 1", self.size)
        if self.num_prompts < 0:
            raise ConfigError("drafter.vocab_trim.num_prompts", "must be >= 0 (0 = all)", self.num_prompts)
        if self.max_new_tokens < 1:
            raise ConfigError("drafter.vocab_trim.max_new_tokens", "must be >= 1", self.max_new_tokens)


@dataclass
class DrafterConfig:
    kind: DrafterKind = DrafterKind.none
    """Which proposer drafts tokens."""
    name: str = "none"
    """Readable name used in output names."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """kind=model: the draft model."""
    temperature: float = 1.0
    """kind=model, sampling mode: temperature of the drafter distribution children are sampled from."""
    prompt_lookup: PromptLookupConfig = field(default_factory=PromptLookupConfig)
    """kind=prompt_lookup settings."""
    vocab_trim: VocabTrimConfig = field(default_factory=VocabTrimConfig)
    """kind=model: trim the draft model's LM head to the target's frequent tokens (VocabTrim)."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError("drafter.temperature", "must be > 0 (it shapes the proposal p)", self.temperature)
        pl = self.prompt_lookup
        if pl.min_ngram < 1:
            raise ConfigError("drafter.prompt_lookup.min_ngram", "must be >= 1", pl.min_ngram)
        if pl.max_ngram < pl.min_ngram:
            raise ConfigError("drafter.prompt_lookup.max_ngram", f"must be >= min_ngram ({pl.min_ngram})",
                              pl.max_ngram)
        if pl.num_pred_tokens < 1:
            raise ConfigError("drafter.prompt_lookup.num_pred_tokens", "must be >= 1", pl.num_pred_tokens)


MAX_BUDGET_NODES = 64
"""tree.max_nodes limit: the Sequoia search is O(n^4) Python steps (about 0.1 s at 16 nodes, 4 s at 32)."""


@dataclass
class TreeConfig:
    policy: TreePolicy = TreePolicy.chain
    """Tree shape policy."""
    k: int = 4
    """policy=chain: number of draft tokens per step (0 = autoregressive)."""
    branching: list[int] = field(default_factory=lambda: [4, 2, 2, 1])
    """policy=static: children per node at each depth; the tree has len(branching) levels."""
    children: ChildSampling = ChildSampling.topk
    """How a node's children are drawn from the drafter (greedy decoding always uses top-k). dynamic / beam at
    temperature > 0: wor (sampled without replacement) or topk (deterministic picks); iid is refused."""
    num_nodes: int = 16
    """policy=dynamic: node budget per tree, the root included (the verify forward's size); >= 2."""
    max_depth: int = 8
    """policy=dynamic: deepest draft node (also capped by each request's remaining tokens); >= 1."""
    threshold: float = 0.0
    """policy=dynamic: stop growing a tree when its best child position's value (an estimate of the path
    probability) is below this, in [0, 1); 0 = the budget alone stops (DySpec picks about 1 / num_nodes)."""
    expand_per_round: int = 4
    """policy=dynamic: most child positions taken per request per drafter forward, >= 1. A round also ends when
    a node made in it could hold the best position, so the tree is DySpec's best-first one whatever this is;
    larger values only save drafter forwards."""
    value_temperature: float = 0.25
    """policy=dynamic with top-k children (greedy decoding, or children=topk): temperature of the drafter
    distribution the heap's path probabilities are computed from, > 0. Greedy verification accepts the
    drafter's top pick far more often than its probability at temperature 1 says; 0.25 measured best of
    {1, 0.5, 0.25} on the local suite (benchmarks/cpu/tree_policies_bench.md). Sampled children always use
    the distribution they are drawn from (drafter.temperature)."""
    beam_width: int = 4
    """policy=beam: beams kept per level (W), >= 1, at most the drafter's vocabulary."""
    beam_depth: int = 5
    """policy=beam: levels (D), >= 1; the tree has at most 1 + W * D nodes."""
    budget: Optional[TreeBudget] = None
    """null: the tree as given (k / branching); auto: chosen at compile (or load) time from measured acceptance
    and latency, among chains (policy=chain, and prompt lookup) or chains, static branchings and Sequoia's
    optimal trees (policy=static), of at most max_nodes nodes. Greedy decoding, model or prompt-lookup drafter."""
    max_nodes: int = 16
    """budget=auto: node budget of the chosen tree, the root included, in [2, 64] (the verify forward's size)."""
    calibration_prompts: str = "data/prompts/calibration.jsonl"
    """budget=auto: Spec-Bench question file whose first turns the target completes to measure acceptance."""
    num_calibration_prompts: int = 16
    """budget=auto: how many of them (0 = all)."""
    calibration_max_new_tokens: int = 64
    """budget=auto: greedy target tokens per calibration prompt (the positions acceptance is measured at)."""

    def __post_init__(self):
        if self.k < 0:
            raise ConfigError("tree.k", "must be >= 0", self.k)
        for key, lo in (("num_nodes", 2), ("max_depth", 1), ("expand_per_round", 1), ("beam_width", 1),
                        ("beam_depth", 1)):
            if getattr(self, key) < lo:
                raise ConfigError(f"tree.{key}", f"must be >= {lo}", getattr(self, key))
        if self.value_temperature <= 0:
            raise ConfigError("tree.value_temperature", "must be > 0", self.value_temperature)
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError("tree.threshold", "must be in [0, 1) (a path probability; 0 = off)", self.threshold)
        if not self.branching:
            raise ConfigError("tree.branching", "must list at least one level", list(self.branching))
        for i, b in enumerate(self.branching):
            if b < 1:
                raise ConfigError(f"tree.branching[{i}]", "every level needs >= 1 child per node", b)
        if not 2 <= self.max_nodes <= MAX_BUDGET_NODES:
            raise ConfigError("tree.max_nodes", f"must be in [2, {MAX_BUDGET_NODES}] (the root and at least one "
                              "draft node; the tree search grows fast with the budget)", self.max_nodes)
        if self.num_calibration_prompts < 0:
            raise ConfigError("tree.num_calibration_prompts", "must be >= 0 (0 = all)", self.num_calibration_prompts)
        if self.calibration_max_new_tokens < 1:
            raise ConfigError("tree.calibration_max_new_tokens", "must be >= 1", self.calibration_max_new_tokens)


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    """Target temperature; 0 = greedy."""
    top_k: int = 0
    """Keep the k most likely target tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of target tokens with mass >= top_p, in (0, 1]."""
    seed: int = 0
    """Seed for drafting and acceptance draws: same seed + config = same output."""
    acceptance: AcceptanceRule = AcceptanceRule.auto
    """Node rule: auto (RRS with each child's true proposal), sample_match, or the biased-unless-matched rrs_draft_probs / rrs_wor."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError("sampling.temperature", "must be >= 0 (0 = greedy)", self.temperature)
        if self.top_k < 0:
            raise ConfigError("sampling.top_k", "must be >= 0 (0 = off)", self.top_k)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("sampling.top_p", "must be in (0, 1]", self.top_p)


@dataclass
class CpuTransformsConfig:
    """CPU fast paths applied at load time (runtime/transforms.py), each on or off; None = the measured
    default (benchmarks/cpu/transforms_bench.md: spec_compiler.plan.CPU_TRANSFORM_DEFAULTS). device=cpu only."""

    fp16_weight_gemm: Optional[bool] = None
    """Linear layers whose weights fp16 holds exactly run fbgemm's fp16-weight GEMM (same map, fp32 sums)."""
    rmsnorm_layernorm: Optional[bool] = None
    """RMSNorm runs as one LayerNorm over [x, -x] (same map to fp32 rounding, one native kernel)."""
    gemv_head: Optional[bool] = None
    """An fp32 LM head that fp16 cannot hold runs as a GEMV against its transposed weight."""


@dataclass
class BackendConfig:
    kind: BackendKind = BackendKind.eager
    """How draft and verify forwards run."""
    device: Device = Device.auto
    """auto = cuda when available, else cpu."""
    cpu_transforms: CpuTransformsConfig = field(default_factory=CpuTransformsConfig)
    """Load-time CPU fast paths (ignored, with a warning when set, on cuda)."""
    kv_window: KVWindow = KVWindow.live
    """Attention window per forward: live (measured faster in CPU eager) or full (static shapes)."""
    verify_head: VerifyHead = VerifyHead.full
    """Where the verify forward runs the LM head: full (every node) or path (only the nodes the walk reaches;
    within noise of full on the 2-core CPU: 0.96x at batch 1, 1.03x at batch 8 with top3,
    benchmarks/cpu/verify_head.md)."""
    attention: AttentionBackend = AttentionBackend.auto
    """Decode-path kernels: auto | sdpa | triton (triton: cuda only). triton runs the attention of the forwards at
    the prefix (verify trees, chunks of a tree bucket's size) through the Triton tree-attention kernel, and a Mamba2
    model's tree forwards through the Triton SSM tree scan; sdpa keeps torch's SDPA and the torch scan."""
    ssm_prefill: SsmPrefill = SsmPrefill.auto
    """SSM prefill-chunk scan: auto | torch | mamba_ssm (mamba_ssm: cuda with mamba-ssm installed)."""


@dataclass
class HardwareConfig:
    """The machine a plan is compiled for; a compile for other hardware than this machine's is refused."""

    kind: HardwareKind = HardwareKind.auto


@dataclass
class CompileConfig:
    """task=compile and backend=compiled: how the artifact is built, found and checked."""

    dir: str = "artifacts"
    """Where artifacts live: <dir>/<plan name>-<plan hash>/ (relative to the project root)."""
    artifact: Optional[str] = None
    """Load this artifact directory instead of the plan's own (checked against the plan like any other)."""
    on_mismatch: OnMismatch = OnMismatch.refuse
    """An artifact for another device, library version, plan or changed checkpoint: refuse (naming what
    differs) or rebuild."""
    backends: list[PhaseBackend] = field(default_factory=lambda: [PhaseBackend.eager, PhaseBackend.aoti])
    """Backends the autotuner chooses from for every phase, the fastest on this device winning (tensorrt only
    where torch_tensorrt imports). Eager is always timed as the reference; without it in the list a phase
    runs eager only when no listed backend compiles it."""
    roles: list[str] = field(default_factory=lambda: ["target", "drafter"])
    """Models whose phases are compiled (target, drafter); the others run eager."""
    batch_sizes: list[int] = field(default_factory=list)
    """Batch sizes to compile phases for (empty = the run's: task.batch_size(s), serving.max_batch_size)."""
    static_tree: Optional[bool] = None
    """One program per tree bucket T (static shapes, for CUDA graphs) instead of T dynamic; None = on cuda."""
    calibration_prompts: str = "data/prompts/calibration.jsonl"
    """Prompts the phases are discovered and timed on (decoded by the eager engine)."""
    num_prompts: int = 2
    max_new_tokens: int = 24
    repeats: int = 20
    """Timed calls per phase and backend (median)."""

    def __post_init__(self):
        for key, lo in (("num_prompts", 1), ("max_new_tokens", 1), ("repeats", 1)):
            if getattr(self, key) < lo:
                raise ConfigError(f"compile.{key}", f"must be >= {lo}", getattr(self, key))
        for i, b in enumerate(self.batch_sizes):
            if b < 1:
                raise ConfigError(f"compile.batch_sizes[{i}]", "must be >= 1", b)
        for i, r in enumerate(self.roles):
            if r not in ("target", "drafter"):
                raise ConfigError(f"compile.roles[{i}]", "must be target or drafter", r)
        if not self.backends:
            raise ConfigError("compile.backends", "must list at least one backend (e.g. [eager, aoti])", [])


@dataclass
class LoadPolicy:
    """One server configuration the load benchmark measures."""

    name: str = MISSING
    """Label in the report (e.g. k2, smartspec)."""
    overrides: list[str] = field(default_factory=list)
    """Hydra overrides applied after the run's own (`drafter=none`, `tree.k=2`, `serving=smartspec`)."""


def _default_policies() -> list[LoadPolicy]:
    return [LoadPolicy("none", ["drafter=none"])]


@dataclass
class LoadTestConfig:
    """task=loadtest: a server per policy on 127.0.0.1 (a free port each, all started before any is measured),
    then per rate and repeat `num_requests` streamed requests with Poisson arrivals to each server in turn, from a
    client in another process; prompts drawn from the run's prompt file."""

    rates: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """Request rates to measure, requests per second."""
    num_requests: int = 32
    """Requests sent at each rate."""
    policies: list[LoadPolicy] = field(default_factory=_default_policies)
    """The server configurations compared side by side (conf/task/loadtest.yaml lists none, k1, k2, k4, smartspec)."""
    warmup: int = 2
    """Untimed requests sent one by one to each fresh server before its first rate."""
    repeats: int = 1
    """Runs of every (rate, policy), interleaved: each repeat sends every policy in turn (rotated order) the same
    arrivals and prompts, drawn afresh per repeat; a row pools the requests of all repeats."""
    seed: int = 0
    """Seeds the arrival times and the prompt order (the same for every policy)."""
    request_timeout_s: float = 600.0
    """A request not finished after this long counts as failed."""

    def __post_init__(self):
        if not self.rates:
            raise ConfigError("task.loadtest.rates", "must list at least one request rate", list(self.rates))
        for i, r in enumerate(self.rates):
            if not r > 0:
                raise ConfigError(f"task.loadtest.rates[{i}]", "must be > 0 (requests per second)", r)
        if self.num_requests < 1:
            raise ConfigError("task.loadtest.num_requests", "must be >= 1", self.num_requests)
        if self.repeats < 1:
            raise ConfigError("task.loadtest.repeats", "must be >= 1", self.repeats)
        if not self.policies:
            raise ConfigError("task.loadtest.policies", "must list at least one policy", [])
        names = [p.name for p in self.policies]
        for i, n in enumerate(names):
            if not n or names.index(n) != i:
                raise ConfigError(f"task.loadtest.policies[{i}].name", "must be non-empty and unique", n)
        if self.warmup < 0:
            raise ConfigError("task.loadtest.warmup", "must be >= 0", self.warmup)
        if not self.request_timeout_s > 0:
            raise ConfigError("task.loadtest.request_timeout_s", "must be > 0", self.request_timeout_s)


@dataclass
class TaskConfig:
    kind: TaskKind = TaskKind.generate
    """What main.py does."""
    max_new_tokens: int = 64
    """Stop after this many new tokens per turn."""
    num_prompts: int = -1
    """Use the first N prompts of the prompt file (-1 = all)."""
    output_dir: str = "."
    """Where answers / bench files go (relative to Hydra's run directory)."""
    warmup: int = 1
    """bench: untimed warm-up generations before timing."""
    repeats: int = 1
    """bench: timed runs of every prompt per method (interleaved); speeds are averaged over all of them."""
    default_prompts: Optional[str] = None
    """Spec-Bench-format prompt file used when neither `prompt` nor `prompts` is set (None = one built-in prompt)."""
    batch_size: int = 1
    """Requests decoded together (cache rows); a finished request's row goes to the next prompt."""
    batch_sizes: list[int] = field(default_factory=list)
    """bench: every batch size to measure in one run, side by side (empty = [batch_size])."""
    resume: bool = False
    """generate: continue an existing answers file, skipping the questions it already answers (without it, an
    existing answers file is refused, never overwritten)."""
    host: str = "127.0.0.1"
    """serve: address to listen on (loopback by default; 0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """serve: TCP port (0 = a free one, printed at start)."""
    api_key: Optional[str] = None
    """serve: clients must send `Authorization: Bearer <api_key>`; None = $SPEC_API_KEY, and no key when unset.
    Prefer the environment variable: a key given here is saved in the run's .hydra/config.yaml."""
    max_body_bytes: int = 1048576
    """serve: largest request body accepted (bigger: 413)."""
    served_model_name: Optional[str] = None
    """serve: the model id /v1/models reports and requests may name; None = the plan's name."""
    loadtest: LoadTestConfig = field(default_factory=LoadTestConfig)
    """task=loadtest settings."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError("task.max_new_tokens", "must be >= 1", self.max_new_tokens)
        if self.num_prompts == 0 or self.num_prompts < -1:
            raise ConfigError("task.num_prompts", "must be -1 (all) or >= 1", self.num_prompts)
        if self.warmup < 0:
            raise ConfigError("task.warmup", "must be >= 0", self.warmup)
        if self.repeats < 1:
            raise ConfigError("task.repeats", "must be >= 1", self.repeats)
        if self.batch_size < 1:
            raise ConfigError("task.batch_size", "must be >= 1", self.batch_size)
        for i, b in enumerate(self.batch_sizes):
            if b < 1:
                raise ConfigError(f"task.batch_sizes[{i}]", "must be >= 1", b)
        if not 0 <= self.port <= 65535:
            raise ConfigError("task.port", "must be in [0, 65535] (0 = a free port)", self.port)
        if self.max_body_bytes < 1024:
            raise ConfigError("task.max_body_bytes", "must be >= 1024", self.max_body_bytes)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("task.api_key", "must not be empty (null = no key, or $SPEC_API_KEY)", "")


@dataclass
class ServingConfig:
    """How the serving scheduler (serve/scheduler.py) batches requests and how far each step speculates."""

    policy: ServingPolicy = ServingPolicy.fixed
    """fixed: a constant speculation length; smartspec: goodput-adaptive per step."""
    k: Optional[int] = None
    """policy=fixed: draft levels verified per step (0 = no speculation; None = the tree's depth)."""
    max_batch_size: int = 8
    """Requests decoded together (cache rows); more wait in the queue."""
    max_queue: int = 64
    """Requests waiting for a row; one more is refused (HTTP 429)."""
    prefill_chunk: int = 128
    """Prompt tokens prefilled per scheduler step, interleaved with decode steps (0 = a whole prompt at once)."""
    max_k: Optional[int] = None
    """policy=smartspec: the longest speculation considered (None = the tree's depth)."""
    alpha_prior: float = 0.7
    """policy=smartspec: acceptance rate assumed before a request has history (the reference code's α0)."""
    prior_steps: float = 2.0
    """policy=smartspec: weight of the prior, in pseudo-observations, in each request's acceptance estimate."""
    no_spec_bias: float = 1.0
    """policy=smartspec: goodput of k = 0 is multiplied by this (the reference code uses 1.1)."""
    profile: Optional[str] = None
    """policy=smartspec: step-latency profile JSON (None = artifacts/profiles/<plan hash>.json, measured on first use)."""
    profile_steps: int = 10
    """policy=smartspec: timed steps per (batch size, k) cell when profiling."""

    def __post_init__(self):
        if self.k is not None and self.k < 0:
            raise ConfigError("serving.k", "must be >= 0 (0 = no speculation) or null (the tree's depth)", self.k)
        if self.max_batch_size < 1:
            raise ConfigError("serving.max_batch_size", "must be >= 1", self.max_batch_size)
        if self.max_queue < 0:
            raise ConfigError("serving.max_queue", "must be >= 0", self.max_queue)
        if self.prefill_chunk < 0:
            raise ConfigError("serving.prefill_chunk", "must be >= 0 (0 = whole prompts)", self.prefill_chunk)
        if self.max_k is not None and self.max_k < 0:
            raise ConfigError("serving.max_k", "must be >= 0 or null (the tree's depth)", self.max_k)
        if not 0.0 <= self.alpha_prior < 1.0:
            raise ConfigError("serving.alpha_prior", "must be in [0, 1)", self.alpha_prior)
        if self.prior_steps <= 0:
            raise ConfigError("serving.prior_steps", "must be > 0", self.prior_steps)
        if self.no_spec_bias <= 0:
            raise ConfigError("serving.no_spec_bias", "must be > 0", self.no_spec_bias)
        if self.profile_steps < 1:
            raise ConfigError("serving.profile_steps", "must be >= 1", self.profile_steps)


def _target_arch() -> ModelArch:
    return ModelArch(hidden_size=256, num_layers=4, intermediate_size=768, d_state=32, headdim=32)


def _drafter_arch() -> ModelArch:
    return ModelArch(hidden_size=128, num_layers=2, intermediate_size=384, d_state=32, headdim=32)


@dataclass
class TrainConfig:
    """task=train: corpus, tokenizer, target pre-training, drafter distillation and export (training/train.py)."""

    out_dir: str = "models/default"
    """Output directory (relative paths are from the project root): target/, drafter/, state/ (resume), cache/."""
    vocab_size: int = 16384
    """Byte-level BPE vocabulary size, <|endoftext|> included; >= 257. A small corpus may yield fewer tokens."""
    seq_len: int = 1024
    """Training window in tokens (random contiguous windows of the joined corpus)."""
    batch_size: int = 4
    """Windows per optimizer step."""
    seed: int = 0
    """Seeds initialization and window sampling: same config + corpus = bitwise the same weights."""
    target: ModelArch = field(default_factory=_target_arch)
    """The target model's architecture."""
    drafter: ModelArch = field(default_factory=_drafter_arch)
    """The drafter's architecture (smaller than the target's)."""
    target_steps: int = 650
    """Optimizer steps of target pre-training (next-token cross-entropy)."""
    drafter_steps: int = 300
    """Optimizer steps of drafter distillation from the frozen target."""
    lr: float = 3e-3
    """Peak AdamW learning rate (both models)."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay; in [0, lr]."""
    warmup_steps: int = 30
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings (not norms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    distill_loss: DistillLoss = DistillLoss.kl
    """Drafter objective against the target's logits."""
    distill_temperature: float = 1.0
    """Softmax temperature applied to both models' logits in the distillation loss; > 0."""
    checkpoint_every: int = 50
    """Save the resumable state (state/<model>.pt) every this many steps, and at the end."""
    threads: int = 2
    """torch.set_num_threads during training."""
    eval_every: int = 325
    """Measure held-out loss every this many steps (and always at the end)."""
    eval_tokens: int = 32768
    """Held-out tokens per evaluation (non-overlapping windows from the start of the held-out stream); >= seq_len."""
    dtype: DType = DType.float16
    """dtype of the exported weights (training is fp32): float32, bfloat16 or float16; float16 keeps the pair
    under the 40 MB budget."""
    heldout_fraction: float = 0.05
    """Fraction of corpus files held out (chosen by a hash of the path); in (0, 1)."""
    max_files: Optional[int] = None
    """Use a fixed, spread-out subset of this many corpus files (smoke runs, tests); None = all."""
    max_position_embeddings: Optional[int] = None
    """Context limit written to config.json; None = seq_len (RoPE was only trained on positions < seq_len)."""

    def __post_init__(self):
        positive = ("vocab_size", "seq_len", "batch_size", "target_steps", "drafter_steps", "checkpoint_every",
                    "threads", "eval_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", "must be >= 1", getattr(self, name))
        if self.vocab_size < 257:
            raise ConfigError("train.vocab_size", "must be >= 257 (256 bytes + <|endoftext|>)", self.vocab_size)
        for name, arch in (("target", self.target), ("drafter", self.drafter)):
            check_arch(f"train.{name}", arch)
        if self.dtype is DType.float64:
            raise ConfigError("train.dtype", "exported weights are float32, bfloat16 or float16", self.dtype.value)
        if self.lr <= 0:
            raise ConfigError("train.lr", "must be > 0", self.lr)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError("train.min_lr", f"must be in [0, lr = {self.lr}]", self.min_lr)
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", "must be >= 0", getattr(self, name))
        if self.distill_temperature <= 0:
            raise ConfigError("train.distill_temperature", "must be > 0", self.distill_temperature)
        if self.eval_tokens < self.seq_len:
            raise ConfigError("train.eval_tokens", f"must be >= seq_len ({self.seq_len})", self.eval_tokens)
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError("train.heldout_fraction", "must be in (0, 1)", self.heldout_fraction)
        if self.max_files is not None and self.max_files < 2:
            raise ConfigError("train.max_files", "must be >= 2 (a train and a held-out file) or null", self.max_files)
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_len:
            raise ConfigError("train.max_position_embeddings", f"must be >= seq_len ({self.seq_len}) or null",
                              self.max_position_embeddings)


def check_arch(key: str, a: ModelArch) -> None:
    """Architecture rules of a ModelArch (a random-weight ModelConfig, or a model to train)."""
    attention = a.arch is not Arch.mamba2
    ssm = a.arch is not Arch.transformer
    positive = ("hidden_size", "num_layers") + (("num_heads", "num_kv_heads") if attention else ()) \
        + (("intermediate_size",) if a.arch is Arch.transformer else ()) \
        + (("d_state", "expand", "headdim", "ngroups", "chunk_size") if ssm else ())
    for name in positive:
        if getattr(a, name) < 1:
            raise ConfigError(f"{key}.{name}", "must be >= 1", getattr(a, name))
    if attention:
        if a.num_heads % a.num_kv_heads:
            raise ConfigError(f"{key}.num_kv_heads", f"must divide num_heads ({a.num_heads})", a.num_kv_heads)
        if a.hidden_size % a.num_heads or (a.hidden_size // a.num_heads) % 2:
            raise ConfigError(f"{key}.hidden_size", f"must be num_heads ({a.num_heads}) times an even head dim",
                              a.hidden_size)
        if a.rope_theta <= 0:
            raise ConfigError(f"{key}.rope_theta", "must be > 0", a.rope_theta)
    if not ssm:
        if a.attn_layer_idx:
            raise ConfigError(f"{key}.attn_layer_idx", "only for arch=hybrid (every transformer layer is attention)",
                              list(a.attn_layer_idx))
        return
    if a.d_conv < 2:
        raise ConfigError(f"{key}.d_conv", "must be >= 2", a.d_conv)
    d_inner = a.expand * a.hidden_size
    if d_inner % a.headdim:
        raise ConfigError(f"{key}.headdim", f"must divide d_inner = expand * hidden_size ({d_inner})", a.headdim)
    if (d_inner // a.headdim) % a.ngroups:
        raise ConfigError(f"{key}.ngroups", f"must divide the number of SSM heads ({d_inner // a.headdim})",
                          a.ngroups)
    if a.d_intermediate < 0 or a.d_intermediate % GATED_MLP_MULTIPLE:
        raise ConfigError(f"{key}.d_intermediate", f"must be 0 (no MLP) or a positive multiple of "
                                                   f"{GATED_MLP_MULTIPLE} (mamba-ssm rounds the width up)",
                          a.d_intermediate)
    layers = list(a.attn_layer_idx)
    if a.arch is Arch.mamba2 and layers:
        raise ConfigError(f"{key}.attn_layer_idx", "a mamba2 model has no attention layers (use arch=hybrid)", layers)
    if a.arch is Arch.hybrid:
        if not layers:
            raise ConfigError(f"{key}.attn_layer_idx", "a hybrid needs at least one attention layer index", layers)
        if any(not 0 <= i < a.num_layers for i in layers) or len(set(layers)) != len(layers):
            raise ConfigError(f"{key}.attn_layer_idx", f"must list distinct layer indices in [0, {a.num_layers})",
                              layers)
        if len(layers) == a.num_layers:
            raise ConfigError(f"{key}.attn_layer_idx", "leaves no Mamba2 layer (use arch=transformer)", layers)


DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@dataclass
class SpecConfig:
    target: TargetConfig = MISSING
    """The model whose output distribution is preserved."""
    drafter: DrafterConfig = MISSING
    """The proposer."""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    """A retrieval source drafting alone (drafter=none) or fused with the model drafter (RASD)."""
    tree: TreeConfig = MISSING
    """Shape of each step's draft tree."""
    sampling: SamplingConfig = MISSING
    """Target sampling and acceptance rule."""
    backend: BackendConfig = MISSING
    """Execution backend."""
    task: TaskConfig = MISSING
    """What to do."""
    train: TrainConfig = MISSING
    """task=train: how the model pair is trained (ignored by the other tasks)."""
    serving: ServingConfig = MISSING
    """task=serve / loadtest: batching limits and the speculation-length policy."""
    hardware: HardwareConfig = MISSING
    """The machine the plan is compiled for (auto = this one)."""
    compile: CompileConfig = field(default_factory=CompileConfig)
    """task=compile / backend=compiled: artifact location, mismatch policy, autotuned backends."""
    prompt: Optional[str] = None
    """A prompt given on the command line (default: a built-in one when `prompts` is unset)."""
    prompt_file: Optional[str] = None
    """A UTF-8 text file whose whole content is one prompt (multi-line prompts)."""
    prompts: Optional[str] = None
    """A Spec-Bench-format question jsonl."""


GROUPS: dict[str, Any] = {
    "target": TargetConfig, "drafter": DrafterConfig, "retrieval": RetrievalConfig, "tree": TreeConfig,
    "sampling": SamplingConfig, "backend": BackendConfig, "task": TaskConfig, "train": TrainConfig,
    "serving": ServingConfig, "hardware": HardwareConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=SpecConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)
