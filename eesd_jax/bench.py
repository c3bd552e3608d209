"""Benchmark AR against EESD in one process, on the same prompts, after warm-up.

Reports per-mode tokens/s (medians over repeats), the speedup of EESD over AR,
whether greedy outputs are identical, and the hardware-independent figures:
acceptance rate alpha, mean accepted tokens per round tau (bonus included), mean
draft length, the measured draft/target cost ratio c (one draft step through
layers [0, N) + exit + draft head, over one full-model step), and on request the
acceptance by draft position (from one traced EESD pass after the timed ones).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import eesd, exits, generate, model, outcomes, provenance, shapes, sharding
from eesd_jax.kv_cache import init_cache, round_up
from eesd_jax.model import ModelConfig, Params
from eesd_jax.sampling import SamplingConfig, argmax


@dataclasses.dataclass
class BenchSetup:
    cfg: ModelConfig
    params: Params
    exit_params: Params
    ecfg: eesd.EESDConfig
    eos_ids: tuple[int, ...]
    mesh: jax.sharding.Mesh | None = None


# Exactness policy (see first_mismatches): greedy EESD and greedy AR compute the same logits with
# differently shaped kernels (AR one token, verification a block of T), so they agree only up to
# floating-point rounding. In float32 at full matmul precision (XLA:CPU always; elsewhere with
# jax_default_matmul_precision=highest) that rounding is ~1e-6 and outputs are identical. In
# bfloat16, or float32 with the TF32/bf16 matmul passes accelerators use by default, logits move
# by up to ~1e-2 (TF32) or a few tenths (bf16). A greedy mismatch is accepted only where AR's own
# top-2 logit margin at the first differing position is below TIE_MARGIN[dtype]: a near-tie that
# rounding may break either way. A mismatch at a larger margin is a bug.
TIE_MARGIN = {"float32": 0.05, "bfloat16": 0.5}
EXACTNESS_POLICY = (
    "greedy EESD == greedy AR token for token, except at near-ties: a first differing position "
    "where AR's top-2 logit margin is below tie_margin (rounding of differently shaped kernels)"
)

# Real model shapes for benchmarks on random weights (no checkpoint needed).
RANDOM_SHAPES = {key: ModelConfig(**shapes.SHAPES[key], name=f"random-{key}") for key in ("smollm2", "1b", "8b")}


def param_bytes(cfg: ModelConfig) -> int:
    """Bytes of the model's params in cfg.dtype."""
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def weight_bytes_per_step(cfg: ModelConfig) -> int:
    """Weight bytes one decode step must read: all params, less an untied embedding (one row is read)."""
    untied_embed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model * cfg.jnp_dtype.itemsize
    return param_bytes(cfg) - untied_embed


def available_memory(device=None) -> int | None:
    """Free bytes on `device` (default: the first): the accelerator's, or the host's MemAvailable; None if unknown."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits(cfg: ModelConfig, what: str, fraction: float = 0.7) -> None:
    """Raise ValueError when the params would take more than `fraction` of the free device memory."""
    need, free = param_bytes(cfg), available_memory()
    if free is not None and need > fraction * free:
        hint = " (try --dtype bfloat16: half the bytes)" if cfg.dtype == "float32" else ""
        raise ValueError(
            f"{what} in {cfg.dtype} needs {need / 1e9:.1f} GB of params; {jax.devices()[0].device_kind} has "
            f"{free / 1e9:.1f} GB free and the caches and activations need the rest{hint}"
        )


def random_model(shape: str, dtype: str = "float32", seed: int = 0, **overrides) -> tuple[ModelConfig, Params]:
    """(cfg, params) of random weights (model.init_params, drawn on device) at a named real shape.

    overrides replace ModelConfig fields (tests shrink a shape). Refused with ValueError when the
    params would not fit in memory.
    """
    if shape not in RANDOM_SHAPES:
        raise ValueError(f"unknown random shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    cfg = dataclasses.replace(RANDOM_SHAPES[shape], dtype=dtype, **overrides)
    check_fits(cfg, f"random {shape} weights")
    return cfg, jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(seed))


def random_prompts(n: int, vocab_size: int, seed: int = 0, lengths: tuple[int, int] = (16, 96)) -> list[list[int]]:
    """n prompts of random token ids, of random lengths in [lengths[0], lengths[1]) (random-weight benches)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, rng.integers(*lengths)).tolist() for _ in range(n)]


