"""Fit the `gate` draft-stop policy for an exit on real verification outcomes, and ship it beside the exit.

  python experiments/fit_gate.py                  # the bundled model's default exit (minutes on CPU)
  python experiments/fit_gate.py --config tiny --exit EXIT.safetensors

The exit's distillation-validation prompts (distill_data.validation_prompts: never trained on,
disjoint from every held-out set) are decoded with EESD as the engine runs it, greedy, with
`fixed` K so that every draft position 1..K gets judged, each round recorded
(EESDConfig.trace). Every draft whose round prefix still stood is one sample: the exit's
features when it drafted, and whether the LLM accepted it (outcomes.drafts). Prompts alternate
between a fit half and a check half: the gate (gate.fit: logistic regression on
gate.FEATURES) is fitted on the first, and scored on the second against the confidence rule
refitted as a logistic on q(d) alone, the untrained gate (confidence >= 0.5) and the base rate.

Writes <exit>.gate.json (weights, how they were fitted, the check scores), which `--controller
gate` then uses for that exit (control.for_exit), and results/fit_gate/<config>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from eesd_jax import control, distill_data, eesd, exits, generate, model, outcomes, provenance, shipped, teacher
from eesd_jax.configs import load_config
from eesd_jax.policies import gate

RESULTS = pathlib.Path(__file__).parent / "results"


def record(lm, exit_path, prompt_list, max_new: int, max_draft: int, max_prompt_tokens: int, batch: int):
    """outcomes.Drafts of traced, greedy, fixed-K EESD over the prompts (Drafts.row: the prompt's number)."""
    exit_cfg, exit_params = exits.load_exit(exit_path, lm.cfg, lm.fingerprint)
    ecfg = eesd.EESDConfig(
        exit_cfg.layer, max_draft, control.ControllerConfig("fixed"), context_layer=exit_cfg.context_layer, trace=True
    )
    split = eesd.split_params(lm.params, exit_cfg.layer, exit_cfg.context_layer, exit_cfg.fuse_layers)
    ids = [lm.encode(p)[-max_prompt_tokens:] for p in prompt_list]
    traces, rounds = [], []
    for start in range(0, len(ids), batch):
        run = generate.generate_eesd(
            lm.cfg, lm.params, exit_params, ecfg, ids[start : start + batch], max_new, eos_ids=lm.eos_ids, split=split
        )
        traces.append(run.trace)
        rounds.append(run.stats["per_row"]["rounds"])
        print(f"decoded {min(start + batch, len(ids))}/{len(ids)} prompts", flush=True)
    return outcomes.drafts(traces, rounds)


def gate_inputs(d: outcomes.Drafts, max_draft: int) -> np.ndarray:
    """[n, F] gate.phi of each sample, as the engine computes it when drafting."""
    f = {name: d.feature(name) for name in ("prob", "entropy", "margin", "cosine")}
    return np.asarray(gate.phi(**f, depth=d.position / max_draft))


def scores(p: np.ndarray, y: np.ndarray) -> dict:
    """Log-loss, AUC (the chance a random accepted draft is ranked above a rejected one) and accuracy at 0.5."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    log_loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    ranks = np.empty(len(p))
    ranks[np.argsort(p)] = np.arange(1, len(p) + 1)
    _, tie, count = np.unique(p, return_inverse=True, return_counts=True)
    ranks = (np.bincount(tie, weights=ranks) / count)[tie]  # Tied scores share their mean rank.
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    auc = float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)) if n_pos and n_neg else None
    return {
        "log_loss": round(log_loss, 4),
        "auc": None if auc is None else round(auc, 4),
        "accuracy": round(float(np.mean((p >= 0.5) == y)), 4),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="smollm2", help="config naming the LLM and the exit's training prompts")
    ap.add_argument("--exit", default=None, help="the exit (.safetensors); default: the model's shipped exit")
    ap.add_argument("--n", type=int, default=32, help="validation prompts to decode (half fit, half check)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-draft", type=int, default=6, help="K: every round drafts K (fixed)")
    ap.add_argument("--max-prompt-tokens", type=int, default=176, help="prompts keep their last this many tokens")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--l2", type=float, default=1e-2, help="gate.fit's L2 penalty (the bias is not shrunk)")
    ap.add_argument("--out", help="results JSON (default results/fit_gate/CONFIG.json)")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    lm = teacher.load_lm(config.model)
    exit_path = args.exit or shipped.default_exit(lm)
    if exit_path is None:
        raise SystemExit(f"no exit: pass --exit (nothing is shipped for {lm.name})")
    exits.load_exit(exit_path, lm.cfg, lm.fingerprint)  # A wrong exit fails here, before any decoding.
    lm = dataclasses.replace(lm, params=model.decode_layout(lm.params))
    prompt_list = distill_data.validation_prompts(config, args.n)
    if len(prompt_list) < 2:
        raise SystemExit(f"{args.config} holds out {len(prompt_list)} prompt(s): fitting and checking need 2")
    K = args.max_draft
    d = record(lm, exit_path, prompt_list, args.max_new_tokens, K, args.max_prompt_tokens, args.batch)
    phi, y = gate_inputs(d, K), d.accepted.astype(np.float64)
    fit_rows = d.row % 2 == 0  # Prompts alternate between the halves (rows are prompts in order).
    weights = gate.fit(phi[fit_rows], y[fit_rows], l2=args.l2)
    conf = gate.fit(phi[fit_rows] * (np.arange(phi.shape[1]) < 2), y[fit_rows], l2=args.l2)  # bias + q(d) only.
    check = ~fit_rows
    predict = lambda w: np.asarray(gate.accept_probability(w, phi[check]))  # noqa: E731
    base_rate = float(y[fit_rows].mean())
    check_scores = {
        "gate (fitted)": scores(predict(weights), y[check]),
        "confidence, calibrated (logistic on q(d))": scores(predict(conf), y[check]),
        "untrained gate (confidence >= 0.5)": scores(predict(gate.UNTRAINED), y[check]),
        "base rate": scores(np.full(int(check.sum()), base_rate), y[check]),
    }
    fitted_on = {
        "prompts": f"the even-numbered of {len(prompt_list)} distill_data.validation_prompts({args.config!r}); odd: check",
        "samples": int(fit_rows.sum()),
        "check_samples": int(check.sum()),
        "decoding": {"controller": "fixed", "max_draft": K, "max_new_tokens": args.max_new_tokens, "greedy": True},
        "l2": args.l2,
        "commit": provenance.git_commit(),
    }
    path = gate.save_fitted(exit_path, weights, {"fitted_on": fitted_on, "check": check_scores})
    result = {
        "config": args.config,
        "model": lm.name,
        "exit": pathlib.Path(exit_path).name,
        "weights": dict(zip(gate.FEATURES, weights, strict=True)),
        "fitted_on": fitted_on,
        "check": check_scores,
        "acceptance_by_position": outcomes.acceptance_by_position(d, K),
        "provenance": provenance.record(),
    }
    out = pathlib.Path(args.out or RESULTS / "fit_gate" / f"{args.config.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path} and {out}")
    print(json.dumps({"weights": result["weights"], "check": check_scores}, indent=1))
    return result


if __name__ == "__main__":
    main()
