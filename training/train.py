"""`python main.py task=train`: train the target, distill the drafter, export both as checkpoint directories.

Steps, each cached or resumable under `train.out_dir`:
  1. corpus (corpus.py) and tokenizer (bpe.py): `cache/tokenizer-<key>.json`, keyed by corpus hash + vocab size;
  2. token streams, tokenized once: `cache/tokens-<corpus>-<tokenizer>.pt` (documents joined by <|endoftext|>);
  3. the target: next-token cross-entropy on random contiguous windows, AdamW, warm-up + cosine, grad clip;
  4. the drafter: KL(target || drafter) or TVD against the frozen target's logits on the same kind of windows;
  5. export: `target/` and `drafter/` with config.json, the weights (train.dtype), tokenizer.json,
     generation_config.json and manifest.json (sha256 + size of each file, command, corpus, losses, machine).

Each model is any `train.<model>.arch`: transformer (LlamaModel, exported as HF LlamaForCausalLM:
model.safetensors), mamba2 (Mamba2LMModel; without an MLP exported as HF Mamba2ForCausalLM:
model.safetensors) or hybrid (Mamba2 + attention; exported in mamba-ssm's MambaLMHeadModel layout:
pytorch_model.bin, as is a mamba2 with d_intermediate > 0). Both model classes train through their
cache-free forward `model(x, positions)`, which is causal over the window.

Resuming: every `checkpoint_every` steps and at the end, `state/<model>.pt` holds the model, optimizer,
scheduler and window-sampler generator. A rerun continues from it and ends with bitwise the same weights
as an uninterrupted run; a state written under a different config (its run key) is refused, naming the file.
Everything is seeded by `train.seed`, so the same config and corpus give the same weights.

Shape legend: B batch_size, T seq_len, V vocab, N tokens in a stream.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from runtime.load import DTYPES
from runtime.models.checkpoint import save_llama
from runtime.models.llama import LlamaModel
from runtime.models.mamba2 import Mamba2LMModel
from runtime.models.mamba_checkpoint import save_hf_mamba2, save_mamba_ssm
from spec_compiler.arch import LlamaConfig, Mamba2Config
from spec_compiler.checkpoint import MANIFEST, sha256_file
from spec_compiler.errors import CheckpointError, ConfigError
from spec_compiler.schema import Arch, DistillLoss, DType, ModelArch, TrainConfig
from spec_compiler.validate import resolve_path
from training.bpe import train_tokenizer
from training.corpus import EOT, Corpus, build_corpus

MODELS = ("target", "drafter")
STATE_VERSION = 1
"""Bump when the state file layout or the training arithmetic changes (old states are then refused)."""
RECENT = 50
"""The reported train loss is the mean over the last this many steps."""
INIT_STD = 0.02
LLAMA_ARCH_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "rope_theta",
                   "tie_word_embeddings")
"""The ModelArch fields a transformer's run key hashes (those it had before SSM archs: old states stay valid)."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
"""Weight files an export may hold; those of another layout are removed when a directory is re-exported."""

Model = nn.Module
"""LlamaModel or Mamba2LMModel: both take (input_ids, position_ids) and return [B, T, V] fp32 logits."""
ModelConfigT = LlamaConfig | Mamba2Config


@dataclass(frozen=True)
class TokenData:
    train: Tensor
    """[N_train] int32: the training files' tokens, each document followed by <|endoftext|>."""
    heldout: Tensor
    """[N_heldout] int32: the held-out files' tokens, same layout."""
    eot_id: int
    """Id of <|endoftext|>."""


