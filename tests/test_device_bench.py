"""experiments/device_bench.py --quick: one JSON with every figure, provenance and the device in its name."""

import json

import pytest
from helpers import load_experiment


@pytest.mark.slow
def test_quick_run_writes_one_complete_json(tmp_path):
    device_bench = load_experiment("device_bench")
    out = tmp_path / "result.json"
    assert device_bench.main(["--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (m,) = result["models"].values()
    assert result["copy_bandwidth_GBps"] > 0 and result["provenance"]["commit"] is not None
    assert set(m["verify_in_ar_steps"]) == {"1", "2", "4"} and all(v > 0 for v in m["verify_in_ar_steps"].values())
    assert m["ar_step_ms"] > 0 and m["draft_in_ar_steps"] > 0 and m["bandwidth_fraction"] > 0
    assert m["eesd_round_ms"] > 0 and m["eesd_round_parts_ms"] > 0
    assert m["eesd_round_overhead_ms"] == pytest.approx(m["eesd_round_ms"] - m["eesd_round_parts_ms"], abs=1e-3)
    assert m["weight_bytes_per_step"] > 0 and result["provenance"]["device"]["kind"] == result["device_kind"]
