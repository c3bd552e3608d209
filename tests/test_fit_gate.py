"""experiments/fit_gate.py on the tiny config: the gate fitted on traced verification outcomes ships
beside the exit and `--controller gate` then uses it; the scores it reports are computed right."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from helpers import load_experiment

from eesd_jax import configs, control, eesd, exits, teacher
from eesd_jax.policies import gate


@pytest.fixture(scope="module")
def fit_gate():
    return load_experiment("fit_gate")


def test_scores_rank_and_calibrate(fit_gate):
    y = np.array([1, 1, 0, 0, 1, 0], float)
    assert fit_gate.scores(np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3]), y)["auc"] == 1.0
    assert fit_gate.scores(np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7]), y)["auc"] == 0.0
    assert fit_gate.scores(np.full(6, 0.5), y) == {"log_loss": round(np.log(2), 4), "auc": 0.5, "accuracy": 0.5}
    # One accepted draft (0.15) ranked below two rejected ones: 7 of the 3 x 3 pairs in order.
    assert fit_gate.scores(np.array([0.9, 0.8, 0.1, 0.2, 0.15, 0.3]), y)["auc"] == round(7 / 9, 4)


@pytest.mark.slow
def test_fitted_gate_ships_beside_the_exit_and_is_used_for_it(fit_gate, tiny_exit, tmp_path):
    exit_path = tmp_path / pathlib.Path(tiny_exit).name
    shutil.copy(tiny_exit, exit_path)
    out = tmp_path / "fit.json"
    argv = [
        "--config",
        "tiny",
        "--exit",
        str(exit_path),
        "--n",
        "4",
        "--max-new-tokens",
        "16",
        "--max-draft",
        "3",
        "--max-prompt-tokens",
        "96",
        "--out",
        str(out),
    ]
    result = fit_gate.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    weights = gate.load_fitted(exit_path)
    assert weights == tuple(result["weights"].values()) and weights != gate.UNTRAINED
    by_pos = result["acceptance_by_position"]
    judged = result["fitted_on"]["samples"] + result["fitted_on"]["check_samples"]
    assert [p["position"] for p in by_pos] == [1, 2, 3] and sum(p["judged"] for p in by_pos) == judged
    assert by_pos[0]["judged"] >= by_pos[1]["judged"] >= by_pos[2]["judged"]  # Each needs the one before kept.
    assert set(result["check"]) >= {"gate (fitted)", "base rate"} and result["provenance"]["versions"]["jax"]
    # The engine, given the exit, runs `gate` with these weights unless the spec gives its own.
    lm = teacher.load_lm(configs.load_config("tiny").model)
    exit_cfg, _ = exits.load_exit(exit_path, lm.cfg, lm.fingerprint)
    assert eesd.config_for_exit(exit_cfg, exit_path, 3, "gate").controller.gate_weights == weights
    assert eesd.config_for_exit(exit_cfg, exit_path, 3, "gate:gate_weights=1+0+0+0+0+0").controller == (
        control.from_spec("gate:gate_weights=1+0+0+0+0+0")
    )
