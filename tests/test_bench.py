"""eesd_jax.bench: what a benchmark report records."""

import pathlib

import jax
import numpy as np
import pytest
from helpers import full_forward

from eesd_jax import bench, control, eesd, exits, generate


def test_report_counts_prompts_and_records_provenance(tiny):
    cfg, params = tiny
    ecfg = exits.ExitConfig(1)
    setup = bench.BenchSetup(cfg, params, exits.init_exit(cfg, params, ecfg), eesd.EESDConfig(exit_layer=1), eos_ids=())
    report = bench.run(
        setup, [[1, 2, 3], [4, 5, 6], [7, 8, 9]], max_new_tokens=2, modes=("ar",), batch=3, seed=5
    ).report
    assert report["config"]["n_prompts"] == 3
    assert report["modes"]["ar"]["new_tokens"] == 6
    prov = report["provenance"]
    assert prov["versions"]["jax"] and prov["device"]["platform"] and prov["seeds"] == {"seed": 5}
    assert "commit" in prov


@pytest.mark.slow
def test_greedy_mismatch_is_reported_with_ar_margin(tiny, monkeypatch):
    """A constructed mismatch (one EESD token changed) is found, located and explained by AR's margin."""
    cfg, params = tiny
    real = generate.generate_eesd

    def perturbed(*args, **kwargs):
        gen = real(*args, **kwargs)
        gen.tokens[1][3] = (gen.tokens[1][3] + 1) % cfg.vocab_size  # Prompt 1, its 4th new token.
        return gen

    monkeypatch.setattr(generate, "generate_eesd", perturbed)
    ecfg = exits.ExitConfig(1)
    setup = bench.BenchSetup(cfg, params, exits.init_exit(cfg, params, ecfg), eesd.EESDConfig(exit_layer=1), eos_ids=())
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    report = bench.run(setup, prompts, max_new_tokens=6, batch=3).report
    assert report["identical"] is False
    (m,) = report["mismatches"]
    ar = generate.generate_ar(cfg, params, prompts[1:2], 6).tokens[0]
    assert (m["prompt"], m["position"], m["ar_token"], m["eesd_token"]) == (1, 3, ar[3], (ar[3] + 1) % cfg.vocab_size)
    logits = full_forward(cfg, params, [prompts[1] + ar[:3]])[0, -1]
    top2 = np.sort(logits)[-2:]
    assert m["ar_top2_margin"] == pytest.approx(top2[1] - top2[0], abs=1e-4)
    assert m["ar_minus_eesd_logit"] == pytest.approx(logits[ar[3]] - logits[m["eesd_token"]], abs=1e-4)
    assert m["near_tie"] == (m["ar_top2_margin"] < bench.TIE_MARGIN["float32"])
    assert report["exactness"]["within_policy"] == m["near_tie"]
    assert "first differs at token 3" in bench.format_table(report)
    assert report["config"]["dtype"] == "float32" and bench.first_mismatches(setup, prompts[:1], [[1]], [[1]]) == []


def test_executables_are_dropped_only_near_the_memory_map_limit(monkeypatch):
    if not pathlib.Path("/proc/self/maps").is_file():
        pytest.skip("memory maps are counted on Linux only")
    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(True))
    bench.free_executables_near_map_limit(fraction=1.0)  # This process holds far fewer maps than the limit.
    assert cleared == []
    bench.free_executables_near_map_limit(fraction=0.0)
    assert cleared == [True]


def test_acceptance_by_position_comes_from_a_traced_pass_of_the_same_decoding(tiny):
    cfg, params = tiny
    exit_params = exits.init_exit(cfg, params, exits.ExitConfig(1))
    ecfg = eesd.EESDConfig(exit_layer=1, max_draft=3, controller=control.ControllerConfig("fixed"))
    setup = bench.BenchSetup(cfg, params, exit_params, ecfg, eos_ids=())
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    report = bench.run(setup, prompts, max_new_tokens=12, modes=("eesd",), step_costs=False, by_position=True).report
    entry = report["modes"]["eesd"]
    by_position = entry["acceptance_by_position"]
    assert [p["position"] for p in by_position] == [1, 2, 3]
    # The traced pass decodes what the timed one did: every accepted draft is counted once.
    assert sum(p["accepted"] for p in by_position) == entry["accepted"] > 0
    for here, after in zip(by_position, by_position[1:]):  # A draft is judged only on a standing prefix.
        assert after["judged"] <= here["accepted"] <= here["judged"]
        assert here["rate"] == round(here["accepted"] / here["judged"], 4)
    assert "acceptance by draft position 1..3" in bench.format_table(report)
    plain = bench.run(setup, prompts, max_new_tokens=12, modes=("eesd",), step_costs=False).report
    assert "acceptance_by_position" not in plain["modes"]["eesd"]
