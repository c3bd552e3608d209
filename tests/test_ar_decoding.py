"""Vanilla autoregressive decoding: greedy equals an uncached reference, batching, EOS, sampling, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from helpers import N_GREEDY, REFERENCE_GREEDY_PREFIX, fast_first, full_forward, golden_smollm, random_tokens

from eesd_jax import decoding, model, sampling
from eesd_jax.generate import generate_ar
from eesd_jax.sampling import SamplingConfig

# ----------------------------------------------------------------------------- independent references


@pytest.fixture(scope="module")
def uncached_last_logits(tiny):
    """f(tokens) -> [V] logits after the last token, by a full forward from a fresh cache (no incremental state)."""
    cfg, params = tiny
    return lambda tokens: full_forward(cfg, params, [tokens])[0, -1]


def greedy_reference(last_logits, prompt, n_new, eos=()):
    out = []
    for _ in range(n_new):
        tok = int(np.argmax(last_logits(list(prompt) + out)))
        out.append(tok)
        if tok in eos:
            break
    return out


def np_warped_probs(logits, temperature, top_k=0, top_p=1.0):
    """The sampling distribution, computed independently in float64 numpy."""
    z = np.asarray(logits, np.float64) / temperature
    if top_k:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, top_p, side="left")) + 1  # Smallest prefix with mass >= top_p.
        # Keep the test away from float32-vs-float64 rounding at the boundary.
        assert abs(cum[n_keep - 1] - top_p) > 1e-4 and (n_keep < 2 or abs(cum[n_keep - 2] - top_p) > 1e-4)
        keep = np.zeros_like(p, bool)
        keep[order[:n_keep]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


# ----------------------------------------------------------------------------- the real model


def check_bundled_greedy(smollm, reference) -> None:
    """Our greedy continuation of the chat prompt equals transformers' (prompt, greedy, eos in reference)."""
    prompt = reference["prompt"].tolist()
    ref = reference["greedy"].tolist()
    assert ref[: len(REFERENCE_GREEDY_PREFIX)] == REFERENCE_GREEDY_PREFIX  # The documented reference.
    out = generate_ar(smollm.cfg, smollm.params, [prompt], N_GREEDY, eos_ids=(int(reference["eos"]),))
    assert out.tokens[0] == ref


@pytest.mark.real_model
@pytest.mark.slow
def test_bundled_greedy_matches_recorded_transformers(smollm):
    golden = golden_smollm()
    assert smollm.fingerprint == golden["gguf_sha256"], "another bundled GGUF: regenerate the golden fixtures"
    check_bundled_greedy(smollm, golden)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.torch
def test_bundled_greedy_matches_transformers(smollm, smollm_reference):
    check_bundled_greedy(smollm, smollm_reference)


# ----------------------------------------------------------------------------- greedy on the tiny model

PROMPT_LENS = [3, 11, 1, 20]