@dataclass
class Progress:
    """What a state file records besides the tensors; `run_key` ties it to one config."""

    run_key: str
    """run_keys()[model]: hash of everything that determines this model's weights."""
    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Training tokens consumed (step * batch_size * seq_len)."""
    wall_time_s: float = 0.0
    """Training and evaluation time up to the last save, summed over resumed runs."""
    recent_losses: list[float] = field(default_factory=list)
    """Training losses of the last RECENT steps."""
    evals: list[dict[str, float]] = field(default_factory=list)
    """One dict per evaluation: step, heldout_loss (and distillation metrics for the drafter)."""


# ---- entry point -----------------------------------------------------------------------------------

def run_train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Train (or resume) and export the pair; returns {"target": manifest, "drafter": manifest}."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    _keep_freed_memory(True)
    try:
        return _run(cfg, command)
    finally:
        _keep_freed_memory(False)
        torch.set_num_threads(threads_before)


def _run(cfg: TrainConfig, command: str) -> dict[str, Any]:
    out = resolve_path(cfg.out_dir)
    cache = out / "cache"
    corpus = build_corpus(cfg.heldout_fraction, max_files=cfg.max_files)
    if not corpus.train or not corpus.heldout:
        raise ConfigError("train.heldout_fraction", f"leaves {len(corpus.train)} train and {len(corpus.heldout)} "
                                                    f"held-out files; both must be non-empty", cfg.heldout_fraction)
    tok_file = tokenizer_file(corpus, cfg.vocab_size, cache)
    tok = Tokenizer.from_file(str(tok_file))
    tok_hash = sha256_file(tok_file)
    data = token_data(corpus, tok, tok_hash, cache)
    if data.train.numel() <= cfg.seq_len or data.heldout.numel() <= cfg.seq_len:
        raise ConfigError("train.seq_len", f"longer than the token streams (train {data.train.numel()}, "
                                           f"held-out {data.heldout.numel()} tokens)", cfg.seq_len)
    print(f"corpus {corpus.content_hash[:12]}: {len(corpus.train)} train / {len(corpus.heldout)} held-out files, "
          f"{data.train.numel():,} / {data.heldout.numel():,} tokens; vocab {tok.get_vocab_size()}", file=sys.stderr)

    keys = run_keys(cfg, corpus.content_hash, tok_hash)
    target_config = model_config(cfg.target, cfg, tok.get_vocab_size(), data.eot_id)
    drafter_config = model_config(cfg.drafter, cfg, tok.get_vocab_size(), data.eot_id)
    target, target_progress = train_model("target", target_config, cfg.target_steps, cfg, data,
                                          out / "state" / "target.pt", keys["target"], seed=cfg.seed)
    target.eval().requires_grad_(False)
    drafter, drafter_progress = train_model("drafter", drafter_config, cfg.drafter_steps, cfg, data,
                                            out / "state" / "drafter.pt", keys["drafter"], seed=cfg.seed + 1,
                                            teacher=target)

    common = {
        "command": command,
        "corpus": {"content_hash": corpus.content_hash, "num_train_files": len(corpus.train),
                   "num_heldout_files": len(corpus.heldout), "num_train_tokens": data.train.numel(),
                   "num_heldout_tokens": data.heldout.numel(), "python": sys.version},
        "tokenizer_sha256": tok_hash,
        "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                    "threads": cfg.threads},
        "train_config": config_dict(cfg),
    }
    manifests = {}
    for name, model, progress, steps in (("target", target, target_progress, cfg.target_steps),
                                         ("drafter", drafter, drafter_progress, cfg.drafter_steps)):
        manifests[name] = export(model, out / name, tok_file, data.eot_id, cfg.dtype, {
            "model": name, "run_key": progress.run_key, "steps": steps, **common,
            **summary(progress, "cross_entropy" if name == "target" else f"distill_{cfg.distill_loss.value}"),
        })
        print(f"{name}: {out / name}  train loss {manifests[name]['train_loss']:.4f}  "
              f"held-out loss {manifests[name]['heldout_loss']:.4f} nats/token", file=sys.stderr)
    return manifests


# ---- corpus -> tokens --------------------------------------------------------------------------------

def tokenizer_file(corpus: Corpus, vocab_size: int, cache: Path) -> Path:
    """cache/tokenizer-<key>.json, trained on the corpus's train files unless already there."""
    key = hashlib.sha256(f"{corpus.content_hash}:{vocab_size}".encode()).hexdigest()[:16]
    file = cache / f"tokenizer-{key}.json"
    if not file.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tok = train_tokenizer(corpus, vocab_size)
        _atomic_write(file, tok.to_str(pretty=True).encode())
        print(f"tokenizer: trained in {time.perf_counter() - t0:.1f} s -> {file}", file=sys.stderr)
    return file


