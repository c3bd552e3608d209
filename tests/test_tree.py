"""Draft trees are lossless: greedy output equals AR, sampling has AR's distribution, and the
caches after decoding equal AR's at every accepted position."""

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fast_first

from eesd_jax import cli, cli_args, control, decoding, eesd, engine, exits, generate, model, tree
from eesd_jax.sampling import SamplingConfig
from tests import test_eesd_sampling as sampling_tests
from tests.test_eesd import CFG, EOS, make_prompts, perturbed_exit

FIXED = control.ControllerConfig("fixed")


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0), scale=0.3)


@pytest.fixture(scope="module")
def ar_outputs(params):
    return {b: generate.generate_ar(CFG, params, make_prompts(b), 24, eos_ids=(EOS,)).tokens for b in (1, 3)}


def tree_run(
    params, batch, exit_layer, n_nodes, width, exit_params=None, context_layer=0, max_new=24, stop=0.0, wstop=0.0
):
    ecfg = eesd.EESDConfig(
        exit_layer,
        4,
        FIXED,
        context_layer=context_layer,
        tree=n_nodes,
        tree_width=width,
        tree_stop=stop,
        tree_width_stop=wstop,
    )
    if exit_params is None:
        exit_params = perturbed_exit(params, exits.ExitConfig(exit_layer, own_head=True, context_layer=context_layer))
    return generate.generate_eesd(CFG, params, exit_params, ecfg, make_prompts(batch), max_new, eos_ids=(EOS,))


# (batch, N, node budget, width, tree_stop, tree_width_stop): chains (width 1), wide-shallow and
# narrow-deep trees, every N; trees whose depth is chosen per round (tree_stop > 0; 0.05 varies it
# here: see below), whose width is (tree_width_stop > 0; 0.3 varies it: see below), or both.
GRID = [
    (3, 1, 4, 1, 0.0, 0.0),
    (3, 2, 16, 4, 0.05, 0.0),
    (3, 2, 16, 4, 0.0, 0.3),
    (3, 2, 8, 4, 0.0, 0.0),
    (3, 3, 6, 2, 0.0, 0.0),
    (1, 2, 12, 3, 0.0, 0.0),
    (1, 1, 4, 4, 0.0, 0.0),
    (3, 2, 16, 8, 0.0, 0.0),
    (1, 1, 12, 3, 0.05, 0.0),
    (3, 3, 6, 2, 0.3, 0.0),
    (3, 1, 12, 3, 0.05, 0.3),
]


@pytest.mark.parametrize("batch,exit_layer,n_nodes,width,stop,wstop", fast_first(GRID, 3))
def test_greedy_tree_equals_ar(params, ar_outputs, batch, exit_layer, n_nodes, width, stop, wstop):
    out = tree_run(params, batch, exit_layer, n_nodes, width, stop=stop, wstop=wstop)
    assert out.tokens == ar_outputs[batch]
    assert out.stats["accepted"] > 0  # Paths really were accepted, so compaction was exercised.
    if batch > 1:  # EOS mid-block: the grid's rows stop early (test_eesd checks AR's rows do).
        assert any(len(r) < 24 for r in out.tokens)


def test_adaptive_depth_varies_per_round(params, ar_outputs):
    """tree_stop grows some rounds deeper than others: between one depth and the whole tree on average."""
    out = tree_run(params, 3, 2, 16, 4, stop=0.05)
    assert out.tokens == ar_outputs[3]
    assert 4 < out.stats["mean_draft_length"] < 16, out.stats


def first_round_state(params, N: int, n: int):
    """(state after prefill of 3 prompts, segments, exit params) for tree.draft at exit layer N, n nodes."""
    ep = perturbed_exit(params, exits.ExitConfig(N, own_head=True))
    req = decoding.make_request(CFG, make_prompts(3), 8, slack=n + 1)
    segments = eesd.split_params(params, N)
    cache, _, hiddens = decoding.prefill(
        CFG, params, *(jnp.asarray(a) for a in (req.tokens_bp, req.prompt_lens_b)), req.cache_len, segments
    )
    state = eesd.eesd_init(
        CFG, eesd.EESDConfig(N, 4, FIXED), params, ep, cache, hiddens, jnp.zeros((3, CFG.vocab_size)),
        jnp.asarray(req.max_new_b), jax.random.key(0), SamplingConfig(), (EOS,), req.max_new,
    )  # fmt: skip
    return state, segments, ep