def step_parts(
    cfg: ModelConfig,
    params: Params,
    exit_params: Params,
    exit_layers=(),
    tokens=(),
    cache_len: int = 512,
    widths=(),
) -> dict:
    """The parts of decoding `step_costs` times, batch 1 at position cache_len // 2: name -> (jitted
    fn(cache) -> (out, cache), its fresh cache).

    Parts: "ar_step" (one token through the whole model + head), "exit_step" (the exit block +
    its head on one token), and for each N in exit_layers "lower_N{N}" (one token through layers
    [0, N)), "draft_N{N}" (a draft step: both in one program, as the decode loop runs them),
    "leaf_N{N}" (layers [0, N) and only the exit's keys/values: a draft tree's deepest depth) and
    for each T in tokens "verify_N{N}_T{T}" (T tokens through layers [N, L) + head); for each W in
    widths also "exit_step_W{W}", "lower_N{N}_W{W}", "draft_N{N}_W{W}" and "leaf_N{N}_W{W}": W
    tokens at once (a draft tree's depth).
    Each part is jitted with its cache donated (writes stay in place, as in the decode loops); a
    draft part's cache is the pair (LLM cache, exit cache).
    """
    S, pos = cache_len, cache_len // 2
    tok, pos_11 = jnp.array([[5]]), jnp.array([[pos]])
    parts = {}  # name -> (jitted fn(cache) -> (out, cache), its cache's layer count)
    # Draft parts of W tokens: name suffix, token ids, positions.
    drafts = [("", tok, pos_11)] + [(f"_W{w}", jnp.full((1, w), 5), pos + jnp.arange(w)[None]) for w in widths]

    def ar_step(params, cache):
        logits, cache = model.forward(cfg, params, tok, pos_11, cache)
        return argmax(logits), cache

    parts["ar_step"] = (functools.partial(jax.jit(ar_step, donate_argnums=1), params), cfg.n_layers)

    for suffix, _, pos_bw in drafts:

        def exit_step(params, ep, cache, pos_bw=pos_bw):
            h = jnp.ones((1, pos_bw.shape[1], cfg.d_model), cfg.jnp_dtype)
            logits, cache = exits.exit_logits(cfg, params, ep, h, pos_bw, cache)
            return argmax(logits), cache

        parts[f"exit_step{suffix}"] = (functools.partial(jax.jit(exit_step, donate_argnums=2), params, exit_params), 1)
    for n in exit_layers:
        lower, upper = model.split_layers(params["layers"], n)
        for suffix, tok_bw, pos_bw in drafts:

            def lower_step(params, lower, cache, tok_bw=tok_bw, pos_bw=pos_bw):
                return model.run_layers(cfg, lower, model.embed(params, tok_bw), pos_bw, cache)

            fn = functools.partial(jax.jit(lower_step, donate_argnums=2), params, lower)
            parts[f"lower_N{n}{suffix}"] = (fn, cfg.n_layers)

            def draft_step(params, lower, ep, caches, tok_bw=tok_bw, pos_bw=pos_bw):
                x, cache = model.run_layers(cfg, lower, model.embed(params, tok_bw), pos_bw, caches[0])
                logits, exit_cache = exits.exit_logits(cfg, params, ep, x, pos_bw, caches[1])
                return argmax(logits), (cache, exit_cache)

            fn = functools.partial(jax.jit(draft_step, donate_argnums=3), params, lower, exit_params)
            parts[f"draft_N{n}{suffix}"] = (fn, (cfg.n_layers, 1))

            def leaf_step(params, lower, ep, caches, tok_bw=tok_bw, pos_bw=pos_bw):
                x, cache = model.run_layers(cfg, lower, model.embed(params, tok_bw), pos_bw, caches[0])
                _, exit_cache = exits.exit_write(cfg, ep, x, pos_bw, caches[1])
                return x, (cache, exit_cache)

            fn = functools.partial(jax.jit(leaf_step, donate_argnums=3), params, lower, exit_params)
            parts[f"leaf_N{n}{suffix}"] = (fn, (cfg.n_layers, 1))
        for t in tokens:

            def verify(params, upper, cache, t=t, n=n):
                x = jnp.ones((1, t, cfg.d_model), cfg.jnp_dtype)
                x, cache = model.run_layers(cfg, upper, x, pos + jnp.arange(t)[None], cache, n)
                return argmax(model.lm_head(params, model.final_norm(params, cfg, x))), cache

            fn = functools.partial(jax.jit(verify, donate_argnums=2), params, upper)
            parts[f"verify_N{n}_T{t}"] = (fn, cfg.n_layers)
    fresh = lambda n_layers: init_cache(cfg, 1, S, layers=n_layers)  # noqa: E731
    return {
        name: (fn, tuple(map(fresh, n_layers)) if isinstance(n_layers, tuple) else fresh(n_layers))
        for name, (fn, n_layers) in parts.items()
    }


