"""margin: stop when the top-1 / top-2 probability margin of q_i falls below a threshold (CALM softmax_diff)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Knobs:
    min_margin: float = 0.3  # Keep drafting while p_top1 - p_top2 >= this.

    def __post_init__(self):
        if not 0.0 <= self.min_margin <= 1.0:
            raise ValueError(f"min_margin must be in [0, 1], got {self.min_margin}")


def decide(cfg, state, features, key):
    return features.margin >= cfg.min_margin
