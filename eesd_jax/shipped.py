"""Trained exits that ship with the package, found by the base model's fingerprint."""

from __future__ import annotations

import json
import pathlib

from eesd_jax import exits

EXITS_DIR = pathlib.Path(__file__).parent / "data" / "exits"


def validation_top1(path: str | pathlib.Path, meta: dict | None = None) -> float:
    """The exit's recorded held-out first-draft top-1 (its training run's validation), or -1 if not recorded."""
    extra = json.loads((meta or exits.read_exit_metadata(path)).get("extra", "{}"))
    return float(extra.get("train_metrics", {}).get("trained", {}).get("val", {}).get("top1", -1.0))


def exits_for(lm, layer: int | None = None) -> list[pathlib.Path]:
    """The shipped exits trained for `lm`'s exact weights (after layer N = `layer`, if given), the
    best drafter first (validation top-1)."""
    metas = {p: exits.read_exit_metadata(p) for p in EXITS_DIR.glob("*.safetensors")}
    found = [
        p
        for p, meta in metas.items()
        if meta["base_fingerprint"] == lm.fingerprint and layer in (None, int(meta["exit_layer"]))
    ]
    return sorted(found, key=lambda p: (-validation_top1(p, metas[p]), p.name))


def default_exit(lm, layer: int | None = None) -> str | None:
    """The shipped exit for `lm` (at N = `layer`, if given) whose drafts the LLM accepts most often, or None."""
    found = exits_for(lm, layer)
    return str(found[0]) if found else None
