"""Decode speed of AR and EESD on one long prompt: what grows with the context.

The prompt is the held-out HumanEval tasks in a chat request, cut to its last
--prompt-tokens tokens; greedy, batch 1. Both modes run through eesd_jax.bench.run (after
a warm-up, --repeats times each); decode tokens/s (prefill excluded) are medians. Run it
from two checkouts (PYTHONPATH=<checkout>) with the same --exit to compare engine versions.

  python experiments/long_context.py --prompt-tokens 1800 --controller beta-ts
"""

from __future__ import annotations

import argparse
import json

from eesd_jax import bench, control, engine, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=1800)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--exit", help="exit file (default: the shipped one)")
    ap.add_argument("--controller", default=control.ControllerConfig.kind, help="KIND[:KNOB=V,...]")
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    session = engine.load_session(None)
    code = "\n\n".join(p.text for p in prompts.load_prompts("humaneval", "heldout"))
    ids = engine.encode_prompt(session, "Explain what each of these functions does:\n\n" + code, True)
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"the prompt has only {len(ids)} tokens")
    ids = ids[-args.prompt_tokens :]
    eng = engine.eesd_engine(session, args.exit, max_draft=args.max_draft, controller=args.controller)
    report = bench.run(
        engine.bench_setup(session, eng), [ids], args.max_new_tokens, repeats=args.repeats, step_costs=False
    ).report
    ar, es = (report["modes"][m]["median_decode_tokens_per_second"] for m in ("ar", "eesd"))
    stats = report["modes"]["eesd"]
    print(
        json.dumps(
            {
                "prompt_tokens": len(ids),
                "controller": args.controller,
                "ar_decode_tok_s": round(ar, 2),
                "eesd_decode_tok_s": round(es, 2),
                "speedup": round(es / ar, 3),
                "identical": report["identical"],
                "alpha": stats["acceptance_rate"],
                "tau": stats["mean_accepted_per_round"],
            }
        )
    )


if __name__ == "__main__":
    main()
