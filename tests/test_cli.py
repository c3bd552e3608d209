"""The `eesd` command: input checks before any model load, and a tiny distillation end to end."""

import json
import pathlib
import re
import types

import pytest

from eesd_jax import cli, cli_args, control, engine, exits


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--prompt", "   "], "the prompt is empty"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
        (["generate", "--prompt", "hi", "--tree", "0", "--max-draft", "0"], "--max-draft must be >= 1"),
        (
            ["generate", "--prompt", "hi", "--tree", "0", "--controller", "greedy"],
            "--controller greedy: unknown controller",
        ),
        (["bench", "--tree", "0", "--controller", "confidence:threshold=2"], "threshold must be in [0, 1]"),
        (["bench", "--tree", "0", "--controller", "confidence:thresh=0.4"], "'thresh=0.4' is not knob=value"),
        (["bench", "--n", "2", "--by-position"], "--by-position traces chain rounds: add --tree 0"),
        (["generate", "--prompt", "hi", "--exit", "/nonexistent.safetensors"], "no such file"),
        (["generate", "--prompt", "hi", "--mesh", "data=two"], "--mesh"),
        (["bench", "--modes", "ar,fast"], "--modes must name some of"),
        (["distill", "--config", "no_such_config"], "--config no_such_config"),
        (["distill", "--config", "tiny", "--mesh", "data=two"], "--mesh: bad mesh spec"),
        (["eval-exit", "--config", "tiny", "--exit", "x.safetensors", "--mesh", "rows=2"], "--mesh: bad mesh spec"),
    ],
)
def test_bad_input_exits_2_before_loading(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(engine, "load_session", lambda *a, **k: pytest.fail("model loaded despite bad input"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_controller_knobs_reach_the_engine(tiny):
    """--controller KIND:KNOB=V,... is checked with the other input, then builds the EESD config's controller."""
    cfg, params = tiny
    session = engine.Session(types.SimpleNamespace(cfg=cfg, fingerprint="tiny"), params, None, 0.0)
    spec = "calibration-ts:break_even=0.3,n_bins=4"
    argv = ["generate", "--prompt", "hi", "--exit-layer", "1", "--tree", "0", "--controller", spec]
    args = cli.build_parser().parse_args(argv)
    cli_args.validate_eesd(args)
    ecfg = cli.engine_from_args(session, args).ecfg
    assert ecfg.controller == control.ControllerConfig("calibration-ts", break_even=0.3, n_bins=4)


@pytest.mark.slow
def test_distill_tiny_writes_a_loadable_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("EESD_JAX_CACHE", str(tmp_path / "cache"))
    assert cli.main(["distill", "--config", "tiny", "--workdir", str(tmp_path / "run")]) == 0
    (path,) = pathlib.Path(tmp_path / "run").glob("exit_N*.safetensors")
    meta = exits.read_exit_metadata(path)
    assert int(meta["exit_layer"]) >= 1


@pytest.mark.parametrize("main_process", [True, False])
def test_only_process_0_prints_results(main_process, monkeypatch, tmp_path, capsys):
    """Multi-host runs execute the same command on every host: one copy of the results; errors from any."""
    from eesd_jax import sharding, train

    monkeypatch.setattr(sharding, "is_main_process", lambda: main_process)
    monkeypatch.setattr(train, "run_distill", lambda config, workdir, lm=None: "exit.safetensors")
    assert cli.main(["distill", "--config", "tiny", "--workdir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ("exit written to exit.safetensors\n" if main_process else "")
    assert cli.main(["distill", "--config", "tiny", "--mesh", "data=two"]) == 2
    assert "--mesh: bad mesh spec" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bench prompt sets


class _Loaded(Exception):
    """Raised instead of loading a model: the command got past its input checks."""


def bench_prompts(argv, monkeypatch, capsys):
    """(exit code or None if it reached the model load, stderr, prompts it chose) for an `eesd bench` run."""
    chosen = []

    def stop(*args, **kwargs):
        raise _Loaded

    monkeypatch.setattr(engine, "load_session", stop)
    monkeypatch.setattr(cli, "validate_prompt_set", _recording(cli.validate_prompt_set, chosen))
    try:
        code = cli.main(["bench", *argv])
    except _Loaded:
        code = None
    return code, capsys.readouterr().err, chosen[0] if chosen else None


def _recording(fn, out):
    def wrapper(args):
        fn(args)
        out.append(args.chosen)

    return wrapper


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(48)))
    return path


def test_bench_uses_every_prompt_of_a_file(prompt_file, monkeypatch, capsys):
    code, err, chosen = bench_prompts(["--prompts", str(prompt_file)], monkeypatch, capsys)
    assert code is None
    assert [p.text for p in chosen] == [f"question {i}" for i in range(48)]
    assert f"bench: 48 prompts from {prompt_file} (split all)" in err


def test_bench_file_first_n_and_split_on_request(prompt_file, monkeypatch, capsys):
    _, err, chosen = bench_prompts(["--prompts", str(prompt_file), "--n", "16"], monkeypatch, capsys)
    assert [p.text for p in chosen] == [f"question {i}" for i in range(16)]
    assert "bench: 16 prompts from" in err
    _, err, chosen = bench_prompts(["--prompts", str(prompt_file), "--split", "heldout"], monkeypatch, capsys)
    assert [p.text for p in chosen] == [f"question {i}" for i in range(4, 48, 5)]
    assert "bench: 9 prompts from" in err and "(split heldout)" in err


def test_bench_named_set_defaults_to_8_heldout(monkeypatch, capsys):
    _, err, chosen = bench_prompts(["--prompts", "chat"], monkeypatch, capsys)
    assert len(chosen) == 8 and all(p.heldout for p in chosen)
    assert "bench: 8 prompts from chat (split heldout)" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "49"], r"49 prompts asked for, but {file} has only 48"),
        (["--split", "heldout", "--n", "16"], r"16 prompts asked for, but the heldout split of {file} has only 9"),
        (["--n", "0"], r"--n must be >= 1"),
    ],
)
def test_bench_refuses_more_prompts_than_available(prompt_file, monkeypatch, capsys, argv, message):
    code, err, _ = bench_prompts(["--prompts", str(prompt_file), *argv], monkeypatch, capsys)
    assert code == 2
    assert re.search(message.format(file=re.escape(str(prompt_file))), err), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": \n', r"bad\.jsonl: line 3 is not JSON"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"text": "no prompt"}\n', r"bad\.jsonl: line 2 has no string 'prompt' field"),
        ("empty.txt", "\n  \n", r"no prompts in .*empty\.txt"),
        ("latin1.txt", b"caf\xe9\n", r"latin1\.txt: not UTF-8 text"),
        ("missing.jsonl", None, r"--prompts .*missing\.jsonl: neither humaneval nor chat nor an existing file"),
    ],
)
def test_bench_refuses_bad_prompt_files(tmp_path, monkeypatch, capsys, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, err, _ = bench_prompts(["--prompts", str(path)], monkeypatch, capsys)
    assert code == 2
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1
