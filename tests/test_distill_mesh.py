"""Self-distillation and eval-exit on a device mesh and on several processes (the tiny config).

pytest's jax has one CPU device, so the mesh runs are subprocesses: one with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8), and a 2-process jax.distributed job on
localhost (CPU collectives over gloo). Each prints one JSON line; the tests compare it with the
one-device run made here, on the same config and seeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_sharding import ROOT, run_two_processes

from eesd_jax import cli, configs, model, shards, train

SPEC = "tiny:train.steps=8,train.ckpt_every=4,train.log_every=2"  # A checkpoint at 4, one at 8.
MESH = "data=4,model=2"

# ----------------------------------------------------------------------------- 8 fake devices

_MESH_SCRIPT = """
import contextlib, io, json, pathlib, sys
import numpy as np
from eesd_jax import cli, configs, train

root, spec, mesh = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
# The whole pipeline on the mesh, through the command line: generation, teacher pass, training, export.
assert cli.main(["distill", "--config", spec, "--mesh", mesh, "--workdir", str(root / "mesh")]) == 0
# Killed mid-training (after step 6; checkpoint at 4), then restarted: on the mesh's data.
config = configs.load_config(spec)
config.mesh, config.data.dir = mesh, str(root / "mesh" / "data")
stopped = train.run_distill(config, root / "resumed", lm=cli.load_teacher(config), progress=False, stop_at=6)
resumed = train.run_distill(config, root / "resumed", lm=cli.load_teacher(config), progress=False)
out = io.StringIO()
with contextlib.redirect_stdout(out):
    exit_file = str(root / "mesh" / "exit_N1.safetensors")
    assert cli.main(["eval-exit", "--exit", exit_file, "--config", "tiny", "--mesh", mesh]) == 0
print(json.dumps(dict(stopped=stopped, resumed=str(resumed), eval=json.loads(out.getvalue()))))
"""


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_mesh")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT, str(root), SPEC, MESH],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mesh subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The same distillation on this process's one device: (workdir, exit path)."""
    workdir = tmp_path_factory.mktemp("distill_one")
    path = train.run_distill(configs.load_config(SPEC), workdir, progress=False)
    return workdir, path


def assert_exits_close(a, b, atol: float) -> None:
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


@pytest.mark.slow
def test_distill_on_a_mesh_trains_the_one_device_exit(mesh_run, one_device):
    """data=4 x model=2: the data made on the mesh equals the one-device data (tokens exactly, states to float
    rounding), and the trained exit equals the one-device exit to float rounding."""
    root, _ = mesh_run
    one, one_exit = one_device
    run = json.loads((root / "mesh" / "run.json").read_text())
    assert run["train"]["mesh"] == {"data": 4, "model": 2} and run["train"]["finished"]
    recorded = json.loads((root / "mesh" / "config.json").read_text())  # --mesh / --dtype reach the config.
    assert recorded["mesh"] == MESH and recorded["model"]["dtype"] == "float32"
    assert shards.complete(root / "mesh" / "data") == shards.complete(one / "data")
    for k in shards.complete(one / "data"):
        columns = sorted(p.stem for p in shards.shard_dir(one / "data", k).glob("*.npy"))
        assert columns == sorted(p.stem for p in shards.shard_dir(root / "mesh" / "data", k).glob("*.npy"))
        for name in columns:
            m, o = (shards.read(d / "data", k, name) for d in (root / "mesh", one))
            if o.dtype.kind == "f":  # Float16 states and log-probs: one rounding step of float16 apart at most.
                np.testing.assert_allclose(m, o, atol=2e-3, rtol=2e-3, err_msg=f"shard {k}: {name}")
            else:
                np.testing.assert_array_equal(m, o, err_msg=f"shard {k}: {name}")
    assert_exits_close(root / "mesh" / "exit_N1.safetensors", one_exit, atol=1e-5)
    # The logs of both: the same losses, step by step.
    lines = [(root / "mesh" / "metrics.jsonl").read_text(), (one / "metrics.jsonl").read_text()]
    mesh_log, one_log = ([json.loads(x) for x in text.splitlines()] for text in lines)
    assert [r["step"] for r in mesh_log] == [r["step"] for r in one_log] == [2, 4, 6, 8]
    np.testing.assert_allclose([r["loss"] for r in mesh_log], [r["loss"] for r in one_log], atol=1e-5)