def test_adaptive_tree_is_a_prefix_of_the_whole_tree(params):
    """tree.draft with a stop grows the whole tree's first depths (same nodes), fewer as the stop rises."""
    N, W, n = 2, 4, 16
    state, segments, ep = first_round_state(params, N, n)

    def grow(stop):
        ecfg = eesd.EESDConfig(N, 4, FIXED, tree=n, tree_width=W, tree_stop=stop)
        pos0 = state.cache.lengths
        return tree.draft(
            CFG, ecfg, params, segments[0], ep, state.last, pos0, state.cache, state.exit_cache, jnp.ones((3,))
        )

    whole, R, predicted_whole = grow(0.0)
    assert int(R) == n // W
    depths_grown, predicted = [], []
    for stop in (1e-9, 0.02, 0.05, 0.1, 0.3, 1e9):
        t, n_depth, pred = grow(stop)
        k = 1 + int(n_depth) * W
        np.testing.assert_array_equal(np.asarray(t.tokens[:, :k]), np.asarray(whole.tokens[:, :k]))
        np.testing.assert_array_equal(np.asarray(t.parent[:, :k]), np.asarray(whole.parent[:, :k]))
        depths_grown.append(int(n_depth))
        predicted.append(np.asarray(pred))
    assert depths_grown[0] == n // W and depths_grown[-1] == 1 and len(set(depths_grown)) > 2, depths_grown
    assert depths_grown == sorted(depths_grown, reverse=True)
    np.testing.assert_allclose(predicted[0], np.asarray(predicted_whole), rtol=1e-6)
    assert all((a >= b).all() for a, b in zip(predicted, predicted[1:]))  # Fewer depths, fewer predicted drafts.


def test_the_deepest_depth_writes_what_a_full_draft_step_writes(params):
    """The deepest depth drafts as a leaf (no exit attention, MLP or head: zero children) and writes
    the same keys/values into both caches as running its nodes with children does."""
    N, W, n = 2, 4, 8
    state, segments, ep = first_round_state(params, N, n)
    ecfg = eesd.EESDConfig(N, 4, FIXED, tree=n, tree_width=W)
    pos0 = state.cache.lengths
    t, n_depth, _ = tree.draft(CFG, ecfg, params, segments[0], ep, state.last, pos0, state.cache, state.exit_cache)
    assert int(n_depth) == n // W
    deepest = 1 + W + jnp.arange(W)
    full, logp, _ = tree._run_nodes(CFG, params, segments[0], ep, t, deepest, pos0, 2, W)
    leaf, leaf_logp, leaf_ids = tree._run_nodes(
        CFG, params, segments[0], ep, t, deepest, pos0, 2, W, None, jnp.bool_(False)
    )
    for a, b, c in ((t.cache, full.cache, leaf.cache), (t.exit_cache, full.exit_cache, leaf.exit_cache)):
        for field in ("k", "v"):
            # The draft ran jitted in its loop, the reruns eagerly: equal up to float error.
            np.testing.assert_allclose(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), atol=2e-5)
            np.testing.assert_array_equal(np.asarray(getattr(b, field)), np.asarray(getattr(c, field)))
    assert np.asarray(logp).any() and not np.asarray(leaf_logp).any() and not np.asarray(leaf_ids).any()


def test_adaptive_width_varies_per_round(params, ar_outputs):
    """tree_width_stop keeps fewer than W nodes per depth in some rounds: between 1 and W on average."""
    out = tree_run(params, 3, 2, 16, 4, wstop=0.3)
    assert out.tokens == ar_outputs[3]
    assert 4 < out.stats["mean_draft_length"] < 16, out.stats


def forced_width_run(params, ranks_w2):
    """Greedy decoding (N = 2, 16 nodes, W = 4, width stop 0.3) from a rank posterior of `ranks_w2`
    [W, 2] (accepted, passed) counts for every row; returns (state, tokens per row)."""
    ecfg = eesd.EESDConfig(2, 4, FIXED, tree=16, tree_width=4, tree_width_stop=0.3)
    ep = perturbed_exit(params, exits.ExitConfig(2, own_head=True))
    state = decode_state(params, ecfg, ep, make_prompts(3), 24, ranks=jnp.broadcast_to(ranks_w2, (3, 4, 2)))
    return state, [np.asarray(state.tokens[b, : int(state.n_new[b])]).tolist() for b in range(3)]


