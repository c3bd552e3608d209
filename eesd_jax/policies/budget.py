"""budget: exponential weights over confidence thresholds, mean draft cost held within a budget.

OUR RECONSTRUCTION of EERO's idea (exits with a reject option; the exit distribution an
exponential-weights aggregation calibrated to a cost budget, pi_k ~ exp(-eta (R_k + mu c_k));
the paper's exact rule was not available to us), made an online draft-stop rule:
  - Arms m = 1..M are thresholds tau_m on q(d): arm m keeps a draft token iff
    q(d) >= tau_m. An arm above 1 is the reject option: never draft.
  - Each row keeps, per arm, running means of the tokens it would have drafted (its
    cost c_m) and had accepted (its value a_m), and a budget multiplier mu >= 0. The
    arms' weights are pi = softmax(eta (a - mu c)). Draft step: keep with probability
    sum_m pi_m [q(d) >= tau_m], as if a threshold had been drawn from pi.
  - After verification every arm is scored on the round (full information): arm m would
    have kept the leading run of tokens with q >= tau_m and had min(n_accepted, run) of
    them accepted. Tokens past the ones drafted were never verified, so the run is capped
    at n_drafted: an arm more eager than the round's play scores as the play did.
  - mu follows dual ascent, mu += lr (n_drafted - budget) / J, clipped at 0, so the mean
    draft length is driven down to the budget when the weights would draft more, and
    left below it (mu = 0) otherwise. The censoring above favours no eager arm, so a
    loose budget is kept but not necessarily used up.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

REJECT = 2.0  # A threshold above every probability: the arm that never drafts.
MEMORY = 0.95  # Weight of the past in the arms' running means (about 20 rounds).


@dataclasses.dataclass(frozen=True)
class Knobs:
    budget: float = 2.0  # Mean draft tokens per round to stay within.
    budget_eta: float = 4.0  # Inverse temperature of the arms' exponential weights (per token of value).
    budget_lr: float = 0.5  # Step size of the budget multiplier's dual ascent.
    budget_thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, REJECT)  # Arms.

    def __post_init__(self):
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")
        if self.budget_eta <= 0 or self.budget_lr <= 0:
            raise ValueError(f"budget_eta and budget_lr must be > 0, got {self.budget_eta}, {self.budget_lr}")
        if not self.budget_thresholds:
            raise ValueError("budget_thresholds must name at least one threshold")


@flax.struct.dataclass
class State:
    cost: jax.Array  # [B, M] running mean of the draft tokens each arm would have kept per round.
    value: jax.Array  # [B, M] running mean of those tokens that verification accepted.
    mu: jax.Array  # [B] budget multiplier: the price of one draft token in accepted tokens.


def init(cfg, batch: int) -> State:
    zeros = jnp.zeros((batch, len(cfg.budget_thresholds)))
    return State(cost=zeros, value=zeros, mu=jnp.zeros((batch,)))


def weights(cfg, state: State) -> jax.Array:
    """[B, M] the arms' exponential weights pi."""
    return jax.nn.softmax(cfg.budget_eta * (state.value - state.mu[:, None] * state.cost), axis=1)


def keep_probability(cfg, state: State, prob: jax.Array) -> jax.Array:
    """[B] weight of the arms that would keep a token of probability prob [B]."""
    tau = jnp.asarray(cfg.budget_thresholds)
    return jnp.sum(weights(cfg, state) * (prob[:, None] >= tau[None]), axis=1)


def decide(cfg, state: State, features, key):
    return jax.random.uniform(key, features.prob.shape) < keep_probability(cfg, state, features.prob)


def update(cfg, state: State, n_drafted, n_accepted, confidence_bj) -> State:
    J = confidence_bj.shape[1]
    tau = jnp.asarray(cfg.budget_thresholds)
    drafted = jnp.arange(J)[None] < n_drafted[:, None]  # Kept, hence verified.
    passes = (confidence_bj[:, :, None] >= tau[None, None]) & drafted[:, :, None]  # [B, J, M]
    run = jnp.sum(jnp.cumprod(passes, axis=1), axis=1).astype(jnp.float32)  # [B, M] leading run.
    accepted = jnp.minimum(n_accepted[:, None].astype(jnp.float32), run)
    return State(
        cost=MEMORY * state.cost + (1 - MEMORY) * run,
        value=MEMORY * state.value + (1 - MEMORY) * accepted,
        mu=jnp.maximum(0.0, state.mu + cfg.budget_lr * (n_drafted - cfg.budget) / J),
    )
