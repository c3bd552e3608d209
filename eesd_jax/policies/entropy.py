"""entropy: stop when the draft distribution's entropy exceeds a threshold (COST-EFF, BranchyNet; survey)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Knobs:
    max_entropy: float = 2.0  # Nats: keep drafting while the entropy of q_i is at most this.

    def __post_init__(self):
        if self.max_entropy < 0:
            raise ValueError(f"max_entropy must be >= 0, got {self.max_entropy}")


def decide(cfg, state, features, key):
    return features.entropy <= cfg.max_entropy
