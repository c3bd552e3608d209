"""Ablation studies, one command each: JSON (with provenance), a markdown table and a plot.

  python experiments/ablate.py --study policies --config tiny --out /tmp/policies      # seconds
  python experiments/ablate.py --study policies --exit eesd_jax/data/exits/X.safetensors \\
      --n 8 --max-new-tokens 64 --out experiments/results/policies

Study `policies`: every registered draft-stop policy (control.KINDS) at its default knobs,
AR vs EESD (eesd_jax.bench.run: same process, same held-out prompts, greedy, batch 1, after
warm-up): speedup, whether outputs are identical, acceptance alpha, tau and mean draft
length; the plot is speedup against alpha. Knobs are not tuned on a train split yet, and
the issue's other studies (components, depth) are not written yet.
Without --exit the exit is untrained (the LLM's last block over layer-N states).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from eesd_jax import bench, control, distill, eesd, exits, provenance
from eesd_jax.configs import load_config


def policies(lm, exit_cfg, exit_params, ids, max_new_tokens: int, max_draft: int, repeats: int) -> list[dict]:
    rows = []
    for kind in control.KINDS:
        ecfg = eesd.EESDConfig(exit_cfg.layer, max_draft, control.ControllerConfig(kind), context_layer=exit_cfg.context_layer)  # fmt: skip
        setup = bench.BenchSetup(lm.cfg, lm.params, exit_params, ecfg, lm.eos_ids)
        r = bench.run(setup, ids, max_new_tokens, repeats=repeats)
        e = r["modes"]["eesd"]
        rows.append({
            "policy": kind, "speedup": r["speedup"], "identical": r["identical"],
            "alpha": e["acceptance_rate"], "tau": e["mean_accepted_per_round"], "mean_draft": e["mean_draft_length"],
            "ar_tok_s": r["modes"]["ar"]["tokens_per_second"], "eesd_tok_s": e["tokens_per_second"],
        })  # fmt: skip
        print(f"{kind}: speedup {r['speedup']:.3f}x, alpha {e['acceptance_rate']:.3f}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| policy | speedup | identical | α | τ | mean draft | AR tok/s | EESD tok/s |\n|---|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['policy']} | {r['speedup']:.3f} | {r['identical']} | {r['alpha']:.3f} | {r['tau']:.2f} | "
        f"{r['mean_draft']:.2f} | {r['ar_tok_s']:.1f} | {r['eesd_tok_s']:.1f} |\n"
        for r in rows
    )


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display on CI or TPU VMs.
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["alpha"], r["speedup"])
        ax.annotate(r["policy"], (r["alpha"], r["speedup"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="acceptance rate α", ylabel="speedup EESD / AR", title="draft-stop policies")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", choices=("policies",), required=True)
    ap.add_argument("--config", default="smollm2", help="config naming the LLM and exit layer (tiny: in seconds)")
    ap.add_argument("--exit", default=None, help="exit .safetensors (default: untrained at the config's layer)")
    ap.add_argument("--n", type=int, default=4, help="held-out prompts per set (chat, humaneval)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", required=True, help="output stem: OUT.json, OUT.md, OUT.png")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    lm = distill.load_lm(config.model)
    if args.exit:
        exit_cfg, exit_params = exits.load_exit(args.exit, lm.cfg, lm.fingerprint)
    else:
        exit_cfg = exits.ExitConfig(int(config.exit.layer))
        exit_params = exits.init_exit(lm.cfg, lm.params, exit_cfg)
    # Prompts keep their last tokens that fit the context beside the generation (tiny: 128 tokens).
    room = lm.cfg.max_seq_len - args.max_new_tokens - args.max_draft - 1
    ids = [lm.encode(p)[-room:] for p in distill.prompt_list(("chat:heldout", "humaneval:heldout"), args.n)]
    rows = policies(lm, exit_cfg, exit_params, ids, args.max_new_tokens, args.max_draft, args.repeats)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "study": args.study,
        "config": args.config,
        "exit": args.exit or f"untrained N={exit_cfg.layer}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("study", "config", "exit", "out")},
        "rows": rows,
        "provenance": provenance.record(seed=0),
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows))
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    return result


if __name__ == "__main__":
    main()
