"""Prompt files: JSONL, ShareGPT JSON (multi-turn context), parquet / datasets folders, refusals."""

from __future__ import annotations

import importlib.util
import json

import pytest

from eesd_jax import cli, engine, prompts

HAS_ARROW = importlib.util.find_spec("pyarrow") is not None

SHAREGPT = [
    {
        "id": "a",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Name a river."},
            {"from": "gpt", "value": "The Nile."},
            {"from": "human", "value": "How long is it?"},
        ],
    },
    {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
]


def test_sharegpt_json_gives_every_user_turn_with_earlier_turns_as_context(tmp_path):
    path = tmp_path / "talks.json"
    path.write_text(json.dumps(SHAREGPT))
    got = prompts.load_prompts(str(path))
    assert [(p.id, p.text, p.chat) for p in got] == [
        ("talks/0.0", "Name a river.", True),
        ("talks/0.1", "How long is it?", True),
        ("talks/1.0", "Hi", True),
    ]
    assert got[0].context == (("system", "Be brief."),)
    assert got[1].context == (("system", "Be brief."), ("user", "Name a river."), ("assistant", "The Nile."))
    assert got[2].context == ()


def test_a_conversations_turns_share_its_split(tmp_path):
    talks = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": f"r{i}"},
            ]
        }
        for i in range(10)
    ]
    path = tmp_path / "talks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in talks))
    held = prompts.load_prompts(str(path), "heldout")
    assert [p.text for p in held] == ["q4", "r4", "q9", "r9"]
    assert len(prompts.load_prompts(str(path), "train")) == 16


class ChatTokenizer:
    """Renders the chat turns as JSON and encodes characters: what encode() passed is readable back."""

    chat_template = "json"

    def apply_chat_template(self, turns, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return json.dumps(turns)

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_encode_puts_the_context_before_the_user_turn(tmp_path):
    path = tmp_path / "talks.json"
    path.write_text(json.dumps(SHAREGPT))
    p = prompts.load_prompts(str(path))[1]
    ids = prompts.encode(ChatTokenizer(), p.text, p.chat, p.context)
    assert json.loads("".join(map(chr, ids))) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Nile."},
        {"role": "user", "content": "How long is it?"},
    ]
    with pytest.raises(ValueError, match="earlier turns needs the chat template"):
        prompts.encode(ChatTokenizer(), p.text, False, p.context)


def test_the_distillation_teacher_encodes_the_context(tmp_path):
    from eesd_jax import teacher

    path = tmp_path / "talks.json"
    path.write_text(json.dumps(SHAREGPT))
    p = prompts.load_prompts(str(path))[1]
    lm = teacher.LM(None, {}, "fp", "name", ChatTokenizer(), ())
    assert (
        lm.encode(p)
        == prompts.encode(ChatTokenizer(), p.text, True, p.context)
        != prompts.encode(ChatTokenizer(), p.text, True)
    )


def test_bench_encodes_a_sharegpt_files_context(tmp_path, monkeypatch):
    """eesd bench --prompts talks.json: every user turn, encoded after its conversation's earlier turns."""
    path = tmp_path / "talks.json"
    path.write_text(json.dumps(SHAREGPT))
    args = cli.build_parser().parse_args(["bench", "--prompts", str(path)])
    cli.validate_prompt_set(args)
    session = engine.Session(lm=None, params=None, tokenizer=ChatTokenizer(), load_seconds=0.0)
    turns = [json.loads("".join(map(chr, engine.encode_prompt(session, p.text, None, p.context)))) for p in args.chosen]
    assert [len(t) for t in turns] == [2, 4, 1]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.csv", "prompt\nhi\n", r"p\.csv: unknown prompt file format '\.csv'; expected \.jsonl, \.json"),
        ("p.json", '{"prompt": "hi"}', r"p\.json: expected a JSON list of records \(ShareGPT\), got dict"),
        ("p.json", "[1,", r"p\.json: not JSON"),
        (
            "p.json",
            json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]),
            r"p\.json: record 0, turn 0: expected a role",
        ),
        ("p.jsonl", '{"text": "x"}\n', r"p\.jsonl: line 1 has no string 'prompt' field"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        prompts.load_prompts(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.skipif(HAS_ARROW, reason="pyarrow is installed: the files are read instead")
@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_arrow_sources_without_pyarrow_name_what_to_install(tmp_path, kind):
    path = tmp_path / "p.parquet"
    if kind == "parquet":
        path.write_bytes(b"PAR1")
    else:
        path = tmp_path / "saved"
        path.mkdir()
        (path / "state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"needs pyarrow \(pip install pyarrow\)$"):
        prompts.load_prompts(str(path))


@pytest.mark.skipif(not HAS_ARROW, reason="needs pyarrow")
def test_parquet_and_datasets_folder_rows_are_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": [f"q{i}" for i in range(6)]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert [p.text for p in prompts.load_prompts(str(tmp_path / "p.parquet"), "heldout")] == ["q4"]
    folder = tmp_path / "saved"  # The layout datasets' save_to_disk writes.
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    assert [p.text for p in prompts.load_prompts(str(folder))] == [f"q{i}" for i in range(6)]
