"""A round's draft chain: steps 1 and 2 of the EESD loop (eesd.py) for a chain (a tree: tree.py).

`draft` runs block tokens 0, 1, ... through layers [0, N) and the exit, one at a time, until
the controller stops every row or J tokens are drafted; `verify` runs layers [N, L) over the
block from the stored layer-N states, padded to the smallest bucket that holds the longest
row's block. Acceptance and the cache updates are the loop's (eesd.py), shared with trees.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from eesd_jax import control, exits, model, sampling
from eesd_jax.kv_cache import KVCache

# What Draft.features and eesd.RoundTrace.features hold per draft token, in order (control.DraftFeatures' fields).
TRACED = ("prob", "entropy", "margin", "cosine")


@flax.struct.dataclass
class Draft:
    """The draft block of one round (inner-loop carry)."""

    i: jax.Array  # [] block index being processed.
    token: jax.Array  # [B] block token i.
    hidden: jax.Array  # [B, J+1, D] layer-N hidden state of block tokens 0..J.
    tokens: jax.Array  # [B, J] draft tokens d_1..d_K (valid below n_draft).
    logp: jax.Array  # [B, J, V] warped draft log-probs when sampling, else [B, J, 1] unused.
    confidence: jax.Array  # [B, J] q(d_i), for the controller update.
    features: jax.Array | None  # [B, J, len(TRACED)] with EESDConfig.trace, else None.
    fused: jax.Array | None  # [B, F, D] a fused exit's features for block token i, else None.
    n_draft: jax.Array  # [B] tokens kept so far.
    drafting: jax.Array  # [B] bool: the row kept its last draft and goes on.
    cache: KVCache
    exit_cache: KVCache
    key: jax.Array


def draft(cfg, ecfg, sampling_cfg, params, lower, exit_params, s) -> Draft:
    """Step 1: draft up to J tokens, running block tokens 0..k through layers [0, N).

    s: the loop's eesd.EESDState at the round's start (block token 0 is s.last).
    """
    B, J, V = s.last.shape[0], ecfg.max_draft, cfg.vocab_size
    pos0 = s.cache.lengths
    remaining = s.max_new - s.n_new  # The round yields n_draft + 1 tokens at most.

    def exit_step(d: Draft, x_b1d):
        logits = exits.draft_logits(cfg, params, exit_params, x_b1d)[:, 0]
        key, k_tok, k_ctrl = jax.random.split(d.key, 3)
        if sampling_cfg.greedy:
            logp = jax.nn.log_softmax(logits)
            tok = sampling.argmax(logits)
        else:
            logp = sampling.warp(logits, sampling_cfg)
            tok = jax.random.categorical(k_tok, logp).astype(jnp.int32)
        probs = jnp.exp(logp)
        entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), -1)
        top1 = jnp.max(logp, -1)  # A reduction; the top-2 sort below is dropped by XLA unless `margin` is read.
        # x is the exit's normed output: divide the norm's scale back out for the direction of the
        # block's output. O(D); XLA drops it when the policy does not read it.
        h, x = d.hidden[:, d.i].astype(jnp.float32), x_b1d[:, 0] / exit_params["norm"].astype(jnp.float32)
        cosine = jnp.sum(h * x, -1) * jax.lax.rsqrt(jnp.sum(h * h, -1) * jnp.sum(x * x, -1) + 1e-12)
        feats = control.DraftFeatures(
            # q_i's top probability, not the sampled token's own q(d): keeping d on q(d) selects
            # on the sample and biases the output (equal under greedy, where d is the argmax).
            prob=jnp.exp(top1),
            entropy=entropy,
            margin=jnp.exp(top1) - jnp.exp(jax.lax.top_k(logp, 2)[0][:, 1]),
            cosine=cosine,
            step=d.i,
            round_probs=d.confidence,
        )
        keep = d.drafting & (d.i < remaining - 1) & control.decide(ecfg.controller, s.ctrl, feats, k_ctrl)
        return d.replace(
            token=tok,
            tokens=d.tokens.at[:, d.i].set(tok),
            logp=d.logp if sampling_cfg.greedy else d.logp.at[:, d.i].set(logp),
            confidence=d.confidence.at[:, d.i].set(feats.prob),
            features=None
            if d.features is None
            else d.features.at[:, d.i].set(jnp.stack([getattr(feats, f) for f in TRACED], -1)),
            n_draft=d.n_draft + keep,
            drafting=keep,
            key=key,
        )

    def stop(d: Draft, x_b1d):
        return d.replace(drafting=jnp.zeros_like(d.drafting))

    def body(d: Draft) -> Draft:
        positions = (pos0 + d.i)[:, None]
        h_b1d, cache = model.run_layers(cfg, lower, model.embed(params, d.token[:, None]), positions, d.cache)
        # The exit's cache slot is written for every block token, J included (the next
        # round attends to it if every draft is accepted), and outside the cond: a cache
        # written inside a branch is copied whole by XLA.
        exit_in = h_b1d if d.fused is None else exits.fused_input(h_b1d, exit_params, d.fused[:, None])
        x_b1d, exit_cache = exits.exit_hidden(cfg, exit_params, exit_in, positions, d.exit_cache)
        d = d.replace(hidden=d.hidden.at[:, d.i].set(h_b1d[:, 0]), cache=cache, exit_cache=exit_cache)
        if d.fused is not None:  # The next block token has no verified predecessor: the exit's output stands in.
            d = d.replace(fused=jnp.broadcast_to(x_b1d.astype(d.fused.dtype), d.fused.shape))
        # Block token J can only be verified, never extended: no draft head there.
        d = jax.lax.cond(d.i < J, exit_step, stop, d, x_b1d)
        return d.replace(i=d.i + 1)

    def cond(d: Draft):
        return d.drafting.any()

    init = Draft(
        i=jnp.int32(0),
        token=s.last,
        hidden=jnp.zeros((B, J + 1, cfg.d_model), cfg.jnp_dtype),
        tokens=jnp.zeros((B, J), jnp.int32),
        logp=jnp.zeros((B, J, 1 if sampling_cfg.greedy else V), jnp.float32),
        confidence=jnp.zeros((B, J), jnp.float32),
        features=jnp.zeros((B, J, len(TRACED)), jnp.float32) if ecfg.trace else None,
        fused=None if s.fuse_prev is None else exits.fuse_features(cfg, exit_params, s.fuse_prev),
        n_draft=jnp.zeros((B,), jnp.int32),
        drafting=~s.done,
        cache=s.cache,
        exit_cache=s.exit_cache,
        key=s.key,
    )
    return jax.lax.while_loop(cond, body, init)


def verify(cfg, ecfg, params, segments, d: Draft, last_b, pos0_b):
    """Step 2: layers [N, L) over the block, padded to a bucket size.

    segments: split_params' segments; last_b: block token 0. Returns ([B, J+1, V] logits,
    cache, the [B, J+1, D] block states after each of ecfg.state_layers but N).
    The branches only read the cache and return the block's keys/values, written
    after the switch: a cache written inside a lax.switch branch is copied whole
    by XLA (four full-cache copies per round were measured).
    """
    J, N = ecfg.max_draft, ecfg.exit_layer
    lower, uppers = segments[0], segments[1:]
    positions_bt = pos0_b[:, None] + jnp.arange(J + 1)[None]
    block_bt = jnp.concatenate([last_b[:, None], d.tokens], 1)

    def branch(size):
        def run(hidden, cache):
            x, first, ks, vs, cuts = hidden[:, :size], N, [], [], []
            if ecfg.recompute_lower:  # Rewrites layers [0, N) of the block with the same keys/values.
                x, k_nbtke, v_nbtke = model.run_layers_readonly(
                    cfg, lower, model.embed(params, block_bt[:, :size]), positions_bt[:, :size], cache
                )
                ks, vs = [k_nbtke], [v_nbtke]
            for layers in uppers:
                x, k_nbtke, v_nbtke = model.run_layers_readonly(cfg, layers, x, positions_bt[:, :size], cache, first)
                first, ks, vs, cuts = first + model.num_layers(layers), ks + [k_nbtke], vs + [v_nbtke], cuts + [x]
            logits = model.lm_head(params, model.final_norm(params, cfg, x))
            pad = ((0, 0), (0, 0), (0, J + 1 - size), (0, 0), (0, 0))
            k_nbtke, v_nbtke = (jnp.pad(jnp.concatenate(a), pad) for a in (ks, vs))
            context = [jnp.pad(c, ((0, 0), (0, J + 1 - size), (0, 0))) for c in cuts]
            return jnp.pad(logits, ((0, 0), (0, J + 1 - size), (0, 0))), k_nbtke, v_nbtke, context

        return run

    needed = jnp.max(d.n_draft) + 1
    which = jnp.sum(jnp.asarray(ecfg.block_sizes) < needed)
    logits, k_nbtke, v_nbtke, context = jax.lax.switch(which, [branch(n) for n in ecfg.block_sizes], d.hidden, d.cache)
    # Padding slots land past every row's accepted length: stale, overwritten before being seen.
    cache = model.write_layers(d.cache, 0 if ecfg.recompute_lower else N, k_nbtke, v_nbtke, positions_bt)
    return logits, cache, context
