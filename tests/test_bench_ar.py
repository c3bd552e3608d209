"""experiments/bench_ar.py: each side in a process of its own, compared on bench.run's definitions.

The sides themselves need the bundled model and torch (make bench); here they are stood in for by
records of their shape, written by a fake child process.
"""

import json
import pathlib
import sys

import pytest
from helpers import load_experiment


@pytest.fixture(scope="module")
def bench_ar():
    return load_experiment("bench_ar")


def ours_record(tokens, seconds):
    """What side_ours writes, for prompts of `tokens` decoded in `seconds` (first timed run)."""
    new = sum(len(t) for t in tokens)
    ar = {"tokens_per_second": round(new / sum(seconds), 2), "median_tokens_per_second": 0.0, "new_tokens": new}
    config = {"n_prompts": len(tokens), "max_new_tokens": 8, "repeats": 2, "prompts": "chat", "split": "heldout"}
    provenance = {"commit": "abc", "device": {"platform": "cpu"}}
    return {
        "report": {"modes": {"ar": ar}, "config": config, "provenance": provenance},
        "model": "m",
        "prompt_ids": [f"chat/{i}" for i in range(len(tokens))],
        "ids": [[1, 2, 3]] * len(tokens),
        "eos": [0],
        "tokens": tokens,
    }


def test_summary_compares_tokens_and_speed_on_the_same_definitions(bench_ar):
    ours = ours_record([[5, 6, 7, 8], [9, 9]], [0.5, 0.25])  # 6 tokens in 0.75 s: 8 tok/s.
    hf = {
        "rows": [{"tokens": [5, 6, 7, 8], "seconds": [1.0, 2.0]}, {"tokens": [9, 8], "seconds": [0.5, 0.25]}],
        "torch": "2.13.0",
        "torch_threads": 2,
    }
    s = bench_ar.summarize(ours, hf)
    assert s["transformers"]["tokens_per_second"] == 6 / 1.5
    assert s["transformers"]["median_tokens_per_second"] == (3.0 + 6.0) / 2  # Medians 3 and 6 tok/s.
    assert s["ratio"] == round(8 / 4, 3)
    assert [r["first_difference"] for r in s["per_prompt"]] == [None, 1]
    assert not s["identical"] and "chat/1: first differs at token 1" in bench_ar.markdown(s)
    assert s["provenance"] == ours["report"]["provenance"]


def test_each_side_runs_in_a_process_of_its_own(bench_ar, tmp_path, monkeypatch):
    calls = []

    def fake_run(argv, check):  # A child process: writes what the side writes.
        calls.append(argv)
        side, work = argv[argv.index("--side") + 1], pathlib.Path(argv[argv.index("--work") + 1])
        if side == "ours":
            record = ours_record([[1, 2]], [0.5])
        else:
            assert (work / "ours.json").is_file()  # transformers decodes the ids ours wrote.
            record = {"rows": [{"tokens": [1, 2], "seconds": [1.0]}], "torch": "t", "torch_threads": 1}
        (work / f"{side}.json").write_text(json.dumps(record))

    monkeypatch.setattr(bench_ar.subprocess, "run", fake_run)
    s = bench_ar.main(["--n-prompts", "1", "--max-new-tokens", "8", "--repeats", "1", "--out", str(tmp_path)])
    assert [c[c.index("--side") + 1] for c in calls] == ["ours", "hf"]
    assert all(c[:2] == [sys.executable, bench_ar.__file__] and "--max-new-tokens" in c for c in calls)
    assert s["identical"] and s["ratio"] == 2.0
    assert json.loads((tmp_path / "bench_ar.json").read_text()) == s
    assert "2.00x" in (tmp_path / "bench_ar.md").read_text()
