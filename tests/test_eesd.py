"""EESD decoding is lossless: greedy output equals AR token for token (docs/design.md, invariant 3)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fast_first

from eesd_jax import chain, control, decoding, eesd, exits, generate, losses, model
from eesd_jax.kv_cache import init_cache
from eesd_jax.sampling import SamplingConfig

CFG = model.ModelConfig(
    vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=256
)
EOS = 7  # A frequent token for this random model, so rows stop mid-block.


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0), scale=0.3)


def make_prompts(batch, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [3, 11, 6][:batch] if batch > 1 else [5]
    return [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ar_outputs(params):
    return {b: generate.generate_ar(CFG, params, make_prompts(b), 24, eos_ids=(EOS,)).tokens for b in (1, 3)}


# Knobs under which these policies both draft and stop on this random model (an untrained exit's
# distributions are flat): a policy that never drafts would pass the losslessness tests vacuously.
DRAFTING_KNOBS = {
    "entropy": dict(max_entropy=3.5),
    "margin": dict(min_margin=0.05),
    "patience": dict(patience=1),
    "saturation": dict(saturation=0.8),
    "gate": dict(gate_threshold=0.1),
}


def eesd_tokens(params, prompts, exit_layer, max_draft, kind, exit_params=None, context_layer=0, fuse_layers=(), **kw):
    ctrl = control.ControllerConfig(kind=kind, **DRAFTING_KNOBS.get(kind, {}))
    ecfg = eesd.EESDConfig(exit_layer, max_draft, ctrl, context_layer=context_layer, fuse_layers=fuse_layers)
    if exit_params is None:
        exit_cfg = exits.ExitConfig(exit_layer, context_layer=context_layer, fuse_layers=fuse_layers)
        exit_params = exits.init_exit(CFG, params, exit_cfg)
    return generate.generate_eesd(CFG, params, exit_params, ecfg, prompts, 24, eos_ids=(EOS,), **kw)


# The paper's controllers and baselines get the full grid; every other registered policy, one
# (N, J) pair at batch 3 (compiles dominate the suite's time).
FULL_GRID_KINDS = ("fixed", "confidence", "beta-ts", "calibration-ts")
# Each of these kinds at every N and every J, the pairs rotated between kinds so that every
# (N, J) combination is run by some kind (12 runs instead of the 36 of the full product).
GRID = [(kind, n, (1, 4, 8)[(n - 1 + i) % 3]) for i, kind in enumerate(FULL_GRID_KINDS) for n in (1, 2, 3)]
GRID += [(kind, 2, 4) for kind in control.KINDS if kind not in FULL_GRID_KINDS]


@pytest.mark.parametrize("kind,exit_layer,max_draft", fast_first(GRID, 2))
def test_greedy_eesd_equals_ar_batch3(params, ar_outputs, kind, exit_layer, max_draft):
    out = eesd_tokens(params, make_prompts(3), exit_layer, max_draft, kind)
    assert out.tokens == ar_outputs[3]
    per_row = out.stats["per_row"]
    assert all(d <= max_draft * r for d, r in zip(per_row["drafted"], per_row["rounds"], strict=True))
    if kind not in FULL_GRID_KINDS:  # Its single run must exercise both drafting and stopping.
        assert 0 < out.stats["drafted"] < max_draft * sum(per_row["rounds"])


@pytest.mark.parametrize("kind,exit_layer,max_draft", fast_first([(k, n, 4) for k in FULL_GRID_KINDS for n in (1, 3)]))
def test_greedy_eesd_equals_ar_batch1(params, ar_outputs, kind, exit_layer, max_draft):
    assert eesd_tokens(params, make_prompts(1), exit_layer, max_draft, kind).tokens == ar_outputs[1]


def test_outputs_stop_at_eos_inside_a_block(params, ar_outputs):
    """The grid must really exercise EOS: some row stops early on EOS."""
    rows = ar_outputs[3]
    assert any(r[-1] == EOS and len(r) < 24 for r in rows), rows
    assert any(len(r) == 24 for r in rows)


@pytest.mark.slow
def test_trained_like_exit_equals_ar(params, ar_outputs):
    """A perturbed exit (as after training) drafts differently but outputs the same tokens."""
    ep = exits.init_exit(CFG, params, exits.ExitConfig(2, own_head=True))
    ep = jax.tree.map(lambda w: w + 0.05 * jax.random.normal(jax.random.key(1), w.shape), ep)
    out = eesd_tokens(params, make_prompts(3), 2, 4, "beta-ts", exit_params=ep)
    assert out.tokens == ar_outputs[3]
    assert 0 < out.stats["acceptance_rate"] < 1


def perturbed_exit(params, exit_cfg, seed=1):
    """An exit as after training: the LLM's last block, perturbed."""
    ep = exits.init_exit(CFG, params, exit_cfg)
    return jax.tree.map(lambda w: w + 0.05 * jax.random.normal(jax.random.key(seed), w.shape), ep)


