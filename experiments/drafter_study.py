"""What makes the drafter accepted: train exit variants on shared data, measure each the same way.

Every variant is a smollm2 config (ml_collections overrides, VARIANTS below) trained on one
generated data dir; each is measured on the same validation prompts (every 10th training
prompt, never trained on): top-1 agreement of its first draft with the LLM (a draft of a
greedy round is accepted iff it is the LLM's top-1), and of draft token j = 1..K given
correct earlier drafts. One command per row; rows accumulate in OUT.json / OUT.md. OUT.png
plots validation agreement against training sequences seen for every variant, and its best
value against the trained positions for each data source (the data-scaling curve:
data.response_tokens / data.text.max_tokens subsample a source), with a least-squares line
per source in log2 of the positions (OUT.json "scaling": top-1 gained per doubling, and the
positions a target agreement would need if the line held).

  python experiments/drafter_study.py --variants paper context29 --data-dir runs/data
  python experiments/drafter_study.py --variants context29+readmes --text-dir runs/text_readmes
  python experiments/drafter_study.py --exit shipped=eesd_jax/data/exits/X.safetensors   # measure only
  python experiments/drafter_study.py --variants "responses-25k=N=2,context=29,data.response_tokens=25000,train.steps=100"
  python experiments/drafter_study.py --base tiny --variants paper=N=1 ctx=N=1,context=2   # seconds
  python experiments/drafter_study.py --render   # rewrite OUT.md / OUT.png from OUT.json

Speed on held-out prompts is measured by experiments/exit_sweep.py --exits (AR vs EESD).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from eesd_jax import configs, distill_data, exits, losses, provenance, shards, teacher, train

# name -> smollm2 config overrides (configs.apply_overrides syntax).
VARIANTS = {
    "paper": "N=2",  # The EESD paper's exit: one block over layer-2 states at every position.
    "context29": "N=2,context=29",  # Verified positions from layer 29 (the LLM's last block's input).
    # Teacher-forced text (eesd_jax.corpus "readmes", ~283k positions) besides / instead of the responses.
    "context29+readmes": "N=2,context=29,text=readmes",
    "readmes-only": "N=2,context=29,text=readmes,data.text.only=true",
}


def variant_overrides(spec: str) -> tuple[str, str]:
    """ "name" (a VARIANTS entry) or "name=overrides" -> (name, overrides)."""
    name, _, overrides = spec.partition("=")
    if not overrides and name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, or NAME=OVERRIDES")
    return name, overrides or VARIANTS[name]


def validation(lm, exit_path: pathlib.Path, data_dir: str, val_every: int):
    """(exit config, exit params, validation Data) of an exit on the shared data's validation prompts."""
    exit_cfg, params = exits.load_exit(exit_path, lm.cfg, lm.fingerprint)
    data = distill_data.load_data(
        data_dir, exit_cfg.layer, context_layer=exit_cfg.context_layer, fuse_layers=exit_cfg.fuse_layers
    )
    _, val = data.split(val_every)
    if val is None:
        raise SystemExit("measuring needs validation prompts: set train.val_every_prompt > 0")
    return exit_cfg, params, val


def draft_vocab_coverage(exit_params, val: shards.Data) -> float | None:
    """Share of validation positions whose LLM top-1 is in the exit's draft vocabulary: the ceiling of
    its first-draft top-1 (None for a full-vocabulary head)."""
    if "vocab" not in exit_params:
        return None
    top1 = np.concatenate([s.topk_ids[s.mask, 0] for s in map(val.sequence, range(val.n_seq))])
    return round(float(np.isin(top1, np.asarray(exit_params["vocab"])).mean()), 6)


