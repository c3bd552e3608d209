"""Draft-length controllers (draft-stop policies): the registry and its dispatch.

After each drafted token a policy answers: keep it and draft another, or stop. Each
policy is one module of eesd_jax/policies/ (contract in policies/base.py) and one line
of POLICIES below (or `register(name, module)` at run time, as notebooks/eesd_tour.ipynb
does); `--controller` in generate and bench offers every registered name.
Policies only change speed, never output: every one runs through the losslessness
tests, and the engine enforces max_draft (decide never has to).

  init(cfg, batch) -> state
  decide(cfg, state, features, key) -> keep [B] bool   (keep this draft token and go on?)
  update(cfg, state, n_drafted [B], n_accepted [B], confidence [B, J], live [B]) -> state

Kinds (details in each module; q(d) is DraftFeatures.prob, the top probability of the
draft distribution, which is the drafted token's own under greedy drafting):
  fixed           always draft max_draft tokens.
  confidence      keep drafting while q(d) >= threshold (Kangaroo / HF "dynamic").
  beta-ts         the EESD paper's Thompson sampling over a Beta posterior of acceptance.
  calibration-ts  our reconstruction of the paper's calibrated TS: a Beta posterior per
                  bin of q(d).
  entropy         keep drafting while the entropy of q_i <= max_entropy (COST-EFF).
  margin          keep drafting while top-1 minus top-2 probability >= min_margin (CALM).
  patience        stop once q(d) has fallen for `patience` tokens in a row (PABEE-style).
  saturation      keep drafting while cos(exit input, exit output) >= a threshold
                  decaying with draft depth (MuE).
  budget          exponential weights over q(d) thresholds with a reject arm, mean draft
                  length held to `budget` (our reconstruction of EERO).
  gate            a logistic gate on the exit's features predicting acceptance (JEI-DNN),
                  fitted per exit on real verification outcomes (experiments/fit_gate.py).
  expected-gain   keep drafting while the round's product of q(d) >= draft_cost, the
                  measured cost of one more draft token in AR steps (round_costs.py).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp

from eesd_jax.policies import (
    base,
    beta_ts,
    budget,
    calibration_ts,
    confidence,
    entropy,
    expected_gain,
    fixed,
    gate,
    margin,
    patience,
    saturation,
)
from eesd_jax.policies.base import DraftFeatures  # noqa: F401  (part of this module's API)

POLICIES: dict[str, types.ModuleType] = {
    "fixed": fixed,
    "confidence": confidence,
    "beta-ts": beta_ts,
    "calibration-ts": calibration_ts,
    "entropy": entropy,
    "margin": margin,
    "patience": patience,
    "saturation": saturation,
    "budget": budget,
    "gate": gate,
    "expected-gain": expected_gain,
}
KINDS = tuple(POLICIES)

ControllerState = Any  # The kind's own state pytree (its module's init), every leaf [B, ...].


def _knobs(module) -> type:
    return getattr(module, "Knobs", base.NoKnobs)


def _validate(self) -> None:
    if self.kind not in KINDS:
        raise ValueError(f"unknown controller {self.kind!r}; choose one of {', '.join(KINDS)}")
    for module in POLICIES.values():  # Each Knobs dataclass checks its own fields.
        knobs = _knobs(module)
        knobs(**{f.name: getattr(self, f.name) for f in dataclasses.fields(knobs)})


def _make_config() -> type:
    fields, owner = [], {}
    for kind, module in POLICIES.items():
        for f in dataclasses.fields(_knobs(module)):
            if f.name in owner or f.name == "kind":
                raise TypeError(f"knob {f.name!r} of {kind} is already {owner.get(f.name, 'the kind')}'s")
            owner[f.name] = kind
            fields.append((f.name, f.type, dataclasses.field(default=f.default)))
    # Measured fastest on CPU (docs/studies.md); the TS kinds adapt online.
    kind = ("kind", str, dataclasses.field(default="confidence"))
    doc = "Which policy and every policy's knobs (each documented in its module's Knobs)."
    return dataclasses.make_dataclass(
        "ControllerConfig",
        [kind, *fields],
        frozen=True,
        namespace={"__post_init__": _validate, "__doc__": doc, "__module__": __name__},
    )


# One frozen (hashable, jit-static) config holding every registered policy's knobs side by
# side, so that ControllerConfig("beta-ts", prior_alpha=2.0) and getattr(cfg, knob) work.
ControllerConfig = _make_config()


def register(name: str, module) -> None:
    """Add a policy at run time (from a notebook or a plugin): what its line in POLICIES does at import.

    Rebuilds ControllerConfig with the module's knobs, so look it up as control.ControllerConfig
    afterwards; configs made before stay valid for the policies they name.
    """
    global ControllerConfig, KINDS
    if name in POLICIES:
        raise ValueError(f"policy {name!r} is already registered")
    if not callable(getattr(module, "decide", None)):
        raise TypeError(f"policy {name!r} has no decide(cfg, state, features, key)")
    POLICIES[name] = module
    try:
        ControllerConfig = _make_config()  # Refuses a knob another policy owns.
    except TypeError:
        del POLICIES[name]
        raise
    KINDS = tuple(POLICIES)


def from_spec(spec: str) -> ControllerConfig:
    """ "kind" or "kind:knob=value,..." (e.g. "confidence:threshold=0.4"); tuple knobs take '+'-separated items."""
    kind, _, fields = spec.partition(":")
    defaults = ControllerConfig()
    values = {}
    for item in filter(None, fields.split(",")):
        name, eq, text = item.partition("=")
        if not eq or not hasattr(defaults, name) or name == "kind":
            raise ValueError(f"controller {spec!r}: {item!r} is not knob=value for a known knob")
        like = getattr(defaults, name)
        if isinstance(like, tuple):  # Tuple knobs hold floats (gate_weights, budget_thresholds).
            values[name] = tuple(float(t) for t in text.split("+"))
        else:
            values[name] = type(like)(text)
    return ControllerConfig(kind=kind, **values)


def for_exit(cfg: ControllerConfig, exit_path) -> ControllerConfig:
    """cfg with what was fitted for the exit at exit_path where cfg leaves it unset: the gate's weights."""
    if cfg.kind == "gate" and not cfg.gate_weights and exit_path and (weights := gate.load_fitted(exit_path)):
        return dataclasses.replace(cfg, gate_weights=weights)
    return cfg