@pytest.mark.parametrize(
    "kind,exit_layer,context_layer,max_draft",
    fast_first([("beta-ts", 1, 3, 4), ("fixed", 1, 2, 8), ("confidence", 2, 3, 1), ("calibration-ts", 1, 3, 3)]),
)
def test_context_exit_greedy_eesd_equals_ar(params, ar_outputs, kind, exit_layer, context_layer, max_draft):
    """An exit attending over context-layer states of verified positions is lossless too."""
    ep = perturbed_exit(params, exits.ExitConfig(exit_layer, own_head=True, context_layer=context_layer))
    out = eesd_tokens(params, make_prompts(3), exit_layer, max_draft, kind, ep, context_layer)
    assert out.tokens == ar_outputs[3]
    assert out.stats["drafted"] > 0 or kind == "confidence"


# Fused exits (ExitConfig.fuse_layers): the final state alone, low/mid/high sets, with a context layer.
FUSED_GRID = [
    ("beta-ts", 2, 0, (4,), 4),
    ("fixed", 2, 0, (2, 3, 4), 8),
    ("fixed", 2, 3, (2, 4), 2),
    ("calibration-ts", 2, 3, (3,), 3),
]


@pytest.mark.parametrize("kind,exit_layer,context_layer,fuse_layers,max_draft", fast_first(FUSED_GRID, 1))
def test_fused_exit_greedy_eesd_equals_ar(params, ar_outputs, kind, exit_layer, context_layer, fuse_layers, max_draft):
    """An exit fusing the previous position's verified states into its input is lossless too, at batch 3 and 1."""
    exit_cfg = exits.ExitConfig(exit_layer, own_head=True, context_layer=context_layer, fuse_layers=fuse_layers)
    ep = perturbed_exit(params, exit_cfg)
    ep["fuse"]["w"] = 0.2 * ep["fuse"]["w"]  # Small enough that drafts are still accepted (an untrained block).
    assert float(jnp.abs(ep["fuse"]["w"]).min()) > 0  # The fused states really enter the drafts.
    stats = []
    for batch in (3, 1):
        out = eesd_tokens(params, make_prompts(batch), exit_layer, max_draft, kind, ep, context_layer, fuse_layers)
        assert out.tokens == ar_outputs[batch]
        stats.append((out.stats["accepted"], out.stats["drafted"]))
    assert any(0 < acc < drafted for acc, drafted in stats), stats  # Accepted and rejected drafts both occur.


@pytest.mark.slow
def test_untrained_fused_exit_drafts_like_the_unfused_one(params):
    """Zero weights on the fused states: the same drafts, the same draft features, round by round."""

    def run(fuse_layers):
        ecfg = eesd.EESDConfig(2, 4, control.ControllerConfig("beta-ts"), fuse_layers=fuse_layers, trace=True)
        ep = exits.init_exit(CFG, params, exits.ExitConfig(2, fuse_layers=fuse_layers))
        return generate.generate_eesd(CFG, params, ep, ecfg, make_prompts(3), 24, eos_ids=(EOS,))

    plain, fused = run(()), run((2, 3, 4))
    assert fused.tokens == plain.tokens and fused.stats == plain.stats
    np.testing.assert_array_equal(np.asarray(fused.trace.features), np.asarray(plain.trace.features))


