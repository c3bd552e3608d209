"""beta-ts: the EESD paper's Thompson sampling, and the machinery calibration-ts shares.

Acceptance of a draft token is Bernoulli(theta), theta ~ Beta(alpha, beta). Before
keeping each token sample theta, then chi ~ Bernoulli(theta); go on while chi = 1.
After verification alpha += accepted, beta += 1 if a token was rejected.

Knobs shared by both TS kinds: an optional discount gamma in (0, 1]: before each update
the counts shrink towards the prior by gamma, so old rounds are forgotten; and an
optional `break_even` b in (0, 1): then they go on iff the sampled theta > b, Thompson
sampling between two arms, drafting (worth theta) and stopping (worth b, the acceptance
at which a draft token pays for its draft step and its share of verification). The
paper's rule (go on with probability theta) drafts at rate theta however low theta is,
which loses time when drafts cost as much as they do on a CPU.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Knobs:
    prior_alpha: float = 1.0  # Prior pseudo-counts of the Beta posterior.
    prior_beta: float = 1.0
    discount: float = 1.0  # TS forgetting factor gamma (beta-ts and calibration-ts); 1.0 = never forget.
    break_even: float = 0.0  # TS: 0 = go on with probability theta; > 0 = go on iff theta > break_even.

    def __post_init__(self):
        if self.prior_alpha <= 0 or self.prior_beta <= 0:
            raise ValueError("Beta prior pseudo-counts must be > 0")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        if not 0.0 <= self.break_even < 1.0:
            raise ValueError(f"break_even must be in [0, 1), got {self.break_even}")


@flax.struct.dataclass
class State:
    alpha: jax.Array  # [B, C] Beta posterior successes (C = 1 for beta-ts, n_bins for calibration-ts).
    beta: jax.Array  # [B, C] Beta posterior failures.


def prior_state(prior_a: jax.Array, prior_b: jax.Array, batch: int) -> State:
    """Every row at the prior ([C] pseudo-counts)."""
    return State(alpha=jnp.tile(prior_a[None], (batch, 1)), beta=jnp.tile(prior_b[None], (batch, 1)))


def forget(cfg, state: State, prior_a: jax.Array, prior_b: jax.Array) -> State:
    """Shrink the counts towards the prior by the discount (before adding a round's outcome)."""
    return State(
        alpha=prior_a + cfg.discount * (state.alpha - prior_a), beta=prior_b + cfg.discount * (state.beta - prior_b)
    )


def sample_keep(cfg, a: jax.Array, b: jax.Array, key: jax.Array) -> jax.Array:
    """keep [B] from Beta(a, b) posteriors [B]: the paper's rule, or the break-even arm."""
    key_theta, key_chi = jax.random.split(key)
    theta = jax.random.beta(key_theta, a, b)
    if cfg.break_even > 0:
        return theta > cfg.break_even
    return jax.random.uniform(key_chi, a.shape) < theta


def _prior(cfg) -> tuple[jax.Array, jax.Array]:
    return jnp.array([cfg.prior_alpha]), jnp.array([cfg.prior_beta])


def init(cfg, batch: int) -> State:
    return prior_state(*_prior(cfg), batch)


def decide(cfg, state: State, features, key):
    return sample_keep(cfg, state.alpha[:, 0], state.beta[:, 0], key)


def update(cfg, state: State, n_drafted, n_accepted, confidence_bj) -> State:
    s = forget(cfg, state, *_prior(cfg))
    rejected = n_accepted < n_drafted  # At most one token per round is judged rejected.
    return State(
        alpha=s.alpha + n_accepted[:, None].astype(s.alpha.dtype),
        beta=s.beta + rejected[:, None].astype(s.beta.dtype),
    )
