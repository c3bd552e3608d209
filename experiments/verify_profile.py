"""Where an AR step and a verify step spend their time, op by op (XLA:CPU's per-op trace).

    python experiments/verify_profile.py [--tokens 1 4 8] [--exit-layer 2] [--repeats 20] [--json out.json]

The parts are bench.step_parts' (the bundled SmolLM2, batch 1, cache 512, at position 256): the
AR step and verification of T tokens through layers [N, L) + the LM head. Each is run under
jax.profiler; every op of the compiled program (a thunk of XLA:CPU's executor) is timed by the
minimum of its repeats, which a machine busy with other work inflates least, and the ops are
summed by kind: the small-block kernel by weight shape, the attention kernel or attention's dots, copies (a cache layer
copied or transposed), cache writes, the rest. Also the step's minimum wall time; the ops' sum
is below it by the executor's gaps between ops. Prints a table, and JSON with --json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp

from eesd_jax import bench, cpu_kernel, exits, loading, model


def op_kinds(hlo: str) -> dict[str, str]:
    """Op name in the compiled program -> its kind."""
    kinds = {}
    for line in hlo.split("ENTRY", 1)[-1].splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \(?(\w+\[[\d,]*\])", line)
        if not m:
            continue
        name, shape = m.groups()
        if cpu_kernel.TARGET in line:
            operands = re.search(r"operand_layout_constraints=\{([^}]*\}(?:, [^}]*\})*)\}", line)
            weights = re.findall(r"\w+\[[\d,]+\]", operands.group(1))[1:] if operands else ["?"]
            kinds[name] = "kernel " + " + ".join(weights)
        elif cpu_kernel.ATTENTION_TARGET in line:
            kinds[name] = "attention kernel"
        elif name.startswith(("ynn", "dot")) or "custom_call_target" in line:
            kinds[name] = "attention dots"
        elif "scatter" in name or "dynamic-update-slice" in name:
            kinds[name] = "cache writes"
        elif re.match(r"(copy|slice|transpose)", name) and len(shape.split(",")) >= 3:
            kinds[name] = "copies"
        else:
            kinds[name] = "other"
    return kinds


def profile(fn, cache, repeats: int) -> dict:
    """{wall_min_ms, ops_ms, by_kind: {kind: {ms, ops}}} of one part."""
    kinds = op_kinds(fn.func.lower(*fn.args, cache).compile().as_text())
    for _ in range(3):  # Compile and warm up.
        out, cache = fn(cache)
        jax.block_until_ready(out)
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(repeats):
                t0 = time.perf_counter()
                out, cache = fn(cache)
                jax.block_until_ready(out)
                walls.append(time.perf_counter() - t0)
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    durations = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            durations[e["name"]].append(e["dur"] / 1e3)
    by_kind = collections.defaultdict(lambda: {"ms": 0.0, "ops": 0})
    for name, ds in durations.items():
        by_kind[kinds[name]]["ms"] += min(ds)
        by_kind[kinds[name]]["ops"] += 1
    by_kind = {
        k: {"ms": round(v["ms"], 3), "ops": v["ops"]} for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]["ms"])
    }
    return {
        "wall_min_ms": round(1e3 * min(walls), 3),
        "ops_ms": round(sum(v["ms"] for v in by_kind.values()), 3),
        "by_kind": by_kind,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--exit-layer", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", choices=model.DTYPES, default="float32")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    loaded = loading.load_model(None, dtype=args.dtype)
    cfg = loaded.cfg
    params = model.decode_layout(jax.tree.map(jnp.asarray, loaded.params))
    exit_params = exits.init_exit(cfg, params, exits.ExitConfig(1))
    parts = bench.step_parts(cfg, params, exit_params, [args.exit_layer], args.tokens)
    names = ["ar_step"] + [f"verify_N{args.exit_layer}_T{t}" for t in args.tokens]
    out = {"dtype": cfg.dtype, "repeats": args.repeats, "cpu_kernel": cpu_kernel.status(), "parts": {}}
    for name in names:
        res = out["parts"][name] = profile(*parts[name], args.repeats)
        print(f"{name}: wall min {res['wall_min_ms']:.1f} ms, ops {res['ops_ms']:.1f} ms")
        for kind, v in res["by_kind"].items():
            if v["ms"] >= 0.05:
                print(f"  {v['ms']:7.2f} ms {v['ops']:4d} ops  {kind}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
