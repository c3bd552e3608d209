"""What the teacher pass spends per position on its top-k targets, and exact ways to cut it.

The teacher pass (teacher.run_teacher) stores, per position, the top-k (64) log-probs of the
LLM's 49k-token softmax. This times, on random logits of the bundled model's vocabulary size
(the LM head's output; the layers before it are not part of the comparison):

  sort      log_softmax over the vocabulary, then jax.lax.top_k (what the pass did)
  lse       jax.lax.top_k on the logits, minus their logsumexp (no [rows, V] log-prob array)
  approx    jax.lax.approx_max_k(recall_target=1.0) on the logits, minus logsumexp
  two-stage top-k within each of G vocabulary groups, then top-k of the G*k candidates (exact)
  group-max the k groups of S entries with the largest maxima hold the top k (exact): one max
            reduction, top-k of V/S group maxima, top-k of the k*S entries of those groups

Every variant must give the same top-k values as `sort` (checked before timing). Prints
ms per position (fastest of the repeats) as JSON.

  python experiments/teacher_topk.py --rows 2048 --k 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import teacher


def sort(logits, k):
    return jax.lax.top_k(jax.nn.log_softmax(logits, -1), k)


def lse(logits, k):
    values, ids = jax.lax.top_k(logits, k)
    return values - jax.nn.logsumexp(logits, -1, keepdims=True), ids


def approx(logits, k):
    values, ids = jax.lax.approx_max_k(logits, k, recall_target=1.0)
    return values - jax.nn.logsumexp(logits, -1, keepdims=True), ids


def two_stage(groups):
    def run(logits, k):
        R, V = logits.shape
        v1, i1 = jax.lax.top_k(logits.reshape(R, groups, V // groups), k)  # [R, G, k]
        i1 = i1 + (jnp.arange(groups) * (V // groups))[None, :, None]
        v2, j = jax.lax.top_k(v1.reshape(R, -1), k)
        ids = jnp.take_along_axis(i1.reshape(R, -1), j, -1)
        return v2 - jax.nn.logsumexp(logits, -1, keepdims=True), ids

    return run


def group_max(size):
    """Exact: the top-k entries lie in the k groups (of `size` entries) with the largest maxima."""

    def run(logits, k):
        R, V = logits.shape
        groups_rgs = logits.reshape(R, V // size, size)
        _, g = jax.lax.top_k(jnp.max(groups_rgs, -1), k)  # [R, k] the k groups with the largest maxima
        cand = jnp.take_along_axis(groups_rgs, g[..., None], 1).reshape(R, k * size)
        values, j = jax.lax.top_k(cand, k)
        ids = jnp.take_along_axis(g, j // size, -1) * size + j % size
        return values - jax.nn.logsumexp(logits, -1, keepdims=True), ids

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048, help="positions per call (run_teacher: 2048)")
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    logits = jax.random.normal(jax.random.key(0), (args.rows, args.vocab), jnp.float32) * 4.0
    variants = {"sort": sort, "lse": lse, "approx": approx}
    variants |= {f"two-stage G={g}": two_stage(g) for g in (48,) if args.vocab % g == 0}
    variants |= {f"group-max S={n}": group_max(n) for n in (32, 64, 128) if args.vocab % n == 0}
    variants["teacher.top_k_logprobs"] = teacher.top_k_logprobs  # What the teacher pass runs (group-max S=64).
    fns = {name: jax.jit(fn, static_argnums=1) for name, fn in variants.items()}
    ref_v, ref_i = jax.device_get(fns["sort"](logits, args.k))
    out = {"rows": args.rows, "vocab": args.vocab, "k": args.k, "ms_per_position": {}, "exact": {}}
    ref_logp = np.asarray(jax.nn.log_softmax(logits, -1))
    for name, fn in fns.items():  # Exact: the same values, and each id is an entry with its value (ties may
        v, i = jax.device_get(fn(logits, args.k))  # pick another of equal entries).
        at = np.take_along_axis(ref_logp, i, -1)
        out["exact"][name] = bool(np.abs(v - ref_v).max() <= 1e-6 and np.abs(at - v).max() <= 1e-6)
    times = {name: [] for name in fns}
    for _ in range(args.repeats):  # Interleaved, so machine load hits every variant alike.
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(logits, args.k))
            times[name].append(time.perf_counter() - t0)
    # The fastest repeat: on a shared machine the median mostly measures the other processes.
    out["ms_per_position"] = {n: round(1e3 * float(np.min(t)) / args.rows, 5) for n, t in times.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
