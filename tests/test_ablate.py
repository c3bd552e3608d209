"""experiments/ablate.py on the tiny config: every study writes its JSON (with provenance), markdown
table and PNG; every row is checked against AR, and a row whose output leaves AR's stops the study."""

import json

import pytest
from helpers import load_experiment

from eesd_jax import configs, generate

# Two prompts, K = 2: the depth cell (N = 1, K = 2, fixed) and the policies reuse loops the
# components study compiled (same shapes and EESD configs), which keeps this module fast.
FAST = ["--config", "tiny", "--n", "1", "--max-new-tokens", "12", "--max-draft", "2"]


@pytest.fixture(scope="module")
def ablate():
    return load_experiment("ablate")


KNOBS = {
    "components": "",
    "depth": "depth.layers=1,depth.max_drafts=2",
    "policies": "policies.kinds=fixed+beta-ts",
    "joint": "",
}


def run(ablate, tiny_exit, out, study, knobs=""):
    return ablate.main(["--study", study, *FAST, "--exit", tiny_exit, "--set", knobs, "--out", str(out)])


@pytest.fixture(scope="module")
def studies(ablate, tiny_exit, tmp_path_factory):
    """{study: (output stem, returned result)}, each study run once."""
    root = tmp_path_factory.mktemp("ablate")
    return {s: (root / s, run(ablate, tiny_exit, root / s, s, knobs)) for s, knobs in KNOBS.items()}


@pytest.mark.parametrize("study, n_rows", [("components", 5), ("depth", 1), ("policies", 2), ("joint", 2)])
@pytest.mark.slow
def test_study_writes_json_table_and_plot(studies, study, n_rows):
    out, result = studies[study]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["study"] == study and saved["n_prompts"] == 2 and saved["exit"]["layer"] == 1
    assert saved["provenance"]["versions"]["jax"] and saved["provenance"]["seeds"] == {"seed": 0}
    assert "commit" in saved["provenance"] and saved["provenance"]["device"]["platform"] == "cpu"
    rows = saved["rows"]
    assert len(rows) == n_rows and all(r["identical"] for r in rows)
    for r in rows:
        assert r["speedup"] > 0 and 0 <= r["alpha"] <= 1 and r["tau"] >= 1 and 0 <= r["mean_draft"] <= 2
    assert out.with_suffix(".md").read_text().count("\n") == n_rows + 2
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_components_change_one_part_each(studies):
    rows = {r["tests"]: r for r in studies["components"][1]["rows"]}
    paper = rows["all parts"]
    assert paper["controller"] == "beta-ts" and paper["vs_paper"] == 1.0
    assert rows["Thompson sampling"]["controller"] == "fixed" and rows["Thompson sampling"]["mean_draft"] > 1
    # Recomputing layers [0, N) and padding verification to K + 1 change cost only: the same
    # drafts are proposed and accepted, so the controller sees the same outcomes.
    for part in ("layer-N reuse", "bucketed verification"):
        assert {k: rows[part][k] for k in ("alpha", "tau", "mean_draft")} == {
            k: paper[k] for k in ("alpha", "tau", "mean_draft")
        }


@pytest.mark.slow
def test_depth_predicts_from_the_measured_parts(studies):
    result = studies["depth"][1]
    (r,) = result["rows"]
    ms = result["part_ms"]
    assert (r["N"], r["K"], r["exit"]) == (1, 2, "trained")
    assert r["round_ms"] == pytest.approx(3 * ms["draft_N1"] + ms["verify_N1_T3"], abs=0.01)
    # Both are rounded to 3 decimals in the JSON.
    assert r["predicted"] == pytest.approx(r["tau"] * ms["ar_step"] / r["round_ms"], rel=1e-2, abs=1e-3)
    assert result["predicted_over_measured_median"] == pytest.approx(r["predicted"] / r["speedup"], abs=2e-3)


@pytest.mark.slow
def test_policies_are_tuned_on_the_tuning_prompts_then_benched_held_out(ablate, studies):
    _, result = studies["policies"]
    grid = ablate.study_config("tiny").policies.grid
    rows = {r["policy"]: r for r in result["rows"]}
    assert [t["controller"] for t in rows["fixed"]["trials"]] == ["fixed"]  # No knobs: its defaults.
    assert [t["controller"] for t in rows["beta-ts"]["trials"]] == [f"beta-ts:{k}" for k in grid["beta-ts"]]
    assert len(grid["beta-ts"]) == 2
    for r in rows.values():
        best = max(r["trials"], key=lambda t: t["speedup"])
        assert r["tuned"] == best["controller"] and r["tune_speedup"] == best["speedup"]
    tuning = ablate.distill_data.validation_prompts(configs.load_config("tiny"), 2)
    held_out = ablate.distill_data.prompt_list(("chat:heldout", "humaneval:heldout"), 1)
    assert len(tuning) == 2 and not {p.text for p in tuning} & {p.text for p in held_out}


