"""An exit measured where it matters: α, τ and speed in real greedy EESD decoding against AR.

    from eesd_jax import configs, evaluation
    figures = evaluation.run_eval(configs.load_config("smollm2:N=6"), "runs/smollm2_n6/exit_N6.safetensors")

AR and EESD are timed by bench.run (the one AR-vs-EESD harness); the exit's top-1
agreement with the LLM's own greedy continuations comes from losses.data_metrics.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import bench, control, distill_data, eesd, exits, generate, losses, prompts, sharding, shards, teacher


def eval_exit(
    lm,
    exit_path,
    prompt_list_or_ids,
    max_new_tokens: int = 128,
    max_draft: int = 8,
    controller: str = control.ControllerConfig.kind,
    eos_ids: Sequence[int] | None = None,
    warmup: bool = True,
    max_prompt_tokens: int = 0,
    progress: bool = True,
) -> dict:
    """An exit's figures on (held-out) prompts, batch 1, greedy.

    lm: a teacher.LM, or what teacher.as_lm takes (a loading.LoadedModel, an engine.Session).
    prompt_list_or_ids: prompts.Prompt objects (encoded with lm's tokenizer) or token-id lists;
    with max_prompt_tokens > 0 longer prompts keep their last max_prompt_tokens tokens.
    Runs AR and EESD on every prompt in this process (bench.run; warmup: each batch first runs
    untimed). Reports top-1 agreement of the exit with the LLM's greedy tokens (from the layer-N
    states of the AR outputs), acceptance rate α, τ (tokens per round, bonus included), tokens/s
    of both, the speedup and whether every output is identical.
    """
    lm = teacher.as_lm(lm)
    cfg, params = lm.cfg, lm.params
    eos = tuple(lm.eos_ids if eos_ids is None else eos_ids)
    exit_cfg, exit_params = exits.load_exit(exit_path, cfg, lm.fingerprint)
    ids = [lm.encode(p) if isinstance(p, prompts.Prompt) else list(p) for p in prompt_list_or_ids]
    ids = [p[-max_prompt_tokens:] if max_prompt_tokens else p for p in ids]
    if not ids:
        raise ValueError("no prompts to evaluate on")
    ecfg = eesd.config_for_exit(exit_cfg, exit_path, max_draft, controller)
    if (mesh := sharding.mesh_of(params)) is not None:  # The LLM on a mesh: the exit beside it, rows over 'data'.
        exit_params = sharding.shard_exit_params(exit_params, mesh)
    setup = bench.BenchSetup(cfg, params, exit_params, ecfg, eos, mesh)
    bar = teacher.progress_bar(progress, total=2 * len(ids), desc="eval-exit", unit="run")
    tick = lambda mode, gen: bar.update(1)  # noqa: E731
    timed = bench.run(setup, ids, max_new_tokens, progress=tick, step_costs=False, warmup=warmup)
    bar.close()
    report, gens = timed.report, timed.generations
    ar_out = [g.tokens[0] for g in gens["ar"]]
    rows = [
        {
            "prompt_tokens": len(p),
            "identical": a == e.tokens[0],
            "tau": e.stats["mean_accepted_per_round"],
            "alpha": e.stats["acceptance_rate"],
        }
        for p, a, e in zip(ids, ar_out, gens["eesd"])
    ]
    agreement = greedy_agreement(lm, exit_cfg, exit_params, ids, ar_out)
    ar, es = report["modes"]["ar"], report["modes"]["eesd"]
    return {
        "exit": {
            "path": str(exit_path),
            "layer": exit_cfg.layer,
            "own_head": exit_cfg.own_head,
            "draft_vocab": exit_cfg.draft_vocab,
        },
        "prompts": len(ids),
        "max_new_tokens": max_new_tokens,
        "max_draft": max_draft,
        "controller": controller,
        "top1_agreement": agreement["top1"],
        "alpha": es["acceptance_rate"],
        "tau": es["mean_accepted_per_round"],
        **{k: es[k] for k in generate.speculation_stats(0, 0, 0)},
        "ar_tokens": ar["new_tokens"],
        "eesd_tokens": es["new_tokens"],
        "ar_seconds": ar["seconds"],
        "eesd_seconds": es["seconds"],
        "ar_tokens_per_s": ar["tokens_per_second"],
        "eesd_tokens_per_s": es["tokens_per_second"],
        "speedup": report["speedup"],
        "identical": all(r["identical"] for r in rows),
        "n_identical": sum(r["identical"] for r in rows),
        "per_prompt": rows,
    }


def greedy_agreement(
    lm: teacher.LM, exit_cfg: exits.ExitConfig, exit_params, ids: list[list[int]], outputs: list[list[int]]
) -> dict:
    """losses.data_metrics of the exit on the LLM's own continuations: exit argmax at position t vs token t+1."""
    cfg = lm.cfg
    seqs = [p + out for p, out in zip(ids, outputs)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    tokens = np.concatenate([np.asarray(s, np.int32) for s in seqs])
    c, fuse = exit_cfg.context_layer, exit_cfg.fuse_layers
    layers = [exit_cfg.layer, *([c] if c else []), *fuse]
    hidden, _, _ = teacher.run_teacher(lm, tokens, offsets, layers, 0, progress=False)
    nxt = np.roll(tokens, -1)[:, None]
    data = shards.Data.from_arrays(
        tokens,
        offsets,
        np.array([len(p) for p in ids], np.int32),
        hidden[exit_cfg.layer],
        np.zeros((len(tokens), 1), np.float32),
        nxt.astype(np.int32),
        context=hidden[c] if c else None,
        fuse=np.stack([hidden[j] for j in fuse], 1).astype(np.float16) if fuse else None,
    )
    return losses.data_metrics(cfg, lm.params, exit_params, data, seq_len=cfg.max_seq_len)


def run_eval(config, exit_path, lm=None, progress: bool = True, out: str | pathlib.Path | None = None) -> dict:
    """eval_exit on config.eval's prompt sets (held-out by default); optionally writes JSON."""
    lm = teacher.load_lm(config.model) if lm is None else teacher.as_lm(lm)
    lm = dataclasses.replace(lm, params=jax.tree.map(jnp.asarray, lm.params))
    e = config.eval
    plist = distill_data.prompt_list(e.sets, int(e.n_per_set))
    result = eval_exit(
        lm,
        exit_path,
        plist,
        int(e.max_new_tokens),
        int(e.max_draft),
        str(e.controller),
        max_prompt_tokens=int(config.data.max_prompt_tokens),
        progress=progress,
    )
    result["sets"] = list(e.sets)
    if out is not None and sharding.is_main_process():
        pathlib.Path(out).write_text(json.dumps(result, indent=1))
    return result
