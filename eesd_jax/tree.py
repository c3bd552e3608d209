"""Draft trees: several candidate continuations per round, verified in one pass (EAGLE-2 style).

A round's tree, for a row whose newest accepted token x sits at position p, has a static
shape (EESDConfig.tree nodes, tree_width W per depth, depth R = tree // W):
  * node 0, the root, is x; depth d = 1..R holds nodes 1 + (d-1)W .. dW;
  * depth d's nodes are the W children with the highest cumulative exit log-probability
    among the top-W children of each of depth d-1's nodes (a deterministic choice);
  * node j lives in cache slot p + j (scratch past the accepted length) at RoPE position
    p + depth(j), and sees the cache below p and its ancestors (itself included).
Drafting runs each depth as one batch through layers [0, N) and the exit; verification runs
every node through layers [N, L) at once from the stored layer-N states (`verify`). The
accepted path is walked from the root (`accept_greedy`, `accept_sampled`), then its keys and
values move to the contiguous slots p, p+1, ... (`compact`: one gather-scatter of R + 1
slots per row), after which the caches look as if the path had been drafted as a chain.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import exits, model, sampling
from eesd_jax.kv_cache import KVCache


@flax.struct.dataclass
class Tree:
    """One round's draft tree, per row (n1 = nodes + 1, the root included)."""

    tokens: jax.Array  # [B, n1] node tokens; the root's is x.
    parent: jax.Array  # [B, n1] parent node index (the root's: 0).
    ancestors: jax.Array  # [B, n1, n1] bool: node t's ancestors u (t itself included).
    hidden: jax.Array  # [B, n1, D] layer-N hidden state of every node.
    cache: KVCache  # LLM cache, layers [0, N) written at the node slots.
    exit_cache: KVCache  # The exit's cache, written at the node slots.