def test_width_follows_the_rank_posterior(params, ar_outputs):
    """A posterior that says ranks > 1 never accept verifies one node per depth every round; one that
    says ranks 2..4 often accept, all four. Both give AR's tokens."""
    never = jnp.asarray([[1e6, 0.0]] + [[0.0, 1e6]] * 3)
    often = jnp.asarray([[0.0, 1e6]] + [[1e6, 1e6]] * 3)
    for ranks, w in ((never, 1), (often, 4)):
        state, tokens = forced_width_run(params, ranks)
        assert tokens == ar_outputs[3]
        np.testing.assert_array_equal(np.asarray(state.drafted), np.asarray(state.rounds) * 4 * w)
        assert int(state.accepted.sum()) > 0


def test_width_gains_and_choice():
    """width_gains is E(w + 1) - E(w), E(w) = sum_d A(w)^d = A (1 - A^R) / (1 - A); choose_width keeps
    the leading ranks whose gain reaches the stop, for the widest live row."""
    rng = np.random.default_rng(0)
    ranks = jnp.asarray(rng.integers(0, 20, size=(3, 4, 2)), jnp.float32)
    q = (1 + np.asarray(ranks[..., 0], np.float64)) / (2 + np.asarray(ranks.sum(-1), np.float64))
    a = 1 - np.cumprod(1 - q, -1)
    e = a * (1 - a**5) / (1 - a)
    # float32 sums of E up to 5 against float64: differences to ~1e-6.
    np.testing.assert_allclose(np.asarray(tree.width_gains(ranks, 5)), np.diff(e, axis=-1), rtol=1e-5, atol=1e-5)
    prior = jnp.zeros((1, 4, 2))
    live = jnp.ones((1,), bool)
    widths = [int(tree.choose_width(prior, 4, stop, live)) for stop in (0.0, 0.4, 0.6, 1.0, 1e9)]
    assert widths[0] == 4 and widths[-1] == 1 and widths == sorted(widths, reverse=True) and len(set(widths)) > 2
    gap = jnp.asarray([[[0, 0], [0, 1e6], [1e6, 0], [1e6, 0]]], jnp.float32)  # Rank 2 never: 3, 4 unreachable.
    assert int(tree.choose_width(gap, 4, 0.01, live)) == 1
    both = jnp.concatenate([gap, prior, prior])
    assert int(tree.choose_width(both, 4, 0.01, jnp.asarray([True, True, False]))) == 4
    assert int(tree.choose_width(both, 4, 0.01, jnp.asarray([True, False, False]))) == 1


def test_rank_counts_follow_the_accepted_path():
    """At each depth reached: the accepted child's rank counts accepted, the kept ranks before it
    passed; at the depth where no kept child matched, all kept ranks passed; finished rows nothing."""
    W, w = 3, 2
    path = jnp.asarray([[0, 2, 4, 4], [0, 1, 4, 7], [0, 0, 0, 0]])  # Node 2: rank 1 at depth 1, 4: rank 0 at 2.
    n_acc, live = jnp.asarray([2, 3, 0]), jnp.asarray([True, False, True])
    got = np.asarray(tree.rank_counts(path, n_acc, 3, w, W, live))
    want = np.zeros((3, W, 2))
    want[0, 1, 0] = want[0, 0, 0] = 1  # Accepted: rank 1 at depth 1, rank 0 at depth 2.
    want[0, 0, 1] += 1  # Depth 1: rank 0 passed before rank 1.
    want[0, :w, 1] += 1  # Depth 3: reached, none of the w kept matched.
    want[2, :w, 1] += 1  # Row 2 at depth 1.
    np.testing.assert_array_equal(got, want)
    shallow = np.asarray(tree.rank_counts(path, n_acc, 1, w, W, live))  # One depth grown: depth 1 only.
    np.testing.assert_array_equal(shallow[0], [[0, 1], [1, 0], [0, 0]])