@pytest.fixture(scope="module")
def prompts(tiny):
    cfg, _ = tiny
    return [random_tokens(cfg.vocab_size, (n,), seed=100 + n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def greedy_alone(tiny, prompts):
    """Each prompt generated alone (batch of one), greedy, no EOS."""
    cfg, params = tiny
    return [generate_ar(cfg, params, [p], 12).tokens[0] for p in prompts]


def test_greedy_equals_uncached_reference(greedy_alone, prompts, uncached_last_logits):
    for prompt, got in zip(prompts, greedy_alone, strict=True):
        assert got == greedy_reference(uncached_last_logits, prompt, 12)


def test_batch_equals_rows_alone(tiny, prompts, greedy_alone):
    cfg, params = tiny
    out = generate_ar(cfg, params, prompts, 12)
    assert out.tokens == greedy_alone
    assert out.prompt_tokens == PROMPT_LENS
    assert out.new_tokens == 12 * len(prompts)
    # A different row order changes nothing per row.
    order = [2, 0, 3, 1]
    assert generate_ar(cfg, params, [prompts[i] for i in order], 12).tokens == [greedy_alone[i] for i in order]


def test_unstacked_layout_generates_the_same(tiny, prompts, greedy_alone):
    cfg, params = tiny
    assert generate_ar(cfg, model.unstack(params), prompts, 12).tokens == greedy_alone


def test_per_row_budgets(tiny, prompts, greedy_alone):
    cfg, params = tiny
    budgets = [12, 1, 7, 4]
    out = generate_ar(cfg, params, prompts, budgets)
    assert out.tokens == [g[:n] for g, n in zip(greedy_alone, budgets, strict=True)]


def test_eos_stops_each_row(tiny, prompts, greedy_alone, uncached_last_logits):
    cfg, params = tiny
    # Row 0 meets the first by its 4th token, row 1 the second by its 3rd; other rows may or may not.
    eos = (greedy_alone[0][3], greedy_alone[1][2])

    def cut(tokens):
        stops = [i for i, t in enumerate(tokens) if t in eos]
        return tokens[: stops[0] + 1] if stops else tokens

    out = generate_ar(cfg, params, prompts, 12, eos_ids=eos)
    assert out.tokens == [cut(g) for g in greedy_alone]
    assert len(out.tokens[0]) <= 4 and out.tokens[0][-1] in eos
    assert len(out.tokens[1]) <= 3 and out.tokens[1][-1] in eos
    for p, got in zip(prompts, out.tokens, strict=True):
        assert got == greedy_reference(uncached_last_logits, p, 12, eos=eos)


def test_streaming_delivers_the_same_tokens(tiny, prompts, greedy_alone):
    cfg, params = tiny
    received = [[] for _ in prompts]

    def on_tokens(rows):
        assert len(rows) == len(prompts)
        for b, new in enumerate(rows):
            received[b].extend(new)

    out = generate_ar(cfg, params, prompts, 12, on_tokens=on_tokens, chunk=5)
    assert out.tokens == greedy_alone
    assert received == greedy_alone


# ----------------------------------------------------------------------------- sampling


SAMPLED = SamplingConfig(temperature=0.8, top_k=12, top_p=0.9)
N_ROWS = 2048


@pytest.fixture(scope="module")
def sampled_rows(tiny, prompts):
    """N_ROWS copies of one prompt, 4 sampled tokens each (seed 3)."""
    cfg, params = tiny
    return np.array(generate_ar(cfg, params, [prompts[0]] * N_ROWS, 4, sampling=SAMPLED, seed=3).tokens)


def test_sampling_is_reproducible_and_seeded(tiny, prompts, sampled_rows):
    cfg, params = tiny
    batch = [prompts[0]] * N_ROWS
    again = generate_ar(cfg, params, batch, 4, sampling=SAMPLED, seed=3).tokens
    np.testing.assert_array_equal(np.array(again), sampled_rows)
    other = np.array(generate_ar(cfg, params, batch, 4, sampling=SAMPLED, seed=4).tokens)
    assert (other != sampled_rows).any(axis=1).mean() > 0.5  # Most rows differ under another seed.
    # Streaming in chunks consumes the same random stream.
    streamed = generate_ar(cfg, params, batch, 4, sampling=SAMPLED, seed=3, on_tokens=lambda rows: None, chunk=1)
    np.testing.assert_array_equal(np.array(streamed.tokens), sampled_rows)
    # Rows of one batch draw independently: identical prompts give many different continuations.
    assert len({tuple(r) for r in sampled_rows.tolist()}) > N_ROWS // 4


def test_generate_samples_the_warped_distribution(tiny, prompts, uncached_last_logits, sampled_rows):
    """The first token, and the second after the most common first, follow the warped model distribution."""
    cfg, _ = tiny
    prompt = prompts[0]

    def check(samples, logits):
        p = np_warped_probs(logits, SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p)
        assert p[samples].min() > 0, "sampled a token outside the support"
        support = np.flatnonzero(p)
        assert len(support) > 2  # A test with power: several tokens in play.
        counts = np.bincount(samples, minlength=cfg.vocab_size)[support]
        pvalue = scipy.stats.chisquare(counts, p[support] * len(samples)).pvalue
        assert pvalue > 1e-3, f"chi-square p={pvalue:.2e}"

    check(sampled_rows[:, 0], uncached_last_logits(prompt))
    first = int(np.bincount(sampled_rows[:, 0]).argmax())
    check(sampled_rows[sampled_rows[:, 0] == first, 1], uncached_last_logits([*prompt, first]))


@pytest.fixture(scope="module")
def random_logits():
    """[6, 60] logits of varied sharpness (float32)."""
    rng = np.random.default_rng(11)
    scales = np.array([0.3, 1.0, 2.0, 3.0, 5.0, 8.0])[:, None]
    return (rng.standard_normal((6, 60)) * scales).astype(np.float32)


WARPS = [
    SamplingConfig(temperature=1.0, top_k=1),
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=0.5, top_k=17),
    SamplingConfig(temperature=1.0, top_p=0.3),
    SamplingConfig(temperature=0.8, top_p=0.81),
    SamplingConfig(temperature=2.0, top_p=0.97),
    SamplingConfig(temperature=1.0, top_k=10, top_p=0.6),
    SamplingConfig(temperature=1.5, top_k=59, top_p=0.93),
]


@pytest.mark.parametrize("scfg", fast_first(WARPS, 2), ids=str)
def test_warp_support_and_values(random_logits, scfg):
    warped = np.asarray(sampling.warp(jnp.asarray(random_logits), scfg))
    for row, logits in zip(warped, random_logits, strict=True):
        p = np_warped_probs(logits, scfg.temperature, scfg.top_k, scfg.top_p)
        np.testing.assert_array_equal(np.isfinite(row), p > 0)
        np.testing.assert_allclose(np.exp(row), p, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sampling.probs(jnp.asarray(random_logits), scfg)), np.exp(warped), rtol=1e-6)