def step_costs(parts: dict, repeats: int = 15, stat=statistics.median) -> dict[str, float]:
    """Milliseconds of each of `step_parts`' parts (`stat` of the repeats: statistics.median; min on a
    machine busy with other work), compiled first, then timed in interleaved repeats so drifting
    machine load hits all alike.
    """
    caches = {}
    for name, (fn, cache) in parts.items():  # Compile and warm up.
        out, caches[name] = fn(cache)
        jax.block_until_ready(out)
    times = {name: [] for name in parts}
    for _ in range(repeats):
        for name, (fn, _) in parts.items():
            t0 = time.perf_counter()
            out, caches[name] = fn(caches[name])
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * stat(v) for name, v in times.items()}


def cost_ratio(setup: BenchSetup, cache_len: int = 512, repeats: int = 20) -> dict:
    """Measured ms of one draft step (layers [0, N) + exit) and one target step (batch 1, one token)."""
    n = setup.ecfg.exit_layer
    ms = step_costs(step_parts(setup.cfg, setup.params, setup.exit_params, [n], (), cache_len), repeats)
    draft = ms[f"draft_N{n}"]
    return {"draft_step_ms": draft, "target_step_ms": ms["ar_step"], "cost_ratio": draft / ms["ar_step"]}


def first_mismatches(setup: BenchSetup, prompts, ar_tokens, eesd_tokens) -> list[dict]:
    """Where greedy EESD left greedy AR, per differing prompt, with AR's top-2 logit margin there.

    The margin is recomputed with one uncached forward over the prompt + AR's tokens before the
    first differing position. Returns [{"prompt", "position", "ar_token", "eesd_token",
    "ar_top2_margin", "ar_minus_eesd_logit", "near_tie"}]; tokens are None past an output's end.
    """
    out = []
    for i, (prompt, ar, es) in enumerate(zip(prompts, ar_tokens, eesd_tokens, strict=True)):
        if ar == es:
            continue
        pos = next((j for j, (a, e) in enumerate(zip(ar, es)) if a != e), min(len(ar), len(es)))
        logits_v = prefix_logits(setup.cfg, setup.params, list(prompt) + list(ar[:pos]))
        top2 = np.sort(logits_v)[-2:]
        ar_tok, es_tok = (ar[pos] if pos < len(ar) else None), (es[pos] if pos < len(es) else None)
        margin = float(top2[1] - top2[0])
        out.append(
            {
                "prompt": i,
                "position": pos,
                "ar_token": ar_tok,
                "eesd_token": es_tok,
                "ar_top2_margin": margin,
                "ar_minus_eesd_logit": None if None in (ar_tok, es_tok) else float(logits_v[ar_tok] - logits_v[es_tok]),
                "near_tie": margin < TIE_MARGIN[setup.cfg.dtype],
            }
        )
    return out


