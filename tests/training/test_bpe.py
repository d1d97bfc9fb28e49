"""The byte-level BPE: exact round trip on any text, <|endoftext|> as one special id, deterministic, train-only."""
import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from training.bpe import tokenizer_hash, train_tokenizer
from training.corpus import EOT, build_corpus, is_heldout


@pytest.fixture(scope="module")
def small():
    corpus = build_corpus(0.15, max_files=12)
    return corpus, train_tokenizer(corpus, vocab_size=600)


def roundtrip(tok, text):
    return tok.decode(tok.encode(text).ids, skip_special_tokens=False)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_any_text(small, text):
    _, tok = small
    assert roundtrip(tok, text) == text


@pytest.mark.parametrize("text", ["", " ", "  x\n\n\t\r\n", "def f(x):\n    return x  # h\u00e9llo\n",
                                  "\u65e5\u672c\u8a9e \U0001f389 \x00\x7f", f"a{EOT}b", "   leading spaces"])
def test_round_trip_examples(small, text):
    _, tok = small
    assert roundtrip(tok, text) == text


def test_special_token(small):
    corpus, tok = small
    assert tok.token_to_id(EOT) == 0
    assert tok.encode(f"x{EOT}y").ids.count(0) == 1
    assert tok.get_vocab_size() == 600
    text = corpus.text(corpus.train[0])
    assert len(tok.encode(text).ids) < len(text.encode()) / 1.5  # merges were learned


def test_deterministic(small):
    corpus, tok = small
    assert tokenizer_hash(train_tokenizer(corpus, vocab_size=600)) == tokenizer_hash(tok)


def test_trained_on_train_files_only(tmp_path):
    held = next(f"h{i}.py" for i in range(100) if is_heldout(f"h{i}.py", 0.5))
    train = [f"t{i}.py" for i in range(100) if not is_heldout(f"t{i}.py", 0.5)][:3]
    for name in train:
        (tmp_path / name).write_text("def function(argument):\n    return argument\n" * 20)
    (tmp_path / held).write_text("zqxv" * 500)
    corpus = build_corpus(0.5, root=tmp_path)
    assert corpus.heldout == (held,)
    tok = train_tokenizer(corpus, vocab_size=300)
    assert len(tok.encode("argument").ids) == 1
    assert len(tok.encode("zqxv").ids) == 4