def measure(lm, exit_path: pathlib.Path, data_dir: str, val_every: int, round_len: int) -> dict:
    """Validation figures of one exit: first-draft top-1, top-1 by draft position, draft-vocabulary coverage."""
    exit_cfg, params, val = validation(lm, exit_path, data_dir, val_every)
    first = losses.data_metrics(lm.cfg, lm.params, params, val)
    by_pos = losses.data_metrics(lm.cfg, lm.params, params, val, round_len=round_len)
    return {
        "exit": str(exit_path),
        "N": exit_cfg.layer,
        "context_layer": exit_cfg.context_layer,
        "fuse_layers": list(exit_cfg.fuse_layers),
        "draft_vocab": exit_cfg.draft_vocab,
        "val_first_draft_top1": first["top1"],
        "val_kl": first["kl"],
        "val_positions": first["positions"],
        "val_top1_by_draft_position": by_pos["top1_by_draft_position"],
        "val_draft_vocab_coverage": draft_vocab_coverage(params, val),
    }


def curve(path: pathlib.Path, per_step: int) -> list[dict]:
    """(step, training sequences seen, validation top-1) records of a training run's metrics.jsonl."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [
        {"step": r["step"], "sequences": r["step"] * per_step, "val_top1": r["val_top1"]}
        for r in records
        if "val_top1" in r
    ]


def source(config) -> str:
    """The data a variant trains on: "responses", the text corpus, or both ("responses+readmes")."""
    corpus = str(config.data.text.corpus)
    if not corpus:
        return "responses"
    corpus = pathlib.Path(corpus).name  # A folder corpus by its name.
    return corpus if config.data.text.only else f"responses+{corpus}"


def trained(workdir: pathlib.Path, config) -> dict:
    """What a finished training run saw (from its run.json): its source, trained positions, and what
    making its kind of data cost per position here (ms: generation or tokenizing + teacher pass)."""
    run = json.loads((workdir / "run.json").read_text())
    layer = int(config.exit.layer)
    made = {"responses": (_seconds_for(run["data_seconds"], layer), run["counts"]["train_positions"])}
    if run.get("text"):
        made["text"] = (_seconds_for(run["text"]["seconds"], layer), run["text"]["counts"]["train_positions"])
    if config.data.text.only:
        del made["responses"]
    seconds, positions = (sum(x) for x in zip(*made.values(), strict=True))
    return {
        "source": source(config),
        "trained_positions": run["metrics"]["trained"]["train"]["positions"],
        "data_ms_per_position": round(1e3 * seconds / positions, 2),
    }


def _seconds_for(seconds: dict, layer: int) -> float:
    """Data-making seconds an exit at `layer` needed: all but teacher passes that did not store its layer
    (a later exit sharing the data dir added those)."""
    return sum(v for k, v in seconds.items() if not k.startswith("teacher_") or str(layer) in k.split("_")[1:])


def best(row: dict) -> float:
    """The row's best validation top-1 over its training curve (early stopping), else its final one."""
    return max([c["val_top1"] for c in row.get("curve") or []] + [row["val_first_draft_top1"]])


TARGETS = (0.68, 0.78)  # Per-draft acceptance that 1.3x / 1.5x need at N = 2 on this CPU (round_costs.py).


