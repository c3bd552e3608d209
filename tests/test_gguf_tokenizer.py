"""GGUF tokenizers rebuilt through public APIs only: the same ids, text and chat template as
transformers' own GGUF tokenizer, without any of transformers' internals."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest
from helpers import GOLDEN, REFERENCE_SOURCES, files_under

from eesd_jax import gguf_loading, gguf_tokenizer, loading

PROMPTS = [
    "Write a short poem about the sea.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "Übersetze: «Ça va très bien» — 日本語のテキスト, emoji 🤖🌊, 2024-11-29 and 3.14159!",
    "  leading spaces,\ttabs\r\nand Windows lines   ",
    "A literal <|im_start|>user turn and <|im_end|> inside the text.",
]


def assert_same_tokenizer(ours, ref, prompts, chat: bool) -> None:
    """Same ids (raw and in a chat turn), chat-template text, decoding, and special-token ids."""
    for text in prompts:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        if chat:
            turn = [{"role": "user", "content": text}]
            rendered = ours.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            assert rendered == ref.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            assert ours.encode(rendered, add_special_tokens=False) == ref.encode(rendered, add_special_tokens=False)
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    # Not len(): transformers' GPT-2 class adds its own "<|endoftext|>" past the vocabulary when a file lacks it.
    assert ours.vocab_size == ref.vocab_size


def reference_tokenizer(path):
    """transformers' GGUF tokenizer, through its public entry point (needs torch)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _question(name: str, args: tuple, kwargs: dict) -> str:
    return json.dumps([name, args, kwargs], ensure_ascii=False, sort_keys=True)


class Recorder:
    """A tokenizer that answers as `tok` does and records every answer (attributes and method calls)."""

    def __init__(self, tok):
        self.tok = tok
        self.answers = {}

    def __getattr__(self, name):
        value = getattr(self.tok, name)
        if not callable(value):
            self.answers[name] = value
            return value

        def call(*args, **kwargs):
            self.answers[_question(name, args, kwargs)] = answer = value(*args, **kwargs)
            return answer

        return call


class Replay:
    """A tokenizer that gives a Recorder's answers; a question it was not asked fails the test."""

    def __init__(self, answers: dict):
        self.answers = answers

    def _answer(self, question):
        if question not in self.answers:
            pytest.fail(f"not recorded: {question} (regenerate with tests/fixtures/golden/make_golden.py)")
        return self.answers[question]

    def __getattr__(self, name):
        if name.startswith("__"):  # Not a tokenizer question (copy, pickle, ... probe these).
            raise AttributeError(name)
        if name in self.answers:  # An attribute.
            return self.answers[name]
        return lambda *args, **kwargs: self._answer(_question(name, args, kwargs))


# ----------------------------------------------------------------------------- small GGUF files

SP_PIECES = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁abc", "é", "<tool>"]
BL_PIECES = ["a", "b", "Ġ", "Ġa", "ab", "Ġab", "1", "2", "12", "<|eot|>", "<think>"]
TEMPLATE = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"