def init(cfg: ControllerConfig, batch: int) -> ControllerState:
    state = getattr(POLICIES[cfg.kind], "init", base.init_none)(cfg, batch)
    # Strongly typed: a weak-typed leaf (from a Python float) comes back from the loop strongly
    # typed, and each streamed chunk after the first would trace the loop again (seconds, timed).
    return jax.tree.map(lambda a: jax.lax.convert_element_type(a, a.dtype), state)


def decide(cfg: ControllerConfig, state: ControllerState, features: DraftFeatures, key: jax.Array) -> jax.Array:
    """keep [B]: whether to keep the token just drafted and draft another."""
    return POLICIES[cfg.kind].decide(cfg, state, features, key)


def update(
    cfg: ControllerConfig,
    state: ControllerState,
    n_drafted: jax.Array,
    n_accepted: jax.Array,
    confidence_bj: jax.Array,
    live: jax.Array,
) -> ControllerState:
    """Fold one round's verification outcome into the state (rows with live=False unchanged).

    confidence_bj [B, J]: q(d_j) of the round's draft tokens; valid below n_drafted (and at
    n_drafted < J, the token drafted but not kept).
    """
    new = getattr(POLICIES[cfg.kind], "update", base.update_none)(cfg, state, n_drafted, n_accepted, confidence_bj)
    keep = lambda a, b: jnp.where(live.reshape(live.shape + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(keep, new, state)
