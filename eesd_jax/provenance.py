"""What a result was measured with: package versions, the git commit, the device. Recorded in results JSON."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import subprocess
import time

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "numpy", "eesd_jax")


def git_commit(where: str | os.PathLike = pathlib.Path(__file__).parent) -> str | None:
    """HEAD of the checkout holding `where`, with "+dirty" for uncommitted changes; None outside git."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True)
        commit = run("rev-parse", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def record(**seeds) -> dict:
    """{"versions", "commit", "device", "python", "time", "seeds"} for a results file."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    dev = jax.devices()[0]
    return {
        "versions": versions,
        "commit": git_commit(),
        "device": {
            "platform": dev.platform,
            "kind": dev.device_kind,
            "count": jax.device_count(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seeds": seeds,
    }
