"""One command that measures decoding costs on whatever device JAX sees, into one JSON.

    python experiments/device_bench.py            # ~minutes on a GPU/TPU; writes experiments/results/device_bench/<device>.json
    python experiments/device_bench.py --quick    # tiny shapes, few repeats: seconds on CPU (the test runs this)

For random weights at real shapes (bench.RANDOM_SHAPES: SmolLM2-135M, 1B, 8B; bfloat16 on
accelerators, float32 on CPU; shapes whose params do not fit are skipped and say why) and for
the bundled SmolLM2 when installed, batch 1, an untrained exit after layer N:

  * ar_step_ms, and bandwidth_fraction = (weight bytes one step reads / AR step) over the device's
    measured copy bandwidth (the memory-bandwidth floor: 1.0 would be at it);
  * verify_in_ar_steps[T]: T tokens through layers [N, L) + head, in AR steps (T = 1, 2, 4, 8);
  * draft_in_ar_steps: one draft step (layers [0, N) + the exit block + head), in AR steps;
  * loop overheads: the AR loop's ms per token against ar_step, and an EESD round (fixed controller,
    K drafts) against the sum of its parts ((K + 1) draft steps + verify(K + 1)): what the
    while-loop, lax.switch and controller add per round.

Parts are timed by eesd_jax.bench.step_costs (the same code `eesd bench` and round_costs.py use);
provenance (versions, commit, device) by eesd_jax.provenance.record().
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp

from eesd_jax import bench, control, costs, eesd, exits, loading, model, provenance

RESULTS = pathlib.Path(__file__).parent / "results"
EXIT_LAYER = {"smollm2": 3, "1b": 2, "8b": 4, "bundled": 2}  # N per model.


def loop_costs(cfg, params, exit_params, n: int, max_draft: int, max_new: int) -> dict:
    """ms per token of the AR loop and ms per round of the EESD loop (fixed K), second (warm) runs."""
    prompt = bench.random_prompts(1, cfg.vocab_size, seed=1, lengths=(32, 33))
    ecfg = eesd.EESDConfig(exit_layer=n, max_draft=max_draft, controller=control.ControllerConfig(kind="fixed"))
    setup = bench.BenchSetup(cfg, params, exit_params, ecfg, eos_ids=())
    runs = bench.run(setup, prompt, max_new, step_costs=False).generations  # After a warm-up (compile) run.
    ar, es = runs["ar"][0], runs["eesd"][0]
    rounds = es.stats["rounds"]
    return {
        "ar_loop_ms_per_token": 1e3 * ar.decode_seconds / max(ar.stats["forward_passes"] - 1, 1),
        "eesd_ms_per_round": 1e3 * es.decode_seconds / max(rounds, 1),
        "eesd_mean_draft_length": es.stats["mean_draft_length"],
        "eesd_block_sizes": list(ecfg.block_sizes),
    }


def measure(cfg, params, n: int, args) -> dict:
    """Every figure of one model (see the module docstring)."""
    params = model.decode_layout(params)
    exit_params = exits.init_exit(cfg, params, exits.ExitConfig(n))
    ms = bench.step_costs(bench.step_parts(cfg, params, exit_params, [n], args.tokens, args.cache_len), args.repeats)
    ar, draft = ms["ar_step"], costs.draft_ms(ms, n)
    loops = loop_costs(cfg, params, exit_params, n, args.max_draft, args.max_new)
    # A fixed-K round drafts k = mean draft length tokens: k + 1 draft steps and one verify of the
    # smallest bucket >= k + 1 (rounds near the end draft fewer; the mean covers them).
    k = loops["eesd_mean_draft_length"]
    bucket = min(b for b in loops["eesd_block_sizes"] if b >= round(k) + 1)
    parts = (k + 1) * draft + ms.get(f"verify_N{n}_T{bucket}", float("nan"))
    weight_bytes = bench.weight_bytes_per_step(cfg)
    floor_ms = 1e3 * weight_bytes / args.bandwidth
    return {
        "dtype": cfg.dtype,
        "shape": {
            f: getattr(cfg, f) for f in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
        },
        "exit_layer": n,
        "weight_bytes_per_step": weight_bytes,
        "ar_step_ms": round(ar, 4),
        "bandwidth_floor_ms": round(floor_ms, 4),
        "bandwidth_fraction": round(floor_ms / ar, 4),
        "verify_in_ar_steps": {t: round(ms[f"verify_N{n}_T{t}"] / ar, 4) for t in args.tokens},
        "draft_in_ar_steps": round(draft / ar, 4),
        "lower_ms": round(ms[f"lower_N{n}"], 4),
        "exit_ms": round(ms["exit_step"], 4),
        "ar_loop_overhead_ms": round(loops["ar_loop_ms_per_token"] - ar, 4),
        "eesd_round_ms": round(loops["eesd_ms_per_round"], 4),
        "eesd_round_parts_ms": round(parts, 4),
        "eesd_round_overhead_ms": round(loops["eesd_ms_per_round"] - parts, 4),
        "eesd_mean_draft_length": k,
        "ms": {name: round(v, 4) for name, v in ms.items()},
    }


def models(args):
    """(name, thunk -> (cfg, params)) of every model to measure."""
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if args.quick:  # The SmolLM2 shape, shrunk.
        yield "smollm2-tiny", 1, lambda: bench.random_model("smollm2", dtype, n_layers=3, vocab_size=512)
        return
    for shape in args.shapes:
        yield shape, EXIT_LAYER[shape], lambda shape=shape: bench.random_model(shape, dtype)
    try:
        loading.bundled_model_path()
    except loading.CheckpointError:
        return

    def bundled():
        lm = loading.load_model(None, dtype)
        return lm.cfg, jax.tree.map(jnp.asarray, lm.params)

    yield "bundled", EXIT_LAYER["bundled"], bundled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shape, few repeats (a smoke test)")
    ap.add_argument("--shapes", nargs="+", default=list(bench.RANDOM_SHAPES), choices=list(bench.RANDOM_SHAPES))
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: bfloat16 on accelerators, float32 on CPU",
    )
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--max-draft", type=int, default=3, help="K of the fixed-K EESD rounds (overhead figure)")
    ap.add_argument("--max-new", type=int, default=64, help="tokens of the loop-overhead runs")
    ap.add_argument("--out", default=None, help="default: experiments/results/device_bench/<device>.json")
    args = ap.parse_args(argv)
    args.tokens = [1, 2, 4, 8]
    if args.quick:
        args.cache_len, args.repeats, args.max_new, args.tokens = 128, 3, 12, [1, 2, 4]
    t_start = time.perf_counter()
    args.bandwidth = costs.copy_bandwidth((64 if args.quick else 1024) << 20, args.repeats)
    kind = jax.devices()[0].device_kind
    out = {
        "device_kind": kind,
        "copy_bandwidth_GBps": round(args.bandwidth / 1e9, 2),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "batch": 1,
        "cache_len": args.cache_len,
        "repeats": args.repeats,
        "models": {},
        "skipped": {},
    }
    for name, n, make in models(args):
        t0 = time.perf_counter()
        try:
            cfg, params = make()
        except ValueError as e:  # Would not fit (bench.check_fits).
            out["skipped"][name] = str(e)
            print(f"{name}: skipped: {e}", file=sys.stderr, flush=True)
            continue
        out["models"][name] = measure(cfg, params, n, args)
        out["models"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        del params
        m = out["models"][name]
        print(
            f"{name} ({m['dtype']}): AR {m['ar_step_ms']:.2f} ms ({100 * m['bandwidth_fraction']:.0f}% of the "
            f"bandwidth floor), verify {m['verify_in_ar_steps']} AR steps, draft {m['draft_in_ar_steps']} AR steps, "
            f"EESD round overhead {m['eesd_round_overhead_ms']:.2f} ms",
            file=sys.stderr,
            flush=True,
        )
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["provenance"] = provenance.record()
    slug = re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")
    path = (
        pathlib.Path(args.out)
        if args.out
        else RESULTS / "device_bench" / f"{slug}{'_quick' if args.quick else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
