"""What every draft-stop policy sees and the pieces policies without state share.

A policy module (one per policy in this package) defines:
  Knobs                                  frozen dataclass: the policy's config fields with
                                         defaults, validated in __post_init__. Field names
                                         are global (control.ControllerConfig holds every
                                         policy's knobs side by side), so prefix them.
  init(cfg, batch) -> state              per-row state pytree, every leaf [B, ...].
  decide(cfg, state, features, key)      -> keep [B] bool: keep the token just drafted
                                         and draft another?
  update(cfg, state, n_drafted, n_accepted, confidence_bj) -> state
                                         fold one round's verification outcome in;
                                         control.update keeps rows that were not live.
cfg is the control.ControllerConfig; a policy reads only its own knobs (and may read
another policy's, e.g. calibration-ts the Thompson-sampling knobs of beta-ts).
Everything is traced inside the decode loop: pure jax.numpy, no Python branching on
array values.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class DraftFeatures:
    """What a policy may look at when deciding on draft token i+1 (all from the exit step)."""

    # [B] top probability of q_i: the drafted token's q_i(d_{i+1}) under greedy drafting. Never the
    # sampled token's own probability: deciding to keep d on q(d) selects on the sample and biases
    # the output distribution (tests/test_eesd_sampling.py catches it). Only functions of q_i, of
    # the round's earlier tokens and of independent randomness keep sampling lossless.
    prob: jax.Array
    entropy: jax.Array  # [B] entropy of q_i in nats.
    margin: jax.Array  # [B] top-1 minus top-2 probability of q_i.
    cosine: jax.Array  # [B] cosine similarity of the exit block's input (layer-N state) and output.
    step: jax.Array  # [] index i of the draft step (0-based).
    round_probs: jax.Array  # [B, J] `prob` of this round's earlier draft steps; valid below `step`.


@dataclasses.dataclass(frozen=True)
class NoKnobs:
    """Knobs of a policy without any."""


@flax.struct.dataclass
class NoState:
    """State of a policy that does not learn across rounds."""


def init_none(cfg, batch: int) -> NoState:
    return NoState()


def update_none(cfg, state, n_drafted, n_accepted, confidence_bj):
    return state


def judged(n_drafted: jax.Array, n_accepted: jax.Array, J: int) -> tuple[jax.Array, jax.Array]:
    """([B, J] accepted, [B, J] rejected) draft-token masks from one round's verification.

    Verification accepts draft tokens 1..n_accepted and, if n_accepted < n_drafted,
    rejects token n_accepted + 1; later tokens are never judged.
    """
    idx = jnp.arange(J)[None]
    accepted = idx < n_accepted[:, None]
    rejected = (idx == n_accepted[:, None]) & (idx < n_drafted[:, None])
    return accepted, rejected
