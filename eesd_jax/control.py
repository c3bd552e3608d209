"""Draft-length controllers: when to stop drafting within a round.

A controller is three pure functions over a per-row state pytree:
  init(cfg, batch) -> state
  decide(cfg, state, features, key) -> keep [B] bool   (keep this draft token and go on?)
  update(cfg, state, n_drafted [B], n_accepted [B], confidence [B, K], live [B]) -> state

Controllers only change speed, never output: every one must pass the
losslessness tests. The engine enforces max_draft; decide never has to.

Kinds:
  fixed           always draft max_draft tokens.
  confidence      keep drafting while the draft token's probability >= threshold
                  (Kangaroo / HF "dynamic" style).
  beta-ts         the paper's Thompson sampling: acceptance of a draft token is
                  Bernoulli(theta), theta ~ Beta(alpha, beta). Before keeping
                  each token sample theta, then chi ~ Bernoulli(theta); go on
                  while chi = 1. After verification alpha += accepted,
                  beta += 1 if a token was rejected.
  calibration-ts  our reconstruction of the paper's calibrated variant (its exact
                  formula is not published in a form we could use): one Beta
                  posterior per bin of the draft token's own probability q(d)
                  (histogram calibration). The prior of bin c is centred on the
                  bin's mid-probability (a calibrated drafter), with weight
                  `prior_strength`; each verified draft token updates its bin.
                  Decide: sample theta from the current token's bin, continue
                  with probability theta.
Both TS kinds take an optional discount gamma in (0, 1]: before each update the
counts shrink towards the prior by gamma, so old rounds are forgotten; and an
optional `break_even` b in (0, 1): then they go on iff the sampled theta > b,
Thompson sampling between two arms, drafting (worth theta) and stopping (worth
b, the acceptance at which a draft token pays for its draft step and its share
of verification). The paper's rule (go on with probability theta) drafts at
rate theta however low theta is, which loses time when drafts cost as much as
they do on a CPU.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

KINDS = ("fixed", "confidence", "beta-ts", "calibration-ts")


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    kind: str = "confidence"  # Measured fastest on CPU (README); the TS kinds adapt online.
    threshold: float = 0.5  # confidence: minimum draft-token probability to go on.
    prior_alpha: float = 1.0  # beta-ts prior pseudo-counts.
    prior_beta: float = 1.0
    n_bins: int = 10  # calibration-ts: bins of the draft token's probability.
    prior_strength: float = 2.0  # calibration-ts: prior pseudo-count per bin.
    discount: float = 1.0  # TS forgetting factor gamma; 1.0 = never forget.
    break_even: float = 0.0  # TS: 0 = go on with probability theta; > 0 = go on iff theta > break_even.

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown controller {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.prior_alpha <= 0 or self.prior_beta <= 0 or self.prior_strength <= 0:
            raise ValueError("Beta prior pseudo-counts must be > 0")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        if not 0.0 <= self.break_even < 1.0:
            raise ValueError(f"break_even must be in [0, 1), got {self.break_even}")
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")


@flax.struct.dataclass
class DraftFeatures:
    """What a controller may look at when deciding on draft token i+1."""

    prob: jax.Array  # [B] draft probability of the drafted token, q_i(d_{i+1}).
    entropy: jax.Array  # [B] entropy of q_i in nats.
    step: jax.Array  # [] index i of the draft step (0-based).


@flax.struct.dataclass
class ControllerState:
    alpha: jax.Array  # [B, C] Beta posterior successes (C = 1 for beta-ts, n_bins for calibration-ts).
    beta: jax.Array  # [B, C] Beta posterior failures.


def _prior(cfg: ControllerConfig) -> tuple[jax.Array, jax.Array]:
    if cfg.kind == "calibration-ts":
        mid = (jnp.arange(cfg.n_bins) + 0.5) / cfg.n_bins
        return cfg.prior_strength * mid, cfg.prior_strength * (1.0 - mid)
    return jnp.array([cfg.prior_alpha]), jnp.array([cfg.prior_beta])


def init(cfg: ControllerConfig, batch: int) -> ControllerState:
    a, b = _prior(cfg)
    return ControllerState(alpha=jnp.tile(a[None], (batch, 1)), beta=jnp.tile(b[None], (batch, 1)))


def confidence_bin(cfg: ControllerConfig, prob: jax.Array) -> jax.Array:
    return jnp.clip((prob * cfg.n_bins).astype(jnp.int32), 0, cfg.n_bins - 1)


def decide(cfg: ControllerConfig, state: ControllerState, features: DraftFeatures, key: jax.Array) -> jax.Array:
    """keep [B]: whether to keep the token just drafted and draft another."""
    B = features.prob.shape[0]
    if cfg.kind == "fixed":
        return jnp.ones((B,), bool)
    if cfg.kind == "confidence":
        return features.prob >= cfg.threshold
    if cfg.kind == "beta-ts":
        a, b = state.alpha[:, 0], state.beta[:, 0]
    else:
        c = confidence_bin(cfg, features.prob)[:, None]
        a = jnp.take_along_axis(state.alpha, c, axis=1)[:, 0]
        b = jnp.take_along_axis(state.beta, c, axis=1)[:, 0]
    key_theta, key_chi = jax.random.split(key)
    theta = jax.random.beta(key_theta, a, b)
    if cfg.break_even > 0:
        return theta > cfg.break_even
    return jax.random.uniform(key_chi, (B,)) < theta


def update(
    cfg: ControllerConfig,
    state: ControllerState,
    n_drafted: jax.Array,
    n_accepted: jax.Array,
    confidence_bk: jax.Array,
    live: jax.Array,
) -> ControllerState:
    """Fold one round's verification outcome into the posterior (rows with live=False unchanged).

    Verification observes draft tokens 1..n_accepted (accepted) and, if
    n_accepted < n_drafted, token n_accepted + 1 (rejected); later tokens are
    never judged.
    """
    if cfg.kind in ("fixed", "confidence"):
        return state
    prior_a, prior_b = _prior(cfg)
    a = prior_a + cfg.discount * (state.alpha - prior_a)
    b = prior_b + cfg.discount * (state.beta - prior_b)
    rejected = (n_accepted < n_drafted).astype(a.dtype)
    if cfg.kind == "beta-ts":
        a = a + n_accepted[:, None].astype(a.dtype)
        b = b + rejected[:, None]
    else:
        K = confidence_bk.shape[1]
        idx = jnp.arange(K)[None]
        acc_bk = (idx < n_accepted[:, None]).astype(a.dtype)
        rej_bk = ((idx == n_accepted[:, None]) & (idx < n_drafted[:, None])).astype(a.dtype)
        bins_bkc = jax.nn.one_hot(confidence_bin(cfg, confidence_bk), cfg.n_bins, dtype=a.dtype)
        a = a + jnp.einsum("bk,bkc->bc", acc_bk, bins_bkc)
        b = b + jnp.einsum("bk,bkc->bc", rej_bk, bins_bkc)
    keep = live[:, None]
    return ControllerState(alpha=jnp.where(keep, a, state.alpha), beta=jnp.where(keep, b, state.beta))