def test_a_narrow_round_verifies_only_its_kept_nodes(params):
    """verify with w < W runs the first w nodes of each depth (a smaller bucket) and gives them the
    logits and keys the whole tree's verification gives; the other nodes get none."""
    N, W, n, w = 2, 4, 8, 2
    ecfg = eesd.EESDConfig(N, 4, FIXED, tree=n, tree_width=W, tree_width_stop=0.3)
    state, segments, ep = first_round_state(params, N, n)
    pos0 = state.cache.lengths
    # Drafted for w: the kept nodes' parents are kept (a whole tree's verification gives the same).
    t, n_depth, _ = tree.draft(
        CFG, ecfg, params, segments[0], ep, state.last, pos0, state.cache, state.exit_cache, width=jnp.int32(w)
    )
    kept_parents = np.asarray(t.parent)[:, 1:][:, (np.arange(n) % W) < w]
    assert ((kept_parents - 1) % W < w)[:, w:].all() and (kept_parents[:, :w] == 0).all()
    kept = np.asarray(tree.kept_nodes(W, n_depth, w, n + 1))
    depth_of, rank_of = tree.depths(n, W), (np.arange(n + 1) - 1) % W
    assert set(kept[kept >= 0]) == {0} | {j for j in range(1, n + 1) if depth_of[j] <= n_depth and rank_of[j] < w}
    narrow, narrow_cache, _ = tree.verify(CFG, ecfg, params, segments, t, pos0, n_depth, jnp.int32(w))
    wide, wide_cache, _ = tree.verify(CFG, ecfg, params, segments, t, pos0, n_depth, jnp.int32(W))
    sel = kept[kept >= 0]
    dropped = np.setdiff1d(np.arange(n + 1), sel)
    np.testing.assert_allclose(np.asarray(narrow[:, sel]), np.asarray(wide[:, sel]), atol=2e-5)
    assert not np.asarray(narrow[:, dropped]).any() and np.asarray(wide[:, dropped]).any()
    slots = np.asarray(pos0)[:, None] + sel[None]
    rows = np.arange(3)[:, None]
    for got, want in ((narrow_cache.k, wide_cache.k), (narrow_cache.v, wide_cache.v)):
        np.testing.assert_allclose(np.asarray(got)[N:, rows, :, slots], np.asarray(want)[N:, rows, :, slots], atol=2e-5)


def test_calibration_starts_at_one_and_follows_the_record():
    """The posterior ratio is 1 before any round and tends to accepted / predicted with more rounds."""
    assert float(tree.calibration(jnp.float32(0), jnp.float32(0))) == 1.0
    low = [float(tree.calibration(jnp.float32(a), jnp.float32(4 * a))) for a in (1, 10, 1000)]
    assert low == sorted(low, reverse=True) and abs(low[-1] - 0.25) < 0.01
    assert float(tree.calibration(jnp.float32(30), jnp.float32(10))) > 1


@pytest.mark.slow
def test_greedy_tree_with_context_exit_equals_ar(params, ar_outputs):
    out = tree_run(params, 3, 1, 8, 2, context_layer=3)
    assert out.tokens == ar_outputs[3]
    assert out.stats["accepted"] > 0


def fused_exit(params, exit_layer, context_layer, fuse_layers):
    """A trained-like fused exit (test_eesd's): the fused states really enter its drafts."""
    exit_cfg = exits.ExitConfig(exit_layer, own_head=True, context_layer=context_layer, fuse_layers=fuse_layers)
    ep = perturbed_exit(params, exit_cfg)
    ep["fuse"]["w"] = 0.2 * ep["fuse"]["w"]  # Small enough that drafts are still accepted (an untrained block).
    assert float(jnp.abs(ep["fuse"]["w"]).min()) > 0
    return ep


# (N, context layer, fuse layers, node budget, width, tree_stop)
FUSED_GRID = [(2, 0, (2, 4), 12, 3, 0.0), (1, 0, (1, 2, 4), 8, 4, 0.05), (2, 3, (2, 4), 8, 2, 0.0)]


