"""Our jitted AR decoding vs transformers' PyTorch greedy `generate`, on the bundled model.

Same process, same prompts (chat set, chat template applied), greedy, batch 1. Each side
runs every prompt once to warm up (JIT compile / first-call costs excluded), then
--repeats timed runs; a prompt's time is the median over repeats. Throughput is total new
tokens over the summed median times. Also checks both produced identical greedy tokens.

    python experiments/bench_ar.py --n-prompts 3 --max-new-tokens 64 --repeats 3

Needs the parity extra (torch==2.13.0, accelerate): `make bench` installs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from eesd_jax import generate, loading, prompts
from eesd_jax.sampling import SamplingConfig


def time_runs(fn, repeats: int):
    """Warm up once, then time `repeats` calls; returns (median seconds, last result)."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def load_hf(path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return model


def hf_greedy(model, ids: list[int], max_new: int, eos: int) -> list[int]:
    import torch

    with torch.inference_mode():
        x = torch.tensor([ids])
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0, len(ids) :].tolist()


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", default="chat", help="prompt set name or file (default: chat, held-out split)")
    args = ap.parse_args(argv)
    if args.n_prompts < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        ap.error("--n-prompts, --max-new-tokens and --repeats must be >= 1")

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = loading.bundled_model_path()
    lm = loading.load_model(None)
    params = jax.tree.map(jnp.asarray, lm.params)
    tok = lm.tokenizer()
    eos = int(tok.eos_token_id)
    selected = prompts.load_prompts(args.prompts, split="heldout", n=args.n_prompts)
    encoded = [prompts.encode(tok, p.text, p.chat) for p in selected]
    hf_model = load_hf(path)

    rows = []
    for p, ids in zip(selected, encoded, strict=True):
        ours_s, gen = time_runs(
            lambda ids=ids: generate.generate_ar(lm.cfg, params, [ids], args.max_new_tokens, SamplingConfig(), (eos,)),
            args.repeats,
        )
        ours = gen.tokens[0]
        hf_s, hf = time_runs(lambda ids=ids: hf_greedy(hf_model, ids, args.max_new_tokens, eos), args.repeats)
        diff = first_difference(ours, hf)
        rows.append(
            {
                "id": p.id,
                "prompt_tokens": len(ids),
                "ours_tokens": len(ours),
                "hf_tokens": len(hf),
                "ours_seconds": round(ours_s, 4),
                "hf_seconds": round(hf_s, 4),
                "ours_tokens_per_second": round(len(ours) / ours_s, 2),
                "hf_tokens_per_second": round(len(hf) / hf_s, 2),
                "ratio": round((len(ours) / ours_s) / (len(hf) / hf_s), 3),
                "identical": diff is None,
                "first_difference": diff,
            }
        )

    ours_tps = sum(r["ours_tokens"] for r in rows) / sum(r["ours_seconds"] for r in rows)
    hf_tps = sum(r["hf_tokens"] for r in rows) / sum(r["hf_seconds"] for r in rows)
    print(
        f"model {lm.cfg.name} | jax {jax.__version__} ({jax.default_backend()}) | torch {torch.__version__} "
        f"({torch.get_num_threads()} threads) | {platform.processor() or platform.machine()}"
    )
    print(f"greedy, batch 1, max_new_tokens={args.max_new_tokens}, median of {args.repeats} after warm-up\n")
    header = f"{'prompt':<10} {'P':>4} {'new':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6}  identical"
    print(header)
    print("-" * len(header))
    for r in rows:
        same = "yes" if r["identical"] else f"no (from token {r['first_difference']})"
        print(
            f"{r['id']:<10} {r['prompt_tokens']:>4} {r['ours_tokens']:>5} {r['ours_tokens_per_second']:>11.2f} "
            f"{r['hf_tokens_per_second']:>9.2f} {r['ratio']:>6.2f}  {same}"
        )
    print("-" * len(header))
    print(
        f"{'total':<10} {'':>4} {'':>5} {ours_tps:>11.2f} {hf_tps:>9.2f} {ours_tps / hf_tps:>6.2f}  "
        f"{'yes' if all(r['identical'] for r in rows) else 'no'}"
    )

    summary = {
        "bench": "ar_vs_transformers",
        "model": lm.cfg.name,
        "prompts": args.prompts,
        "n_prompts": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "jax_backend": jax.default_backend(),
        "torch_threads": torch.get_num_threads(),
        "ours_tokens_per_second": round(ours_tps, 2),
        "hf_tokens_per_second": round(hf_tps, 2),
        "ratio": round(ours_tps / hf_tps, 3),
        "identical": all(r["identical"] for r in rows),
        "per_prompt": rows,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
