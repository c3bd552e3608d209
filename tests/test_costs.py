"""The round-cost model (eesd_jax.costs): its inversions agree with its forward formula."""

import jax
import pytest

from eesd_jax import bench, costs, exits, model
from tests.test_eesd import CFG

MS = {"ar_step": 30.0, "draft_N2": 4.5, **{f"verify_N2_T{t}": 28.0 + 1.5 * t for t in range(1, 9)}}


def test_a_round_is_its_draft_steps_plus_one_verification():
    assert costs.draft_ms(MS, 2) == MS["draft_N2"]
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


TREE_MS = {**MS, "draft_N2_W4": 5.6, "leaf_N2_W4": 2.5, **{f"verify_N2_T{t}": 28.0 + 1.5 * t for t in range(9, 18)}}


@pytest.mark.parametrize("depth", [1, 3, 7])
def test_a_width_one_tree_round_is_a_chain_round(depth):
    assert costs.tree_round_ms(MS, 2, 1, depth) == pytest.approx(costs.round_ms(MS, 2, depth))


def test_a_tree_round_adds_one_draft_batch_and_wider_verification_per_depth():
    """Each depth's added cost is its draft batch and W more verified tokens; the added costs sum to the round."""
    for d in range(1, 5):
        added = TREE_MS["draft_N2_W4"]
        added += TREE_MS[f"verify_N2_T{1 + 4 * d}"] - TREE_MS[f"verify_N2_T{1 + 4 * (d - 1)}"]
        assert costs.depth_cost(TREE_MS, 2, 4, d) * MS["ar_step"] == pytest.approx(added)
    total = sum(costs.depth_cost(TREE_MS, 2, 4, d) for d in range(1, 5)) * MS["ar_step"]
    assert total == pytest.approx(costs.tree_round_ms(TREE_MS, 2, 4, 4) - costs.tree_round_ms(TREE_MS, 2, 4, 0))
    # Depth 0 is a round that only verifies the root: one token, a plain step's worth of work.
    assert costs.tree_round_ms(TREE_MS, 2, 4, 0) == costs.draft_ms(MS, 2) + MS["verify_N2_T1"]


def test_a_fractional_depth_lies_between_its_neighbours():
    lo, hi = costs.tree_round_ms(TREE_MS, 2, 4, 2), costs.tree_round_ms(TREE_MS, 2, 4, 3)
    mid = costs.tree_round_ms(TREE_MS, 2, 4, 2.25)
    assert lo < mid < hi and mid == pytest.approx(lo + 0.25 * (hi - lo))
    speed = costs.predicted_tree_speedup(TREE_MS, 2, 4, 2.25, 2.0)
    assert speed == pytest.approx(2.0 * MS["ar_step"] / mid)


def test_a_full_tree_drafts_its_deepest_depth_as_a_leaf_batch():
    """A tree grown to its full depth R pays a leaf batch, not a draft batch, for depth R; shallower
    rounds (an adaptive tree stopping early) pay draft batches only."""
    for R in (1, 4):
        full = costs.tree_round_ms(TREE_MS, 2, 4, R, full_depth=R)
        assert full == pytest.approx(costs.tree_round_ms(TREE_MS, 2, 4, R) - 5.6 + 2.5)
        assert costs.tree_round_ms(TREE_MS, 2, 4, R - 1, full_depth=R) == costs.tree_round_ms(TREE_MS, 2, 4, R - 1)
    mid = costs.tree_round_ms(TREE_MS, 2, 4, 3.5, full_depth=4)
    ends = [costs.tree_round_ms(TREE_MS, 2, 4, d, full_depth=4) for d in (3, 4)]
    assert mid == pytest.approx(sum(ends) / 2)
    narrow = costs.tree_round_ms(TREE_MS, 2, 4, 4, nodes=8, full_depth=4)
    assert narrow == pytest.approx(costs.tree_round_ms(TREE_MS, 2, 4, 4, nodes=8) - 5.6 + 2.5)
    speed = costs.predicted_tree_speedup(TREE_MS, 2, 4, 4, 2.0, full_depth=4)
    assert speed == pytest.approx(2.0 * MS["ar_step"] / costs.tree_round_ms(TREE_MS, 2, 4, 4, full_depth=4))


def test_a_narrower_round_verifies_fewer_tokens():
    """With w of W nodes kept per depth the round drafts as the whole tree and verifies 1 + d w tokens;
    each rank's width_cost is the d more verified tokens, and they sum to the whole width's."""
    whole = costs.tree_round_ms(TREE_MS, 2, 4, 4)
    assert costs.tree_round_ms(TREE_MS, 2, 4, 4, nodes=16) == pytest.approx(whole)
    narrow = costs.tree_round_ms(TREE_MS, 2, 4, 4, nodes=8)
    assert narrow == pytest.approx(whole - TREE_MS["verify_N2_T17"] + TREE_MS["verify_N2_T9"])
    between = costs.tree_round_ms(TREE_MS, 2, 4, 4, nodes=8.5)
    assert between == pytest.approx(narrow + 0.5 * (TREE_MS["verify_N2_T10"] - TREE_MS["verify_N2_T9"]))
    ranks = [costs.width_cost(TREE_MS, 2, w, 4) for w in range(1, 5)]
    assert ranks[1] * MS["ar_step"] == pytest.approx(TREE_MS["verify_N2_T9"] - TREE_MS["verify_N2_T5"])
    assert sum(ranks) * MS["ar_step"] == pytest.approx(TREE_MS["verify_N2_T17"] - TREE_MS["verify_N2_T1"])
    speed = costs.predicted_tree_speedup(TREE_MS, 2, 4, 4, 2.0, nodes=8)
    assert speed == pytest.approx(2.0 * MS["ar_step"] / narrow)


def test_step_costs_time_draft_batches_of_each_width():
    """bench.step_costs with widths: W-token draft parts beside the one-token ones, each a positive time."""
    params = model.init_params(CFG, jax.random.key(0))
    ep = exits.init_exit(CFG, params, exits.ExitConfig(1))
    ms = bench.step_costs(bench.step_parts(CFG, params, ep, [1], [1, 5], cache_len=32, widths=(4,)), repeats=2)
    want = {"ar_step", "exit_step", "exit_step_W4", "lower_N1", "lower_N1_W4", "draft_N1", "draft_N1_W4"}
    want |= {"leaf_N1", "leaf_N1_W4"}
    want |= {"verify_N1_T1", "verify_N1_T5"}
    assert set(ms) == want and all(v > 0 for v in ms.values())
    # The model reads the measured W-token parts (an identity, not a timing: times can be in any order).
    added = ms["draft_N1_W4"] + ms["verify_N1_T5"] - ms["verify_N1_T1"]
    assert costs.tree_round_ms(ms, 1, 4, 1) - costs.tree_round_ms(ms, 1, 4, 0) == pytest.approx(added)
    leaf = ms["leaf_N1_W4"] + ms["verify_N1_T5"] - ms["verify_N1_T1"]
    assert costs.tree_round_ms(ms, 1, 4, 1, full_depth=1) - costs.tree_round_ms(ms, 1, 4, 0) == pytest.approx(leaf)
