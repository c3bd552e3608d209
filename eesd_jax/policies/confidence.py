"""confidence: keep drafting while the draft token's probability >= threshold (Kangaroo / HF "dynamic")."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Knobs:
    threshold: float = 0.5  # Minimum draft-token probability to go on.

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


def decide(cfg, state, features, key):
    return features.prob >= cfg.threshold
