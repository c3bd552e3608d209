"""expected-gain: draft another token while its expected gain pays for its measured cost.

Token i+1 of a round adds one token to the output only if it and every earlier draft are
accepted; with calibrated confidences that happens with probability q_1 * ... * q_{i+1}
(the round's top probabilities). Drafting it costs one draft step plus one more verified
position: `draft_cost` AR steps, from experiments/round_costs.py on the machine at hand
(its column c plus the verify cost's slope per token: at N = 2 on this project's CPU
0.155 + (1.54 - 0.96) / 7 = 0.24). So keep drafting while q_1 * ... * q_{i+1} >= draft_cost: a threshold set
by measured costs, not by hand, and one that falls with depth into the round.
"""

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Knobs:
    # AR steps one more draft token costs (draft step + marginal verification); the default is
    # the bundled model at N = 2 on this project's 2-core CPU (experiments/results/round_costs/round_costs.md).
    draft_cost: float = 0.24

    def __post_init__(self):
        if not 0.0 <= self.draft_cost <= 1.0:
            raise ValueError(f"draft_cost must be in [0, 1] AR steps, got {self.draft_cost}")


def decide(cfg, state, features, key):
    earlier = jnp.arange(features.round_probs.shape[1])[None] < features.step
    prefix = jnp.prod(jnp.where(earlier, features.round_probs, 1.0), axis=1)
    return prefix * features.prob >= cfg.draft_cost