def write_tokenizer_gguf(path, kind: str = "llama", pre: str | None = None, **edits) -> None:
    """A minimal llama GGUF whose tokenizer is a small sentencepiece ("llama") or byte-level ("gpt2") one.

    edits: GGUF tokenizer fields to override ("tokens", "types", "scores", "merges", ...); None drops one.
    """
    import gguf

    if kind == "llama":  # <unk> <s> </s>, the 256 byte-fallback tokens, then pieces scored best-first.
        tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SP_PIECES]
        types = [2, 3, 3, *[6] * 256, *[1] * (len(SP_PIECES) - 1), 4]
        fields = {"scores": [0.0] * 259 + [-float(i) for i in range(len(SP_PIECES))]}
    else:  # Every byte, spelled in GPT-2's alphabet, then pieces with their merges.
        alphabet = list(gguf_tokenizer.byte_alphabet().values())
        tokens = ["<|end|>", "<s>", *alphabet, *(p for p in BL_PIECES if p not in alphabet)]
        types = [3, 3, *[1] * (len(tokens) - 4), 3, 4]
        fields = {"merges": ["Ġ a", "a b", "Ġa b", "1 2"]}
    fields.update(tokens=tokens, types=types, bos=1, eos=len(tokens) - 2 if kind == "gpt2" else 2, unk=0)
    fields.update(edits)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (w.add_context_length, 64),
        (w.add_embedding_length, 8),
        (w.add_block_count, 1),
        (w.add_feed_forward_length, 16),
        (w.add_head_count, 2),
        (w.add_head_count_kv, 2),
        (w.add_layer_norm_rms_eps, 1e-5),
        (w.add_tokenizer_model, kind),
        (w.add_tokenizer_pre, pre),
        (w.add_token_list, fields["tokens"]),
        (w.add_token_types, fields["types"]),
        (w.add_token_scores, fields.get("scores")),
        (w.add_token_merges, fields.get("merges")),
        (w.add_bos_token_id, fields["bos"]),
        (w.add_eos_token_id, fields["eos"]),
        (w.add_unk_token_id, fields["unk"]),
        (w.add_chat_template, TEMPLATE),
    ]:
        if value is not None:
            add(value)
    w.add_tensor("token_embd.weight", np.zeros((len(fields["tokens"]), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


SMALL_PROMPTS = [
    "abc ab a",
    "1212 x1212",
    " abc",
    "ab<tool>c é ü 日 🤖",
    "  two  spaces",
    "a\nb",
    "a12 112<think>b<|eot|>",
]


SMALL_TOKENIZERS = [("llama", None), ("gpt2", None), ("gpt2", "llama-bpe"), ("gpt2", "smollm")]
SMALL_GOLDEN = GOLDEN / "small_tokenizers.json"


@pytest.mark.parametrize("source", REFERENCE_SOURCES)
@pytest.mark.parametrize(("kind", "pre"), SMALL_TOKENIZERS)
def test_small_gguf_tokenizer_matches_transformers(tmp_path, cache_dir, kind, pre, source):
    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, kind, pre)
    if source == "live":
        ref = reference_tokenizer(path)
    else:
        case = json.loads(SMALL_GOLDEN.read_text("utf-8"))["cases"][f"{kind}-{pre}"]
        assert loading.sha256_file(path) == case["gguf_sha256"], "the recorded GGUF differs: regenerate the fixture"
        ref = Replay(case["answers"])
    assert_same_tokenizer(loading.load_tokenizer(str(path)), ref, SMALL_PROMPTS, chat=True)


def test_no_transformers_internals(tmp_path, cache_dir, monkeypatch):
    """Built with transformers' GGUF integration unimportable (another version may not have it)."""
    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf", None)
    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, "llama")
    tok = loading.load_tokenizer(str(path))
    assert tok.encode("abc") == [1, tok.convert_tokens_to_ids("▁abc")]  # BOS: llama.cpp's default for sentencepiece.
    assert tok.eos_token == "</s>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>[user] hi</s>"


def test_tokenizer_is_cached(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, "gpt2")
    first = loading.load_tokenizer(str(path))
    (cached,) = files_under(cache_dir)
    assert cached.name == f"{loading.sha256_file(path)}.v{gguf_loading.TOKENIZER_CACHE_FORMAT}.json"
    loading.load_tokenizer.cache_clear()
    monkeypatch.setattr(gguf_tokenizer, "build", lambda meta: pytest.fail("rebuilt instead of read from the cache"))
    second = loading.load_tokenizer(str(path))
    assert second.encode(SMALL_PROMPTS[-1]) == first.encode(SMALL_PROMPTS[-1])
    assert second.chat_template == first.chat_template
    assert files_under(cache_dir) == [cached]


@pytest.mark.parametrize(
    ("kind", "pre", "edits", "message"),
    [
        ("bert", None, {}, r"tokenizer\.ggml\.model 'bert' is not supported"),
        ("gpt2", "deepseek-coder", {}, r"pre-tokenizer 'deepseek-coder' is not supported"),
        ("gpt2", None, {"merges": None}, r"byte-level vocabulary without tokenizer\.ggml\.merges"),
        ("llama", None, {"scores": None}, r"without merges or one score per token"),
        ("llama", None, {"types": [1, 1]}, r"2 token types for 270 tokens"),
        ("llama", None, {"eos": 5000}, r"eos_token_id 5000 is outside the vocabulary"),
    ],
)
def test_refuses_unsupported_tokenizer_metadata(tmp_path, cache_dir, kind, pre, edits, message):
    path = tmp_path / "tok.gguf"
    write_tokenizer_gguf(path, kind, pre, **edits)
    with pytest.raises(loading.CheckpointError, match=rf"^{path}: .*{message}"):
        loading.load_tokenizer(str(path))
    assert files_under(cache_dir) == []


# ----------------------------------------------------------------------------- the bundled model


GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "smollm2_tokenizer.json"


@pytest.mark.real_model
@pytest.mark.slow
def test_bundled_tokenizer_matches_recorded_transformers(cache_dir):
    """transformers' GGUF tokenizer as recorded by fixtures/make_tokenizer_golden.py: no torch, any transformers."""
    golden = json.loads(GOLDEN.read_text("utf-8"))
    path = loading.bundled_model_path()
    assert loading.sha256_file(path) == golden["gguf_sha256"]
    ours = loading.load_tokenizer(str(path))
    assert [case["text"] for case in golden["cases"]] == PROMPTS
    for case in golden["cases"]:
        assert ours.encode(case["text"]) == case["ids"]
        assert ours.decode(case["ids"], skip_special_tokens=True) == case["decoded"]
        turn = [{"role": "user", "content": case["text"]}]
        assert ours.apply_chat_template(turn, add_generation_prompt=True, tokenize=False) == case["chat_text"]
        assert ours.encode(case["chat_text"], add_special_tokens=False) == case["chat_ids"]
    assert {name: getattr(ours, name) for name in golden["special_ids"]} == golden["special_ids"]


# The live comparisons hold for transformers >= 5.24 (constraints.txt); older GGUF converters differ
# (5.17 adds no BOS to sentencepiece text and takes <|im_start|> for SmolLM2's EOS).
@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.torch
def test_bundled_tokenizer_matches_transformers(cache_dir):
    path = loading.bundled_model_path()
    ours = loading.load_tokenizer(str(path))
    assert_same_tokenizer(ours, reference_tokenizer(path), PROMPTS, chat=True)
    assert ours.eos_token == "<|im_end|>"
