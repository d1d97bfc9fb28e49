"""The stdlib corpus: exclusions, a deterministic by-file split that depends on the path alone, a stable hash."""
import pytest

from training.corpus import EXCLUDED_DIRS, build_corpus, is_heldout, source_files, stdlib_root


@pytest.fixture(scope="module")
def stdlib():
    return build_corpus()


def test_split_is_deterministic_disjoint_and_follows_the_path_hash(stdlib):
    again = build_corpus()
    assert again == stdlib
    assert set(stdlib.train).isdisjoint(stdlib.heldout)
    assert sorted(stdlib.train + stdlib.heldout) == source_files(stdlib_root())
    assert list(stdlib.train) == sorted(stdlib.train) and list(stdlib.heldout) == sorted(stdlib.heldout)
    assert all(is_heldout(r, 0.05) for r in stdlib.heldout)
    assert not any(is_heldout(r, 0.05) for r in stdlib.train)
    n = len(stdlib.files)
    assert n > 300 and 0.01 < len(stdlib.heldout) / n < 0.12, (n, len(stdlib.heldout))


def test_exclusions(stdlib):
    for rel in stdlib.files:
        parts = rel.split("/")
        assert rel.endswith(".py") and not EXCLUDED_DIRS & set(parts[:-1]), rel
    assert "os.py" in stdlib.files
    assert not any(r.startswith(("idlelib/", "lib2to3/tests/", "test/")) for r in stdlib.files)


def test_hash_stable_and_sensitive(tmp_path):
    (tmp_path / "a.py").write_bytes(b"x = 1\r\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    return 'h\u00e9'\n")
    for skipped in ("test", "tests", "idlelib", "__pycache__", "site-packages"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "c.py").write_text("y = 2\n")
    (tmp_path / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8
    (tmp_path / "notes.txt").write_text("not python\n")

    c = build_corpus(0.5, root=tmp_path)
    assert c.files == ("a.py", "pkg/b.py")
    assert c.text("a.py") == "x = 1\r\n"  # exact bytes, no newline translation
    assert build_corpus(0.5, root=tmp_path).content_hash == c.content_hash

    (tmp_path / "a.py").write_bytes(b"x = 2\r\n")  # one byte
    changed = build_corpus(0.5, root=tmp_path)
    assert changed.content_hash != c.content_hash
    resplit = build_corpus(0.9999, root=tmp_path)  # same files, another split: another key for cached tokens
    assert resplit.heldout != changed.heldout and resplit.content_hash != changed.content_hash


def test_max_files_subset_is_spread_and_stable():
    a = build_corpus(0.15, max_files=24)
    assert a == build_corpus(0.15, max_files=24)
    assert len(a.files) == 24 and a.train and a.heldout
    assert len({r.split("/")[0] for r in a.files}) > 10  # not just the first files in sorted order
