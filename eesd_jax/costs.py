"""The EESD round-cost model: a round's time from its measured parts, and the speedup it predicts.

An EESD round with k kept drafts runs k + 1 draft steps (block tokens 0..k through layers
[0, N), the exit block and the draft head; the last one only writes the exit's cache) and one
verification of layers [N, L) + the LM head over T = k + 1 tokens. AR runs one full one-token
step per token. So

    round(k) ~= (k + 1) * draft_step + verify(T = k + 1)
    speedup  ~= tau * ar_step / round(k)

A draft tree's round (tree.py) growing d depths of W nodes runs the root's draft step, d draft
batches of W tokens and one verification of its 1 + d W nodes (a chain is W = 1):

    tree_round(W, d) ~= draft_step + d * draft_batch(W) + verify(T = 1 + d W)

where a tree's full depth R, once grown, costs a leaf batch instead (layers [0, N) and the exit's
keys/values: its children would never be verified), so a fixed tree of R depths costs
draft_step + (R - 1) draft_batch(W) + leaf_batch(W) + verify(T = 1 + R W).

(with an adaptive width keeping w <= W nodes per depth, verify(T = 1 + d w): drafting still runs W).

`ms` holds the parts in milliseconds as `bench.step_costs` names them ("ar_step", "draft_N{n}",
"verify_N{n}_T{t}", "leaf_N{n}", and for W tokens at once "draft_N{n}_W{w}", "leaf_N{n}_W{w}"). A draft step is timed as one
program, as the decode loop runs it: its two halves timed as separate calls ("lower_N{n}",
"exit_step") each pay a call's fixed cost (their sum was ~0.5 ms, a sixth, above it on CPU);
`measure` times them for an exit head of a given size.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import bench, exits


def measure(
    cfg, params, exit_layers, tokens, draft_vocab: int, cache_len: int, repeats: int, stat=statistics.median, widths=()
) -> dict[str, float]:
    """bench.step_costs' ms of each part (`stat` of the repeats), with an exit head of draft_vocab rows (0: the shared head).

    params in model.decode_layout. An exit's cost depends on its shapes only, not its weights
    or N: an untrained exit after layer 1 stands for any.
    """
    vocab_ids = np.arange(draft_vocab) if draft_vocab else None
    exit_params = exits.init_exit(cfg, params, exits.ExitConfig(1, draft_vocab=draft_vocab), vocab_ids)
    parts = bench.step_parts(cfg, params, exit_params, exit_layers, tokens, cache_len, widths)
    return bench.step_costs(parts, repeats, stat)


def draft_ms(ms: dict, n: int) -> float:
    """One draft step at exit layer N: layers [0, N) and the exit block + head on one token."""
    return ms[f"draft_N{n}"]


def round_ms(ms: dict, n: int, k: int) -> float:
    """The parts of a round of k drafts at exit layer N: k + 1 draft steps and verification of T = k + 1."""
    return (k + 1) * draft_ms(ms, n) + ms[f"verify_N{n}_T{k + 1}"]


def draft_batch_ms(ms: dict, n: int, width: int) -> float:
    """One depth of a draft tree at exit layer N: `width` tokens at once through layers [0, N) and the exit."""
    return draft_ms(ms, n) if width == 1 else ms[f"draft_N{n}_W{width}"]


def leaf_batch_ms(ms: dict, n: int, width: int) -> float:
    """A tree's deepest depth at exit layer N: `width` tokens through layers [0, N) and the exit's keys/values."""
    return ms[f"leaf_N{n}"] if width == 1 else ms[f"leaf_N{n}_W{width}"]


def tree_round_ms(
    ms: dict, n: int, width: int, depth: float, nodes: float | None = None, full_depth: int | None = None
) -> float:
    """A tree round growing `depth` depths of `width` nodes: the root's draft step, the depths' draft
    batches (a leaf batch for the tree's `full_depth` R, once grown; None: R not known, none) and
    one verification of 1 + depth x width tokens. A fractional depth (an adaptive tree's mean)
    interpolates between the rounds of its two neighbouring depths.

    nodes: the nodes verified per round where an adaptive width keeps fewer than depth x width (a
    mean: the verification interpolates between its two neighbouring sizes)."""
    lo = int(depth)
    if depth > lo and nodes is None:
        lo_ms, hi_ms = (tree_round_ms(ms, n, width, d, None, full_depth) for d in (lo, lo + 1))
        return (lo + 1 - depth) * lo_ms + (depth - lo) * hi_ms
    drafting = draft_ms(ms, n) + depth * draft_batch_ms(ms, n, width)
    if full_depth and depth == full_depth:
        drafting += leaf_batch_ms(ms, n, width) - draft_batch_ms(ms, n, width)
    t = 1 + (depth * width if nodes is None else nodes)
    lo_t = int(t)
    verify = ms[f"verify_N{n}_T{lo_t}"]
    if t > lo_t:
        verify += (t - lo_t) * (ms[f"verify_N{n}_T{lo_t + 1}"] - verify)
    return drafting + verify


def depth_cost(ms: dict, n: int, width: int, depth: int) -> float:
    """AR steps that growing depth `depth` of a tree adds to its round: the break-even expected gain
    (accepted drafts) of that depth, a natural EESDConfig.tree_stop."""
    return (tree_round_ms(ms, n, width, depth) - tree_round_ms(ms, n, width, depth - 1)) / ms["ar_step"]


def width_cost(ms: dict, n: int, width: int, depth: int) -> float:
    """AR steps that keeping the width-th node of each of `depth` depths adds to a tree round: `depth`
    more verified tokens (drafting runs every depth's whole width anyway). The break-even expected
    gain of that rank, a natural EESDConfig.tree_width_stop."""
    grown, fewer = 1 + depth * width, 1 + depth * (width - 1)
    return (ms[f"verify_N{n}_T{grown}"] - ms[f"verify_N{n}_T{fewer}"]) / ms["ar_step"]


def predicted_tree_speedup(
    ms: dict, n: int, width: int, depth: float, tau: float, nodes: float | None = None, full_depth: int | None = None
) -> float:
    """AR time / EESD time per token for tree rounds of `depth` depths (verifying `nodes`; the tree's
    `full_depth`: see tree_round_ms) yielding tau tokens each."""
    return tau * ms["ar_step"] / tree_round_ms(ms, n, width, depth, nodes, full_depth)


def predicted_speedup(ms: dict, n: int, k: int, p: float) -> float:
    """AR time / EESD time per token for rounds of k drafts, each accepted with probability p in turn."""
    tau = sum(p**i for i in range(k + 1))  # The accepted prefix's expected length + the LLM's own token.
    return tau * ms["ar_step"] / round_ms(ms, n, k)


def acceptance_needed(ms: dict, n: int, ks, target: float) -> float:
    """The smallest per-token acceptance p at which the best k reaches `target` (bisection; 1.0 if never)."""
    lo, hi = 0.0, 1.0
    if max(predicted_speedup(ms, n, k, hi) for k in ks) < target:
        return 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if max(predicted_speedup(ms, n, k, mid) for k in ks) < target else (lo, mid)
    return hi


def _seconds(fn, arg, repeats: int, stat) -> float:
    jax.block_until_ready(fn(arg))  # Compile.
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t0)
    return stat(times)


def read_bandwidth(nbytes: int, repeats: int, stat=statistics.median) -> float:
    """Bytes/s of a jitted sum over nbytes of float32: the rate weights can stream at (the floor's bandwidth)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return nbytes / _seconds(jax.jit(jnp.sum), x, repeats, stat)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a device copy (read + write counted), the measured bandwidth ceiling."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return (
        2 * nbytes / _seconds(jax.jit(lambda x: x + 1.0), x, repeats, statistics.median)
    )  # Not a no-op: XLA reads and writes every byte.
