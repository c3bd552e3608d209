"""The ceiling of a draft tree: how often the LLM's greedy token is in the exit's top-1/2/4/8.

On held-out prompts the LLM decodes greedily (AR); then the exit is run teacher-forced over
each whole sequence exactly as it drafts inside a round along the correct path:
  * draft position 1 (the round starts at the token before): verified context below the
    round, the newest token's layer-N state;
  * draft position 2: the round started one token earlier, so the exit also attends to its
    own layer-N state of the (correct) first draft (what an exit with a context layer sees
    differently from position 1; an exit without one sees the same at both).
A hit at rank <= k means a tree with k children at that depth holds the LLM's token; "path"
is both positions hit (a depth-2 tree of k x k along the correct path). Tokens outside the
exit's draft vocabulary are misses at every k.

  python experiments/tree_ceiling.py            # 8 held-out prompts (chat, humaneval) x 64 tokens
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import decoding, eesd, exits, generate, loading, losses, model, prompts, shipped

KS = (1, 2, 4, 8)
OUT = pathlib.Path(__file__).parent / "results" / "trees" / "ceiling.json"


def ranks(cfg, params, exit_cfg, exit_params, seq: list[int], first: int) -> np.ndarray:
    """[2, T] rank of seq[t + 1] among the exit's draft logits at position t, at draft positions 1 and 2.

    first: index of the first generated token (ranks before it are -1); a token outside the
    draft vocabulary gets rank V.
    """
    tokens = jnp.asarray(seq, jnp.int32)[None]
    T = tokens.shape[1]
    segments = eesd.split_params(params, exit_cfg.layer, exit_cfg.context_layer)
    _, _, hiddens = decoding.prefill(cfg, params, tokens, jnp.asarray([T]), T, segments)
    head = losses.frozen_head(params, exit_params)
    vocab = np.asarray(exit_params["vocab"]) if "vocab" in exit_params else np.arange(cfg.vocab_size)
    index = np.full(cfg.vocab_size, -1)
    index[vocab] = np.arange(len(vocab))
    nxt = np.asarray(seq[1:] + [seq[-1]])
    out = np.full((2, T), -1)
    for depth in (1, 2):
        start = jnp.maximum(jnp.arange(T) - (depth - 1), 0)[None]
        context = hiddens[1] if exit_cfg.context_layer else None
        logits = np.asarray(losses.exit_train_logits(cfg, head, exit_params, hiddens[0], None, context, start)[0])
        target = index[nxt]
        own = np.take_along_axis(logits, np.maximum(target, 0)[:, None], 1)[:, 0]
        rank = np.where(target >= 0, (logits > own[:, None]).sum(-1), cfg.vocab_size)
        lo = first - 1 + (depth - 1)  # Position 2 needs a round start at or after the prompt's last token.
        out[depth - 1, lo : T - 1] = rank[lo : T - 1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="chat,humaneval", help="comma-separated prompt sets (held-out split)")
    ap.add_argument("--n", type=int, default=4, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--exit", default=None, help="exit file (default: the shipped default exit)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    lm = loading.load_model(None)
    cfg, tok = lm.cfg, lm.tokenizer()
    params = model.decode_layout(jax.tree.map(jnp.asarray, lm.params))
    exit_path = args.exit or shipped.default_exit(lm)
    exit_cfg, exit_params = exits.load_exit(exit_path, cfg, lm.fingerprint)
    eos = (int(tok.eos_token_id),)
    all_ranks = []
    for source in args.prompts.split(","):
        for p in prompts.load_prompts(source, "heldout", args.n):
            ids = prompts.encode(tok, p.text, p.chat)
            gen = generate.generate_ar(cfg, params, [ids], args.max_new_tokens, eos_ids=eos)
            all_ranks.append(ranks(cfg, lm.params, exit_cfg, exit_params, ids + gen.tokens[0], len(ids)))
    r = np.concatenate(all_ranks, 1)
    hit = {k: r < k for k in KS}
    valid1, valid2 = r[0] >= 0, r[1] >= 0
    # Path: position 1 at t and position 2 at t + 1 (the same round, started at t).
    both = valid1[:-1] & valid2[1:]
    report = {
        "exit": str(pathlib.Path(exit_path).name),
        "N": exit_cfg.layer,
        "context_layer": exit_cfg.context_layer,
        "prompts": args.prompts,
        "n_per_set": args.n,
        "max_new_tokens": args.max_new_tokens,
        "positions": int(valid1.sum()),
        "position1_topk": {k: round(float(hit[k][0][valid1].mean()), 4) for k in KS},
        "position2_topk_given_1_correct": {k: round(float(hit[k][1][valid2].mean()), 4) for k in KS},
        "path_topk_x_topk": {k: round(float((hit[k][0][:-1] & hit[k][1][1:])[both].mean()), 4) for k in KS},
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
