"""Declared dependency ranges: every requirement bounded on both sides, constraints.txt inside them,\nand torch only in the parity extra."""

from __future__ import annotations

import importlib.metadata
import pathlib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).parent.parent


def locked() -> dict[str, Version]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    assert all(len(p) == 2 for p in pins), "constraints.txt holds only name==version lines"
    return {canonicalize_name(name): Version(version) for name, version in pins}


def requirements() -> list[Requirement]:
    """setup.py's install_requires and extras, as installed (make re-installs when setup.py changes)."""
    return [Requirement(r) for r in importlib.metadata.requires("eesd_jax") or ()]


def test_every_requirement_has_a_range():
    reqs = requirements()
    assert {canonicalize_name(r.name) for r in reqs} >= {"jax", "transformers", "tokenizers", "torch"}
    for r in reqs:
        ops = {s.operator for s in r.specifier}
        assert ops == {"=="} or ({">=", "<"} <= ops), f"{r}: want a lower and an upper bound (or an exact pin)"


def test_constraints_lock_every_requirement_inside_its_range():
    pins = locked()
    for r in requirements():
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} is not in constraints.txt"
        assert r.specifier.contains(pins[name]), f"constraints.txt has {r.name}=={pins[name]}, outside {r.specifier}"
    assert str(pins["torch"]) == "2.13.0"  # Other versions pull CUDA wheels onto CPU machines (docs/development.md).


def test_only_the_parity_extra_brings_torch():
    """make test installs the runtime and test requirements: no torch (a multi-GB CUDA build on
    Python 3.12 even with the pin), nor accelerate (which requires it)."""
    for r in requirements():
        if canonicalize_name(r.name) not in {"torch", "accelerate"}:
            continue
        assert r.marker is not None, f"{r} is a runtime requirement"
        assert r.marker.evaluate({"extra": "parity"}), r
        assert not r.marker.evaluate({"extra": "test"}), f"{r} is in the test extra"