def scaling(rows: dict) -> dict:
    """Per source with >= 2 budgets: best top-1 ~ a + b log2(positions), and where it would reach TARGETS."""
    by_source: dict[str, list] = {}
    for name, r in rows.items():
        if r.get("source") and r.get("trained_positions"):
            by_source.setdefault(r["source"], []).append((r["trained_positions"], best(r), name))
    fits = {}
    for src, pts in sorted(by_source.items()):
        pts.sort()
        if len({p for p, _, _ in pts}) < 2:
            fits[src] = {"points": pts}
            continue
        x, y = np.log2([p for p, _, _ in pts]), np.array([t for _, t, _ in pts])
        slope, icept = np.polyfit(x, y, 1)
        need = {str(t): float(2 ** ((t - icept) / slope)) if slope > 0 else None for t in TARGETS}
        fits[src] = {
            "points": pts,
            "top1_per_doubling": float(slope),
            "intercept": float(icept),
            "positions_needed": need,
        }
        rates = [rows[name]["data_ms_per_position"] for _, _, name in pts if "data_ms_per_position" in rows[name]]
        if rates:  # What making that much data of this kind would take on this machine.
            ms = float(np.median(rates))
            fits[src] |= {
                "data_ms_per_position": ms,
                "data_hours_needed": {t: n and n * ms / 3.6e6 for t, n in need.items()},
            }
    return fits


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(rows: dict) -> str:
    head = (
        "| variant | N | context | fused | source | trained positions | val first-draft top-1 (best) "
        "| by draft position 1..K | draft-vocab coverage | val KL | data dir made in s (responses / text) | train s |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, r in rows.items():
        pos = " / ".join(f"{x:.2f}" for x in r["val_top1_by_draft_position"])
        lines.append(
            f"| {name} | {r['N']} | {r['context_layer'] or '-'} | {'+'.join(map(str, r.get('fuse_layers') or [])) or '-'} "
            f"| {r.get('source', '-')} "
            f"| {r.get('trained_positions', '-')} | {r['val_first_draft_top1']:.3f} ({best(r):.3f}) | {pos} "
            f"| {_num(r.get('val_draft_vocab_coverage'))} | {r['val_kl']:.3f} "
            f"| {' / '.join(str(v) for v in r['data_seconds'].values()) if 'data_seconds' in r else '-'} "
            f"| {r.get('train_seconds', '-')} |"
        )
    fits = scaling(rows)
    if any("top1_per_doubling" in f for f in fits.values()):
        head = ["source", "budgets (trained positions: best top-1)", "top-1 per doubling", "data ms per position"]
        head += [f"positions (data-making hours) for {t}" for t in TARGETS]
        lines += ["", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for src, f in fits.items():
            pts = ", ".join(f"{p / 1000:.0f}k: {t:.3f}" for p, t, _ in f["points"])
            if "top1_per_doubling" not in f:
                lines.append(f"| {src} | {pts} |" + " - |" * (len(head) - 2))
                continue
            hours = f.get("data_hours_needed", {})
            need = [
                "never" if n is None else f"{n:.2g}" + (f" ({hours[t]:,.0f} h)" if hours.get(t) else "")
                for t, n in f["positions_needed"].items()
            ]
            ms = f"{f['data_ms_per_position']:.1f}" if "data_ms_per_position" in f else "-"
            lines.append(f"| {src} | {pts} | {f['top1_per_doubling']:+.3f} | {ms} | " + " | ".join(need) + " |")
    return "\n".join(lines)


def plot(rows: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_data) = plt.subplots(1, 2, figsize=(12.8, 4.4))
    for name, r in rows.items():
        if r.get("curve"):
            ax.plot([c["sequences"] for c in r["curve"]], [c["val_top1"] for c in r["curve"]], marker="o", label=name)
        else:
            ax.axhline(r["val_first_draft_top1"], linestyle="--", color="gray", label=f"{name} (final)")
    ax.set_xlabel("training sequences seen")
    ax.set_ylabel("validation first-draft top-1 (= greedy acceptance)")
    ax.set_title("Validation curves (SmolLM2-135M, held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    for src, f in scaling(rows).items():
        x = [p for p, _, _ in f["points"]]
        (line,) = ax_data.plot(x, [t for _, t, _ in f["points"]], marker="o", label=src)
        if "top1_per_doubling" in f:
            xs = np.geomspace(min(x), max(x) * 4, 50)
            ax_data.plot(
                xs,
                f["intercept"] + f["top1_per_doubling"] * np.log2(xs),
                linestyle=":",
                color=line.get_color(),
                label=f"{src}: {f['top1_per_doubling']:+.3f} per doubling",
            )
    ax_data.set_xscale("log", base=2)
    ax_data.set_xlabel("trained positions (data size)")
    ax_data.set_ylabel("best validation first-draft top-1")
    ax_data.set_title("Data scaling, per source")
    ax_data.grid(alpha=0.3)
    ax_data.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=[], help=f"names ({', '.join(VARIANTS)}) or NAME=OVERRIDES")
    ap.add_argument("--base", default="smollm2", help="the config the variants override")
    ap.add_argument("--exit", action="append", default=[], metavar="NAME=PATH", help="measure a trained exit")
    ap.add_argument(
        "--curve",
        action="append",
        default=[],
        metavar="NAME=METRICS",
        help="attach a measured row's validation curve from its training metrics.jsonl (base config's batch size)",
    )
    ap.add_argument("--data-dir", default="runs/data", help="generated data shared by every variant")
    ap.add_argument("--text-dir", default="runs/text_readmes", help="teacher-forced text data shared by variants")
    ap.add_argument("--workdir", default="runs/drafter_study")
    ap.add_argument("--overrides", default="", help="extra overrides for every variant, e.g. train.steps=200")
    ap.add_argument("--round-len", type=int, default=6, help="K for acceptance by draft position")
    ap.add_argument("--out", default="experiments/results/drafter_study/drafter_study")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md / OUT.png from OUT.json")
    args = ap.parse_args(argv)
    if not (args.variants or args.exit or args.curve or args.render):
        ap.error("name --variants to train, --exit NAME=PATH to measure, --curve NAME=METRICS or --render")

    out = pathlib.Path(args.out)
    saved = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    rows = saved.get("rows", {})
    lm = None
    base = configs.load_config(args.base)
    todo = [(*variant_overrides(v), None) for v in args.variants]
    for e in args.exit:
        name, _, path = e.partition("=")
        todo.append((name, "", path))
    for name, overrides, given in todo:
        spec = (
            f"{args.base}:{overrides},data.dir={args.data_dir},data.text.dir={args.text_dir}" if given is None else None
        )
        if spec and args.overrides:
            spec += f",{args.overrides}"
        config = configs.load_config(spec) if spec else None
        lm = lm or teacher.load_lm(base.model)
        row = {"spec": spec}
        if config is not None:
            workdir = pathlib.Path(args.workdir) / name
            t0 = time.perf_counter()
            path = train.run_distill(config, workdir, lm=lm, progress=args.progress)
            seen = curve(workdir / "metrics.jsonl", int(config.train.batch_size))
            run = json.loads((workdir / "run.json").read_text())
            row |= {
                "train_seconds": round(time.perf_counter() - t0),
                "curve": seen,
                **trained(workdir, config),
                "data_seconds": {
                    "responses": round(sum(run["data_seconds"].values())),
                    "text": round(sum((run["text"] or {}).get("seconds", {}).values())),
                },
            }
        else:
            path = pathlib.Path(given)
        val_every = int((config or base).train.val_every_prompt)
        rows[name] = row | measure(lm, path, args.data_dir, val_every, args.round_len)
        print(json.dumps({name: rows[name]}), flush=True)
    for spec in args.curve:
        name, _, path = spec.partition("=")
        rows[name]["curve"] = curve(pathlib.Path(path), int(base.train.batch_size))
    for name, row in rows.items():  # Rows measured before their source or coverage was recorded.
        run_dir = pathlib.Path(args.workdir) / name
        if row.get("spec") and "data_ms_per_position" not in row and (run_dir / "run.json").is_file():
            row |= trained(run_dir, configs.load_config(row["spec"]))
        if "val_draft_vocab_coverage" not in row and pathlib.Path(row.get("exit", "")).is_file():
            lm = lm or teacher.load_lm(base.model)
            val_every = int((configs.load_config(row["spec"]) if row.get("spec") else base).train.val_every_prompt)
            _, params, val = validation(lm, pathlib.Path(row["exit"]), args.data_dir, val_every)
            row["val_draft_vocab_coverage"] = draft_vocab_coverage(params, val)

    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "provenance": provenance.record(data_seed=0, train_seed=0),
        "args": vars(args),
        "rows": rows,
        "scaling": scaling(rows),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(table(rows) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(table(rows))


if __name__ == "__main__":
    main()
