"""Draft trees: several candidate continuations per round, verified in one pass (EAGLE-2 style).

A round's tree, for a row whose newest accepted token x sits at position p, has a static
shape (EESDConfig.tree nodes, tree_width W per depth, depth R = tree // W at most; with
EESDConfig.tree_stop each round stops growing once a deeper depth is not expected to pay, with
EESDConfig.tree_width_stop it keeps only the first w <= W nodes of each depth, `choose_width`):
  * node 0, the root, is x; depth d = 1..R holds nodes 1 + (d-1)W .. dW;
  * depth d's nodes are the W children with the highest cumulative exit log-probability
    among the top-W children of each of depth d-1's nodes (a deterministic choice);
  * node j lives in cache slot p + j (scratch past the accepted length) at RoPE position
    p + depth(j), and sees the cache below p and its ancestors (itself included).
Drafting runs each depth as one batch through layers [0, N) and the exit (the tree's full depth R,
once grown, only writes the exit's keys/values: its children would never be verified); verification runs
the kept nodes through layers [N, L) at once from the stored layer-N states (`verify`). The
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
from eesd_jax.kv_cache import KVCache, set_slots

PRIOR = 4.0  # Pseudo-drafts of the calibration's prior (`calibration`): a few rounds' worth.
RANK_PRIOR = 1.0  # Pseudo-counts of each rank's Beta prior (`choose_width`): uniform, so new rows start wide.


@flax.struct.dataclass
class Tree:
    """One round's draft tree, per row (n1 = nodes + 1, the root included)."""

    tokens: jax.Array  # [B, n1] node tokens; the root's is x.
    parent: jax.Array  # [B, n1] parent node index (the root's: 0).
    ancestors: jax.Array  # [B, n1, n1] bool: node t's ancestors u (t itself included).
    hidden: jax.Array  # [B, n1, D] layer-N hidden state of every node.
    cache: KVCache  # LLM cache, layers [0, N) written at the node slots.
    exit_cache: KVCache  # The exit's cache, written at the node slots.
    # [B, n1, D] a fused exit's output state at every node (its children's stand-in for the LLM's
    # fused states, exits.ExitConfig.fuse_layers), else None.
    exit_out: jax.Array | None = None


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


def _run_nodes(cfg, params, lower, exit_params, t: Tree, idx_w, pos0_b, depth, width, fused_bwfd=None, children=True):
    """Nodes idx_w ([W'], one depth) through layers [0, N) and the exit: (t updated, each node's `width`
    likeliest children by the exit: log-probs and token ids [B, W', width]).

    fused_bwfd: a fused exit's features of each node's predecessor (exits.fused_input), else None.
    children: [] bool, False for the tree's full depth R: its nodes only write their keys/values
    (layers [0, N) and the exit's); the exit's attention, MLP and head are skipped (zero children).
    """
    anc_bwn = t.ancestors[:, idx_w]
    positions = jnp.broadcast_to((pos0_b + depth)[:, None], anc_bwn.shape[:2])
    slots = pos0_b[:, None] + idx_w[None]
    visible = _visible(anc_bwn, pos0_b, t.cache.max_len)
    x = model.embed(params, t.tokens[:, idx_w])
    h_bwd, cache = model.run_layers(cfg, lower, x, positions, t.cache, 0, slots, visible)
    exit_in = h_bwd if fused_bwfd is None else exits.fused_input(h_bwd, exit_params, fused_bwfd)
    # Both caches are written outside the cond: a cache written inside a branch is copied whole by XLA.
    q, exit_cache = exits.exit_write(cfg, exit_params, exit_in, positions, t.exit_cache, slots)

    def head(_):
        x_bwd = exits.exit_read(cfg, exit_params, exit_in, q, positions, exit_cache, visible)
        # top-k over the draft vocabulary, then its ids mapped to the LLM's (not over a scattered full vocabulary).
        logits = exits.draft_vocab_logits(params, exit_params, x_bwd)
        top_logp, top = jax.lax.top_k(jax.nn.log_softmax(logits, -1), width)
        return x_bwd, top_logp, exit_params["vocab"][top] if "vocab" in exit_params else top

    none = lambda _: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(head, None))  # noqa: E731
    x_bwd, top_logp, top = head(None) if children is True else jax.lax.cond(children, head, none, None)
    t = t.replace(hidden=t.hidden.at[:, idx_w].set(h_bwd), cache=cache, exit_cache=exit_cache)
    if t.exit_out is not None:
        t = t.replace(exit_out=t.exit_out.at[:, idx_w].set(x_bwd.astype(t.exit_out.dtype)))
    return t, top_logp, top