@pytest.mark.parametrize("exit_layer,context_layer,fuse_layers,n_nodes,width,stop", fast_first(FUSED_GRID))
def test_fused_exit_tree_equals_ar(params, ar_outputs, exit_layer, context_layer, fuse_layers, n_nodes, width, stop):
    ep = fused_exit(params, exit_layer, context_layer, fuse_layers)
    ecfg = eesd.EESDConfig(
        exit_layer,
        4,
        FIXED,
        context_layer=context_layer,
        fuse_layers=fuse_layers,
        tree=n_nodes,
        tree_width=width,
        tree_stop=stop,
    )
    out = generate.generate_eesd(CFG, params, ep, ecfg, make_prompts(3), 24, eos_ids=(EOS,))
    assert out.tokens == ar_outputs[3]
    assert out.stats["accepted"] > 0


@pytest.mark.slow
def test_a_one_wide_fused_tree_drafts_as_the_fused_chain(params, ar_outputs):
    """A tree of K nodes, one per depth, is a chain of K drafts: with a fused exit (each node reading
    its parent's exit output, the verified states rewritten into the exit's cache) the same rounds."""
    ep = fused_exit(params, 2, 0, (2, 4))
    outs = []
    for tree_nodes in (0, 4):
        ecfg = eesd.EESDConfig(2, 4, FIXED, fuse_layers=(2, 4), tree=tree_nodes, tree_width=1)
        outs.append(generate.generate_eesd(CFG, params, ep, ecfg, make_prompts(3), 24, eos_ids=(EOS,)))
    chain, one_wide = outs
    assert chain.tokens == one_wide.tokens == ar_outputs[3]
    assert chain.stats["accepted"] > 3
    # Per-row rounds: the same drafts accepted round by round (accepted counts may differ by the last
    # round's drafts, which a chain cuts at the token budget and a tree does not).
    assert chain.stats["per_row"]["rounds"] == one_wide.stats["per_row"]["rounds"]


@pytest.mark.slow
def test_wider_trees_accept_more_than_chains(params):
    """A tree holding the chain's nodes and more accepts at least as many tokens per round (here: more)."""
    chain = tree_run(params, 3, 2, 4, 1).stats["mean_accepted_per_round"]
    wide = tree_run(params, 3, 2, 16, 4).stats["mean_accepted_per_round"]
    assert wide > chain


def decode_state(params, ecfg, ep, prompts, max_new, ranks=None):
    req = decoding.make_request(CFG, prompts, max_new, slack=ecfg.block_len)
    segments = eesd.split_params(params, ecfg.exit_layer, ecfg.context_layer)
    tokens_bp, lens_b, max_new_b = (jnp.asarray(a) for a in (req.tokens_bp, req.prompt_lens_b, req.max_new_b))
    cache, logits, hiddens = decoding.prefill(CFG, params, tokens_bp, lens_b, req.cache_len, segments)
    greedy = SamplingConfig()
    state = eesd.eesd_init(
        CFG, ecfg, params, ep, cache, hiddens, logits, max_new_b, jax.random.key(0), greedy, (EOS,), req.max_new
    )
    if ranks is not None:  # A given rank posterior (EESDState.tree_ranks).
        state = state.replace(tree_ranks=ranks)
    return eesd.eesd_decode(CFG, ecfg, params, segments, ep, state, greedy, (EOS,), jnp.int32(1000))


def test_caches_after_tree_decoding_equal_ar_at_every_accepted_position(params):
    """LLM cache: AR's keys/values; exit cache: the exit block's over the final sequence's layer-N states."""
    N = 2
    ep = perturbed_exit(params, exits.ExitConfig(N, own_head=True))
    ecfg = eesd.EESDConfig(N, 4, FIXED, tree=12, tree_width=3)
    prompts = make_prompts(3)
    state = decode_state(params, ecfg, ep, prompts, 24)
    assert int(state.accepted.sum()) > 0
    for b, prompt in enumerate(prompts):
        n = int(state.cache.lengths[b])
        seq = (prompt + np.asarray(state.tokens[b, : int(state.n_new[b])]).tolist())[:n]
        assert n == len(prompt) + int(state.n_new[b]) - 1
        ar_cache, _, (h_n, _) = decoding.prefill(
            CFG, params, jnp.asarray([seq]), jnp.asarray([n]), n, eesd.split_params(params, N)
        )
        for got, want in ((state.cache.k, ar_cache.k), (state.cache.v, ar_cache.v)):
            np.testing.assert_allclose(np.asarray(got[:, b, :, :n]), np.asarray(want[:, 0]), atol=2e-5)
        block = jax.tree.map(lambda w: w[0], ep["block"])
        k, v = model.keys_values(CFG, block, h_n, jnp.arange(n)[None])
        np.testing.assert_allclose(
            np.asarray(state.exit_cache.k[0, b, :, :n]), np.asarray(model.heads_major(k)[0]), atol=2e-5
        )
        np.testing.assert_allclose(
            np.asarray(state.exit_cache.v[0, b, :, :n]), np.asarray(model.heads_major(v)[0]), atol=2e-5
        )


