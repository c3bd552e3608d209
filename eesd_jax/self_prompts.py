"""Self-made training prompts (Magpie): the LLM writes user requests from its own chat template.

Given only the chat template's text before a user's message, an aligned chat model continues
with a plausible user request and ends the turn. Sampled at T = 1 in batches, the requests are
filtered (finished turn, length, repetition, language) and deduplicated, until n are kept. The
same (model, n, seed) always gives the same prompts. Sets of them are named "self:N" or
"self:N@SEED" in data.sets (distill_data.prompt_list); every 5th is held out, as for "chat".
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable

from eesd_jax import generate, prompts
from eesd_jax.sampling import SamplingConfig

_MARK = "\x00USER\x00"  # Stands for the user's text when the template is rendered.
_made: dict[tuple, list[prompts.Prompt]] = {}  # (fingerprint, n, seed) -> prompts, made once per process.


def parse_set(source: str) -> tuple[int, int] | None:
    """(n, seed) of a "self:N" / "self:N@SEED" set name, None for other names."""
    m = re.fullmatch(r"self:(\d+)(?:@(\d+))?", source)
    if source.startswith("self:") and not m:
        raise ValueError(f"bad self-made prompt set {source!r}: expected self:N or self:N@SEED")
    return (int(m[1]), int(m[2] or 0)) if m else None


def template_prefix(lm) -> tuple[list[int], tuple[int, ...]]:
    """Token ids of the chat template before a user's text, and the ids that end the user's turn."""
    from eesd_jax.teacher import ByteTokenizer

    tok = lm.tokenizer
    if isinstance(tok, ByteTokenizer):  # Tiny random models: a toy template.
        return tok.encode("User: "), tuple(lm.eos_ids)
    if not getattr(tok, "chat_template", None):
        raise ValueError("self-made prompts need a tokenizer with a chat template")
    text = tok.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=False)
    before, after = text.split(_MARK)
    end = tok.encode(after, add_special_tokens=False)[:1]  # The end-of-turn token (e.g. <|im_end|>).
    return tok.encode(before, add_special_tokens=False), tuple(dict.fromkeys([*end, *lm.eos_ids]))


def acceptable(text: str, min_chars: int = 12, max_chars: int = 600) -> bool:
    """A usable request: length in range, mostly ASCII letters (English), words not repeating."""
    if not min_chars <= len(text) <= max_chars:
        return False
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.95 * len(letters):
        return False
    words = text.lower().split()
    if len(words) < 3 or len(set(words)) < 0.5 * len(words):
        return False
    trigrams = collections.Counter(zip(words, words[1:], words[2:]))
    return not trigrams or max(trigrams.values()) <= 2


def _key(text: str) -> str:
    """Requests equal up to case, spacing and punctuation are duplicates."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def make_prompts(
    lm,
    n: int,
    seed: int = 0,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    temperature: float = 1.0,
    keep: Callable[[str], bool] = acceptable,
    max_batches: int | None = None,
) -> list[prompts.Prompt]:
    """n distinct requests sampled from the template prefix (ValueError if max_batches cannot make them)."""
    if n < 1:
        raise ValueError(f"self-made prompt count must be >= 1, got {n}")
    ident = (lm.fingerprint, n, seed, max_new_tokens, batch_size, temperature, keep)
    if ident in _made:
        return _made[ident]
    prefix, stop = template_prefix(lm)
    decode = lm.tokenizer.decode
    texts, seen = [], set()
    max_batches = max_batches or 8 * (1 + n // batch_size)
    for b in range(max_batches):
        gen = generate.generate_ar(
            lm.cfg,
            lm.params,
            [prefix] * batch_size,
            max_new_tokens,
            SamplingConfig(temperature=temperature),
            eos_ids=stop,
            seed=seed * 1_000_003 + b,
        )
        for toks in gen.tokens:
            if not toks or toks[-1] not in stop:  # Cut off by the length limit: not a finished request.
                continue
            text = decode(toks[:-1]).strip()
            if keep(text) and _key(text) not in seen:
                seen.add(_key(text))
                texts.append(text)
        if len(texts) >= n:
            break
    if len(texts) < n:
        raise ValueError(f"only {len(texts)} of {n} self-made prompts passed the filters in {max_batches} batches")
    every = prompts.HELDOUT_EVERY
    made = [prompts.Prompt(f"self/{i}", t, True, i % every == every - 1) for i, t in enumerate(texts[:n])]
    _made[ident] = made
    return made
