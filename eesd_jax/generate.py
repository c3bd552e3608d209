"""High-level generation: token ids in, tokens and timings out, AR or EESD.

`generate(...)` validates the request before any compute, runs prefill and the
jitted decode loop, and reports per-row tokens with timing and speculation
statistics. With `on_tokens`, the loop runs in chunks and new tokens are handed
to the callback as they are produced (the CLI streams text this way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import decoding, eesd, sharding
from eesd_jax.model import ModelConfig, Params
from eesd_jax.sampling import SamplingConfig


@dataclasses.dataclass
class Generation:
    """What one generate() call produced."""

    tokens: list[list[int]]  # Per row: the new tokens (EOS included if hit).
    mode: str  # "ar" or "eesd".
    prompt_tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    stats: dict  # Mode-specific counters (EESD: rounds, drafted, accepted, ...).
    trace: eesd.RoundTrace | None = None  # Host copy of EESD's round trace (EESDConfig.trace), else None.

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        """New tokens over prefill + decode time (what a user waits for)."""
        return self.new_tokens / max(self.prefill_seconds + self.decode_seconds, 1e-9)

    def summary(self) -> dict:
        return {
            "prompt_tokens": int(sum(self.prompt_tokens)),
            "new_tokens": self.new_tokens,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
            **self.stats,
        }


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _batch_inputs(req: decoding.Request, mesh):
    """The request's arrays, rows split over the mesh's 'data' axis when there is a mesh."""
    inputs = (jnp.asarray(req.tokens_bp), jnp.asarray(req.prompt_lens_b), jnp.asarray(req.max_new_b))
    return inputs if mesh is None else sharding.shard_batch(inputs, mesh)


def _rows(tokens_bm: np.ndarray, n_new_b: np.ndarray) -> list[list[int]]:
    return [tokens_bm[b, : n_new_b[b]].tolist() for b in range(len(n_new_b))]


def stream_loop(state, run_chunk: Callable, on_tokens, chunk: int):
    """Run `run_chunk(state, max_steps)` to completion, calling on_tokens(row_tokens) as they grow."""
    if on_tokens is None:
        return jax.block_until_ready(run_chunk(state, jnp.int32(2**30)))
    shown = np.zeros(state.n_new.shape, np.int64)
    while True:
        n_new, tokens = np.asarray(state.n_new), np.asarray(state.tokens)
        if (n_new > shown).any():
            on_tokens([tokens[b, shown[b] : n_new[b]].tolist() for b in range(len(n_new))])
            shown = n_new.copy()
        if np.asarray(state.done).all():
            return state
        state = run_chunk(state, jnp.int32(chunk))


def _run(req: decoding.Request, mesh, start: Callable, decode: Callable, on_tokens, chunk: int, fields):
    """The shared driver: place the batch, start (prefill + first token), run the decode loop.

    start(tokens_bp, prompt_lens_b, max_new_b) -> loop state; decode(state, max_steps) -> state.
    Returns (host copies of tokens, n_new and `fields` of the final state, prefill s, decode s).
    """
    with _mesh_context(mesh):
        inputs = _batch_inputs(req, mesh)
        t0 = time.perf_counter()
        state = jax.block_until_ready(start(*inputs))
        t1 = time.perf_counter()
        state = stream_loop(state, decode, on_tokens, chunk)
        t2 = time.perf_counter()
        out = sharding.fetch({k: getattr(state, k) for k in ("tokens", "n_new", *fields)})
    return out, t1 - t0, t2 - t1


def generate_ar(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
    chunk: int = 4,
    mesh: jax.sharding.Mesh | None = None,
) -> Generation:
    """Vanilla autoregressive decoding of a batch of prompts (token ids).

    mesh: rows over its 'data' axis; default: the mesh `params` lie on (sharding.shard_params), if any."""
    req = decoding.make_request(cfg, prompts, max_new_tokens)
    mesh = sharding.mesh_of(params) if mesh is None else mesh
    eos = tuple(int(e) for e in eos_ids)

    def start(tokens_bp, prompt_lens_b, max_new_b):
        cache, logits, _ = decoding.prefill(cfg, params, tokens_bp, prompt_lens_b, req.cache_len)
        return decoding.ar_init(logits, cache, max_new_b, jax.random.key(seed), sampling, eos, req.max_new)

    def decode(state, max_steps):
        return decoding.ar_decode(cfg, params, state, sampling, eos, max_steps)

    out, prefill_seconds, decode_seconds = _run(req, mesh, start, decode, on_tokens, chunk, ("steps",))
    return Generation(
        tokens=_rows(out["tokens"], out["n_new"]),
        mode="ar",
        prompt_tokens=req.prompt_lens_b.tolist(),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        stats={"forward_passes": int(out["steps"]) + 1},
    )


def speculation_stats(rounds, drafted, accepted) -> dict:
    """Hardware-independent figures of an EESD run (summed over rows)."""
    rounds, drafted, accepted = int(np.sum(rounds)), int(np.sum(drafted)), int(np.sum(accepted))
    return {
        "rounds": rounds,
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        # tau: tokens a round yields, the bonus / correction token included.
        "mean_accepted_per_round": round((accepted + rounds) / rounds, 4) if rounds else 0.0,
        "mean_draft_length": round(drafted / rounds, 4) if rounds else 0.0,
    }


def generate_eesd(
    cfg: ModelConfig,
    params: Params,
    exit_params: Params,
    ecfg: eesd.EESDConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
    chunk: int = 1,
    split: tuple[Params, ...] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Generation:
    """Early-exiting speculative decoding; same output as generate_ar (greedy) or its distribution.

    `split` = eesd.split_params(params, ecfg.exit_layer, ecfg.context_layer, ecfg.fuse_layers) may be passed to reuse
    the pre-sliced layer stacks across calls. With `mesh`, params and exit params
    should already be placed (sharding.shard_params / shard_exit_params); default: the mesh
    `params` lie on, if any.
    """
    ecfg.validate(cfg)
    mesh = sharding.mesh_of(params) if mesh is None else mesh
    req = decoding.make_request(cfg, prompts, max_new_tokens, slack=ecfg.block_len)
    eos = tuple(int(e) for e in eos_ids)
    segments = split or eesd.split_params(params, ecfg.exit_layer, ecfg.context_layer, ecfg.fuse_layers)

    def start(tokens_bp, prompt_lens_b, max_new_b):
        cache, logits, hiddens = decoding.prefill(cfg, params, tokens_bp, prompt_lens_b, req.cache_len, segments)
        key = jax.random.key(seed)
        return eesd.eesd_init(
            cfg, ecfg, params, exit_params, cache, hiddens, logits, max_new_b, key, sampling, eos, req.max_new
        )

    def decode(state, max_steps):
        return eesd.eesd_decode(cfg, ecfg, params, segments, exit_params, state, sampling, eos, max_steps)

    counters = ("rounds", "drafted", "accepted")
    fields = counters + (("trace",) if ecfg.trace else ())
    out, prefill_seconds, decode_seconds = _run(req, mesh, start, decode, on_tokens, chunk, fields)
    return Generation(
        tokens=_rows(out["tokens"], out["n_new"]),
        mode="eesd",
        prompt_tokens=req.prompt_lens_b.tolist(),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        stats={
            **speculation_stats(out["rounds"], out["drafted"], out["accepted"]),
            "per_row": {k: out[k].tolist() for k in counters},
        },
        trace=out.get("trace"),
    )