def test_tree_masks_ancestors_only():
    """Nodes see the cache below p and their ancestors' slots, nothing else."""
    anc = np.zeros((1, 3, 3), bool)
    anc[0, 0, 0] = anc[0, 1, [0, 1]] = anc[0, 2, [0, 2]] = True  # Root 0 with two children 1, 2.
    vis = np.asarray(tree._visible(jnp.asarray(anc), jnp.asarray([4]), 10))[0]
    want = np.zeros((3, 10), bool)
    want[:, :4] = True
    want[0, 4] = want[1, [4, 5]] = want[2, [4, 6]] = True
    np.testing.assert_array_equal(vis, want)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tree=6, tree_width=4), "multiple of tree_width"),
        (dict(tree=-1), "tree must be >= 0"),
        (dict(tree=4, trace=True), "neither trace"),
        (dict(tree_stop=0.3), "needs a tree"),
        (dict(tree=8, tree_stop=-1.0), "tree_stop must be >= 0"),
        (dict(tree_width_stop=0.3), "tree_width_stop must be >= 0 and needs a tree"),
        (dict(tree=8, tree_width_stop=-1.0), "tree_width_stop must be >= 0"),
    ],
)
def test_bad_tree_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eesd.EESDConfig(2, 4, **kwargs).validate(CFG)


# ----------------------------------------------------------------------------- sampling (chi-square)

SC = SamplingConfig(temperature=1.0)
S_CFG = sampling_tests.CFG


def tree_counts(params, ecfg) -> np.ndarray:
    return sampling_tests.eesd_counts(params, SC, ecfg)


@pytest.fixture(scope="module")
def s_params():
    return model.init_params(S_CFG, jax.random.key(42), scale=0.35)


@pytest.mark.slow
# stop 0.3: 1 to 3 depths; width stop 0.4: 2 of 3 nodes per depth in the first round (the prior), then as the counts say.
@pytest.mark.parametrize(
    "n_nodes,width,stop,wstop", [(4, 2, 0.0, 0.0), (6, 3, 0.0, 0.0), (6, 2, 0.3, 0.0), (6, 3, 0.0, 0.4)]
)
def test_tree_sampling_has_ar_distribution(s_params, n_nodes, width, stop, wstop):
    ecfg = eesd.EESDConfig(1, 4, FIXED, tree=n_nodes, tree_width=width, tree_stop=stop, tree_width_stop=wstop)
    counts = tree_counts(s_params, ecfg)
    p = sampling_tests.chi_square_p(counts, sampling_tests.exact_distribution(s_params, SC))
    assert p > sampling_tests.P_VALUE, p


@pytest.mark.slow
def test_tree_sampling_test_fails_without_the_residual(s_params, monkeypatch):
    """The mutation: a rejected sibling keeps its mass (no zeroing, no renormalizing) -> chi-square fails."""
    monkeypatch.setattr(tree, "reject", lambda r, c: r)
    jax.clear_caches()  # eesd_decode traced with the real rule must be traced again.
    try:
        ecfg = eesd.EESDConfig(1, 4, FIXED, tree=4, tree_width=2)
        counts = tree_counts(s_params, ecfg)
    finally:
        jax.clear_caches()
    p = sampling_tests.chi_square_p(counts, sampling_tests.exact_distribution(s_params, SC))
    assert p < sampling_tests.P_VALUE, p


