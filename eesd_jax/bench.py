"""Benchmark AR against EESD in one process, on the same prompts, after warm-up.

Reports per-mode tokens/s (medians over repeats), the speedup of EESD over AR,
whether greedy outputs are identical, and the hardware-independent figures:
acceptance rate alpha, mean accepted tokens per round tau (bonus included), mean
draft length, and the measured draft/target cost ratio c (one draft step through
layers [0, N) + exit + draft head, over one full-model step).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from eesd_jax import eesd, exits, generate, model, provenance
from eesd_jax.kv_cache import init_cache
from eesd_jax.model import ModelConfig, Params
from eesd_jax.sampling import SamplingConfig


@dataclasses.dataclass
class BenchSetup:
    cfg: ModelConfig
    params: Params
    exit_params: Params
    ecfg: eesd.EESDConfig
    eos_ids: tuple[int, ...]
    mesh: jax.sharding.Mesh | None = None


def _median_time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cost_ratio(setup: BenchSetup, cache_len: int = 512, repeats: int = 20) -> dict:
    """Measured seconds of one draft step and one target step (batch 1, one token)."""
    cfg, params, ep, n = setup.cfg, setup.params, setup.exit_params, setup.ecfg.exit_layer
    lower, _ = eesd.split_params(params, n)
    cache = init_cache(cfg.n_layers, 1, cache_len, cfg.n_kv_heads, cfg.head_dim, cfg.jnp_dtype)
    exit_cache = init_cache(1, 1, cache_len, cfg.n_kv_heads, cfg.head_dim, cfg.jnp_dtype)
    tok, pos = jnp.array([[1]]), jnp.array([[cache_len // 2]])

    @jax.jit
    def draft_step(params, lower, ep, cache, exit_cache):
        h, cache = model.run_layers(cfg, lower, model.embed(params, tok), pos, cache)
        logits, _ = exits.exit_logits(cfg, params, ep, h, pos, exit_cache)
        return jnp.argmax(logits, -1)

    @jax.jit
    def target_step(params, cache):
        logits, _ = model.forward(cfg, params, tok, pos, cache)
        return jnp.argmax(logits, -1)

    t_draft = _median_time(lambda: draft_step(params, lower, ep, cache, exit_cache), repeats)
    t_target = _median_time(lambda: target_step(params, cache), repeats)
    return {"draft_step_ms": 1e3 * t_draft, "target_step_ms": 1e3 * t_target, "cost_ratio": t_draft / t_target}


def run(
    setup: BenchSetup,
    prompts: list[list[int]],
    max_new_tokens: int,
    modes: tuple[str, ...] = ("ar", "eesd"),
    batch: int = 1,
    sampling: SamplingConfig = SamplingConfig(),
    repeats: int = 1,
    seed: int = 0,
    progress=None,
) -> dict:
    """Generate every prompt (in batches) with each mode; returns the report dict."""
    cfg, params = setup.cfg, setup.params
    split = eesd.split_params(params, setup.ecfg.exit_layer, setup.ecfg.context_layer)
    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]

    def one(mode, rows):
        if mode == "ar":
            return generate.generate_ar(
                cfg, params, rows, max_new_tokens, sampling, setup.eos_ids, seed, mesh=setup.mesh
            )
        return generate.generate_eesd(
            cfg, params, setup.exit_params, setup.ecfg, rows, max_new_tokens, sampling, setup.eos_ids, seed, split=split
        )

    # Warm-up: compile every shape the measured runs will use (prompt widths vary).
    for mode in modes:
        for rows in batches:
            one(mode, rows)
    report: dict = {"modes": {}}
    outputs: dict = {}
    for mode in modes:
        per_prompt_tps, gens = [], []
        for rows in batches:
            runs = [one(mode, rows) for _ in range(repeats)]
            per_prompt_tps.append(statistics.median(g.tokens_per_second for g in runs))
            gens.append(runs[0])
            if progress:
                progress(mode, runs[0])
        tokens = [t for g in gens for t in g.tokens]
        outputs[mode] = tokens
        new = sum(len(t) for t in tokens)
        seconds = sum(g.prefill_seconds + g.decode_seconds for g in gens)
        entry = {
            "median_tokens_per_second": round(statistics.median(per_prompt_tps), 2),
            "tokens_per_second": round(new / seconds, 2),
            "new_tokens": new,
            "seconds": round(seconds, 3),
        }
        if mode == "eesd":
            totals = {k: sum(sum(g.stats["per_row"][k]) for g in gens) for k in ("rounds", "drafted", "accepted")}
            entry.update(generate.speculation_stats(totals["rounds"], totals["drafted"], totals["accepted"]))
        report["modes"][mode] = entry
    if "ar" in modes and "eesd" in modes:
        ar, es = report["modes"]["ar"], report["modes"]["eesd"]
        report["speedup"] = round(es["tokens_per_second"] / ar["tokens_per_second"], 3)
        report["median_speedup"] = round(es["median_tokens_per_second"] / ar["median_tokens_per_second"], 3)
        report["identical"] = outputs["ar"] == outputs["eesd"] if sampling.greedy else None
    if "eesd" in modes:
        report.update({k: round(v, 4) for k, v in cost_ratio(setup).items()})
    report["config"] = {
        "exit_layer": setup.ecfg.exit_layer,
        "max_draft": setup.ecfg.max_draft,
        "controller": setup.ecfg.controller.kind,
        "n_prompts": len(prompts),
        "batch": batch,
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "repeats": repeats,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    report["provenance"] = provenance.record(seed=seed)
    return report


def format_table(report: dict) -> str:
    lines = [f"{'mode':6} {'tok/s':>9} {'median':>9} {'tokens':>7} {'alpha':>7} {'tau':>6} {'draft':>6}"]
    for mode, e in report["modes"].items():
        lines.append(
            f"{mode:6} {e['tokens_per_second']:9.2f} {e['median_tokens_per_second']:9.2f} {e['new_tokens']:7d} "
            f"{e.get('acceptance_rate', float('nan')):7.3f} {e.get('mean_accepted_per_round', float('nan')):6.2f} "
            f"{e.get('mean_draft_length', float('nan')):6.2f}"
        )
    if "speedup" in report:
        lines.append(
            f"speedup EESD/AR: {report['speedup']:.3f}x (median {report['median_speedup']:.3f}x), "
            f"identical: {report['identical']}"
        )
    if "cost_ratio" in report:
        lines.append(
            f"draft step {report['draft_step_ms']:.1f} ms, target step {report['target_step_ms']:.1f} ms, "
            f"cost ratio c = {report['cost_ratio']:.3f}"
        )
    return "\n".join(lines)