@pytest.mark.slow
def test_distill_on_a_mesh_resumes_after_a_kill_to_the_same_exit(mesh_run):
    root, result = mesh_run
    assert result["stopped"] is None  # Stopped at step 6: nothing exported.
    run = json.loads((root / "resumed" / "run.json").read_text())
    assert run["train"]["resumed_from"] == 4 and run["train"]["mesh"] == {"data": 4, "model": 2}
    assert_exits_close(result["resumed"], root / "mesh" / "exit_N1.safetensors", atol=0)
    steps = [json.loads(line)["step"] for line in (root / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # Step 6's record, made before the kill, dropped and made again once.


@pytest.mark.slow
def test_eval_exit_on_a_mesh_reports_the_one_device_figures(mesh_run, one_device, capsys):
    root, result = mesh_run
    exit_file = str(root / "mesh" / "exit_N1.safetensors")
    assert cli.main(["eval-exit", "--exit", exit_file, "--config", "tiny"]) == 0
    one = json.loads(capsys.readouterr().out)
    keys = ("top1_agreement", "alpha", "tau", "drafted", "accepted", "identical", "n_identical", "eesd_tokens")
    assert {k: result["eval"][k] for k in keys} == {k: one[k] for k in keys}
    assert one["identical"]


# ----------------------------------------------------------------------------- bfloat16


@pytest.mark.slow
def test_bfloat16_distill_keeps_float32_master_weights_and_adam_moments(tmp_path):
    """--dtype bfloat16: the frozen LLM in bfloat16; the exit's trained weights and Adam's moments in float32
    (checkpointed so), computed in bfloat16."""
    import orbax.checkpoint as ocp

    config = configs.load_config("tiny:train.steps=2,train.ckpt_every=2")
    config.model.dtype = "bfloat16"
    lm = cli.load_teacher(config)
    assert {str(a.dtype) for a in jax.tree.leaves(lm.params)} == {"bfloat16"}
    path = train.run_distill(config, tmp_path, lm=lm, progress=False)
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute()) as mngr:
        state = mngr.restore(2)
    floats = {k: {str(a.dtype) for a in jax.tree.leaves(v) if a.dtype.kind == "f"} for k, v in state.items()}
    assert floats == {"params": {"float32"}, "opt": {"float32"}}
    exit_params = load_file(str(path))
    # The export: float32 master weights rounded to the LLM's dtype (what the exit computed in).
    for k, v in exit_params.items():
        if v.dtype.kind == "f":
            np.testing.assert_array_equal(v, model.cast_params({"x": v}, "bfloat16")["x"].astype(np.float32), err_msg=k)


# ----------------------------------------------------------------------------- 2 processes

_TWO_PROCESS_SCRIPT = """
import json, pathlib, sys
import jax
from eesd_jax import cli, configs, exits, sharding, train

root, spec = pathlib.Path(sys.argv[1]), sys.argv[2]
sharding.maybe_initialize_distributed()  # From JAX_COORDINATOR_ADDRESS etc.: one process of 2.
saved = []
save_exit = exits.save_exit
exits.save_exit = lambda *a, **k: saved.append(str(a[0])) or save_exit(*a, **k)
config = configs.load_config(spec)
config.mesh = "data=2"  # One CPU device per process: rows and batches over 'data' span the processes.
stopped = train.run_distill(config, root, lm=cli.load_teacher(config), progress=False, stop_at=6)
code = cli.main(["distill", "--config", spec, "--mesh", "data=2", "--workdir", str(root)])  # Resumes, exports.
print(json.dumps(dict(process=jax.process_index(), stopped=stopped, code=code, saved=saved)))
"""


@pytest.mark.slow
def test_two_process_distill_checkpoints_resumes_and_exports_once(tmp_path, one_device):
    """A 2-process jax.distributed job on localhost: killed after step 6, restarted; every process trains,
    process 0 alone writes the data, logs, run.json and the exit, which equals the one-device exit."""
    # Buckets of 8 positions: each process pads its rows to seq_len, whatever their lengths.
    results = run_two_processes(_TWO_PROCESS_SCRIPT, args=[str(tmp_path), SPEC + ",train.seq_bucket=8"], timeout=600)
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["stopped"] is None and r["code"] == 0 for r in results), results
    assert results[0]["saved"] == [str(tmp_path / "exit_N1.safetensors")] and results[1]["saved"] == []
    run = json.loads((tmp_path / "run.json").read_text())
    assert (
        run["train"]["resumed_from"] == 4
        and run["train"]["processes"] == 2
        and run["train"]["mesh"]
        == {
            "data": 2,
            "model": 1,
        }
    )
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert_exits_close(tmp_path / "exit_N1.safetensors", one_device[1], atol=1e-5)
