"""Decode speed of AR and EESD on one long prompt: what grows with the context.

The prompt is the held-out HumanEval tasks in a chat request, cut to its last
--prompt-tokens tokens; greedy, batch 1. Both modes run after a warm-up, interleaved
--repeats times; decode tokens/s (prefill excluded) are medians. Run it from two
checkouts (PYTHONPATH=<checkout>) with the same --exit to compare engine versions.

  python experiments/long_context.py --prompt-tokens 1800 --controller beta-ts
"""

from __future__ import annotations

import argparse
import json
import statistics

from eesd_jax import cli, control, eesd, exits, generate, prompts, shipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=1800)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--exit", help="exit file (default: the shipped one)")
    ap.add_argument("--controller", default=control.ControllerConfig.kind, help="KIND[:KNOB=V,...]")
    ap.add_argument("--max-draft", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    session = cli.load_session(None)
    code = "\n\n".join(p.text for p in prompts.load_prompts("humaneval", "heldout"))
    ids = cli.encode_prompt(session, "Explain what each of these functions does:\n\n" + code, True)
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"the prompt has only {len(ids)} tokens")
    ids = ids[-args.prompt_tokens :]
    exit_path = args.exit or shipped.default_exit(session.lm)
    exit_cfg, exit_params = exits.load_exit(exit_path, session.cfg, session.lm.fingerprint)
    ecfg = eesd.config_for_exit(exit_cfg, exit_path, args.max_draft, args.controller)
    split = eesd.split_params(session.params, ecfg.exit_layer, ecfg.context_layer, ecfg.fuse_layers)
    common = dict(max_new_tokens=args.max_new_tokens, eos_ids=session.eos_ids)
    runs = {
        "ar": lambda: generate.generate_ar(session.cfg, session.params, [ids], **common),
        "eesd": lambda: generate.generate_eesd(
            session.cfg, session.params, exit_params, ecfg, [ids], split=split, **common
        ),
    }
    first = {mode: run() for mode, run in runs.items()}  # Compile and warm up.
    tok_s = {mode: [] for mode in runs}
    for _ in range(args.repeats):
        for mode, run in runs.items():
            g = run()
            tok_s[mode].append(g.new_tokens / g.decode_seconds)
    ar, es = (statistics.median(tok_s[m]) for m in ("ar", "eesd"))
    stats = first["eesd"].stats
    print(json.dumps({
        "prompt_tokens": len(ids), "controller": args.controller, "ar_decode_tok_s": round(ar, 2),
        "eesd_decode_tok_s": round(es, 2), "speedup": round(es / ar, 3),
        "identical": first["ar"].tokens == first["eesd"].tokens,
        "alpha": stats["acceptance_rate"], "tau": stats["mean_accepted_per_round"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
