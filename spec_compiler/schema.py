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

from runtime.sampling import AcceptanceRule
from spec_compiler.errors import ConfigError


class ModelSource(str, enum.Enum):
    checkpoint = "checkpoint"
    """Hugging Face directory: config.json + (sharded) safetensors + tokenizer.json."""
    random = "random"
    """Random weights from the architecture fields and `seed` (tests, smoke runs, GPU speed bars)."""
    target_copy = "target_copy"
    """Drafter only: the target's weights plus Gaussian noise of relative size `noise_std`."""


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


class TreePolicy(str, enum.Enum):
    chain = "chain"
    """k draft tokens in a line."""
    static = "static"
    """A fixed tree: every node at depth d has branching[d] children."""


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


class BackendKind(str, enum.Enum):
    eager = "eager"
    """Plain torch on CPU or GPU; the reference backend."""


class TaskKind(str, enum.Enum):
    generate = "generate"
    """Decode the prompts, write answers jsonl, print a summary table."""
    bench = "bench"
    """Run the autoregressive baseline and the configured method on the same prompts; write JSON + markdown."""


@dataclass
class ModelConfig:
    """A causal LM: where its weights come from and, for random weights, its architecture."""

    source: ModelSource = ModelSource.checkpoint
    """Where the weights come from."""
    checkpoint: Optional[str] = None
    """Hugging Face checkpoint directory (source=checkpoint); relative paths are from the project root."""
    family: Family = Family.llama
    """Architecture family for random weights (checkpoints state their own)."""
    vocab_size: int = 257
    """Vocabulary size (random weights)."""
    hidden_size: int = 64
    """Model width (random weights)."""
    num_layers: int = 2
    """Decoder layers (random weights)."""
    num_heads: int = 4
    """Attention heads (random weights)."""
    num_kv_heads: int = 2
    """Key/value heads for grouped-query attention (random weights); divides num_heads."""
    intermediate_size: int = 128
    """SwiGLU hidden size (random weights)."""
    rope_theta: float = 10000.0
    """RoPE base (random weights)."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the LM head (random weights)."""
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
    max_seq_len: int = 1024
    """Context limit: prompt + generated tokens never exceed it (the KV cache is sized from it)."""
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


@dataclass
class TreeConfig:
    policy: TreePolicy = TreePolicy.chain
    """Tree shape policy."""
    k: int = 4
    """policy=chain: number of draft tokens per step (0 = autoregressive)."""
    branching: list[int] = field(default_factory=lambda: [4, 2, 2, 1])
    """policy=static: children per node at each depth; the tree has len(branching) levels."""
    children: ChildSampling = ChildSampling.topk
    """How a node's children are drawn from the drafter (greedy decoding always uses top-k)."""

    def __post_init__(self):
        if self.k < 0:
            raise ConfigError("tree.k", "must be >= 0", self.k)
        if not self.branching:
            raise ConfigError("tree.branching", "must list at least one level", list(self.branching))
        for i, b in enumerate(self.branching):
            if b < 1:
                raise ConfigError(f"tree.branching[{i}]", "every level needs >= 1 child per node", b)


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
class BackendConfig:
    kind: BackendKind = BackendKind.eager
    """How draft and verify forwards run."""
    device: Device = Device.auto
    """auto = cuda when available, else cpu."""


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

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError("task.max_new_tokens", "must be >= 1", self.max_new_tokens)
        if self.num_prompts == 0 or self.num_prompts < -1:
            raise ConfigError("task.num_prompts", "must be -1 (all) or >= 1", self.num_prompts)
        if self.warmup < 0:
            raise ConfigError("task.warmup", "must be >= 0", self.warmup)


DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@dataclass
class SpecConfig:
    target: TargetConfig = MISSING
    """The model whose output distribution is preserved."""
    drafter: DrafterConfig = MISSING
    """The proposer."""
    tree: TreeConfig = MISSING
    """Shape of each step's draft tree."""
    sampling: SamplingConfig = MISSING
    """Target sampling and acceptance rule."""
    backend: BackendConfig = MISSING
    """Execution backend."""
    task: TaskConfig = MISSING
    """What to do."""
    prompt: Optional[str] = None
    """A prompt given on the command line (default: a built-in one when `prompts` is unset)."""
    prompts: Optional[str] = None
    """A Spec-Bench-format question jsonl."""


GROUPS: dict[str, Any] = {
    "target": TargetConfig, "drafter": DrafterConfig, "tree": TreeConfig,
    "sampling": SamplingConfig, "backend": BackendConfig, "task": TaskConfig,
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=SpecConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)
