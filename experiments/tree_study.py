"""Draft trees against the chain: tau and speed by node budget on held-out prompts (bundled model).

Modes: AR, the chain (shipped defaults), trees of a fixed depth and trees whose depth is chosen
per round (EESDConfig.tree_stop; "auto": the measured cost of a tree's second depth in AR steps,
costs.depth_cost) or whose width is (EESDConfig.tree_width_stop; "auto": the measured cost of a
depth's second-ranked nodes, costs.width_cost). Each mode's speedup is also predicted by the
round-cost model (costs.py) from its measured tau, mean depth (mean verified nodes with an adaptive
width) and the parts' times measured first in the same process.

Every mode decodes the same held-out prompts greedily in one process, interleaved prompt by
prompt (AR, the chain, then each tree), after a warm-up that compiles every shape; speedups
are ratios of those same-process timings (the CPU is shared, so absolute tok/s are noisy;
ratios measured side by side are what to read). Outputs are checked identical to AR.

  python experiments/tree_study.py                                   # default trees, 4 prompts x 64 tokens
  python experiments/tree_study.py --trees 4x1 8x2 16x4@auto --n 2   # NODESxWIDTH[@STOP][/WIDTH_STOP]
  python experiments/tree_study.py --render                          # replot from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp

from eesd_jax import control, costs, eesd, engine, exits, generate, loading, model, prompts, shipped

OUT = pathlib.Path(__file__).parent / "results" / "trees" / "study.json"
# Node budget x nodes per depth [@ tree_stop] [/ tree_width_stop].
TREES = ("2x2", "3x3", "4x4", "4x2", "6x3", "16x4", "16x4@auto", "16x4/auto")


def parse_tree(spec: str) -> tuple[int, int, str, str]:
    """ "NODESxWIDTH[@STOP][/WIDTH_STOP]" -> (nodes, width, stop, width stop: each "" fixed, "auto" or a number)."""
    spec, _, wstop = spec.partition("/")
    shape, _, stop = spec.partition("@")
    n, w = (int(a) for a in shape.split("x"))
    for g in (stop, wstop):
        if g not in ("", "auto"):
            float(g)
    return n, w, stop, wstop


def modes(ecfg: eesd.EESDConfig, trees, ms: dict) -> dict[str, eesd.EESDConfig | None]:
    """name -> EESD config (None: AR); the chain is the shipped default (controller, K)."""
    out = {"ar": None, "chain": ecfg}
    for spec in trees:
        n, w, stop, wstop = parse_tree(spec)
        stop = costs.depth_cost(ms, ecfg.exit_layer, w, 2) if stop == "auto" else float(stop or 0)
        wstop = costs.width_cost(ms, ecfg.exit_layer, 2, n // w) if wstop == "auto" else float(wstop or 0)
        out[f"tree {spec}"] = dataclasses.replace(
            ecfg, tree=n, tree_width=w, tree_stop=round(stop, 3), tree_width_stop=round(wstop, 3)
        )
    return out


def cost_parts(cfg, params, exit_cfg, configs_trees, max_draft: int, repeats: int) -> dict:
    """costs.measure's parts for every round the modes can run (chain up to K drafts, every tree depth)."""
    widths = sorted({parse_tree(s)[1] for s in configs_trees} - {1})
    tokens = set(range(1, max_draft + 2))
    for spec in configs_trees:
        n, w, _, wstop = parse_tree(spec)
        tokens |= set(range(1, n + 2)) if wstop else {1 + d * w for d in range(n // w + 1)}
    N = exit_cfg.layer
    return costs.measure(cfg, params, [N], sorted(tokens), exit_cfg.draft_vocab, 512, repeats, min, widths)


def render(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["mode"].startswith("tree")]
    chain = next(r for r in report["rows"] if r["mode"] == "chain")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    fixed = [r for r in rows if not r.get("tree_stop") and not r.get("tree_width_stop")]
    for i, w in enumerate(sorted({r["width"] for r in fixed})):  # One color per width in both panels.
        sel = sorted((r for r in fixed if r["width"] == w), key=lambda r: r["nodes"])
        nodes, color = [r["nodes"] for r in sel], f"C{i}"
        a.plot(nodes, [r["tau"] for r in sel], "o-", color=color, label=f"{w} per depth")
        b.plot(nodes, [r["speedup_vs_ar"] for r in sel], "o-", color=color, label=f"{w} per depth")
        b.plot(nodes, [r["predicted_speedup_vs_ar"] for r in sel], "x:", color=color, label="its cost model")
    adaptive = [r for r in rows if r.get("tree_stop") or r.get("tree_width_stop")]
    for r, color in zip(adaptive, ("C6", "C7", "C8", "C9", "k")):  # Adaptive depth/width: at its mean nodes.
        label = f"{r['mode']} (stop {r['tree_stop']}, width stop {r.get('tree_width_stop', 0)}; mean nodes)"
        a.plot([r["mean_nodes"]], [r["tau"]], "*", ms=12, color=color, label=label)
        b.plot([r["mean_nodes"]], [r["speedup_vs_ar"]], "*", ms=12, color=color, label=label)
    a.axhline(
        chain["tau"],
        color="k",
        ls="--",
        label=f"chain ({report['chain']['controller']}, K = {report['chain']['max_draft']})",
    )
    b.axhline(
        chain["speedup_vs_ar"],
        color="k",
        ls="--",
        label=f"chain ({report['chain']['controller']}, K = {report['chain']['max_draft']})",
    )
    b.axhline(1.0, color="grey", lw=0.5)
    a.set(xlabel="tree nodes per round", ylabel="tau (tokens per round)", title="Mean accepted length")
    b.set(xlabel="tree nodes per round", ylabel="speedup over AR (same process)", title="Speed (CPU)")
    a.legend(fontsize=7), b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="chat,humaneval", help="comma-separated prompt sets (held-out split)")
    ap.add_argument("--n", type=int, default=2, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--trees", nargs="+", default=list(TREES), metavar="NODESxWIDTH[@STOP][/WIDTH_STOP]")
    ap.add_argument("--repeats", type=int, default=7, help="of each cost-model part (their min is kept)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render", action="store_true", help="only replot --out")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    if args.render:
        return render(json.loads(out.read_text()), out)

    engine.enable_compilation_cache()
    lm = loading.load_model(None)
    cfg, tok = lm.cfg, lm.tokenizer()
    params = model.decode_layout(jax.tree.map(jnp.asarray, lm.params))
    exit_path = shipped.default_exit(lm)
    exit_cfg, exit_params = exits.load_exit(exit_path, cfg, lm.fingerprint)
    chain = eesd.config_for_exit(exit_cfg, exit_path, 6, control.ControllerConfig.kind)  # The CLI defaults.
    eos = (int(tok.eos_token_id),)
    ids = [
        prompts.encode(tok, p.text, p.chat)
        for s in args.prompts.split(",")
        for p in prompts.load_prompts(s, "heldout", args.n)
    ]
    split = eesd.split_params(params, chain.exit_layer, chain.context_layer)

    def run(ecfg, prompt):
        if ecfg is None:
            return generate.generate_ar(cfg, params, [prompt], args.max_new_tokens, eos_ids=eos)
        return generate.generate_eesd(
            cfg, params, exit_params, ecfg, [prompt], args.max_new_tokens, eos_ids=eos, split=split
        )

    ms = cost_parts(cfg, params, exit_cfg, args.trees, chain.max_draft, args.repeats)
    print("cost parts (ms):", json.dumps({k: round(v, 2) for k, v in ms.items()}), flush=True)
    configs = modes(chain, args.trees, ms)
    for name, ecfg in configs.items():  # Warm-up: every prompt width, every mode.
        for p in ids:
            run(ecfg, p)
        print(f"compiled {name}", flush=True)
    gens = {name: [] for name in configs}
    for p in ids:  # Interleaved, so that load on the shared CPU hits every mode alike.
        for name, ecfg in configs.items():
            gens[name].append(run(ecfg, p))
    seconds = {name: sum(g.prefill_seconds + g.decode_seconds for g in gs) for name, gs in gens.items()}
    rows = []
    for name, ecfg in configs.items():
        gs = gens[name]
        new = sum(g.new_tokens for g in gs)
        row = {"mode": name, "new_tokens": new, "tokens_per_second": round(new / seconds[name], 2)}
        if ecfg is not None:
            stats = {k: sum(sum(g.stats["per_row"][k]) for g in gs) for k in ("rounds", "drafted", "accepted")}
            tau = (stats["accepted"] + stats["rounds"]) / stats["rounds"]
            width = ecfg.tree_width if ecfg.tree else 1
            mean_nodes = stats["drafted"] / stats["rounds"]  # Verified (kept) nodes per round.
            depth = mean_nodes / width  # A chain: its mean drafts, one per depth.
            nodes = None
            if ecfg.tree_width_stop:  # Then a fixed depth (with tree_stop too the mean depth is not recorded).
                depth, nodes = ecfg.tree // width, mean_nodes
            row.update(
                nodes=ecfg.tree,
                width=ecfg.tree_width if ecfg.tree else None,
                tree_stop=ecfg.tree_stop,
                tree_width_stop=ecfg.tree_width_stop,
                mean_nodes=round(mean_nodes, 2),
                tau=round(tau, 3),
                identical_to_ar=[g.tokens for g in gs] == [g.tokens for g in gens["ar"]],
            )
            row["speedup_vs_ar"] = round(row["tokens_per_second"] / rows[0]["tokens_per_second"], 3)
            predicted = None
            if not (ecfg.tree_stop and ecfg.tree_width_stop):
                full = (
                    ecfg.tree // width if ecfg.tree else None
                )  # A chain's last draft has a head (the controller reads it).
                predicted = costs.predicted_tree_speedup(ms, ecfg.exit_layer, width, depth, tau, nodes, full)
                predicted = round(predicted, 3)
            row["predicted_speedup_vs_ar"] = predicted
            if name != "chain":
                row["speedup_vs_chain"] = round(row["tokens_per_second"] / rows[1]["tokens_per_second"], 3)
        rows.append(row)
    report = {
        "exit": pathlib.Path(exit_path).name,
        "chain": {"controller": chain.controller.kind, "max_draft": chain.max_draft},
        "prompts": args.prompts,
        "n_per_set": args.n,
        "max_new_tokens": args.max_new_tokens,
        "note": "one process, modes interleaved per prompt after warm-up; shared 2-core CPU: read the ratios",
        "cost_parts_ms": {k: round(v, 3) for k, v in ms.items()},
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    render(report, out)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
