"""Every `eesd ...` command the documentation shows is one `eesd`'s own parser accepts.

Sources: README.md, docs/*.md and tpu/README.md (fenced code blocks, and inline `eesd ...` spans
with arguments), and the usage comment of tpu/run.sh. A `tpu/run.sh ...` line is run with
--dry-run and the `eesd` arguments it would send to the workers are the ones parsed, so the
script's own flag handling is tested too. Notation, not shell: a trailing `...` (more
arguments) is dropped, and `{a,b}` stands for each alternative. A `--config` must load and a
`--mesh` must parse, as the commands' own checks require before any model loads.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import pathlib
import re
import shlex
import subprocess

import pytest

from eesd_jax import cli, configs, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_SH = "tpu/run.sh"
ENTRY_POINTS = (("eesd",), ("python", "-m", "eesd_jax.cli"), ("python3", "-m", "eesd_jax.cli"))


def markdown_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", ROOT / "tpu" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(0-based first line, shell line) with backslash continuations joined and a leading `$ ` prompt removed."""
    out, start, parts = [], 0, []
    for i, line in enumerate(text.splitlines()):
        if not parts:
            start = i
        parts.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            out.append((start, re.sub(r"^\s*\$\s+", "", " ".join(parts))))
            parts = []
    return out


def shown_commands(path: pathlib.Path) -> list[tuple[str, str]]:
    """(file:line, shell text) of every line of a fenced block and every inline `eesd ...` span of a markdown file."""
    text = path.read_text()
    found = []
    fences = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
    for block in fences.finditer(text):
        line0 = text.count("\n", 0, block.start(1)) + 1
        found += [(f"{path.name}:{line0 + k}", line) for k, line in _logical_lines(block.group(1))]
    prose = fences.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in re.finditer(r"`(eesd [^`]+)`", prose):  # Inline spans may wrap lines.
        found.append((f"{path.name}:{prose.count(chr(10), 0, span.start()) + 1}", " ".join(span.group(1).split())))
    return found


def run_sh_usage() -> list[tuple[str, str]]:
    lines = (ROOT / RUN_SH).read_text().splitlines()
    return [(f"run.sh:{i + 1}", line.lstrip("# ")) for i, line in enumerate(lines) if line.startswith("#   tpu/run.sh")]


def eesd_argvs(line: str) -> list[list[str]]:
    """The eesd argument lists a shown line stands for ([] when it runs no eesd command)."""
    line = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", line)  # Leading environment assignments.
    if not any(line.startswith(" ".join(e) + " ") for e in (*ENTRY_POINTS, (RUN_SH,))):
        return []  # Other shell, Python, output.
    words = shlex.split(re.sub(r"(?<=\s)\.\.\.(?=\s|$)", "", line), comments=True)  # A bare ... only.
    if words[:1] == [RUN_SH]:
        return [_through_run_sh(words[1:])]
    for entry in ENTRY_POINTS:
        if tuple(words[: len(entry)]) == entry:
            args = words[len(entry) :]
            if len(args) < 2:  # `eesd bench`: the command's name in prose, not an invocation.
                return []
            choices = [re.fullmatch(r"\{(.+,.+)\}", w) for w in args]
            return [
                list(c)
                for c in itertools.product(
                    *[[w] if m is None else m.group(1).split(",") for w, m in zip(args, choices)]
                )
            ]
    return []


def _through_run_sh(script_args: list[str]) -> list[str]:
    """The eesd arguments tpu/run.sh would send to the workers (from its --dry-run output)."""
    out = subprocess.run(
        ["bash", str(ROOT / RUN_SH), "--dry-run", *script_args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "TPU_NAME": "t", "ZONE": "z"},
        timeout=60,
    )
    assert out.returncode == 0, f"{RUN_SH} {shlex.join(script_args)}: {out.stderr.strip()}"
    remote = next(w.split("=", 1)[1] for w in shlex.split(out.stdout) if w.startswith("--command="))
    words = shlex.split(remote)
    rest = words[words.index(".venv/bin/eesd") + 1 :]
    return rest[: rest.index(">")] if ">" in rest else rest


def check_parses(argv: list[str]) -> str | None:
    """None if eesd's parser (and its --config / --mesh checks) accept argv, else the error."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli.build_parser().parse_args(argv)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    try:
        if getattr(args, "config", None):
            configs.load_config(args.config)
        if getattr(args, "mesh", None):
            sharding.parse_mesh(args.mesh)
    except ValueError as e:
        return str(e)
    return None


def all_shown() -> list[tuple[str, str]]:
    return [c for p in markdown_files() for c in shown_commands(p)] + run_sh_usage()


def test_the_documented_pod_command_is_found():
    """The extraction sees the commands this test exists for (guards against extracting nothing)."""
    argvs = [a for _, line in all_shown() for a in eesd_argvs(line)]
    assert ["distill", "--mesh", "data=4,model=1"] in argvs
    assert ["distill", "--config", "tiny", "--mesh", "data=4,model=2", "--workdir", "runs/tiny_mesh"] in argvs
    assert any(a[:1] == ["generate"] for a in argvs) and any(a[:1] == ["eval-exit"] for a in argvs)


@pytest.mark.parametrize("source", ["README.md", "tpu/README.md", "docs", RUN_SH])
def test_every_shown_command_parses(source):
    if source == RUN_SH:
        shown = run_sh_usage()
    elif source == "docs":
        shown = [c for p in sorted((ROOT / "docs").glob("*.md")) for c in shown_commands(p)]
    else:
        shown = shown_commands(ROOT / source)
    bad = []
    for where, line in shown:
        for argv in eesd_argvs(line):
            if (error := check_parses(argv)) is not None:
                bad.append(f"{where}: eesd {shlex.join(argv)}: {error}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "line,argvs",
    [
        ("eesd bench --n 2   # comment", [["bench", "--n", "2"]]),
        ("$ eesd generate --prompt 'a b' \\\n  --json", [["generate", "--prompt", "a b", "--json"]]),
        ("eesd bench --dtype {float32,bfloat16}", [["bench", "--dtype", "float32"], ["bench", "--dtype", "bfloat16"]]),
        ("eesd bench", []),
        ('eesd generate --prompt "..." ...', [["generate", "--prompt", "..."]]),
        ("tpu/run.sh --background -- distill ...", [["distill"]]),
        ("tpu/run.sh --name x -- bench --mesh data=1,model=4", [["bench", "--mesh", "data=1,model=4"]]),
    ],
)
def test_extraction(line, argvs):
    assert [a for _, ln in _logical_lines(line) for a in eesd_argvs(ln)] == argvs


@pytest.mark.parametrize(
    "argv,error",
    [
        (["distill", "--out", "x"], "unrecognized arguments: --out x"),
        (["distill", "--config", "nope"], "unknown config 'nope'"),
        (["bench", "--mesh", "data=two"], "bad mesh spec"),
    ],
)
def test_a_broken_command_is_reported(argv, error):
    assert error in check_parses(argv)
