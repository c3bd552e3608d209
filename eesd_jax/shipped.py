"""Trained exits that ship with the package, found by the base model's fingerprint."""

from __future__ import annotations

import pathlib

from eesd_jax import exits

EXITS_DIR = pathlib.Path(__file__).parent / "data" / "exits"


def default_exit(lm) -> str | None:
    """The shipped exit trained for `lm`'s exact weights, or None."""
    for path in sorted(EXITS_DIR.glob("*.safetensors")):
        if exits.read_exit_metadata(path)["base_fingerprint"] == lm.fingerprint:
            return str(path)
    return None
