"""Tokenizers: a checkpoint's `tokenizer.json`, or the built-in byte-level one for models built from config.

Validation compares a drafter's vocabulary with the target's through here; the runtime encodes and decodes
with the same objects (the `tokenizers` library, no torch).

The built-in tokenizer is a `tokenizers` byte-level BPE with no merges: ids 0-255 are the bytes in
GPT-2's byte-to-unicode order and id 256 is `<|endoftext|>` (so a 257-token model covers any text).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from spec_compiler.checkpoint import checkpoint_dir, verify_manifest
from spec_compiler.errors import CheckpointError

EOT = "<|endoftext|>"


def byte_level_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _gpt2_byte_chars()
    assert set(byte_chars) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def _gpt2_byte_chars() -> list[str]:
    """Printable stand-in for each byte value 0..255 (GPT-2's bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def get_tokenizer(path: Optional[str]) -> Tokenizer:
    """`path`: a tokenizer.json file or a directory holding one; None = the built-in byte-level tokenizer."""
    if path is None:
        return byte_level_tokenizer()
    p = Path(path)
    return load_tokenizer(p) if p.is_dir() else load_tokenizer_file(p)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The `tokenizer.json` of a checkpoint directory (checked against its manifest.json, if any)."""
    d = checkpoint_dir(path)
    verify_manifest(d, ["tokenizer.json"])
    return load_tokenizer_file(d / "tokenizer.json")


def load_tokenizer_file(file: Path) -> Tokenizer:
    if not file.is_file():
        raise CheckpointError(str(file), "file not found")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises bare Exception subclasses for malformed files
        raise CheckpointError(str(file), f"not a valid tokenizers file ({e})") from None
