"""Text corpora for teacher-forced distillation: text the LLM did not write, scored by it.

One forward pass of the frozen LLM over existing text gives its distribution at every
position, several times cheaper per token than sampling responses and then scoring them
(distill_data.teacher_pass either way). Corpora by name:

  * "readmes": the long descriptions (READMEs) in the metadata of the installed Python
    distributions, eesd_jax's own excluded: markdown prose with code, the register of an
    instruct model's answers (~283k SmolLM2 tokens in the `make test` environment). Never
    the Python standard library: some evaluation prompts are built from it.
  * a path: a text file, or a folder whose *.txt / *.md / *.py files (sorted, recursive)
    are the documents.

A corpus is identified by the sha256 of its documents (distill_data reuses data only if it matches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import pathlib

CORPORA = ("readmes",)
TEXT_SUFFIXES = (".txt", ".md", ".py")
MIN_CHARS = 500  # Shorter READMEs are mostly a title and a link.
MIN_TOKENS = 32  # A document's last piece, if shorter, is dropped: too little context to learn from.


@dataclasses.dataclass(frozen=True)
class Document:
    id: str  # Stable within its corpus, e.g. "readmes/numpy".
    text: str


def _package_readmes() -> list[Document]:
    docs = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name or name.replace("-", "_").lower() == "eesd_jax":
            continue
        # Metadata 2.1+ keeps the description in the payload; older in a header.
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if len(text.strip()) >= MIN_CHARS:
            docs[f"readmes/{name.lower()}"] = text.strip()  # A name installed twice counts once.
    return [Document(k, docs[k]) for k in sorted(docs)]


def _files(path: pathlib.Path) -> list[Document]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if text.strip():
            docs.append(Document(f.name if f == path else f"{path.name}/{f.relative_to(path)}", text))
    return docs


def load_corpus(source: str) -> list[Document]:
    """The documents of a named corpus (CORPORA) or a path, in a fixed order."""
    if source == "readmes":
        docs = _package_readmes()
    elif pathlib.Path(source).exists():
        docs = _files(pathlib.Path(source))
    else:
        raise ValueError(f"unknown text corpus {source!r}: expected one of {CORPORA} or an existing path")
    if not docs:
        raise ValueError(f"text corpus {source!r} has no documents")
    return docs


def fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()


def chunk(token_ids: list[int], seq_len: int, min_len: int = MIN_TOKENS) -> list[list[int]]:
    """A document's tokens cut into pieces of seq_len (the last kept if >= min_len tokens)."""
    pieces = [token_ids[i : i + seq_len] for i in range(0, len(token_ids), seq_len)]
    return [p for p in pieces if len(p) >= min_len]
