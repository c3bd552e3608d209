"""The `eesd` command: input checks before any model load, and a tiny distillation end to end."""

import pathlib

import pytest

from eesd_jax import cli, exits


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--prompt", "   "], "the prompt is empty"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
        (["generate", "--prompt", "hi", "--max-draft", "0"], "--max-draft must be >= 1"),
        (["generate", "--prompt", "hi", "--exit", "/nonexistent.safetensors"], "no such file"),
        (["generate", "--prompt", "hi", "--mesh", "data=two"], "--mesh"),
        (["bench", "--modes", "ar,fast"], "--modes must name some of"),
        (["distill", "--config", "no_such_config"], "--config no_such_config"),
    ],
)
def test_bad_input_exits_2_before_loading(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_session", lambda *a, **k: pytest.fail("model loaded despite bad input"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_distill_tiny_writes_a_loadable_exit(tmp_path, monkeypatch):
    monkeypatch.setenv("EESD_JAX_CACHE", str(tmp_path / "cache"))
    assert cli.main(["distill", "--config", "tiny", "--workdir", str(tmp_path / "run")]) == 0
    (path,) = pathlib.Path(tmp_path / "run").glob("exit_N*.safetensors")
    meta = exits.read_exit_metadata(path)
    assert int(meta["exit_layer"]) >= 1