@pytest.mark.slow
def test_context_exit_cache_holds_context_layer_keys_at_every_verified_position(params):
    """After EESD decoding, the exit's cache below each row's length is the exit block's keys/values of
    the context layer's states of the final sequence: verification rewrote every drafted slot."""
    N, C, J = 1, 3, 4
    ep = perturbed_exit(params, exits.ExitConfig(N, own_head=True, context_layer=C))
    ecfg = eesd.EESDConfig(N, J, control.ControllerConfig("fixed"), context_layer=C)
    prompts = make_prompts(3)
    req = decoding.make_request(CFG, prompts, 24, slack=J + 1)
    segments = eesd.split_params(params, N, C)
    tokens_bp, lens_b, max_new_b = (jnp.asarray(a) for a in (req.tokens_bp, req.prompt_lens_b, req.max_new_b))
    cache, logits, hiddens = decoding.prefill(CFG, params, tokens_bp, lens_b, req.cache_len, segments)
    greedy = SamplingConfig()
    state = eesd.eesd_init(
        CFG, ecfg, params, ep, cache, hiddens, logits, max_new_b, jax.random.key(0), greedy, (EOS,), req.max_new
    )
    state = eesd.eesd_decode(CFG, ecfg, params, segments, ep, state, greedy, (EOS,), jnp.int32(1000))
    assert int(state.accepted.sum()) > 0 and int((state.drafted - state.accepted).sum()) > 0  # Both kinds of slot.
    block = jax.tree.map(lambda w: w[0], ep["block"])
    for b, prompt in enumerate(prompts):
        n = int(state.exit_cache.lengths[b])
        seq = (prompt + np.asarray(state.tokens[b, : int(state.n_new[b])]).tolist())[:n]
        assert n == len(prompt) + int(state.n_new[b]) - 1
        _, _, (_, h_c, _) = decoding.prefill(CFG, params, jnp.asarray([seq]), jnp.asarray([n]), n, segments)
        k, v = model.keys_values(CFG, block, h_c, jnp.arange(n)[None])
        np.testing.assert_allclose(
            np.asarray(state.exit_cache.k[0, b, :, :n]), np.asarray(model.heads_major(k)[0]), atol=2e-5
        )
        np.testing.assert_allclose(
            np.asarray(state.exit_cache.v[0, b, :, :n]), np.asarray(model.heads_major(v)[0]), atol=2e-5
        )


@pytest.mark.slow
def test_context_exit_drafts_what_training_computes(params):
    """Drafting at position t of a round that started at s (context-layer slots before s, layer-N slots
    s..t, as the engine writes them) gives losses.exit_train_logits' logits for start[t] = s."""
    N, C, T = 1, 3, 10
    ep = perturbed_exit(params, exits.ExitConfig(N, own_head=True, context_layer=C))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, T)), jnp.int32)
    _, _, (h_n, h_c, _) = decoding.prefill(CFG, params, tokens, jnp.full((2,), T), T, eesd.split_params(params, N, C))
    starts = np.array([[0, 1, 1, 1, 4, 5, 5, 7, 7, 7], [0, 0, 2, 3, 4, 4, 4, 4, 8, 9]], np.int32)
    train_logits = losses.exit_train_logits(CFG, ep["head"], ep, h_n, None, h_c, jnp.asarray(starts))
    # First drafts (t = s) and drafts 2..4 of a round (e.g. row 1, t = 7: s = 4), with and without context.
    for b, t in [(0, 0), (0, 3), (0, 6), (0, 9), (1, 1), (1, 7), (1, 9)]:
        s = int(starts[b, t])
        cache = init_cache(CFG, 1, T, layers=1)
        cache = exits.write_context(CFG, ep, cache, h_c[b : b + 1, :s], jnp.arange(s)[None])
        draft, _ = exits.exit_logits(CFG, params, ep, h_n[b : b + 1, s : t + 1], jnp.arange(s, t + 1)[None], cache)
        np.testing.assert_allclose(np.asarray(draft[0, -1]), np.asarray(train_logits[b, t]), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("exit_layer,context_layer,fuse_layers", [(2, 0, (4,)), (1, 3, (1, 2, 4))])
def test_fused_exit_drafts_what_training_computes(params, exit_layer, context_layer, fuse_layers):
    """After some rounds of decoding, the next round's draft log-probs equal losses.exit_train_logits' over
    the sequence with that round simulated: training-time test sees exactly what drafting sees (the
    verified states of p - 1 at the round's first draft, the exit's own outputs after it, and the exit
    cache verification rewrote)."""
    N, K = exit_layer, 3
    exit_cfg = exits.ExitConfig(N, own_head=True, context_layer=context_layer, fuse_layers=fuse_layers)
    ep = perturbed_exit(params, exit_cfg)
    ecfg = eesd.EESDConfig(
        N, K, control.ControllerConfig("fixed"), context_layer=context_layer, fuse_layers=fuse_layers
    )
    prompts = make_prompts(3)
    sc = SamplingConfig(temperature=1.0)  # The draft block keeps its log-probs (log_softmax at T = 1).
    req = decoding.make_request(CFG, prompts, 40, slack=K + 1)
    segments = eesd.split_params(params, N, context_layer, fuse_layers)
    tokens_bp, lens_b, max_new_b = (jnp.asarray(a) for a in (req.tokens_bp, req.prompt_lens_b, req.max_new_b))
    for rounds in (0, 3):
        cache, logits, hiddens = decoding.prefill(CFG, params, tokens_bp, lens_b, req.cache_len, segments)
        state = eesd.eesd_init(
            CFG, ecfg, params, ep, cache, hiddens, logits, max_new_b, jax.random.key(0), sc, (), req.max_new
        )
        state = eesd.eesd_decode(CFG, ecfg, params, segments, ep, state, sc, (), jnp.int32(rounds))
        d = chain.draft(CFG, ecfg, sc, params, segments[0], ep, state)
        assert (np.asarray(d.n_draft) == K).all()
        for b, prompt in enumerate(prompts):
            p0 = int(state.cache.lengths[b])  # Position of the round's block token 0.
            seq = (
                prompt
                + np.asarray(state.tokens[b, : int(state.n_new[b])]).tolist()
                + np.asarray(d.tokens[b, : K - 1]).tolist()
            )
            assert len(seq) == p0 + K
            _, _, states = decoding.prefill(CFG, params, jnp.asarray([seq]), jnp.asarray([p0 + K]), p0 + K, segments)
            fuse = eesd._at(CFG, ecfg, states, fuse_layers)
            start = jnp.asarray([np.minimum(np.arange(p0 + K), p0)], jnp.int32)
            context = eesd._at(CFG, ecfg, states, [context_layer])[..., 0, :] if context_layer else None
            prev = exits.previous_features(fuse, jnp.zeros_like(fuse[:, 0]))
            train = losses.exit_train_logits(CFG, ep["head"], ep, states[0], None, context, start, prev, K)
            np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(train[0, p0:])), np.asarray(d.logp[b]), atol=5e-5)


