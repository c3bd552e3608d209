"""Where an EESD round's time goes: the measured cost of each part, against one AR step.

The round-cost model (eesd_jax.costs): round(k) ~= (k + 1) * draft_step + verify(T = k + 1) and
speedup ~= tau * ar_step / round(k). This script times each part alone (bench.step_costs:
jitted, batch 1, the cache donated so writes stay in place, medians of interleaved repeats) on
the bundled SmolLM2, and prints the predicted speedup for a given tau. Comparing the prediction
with `eesd bench` gives the loop's own overhead. Every part is a real call of the library's
model / exit code. Beside the AR step: the weight bytes one step reads, the measured read
bandwidth (a jitted sum over a large array) and the bandwidth floor (bytes / bandwidth).

  python experiments/round_costs.py --exit-layers 2 4 6 8 --cache-len 512
  python experiments/round_costs.py --exit-layers 2 --tokens 1 2 4 8 --json      # JSON on stdout
  python experiments/round_costs.py --json out.json --dtype bfloat16
  EESD_CPU_KERNEL=0 python experiments/round_costs.py ...   # XLA's dot instead of the CPU kernel
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

import jax
import jax.numpy as jnp

from eesd_jax import bench, costs, cpu_kernel, loading, model


def report(saved: dict, exit_layers, tokens) -> None:
    ms, draft_vocab = saved["ms"], saved["draft_vocab"]
    ar = ms["ar_step"]
    print(f"AR step {ar:.1f} ms; exit block + head ({draft_vocab or 'all'} rows) {ms['exit_step']:.1f} ms")
    if "bandwidth_floor_ms" in saved:
        print(
            f"weights per step {saved['weight_bytes_per_step'] / 1e6:.0f} MB ({saved['dtype']}), read bandwidth "
            f"{saved['read_bandwidth_GBps']:.1f} GB/s: floor {saved['bandwidth_floor_ms']:.1f} ms = "
            f"{saved['floor_over_ar_step']:.2f} of the AR step; {saved['cpu_kernel']}"
        )
    print(f"{'N':>3} {'draft ms':>9} {'c':>6}  " + "  ".join(f"{'verify T=' + str(t):>11}" for t in tokens))
    for n in exit_layers:
        draft = costs.draft_ms(ms, n)
        row = "  ".join(f"{ms[f'verify_N{n}_T{t}']:7.1f} ({ms[f'verify_N{n}_T{t}'] / ar:4.2f})" for t in tokens)
        print(f"{n:3d} {draft:9.1f} {draft / ar:6.3f}  {row}")
    print("verify in ms (in AR steps). Break-even tau for a round of k drafts: ((k+1)*draft + verify(k+1)) / AR.")
    ks = [k for k in range(1, 8) if k + 1 in tokens]
    for n in exit_layers:
        need = {k: costs.round_ms(ms, n, k) / ar for k in ks}
        print(
            f"N={n}: tau needed for 1.0x / 1.5x: "
            + ", ".join(f"k={k}: {v:.2f} / {1.5 * v:.2f}" for k, v in need.items())
        )
    accs = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    print(f"Predicted speedup at per-token acceptance p (best k of {ks}), and the p that 1.0x / 1.5x / 2x need:")
    print(f"{'N':>3}  " + " ".join(f"{'p=' + str(p):>6}" for p in accs) + "   1.0x   1.5x     2x")
    for n in exit_layers:
        best = [max(costs.predicted_speedup(ms, n, k, p) for k in ks) for p in accs]
        need = [costs.acceptance_needed(ms, n, ks, target) for target in (1.0, 1.5, 2.0)]
        print(f"{n:3d}  " + " ".join(f"{s:6.2f}" for s in best) + "  " + " ".join(f"{p:6.2f}" for p in need))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exit-layers", type=int, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8], help="verification block sizes T")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="draft head rows (0 = the full shared head)")
    ap.add_argument("--cache-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="of each part's repeats (and the bandwidth's): min on a machine busy with other work",
    )
    ap.add_argument("--dtype", choices=model.DTYPES, default="float32")
    ap.add_argument("--bandwidth-mb", type=int, default=1024, help="array size of the bandwidth measurement")
    ap.add_argument(
        "--json", nargs="?", const="-", help="also write the figures here (no path: stdout, report to stderr)"
    )
    ap.add_argument("--load", help="print the analysis of figures an earlier run wrote with --json; time nothing")
    args = ap.parse_args()
    if args.load:
        with open(args.load) as f:
            report(json.load(f), args.exit_layers, args.tokens)
        return

    loaded = loading.load_model(None, dtype=args.dtype)
    cfg = loaded.cfg
    params = model.decode_layout(jax.tree.map(jnp.asarray, loaded.params))
    stat = {"median": statistics.median, "min": min}[args.stat]
    bandwidth = costs.read_bandwidth(args.bandwidth_mb << 20, args.repeats, stat)
    ms = costs.measure(cfg, params, args.exit_layers, args.tokens, args.draft_vocab, args.cache_len, args.repeats, stat)
    weight_bytes = bench.weight_bytes_per_step(cfg)
    floor_ms = 1e3 * weight_bytes / bandwidth
    saved = {
        "ms": {k: round(v, 3) for k, v in ms.items()},
        "cache_len": args.cache_len,
        "draft_vocab": args.draft_vocab,
        "stat": args.stat,
        "dtype": cfg.dtype,
        "weight_bytes_per_step": weight_bytes,
        "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "bandwidth_floor_ms": round(floor_ms, 3),
        "floor_over_ar_step": round(floor_ms / ms["ar_step"], 3),
        "in_ar_steps": {k: round(v / ms["ar_step"], 3) for k, v in ms.items()},
        "draft_in_ar_steps": {n: round(costs.draft_ms(ms, n) / ms["ar_step"], 3) for n in args.exit_layers},
        "cpu_kernel": cpu_kernel.status() if jax.default_backend() == "cpu" else "not on CPU",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    with contextlib.redirect_stdout(sys.stderr if args.json == "-" else sys.stdout):
        report(saved, args.exit_layers, args.tokens)
    if args.json == "-":
        json.dump(saved, sys.stdout, indent=1)
        print()
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)


if __name__ == "__main__":
    main()
