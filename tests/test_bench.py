"""eesd_jax.bench: what a benchmark report records."""

from eesd_jax import bench, eesd, exits


def test_report_counts_prompts_and_records_provenance(tiny):
    cfg, params = tiny
    ecfg = exits.ExitConfig(1)
    setup = bench.BenchSetup(cfg, params, exits.init_exit(cfg, params, ecfg), eesd.EESDConfig(exit_layer=1), eos_ids=())
    report = bench.run(setup, [[1, 2, 3], [4, 5, 6], [7, 8, 9]], max_new_tokens=2, modes=("ar",), batch=3, seed=5)
    assert report["config"]["n_prompts"] == 3
    assert report["modes"]["ar"]["new_tokens"] == 6
    prov = report["provenance"]
    assert prov["versions"]["jax"] and prov["device"]["platform"] and prov["seeds"] == {"seed": 5}
    assert "commit" in prov
