"""Byte-level BPE tokenizer trained on the corpus's training files (`tokenizers`, GPT-2 style).

The 256 byte symbols are always in the vocabulary (`initial_alphabet`), so any text encodes and
`decode(encode(x).ids, skip_special_tokens=False) == x` exactly; no normalizer, no prefix space.
`<|endoftext|>` is the only special token (id 0, the trainer adds specials first). Held-out files are
never seen, so held-out loss measures the models, not a tokenizer fitted to the test text.
"""
from __future__ import annotations

import hashlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from training.corpus import EOT, Corpus


def train_tokenizer(corpus: Corpus, vocab_size: int = 16384) -> Tokenizer:
    """A byte-level BPE with at most `vocab_size` tokens (special token included), deterministic in the corpus."""
    assert vocab_size >= 257, vocab_size  # 256 bytes + <|endoftext|>
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus.text(rel) for rel in corpus.train), trainer=trainer, length=len(corpus.train))
    assert tok.token_to_id(EOT) is not None
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 hex of the tokenizer's canonical JSON (what `tokenizer.json` holds)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()
