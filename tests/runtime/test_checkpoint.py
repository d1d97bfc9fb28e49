"""HF checkpoint loading/saving: logits equal transformers' (eager, fp32), and typed errors for bad files."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from runtime.models.checkpoint import load_llama, save_llama
from runtime.models.llama import LlamaConfig, init_random
from spec_compiler.checkpoint import config_from_hf, read_eos_ids
from spec_compiler.errors import CheckpointError
from spec_compiler.tokenizer import load_tokenizer

transformers.logging.set_verbosity_error()

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager")
LLAMA3 = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16}, rope_theta=500000.0)
HF_CASES = {
    "llama": ("Llama", {}),
    "llama-llama3-tied": ("Llama", dict(**LLAMA3, tie_word_embeddings=True)),
    "llama-bias-headdim32": ("Llama", dict(attention_bias=True, head_dim=32)),
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True, sliding_window=None)),
    "mistral": ("Mistral", dict(sliding_window=None)),
}


def hf_model(kind, extra, seed=0):
    config = getattr(transformers, f"{kind}Config")(**{**SMALL, **extra})
    torch.manual_seed(seed)
    m = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # O(1) logits, non-trivial norms and biases, so the comparison means something
        for name, p in m.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape) / p.shape[1] ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn(p.shape))
    return m


def our_logits(model, ids):
    B, T = ids.shape
    with torch.no_grad():
        return model(ids, torch.arange(T).expand(B, T), model.new_cache(B, T), 0)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", HF_CASES)
def test_matches_transformers(case, tmp_path):
    kind, extra = HF_CASES[case]
    hf = hf_model(kind, extra)
    hf.save_pretrained(tmp_path)
    ours = load_llama(tmp_path)
    assert ours.config.family == kind.lower()
    assert ours.config.tie_word_embeddings == extra.get("tie_word_embeddings", False)
    torch.testing.assert_close(our_logits(ours, IDS), hf_logits(hf, IDS), atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads_identically(tmp_path):
    hf = hf_model("Llama", LLAMA3)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "many", max_shard_size="40KB")
    assert (tmp_path / "many/model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 2
    a, b = load_llama(tmp_path / "one"), load_llama(tmp_path / "many")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    torch.testing.assert_close(our_logits(b, IDS), hf_logits(hf, IDS), atol=1e-5, rtol=0)


TINY = LlamaConfig(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                   max_position_embeddings=128, eos_token_ids=(2,), bos_token_id=1)


@pytest.mark.parametrize("config", [
    TINY,
    LlamaConfig(**{**TINY.to_dict(), "rope_scaling": LLAMA3["rope_scaling"], "rope_theta": 500000.0,
                   "tie_word_embeddings": True, "attention_bias": True, "head_dim": 8}),
    LlamaConfig(**{**TINY.to_dict(), "family": "qwen2", "attention_bias": True, "eos_token_ids": (3, 4)}),
    LlamaConfig(**{**TINY.to_dict(), "family": "mistral"}),
], ids=["llama", "llama3-tied-bias", "qwen2", "mistral"])
def test_save_llama_roundtrips_through_transformers(config, tmp_path):
    ours = init_random(config, seed=3)
    save_llama(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(hf, IDS), our_logits(ours, IDS), atol=1e-5, rtol=0)
    back = load_llama(tmp_path)
    assert back.config == config
    torch.testing.assert_close(our_logits(back, IDS), our_logits(ours, IDS), atol=0, rtol=0)
    assert read_eos_ids(tmp_path) == list(config.eos_token_ids)


def test_bf16_load(tmp_path):
    save_llama(init_random(TINY, seed=0), tmp_path)
    m32, m16 = load_llama(tmp_path), load_llama(tmp_path, dtype=torch.bfloat16)
    assert m16.tok_embeddings.weight.dtype == torch.bfloat16 and m16.inv_freq.dtype == torch.float32
    torch.testing.assert_close(our_logits(m16, IDS), our_logits(m32, IDS), atol=0.3, rtol=0.1)


def test_legacy_and_v5_rope_layouts_agree():
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    scaling = dict(LLAMA3["rope_scaling"])
    legacy = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {**scaling, "type": "llama3"}})
    v5 = config_from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert legacy == v5 and legacy.rope_theta == 500000.0 and dict(legacy.rope_scaling)["factor"] == 8.0
    assert config_from_hf({**base, "rope_scaling": None}).rope_scaling is None
    assert config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}).rope_scaling is None


# ---- errors: each is a CheckpointError naming the offending file ----

@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    save_llama(init_random(TINY, seed=0), d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "DELETE"}))


def expect_error(d, file):
    with pytest.raises(CheckpointError) as e:
        load_llama(d)
    assert file in e.value.where, (e.value.where, str(e.value))
    return e.value


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    expect_error(ckpt, "config.json")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert "JSON" in expect_error(ckpt, "config.json").reason


@pytest.mark.parametrize("changes", [
    dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
    dict(architectures=["LlamaForSequenceClassification"]),
])
def test_unsupported_architecture(ckpt, changes):
    edit_config(ckpt, **changes)
    assert "architecture" in expect_error(ckpt, "config.json").reason


@pytest.mark.parametrize("changes", [
    dict(hidden_size="DELETE"),
    dict(num_hidden_layers="two"),
    dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
    dict(hidden_act="gelu"),
    dict(num_key_value_heads=3),
], ids=["missing-key", "bad-type", "rope-yarn", "llama3-incomplete", "gelu", "kv-heads"])
def test_bad_config_values(ckpt, changes):
    edit_config(ckpt, **changes)
    expect_error(ckpt, "config.json")


@pytest.mark.parametrize("family, changes, ok", [
    ("mistral", dict(sliding_window=4096, max_position_embeddings=32768), False),
    ("mistral", dict(sliding_window=None), True),
    ("mistral", dict(sliding_window=4096, max_position_embeddings=4096), True),
    ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=0), False),
    ("qwen2", dict(use_sliding_window=False, sliding_window=64), True),
])
def test_sliding_window(tmp_path, family, changes, ok):
    save_llama(init_random(LlamaConfig(**{**TINY.to_dict(), "family": family, "attention_bias": family == "qwen2"}),
                           seed=0), tmp_path)
    edit_config(tmp_path, **changes)
    if ok:
        load_llama(tmp_path)
    else:
        assert "sliding" in expect_error(tmp_path, "config.json").reason


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    expect_error(ckpt, "model.safetensors")


def test_corrupt_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect_error(ckpt, "model.safetensors")
    f.write_bytes(b"\x00" * 64)
    expect_error(ckpt, "model.safetensors")


def test_missing_tensor(ckpt):
    w = load_file(ckpt / "model.safetensors")
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, ckpt / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in expect_error(ckpt, "model.safetensors").reason


def test_wrong_shape(ckpt):
    w = load_file(ckpt / "model.safetensors")
    w["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(w, ckpt / "model.safetensors")
    assert "model.layers.0.self_attn.k_proj.weight" in expect_error(ckpt, "model.safetensors").reason


@pytest.fixture
def sharded(tmp_path):
    hf_model("Llama", {}).save_pretrained(tmp_path, max_shard_size="40KB")
    return tmp_path


def test_missing_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded / shard).unlink()
    expect_error(sharded, shard)


def test_tensor_listed_in_index_missing_from_shard(sharded):
    shard = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    w = load_file(sharded / shard)
    del w["model.norm.weight"]
    save_file(w, sharded / shard)
    assert "model.norm.weight" in expect_error(sharded, shard).reason


def test_tensor_in_no_shard(sharded):
    f = sharded / "model.safetensors.index.json"
    index = json.loads(f.read_text())
    shard = index["weight_map"].pop("model.norm.weight")
    f.write_text(json.dumps(index))
    w = load_file(sharded / shard)
    del w["model.norm.weight"]
    save_file(w, sharded / shard)
    assert "model.norm.weight" in expect_error(sharded, "model.safetensors.index.json").reason


def test_corrupt_index(sharded):
    (sharded / "model.safetensors.index.json").write_text("[")
    expect_error(sharded, "model.safetensors.index.json")


# ---- tokenizer and EOS ids ----

def test_tokenizer(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in e.value.where
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("a").ids == [0]
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in e.value.where


def test_read_eos_ids(ckpt):
    assert read_eos_ids(ckpt) == [2]
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert read_eos_ids(ckpt) == [7, 9]
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert read_eos_ids(ckpt) == [5]
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(CheckpointError) as e:
        read_eos_ids(ckpt)
    assert "generation_config.json" in e.value.where
    (ckpt / "generation_config.json").write_text("{")
    with pytest.raises(CheckpointError) as e:
        read_eos_ids(ckpt)
    assert "generation_config.json" in e.value.where
