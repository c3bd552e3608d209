"""experiments/drafter_study.py: the data-scaling fit, and on the tiny config rows that record
their source and trained positions, a scaling line per source, and a re-render from the JSON."""

import json
import math

import pytest
from helpers import load_experiment


@pytest.fixture(scope="module")
def study():
    return load_experiment("drafter_study")


def test_scaling_fits_top1_per_doubling_and_the_positions_a_target_needs(study):
    line = lambda p: 0.2 + 0.05 * math.log2(p / 25_000)  # noqa: E731
    rows = {
        f"r{p}": {"source": "responses", "trained_positions": p, "val_first_draft_top1": line(p)}
        for p in (25_000, 50_000, 100_000)
    }
    # The best point of a training curve counts (early stopping), not the final one.
    rows["r100000"] |= {"val_first_draft_top1": 0.1, "curve": [{"val_top1": line(100_000)}, {"val_top1": 0.1}]}
    rows["text"] = {"source": "readmes", "trained_positions": 9_000, "val_first_draft_top1": 0.3}
    rows["measured-only"] = {"val_first_draft_top1": 0.5}
    fits = study.scaling(rows)
    assert set(fits) == {"responses", "readmes"}
    assert "top1_per_doubling" not in fits["readmes"]  # One budget: no line.
    fit = fits["responses"]
    assert fit["top1_per_doubling"] == pytest.approx(0.05)
    for target, positions in fit["positions_needed"].items():
        assert line(positions) == pytest.approx(float(target))
    assert "data_hours_needed" not in fit  # No row says what its data cost to make.
    flat = {k: {**r, "val_first_draft_top1": 0.3, "curve": []} for k, r in rows.items() if k.startswith("r")}
    assert all(v is None for v in study.scaling(flat)["responses"]["positions_needed"].values())


@pytest.mark.slow
def test_tiny_rows_record_source_and_positions_and_render_again(study, tmp_path):
    corpus = tmp_path / "notes"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"n{i}.txt").write_text(f"Note {i}: the exit drafts, the LLM verifies. " * 20)
    out = tmp_path / "study"
    study.main(
        [
            "--base",
            "tiny",
            "--data-dir",
            str(tmp_path / "data"),
            "--text-dir",
            str(tmp_path / "text"),
            "--workdir",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            "--no-progress",
            "--overrides",
            "train.val_every_prompt=3,train.steps=8,train.val_every=4",
            "--variants",
            "small=N=1,data.response_tokens=60",
            "all=N=1",
            f"text=N=1,text={corpus},data.text.only=true",
        ]
    )
    saved = json.loads(out.with_suffix(".json").read_text())
    rows = saved["rows"]
    assert {k: r["source"] for k, r in rows.items()} == {"small": "responses", "all": "responses", "text": "notes"}
    assert 0 < rows["small"]["trained_positions"] <= 60 < rows["all"]["trained_positions"]
    assert all(len(r["curve"]) == 2 for r in rows.values())
    # The draft head's vocabulary caps agreement: the LLM's top-1 must be in it.
    assert all(0 <= r["val_first_draft_top1"] <= r["val_draft_vocab_coverage"] <= 1 for r in rows.values())
    assert saved["scaling"]["responses"]["top1_per_doubling"] == pytest.approx(
        (study.best(rows["all"]) - study.best(rows["small"]))
        / math.log2(rows["all"]["trained_positions"] / rows["small"]["trained_positions"])
    )
    fit = saved["scaling"]["responses"]
    assert fit["data_ms_per_position"] == rows["small"]["data_ms_per_position"] > 0  # The same responses dir.
    for target, positions in fit["positions_needed"].items():
        hours = fit["data_hours_needed"][target]  # None where the line never reaches the target.
        assert hours == (positions and pytest.approx(positions * fit["data_ms_per_position"] / 3.6e6))
    assert rows["text"]["data_ms_per_position"] > 0
    assert saved["provenance"]["versions"]["jax"]
    table = out.with_suffix(".md").read_text()
    assert "per doubling" in table and all(f"| {k} |" in table for k in rows)
    assert out.with_suffix(".png").stat().st_size > 0
    out.with_suffix(".md").unlink()
    older = json.loads(json.dumps(saved))
    del older["rows"]["all"]["val_draft_vocab_coverage"]  # A row measured before coverage was: filled in.
    out.with_suffix(".json").write_text(json.dumps(older))
    study.main(
        [
            "--render",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "runs"),
            "--base",
            "tiny",
            "--data-dir",
            str(tmp_path / "data"),
        ]
    )
    assert out.with_suffix(".md").read_text() == table
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == rows