def test_cli_tree_reaches_the_engine(params):
    session = engine.Session(types.SimpleNamespace(cfg=CFG, fingerprint="tiny"), params, None, 0.0)
    argv = ["generate", "--prompt", "hi", "--exit-layer", "1"]

    def ecfg(*flags):
        args = cli.build_parser().parse_args([*argv, *flags])
        cli_args.validate_eesd(args)
        cli_args.validate_eesd(args)  # Checks only: a second call sees the same flags.
        return cli.engine_from_args(session, args).ecfg

    e = ecfg("--tree", "8", "--tree-width", "4", "--tree-stop", "0.25", "--tree-width-stop", "0.125")
    assert (e.tree, e.tree_width, e.tree_stop, e.tree_width_stop) == (8, 4, 0.25, 0.125)
    assert (ecfg("--tree", "6").tree, ecfg("--tree", "6").tree_width) == (6, 3)
    assert (ecfg().tree, ecfg().tree_width) == cli_args.TREE == (3, 3)  # The default: one depth of 3.
    chain = ecfg("--tree", "0", "--max-draft", "5", "--controller", "fixed")
    assert (chain.tree, chain.max_draft, chain.controller.kind) == (0, 5, "fixed")
    assert (ecfg("--tree", "0").max_draft, ecfg("--tree", "0").controller.kind) == (6, "confidence")


@pytest.mark.parametrize(
    "bad,match",
    [
        (["--tree", "6", "--tree-width", "4"], "--tree must be 0 or a positive multiple of --tree-width 4"),
        (["--tree", "-3"], "--tree must be 0 or a positive multiple of --tree-width 3"),
        (["--tree", "4"], "--tree must be 0 or a positive multiple of --tree-width 3"),  # The default width.
        (["--tree", "4", "--tree-width", "0"], "--tree-width must be >= 1"),
        (["--tree", "0", "--tree-stop", "0.3"], "--tree-stop must be >= 0 and needs --tree"),
        (["--tree", "8", "--tree-width", "4", "--tree-stop", "-1"], "--tree-stop must be >= 0"),
        (["--tree", "0", "--tree-width-stop", "0.3"], "--tree-width-stop must be >= 0 and needs --tree"),
        (["--controller", "fixed"], "--controller shape a chain's drafts, and --tree 3 drafts a tree: add --tree 0"),
        (["--tree", "4", "--tree-width", "4", "--max-draft", "3"], "--max-draft shape a chain's drafts"),
        (["--controller", "fixed", "--max-draft", "3"], "--controller and --max-draft shape a chain's drafts"),
        (["--tree", "8", "--tree-width", "4", "--tree-width-stop", "-1"], "--tree-width-stop must be >= 0"),
    ],
)
def test_cli_refuses_a_bad_tree_before_loading(monkeypatch, capsys, bad, match):
    """Also: a chain's flags (--controller, --max-draft, --by-position) with a tree, the default."""
    monkeypatch.setattr(engine, "load_session", lambda *a, **k: pytest.fail("model loaded despite bad input"))
    assert cli.main(["generate", "--prompt", "hi", *bad]) == 2
    assert match in capsys.readouterr().err


MESH_SCRIPT = """
import json, jax, numpy as np
from eesd_jax import control, eesd, exits, generate, model, sharding
from tests.test_eesd import CFG, EOS, perturbed_exit
params = model.init_params(CFG, jax.random.key(0), scale=0.3)
rng = np.random.default_rng(3)
prompts = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in (3, 11, 6, 8)]
ar = generate.generate_ar(CFG, params, prompts, 16, eos_ids=(EOS,)).tokens
ep = perturbed_exit(params, exits.ExitConfig(2, own_head=True))
ecfg = eesd.EESDConfig(2, 4, control.ControllerConfig("fixed"), tree=8, tree_width=4)
mesh = sharding.make_mesh(data=2, model=2)
g = generate.generate_eesd(CFG, sharding.shard_params(params, mesh), sharding.shard_exit_params(ep, mesh), ecfg,
                           prompts, 16, eos_ids=(EOS,), mesh=mesh)
print(json.dumps({"devices": len(jax.devices()), "equal": g.tokens == ar, "accepted": g.stats["accepted"]}))
"""


@pytest.mark.slow
def test_tree_on_a_mesh_equals_single_device_ar():
    """Per-row trees with rows over 'data' and heads over 'model' (4 fake devices) give AR's tokens."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    # tests/ too: test_eesd imports its helpers module as pytest does.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(root / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["equal"] and result["accepted"] > 0, result