def test_tuning_prompts_are_the_exits_validation_prompts(ablate):
    config = configs.load_config("smollm2")
    train_prompts = ablate.distill_data.prompt_list(config.data.sets)
    tuning = ablate.distill_data.validation_prompts(config, 8)
    every = config.train.val_every_prompt
    positions = [train_prompts.index(p) for p in tuning]
    assert len(tuning) == 8 and all(i % every == every - 1 for i in positions)
    assert {p.id.split("/")[0] for p in tuning} == {"chat", "HumanEval"}  # Spread over both sets.


@pytest.mark.slow
def test_policies_rows_outlive_a_crash_and_a_rerun_reuses_them(ablate, tiny_exit, tmp_path, monkeypatch):
    out, real_tune = tmp_path / "p", ablate.tune

    def crash_at_beta_ts(s, kind):
        if kind == "beta-ts":
            raise RuntimeError("killed")
        return real_tune(s, kind)

    monkeypatch.setattr(ablate, "tune", crash_at_beta_ts)
    with pytest.raises(RuntimeError, match="killed"):
        run(ablate, tiny_exit, out, "policies", "policies.kinds=fixed+beta-ts")
    (saved,) = [json.loads(line)["row"] for line in out.with_suffix(".rows.jsonl").read_text().splitlines()]
    assert saved["policy"] == "fixed" and not out.with_suffix(".json").exists()
    tuned = []
    monkeypatch.setattr(ablate, "tune", lambda s, kind: tuned.append(kind) or real_tune(s, kind))
    result = run(ablate, tiny_exit, out, "policies", "policies.kinds=fixed+beta-ts")
    assert tuned == ["beta-ts"] and [r["policy"] for r in result["rows"]] == ["fixed", "beta-ts"]
    assert result["rows"][0] == saved
    assert [json.loads(line)["row"]["policy"] for line in out.with_suffix(".rows.jsonl").read_text().splitlines()] == [
        "fixed",
        "beta-ts",
    ]  # Kept: a later run with more policies measures only those.


@pytest.mark.slow
def test_a_row_whose_output_leaves_ar_stops_the_study(ablate, tiny_exit, tmp_path, monkeypatch):
    real = generate.generate_eesd

    def wrong_last_token(*args, **kwargs):  # An engine bug stand-in: one token of one row changed.
        gen = real(*args, **kwargs)
        gen.tokens[0][-1] = (gen.tokens[0][-1] + 1) % 101
        return gen

    monkeypatch.setattr(generate, "generate_eesd", wrong_last_token)
    with pytest.raises(ablate.NotLossless, match="fixed: EESD output differs from AR"):
        run(ablate, tiny_exit, tmp_path / "p", "policies", "policies.kinds=fixed")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_joint_trains_an_exit_per_layer_and_benches_each(studies):
    _, result = studies["joint"]
    assert [r["N"] for r in result["rows"]] == [1, 2] and result["recipe"] == "tiny"
    assert all(r["identical"] for r in result["rows"])


@pytest.mark.parametrize("study", ["components", "depth", "policies", "joint"])
def test_study_config_file_is_the_reported_run(ablate, study):
    """`--study NAME` alone reruns what experiments/results/NAME/smollm2.json reports: the same model
    config, and the settings that file recorded (shared knobs and the study's own section)."""
    reported = ablate.reported(study)
    recorded = json.loads((ablate.RESULTS / study / "smollm2.json").read_text())
    assert reported.config == recorded["config"]
    knobs = json.loads(json.dumps(ablate.merge(ablate.study_config(reported.config), reported.knobs).to_dict()))
    compared = [k for k, v in recorded["settings"].items() if not isinstance(v, dict)] + [study]
    assert {k: knobs[k] for k in compared} == {k: recorded["settings"][k] for k in compared}


def test_a_study_knob_that_does_not_exist_is_refused(ablate):
    with pytest.raises(ValueError, match="policies.tune"):
        ablate.merge(ablate.study_config("tiny"), {"policies": {"tune": 4}})
