"""calibration-ts: our reconstruction of the EESD paper's calibrated Thompson sampling.

The paper's exact formula is not published in a form we could use. Here: one Beta
posterior per bin of the draft probability q(d) (DraftFeatures.prob; histogram calibration).
The prior of bin c is centred on the bin's mid-probability (a calibrated drafter), with
weight `prior_strength`; each verified draft token updates its bin. Decide: sample theta
from the current token's bin, continue with probability theta (or iff theta > break_even).
Shares discount / break_even with beta-ts (beta_ts.Knobs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from eesd_jax.policies import beta_ts
from eesd_jax.policies.base import judged


@dataclasses.dataclass(frozen=True)
class Knobs:
    n_bins: int = 10  # Bins of the draft token's probability.
    prior_strength: float = 2.0  # Prior pseudo-count per bin.

    def __post_init__(self):
        if self.prior_strength <= 0:
            raise ValueError("Beta prior pseudo-counts must be > 0")
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")


def _prior(cfg) -> tuple[jax.Array, jax.Array]:
    mid = (jnp.arange(cfg.n_bins) + 0.5) / cfg.n_bins
    return cfg.prior_strength * mid, cfg.prior_strength * (1.0 - mid)


def confidence_bin(cfg, prob: jax.Array) -> jax.Array:
    return jnp.clip((prob * cfg.n_bins).astype(jnp.int32), 0, cfg.n_bins - 1)


def init(cfg, batch: int) -> beta_ts.State:
    return beta_ts.prior_state(*_prior(cfg), batch)


def decide(cfg, state: beta_ts.State, features, key):
    c = confidence_bin(cfg, features.prob)[:, None]
    a = jnp.take_along_axis(state.alpha, c, axis=1)[:, 0]
    b = jnp.take_along_axis(state.beta, c, axis=1)[:, 0]
    return beta_ts.sample_keep(cfg, a, b, key)


def update(cfg, state: beta_ts.State, n_drafted, n_accepted, confidence_bj) -> beta_ts.State:
    s = beta_ts.forget(cfg, state, *_prior(cfg))
    accepted, rejected = judged(n_drafted, n_accepted, confidence_bj.shape[1])
    bins_bjc = jax.nn.one_hot(confidence_bin(cfg, confidence_bj), cfg.n_bins, dtype=s.alpha.dtype)
    return beta_ts.State(
        alpha=s.alpha + jnp.einsum("bk,bkc->bc", accepted.astype(s.alpha.dtype), bins_bjc),
        beta=s.beta + jnp.einsum("bk,bkc->bc", rejected.astype(s.beta.dtype), bins_bjc),
    )