def token_data(corpus: Corpus, tok: Tokenizer, tok_hash: str, cache: Path) -> TokenData:
    """Both splits tokenized (cached in cache/tokens-<corpus>-<tokenizer>.pt)."""
    eot = tok.token_to_id(EOT)
    assert eot is not None, "the tokenizer lacks <|endoftext|>"
    file = cache / f"tokens-{corpus.content_hash[:16]}-{tok_hash[:16]}.pt"
    if file.is_file():
        try:
            d = torch.load(file, weights_only=True)
            return TokenData(train=d["train"], heldout=d["heldout"], eot_id=eot)
        except Exception:  # a torn cache file is just recomputed
            pass
    d = {"train": _stream(corpus, corpus.train, tok, eot), "heldout": _stream(corpus, corpus.heldout, tok, eot)}
    cache.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(d, file)
    return TokenData(train=d["train"], heldout=d["heldout"], eot_id=eot)


def _stream(corpus: Corpus, files: tuple[str, ...], tok: Tokenizer, eot: int) -> Tensor:
    # -> [N] int32: doc_0 <eot> doc_1 <eot> ...
    ids: list[int] = []
    for enc in tok.encode_batch([corpus.text(rel) for rel in files], add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)


def sample_windows(stream: Tensor, batch: int, seq_len: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """`batch` random contiguous windows: inputs and next-token targets, both [B, T] int64."""
    # stream: [N]
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=g)  # [B]
    w = stream[starts[:, None] + torch.arange(seq_len + 1)].long()  # [B, T + 1]
    return w[:, :-1], w[:, 1:]


