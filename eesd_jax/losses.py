"""Batches and losses for distilling the early-exiting layer from the data of distill_data.

`make_batch` pads whole sequences: the exit block runs over every position (it attends over
previous ones, as when drafting), the head and the loss only on the selected (response)
positions. `distill_loss` is KL(teacher top-k || draft) (renormalized over top-k ∩ draft
vocabulary) and / or CE on the sampled tokens; `data_metrics` measures an exit over a
whole `Data` (evaluation.eval_exit measures it in real EESD decoding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import exits, model, sharding
from eesd_jax.distill_data import vocab_map
from eesd_jax.kv_cache import init_cache, round_up
from eesd_jax.model import ModelConfig, Params
from eesd_jax.shards import Data


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """B sequences padded to T positions, of which R (`select`) carry a loss (R = T, or fewer:
    the head and the loss then run on the response positions only, not on the prompt)."""

    hidden: np.ndarray  # [B, T, D] layer-N hidden states.
    select: np.ndarray  # [B, R] int32: positions (in T) the loss and metrics are taken at.
    topk_logp: np.ndarray  # [B, R, C] teacher top-k log-probs there.
    topk_ids: np.ndarray  # [B, R, C]
    next_tokens: np.ndarray  # [B, R] the sampled token that follows (0 past the end).
    weights: np.ndarray  # [B, R] loss weight: 1 response positions, prompt_weight prompt ones, 0 padding.
    response: np.ndarray  # [B, R] bool: position predicts a response token (metrics).
    start: np.ndarray  # [B, T] int32 the first position of the draft round each position belongs to.
    context: np.ndarray | None = None  # [B, T, D] context-layer states (ExitConfig.context_layer), else None.
    # [B, T, F, D] the LLM's states after the fuse layers (ExitConfig.fuse_layers) at each position's
    # *previous* position (zeros before a sequence's first), else None.
    fuse: np.ndarray | None = None


Rounds = np.random.Generator | int | None  # How make_batch / round_starts tile a sequence into draft rounds.


def round_starts(n: int, first: int, rounds: Rounds, max_round: int = 4) -> np.ndarray:
    """[n] the first position of the simulated draft round each position belongs to.

    Positions before `first` (the prompt) are verified context: each starts its own. From
    `first` on, rounds tile the rest: None makes every position a round start (what the
    first draft token of a round sees); an int J, rounds of exactly J (position j of a
    round is draft token j + 1); a Generator, rounds of uniform random length 1..max_round
    (training: every draft position, in proportion).
    """
    starts = np.arange(n)
    if rounds is None:
        return starts
    t = max(first, 0)
    while t < n:
        length = rounds if isinstance(rounds, int) else int(rounds.integers(1, max_round + 1))
        starts[t : t + length] = t
        t += length
    return starts


def make_batch(
    data: Data,
    seq_idx: Sequence[int],
    seq_len: int,
    bucket: int,
    prompt_weight: float = 0.0,
    n_select: int = 0,
    rounds: Rounds = None,
    max_round: int = 4,
) -> Batch:
    """Sequences (their last seq_len positions) padded to a multiple of `bucket`.

    With n_select > 0 and prompt_weight == 0, only the (at most n_select) response
    positions of each row are selected: R = min(T, n_select). With a context layer in
    `data`, `rounds` and `max_round` choose the draft rounds (round_starts).
    """
    seqs = [data.sequence(int(k)) for k in seq_idx]
    spans = [(max(0, len(s.tokens) - seq_len), len(s.tokens)) for s in seqs]
    T = min(round_up(max(b - a for a, b in spans), bucket), round_up(seq_len, bucket))
    R = min(T, n_select) if n_select and not prompt_weight else T
    B, (D,), C = len(spans), seqs[0].hidden.shape[1:], seqs[0].topk_ids.shape[1]
    out = Batch(
        hidden=np.zeros((B, T, D), np.float32),
        select=np.zeros((B, R), np.int32),
        topk_logp=np.zeros((B, R, C), np.float32),
        topk_ids=np.zeros((B, R, C), np.int32),
        next_tokens=np.zeros((B, R), np.int32),
        weights=np.zeros((B, R), np.float32),
        response=np.zeros((B, R), bool),
        start=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        context=None if seqs[0].context is None else np.zeros((B, T, D), np.float32),
        fuse=None if seqs[0].fuse is None else np.zeros((B, T, *seqs[0].fuse.shape[1:]), np.float32),
    )
    for r, (s, (a, b)) in enumerate(zip(seqs, spans)):
        n = b - a
        out.hidden[r, :n] = s.hidden[a:b]
        first_new = int(data.prompt_lens[seq_idx[r]]) - a  # The first generated token's index.
        out.start[r, :n] = round_starts(n, first_new, rounds, max_round)
        if s.context is not None:
            out.context[r, :n] = s.context[a:b]
        if s.fuse is not None:  # Position a's predecessor is in the data unless a starts the sequence.
            first = int(a > 0)
            out.fuse[r, 1 - first : n] = s.fuse[a - first : b - 1]
        mask = s.mask[a:b]
        pos = np.arange(n) if R == T else np.flatnonzero(mask)
        if len(pos) > R:
            raise ValueError(f"a sequence has {len(pos)} train positions, more than n_select={R}")
        m = len(pos)
        out.select[r, :m] = pos
        out.topk_logp[r, :m] = s.topk_logp[a + pos]
        out.topk_ids[r, :m] = s.topk_ids[a + pos]
        has_next = pos + 1 < n
        out.next_tokens[r, :m] = np.where(has_next, s.tokens[np.minimum(a + pos + 1, b - 1)], 0)
        out.response[r, :m] = mask[pos]
        out.weights[r, :m] = np.where(mask[pos], 1.0, np.where(has_next, prompt_weight, 0.0))
    return out


def max_train_positions(data: Data) -> int:
    """The most train (response) positions any sequence has: n_select for make_batch."""
    return int(data.n_train.max()) if data.n_seq else 0


def exit_train_logits(
    cfg: ModelConfig,
    head_vd: jax.Array,
    exit_params: Params,
    hidden_btd: jax.Array,
    select_br: jax.Array | None = None,
    context_btd: jax.Array | None = None,
    start_bt: jax.Array | None = None,
    fuse_btfd: jax.Array | None = None,
    n_round: int = 1,
) -> jax.Array:
    """Draft logits [B, R, V'] (V' = draft vocabulary or full vocabulary).

    The same computation as exits.exit_logits with a fresh one-layer cache and positions
    arange(T), without scattering a draft vocabulary into the full one; the block runs on
    all T positions, the head only on the R selected ones (default: all). `head_vd` is
    the exit's own head, or the LLM's frozen one. With a context layer, context_btd and
    start_bt (Batch.context, Batch.start) give each position the mixture it sees when
    drafting (model.block_with_context).

    A fused exit (fuse_btfd: Batch.fuse) runs as in decoding ("training-time test"): a round's
    first position reads its predecessor's verified states, a later one the exit's own output
    at its predecessor, which needs n_round passes for rounds of up to n_round positions (pass
    j makes round position j exact); verified positions' keys/values come from verified inputs.
    """
    B, T, _ = hidden_btd.shape
    if ("fuse" in exit_params) != (fuse_btfd is not None):
        raise ValueError("a fused exit needs the fuse layers' states (Data.fuse), and only a fused exit reads them")
    if context_btd is None and fuse_btfd is None:
        cache = init_cache(cfg, B, T, layers=1, dtype=hidden_btd.dtype)
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        x, _ = exits.exit_hidden(cfg, exit_params, hidden_btd, positions, cache)
    else:
        block = exits.block_params(exit_params)
        start_bt = jnp.broadcast_to(jnp.arange(T), (B, T)) if start_bt is None else start_bt
        exit_in, verified = hidden_btd, None
        if fuse_btfd is not None:
            verified = exits.fuse_features(cfg, exit_params, fuse_btfd)
            exit_in = exits.fused_input(hidden_btd, exit_params, verified)
        context_btd = exit_in if context_btd is None else context_btd
        first_bt11 = (start_bt == jnp.arange(T))[..., None, None]
        x = model.rms_norm(
            model.block_with_context(cfg, block, exit_in, context_btd, start_bt), exit_params["norm"], cfg.rms_eps
        )
        for _ in range(n_round - 1 if verified is not None else 0):
            own = exits.previous_features(
                jnp.broadcast_to(x[..., None, :], verified.shape), jnp.zeros_like(verified[:, 0])
            )
            exit_in = exits.fused_input(hidden_btd, exit_params, jnp.where(first_bt11, verified, own))
            x = model.rms_norm(
                model.block_with_context(cfg, block, exit_in, context_btd, start_bt), exit_params["norm"], cfg.rms_eps
            )
    if select_br is not None:
        x = jnp.take_along_axis(x, select_br[..., None], axis=1)
    return jnp.einsum("btd,vd->btv", x, head_vd, preferred_element_type=jnp.float32)


def distill_loss(logits_brv, vmap_v, batch, kl_weight: float, ce_weight: float):
    """Weighted KL(teacher top-k ∩ draft vocab || draft) + CE on the sampled tokens; (loss, metrics).

    vmap_v: [V] index of each token in the draft logits' last axis, -1 outside. Metrics
    are over response positions: kl, ce, top1 (draft argmax == teacher argmax).
    """
    logq = jax.nn.log_softmax(logits_brv, axis=-1)
    dix = vmap_v[batch.topk_ids]  # [B, R, C]
    valid = dix >= 0
    has = valid.any(-1)
    # Teacher renormalized over its top-k ∩ draft vocabulary (all-invalid rows: dummy zeros, weight 0).
    log_p = jax.nn.log_softmax(jnp.where(valid, batch.topk_logp, jnp.where(has[..., None], -jnp.inf, 0.0)), -1)
    log_p = jnp.where(valid, log_p, 0.0)
    logq_k = jnp.take_along_axis(logq, jnp.maximum(dix, 0), axis=-1)
    kl = jnp.sum(jnp.where(valid, jnp.exp(log_p) * (log_p - logq_k), 0.0), -1)  # [B, R]

    nd = vmap_v[batch.next_tokens]
    ce = -jnp.take_along_axis(logq, jnp.maximum(nd, 0)[..., None], axis=-1)[..., 0]

    w_kl = batch.weights * has
    w_ce = batch.weights * (nd >= 0)
    loss = 0.0
    if kl_weight:
        loss += kl_weight * jnp.sum(w_kl * kl) / jnp.maximum(jnp.sum(w_kl), 1e-9)
    if ce_weight:
        loss += ce_weight * jnp.sum(w_ce * ce) / jnp.maximum(jnp.sum(w_ce), 1e-9)

    resp = batch.response.astype(jnp.float32)
    n_resp = jnp.maximum(jnp.sum(resp), 1.0)
    agree = agreement(logq, dix)
    metrics = {
        "kl": jnp.sum(resp * has * kl) / jnp.maximum(jnp.sum(resp * has), 1.0),
        "ce": jnp.sum(resp * (nd >= 0) * ce) / jnp.maximum(jnp.sum(resp * (nd >= 0)), 1.0),
        "top1": jnp.sum(resp * agree) / n_resp,
        "n": jnp.sum(resp),
    }
    return loss, metrics


def agreement(logits_brv: jax.Array, dix_brc: jax.Array) -> jax.Array:
    """[B, R] bool: the draft's argmax is the teacher's top-1 (draft-index space; -1 outside: a miss)."""
    return jnp.argmax(logits_brv, -1) == dix_brc[..., 0]


def frozen_head(lm_params: Params, exit_params: Params) -> jax.Array:
    """The head the exit drafts with: its own, or the LLM's (tied: the embedding)."""
    if "head" in exit_params:
        return exit_params["head"]
    return lm_params["lm_head"] if "lm_head" in lm_params else lm_params["embed"]


