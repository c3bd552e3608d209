"""Vanilla autoregressive decoding: request validation, prefill, one jitted while_loop.

This is the baseline every EESD speed figure is measured against, and the
request/prefill half is shared with the EESD loop (eesd.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import model, sampling, sharding
from eesd_jax.kv_cache import KVCache, init_cache, round_up
from eesd_jax.model import ModelConfig, Params
from eesd_jax.sampling import SamplingConfig

PAD = -1  # Fills generated-token buffers past each row's length.


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated batch of prompts, padded to static shapes."""

    tokens_bp: np.ndarray  # [B, P] prompt ids, right-padded with 0 (P bucketed).
    prompt_lens_b: np.ndarray  # [B] real prompt lengths.
    max_new_b: np.ndarray  # [B] tokens to generate at most, per row.
    max_new: int  # Generated-token buffer width (max over rows).
    cache_len: int  # Cache slots S: longest prompt + max_new + slack, bucketed.


def make_request(
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    slack: int = 0,
) -> Request:
    """Validate prompts and lengths before any compute.

    `slack` is extra cache room a decoder writes past the last kept token (EESD
    writes up to a whole draft block there).
    """
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not len(p):
            raise ValueError(f"prompt {i} is empty" if not len(p) else f"prompt {i} must be a list of token ids")
        ids = np.asarray(p)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i} has non-integer token ids (a flat list of ints is expected)")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        checked.append(ids.tolist())
    prompts = checked
    limits = np.asarray(max_new_tokens)
    if not np.issubdtype(limits.dtype, np.integer):
        raise ValueError(f"max_new_tokens must be an integer or a list of integers, got {max_new_tokens!r}")
    if limits.ndim > 1 or (limits.ndim == 1 and len(limits) != len(prompts)):
        raise ValueError(f"max_new_tokens has {limits.size} entries for {len(prompts)} prompts")
    limits = np.broadcast_to(limits.astype(np.int64), (len(prompts),))
    if limits.min() <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lens = np.array([len(p) for p in prompts], np.int32)
    too_long = lens + limits > cfg.max_seq_len
    if too_long.any():
        i = int(np.argmax(too_long))
        raise ValueError(
            f"prompt {i} has {lens[i]} tokens; with max_new_tokens={limits[i]} it exceeds the "
            f"model's context of {cfg.max_seq_len} tokens"
        )
    width = round_up(int(lens.max()), 16)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    max_new = int(limits.max())
    return Request(
        tokens_bp=tokens,
        prompt_lens_b=lens,
        max_new_b=limits.astype(np.int32),
        max_new=max_new,
        cache_len=round_up(width + max_new + slack, 128),
    )


def last_logits(cfg: ModelConfig, params: Params, hidden_btd: jax.Array, index_b: jax.Array) -> jax.Array:
    """[B, V] logits at one position per row (the LM head runs on B rows, not B*T)."""
    h_b1d = jnp.take_along_axis(hidden_btd, index_b[:, None, None], axis=1)
    return model.lm_head(params, model.final_norm(params, cfg, h_b1d))[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(
    cfg: ModelConfig,
    params: Params,
    tokens_bp: jax.Array,
    prompt_lens_b: jax.Array,
    cache_len: int,
    segments: tuple[Params, ...] | None = None,
):
    """Run the prompts through the model, filling the cache.

    With `segments` = consecutive layer ranges covering [0, L) (e.g.
    eesd.split_params), also returns the [B, P, D] hidden states after each
    segment but the last (an early exit's input, its context layer's states).
    Returns (cache, [B, V] logits after each row's last prompt token, hiddens or None).
    """
    B, P = tokens_bp.shape
    cache = init_cache(cfg, B, cache_len)
    cache = sharding.constrain_cache(cache)  # Under a mesh: batch over 'data', kv heads over 'model'.
    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    x = model.embed(params, tokens_bp)
    hiddens, cache = model.run_segments(cfg, segments or (params["layers"],), x, positions, cache)
    logits = last_logits(cfg, params, hiddens[-1], prompt_lens_b - 1)
    return cache.replace(lengths=prompt_lens_b), logits, (tuple(hiddens[:-1]) if segments else None)


@flax.struct.dataclass
class ARState:
    """Loop state of vanilla decoding; every field is per row."""

    tokens: jax.Array  # [B, M] generated ids, PAD past n_new.
    n_new: jax.Array  # [B] tokens generated so far.
    max_new: jax.Array  # [B] per-row budget.
    last: jax.Array  # [B] newest token, not yet fed through the model.
    done: jax.Array  # [B] bool: hit EOS or budget; the row no longer changes.
    cache: KVCache  # Slots < lengths are valid: the prompt and all but the newest token.
    key: jax.Array  # PRNG key for sampling.
    steps: jax.Array  # [] int32 forward passes run by the loop.


def append_tokens(tokens_bm, n_new_b, new_bj, n_take_b):
    """Write new_bj[:, :n_take] at tokens[:, n_new:], per row (extras dropped)."""
    B, J = new_bj.shape
    cols = n_new_b[:, None] + jnp.arange(J)[None]
    cols = jnp.where(jnp.arange(J)[None] < n_take_b[:, None], cols, tokens_bm.shape[1])  # out of range -> dropped
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, J))
    return tokens_bm.at[rows, cols].set(new_bj, mode="drop")


