"""patience: stop once the draft's confidence has fallen for P consecutive tokens (PABEE-style; survey).

Within a round, draft token j "fell" if q(d_j) < q(d_{j-1}). The policy keeps drafting
until the run of falls ending at the token just drafted reaches `patience`. It needs no
state across rounds: the round's earlier probabilities come in DraftFeatures.round_probs.
The survey's other patience variant (top-1 flips between the exit and an earlier
read-out) is not offered: an earlier read-out costs a second LM head per draft step.
"""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Knobs:
    patience: int = 2  # P: consecutive confidence falls that stop drafting.

    def __post_init__(self):
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")


def falls_in_a_row(features) -> jnp.ndarray:
    """[B] length of the run of confidence falls ending at draft step i (0 if q(d_{i+1}) did not fall)."""
    B, J = features.round_probs.shape
    idx = jnp.arange(J)[None]
    i = features.step
    seq = jnp.where(idx == i, features.prob[:, None], features.round_probs)  # Probabilities of steps 0..i.
    fell = (idx >= 1) & (idx <= i) & (seq < jnp.roll(seq, 1, axis=1))
    # Step 0 never falls, so the last step <= i that did not fall exists.
    last_steady = jnp.max(jnp.where((idx <= i) & ~fell, idx, 0), axis=1)
    return i - last_steady


def decide(cfg, state, features, key):
    return falls_in_a_row(features) < cfg.patience