def depths(n_nodes: int, width: int) -> np.ndarray:
    """[n_nodes + 1] depth of each node: 0 for the root, then `width` nodes per depth."""
    return np.concatenate([[0], 1 + np.arange(n_nodes) // width])


def _visible(ancestors_btn: jax.Array, pos0_b: jax.Array, n_slots: int) -> jax.Array:
    """[B, T, S] slots the T nodes see: the cache below p and their ancestors' slots p + u."""
    n1 = ancestors_btn.shape[-1]
    rel_b1s = jnp.arange(n_slots)[None, None, :] - pos0_b[:, None, None]
    rel_bts = jnp.broadcast_to(jnp.clip(rel_b1s, 0, n1 - 1), (*ancestors_btn.shape[:2], n_slots))
    in_tree = jnp.take_along_axis(ancestors_btn, rel_bts, axis=2) & (rel_b1s < n1)
    return (rel_b1s < 0) | in_tree


def _run_nodes(cfg, params, lower, exit_params, t: Tree, idx_w, pos0_b, depth, width):
    """Nodes idx_w ([W'], one depth) through layers [0, N) and the exit: (t updated, each node's `width`
    likeliest children by the exit: log-probs and token ids [B, W', width])."""
    anc_bwn = t.ancestors[:, idx_w]
    positions = jnp.broadcast_to((pos0_b + depth)[:, None], anc_bwn.shape[:2])
    slots = pos0_b[:, None] + idx_w[None]
    visible = _visible(anc_bwn, pos0_b, t.cache.max_len)
    x = model.embed(params, t.tokens[:, idx_w])
    h_bwd, cache = model.run_layers(cfg, lower, x, positions, t.cache, 0, slots, visible)
    x_bwd, exit_cache = exits.exit_hidden(cfg, exit_params, h_bwd, positions, t.exit_cache, slots, visible)
    # top-k over the draft vocabulary, then its ids mapped to the LLM's (not over a scattered full vocabulary).
    top_logp, top = jax.lax.top_k(jax.nn.log_softmax(exits.draft_vocab_logits(params, exit_params, x_bwd), -1), width)
    top = exit_params["vocab"][top] if "vocab" in exit_params else top
    t = t.replace(hidden=t.hidden.at[:, idx_w].set(h_bwd), cache=cache, exit_cache=exit_cache)
    return t, top_logp, top


def _expand(top_logp: jax.Array, top_ids: jax.Array, cum_bw: jax.Array, frontier_bw: jax.Array):
    """The W best children of the frontier nodes: (tokens, parents, cumulative log-probs), each [B, W].

    top_logp, top_ids: [B, W, W] each frontier node's W likeliest children (`_run_nodes`)."""
    B, W, _ = top_logp.shape
    cum, pick = jax.lax.top_k((cum_bw[..., None] + top_logp).reshape(B, W * W), W)
    tokens = jnp.take_along_axis(top_ids.reshape(B, W * W), pick, 1).astype(jnp.int32)
    return tokens, jnp.take_along_axis(frontier_bw, pick // W, 1), cum


def draft(cfg, ecfg, params, lower, exit_params, last_b, pos0_b, cache: KVCache, exit_cache: KVCache) -> Tree:
    """Grow the round's tree depth by depth from the root last_b at positions pos0_b."""
    B, W, n = last_b.shape[0], ecfg.tree_width, ecfg.tree
    n1 = n + 1
    t = Tree(
        tokens=jnp.zeros((B, n1), jnp.int32).at[:, 0].set(last_b),
        parent=jnp.zeros((B, n1), jnp.int32),
        ancestors=jnp.zeros((B, n1, n1), bool).at[:, 0, 0].set(True),
        hidden=jnp.zeros((B, n1, cfg.d_model), cfg.jnp_dtype),
        cache=cache,
        exit_cache=exit_cache,
    )
    t, top_logp, top_ids = _run_nodes(cfg, params, lower, exit_params, t, jnp.zeros((1,), jnp.int32), pos0_b, 0, W)
    # The root as a frontier of W: its copies past the first have -inf cumulative log-prob.
    cum = jnp.where(jnp.arange(W)[None] == 0, 0.0, -jnp.inf) * jnp.ones((B, 1))
    carry = (t, *(jnp.broadcast_to(a, (B, W, W)) for a in (top_logp, top_ids)), cum, jnp.zeros((B, W), jnp.int32))

    def depth_step(d, carry):
        t, top_logp, top_ids, cum, frontier = carry
        tokens, parent, cum = _expand(top_logp, top_ids, cum, frontier)
        idx_w = 1 + (d - 1) * W + jnp.arange(W)
        own = jax.nn.one_hot(idx_w, n1, dtype=bool)[None]
        anc = jnp.take_along_axis(t.ancestors, parent[..., None], 1) | own
        t = t.replace(
            tokens=t.tokens.at[:, idx_w].set(tokens),
            parent=t.parent.at[:, idx_w].set(parent),
            ancestors=t.ancestors.at[:, idx_w].set(anc),
        )
        # The deepest nodes' exit output is unused but their exit cache slots are needed (a fully
        # accepted path is the next round's context).
        t, top_logp, top_ids = _run_nodes(cfg, params, lower, exit_params, t, idx_w, pos0_b, d, W)
        return t, top_logp, top_ids, cum, jnp.broadcast_to(idx_w, (B, W))

    return jax.lax.fori_loop(1, n // W + 1, depth_step, carry)[0]


def verify(cfg, ecfg, params, segments, t: Tree, pos0_b):
    """Layers [N, L) over every node in one pass: ([B, n1, V] logits, cache, [B, n1, D] context-layer states or None).

    The nodes' keys/values are written at their slots after the pass (model.block_readonly).
    """
    n1 = ecfg.tree + 1
    positions = pos0_b[:, None] + jnp.asarray(depths(ecfg.tree, ecfg.tree_width))[None]
    x, first, ks, vs, cuts = t.hidden, ecfg.exit_layer, [], [], []
    for layers in segments[1:]:
        x, k, v = model.run_layers_readonly(cfg, layers, x, positions, t.cache, first, t.ancestors)
        first, ks, vs, cuts = first + model.num_layers(layers), ks + [k], vs + [v], cuts + [x]
    logits = model.lm_head(params, model.final_norm(params, cfg, x))
    slots = pos0_b[:, None] + jnp.arange(n1)[None]
    cache = model.write_layers(t.cache, ecfg.exit_layer, jnp.concatenate(ks), jnp.concatenate(vs), slots)
    return logits, cache, (cuts[0] if len(cuts) > 1 else None)


def _children(t: Tree, d: int, W: int):
    """Depth d's node indices [W] and their tokens and parents [B, W]."""
    idx = 1 + (d - 1) * W + np.arange(W)
    return idx, t.tokens[:, idx], t.parent[:, idx]


def accept_greedy(t: Tree, logits_bnv: jax.Array, width: int):
    """Walk from the root taking the child equal to the LLM's argmax.

    Returns (n_accepted [B], next token [B], path [B, R + 1] of node indices: the root, the
    accepted nodes, then the last one repeated).
    """
    target = jnp.argmax(logits_bnv, -1).astype(jnp.int32)
    B, R = target.shape[0], (target.shape[1] - 1) // width
    cur, n_acc, path = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32), [jnp.zeros((B,), jnp.int32)]
    for d in range(1, R + 1):
        idx, tokens, parent = _children(t, d, width)
        want = jnp.take_along_axis(target, cur[:, None], 1)
        match = (parent == cur[:, None]) & (tokens == want) & (n_acc == d - 1)[:, None]
        hit = match.any(-1)
        cur = jnp.where(hit, jnp.asarray(idx)[jnp.argmax(match, -1)], cur)
        n_acc, path = n_acc + hit, path + [cur]
    return n_acc, jnp.take_along_axis(target, cur[:, None], 1)[:, 0], jnp.stack(path, 1)


def reject(r_bv: jax.Array, c_b: jax.Array) -> jax.Array:
    """The residual after rejecting token c: r with r(c) = 0, renormalized (r itself if nothing is left)."""
    left = jnp.where(jnp.arange(r_bv.shape[-1])[None] == c_b[:, None], 0.0, r_bv)
    total = jnp.sum(left, -1, keepdims=True)
    return jnp.where(total > 0, left / jnp.where(total > 0, total, 1.0), r_bv)


def accept_sampled(key, t: Tree, logits_bnv: jax.Array, width: int, cfg: sampling.SamplingConfig):
    """Walk from the root, trying each node's children in order as point masses.

    At a node with the LLM's warped distribution p, child c is accepted with probability r(c),
    r = p at first; on rejection r <- `reject`(r, c) and the next child is tried; if none is
    accepted the next token is drawn from r (after a fully accepted path: from p at its end).
    Rejection sampling against point masses, so exact for any deterministic choice of children.
    Returns accept_greedy's (n_accepted, next token, path).
    """
    p_bnv = jnp.exp(sampling.warp(logits_bnv, cfg))
    B, R = p_bnv.shape[0], (p_bnv.shape[1] - 1) // width
    keys = jax.random.split(key, R * width + 1)
    rows = jnp.arange(B)
    cur, n_acc, path = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32), [jnp.zeros((B,), jnp.int32)]
    final = p_bnv[:, 0]
    for d in range(1, R + 1):
        idx, tokens, parent = _children(t, d, width)
        going = n_acc == d - 1
        r, nxt, took = p_bnv[rows, cur], cur, jnp.zeros((B,), bool)
        for i in range(width):
            c = tokens[:, i]
            child = going & (parent[:, i] == cur) & ~took
            u = jax.random.uniform(keys[(d - 1) * width + i], (B,))
            take = child & (u < jnp.take_along_axis(r, c[:, None], 1)[:, 0])
            nxt, took = jnp.where(take, idx[i], nxt), took | take
            r = jnp.where((child & ~take)[:, None], reject(r, c), r)
        final = jnp.where((going & ~took)[:, None], r, final)
        cur, n_acc, path = nxt, n_acc + took, path + [nxt]
    final = jnp.where((n_acc == R)[:, None], p_bnv[rows, cur], final)
    nxt = jax.random.categorical(keys[-1], jnp.log(final), -1).astype(jnp.int32)
    return n_acc, nxt, jnp.stack(path, 1)


def compact(cache: KVCache, pos0_b: jax.Array, path_bk: jax.Array) -> KVCache:
    """Move the path's keys/values from slots p + path[i] to p + i (one gather-scatter of R + 1 slots per row)."""
    rows = jnp.arange(path_bk.shape[0])[:, None]
    src, dst = pos0_b[:, None] + path_bk, pos0_b[:, None] + jnp.arange(path_bk.shape[1])[None]
    move = lambda a: a.at[:, rows, :, dst].set(a[:, rows, :, src], mode="drop")  # noqa: E731
    return cache.replace(k=move(cache.k), v=move(cache.v))
