"""Our jitted AR decoding vs transformers' PyTorch greedy `generate`, on the bundled model.

Each side runs in a process of its own, so that neither slows the other (torch's and XLA's thread
pools in one process cost our AR about half its speed): first ours, measured exactly as
`eesd bench --modes ar` measures (bench.run, after a warm-up per prompt), which writes the prompt ids
and its greedy tokens; then transformers on the same ids, timed the same way (warm-up, then the
per-prompt median of --repeats runs). Greedy, batch 1, the held-out chat prompts with the chat
template. Checks that both sides produced identical tokens. Writes bench_ar.json (both sides'
numbers, per prompt, with provenance) and bench_ar.md to --out.

    python experiments/bench_ar.py --n-prompts 4 --max-new-tokens 64 --repeats 3

Needs the parity extra (torch==2.13.0, accelerate): `make bench` installs it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).parent / "results" / "bench_ar"


def side_ours(args, work: pathlib.Path) -> None:
    """Our AR as `eesd bench --modes ar` runs it (bench.run); writes ours.json: report, prompt ids, tokens."""
    from eesd_jax import bench, engine, prompts

    session = engine.load_session()
    chosen = prompts.load_prompts(args.prompts, split="heldout", n=args.n_prompts)
    ids = [engine.encode_prompt(session, p.text, p.chat) for p in chosen]
    setup = engine.bench_setup(session, engine.eesd_engine(session))
    measured = bench.run(setup, ids, args.max_new_tokens, ("ar",), repeats=args.repeats)
    report = measured.report
    report["config"].update(prompts=args.prompts, split="heldout")
    record = {
        "report": report,
        "model": pathlib.Path(session.lm.source).name,
        "prompt_ids": [p.id for p in chosen],
        "ids": ids,
        "eos": list(session.eos_ids),
        "tokens": [t for g in measured.generations["ar"] for t in g.tokens],
    }
    (work / "ours.json").write_text(json.dumps(record))


def side_hf(args, work: pathlib.Path) -> None:
    """transformers' greedy generate on ours.json's prompt ids; writes hf.json."""
    import torch
    import transformers

    from eesd_jax import loading

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    ours = json.loads((work / "ours.json").read_text())
    path = loading.bundled_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    eos = ours["eos"][0]

    def greedy(ids):
        with torch.inference_mode():
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            return out[0, len(ids) :].tolist(), time.perf_counter() - t0

    rows = []
    for ids in ours["ids"]:
        greedy(ids)  # Warm-up, as bench.run does.
        runs = [greedy(ids) for _ in range(args.repeats)]
        rows.append({"tokens": runs[0][0], "seconds": [s for _, s in runs]})
    record = {"rows": rows, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    (work / "hf.json").write_text(json.dumps(record))


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarize(ours: dict, hf: dict) -> dict:
    """Both sides on bench.run's definitions: tokens_per_second = all new tokens over the first timed
    run's seconds; median_tokens_per_second = the median over prompts of each prompt's median."""
    ar = ours["report"]["modes"]["ar"]
    new = sum(len(r["tokens"]) for r in hf["rows"])
    hf_tps = new / sum(r["seconds"][0] for r in hf["rows"])
    hf_median = statistics.median(statistics.median(len(r["tokens"]) / s for s in r["seconds"]) for r in hf["rows"])
    per_prompt = []
    for pid, ids, mine, theirs in zip(ours["prompt_ids"], ours["ids"], ours["tokens"], hf["rows"], strict=True):
        diff = first_difference(mine, theirs["tokens"])
        per_prompt.append(
            {
                "id": pid,
                "prompt_tokens": len(ids),
                "new_tokens": len(mine),
                "identical": diff is None,
                "first_difference": diff,
            }
        )
    return {
        "bench": "ar_vs_transformers",
        "model": ours["model"],
        "ours": {
            "tokens_per_second": ar["tokens_per_second"],
            "median_tokens_per_second": ar["median_tokens_per_second"],
            "new_tokens": ar["new_tokens"],
        },
        "transformers": {
            "tokens_per_second": round(hf_tps, 2),
            "median_tokens_per_second": round(hf_median, 2),
            "new_tokens": new,
            "torch": hf["torch"],
            "torch_threads": hf["torch_threads"],
        },
        "ratio": round(ar["tokens_per_second"] / hf_tps, 3),
        "median_ratio": round(ar["median_tokens_per_second"] / hf_median, 3),
        "identical": all(r["identical"] for r in per_prompt),
        "per_prompt": per_prompt,
        "config": ours["report"]["config"],
        "provenance": ours["report"]["provenance"],
    }


def markdown(s: dict) -> str:
    c = s["config"]
    lines = [
        "# Our AR vs transformers' greedy generate (each in its own process)",
        "",
        f"{s['model']}, {c['n_prompts']} {c['prompts']} prompts ({c['split']}), greedy, batch 1, "
        f"max_new_tokens={c['max_new_tokens']}, {c['repeats']} timed runs after a warm-up; "
        f"commit {s['provenance']['commit']}, {s['provenance']['device']['platform']}.",
        "",
        "| side | tok/s | median tok/s | new tokens |",
        "|---|---:|---:|---:|",
        f"| ours (jax, `eesd bench --modes ar`) | {s['ours']['tokens_per_second']:.2f} | {s['ours']['median_tokens_per_second']:.2f} | {s['ours']['new_tokens']} |",
        f"| transformers (torch {s['transformers']['torch']}, {s['transformers']['torch_threads']} threads) | {s['transformers']['tokens_per_second']:.2f} | {s['transformers']['median_tokens_per_second']:.2f} | {s['transformers']['new_tokens']} |",
        "",
        f"Ratio ours/transformers: {s['ratio']:.2f}x (medians {s['median_ratio']:.2f}x); identical greedy tokens: "
        f"{'yes' if s['identical'] else 'no'}.",
    ]
    for r in s["per_prompt"]:
        if not r["identical"]:
            lines.append(f"- {r['id']}: first differs at token {r['first_difference']}")
    return "\n".join(lines) + "\n"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", default="chat", help="prompt set name or file (default: chat, held-out split)")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS, help=f"where bench_ar.json/.md go (default {RESULTS})")
    ap.add_argument("--side", choices=("ours", "hf"), help=argparse.SUPPRESS)  # One side, in a child process.
    ap.add_argument("--work", type=pathlib.Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.n_prompts < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        ap.error("--n-prompts, --max-new-tokens and --repeats must be >= 1")
    return args


def side_argv(args, side: str, work: pathlib.Path) -> list[str]:
    """The child process that runs one side with the parent's settings."""
    settings = ["--n-prompts", str(args.n_prompts), "--max-new-tokens", str(args.max_new_tokens)]
    settings += ["--repeats", str(args.repeats), "--prompts", args.prompts]
    return [sys.executable, __file__, *settings, "--side", side, "--work", str(work)]


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.side:
        (side_ours if args.side == "ours" else side_hf)(args, args.work)
        return None
    with tempfile.TemporaryDirectory(prefix="bench_ar_") as tmp:
        work = pathlib.Path(tmp)
        for side in ("ours", "hf"):
            print(f"bench_ar: {side} side, in its own process...", file=sys.stderr, flush=True)
            subprocess.run(side_argv(args, side, work), check=True)
        ours, hf = (json.loads((work / f"{s}.json").read_text()) for s in ("ours", "hf"))
    summary = summarize(ours, hf)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_ar.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "bench_ar.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
