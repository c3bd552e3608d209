"""The round-cost model (eesd_jax.costs): its inversions agree with its forward formula."""

import pytest

from eesd_jax import costs

MS = {"ar_step": 30.0, "exit_step": 2.0, "lower_N2": 2.5, **{f"verify_N2_T{t}": 28.0 + 1.5 * t for t in range(1, 9)}}


def test_a_round_is_its_draft_steps_plus_one_verification():
    assert costs.draft_ms(MS, 2) == MS["lower_N2"] + MS["exit_step"]
    assert costs.round_ms(MS, 2, 3) == 4 * costs.draft_ms(MS, 2) + MS["verify_N2_T4"]
    # Nothing accepted: one token per round, so the speedup is an AR step over the round.
    assert costs.predicted_speedup(MS, 2, 3, 0.0) == pytest.approx(MS["ar_step"] / costs.round_ms(MS, 2, 3))


@pytest.mark.parametrize("target", [1.0, 1.5])
def test_acceptance_needed_inverts_the_predicted_speedup(target):
    ks = range(1, 8)
    p = costs.acceptance_needed(MS, 2, ks, target)
    assert 0 < p < 1
    assert max(costs.predicted_speedup(MS, 2, k, p) for k in ks) == pytest.approx(target, rel=1e-6)
    assert max(costs.predicted_speedup(MS, 2, k, p - 1e-3) for k in ks) < target
    assert costs.acceptance_needed(MS, 2, ks, 100.0) == 1.0  # Out of reach at any acceptance.