def eval_windows(stream: Tensor, seq_len: int, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows from the start of `stream`, at most `max_tokens` tokens: [n, T] inputs, targets."""
    n = min(max_tokens // seq_len, (stream.numel() - 1) // seq_len)
    x = stream[:n * seq_len].long().view(n, seq_len)
    y = stream[1:n * seq_len + 1].long().view(n, seq_len)
    return x, y


# ---- models, optimizer, schedule ---------------------------------------------------------------------

def model_config(arch: ModelArch, cfg: TrainConfig, vocab_size: int, eot_id: int) -> ModelConfigT:
    """The LlamaConfig (arch=transformer) or Mamba2Config (mamba2, hybrid) of one model to train."""
    if arch.arch is Arch.transformer:
        return llama_config(arch, cfg, vocab_size, eot_id)
    return mamba2_config(arch, vocab_size, eot_id)


def llama_config(arch: ModelArch, cfg: TrainConfig, vocab_size: int, eot_id: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=arch.hidden_size, num_layers=arch.num_layers,
                       num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                       intermediate_size=arch.intermediate_size, rope_theta=arch.rope_theta,
                       tie_word_embeddings=arch.tie_word_embeddings,
                       max_position_embeddings=cfg.max_position_embeddings or cfg.seq_len,
                       eos_token_ids=(eot_id,), family="llama")


def mamba2_config(arch: ModelArch, vocab_size: int, eot_id: int) -> Mamba2Config:
    """mamba-ssm defaults elsewhere (RMSNorm eps 1e-5, gated norm, conv bias, attention biases); a hybrid's
    attention rotates the whole head dim with base rope_theta."""
    attn = {}
    if arch.arch is Arch.hybrid:
        head_dim = arch.hidden_size // arch.num_heads
        attn = dict(attn_num_heads=arch.num_heads, attn_num_heads_kv=arch.num_kv_heads, attn_head_dim=head_dim,
                    attn_rotary_dim=head_dim, attn_rotary_base=arch.rope_theta)
    return Mamba2Config(vocab_size=vocab_size, d_model=arch.hidden_size, n_layer=arch.num_layers,
                        d_state=arch.d_state, d_conv=arch.d_conv, expand=arch.expand, headdim=arch.headdim,
                        ngroups=arch.ngroups, chunk_size=arch.chunk_size, d_intermediate=arch.d_intermediate,
                        attn_layer_idx=tuple(arch.attn_layer_idx), **attn,
                        tie_embeddings=arch.tie_word_embeddings, eos_token_ids=(eot_id,))


def init_for_training(config: ModelConfigT, seed: int) -> Model:
    if isinstance(config, Mamba2Config):
        return init_mamba2_for_training(config, seed)
    return init_llama_for_training(config, seed)


@torch.no_grad()
def init_llama_for_training(config: LlamaConfig, seed: int) -> LlamaModel:
    """GPT-2 style init: N(0, 0.02) weights, residual output projections scaled by 1/sqrt(2 L), unit norms."""
    g = torch.Generator().manual_seed(seed)
    model = LlamaModel(config)
    for name, p in model.named_parameters():  # a tied head is listed once, as the embedding
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            residual_out = name.endswith("attention.wo.weight") or name.endswith("feed_forward.w2.weight")
            std = INIT_STD / math.sqrt(2 * config.num_layers) if residual_out else INIT_STD
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@torch.no_grad()
def init_mamba2_for_training(config: Mamba2Config, seed: int) -> Mamba2LMModel:
    """mamba-ssm's init (`Mamba2.__init__`, `mixer_seq_simple._init_weights`) in the GPT-2 style of the Llama
    trainer: A = -uniform(1, 16); dt = log-uniform in [1e-3, 1e-1] stored as inverse softplus in dt_bias; D = 1;
    conv1d as torch's default (uniform +-1/sqrt(d_conv)); unit norms, zero linear biases; N(0, 0.02) embedding and
    linear weights, residual output projections (mixer.out_proj, mlp.fc2) scaled by 1/sqrt(residual branches)."""
    g = torch.Generator().manual_seed(seed)
    model = Mamba2LMModel(config)
    residuals = config.n_layer * (2 if config.d_intermediate else 1)

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    for name, p in model.named_parameters():  # a tied head is listed once, as the embedding
        if name.endswith("A_log"):
            p.copy_(torch.log(uniform(p.shape, 1.0, 16.0)))
        elif name.endswith("dt_bias"):
            dt = torch.exp(uniform(p.shape, math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif name.endswith("mixer.D"):
            p.fill_(1.0)
        elif "conv1d" in name:
            bound = 1.0 / math.sqrt(config.d_conv)
            p.copy_(uniform(p.shape, -bound, bound))
        elif "norm" in name:  # block, gated-mixer and final RMSNorm weights
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            residual_out = name.endswith("mixer.out_proj.weight") or name.endswith("mlp.fc2.weight")
            std = INIT_STD / math.sqrt(residuals) if residual_out else INIT_STD
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then cosine from 1 down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: Model, cfg: TrainConfig, steps: int):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, partial(lr_factor, warmup=cfg.warmup_steps, total=steps, floor=cfg.min_lr / cfg.lr))
    return opt, sched


# ---- losses ------------------------------------------------------------------------------------------

def distill_loss(student: Tensor, teacher: Tensor, kind: DistillLoss, temperature: float) -> Tensor:
    """Mean over tokens of KL(teacher || student) * temperature² or of TVD(teacher, student)."""
    # student, teacher: [B, T, V] logits
    log_q = F.log_softmax(student.flatten(0, 1) / temperature, dim=-1)  # [B*T, V]
    log_p = F.log_softmax(teacher.flatten(0, 1) / temperature, dim=-1)  # [B*T, V]
    if kind is DistillLoss.kl:
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature ** 2
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1).mean()


def positions(x: Tensor) -> Tensor:
    B, T = x.shape
    return torch.arange(T).expand(B, T)  # [B, T]


@torch.no_grad()
def evaluate(model: Model, data: TokenData, cfg: TrainConfig, teacher: Optional[Model] = None
             ) -> dict[str, float]:
    """Held-out cross-entropy (nats/token); with a teacher also the distillation loss and top-1 agreement."""
    was_training = model.training
    model.eval()
    xs, ys = eval_windows(data.heldout, cfg.seq_len, cfg.eval_tokens)  # [n, T]
    ce = dist = agree = 0.0
    for x, y in zip(xs.split(cfg.batch_size), ys.split(cfg.batch_size)):
        logits = model(x, positions(x))  # [b, T, V]
        ce += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        if teacher is not None:
            t_logits = teacher(x, positions(x))
            dist += distill_loss(logits, t_logits, cfg.distill_loss, cfg.distill_temperature).item() * y.numel()
            agree += (logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
    model.train(was_training)
    n = ys.numel()
    out = {"heldout_loss": ce / n}
    if teacher is not None:
        out |= {"heldout_distill_loss": dist / n, "heldout_top1_agreement": agree / n}
    return out


# ---- the training loop -------------------------------------------------------------------------------

def train_model(name: str, config: ModelConfigT, steps: int, cfg: TrainConfig, data: TokenData, state_file: Path,
                run_key: str, seed: int, teacher: Optional[Model] = None) -> tuple[Model, Progress]:
    """Train one model to `steps`, resuming from `state_file` when it holds this run's state."""
    model = init_for_training(config, seed)
    opt, sched = make_optimizer(model, cfg, steps)
    g = torch.Generator().manual_seed(seed)
    progress = Progress(run_key=run_key)
    if state_file.is_file():
        progress = load_state(state_file, run_key, model, opt, sched, g)
    model.train()

    bar = tqdm(total=steps, initial=progress.step, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0)
    t_last_save, step_time, tokens_run = time.perf_counter(), 0.0, 0
    while progress.step < steps:
        t_step = time.perf_counter()
        x, y = sample_windows(data.train, cfg.batch_size, cfg.seq_len, g)  # [B, T]
        logits = model(x, positions(x))  # [B, T, V]
        if teacher is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            with torch.no_grad():
                t_logits = teacher(x, positions(x))  # [B, T, V]
            loss = distill_loss(logits, t_logits, cfg.distill_loss, cfg.distill_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()

        progress.step += 1
        progress.tokens_seen += x.numel()
        progress.recent_losses = (progress.recent_losses + [loss.item()])[-RECENT:]
        tokens_run += x.numel()
        step_time += time.perf_counter() - t_step  # tokens/s leaves evaluation and saving out
        bar.update(1)
        shown = progress.recent_losses[-10:]  # single-step losses swing by +-1 nat between windows
        bar.set_postfix(loss=f"{sum(shown) / len(shown):.3f}", tok_s=f"{tokens_run / step_time:.0f}",
                        lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
        done = progress.step == steps
        if progress.step % cfg.eval_every == 0 or done:
            metrics = evaluate(model, data, cfg, teacher)
            progress.evals.append({"step": progress.step, **metrics})
            bar.write(f"{name} step {progress.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                      file=sys.stderr)
        if progress.step % cfg.checkpoint_every == 0 or done:
            progress.wall_time_s += time.perf_counter() - t_last_save
            t_last_save = time.perf_counter()
            save_state(state_file, model, opt, sched, g, progress)
    bar.close()
    return model.eval(), progress


def save_state(file: Path, model: Model, opt, sched, g: torch.Generator, progress: Progress) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save({"version": STATE_VERSION, "progress": dataclasses.asdict(progress),
                        "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "generator": g.get_state()}, file)


def load_state(file: Path, run_key: str, model: Model, opt, sched, g: torch.Generator) -> Progress:
    """Restore everything a state file holds into the given objects; refuse another run's state."""
    try:
        s = torch.load(file, weights_only=True)
        version, progress = s["version"], Progress(**s["progress"])
    except Exception as e:  # unpickling and key errors alike mean the file is unusable
        raise CheckpointError(str(file), f"unreadable training state ({type(e).__name__}); delete it to restart") \
            from None
    if version != STATE_VERSION or progress.run_key != run_key:
        raise CheckpointError(str(file), "written by a different training config, corpus or tokenizer "
                                         f"(run key {progress.run_key[:12]}, this run {run_key[:12]}); "
                                         "delete it to restart or use another train.out_dir")
    model.load_state_dict(s["model"])
    opt.load_state_dict(s["optimizer"])
    sched.load_state_dict(s["scheduler"])
    g.set_state(s["generator"])
    return progress


def run_keys(cfg: TrainConfig, corpus_hash: str, tok_hash: str) -> dict[str, str]:
    """Per-model hash of everything that determines its weights (not out_dir, threads, eval or checkpoint cadence).

    The drafter's key includes the target's, so a retrained target invalidates the drafter state.
    """
    d = config_dict(cfg)
    shared = {k: d[k] for k in ("vocab_size", "seq_len", "batch_size", "seed", "lr", "min_lr", "warmup_steps",
                                "weight_decay", "grad_clip", "heldout_fraction", "max_files")}
    target = {"version": STATE_VERSION, "corpus": corpus_hash, "tokenizer": tok_hash, **shared,
              "arch": _arch_key(d["target"]), "steps": cfg.target_steps}
    target_key = _hash_json(target)
    drafter = {"target": target_key, **shared, "arch": _arch_key(d["drafter"]), "steps": cfg.drafter_steps,
               "distill_loss": d["distill_loss"], "distill_temperature": cfg.distill_temperature}
    return {"target": target_key, "drafter": _hash_json(drafter)}


def _arch_key(arch: dict[str, Any]) -> dict[str, Any]:
    """What of one model's ModelArch goes into its run key: a transformer's Llama fields only (so states
    written before the SSM fields existed still resume), every field for mamba2 and hybrid."""
    if arch["arch"] == Arch.transformer.value:
        return {k: arch[k] for k in LLAMA_ARCH_KEYS}
    return arch


def summary(progress: Progress, loss_kind: str) -> dict[str, Any]:
    last = progress.evals[-1]
    return {"train_loss_kind": loss_kind, "train_loss": sum(progress.recent_losses) / len(progress.recent_losses),
            **last, "evals": progress.evals, "tokens_seen": progress.tokens_seen,
            "wall_time_s": round(progress.wall_time_s, 1)}


# ---- export ------------------------------------------------------------------------------------------

def export_layout(model: Model) -> tuple[str, str]:
    """(layout, weights file) an export of `model` uses: HF Llama, HF Mamba2 (pure Mamba2 blocks, no MLP),
    else mamba-ssm's MambaLMHeadModel layout."""
    if isinstance(model, LlamaModel):
        return "hf_llama", "model.safetensors"
    c = model.config
    if not c.is_hybrid and not c.d_intermediate:
        return "hf_mamba2", "model.safetensors"
    return "mamba_ssm", "pytorch_model.bin"


def export(model: Model, d: Path, tok_file: Path, eot_id: int, dtype: DType,
           info: dict[str, Any]) -> dict[str, Any]:
    """Write a checkpoint directory plus manifest.json (written last, so a torn export has none).

    LlamaModel: HF LlamaForCausalLM; Mamba2LMModel: HF Mamba2ForCausalLM or mamba-ssm (`export_layout`)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / MANIFEST).unlink(missing_ok=True)
    layout, weights = export_layout(model)
    for stale in WEIGHT_FILES:  # another layout's weights from an earlier export into the same directory
        if stale != weights:
            (d / stale).unlink(missing_ok=True)
    save = {"hf_llama": save_llama, "hf_mamba2": save_hf_mamba2, "mamba_ssm": save_mamba_ssm}[layout]
    save(copy.deepcopy(model).to(DTYPES[dtype.value]), d)
    shutil.copyfile(tok_file, d / "tokenizer.json")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": None, "eos_token_id": eot_id}, indent=2)
                                              + "\n")
    names = ("config.json", weights, "tokenizer.json", "generation_config.json")
    arch = "transformer" if isinstance(model, LlamaModel) else ("hybrid" if model.config.is_hybrid else "mamba2")
    manifest = {"files": {n: {"sha256": sha256_file(d / n), "size": (d / n).stat().st_size} for n in names},
                "dtype": dtype.value, "arch": arch, "layout": layout, **info}
    _atomic_write(d / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


# ---- helpers -----------------------------------------------------------------------------------------

def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=lambda e: e.value))


def _hash_json(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _keep_freed_memory(on: bool) -> None:
    """glibc only: serve big blocks from the heap and keep freed memory (on), or restore the defaults (off).

    Each step allocates and frees several [B, T, V] fp32 tensors (268 MB at the default sizes). By default
    glibc maps each one fresh and unmaps it on free, so the kernel zero-fills every page again: measured
    0.7-1.0 s of system time per 2-3 s target step on the 2-core machine, gone with this setting.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0 if on else 65536)
    libc.mallopt(m_trim_threshold, (1 << 30) if on else 128 * 1024)


def _atomic_write(file: Path, data: bytes) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def _atomic_torch_save(obj: Any, file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, file)