def _expand(top_logp: jax.Array, top_ids: jax.Array, cum_bf: jax.Array, frontier_bf: jax.Array, width: int):
    """The `width` best children of the F frontier nodes: (tokens, parents, cumulative log-probs), each [B, width].

    top_logp, top_ids: [B, F, K] each frontier node's K likeliest children (`_run_nodes`)."""
    B, F, K = top_logp.shape
    cum, pick = jax.lax.top_k((cum_bf[..., None] + top_logp).reshape(B, F * K), width)
    tokens = jnp.take_along_axis(top_ids.reshape(B, F * K), pick, 1).astype(jnp.int32)
    return tokens, jnp.take_along_axis(frontier_bf, pick // K, 1), cum


def draft(
    cfg,
    ecfg,
    params,
    lower,
    exit_params,
    last_b,
    pos0_b,
    cache: KVCache,
    exit_cache: KVCache,
    scale_b=None,
    fused=None,
    width=None,
):
    """Grow the round's tree depth by depth from the root last_b at positions pos0_b.

    fused: a fused exit's [B, F, D] features of the LLM's states before the root (verified); each
    deeper node reads its parent's exit output in their place, as a chain's later drafts do.

    width: [] the round's kept nodes per depth w <= W (`choose_width`; None: W). Every depth still
    drafts W nodes (static shapes), but only the first w are kept: verified, accepted, and
    expanded (the W nodes of depth d + 1 are the best children of depth d's first w).

    With ecfg.tree_stop > 0 depth d + 1 is grown only while some row's expected gain from it,
    scale_b [B] x the summed cumulative exit probability of its w kept nodes, is >= tree_stop
    (depth 1 always). Returns (tree, n_depth [] depths grown, predicted [B] the exit's expected
    accepted drafts: the kept nodes' cumulative probabilities summed, see `calibration`).
    """
    B, W, n = last_b.shape[0], ecfg.tree_width, ecfg.tree
    kept_w = jnp.arange(W) < (W if width is None else width)  # [W] the kept ranks of a depth.
    n1, R = n + 1, n // W
    t = Tree(
        tokens=jnp.zeros((B, n1), jnp.int32).at[:, 0].set(last_b),
        parent=jnp.zeros((B, n1), jnp.int32),
        ancestors=jnp.zeros((B, n1, n1), bool).at[:, 0, 0].set(True),
        hidden=jnp.zeros((B, n1, cfg.d_model), cfg.jnp_dtype),
        cache=cache,
        exit_cache=exit_cache,
        exit_out=None if fused is None else jnp.zeros((B, n1, cfg.d_model), fused.dtype),
    )
    root = jnp.zeros((1,), jnp.int32)
    root_fused = None if fused is None else fused[:, None]
    t, top_logp, top_ids = _run_nodes(cfg, params, lower, exit_params, t, root, pos0_b, 0, W, root_fused)
    nxt = _expand(top_logp, top_ids, jnp.zeros((B, 1)), jnp.zeros((B, 1), jnp.int32), W)

    def grow(carry):
        d, t, (tokens, parent, cum), predicted, _ = carry
        idx_w = 1 + (d - 1) * W + jnp.arange(W)
        own = jax.nn.one_hot(idx_w, n1, dtype=bool)[None]
        anc = jnp.take_along_axis(t.ancestors, parent[..., None], 1) | own
        t = t.replace(
            tokens=t.tokens.at[:, idx_w].set(tokens),
            parent=t.parent.at[:, idx_w].set(parent),
            ancestors=t.ancestors.at[:, idx_w].set(anc),
        )
        from_parent = None
        if fused is not None:  # No verified predecessor: the parent's exit output stands in for each state.
            from_parent = jnp.broadcast_to(
                jnp.take_along_axis(t.exit_out, parent[..., None], 1)[:, :, None], (B, W, *fused.shape[1:])
            )
        # The deepest nodes get no children, but their exit cache slots are needed (a fully accepted
        # path is the next round's context).
        t, top_logp, top_ids = _run_nodes(cfg, params, lower, exit_params, t, idx_w, pos0_b, d, W, from_parent, d < R)
        # Dropped nodes have no children: depth d + 1's W best come from the w kept ones (w x W candidates).
        nxt = _expand(top_logp, top_ids, jnp.where(kept_w, cum, -jnp.inf), jnp.broadcast_to(idx_w, (B, W)), W)
        # Depth d + 1's nodes lie on disjoint paths: P(one of its kept nodes is accepted).
        gain_b = jnp.sum(jnp.where(kept_w, jnp.exp(nxt[2]), 0.0), -1)
        go = (d < R) & (not ecfg.tree_stop or (scale_b * gain_b >= ecfg.tree_stop).any())
        return d + 1, t, nxt, predicted + jnp.sum(jnp.where(kept_w, jnp.exp(cum), 0.0), -1), go

    carry = (jnp.int32(1), t, nxt, jnp.zeros((B,), jnp.float32), jnp.bool_(True))
    d, t, _, predicted, _ = jax.lax.while_loop(lambda c: c[-1], grow, carry)
    return t, d - 1, predicted


def calibration(accepted_b: jax.Array, predicted_b: jax.Array) -> jax.Array:
    """[B] the posterior mean of how far the exit's predicted accepted drafts over- or undershoot.

    With accepted ~ Poisson(s x predicted) and a Gamma(PRIOR, PRIOR) prior on s (mean 1):
    s = (PRIOR + accepted) / (PRIOR + predicted), the running totals of EESDState.tree_calib.
    """
    return (PRIOR + accepted_b) / (PRIOR + predicted_b)


def width_gains(ranks_bw2: jax.Array, n_depth: int) -> jax.Array:
    """[B, W - 1] the expected accepted drafts that keeping rank w + 1 adds to a tree of n_depth depths
    (w = 1 .. W - 1), from the per-rank counts of EESDState.tree_ranks.

    q_r = P(the accepted child has rank r | the walk reached the depth, ranks < r did not match),
    the posterior mean of Beta(RANK_PRIOR + accepted_r, RANK_PRIOR + passed_r). A depth is passed
    with w ranks kept with A(w) = 1 - prod_{r < w} (1 - q_r), so a tree of n_depth depths accepts
    E(w) = sum_{d=1..n_depth} A(w)^d drafts: rank w + 1's gain is E(w + 1) - E(w).
    """
    q_bw = (RANK_PRIOR + ranks_bw2[..., 0]) / (2 * RANK_PRIOR + ranks_bw2.sum(-1))
    a_bw = 1 - jnp.cumprod(1 - q_bw, -1)
    e_bw = jnp.sum(a_bw[..., None] ** jnp.arange(1, n_depth + 1), -1)
    return jnp.diff(e_bw, axis=-1)


def choose_width(ranks_bw2: jax.Array, n_depth: int, stop: float, live_b: jax.Array) -> jax.Array:
    """[] the round's kept nodes per depth: per row 1 + the leading ranks w + 1 whose gain
    (`width_gains`) reaches `stop` (AR steps, costs.width_cost), the widest live row's (one
    verification for the batch)."""
    w_b = 1 + jnp.sum(jnp.cumprod(width_gains(ranks_bw2, n_depth) >= stop, -1), -1)
    return jnp.max(jnp.where(live_b, w_b, 1)).astype(jnp.int32)


def rank_counts(path_bk: jax.Array, n_acc_b, n_depth, w, width: int, live_b) -> jax.Array:
    """[B, W, 2] one round's (accepted, passed) counts per rank for EESDState.tree_ranks: at every
    depth a live row's walk reached, its accepted child's rank counts accepted and the kept ranks
    before it passed (all w kept ranks where none matched)."""
    d_r = jnp.arange(1, path_bk.shape[1])
    reached = live_b[:, None] & (d_r[None] <= n_depth) & (n_acc_b[:, None] >= d_r[None] - 1)
    acc = n_acc_b[:, None] >= d_r[None]
    rank_br = (path_bk[:, 1:] - 1) % width
    r = jnp.arange(width)
    hit = reached[..., None] & acc[..., None] & (rank_br[..., None] == r)
    passed = reached[..., None] & (r < jnp.where(acc, rank_br, w)[..., None])
    return jnp.stack([hit.sum(1), passed.sum(1)], -1).astype(jnp.float32)


def kept_nodes(width: int, n_depth, w, size: int) -> jax.Array:
    """[size] the node index of each verified row: the root, then depth by depth the first w of
    each depth's `width` nodes, for the n_depth depths grown; past those: -1 (no node)."""
    j = jnp.arange(size)
    node = jnp.where(j == 0, 0, 1 + (j - 1) // w * width + (j - 1) % w)
    return jnp.where(j < 1 + n_depth * w, node, -1)


def verify(cfg, ecfg, params, segments, t: Tree, pos0_b, n_depth, w=None):
    """Layers [N, L) over the kept nodes (the first w = ecfg.tree_width or `w` of each of the n_depth
    depths grown) in one pass: ([B, n1, V] logits, cache, the [B, n1, D] states after each of
    ecfg.state_layers but N), zero at the nodes not kept with an adaptive width (with a fixed one:
    unspecified past the depths grown, which nothing reads).

    The kept nodes are gathered to the front (`kept_nodes`) and the pass runs over the smallest
    of ecfg.tree_sizes holding them (lax.switch; the branches only read the cache, whose
    keys/values are written after it, at the kept nodes' slots, as chain.verify's).
    """
    n1, sizes, W = ecfg.tree + 1, ecfg.tree_sizes, ecfg.tree_width
    w = W if w is None else w
    depth_n = jnp.asarray(depths(ecfg.tree, W))

    def branch(size):
        def run(hidden, ancestors, cache):
            node = kept_nodes(W, n_depth, w, size)
            at = jnp.maximum(node, 0)  # Rows past the kept nodes compute junk from the root's inputs.
            positions = jnp.broadcast_to(pos0_b[:, None] + depth_n[at][None], (pos0_b.shape[0], size))
            mask = (ancestors[:, at][:, :, at] & (node >= 0)[None, None]) | jnp.eye(size, dtype=bool)[None]
            x, first, ks, vs, cuts = hidden[:, at], ecfg.exit_layer, [], [], []
            for layers in segments[1:]:
                x, k, v = model.run_layers_readonly(cfg, layers, x, positions, cache, first, mask)
                first, ks, vs, cuts = first + model.num_layers(layers), ks + [k], vs + [v], cuts + [x]
            logits = model.lm_head(params, model.final_norm(params, cfg, x))
            pad = lambda a, axis: jnp.pad(a, [(0, n1 - size if i == axis else 0) for i in range(a.ndim)])  # noqa: E731
            node = jnp.pad(node, (0, n1 - size), constant_values=-1)
            return (
                node,
                pad(logits, 1),
                pad(jnp.concatenate(ks), 2),
                pad(jnp.concatenate(vs), 2),
                [pad(c, 1) for c in cuts],
            )

        return run

    which = jnp.sum(jnp.asarray(sizes) < 1 + n_depth * w)
    branches = [branch(n) for n in sizes]
    # One size (a fixed tree): a switch over one branch is inlined, and XLA then copied the whole
    # cache twice a round around the keys/values' write; as a conditional it writes in place.
    branches = branches * 2 if len(branches) == 1 else branches
    node, logits, k, v, states = jax.lax.switch(which, branches, t.hidden, t.ancestors, t.cache)
    to_node = jnp.where(node >= 0, node, n1)  # Out of range: dropped by the scatters.
    unpack = lambda a: jnp.zeros_like(a).at[:, to_node].set(a, mode="drop")  # noqa: E731  [B, n1, ...] by node.
    if not ecfg.tree_width_stop and isinstance(w, int) and w == W:  # Whole depths: rows are nodes already.
        unpack = lambda a: a  # noqa: E731
    slots = pos0_b[:, None] + to_node[None]  # Nodes not kept: stale slots, past every length.
    cache = model.write_layers(t.cache, ecfg.exit_layer, k, v, jnp.where(node >= 0, slots, t.cache.max_len))
    return unpack(logits), cache, tuple(unpack(c) for c in states)


def _children(t: Tree, d: int, W: int):
    """Depth d's node indices [W] and their tokens and parents [B, W]."""
    idx = 1 + (d - 1) * W + np.arange(W)
    return idx, t.tokens[:, idx], t.parent[:, idx]


def accept_greedy(t: Tree, logits_bnv: jax.Array, width: int, n_depth, w=None):
    """Walk from the root through the n_depth depths grown, taking the kept child (the first w of a
    depth's `width`; None: all) equal to the LLM's argmax.

    Returns (n_accepted [B], next token [B], path [B, R + 1] of node indices: the root, the
    accepted nodes, then the last one repeated).
    """
    target = sampling.argmax(logits_bnv)
    B, R = target.shape[0], (target.shape[1] - 1) // width
    kept = jnp.arange(width)[None] < (width if w is None else w)
    cur, n_acc, path = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32), [jnp.zeros((B,), jnp.int32)]
    for d in range(1, R + 1):
        idx, tokens, parent = _children(t, d, width)
        want = jnp.take_along_axis(target, cur[:, None], 1)
        match = kept & (parent == cur[:, None]) & (tokens == want) & ((n_acc == d - 1) & (d <= n_depth))[:, None]
        hit = match.any(-1)
        cur = jnp.where(hit, jnp.asarray(idx)[jnp.argmax(match, -1)], cur)
        n_acc, path = n_acc + hit, path + [cur]
    return n_acc, jnp.take_along_axis(target, cur[:, None], 1)[:, 0], jnp.stack(path, 1)


def reject(r_bv: jax.Array, c_b: jax.Array) -> jax.Array:
    """The residual after rejecting token c: r with r(c) = 0, renormalized (r itself if nothing is left)."""
    left = jnp.where(jnp.arange(r_bv.shape[-1])[None] == c_b[:, None], 0.0, r_bv)
    total = jnp.sum(left, -1, keepdims=True)
    return jnp.where(total > 0, left / jnp.where(total > 0, total, 1.0), r_bv)


def accept_sampled(key, t: Tree, logits_bnv: jax.Array, width: int, n_depth, cfg: sampling.SamplingConfig, w=None):
    """Walk from the root through the n_depth depths grown, trying each node's kept children (the
    first w of a depth's `width`; None: all) in order as point masses.

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
        going = (n_acc == d - 1) & (d <= n_depth)
        r, nxt, took = p_bnv[rows, cur], cur, jnp.zeros((B,), bool)
        for i in range(width):
            c = tokens[:, i]
            child = going & (parent[:, i] == cur) & ~took & (w is None or i < w)
            u = jax.random.uniform(keys[(d - 1) * width + i], (B,))
            take = child & (u < jnp.take_along_axis(r, c[:, None], 1)[:, 0])
            nxt, took = jnp.where(take, idx[i], nxt), took | take
            r = jnp.where((child & ~take)[:, None], reject(r, c), r)
        final = jnp.where((going & ~took)[:, None], r, final)
        cur, n_acc, path = nxt, n_acc + took, path + [nxt]
    final = jnp.where((n_acc == n_depth)[:, None], p_bnv[rows, cur], final)
    nxt = jax.random.categorical(keys[-1], jnp.log(final), -1).astype(jnp.int32)
    return n_acc, nxt, jnp.stack(path, 1)


def compact(cache: KVCache, pos0_b: jax.Array, path_bk: jax.Array) -> KVCache:
    """Move the path's keys/values from slots p + path[i] to p + i (one gather-scatter of R + 1 slots per row)."""
    rows = jnp.arange(path_bk.shape[0])[:, None]
    src, dst = pos0_b[:, None] + path_bk, pos0_b[:, None] + jnp.arange(path_bk.shape[1])[None]
    move = lambda a: set_slots(a, (slice(None), rows, slice(None), dst), a[:, rows, :, src])  # noqa: E731
    return cache.replace(k=move(cache.k), v=move(cache.v))
