"""gate: a small learned logistic gate on the exit's features predicting acceptance (JEI-DNN style).

p(accept | token) = sigmoid(w . phi), phi = [1, q(d), entropy, margin, cosine, i / J];
keep drafting while p >= gate_threshold. `fit` trains w from recorded (features,
accepted) pairs by L2-regularised logistic regression (Newton's method: convex, so
deterministic and exact). JEI-DNN's oracle-target bi-level training is not reproduced;
the gate here is plain acceptance prediction, which is what a draft-stop rule needs.

Weights: `gate_weights` if given; else, where the engine knows the exit (eesd generate /
bench, ablate.py: control.for_exit), the weights fitted for that exit on real verification
outcomes (experiments/fit_gate.py writes them beside the exit file, FITTED_SUFFIX); else
UNTRAINED, which equals the confidence rule at 0.5 (sigmoid(10 q - 5) >= 0.5 iff q >= 0.5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp

FEATURES = ("bias", "prob", "entropy", "margin", "cosine", "depth")
UNTRAINED = (-5.0, 10.0, 0.0, 0.0, 0.0, 0.0)  # Hand-set: the confidence rule at threshold 0.5.
FITTED_SUFFIX = ".gate.json"  # <exit>.safetensors -> <exit>.gate.json
FORMAT = "eesd_jax.gate/1"


@dataclasses.dataclass(frozen=True)
class Knobs:
    gate_weights: tuple[float, ...] = ()  # w over FEATURES; () = the exit's fitted ones, else UNTRAINED.
    gate_threshold: float = 0.5  # Keep drafting while the predicted acceptance is at least this.

    def __post_init__(self):
        if self.gate_weights and len(self.gate_weights) != len(FEATURES):
            raise ValueError(f"gate_weights needs {len(FEATURES)} values ({', '.join(FEATURES)})")
        if not 0.0 <= self.gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold must be in [0, 1], got {self.gate_threshold}")


def phi(prob, entropy, margin, cosine, depth) -> jax.Array:
    """[..., F] gate inputs; every argument [...] (depth: draft index over J, in [0, 1))."""
    return jnp.stack([jnp.ones_like(prob), prob, entropy, margin, cosine, depth], axis=-1)


def inputs(f) -> jax.Array:
    """[B, F] gate inputs phi from DraftFeatures (F = len(FEATURES))."""
    depth = jnp.broadcast_to(f.step / f.round_probs.shape[1], f.prob.shape)
    return phi(f.prob, f.entropy, f.margin, f.cosine, depth)


def accept_probability(weights, phi_bf: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(phi_bf @ jnp.asarray(weights, jnp.float32))


def decide(cfg, state, features, key):
    return accept_probability(cfg.gate_weights or UNTRAINED, inputs(features)) >= cfg.gate_threshold


@jax.jit
def _newton(phi_nf, y_n, l2):
    F = phi_nf.shape[1]
    reg = l2 * jnp.eye(F).at[0, 0].set(0.0)  # The bias is not shrunk.

    def step(w, _):
        p = jax.nn.sigmoid(phi_nf @ w)
        grad = phi_nf.T @ (p - y_n) + reg @ w
        hess = (phi_nf * (p * (1 - p))[:, None]).T @ phi_nf + reg + 1e-6 * jnp.eye(F)
        return w - jnp.linalg.solve(hess, grad), None

    w, _ = jax.lax.scan(step, jnp.zeros(F), None, length=25)
    return w


def fit(phi_nf, accepted_n, l2: float = 1e-2) -> tuple[float, ...]:
    """gate_weights from n recorded draft tokens: phi [n, F] (`inputs` of each) and accepted [n] (0/1)."""
    phi = jnp.asarray(phi_nf, jnp.float32)
    if phi.ndim != 2 or phi.shape[1] != len(FEATURES) or phi.shape[0] != len(accepted_n):
        raise ValueError(f"fit needs phi [n, {len(FEATURES)}] and accepted [n], got {phi.shape}, {len(accepted_n)}")
    return tuple(float(x) for x in _newton(phi, jnp.asarray(accepted_n, jnp.float32), l2))


# ----------------------------------------------------------------------------- fitted weights beside an exit


def fitted_path(exit_path) -> pathlib.Path:
    p = pathlib.Path(exit_path)
    return p.with_name(p.name.removesuffix(".safetensors") + FITTED_SUFFIX)


def save_fitted(exit_path, weights, info: dict) -> pathlib.Path:
    """Write the weights fitted for the exit at exit_path beside it (atomically); info: how they were fitted."""
    from eesd_jax.loading import atomic_write

    Knobs(gate_weights=tuple(weights))  # Refuse a wrong length before writing.
    path = fitted_path(exit_path)
    body = {"format": FORMAT, "features": list(FEATURES), "weights": [float(w) for w in weights], **info}
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(body, indent=1) + "\n"))
    return path


def load_fitted(exit_path) -> tuple[float, ...] | None:
    """The gate weights fitted for the exit at exit_path, or None if none were; ValueError if the file is bad."""
    path = fitted_path(exit_path)
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        weights = tuple(float(w) for w in body["weights"])
        ok = body.get("format") == FORMAT and body.get("features") == list(FEATURES)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError is a ValueError.
        raise ValueError(f"{path.name}: not a gate weights file ({type(e).__name__}: {e})") from None
    if not ok or len(weights) != len(FEATURES) or not all(map(math.isfinite, weights)):
        raise ValueError(f"{path.name}: gate weights must be {len(FEATURES)} finite numbers over {FEATURES}")
    return weights
