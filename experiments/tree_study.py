"""Draft trees against the chain: tau and speed by node budget on held-out prompts (bundled model).

Every mode decodes the same held-out prompts greedily in one process, interleaved prompt by
prompt (AR, the chain, then each tree), after a warm-up that compiles every shape; speedups
are ratios of those same-process timings (the CPU is shared, so absolute tok/s are noisy;
ratios measured side by side are what to read). Outputs are checked identical to AR.

  python experiments/tree_study.py                                   # default trees, 4 prompts x 64 tokens
  python experiments/tree_study.py --trees 4x1 8x2 8x4 --n 2         # NODESxWIDTH
  python experiments/tree_study.py --render                          # replot from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp

from eesd_jax import control, eesd, engine, exits, generate, loading, model, prompts, shipped

OUT = pathlib.Path(__file__).parent / "results" / "trees" / "study.json"
TREES = ("4x4", "8x4", "16x4", "8x2")  # Node budget x nodes per depth.


def modes(ecfg: eesd.EESDConfig, trees) -> dict[str, eesd.EESDConfig | None]:
    """name -> EESD config (None: AR); the chain is the shipped default (controller, K)."""
    out = {"ar": None, "chain": ecfg}
    for spec in trees:
        n, w = (int(a) for a in spec.split("x"))
        out[f"tree {spec}"] = dataclasses.replace(ecfg, tree=n, tree_width=w)
    return out


def render(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["mode"].startswith("tree")]
    chain = next(r for r in report["rows"] if r["mode"] == "chain")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for w in sorted({r["width"] for r in rows}):
        sel = sorted((r for r in rows if r["width"] == w), key=lambda r: r["nodes"])
        a.plot([r["nodes"] for r in sel], [r["tau"] for r in sel], "o-", label=f"{w} per depth")
        b.plot([r["nodes"] for r in sel], [r["speedup_vs_ar"] for r in sel], "o-", label=f"{w} per depth")
    a.axhline(chain["tau"], color="k", ls="--", label="chain (shipped default)")
    b.axhline(chain["speedup_vs_ar"], color="k", ls="--", label="chain (shipped default)")
    b.axhline(1.0, color="grey", lw=0.5)
    a.set(xlabel="tree nodes per round", ylabel="tau (tokens per round)", title="Mean accepted length")
    b.set(xlabel="tree nodes per round", ylabel="speedup over AR (same process)", title="Speed (CPU)")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="chat,humaneval", help="comma-separated prompt sets (held-out split)")
    ap.add_argument("--n", type=int, default=2, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--trees", nargs="+", default=list(TREES), metavar="NODESxWIDTH")
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

    configs = modes(chain, args.trees)
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
            row.update(
                nodes=ecfg.tree,
                width=ecfg.tree_width if ecfg.tree else None,
                tau=round((stats["accepted"] + stats["rounds"]) / stats["rounds"], 3),
                identical_to_ar=[g.tokens for g in gs] == [g.tokens for g in gens["ar"]],
            )
            row["speedup_vs_ar"] = round(row["tokens_per_second"] / rows[0]["tokens_per_second"], 3)
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
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    render(report, out)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