def prefix_logits(cfg: ModelConfig, params: Params, tokens: list[int]) -> np.ndarray:
    """[V] float32 logits after `tokens`, from one forward over them (padded, so nearby lengths share a compile)."""
    T = round_up(len(tokens), 64)
    padded = np.zeros((1, T), np.int32)
    padded[0, : len(tokens)] = tokens  # Causal: the padding after cannot change earlier logits.
    logits = model.forward_uncached(cfg, params, jnp.asarray(padded))
    return sharding.fetch(logits)[0, len(tokens) - 1]  # Vocab-split over hosts: gathered on every process.


def free_executables_near_map_limit(fraction: float = 0.4) -> None:
    """Drop jax's compiled executables once this process holds `fraction` of the kernel's memory-map limit.

    XLA:CPU keeps every executable mapped, and a study of ~30 EESD configurations on the bundled
    model exceeded vm.max_map_count (65530: "LLVM compilation error: Cannot allocate memory", then
    a segfault). Clearing only near the limit keeps what runs share compiled (AR, repeated configs).
    """
    try:
        limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps") as maps:
            used = sum(1 for _ in maps)
    except (OSError, ValueError):  # No such limit known here (not Linux).
        return
    if used > fraction * limit:
        jax.clear_caches()


@dataclasses.dataclass
class Measurement:
    """bench.run's result: the report, and per mode the first timed Generation of each batch."""

    report: dict
    generations: dict[str, list[generate.Generation]]


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
    step_costs: bool = True,
    by_position: bool = False,
    warmup: bool = True,
) -> Measurement:
    """Generate every prompt (in batches) with each mode, after a warm-up; the AR-vs-EESD timing harness.

    warmup: first run every batch once with each mode, untimed (compiles every shape the measured
    runs use; prompt widths vary). step_costs: also time one draft step against one AR step
    (cost_ratio) when EESD runs. by_position: also decode the prompts once more with EESD traced
    (EESDConfig.trace, outside the timing) and report acceptance by draft position 1..J
    (outcomes.acceptance_by_position)."""
    cfg, params = setup.cfg, setup.params
    split = eesd.split_params(params, setup.ecfg.exit_layer, setup.ecfg.context_layer, setup.ecfg.fuse_layers)
    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]

    def one(mode, rows, ecfg=setup.ecfg):
        if mode == "ar":
            return generate.generate_ar(
                cfg, params, rows, max_new_tokens, sampling, setup.eos_ids, seed, mesh=setup.mesh
            )
        return generate.generate_eesd(
            cfg,
            params,
            setup.exit_params,
            ecfg,
            rows,
            max_new_tokens,
            sampling,
            setup.eos_ids,
            seed,
            split=split,
            mesh=setup.mesh,
        )

    if warmup:
        for mode in modes:
            for rows in batches:
                one(mode, rows)
    report: dict = {"modes": {}}
    outputs: dict = {}
    generations: dict = {}
    for mode in modes:
        per_prompt_tps, per_prompt_decode, gens = [], [], []
        for rows in batches:
            runs = [one(mode, rows) for _ in range(repeats)]
            per_prompt_tps.append(statistics.median(g.tokens_per_second for g in runs))
            per_prompt_decode.append(statistics.median(g.new_tokens / max(g.decode_seconds, 1e-9) for g in runs))
            gens.append(runs[0])
            if progress:
                progress(mode, runs[0])
        generations[mode] = gens
        tokens = [t for g in gens for t in g.tokens]
        outputs[mode] = tokens
        new = sum(len(t) for t in tokens)
        seconds = sum(g.prefill_seconds + g.decode_seconds for g in gens)
        entry = {
            "median_tokens_per_second": round(statistics.median(per_prompt_tps), 2),
            "median_decode_tokens_per_second": round(statistics.median(per_prompt_decode), 2),  # Prefill excluded.
            "tokens_per_second": round(new / seconds, 2),
            "new_tokens": new,
            "seconds": round(seconds, 3),
            # Compares outputs across runs (e.g. EESD_CPU_KERNEL=0 against the kernel) without storing them.
            "tokens_sha1": hashlib.sha1(str(tokens).encode()).hexdigest()[:16],
        }
        if mode == "eesd":
            totals = {k: sum(sum(g.stats["per_row"][k]) for g in gens) for k in ("rounds", "drafted", "accepted")}
            entry.update(generate.speculation_stats(totals["rounds"], totals["drafted"], totals["accepted"]))
            if by_position:
                traced = [one(mode, rows, dataclasses.replace(setup.ecfg, trace=True)) for rows in batches]
                judged = outcomes.drafts([g.trace for g in traced], [g.stats["per_row"]["rounds"] for g in traced])
                entry["acceptance_by_position"] = outcomes.acceptance_by_position(judged, setup.ecfg.max_draft)
        report["modes"][mode] = entry
    if "ar" in modes and "eesd" in modes:
        ar, es = report["modes"]["ar"], report["modes"]["eesd"]
        report["speedup"] = round(es["tokens_per_second"] / ar["tokens_per_second"], 3)
        report["median_speedup"] = round(es["median_tokens_per_second"] / ar["median_tokens_per_second"], 3)
        report["identical"] = outputs["ar"] == outputs["eesd"] if sampling.greedy else None
        if sampling.greedy:
            mismatches = first_mismatches(setup, prompts, outputs["ar"], outputs["eesd"])
            report["mismatches"] = mismatches
            report["exactness"] = {
                "policy": EXACTNESS_POLICY,
                "tie_margin": TIE_MARGIN[cfg.dtype],
                "within_policy": all(m["near_tie"] for m in mismatches),
            }
    if "eesd" in modes and step_costs:
        report.update({k: round(v, 4) for k, v in cost_ratio(setup).items()})
    report["config"] = {
        "exit_layer": setup.ecfg.exit_layer,
        "max_draft": setup.ecfg.max_draft,
        "controller": setup.ecfg.controller.kind,
        "tree": setup.ecfg.tree,
        "tree_width": setup.ecfg.tree_width,
        "tree_stop": setup.ecfg.tree_stop,
        "tree_width_stop": setup.ecfg.tree_width_stop,
        "n_prompts": len(prompts),
        "batch": batch,
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "repeats": repeats,
        "dtype": cfg.dtype,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    report["provenance"] = provenance.record(seed=seed)
    return Measurement(report, generations)


def format_table(report: dict) -> str:
    lines = [f"{'mode':6} {'tok/s':>9} {'median':>9} {'tokens':>7} {'alpha':>7} {'tau':>6} {'draft':>6}"]
    for mode, e in report["modes"].items():
        lines.append(
            f"{mode:6} {e['tokens_per_second']:9.2f} {e['median_tokens_per_second']:9.2f} {e['new_tokens']:7d} "
            f"{e.get('acceptance_rate', float('nan')):7.3f} {e.get('mean_accepted_per_round', float('nan')):6.2f} "
            f"{e.get('mean_draft_length', float('nan')):6.2f}"
        )
    by_position = report["modes"].get("eesd", {}).get("acceptance_by_position")
    if by_position:
        rates = " ".join("-" if p["rate"] is None else f"{p['rate']:.2f}" for p in by_position)
        lines.append(f"acceptance by draft position 1..{len(by_position)} (given the prefix stood): {rates}")
    if "speedup" in report:
        lines.append(
            f"speedup EESD/AR: {report['speedup']:.3f}x (median {report['median_speedup']:.3f}x), "
            f"identical: {report['identical']}"
        )
    for m in report.get("mismatches", []):
        lines.append(
            f"  prompt {m['prompt']}: first differs at token {m['position']} (AR {m['ar_token']}, EESD "
            f"{m['eesd_token']}); AR top-2 margin {m['ar_top2_margin']:.4f} "
            f"({'near-tie' if m['near_tie'] else 'NOT a near-tie'}: tie margin {report['exactness']['tie_margin']})"
        )
    if "cost_ratio" in report:
        lines.append(
            f"draft step {report['draft_step_ms']:.1f} ms, target step {report['target_step_ms']:.1f} ms, "
            f"cost ratio c = {report['cost_ratio']:.3f}"
        )
    return "\n".join(lines)
