"""saturation: MuE's hidden-state saturation as a draft-stop rule.

MuE exits a layer when the cosine similarity of its input and output hidden states
exceeds lambda (the representation stopped changing). Here the "layer" is the exit
block: cos(layer-N state, exit output) >= lambda_i means the exit barely moved the
state, read as a settled draft, so drafting goes on. The threshold decays with draft
depth i in CALM's position-adjusted form (which MuE's decoder schedule also follows):
  lambda_i = lambda * (0.9 + 0.1 * exp(-temp * i / J)),
non-increasing from lambda to ~0.9 lambda; temp = 0 keeps it constant. The score is
O(D) per draft step: no vocabulary-sized work.
"""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Knobs:
    saturation: float = 0.9  # lambda: cosine similarity needed at draft step 0.
    saturation_temp: float = 4.0  # Decay rate of the threshold over draft depth (CALM's default 4).

    def __post_init__(self):
        if not 0.0 <= self.saturation <= 1.0:
            raise ValueError(f"saturation must be in [0, 1], got {self.saturation}")
        if self.saturation_temp < 0:
            raise ValueError(f"saturation_temp must be >= 0, got {self.saturation_temp}")


def threshold(cfg, step, J: int):
    """lambda_step for a round of at most J drafts."""
    return cfg.saturation * (0.9 + 0.1 * jnp.exp(-cfg.saturation_temp * step / J))


def decide(cfg, state, features, key):
    return features.cosine >= threshold(cfg, features.step, features.round_probs.shape[1])
