"""The CPU small-block kernel against XLA's dot on a stack of SmolLM2-shaped MLPs (gate/up/down).

    python experiments/kernel_mlp.py [--layers 30] [--repeats 25] [--stat min]

For T = 1, 2, 4, 8 rows and float32 / bfloat16 weights: ms per pass through the stack with
cpu_kernel.matmul and with jnp.einsum, each also in one-row times, from interleaved repeats
(min by default: robust on a machine busy with other work). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import cpu_kernel

D, F = 576, 1536  # SmolLM2-135M's width and MLP width.


def mlp_stack(ws, x_nd, kernel: bool):
    dot = (
        cpu_kernel.matmul if kernel else lambda x, w: jnp.einsum("nd,od->no", x, w, preferred_element_type=jnp.float32)
    )
    for gate_fd, up_fd, down_df in ws:
        h_nf = jax.nn.silu(dot(x_nd, gate_fd)) * dot(x_nd, up_fd)
        x_nd = x_nd + 1e-3 * dot(h_nf.astype(down_df.dtype), down_df).astype(x_nd.dtype)
    return x_nd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--stat", choices=("median", "min"), default="min")
    args = ap.parse_args()
    if not cpu_kernel.available():
        raise SystemExit(cpu_kernel.status())
    stat = {"median": statistics.median, "min": min}[args.stat]
    rng = np.random.default_rng(0)
    out = {"stat": args.stat, "layers": args.layers}
    for dtype in ("float32", "bfloat16"):
        shapes = ((F, D), (F, D), (D, F))
        ws = [tuple(jnp.asarray(0.05 * rng.standard_normal(s), dtype) for s in shapes) for _ in range(args.layers)]
        fns = {}
        for t in (1, 2, 4, 8):
            x = jnp.ones((t, D), dtype)
            for kernel in (True, False):
                fn = jax.jit(lambda ws, x, kernel=kernel: mlp_stack(ws, x, kernel))
                jax.block_until_ready(fn(ws, x))  # Compile.
                fns[t, kernel] = (fn, x)
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, (fn, x) in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(ws, x))
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1e3 * stat(v) for k, v in times.items()}
        out[dtype] = {
            name: {
                t: {"ms": round(ms[t, kernel], 2), "in_one_row_times": round(ms[t, kernel] / ms[1, kernel], 3)}
                for t in (1, 2, 4, 8)
            }
            for name, kernel in (("kernel", True), ("xla", False))
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
