"""Choose the exit layer N by measurement: train an exit per N, bench each, then each controller.

For every N: `eesd distill --config smollm2:N=<N>,<overrides>` (skipped if its exit
exists; all N share one generated data dir, so the LLM generates once). Then, in one
process on the same held-out prompts (HumanEval and chat held-out splits), greedy,
batch 1: AR vs EESD for every N with the default controller, and every controller for
the fastest N. Each bench runs AR and EESD after warm-up (eesd_jax.bench.run) and reports
tokens/s, speedup, whether the outputs are identical, acceptance rate alpha and tau.

  python experiments/exit_sweep.py --layers 2 4 6 8 --workdir runs/sweep \\
      --overrides data.dir=runs/data,data.feature_layers=2+4+6+8,... --out experiments/results/exit_sweep/exit_sweep
  python experiments/exit_sweep.py --exits A.safetensors B.safetensors   # bench given exits, no training
  python experiments/exit_sweep.py --exits eesd_jax/data/exits/*.safetensors --repeats 3 \\
      --controllers beta-ts confidence:threshold=0.4 calibration-ts:break_even=0.4
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from eesd_jax import bench, control, engine, prompts, train
from eesd_jax.configs import load_config


def train_exits(layers, overrides: str, workdir: pathlib.Path) -> dict[int, pathlib.Path]:
    paths = {}
    for n in layers:
        run_dir = workdir / f"N{n}"
        path = run_dir / f"exit_N{n}.safetensors"
        if not path.is_file():
            t0 = time.perf_counter()
            train.run_distill(load_config(f"smollm2:N={n}" + (f",{overrides}" if overrides else "")), run_dir)
            print(f"N={n}: trained in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
        paths[n] = path
    return paths


def held_out_prompts(session, n_per_set: int) -> list[list[int]]:
    chosen = []
    for source in ("humaneval", "chat"):
        chosen += prompts.load_prompts(source, "heldout", n_per_set)
    return [engine.encode_prompt(session, p.text, p.chat) for p in chosen]


def bench_one(session, exit_path, controller: str, max_draft: int, ids, max_new_tokens: int, repeats: int = 1) -> dict:
    bench.free_executables_near_map_limit()  # Every configuration compiles new loops (see there).
    eng = engine.eesd_engine(session, exit_path, max_draft=max_draft, controller=controller)
    report = bench.run(engine.bench_setup(session, eng), ids, max_new_tokens, repeats=repeats).report
    es = report["modes"]["eesd"]
    row = {
        "exit": pathlib.Path(exit_path).name,
        "N": eng.ecfg.exit_layer,
        "controller": controller,
        "max_draft": max_draft,
        "ar_tok_s": report["modes"]["ar"]["tokens_per_second"],
        "eesd_tok_s": es["tokens_per_second"],
        "speedup": report["speedup"],
        "median_speedup": report["median_speedup"],
        "identical": report["identical"],
        "alpha": round(es["acceptance_rate"], 3),
        "tau": round(es["mean_accepted_per_round"], 3),
        "mean_draft": round(es["mean_draft_length"], 3),
        "cost_ratio": round(report["cost_ratio"], 3),
    }
    print(json.dumps(row), flush=True)
    return row


def table(rows) -> str:
    head = "| exit | N | controller | K | AR tok/s | EESD tok/s | speedup | identical | α | τ | mean draft | c |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['exit']} | {r['N']} | {r['controller']} | {r['max_draft']} | {r['ar_tok_s']:.2f} | {r['eesd_tok_s']:.2f} | "
            f"{r['speedup']:.2f}x | {r['identical']} | {r['alpha']:.3f} | {r['tau']:.2f} | {r['mean_draft']:.2f} | "
            f"{r['cost_ratio']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--exits", nargs="+", help="bench these exit files instead of training one per N")
    ap.add_argument("--overrides", default="", help="config overrides shared by every N (smollm2 config)")
    ap.add_argument("--workdir", default="runs/sweep")
    ap.add_argument("--n-per-set", type=int, default=4, help="held-out prompts per set (humaneval, chat)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--controller", default=control.ControllerConfig.kind, help="controller for the N sweep")
    ap.add_argument(
        "--controllers",
        nargs="+",
        default=list(control.KINDS),
        help='then these on the fastest exit: "kind" or "kind:field=value,...", e.g. confidence:threshold=0.4',
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs per prompt and mode (medians)")
    ap.add_argument("--out", default="experiments/results/exit_sweep/exit_sweep", help="writes OUT.md and OUT.json")
    args = ap.parse_args()

    if args.exits:
        paths = [pathlib.Path(p) for p in args.exits]
    else:
        paths = list(train_exits(args.layers, args.overrides, pathlib.Path(args.workdir)).values())
    session = engine.load_session(None)
    ids = held_out_prompts(session, args.n_per_set)
    bench_args = (args.max_draft, ids, args.max_new_tokens, args.repeats)
    rows = [bench_one(session, path, args.controller, *bench_args) for path in paths]
    best = max(zip(rows, paths), key=lambda row_path: row_path[0]["speedup"])[1]
    for spec in args.controllers:
        if spec != args.controller:
            rows.append(bench_one(session, best, spec, *bench_args))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "prompts": len(ids), "exits": [str(p) for p in paths]}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(f"{table(rows)}\n\n{json.dumps(meta)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