@functools.partial(jax.jit, static_argnames=("cfg", "n_round"))
def _eval_batch(cfg, lm_params, exit_params, vmap_v, batch, n_round):
    head = frozen_head(lm_params, exit_params)
    logits = exit_train_logits(
        cfg, head, exit_params, batch.hidden, batch.select, batch.context, batch.start, batch.fuse, n_round
    )
    _, m = distill_loss(logits, vmap_v, batch, 1.0, 1.0)
    return m, agreement(logits, vmap_v[batch.topk_ids])


def data_metrics(
    cfg: ModelConfig,
    lm_params: Params,
    exit_params: Params,
    data: Data,
    seq_len: int = 512,
    batch_size: int = 8,
    bucket: int = 64,
    n_select: int = 0,
    round_len: int = 0,
) -> dict:
    """KL / CE / top-1 agreement of an exit over every sequence of `data` (response positions).

    Each position is the first draft of a round (for a context exit: every earlier position
    verified), so top1 is the first draft's acceptance given a correct prefix. With
    round_len = J > 0 the responses are tiled into rounds of J instead, and
    top1_by_draft_position[j] is the top-1 agreement of draft token j + 1 given correct
    earlier drafts (an exit without a context layer computes the same thing at every j:
    its figures differ only by which positions fall at j).
    """
    vmap = jnp.asarray(vocab_map(cfg.vocab_size, np.asarray(exit_params["vocab"]) if "vocab" in exit_params else None))
    order = np.argsort(data.lengths, kind="stable")
    mesh = sharding.mesh_of(lm_params)  # The LLM on a mesh: rows over 'data'.
    sums, n = {"kl": 0.0, "ce": 0.0, "top1": 0.0}, 0.0
    by_pos = np.zeros((2, max(round_len, 1)))  # (agreements, positions) per draft position.
    n_select = max(n_select, round_up(max_train_positions(data), 16))
    for i in range(0, len(order), batch_size):
        b = make_batch(data, order[i : i + batch_size], seq_len, bucket, n_select=n_select, rounds=round_len or None)
        b_dev = sharding.shard_rows(b, mesh)
        m, agree = sharding.fetch(_eval_batch(cfg, lm_params, exit_params, vmap, b_dev, max(round_len, 1)))
        for key in sums:
            sums[key] += float(m[key]) * float(m["n"])
        n += float(m["n"])
        j = (b.select - np.take_along_axis(b.start, b.select, 1))[b.response]
        np.add.at(by_pos, (0, j), agree[b.response])
        np.add.at(by_pos, (1, j), 1)
    out = {key: round(v / max(n, 1.0), 6) for key, v in sums.items()} | {"positions": int(n)}
    if round_len:
        out["top1_by_draft_position"] = [round(float(a / max(c, 1)), 4) for a, c in by_pos.T]
    return out
