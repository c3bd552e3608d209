"""The tokenizer embedded in a GGUF file, rebuilt with the `tokenizers` library's public API.

A GGUF file has no tokenizer.json: llama.cpp stores the vocabulary, the merges (or, for
sentencepiece vocabularies, per-token scores), the token types, the special-token ids and the
chat template as metadata. `build` turns that metadata into a `tokenizers.Tokenizer` built the
way transformers' GGUF loader builds it (so ids match; tests/test_gguf_tokenizer.py checks that),
plus the special tokens and chat template a wrapper needs. No transformers internals are used,
so the result does not depend on which transformers is installed.

Supported: `tokenizer.ggml.model` "gpt2" (byte-level BPE: LLaMA-3, SmolLM, ...) and "llama"
(sentencepiece BPE with byte fallback: LLaMA-2, Mistral, ...). Anything else is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

# llama.cpp token types (gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# Pre-tokenizer regexes for the byte-level `tokenizer.ggml.pre` types of llama-architecture files
# whose split differs from GPT-2's (as in llama.cpp and transformers).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS: dict[str, str | None] = {
    # None: GPT-2's own split (ByteLevel's built-in regex).
    "default": None,
    "gpt2": None,
    # SmolLM's digits-one-by-one split equals GPT-2's on its vocabulary (no multi-digit token or digit merge).
    "smollm": None,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "tekken": _TEKKEN_SPLIT,
}


class TokenizerMetadataError(ValueError):
    """The GGUF tokenizer metadata is missing, inconsistent or of an unsupported kind."""


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (byte-level vocabularies are written in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:  # Unprintable bytes map to code points past 255, in byte order.
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Sentencepiece files carry scores, not merges: every split of a token into two vocabulary
    tokens is a merge, ranked by the merged token's score (transformers' `generate_merges`)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [
            (token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _merges(lines: list[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merge lines ("left right") as pairs, each of two tokens whose concatenation is a token too
    (tokenizers would otherwise fail, or abort the process on a line without a space)."""
    merges = []
    for i, line in enumerate(lines):
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not all(p in vocab for p in pair) or "".join(pair) not in vocab:
            raise TokenizerMetadataError(
                f"tokenizer.ggml.merges[{i}] = {line!r} is not a merge of two vocabulary tokens"
            )
        merges.append(pair)
    return merges


def _byte_level(meta: Mapping[str, Any], tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SPLITS:
        raise TokenizerMetadataError(
            f"byte-level pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(SPLITS))})"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise TokenizerMetadataError("byte-level vocabulary without tokenizer.ggml.merges")
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # A few converters store some tokens as raw text: respell them in the byte alphabet.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    merges = _merges(meta["tokenizer.ggml.merges"], vocab)
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix=""))
    split = SPLITS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    return tok, alphabet


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _merges(meta["tokenizer.ggml.merges"], vocab)
    elif len(meta.get("tokenizer.ggml.scores") or ()) == len(tokens):
        merges = _merges_from_scores(tokens, meta["tokenizer.ggml.scores"])
    else:
        raise TokenizerMetadataError("sentencepiece vocabulary without merges or one score per token")
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return tok, None


BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def build(meta: Mapping[str, Any]):
    """(tokenizers.Tokenizer, wrapper config) from GGUF metadata (key -> str, number or list).

    The config holds bos/eos/unk/pad_token (strings or None), chat_template (or None) and
    add_bos_token / add_eos_token (already applied by the tokenizer's post-processor).
    """
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind not in BUILDERS:
        raise TokenizerMetadataError(
            f"tokenizer.ggml.model {kind!r} is not supported (supported: {', '.join(sorted(BUILDERS))})"
        )
    for key, kind_of in [("tokens", str), ("merges", str), ("scores", (int, float)), ("token_type", int)]:
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is not None and not (isinstance(values, list) and all(isinstance(v, kind_of) for v in values)):
            raise TokenizerMetadataError(
                f"tokenizer.ggml.{key} is not a list of {getattr(kind_of, '__name__', 'numbers')}"
            )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerMetadataError("tokenizer.ggml.tokens is missing or empty")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerMetadataError(f"{len(types)} token types for {len(tokens)} tokens")
    tok, alphabet = BUILDERS[kind](meta, tokens)

    config: dict[str, Any] = {"chat_template": meta.get("tokenizer.chat_template")}
    for name in ("bos", "eos", "unk", "pad"):
        key = "unknown" if name == "unk" else "padding" if name == "pad" else name
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < len(tokens)):
            raise TokenizerMetadataError(f"tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary")
        config[f"{name}_token"] = None if token_id is None else tokens[token_id]

    # Control tokens (and the named special tokens) stay whole and are skipped when decoding with
    # skip_special_tokens; user-defined ones stay whole but are text. In a byte-level vocabulary a
    # "control" token spelled outside the byte alphabet is a converter's mislabel: left out.
    named = {config[f"{n}_token"] for n in ("bos", "eos", "unk", "pad")} - {None}
    special = [
        t
        for t, ty in zip(tokens, types)
        if ty == CONTROL and (alphabet is None or set(t) <= alphabet) or (t in named and ty != USER_DEFINED)
    ]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    tok.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    )

    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    config.update(add_bos_token=bool(add_bos), add_eos_token=bool(add_eos))
    edges = [(config["bos_token"], add_bos), (config["eos_token"], add_eos)]
    missing = [name for name, (t, wanted) in zip(("BOS", "EOS"), edges) if wanted and t is None]
    if missing:
        raise TokenizerMetadataError(f"the file asks to add {' and '.join(missing)} but names no such token")
    if add_bos or add_eos:
        pre = [config["bos_token"]] if add_bos else []
        post = [config["eos_token"]] if add_eos else []
        single = " ".join([*pre, "$A", *post])
        pair = " ".join([*pre, "$A", *post, *pre, "$B:1", *post])
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in {*pre, *post}]
        )
    return tok, config
