"""Text corpora for teacher-forced distillation (eesd_jax/corpus.py)."""

from __future__ import annotations

import pytest

from eesd_jax import corpus


def test_folder_corpus_order_suffixes_and_fingerprint(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("print(1)\n")
    (tmp_path / "a.md").write_text("# A\n")
    (tmp_path / "c.txt").write_text("   \n")  # Blank: no document.
    (tmp_path / "d.json").write_text("{}")  # Not a text suffix.
    docs = corpus.load_corpus(str(tmp_path))
    assert [(d.id, d.text) for d in docs] == [
        (f"{tmp_path.name}/a.md", "# A\n"),
        (f"{tmp_path.name}/b/z.py", "print(1)\n"),
    ]
    assert [d.id for d in corpus.load_corpus(str(tmp_path / "a.md"))] == ["a.md"]

    before = corpus.fingerprint(docs)
    (tmp_path / "a.md").write_text("# B\n")
    assert corpus.fingerprint(corpus.load_corpus(str(tmp_path))) != before


def test_bad_corpora_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown text corpus 'nope'"):
        corpus.load_corpus("nope")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        corpus.load_corpus(str(tmp_path))
    (tmp_path / "bad.txt").unlink()
    with pytest.raises(ValueError, match="has no documents"):
        corpus.load_corpus(str(tmp_path))


def test_package_readmes_exclude_this_package():
    docs = corpus.load_corpus("readmes")
    ids = [d.id for d in docs]
    assert ids == sorted(set(ids)) and "readmes/eesd_jax" not in ids and "readmes/eesd-jax" not in ids
    assert "readmes/numpy" in ids and all(len(d.text) >= corpus.MIN_CHARS for d in docs)


def test_chunk():
    assert corpus.chunk(list(range(10)), 4, min_len=2) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert corpus.chunk(list(range(9)), 4, min_len=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