def test_oracle_drafter_is_always_accepted(params):
    """At N = L-1 the untrained exit is the LLM's own last block: every draft is accepted."""
    prompts = make_prompts(3)
    out = generate.generate_eesd(
        CFG,
        params,
        exits.init_exit(CFG, params, exits.ExitConfig(3)),
        eesd.EESDConfig(3, 4, control.ControllerConfig("fixed")),
        prompts,
        21,
        eos_ids=(),
    )
    assert out.stats["acceptance_rate"] == 1.0
    # 21 tokens: 1 from prefill, then 4 rounds of J + 1 = 5 tokens.
    assert out.stats["per_row"]["rounds"] == [4, 4, 4]
    assert out.stats["mean_accepted_per_round"] == 5.0


@pytest.mark.slow
def test_unstacked_layers_give_identical_outputs(params, ar_outputs):
    """The per-layer list layout (fast on CPU) decodes exactly like the stacked one."""
    fast = model.unstack(params)
    assert isinstance(fast["layers"], list) and len(fast["layers"]) == CFG.n_layers
    assert generate.generate_ar(CFG, fast, make_prompts(3), 24, eos_ids=(EOS,)).tokens == ar_outputs[3]
    assert eesd_tokens(fast, make_prompts(3), 2, 4, "calibration-ts").tokens == ar_outputs[3]


@pytest.mark.slow
def test_streaming_chunks_give_the_same_tokens(params, ar_outputs):
    seen = [[] for _ in range(3)]

    def on_tokens(rows):
        for acc, new in zip(seen, rows, strict=True):
            acc.extend(new)

    out = eesd_tokens(params, make_prompts(3), 2, 4, "beta-ts", on_tokens=on_tokens)
    assert seen == out.tokens == ar_outputs[3]