def finish_block(new_bj, n_avail_b, n_new_b, max_new_b, eos_ids):
    """How many of a row's n_avail new tokens to keep, and whether it is done.

    Keeps tokens up to and including the first EOS, and no more than the row's
    remaining budget. Returns (n_keep [B], done [B]).
    """
    J = new_bj.shape[1]
    idx = jnp.arange(J)[None]
    is_eos = jnp.isin(new_bj, jnp.asarray(eos_ids, jnp.int32)) & (idx < n_avail_b[:, None])
    first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, J + 1)
    n_keep = jnp.minimum(jnp.minimum(n_avail_b, first_eos), max_new_b - n_new_b)
    done = (first_eos <= n_keep) | (n_new_b + n_keep >= max_new_b)
    return n_keep, done


def start_state(first_logits_bv, max_new_b, key, max_new, sampling_cfg, eos_ids):
    """The state after prefill: the first new token chosen and recorded."""
    B = first_logits_bv.shape[0]
    key, sub = jax.random.split(key)
    first = sampling.choose(sub, first_logits_bv, sampling_cfg)
    tokens = jnp.full((B, max_new), PAD, jnp.int32).at[:, 0].set(first)
    ones = jnp.ones((B,), jnp.int32)
    _, done = finish_block(first[:, None], ones, 0 * ones, max_new_b, eos_ids)
    return tokens, ones, first, done, key


@functools.partial(jax.jit, static_argnames=("sampling_cfg", "eos_ids", "max_new"), donate_argnames=("cache",))
def ar_init(first_logits_bv, cache, max_new_b, key, sampling_cfg, eos_ids, max_new) -> ARState:
    tokens, n_new, last, done, key = start_state(first_logits_bv, max_new_b, key, max_new, sampling_cfg, eos_ids)
    return ARState(tokens, n_new, max_new_b, last, done, cache, key, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling_cfg", "eos_ids"), donate_argnames=("state",))
def ar_decode(
    cfg: ModelConfig,
    params: Params,
    state: ARState,
    sampling_cfg: SamplingConfig,
    eos_ids: tuple[int, ...],
    max_steps: jax.Array,
) -> ARState:
    """Decode one token per row per step until every row is done or max_steps ran."""

    def step(s: ARState) -> ARState:
        pos_b = s.cache.lengths
        x = model.embed(params, s.last[:, None])
        x, cache = model.run_layers(cfg, params["layers"], x, pos_b[:, None], s.cache)
        logits = model.lm_head(params, model.final_norm(params, cfg, x))[:, 0]
        key, sub = jax.random.split(s.key)
        nxt = sampling.choose(sub, logits, sampling_cfg)
        live = ~s.done
        n_keep, done = finish_block(nxt[:, None], live.astype(jnp.int32), s.n_new, s.max_new, eos_ids)
        return ARState(
            tokens=append_tokens(s.tokens, s.n_new, nxt[:, None], n_keep),
            n_new=s.n_new + n_keep,
            max_new=s.max_new,
            last=jnp.where(live, nxt, s.last),
            done=s.done | done,
            cache=cache.replace(lengths=jnp.where(live, pos_b + 1, pos_b)),
            key=key,
            steps=s.steps + 1,
        )

    stop_at = state.steps + max_steps
    return jax.lax.while_loop(lambda s: (~s.done).any() & (s.steps < stop_at), step, state)
