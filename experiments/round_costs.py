"""Where an EESD round's time goes: the measured cost of each part, against one AR step.

An EESD round with k kept drafts runs k + 1 draft steps (block tokens 0..k through
layers [0, N), the exit block and the draft head; the last one only writes the exit's
cache) and one verification of layers [N, L) + the LM head over T = k + 1 tokens
(padded to a bucket). AR runs one full one-token step per token. So

    round(k) ~= (k + 1) * draft_step + verify(T = k + 1)
    speedup  ~= tau * ar_step / round(k)

This script times each part alone (bench.step_costs: jitted, batch 1, the cache donated so
writes stay in place, medians of interleaved repeats) on the bundled SmolLM2, and prints the predicted
speedup for a given tau. Comparing the prediction with `eesd bench` gives the loop's own
overhead. Every part is a real call of the library's model / exit code.

  python experiments/round_costs.py --exit-layers 2 4 6 8 --cache-len 512
  python experiments/round_costs.py --exit PATH.safetensors      # a trained exit's head size
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import bench, exits, loading


def measure(cfg, params, exit_layers, tokens, draft_vocab: int, cache_len: int, repeats: int) -> dict[str, float]:
    """bench.step_costs' median ms of each part, with an exit head of draft_vocab rows (0: the shared head).

    params in bench.decode_layout. An exit's cost depends on its shapes only, not its weights
    or N: an untrained exit after layer 1 stands for any.
    """
    vocab_ids = np.arange(draft_vocab) if draft_vocab else None
    exit_params = exits.init_exit(cfg, params, exits.ExitConfig(1, draft_vocab=draft_vocab), vocab_ids)
    return bench.step_costs(cfg, params, exit_params, exit_layers, tokens, cache_len, repeats)


def round_ms(ms: dict, n: int, k: int) -> float:
    """The parts of a round of k drafts at exit layer N: k + 1 draft steps and verification of T = k + 1."""
    return (k + 1) * (ms[f"lower_N{n}"] + ms["exit_step"]) + ms[f"verify_N{n}_T{k + 1}"]


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


def report(ms: dict, exit_layers, tokens, draft_vocab: int) -> None:
    ar = ms["ar_step"]
    print(f"AR step {ar:.1f} ms; exit block + head ({draft_vocab or 'all'} rows) {ms['exit_step']:.1f} ms")
    print(f"{'N':>3} {'draft ms':>9} {'c':>6}  " + "  ".join(f"{'verify T=' + str(t):>11}" for t in tokens))
    for n in exit_layers:
        draft = ms[f"lower_N{n}"] + ms["exit_step"]
        row = "  ".join(f"{ms[f'verify_N{n}_T{t}']:7.1f} ({ms[f'verify_N{n}_T{t}'] / ar:4.2f})" for t in tokens)
        print(f"{n:3d} {draft:9.1f} {draft / ar:6.3f}  {row}")
    print("verify in ms (in AR steps). Break-even tau for a round of k drafts: ((k+1)*draft + verify(k+1)) / AR.")
    ks = [k for k in range(1, 8) if k + 1 in tokens]
    for n in exit_layers:
        need = {k: round_ms(ms, n, k) / ar for k in ks}
        print(
            f"N={n}: tau needed for 1.0x / 1.5x: "
            + ", ".join(f"k={k}: {v:.2f} / {1.5 * v:.2f}" for k, v in need.items())
        )
    accs = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    print(f"Predicted speedup at per-token acceptance p (best k of {ks}), and the p that 1.0x / 1.5x / 2x need:")
    print(f"{'N':>3}  " + " ".join(f"{'p=' + str(p):>6}" for p in accs) + "   1.0x   1.5x     2x")
    for n in exit_layers:
        best = [max(predicted_speedup(ms, n, k, p) for k in ks) for p in accs]
        need = [acceptance_needed(ms, n, ks, target) for target in (1.0, 1.5, 2.0)]
        print(f"{n:3d}  " + " ".join(f"{s:6.2f}" for s in best) + "  " + " ".join(f"{p:6.2f}" for p in need))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exit-layers", type=int, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8], help="verification block sizes T")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="draft head rows (0 = the full shared head)")
    ap.add_argument("--cache-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--load", help="print the analysis of figures an earlier run wrote with --json; time nothing")
    args = ap.parse_args()
    if args.load:
        with open(args.load) as f:
            saved = json.load(f)
        report(saved["ms"], args.exit_layers, args.tokens, saved["draft_vocab"])
        return

    loaded = loading.load_model(None)
    cfg = loaded.cfg
    params = bench.decode_layout(jax.tree.map(jnp.asarray, loaded.params))
    ms = measure(cfg, params, args.exit_layers, args.tokens, args.draft_vocab, args.cache_len, args.repeats)

    report(ms, args.exit_layers, args.tokens, args.draft_vocab)
    saved = {"ms": {k: round(v, 3) for k, v in ms.items()}, "cache_len": args.cache_len, "draft_vocab": args.draft_vocab,
              "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)


if __name__ == "__main__":
    main()
