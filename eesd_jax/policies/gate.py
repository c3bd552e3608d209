"""gate: a small learned logistic gate on the exit's features predicting acceptance (JEI-DNN style).

p(accept | token) = sigmoid(w . phi), phi = [1, q(d), entropy, margin, cosine, i / K];
keep drafting while p >= gate_threshold. `fit` trains w from recorded (features,
accepted) pairs by L2-regularised logistic regression (Newton's method: convex, so
deterministic and exact). JEI-DNN's oracle-target bi-level training is not reproduced;
the gate here is plain acceptance prediction, which is what a draft-stop rule needs.

The default weights are NOT trained: they are set by hand so that the gate equals the
confidence rule at threshold 0.5 (sigmoid(10 q - 5) >= 0.5 iff q >= 0.5). Weights fitted
from real verification outcomes of the bundled model's exit remain to be shipped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FEATURES = ("bias", "prob", "entropy", "margin", "cosine", "depth")


@dataclasses.dataclass(frozen=True)
class Knobs:
    gate_weights: tuple[float, ...] = (-5.0, 10.0, 0.0, 0.0, 0.0, 0.0)  # w over FEATURES (hand-set, see above).
    gate_threshold: float = 0.5  # Keep drafting while the predicted acceptance is at least this.

    def __post_init__(self):
        if len(self.gate_weights) != len(FEATURES):
            raise ValueError(f"gate_weights needs {len(FEATURES)} values ({', '.join(FEATURES)})")
        if not 0.0 <= self.gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold must be in [0, 1], got {self.gate_threshold}")


def inputs(f) -> jax.Array:
    """[B, F] gate inputs phi from DraftFeatures (F = len(FEATURES))."""
    depth = jnp.broadcast_to(f.step / f.round_probs.shape[1], f.prob.shape)
    return jnp.stack([jnp.ones_like(f.prob), f.prob, f.entropy, f.margin, f.cosine, depth], axis=1)


def accept_probability(weights, phi_bf: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(phi_bf @ jnp.asarray(weights, jnp.float32))


def decide(cfg, state, features, key):
    return accept_probability(cfg.gate_weights, inputs(features)) >= cfg.gate_threshold


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