@pytest.mark.parametrize("kind", fast_first(control.KINDS))
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
def test_loop_state_types_survive_a_chunk(params, kind, greedy):
    """Every loop-state field keeps its type (shape, dtype, weak type) through eesd_decode: a field
    that changes (a weak-typed Python float came back strongly typed) retraces the loop on every
    streamed chunk after the first, seconds inside the timed decode of `eesd generate`."""
    J, sc = 3, SamplingConfig() if greedy else SamplingConfig(temperature=1.0)
    ecfg = eesd.EESDConfig(2, J, control.ControllerConfig(kind))
    req = decoding.make_request(CFG, make_prompts(3), 24, slack=J + 1)
    segments = eesd.split_params(params, 2)
    ep = exits.init_exit(CFG, params, exits.ExitConfig(2))
    tokens_bp, lens_b, max_new_b = (jnp.asarray(a) for a in (req.tokens_bp, req.prompt_lens_b, req.max_new_b))
    cache, logits, hiddens = jax.eval_shape(
        lambda *a: decoding.prefill(CFG, params, *a, req.cache_len, segments), tokens_bp, lens_b
    )
    start = lambda c, h, lg, m: eesd.eesd_init(  # noqa: E731
        CFG, ecfg, params, ep, c, h, lg, m, jax.random.key(0), sc, (EOS,), req.max_new
    )
    state = jax.eval_shape(start, cache, hiddens, logits, max_new_b)
    after = jax.eval_shape(
        lambda s: eesd.eesd_decode(CFG, ecfg, params, segments, ep, s, sc, (EOS,), jnp.int32(1)), state
    )
    kinds = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype, a.weak_type), tree)  # noqa: E731
    assert kinds(after) == kinds(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(exit_layer=0), r"exit layer N=0 must be in \[1, 4\)"),
        (dict(exit_layer=4), r"exit layer N=4 must be in \[1, 4\)"),
        (dict(exit_layer=2, max_draft=0), "max_draft must be >= 1"),
        (dict(exit_layer=2, context_layer=2), r"context layer 2 must be 0 or in \(2, 4\)"),
        (dict(exit_layer=2, context_layer=4), r"context layer 4 must be 0 or in \(2, 4\)"),
        (dict(exit_layer=2, fuse_layers=(1,)), r"fuse layers \(1,\) must be increasing and in \[2, 4\]"),
        (dict(exit_layer=2, fuse_layers=(4, 3)), r"fuse layers \(4, 3\) must be increasing"),
        (dict(exit_layer=2, fuse_layers=(5,)), r"fuse layers \(5,\) must be increasing and in \[2, 4\]"),
    ],
)
def test_bad_engine_config_is_refused(params, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate.generate_eesd(CFG, params, {}, eesd.EESDConfig(**kwargs), make_prompts(1), 8)


def test_exit_files_round_trip_and_refuse_other_models(params, tmp_path):
    ep = exits.init_exit(CFG, params, exits.ExitConfig(2, own_head=True))
    path = tmp_path / "exit.safetensors"
    exits.save_exit(path, ep, exits.ExitConfig(2, own_head=True, context_layer=3), "tiny", "a" * 64)
    exit_cfg, loaded = exits.load_exit(path, CFG, "a" * 64)
    assert exit_cfg == exits.ExitConfig(2, own_head=True, context_layer=3)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), ep, loaded))
    with pytest.raises(ValueError, match="trained for base model 'tiny'"):
        exits.load_exit(path, CFG, "b" * 64)
    with pytest.raises(ValueError, match="exit after layer 2, not 3"):
        exits.load_exit(path, CFG, "a" * 64, layer=3)
    with pytest.raises(ValueError, match="only from .safetensors"):
        exits.load_exit(tmp_path / "exit.pt", CFG, "a" * 64)
    other = model.ModelConfig(**{**CFG.__dict__, "d_model": 48})
    with pytest.raises(ValueError, match="do not match"):
        exits.load_exit(path, other, "a" * 64)
    fused_cfg = exits.ExitConfig(2, context_layer=3, fuse_layers=(2, 4))  # A fused exit keeps its fuse layers.
    exits.save_exit(path, exits.init_exit(CFG, params, fused_cfg), fused_cfg, "tiny", "a" * 64)
    got_cfg, got = exits.load_exit(path, CFG, "a" * 64)
    assert got_cfg == fused_cfg and got["fuse"]["w"].shape == (CFG.d_model, 2 * CFG.d_model)
    with pytest.raises(ValueError, match="do not match"):  # Its fusion layer must be there.
        exits.save_exit(path, ep, fused_cfg, "tiny", "a" * 64)
        exits.load_exit(path, CFG, "a" * 64)


def test_exit_files_stored_in_float16_load_back_in_the_model_dtype(params, tmp_path):
    exit_cfg = exits.ExitConfig(2, own_head=True)
    ep = exits.init_exit(CFG, params, exit_cfg)
    path16, path32 = tmp_path / "e16.safetensors", tmp_path / "e32.safetensors"
    exits.save_exit(path16, ep, exit_cfg, "tiny", "a" * 64, dtype="float16")
    exits.save_exit(path32, ep, exit_cfg, "tiny", "a" * 64)
    assert path16.stat().st_size < 0.6 * path32.stat().st_size
    umask = os.umask(0)
    os.umask(umask)
    assert path16.stat().st_mode & 0o777 == 0o666 & ~umask  # Not mkstemp's 0600: others may read it.
    _, loaded = exits.load_exit(path16, CFG, "a" * 64)
    for a, b in zip(jax.tree.leaves(ep), jax.tree.leaves(loaded)):
        assert b.dtype == a.dtype
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(np.float16).astype(a.dtype))
    with pytest.raises(ValueError, match="float16 or float32"):
        exits.save_exit(tmp_path / "e8.safetensors", ep, exit_cfg, "tiny", "a" * 64, dtype="int8")
    assert not (tmp_path / "e8.safetensors").exists()