@pytest.mark.parametrize(
    "scfg",
    [SamplingConfig(1.0, top_k=40), SamplingConfig(0.7, top_p=0.6), SamplingConfig(1.3, top_k=100, top_p=0.9)],
    ids=str,
)
def test_warp_keeps_ties_and_drops_masked_tokens(scfg):
    """A [B, T, V] batch with many tied logits and -inf ones: every token tied with the
    last one needed is kept (top-k: the k-th largest; top-p: the tokens strictly more
    likely hold < top_p), -inf never is."""
    rng = np.random.default_rng(3)
    logits = (np.round(rng.standard_normal((2, 3, 500)) * 20) / 20).astype(np.float32)  # ~140 distinct values.
    logits[..., ::7] = -np.inf
    got = np.exp(np.asarray(sampling.warp(jnp.asarray(logits), scfg), np.float64))
    for idx in np.ndindex(logits.shape[:-1]):
        z = logits[idx].astype(np.float64) / scfg.temperature
        if scfg.top_k:
            z = np.where(z < np.sort(z)[-scfg.top_k], -np.inf, z)
        p = np.exp(z - z.max())
        p /= p.sum()
        if scfg.top_p < 1.0:
            mass_above = np.array([p[p > q].sum() for q in p])
            assert np.all(np.abs(mass_above - scfg.top_p) > 1e-5)  # Away from float32 rounding.
            p = np.where(mass_above < scfg.top_p, p, 0.0)
            p /= p.sum()
        kept = p > 0
        assert 1 < kept.sum() < np.isfinite(logits[idx]).sum()  # The thresholds do cut.
        np.testing.assert_array_equal(got[idx] > 0, kept)
        np.testing.assert_allclose(got[idx], p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scfg", fast_first(WARPS, 2), ids=str)
def test_choose_never_leaves_the_support(random_logits, scfg):
    n = 4096
    for i, logits in enumerate(random_logits):
        p = np_warped_probs(logits, scfg.temperature, scfg.top_k, scfg.top_p)
        batch = jnp.broadcast_to(jnp.asarray(logits), (n, logits.size))
        drawn = np.asarray(sampling.choose(jax.random.key(i), batch, scfg))
        assert drawn.shape == (n,) and drawn.dtype == np.int32
        assert set(drawn.tolist()) <= set(np.flatnonzero(p).tolist())
        # And it does sample: every token with probability >= 2% shows up.
        assert set(np.flatnonzero(p >= 0.02).tolist()) <= set(drawn.tolist())


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_scaling(random_logits, temperature):
    scfg = SamplingConfig(temperature=temperature)
    got = np.asarray(sampling.warp(jnp.asarray(random_logits), scfg))
    z = random_logits.astype(np.float64) / temperature
    expected = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Empirical frequencies follow softmax(logits / T).
    logits = random_logits[2]
    drawn = np.asarray(sampling.choose(jax.random.key(5), jnp.broadcast_to(logits, (8192, logits.size)), scfg))
    p = np.exp(expected[2])
    counts = np.bincount(drawn, minlength=logits.size).astype(np.float64)
    expected_counts = p * drawn.size
    rare = expected_counts < 5  # Pool the rare tail into one cell (the chi-square needs expected counts >= ~5).
    if rare.any():
        counts = np.append(counts[~rare], counts[rare].sum())
        expected_counts = np.append(expected_counts[~rare], expected_counts[rare].sum())
    assert scipy.stats.chisquare(counts, expected_counts).pvalue > 1e-3


def test_greedy_is_argmax(random_logits):
    scfg = SamplingConfig()
    assert scfg.greedy
    logits = jnp.asarray(random_logits)
    np.testing.assert_array_equal(
        np.asarray(sampling.choose(jax.random.key(0), logits, scfg)), random_logits.argmax(-1)
    )
    np.testing.assert_array_equal(np.asarray(sampling.probs(logits, scfg)), np.eye(60)[random_logits.argmax(-1)])


@pytest.mark.parametrize("vocab", [49152, 1000, 5, 128])
def test_chunked_argmax_is_numpys_first_index_of_the_maximum(vocab):
    """Ties (the first index wins, across and within chunks), a maximum in the padded last chunk,
    -inf everywhere, and NaN (argmax's first NaN) give numpy's argmax."""
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((6, vocab)).astype(np.float32)
    x[1, [vocab // 3, vocab - 1]] = 9.0  # Tie across chunks (or within one, for small vocabularies).
    x[2, -1] = 9.0  # The last token: the padded chunk's for a vocabulary not a multiple of 128.
    x[3] = -np.inf
    x[4, [vocab // 2, vocab - 1]] = np.nan
    x[5] = np.round(x[5])  # Many ties.
    got = np.asarray(jax.jit(sampling.argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, x.argmax(-1))
    np.testing.assert_array_equal(np.asarray(sampling.argmax(jnp.asarray(x[None]))), x.argmax(-1)[None])


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def no_compute(monkeypatch):
    """Make any model compute fail loudly: errors must come from validation, before prefill."""

    def boom(*args, **kwargs):
        raise AssertionError("compute started before the request was validated")

    monkeypatch.setattr(decoding, "prefill", boom)
    monkeypatch.setattr(decoding, "ar_init", boom)
    monkeypatch.setattr(decoding, "ar_decode", boom)


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([], {}, r"prompts must be a non-empty list"),
        ("hello", {}, r"prompts must be a non-empty list of token-id lists"),
        ([[1, 2], []], {}, r"prompt 1 is empty"),
        ([[1, 2, 97]], {}, r"prompt 0 has token ids outside \[0, 97\)"),
        ([[1, -1]], {}, r"prompt 0 has token ids outside \[0, 97\)"),
        ([[1] * 65], {}, r"prompt 0 has 65 tokens; with max_new_tokens=4 it exceeds the model's context of 64"),
        ([[1], [1] * 60], {}, r"prompt 1 has 60 tokens; with max_new_tokens=5 it exceeds .* context of 64"),
        ([[1] * 60, [1]], {"max_new_tokens": [5, 4]}, r"prompt 0 has 60 tokens; with max_new_tokens=5 it exceeds"),
        ([[1, 2]], {"max_new_tokens": 0}, r"max_new_tokens must be >= 1"),
        ([[1, 2]], {"max_new_tokens": -3}, r"max_new_tokens must be >= 1"),
        ([[1, 2], [3]], {"max_new_tokens": [4, 0]}, r"max_new_tokens must be >= 1"),
    ],
)
def test_bad_requests_fail_before_compute(tiny, no_compute, prompts, kwargs, message):
    cfg, params = tiny
    kwargs = {"max_new_tokens": 5 if len(prompts) > 1 else 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_ar(cfg, params, prompts, **kwargs)


def test_longest_allowed_request_is_accepted(tiny, prompts, greedy_alone):
    """prompt + max_new_tokens == context is fine (same decode shapes as the batch test)."""
    cfg, params = tiny
    long_prompt = random_tokens(cfg.vocab_size, (cfg.max_seq_len - 12,), seed=1).tolist()
    out = generate_ar(cfg, params, [long_prompt, *prompts[:3]], 12)
    assert len(out.tokens[0]) == 12
    assert out.tokens[1:] == greedy_alone[:3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, r"temperature must be >= 0, got -0.5"),
        ({"temperature": float("nan")}, r"temperature must be >= 0"),
        ({"temperature": 1.0, "top_k": -1}, r"top_k must be >= 0"),
        ({"temperature": 1.0, "top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"temperature": 1.0, "top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"temperature": 1.0, "top_p": -0.2}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_config_fails_before_compute(tiny, no_compute, kwargs, message):
    cfg, params = tiny
    with pytest.raises(ValueError, match=message):
        generate_ar(cfg, params, [[1, 2]], 4, sampling=SamplingConfig(**kwargs))


@pytest.mark.parametrize(
    ("prompts", "max_new", "message"),
    [
        ([[1, 2]], 2.5, r"max_new_tokens must be .*integer"),
        ([[1.9, 2]], 4, r"prompt 0 has non-integer token ids"),
        ([[1], [2]], [3, 4, 5], r"max_new_tokens has 3 entries for 2 prompts"),
    ],
)
def test_make_request_rejects_non_integers_and_misshaped_budgets(tiny, no_compute, prompts, max_new, message):
    cfg, params = tiny
    with pytest.raises(ValueError, match=message):
        generate_ar(cfg, params, prompts, max_new)
