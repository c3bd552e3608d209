"""The forward pass: equal to transformers' PyTorch models, and cached decoding equal to a full forward."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    REFERENCE_SOURCES,
    fast_first,
    full_forward,
    golden_hf,
    random_tokens,
    torch_logits,
    torch_model,
    transformers_view,
)

from eesd_jax import decoding, loading, model
from eesd_jax.kv_cache import init_cache, set_slots

# ----------------------------------------------------------------------------- vs transformers

HF_KINDS = sorted(golden_hf()[1])  # The recorded checkpoints with transformers' logits.


def transformers_reference(hf_models, kind, source, shards=1):
    """(folder, transformers' reading of its config, tokens, transformers' logits at positions, positions)
    for a recorded checkpoint: as make_golden.py recorded them, or live from transformers' PyTorch model."""
    record, folder = hf_models(kind, shards)
    recorded, logits = golden_hf()
    tokens = np.asarray(recorded["tokens"])
    if source == "live":
        hf = torch_model(folder)
        view, ref, positions = transformers_view(hf.config), torch_logits(hf, tokens), range(tokens.shape[1])
        return folder, view, tokens, ref, list(positions)
    return folder, record["transformers_view"], tokens, logits[kind], recorded["positions"]


@pytest.mark.parametrize("source", REFERENCE_SOURCES)
@pytest.mark.parametrize("kind", HF_KINDS)
def test_forward_matches_transformers(hf_models, kind, source):
    folder, view, tokens, ref, positions = transformers_reference(hf_models, kind, source)
    loaded = loading.load_model(folder)
    cfg = loaded.cfg

    # The config is read as transformers reads it.
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim"):
        assert getattr(cfg, field) == view[field], field
    assert cfg.rope_theta == pytest.approx(view["rope_theta"])
    assert cfg.rms_eps == pytest.approx(view["rms_eps"])
    assert cfg.tie_embeddings == view["tie_embeddings"]
    assert ("lm_head" in loaded.params) == (not view["tie_embeddings"])
    assert cfg.qkv_bias == kind.startswith("qwen2")

    ours = full_forward(cfg, loaded.params, tokens)[:, positions]
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 0.5  # Non-trivial logits, so the tolerance means something.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("source", REFERENCE_SOURCES)
def test_sharded_checkpoint_matches_transformers(hf_models, source):
    folder, _, tokens, ref, positions = transformers_reference(hf_models, "llama_gqa", source, shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards

    loaded = loading.load_model(folder)
    np.testing.assert_allclose(full_forward(loaded.cfg, loaded.params, tokens)[:, positions], ref, rtol=0, atol=1e-5)
    # Same weights as the single-file save of the same model.
    unsharded = loading.load_model(hf_models("llama_gqa")[1])
    jax.tree.map(np.testing.assert_array_equal, loaded.params, unsharded.params)


def test_fingerprint_identifies_weights(hf_models):
    a = loading.load_model(hf_models("llama_gqa")[1])
    assert loading.load_model(hf_models("llama_gqa")[1]).fingerprint == a.fingerprint
    assert loading.load_model(hf_models("llama_mha")[1]).fingerprint != a.fingerprint


# ----------------------------------------------------------------------------- cached == uncached

# One jitted step for every test below: calls of equal shapes share a compile.
forward_step = jax.jit(model.forward, static_argnums=0)
CACHE_SLOTS = 40  # Longer than any sequence here: unwritten slots must stay invisible.


@pytest.mark.parametrize(
    ("prefill_len", "layout"), [(1, "stacked"), (3, "stacked"), (7, "stacked"), (16, "stacked"), (3, "unstacked")]
)
def test_incremental_decoding_equals_full_forward(tiny, prefill_len, layout):
    """Prefill, then alternating 1-token and 3-token steps, equals one (stacked) forward over everything."""
    cfg, params = tiny
    sizes = [prefill_len] + [1, 3] * 4
    total = sum(sizes)
    tokens = random_tokens(cfg.vocab_size, (2, total), seed=prefill_len)
    expected = full_forward(cfg, params, tokens)

    if layout == "unstacked":
        params = model.unstack(params)
        assert isinstance(params["layers"], list) and len(params["layers"]) == cfg.n_layers
    cache = init_cache(cfg, 2, CACHE_SLOTS)
    got, start = [], 0
    for size in sizes:
        pos = jnp.broadcast_to(jnp.arange(start, start + size), (2, size))
        logits, cache = forward_step(cfg, params, jnp.asarray(tokens[:, start : start + size], jnp.int32), pos, cache)
        got.append(np.asarray(logits))
        start += size
    # Equal up to float32 rounding: the softmax sums over a different number of masked
    # slots, and XLA picks a different matmul kernel (summation order) per block size.
    # 64 ulps of the largest logit (~3e-5 here); a wrong cache slot or position is off by ~1.
    scale = np.abs(expected).max()
    assert scale > 1.0
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, rtol=0, atol=64 * np.spacing(np.float32(scale)))


def test_ragged_rows_decode_like_each_row_alone(tiny):
    """Rows at different positions in one batch: right-padded prefill, then 1-token steps per row."""
    cfg, params = tiny
    lens, n_steps = [11, 2], 8
    seqs = random_tokens(cfg.vocab_size, (2, max(lens) + n_steps), seed=10)
    padded = np.zeros((2, 16), np.int32)
    for b, n in enumerate(lens):
        padded[b, :n] = seqs[b, :n]
    cache, logits, _ = decoding.prefill(cfg, params, jnp.asarray(padded), jnp.asarray(lens, jnp.int32), CACHE_SLOTS)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
    got = [np.asarray(logits)]
    for t in range(n_steps):
        pos = np.array(lens)[:, None] + t
        toks = np.take_along_axis(seqs, pos, axis=1)
        out, cache = forward_step(cfg, params, jnp.asarray(toks, jnp.int32), jnp.asarray(pos, jnp.int32), cache)
        got.append(np.asarray(out[:, 0]))
    got = np.stack(got, axis=1)  # [B, 1 + n_steps, V]
    full = full_forward(cfg, params, seqs)  # Each row's own sequence, no padding in the middle.
    for b, n in enumerate(lens):
        np.testing.assert_allclose(got[b], full[b, n - 1 : n + n_steps], rtol=1e-5, atol=1e-5)


def test_prefill_split_equals_unsplit(tiny):
    """Prefill through (layers [0, n), layers [n, L)) gives the same cache and logits, and the exit hidden."""
    cfg, params = tiny
    tokens = jnp.asarray(random_tokens(cfg.vocab_size, (2, 16), seed=3), jnp.int32)
    lens = jnp.asarray([16, 9], jnp.int32)
    cache, logits, hidden = decoding.prefill(cfg, params, tokens, lens, CACHE_SLOTS)
    assert hidden is None
    np.testing.assert_allclose(
        np.asarray(logits), full_forward(cfg, params, tokens)[[0, 1], [15, 8]], rtol=1e-5, atol=1e-5
    )
    split = model.split_layers(params["layers"], 1)
    cache2, logits2, (hidden2, _) = decoding.prefill(cfg, params, tokens, lens, CACHE_SLOTS, split)
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache2.k), np.asarray(cache.k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache2.v), np.asarray(cache.v), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache2.lengths), np.asarray(lens))

    # The hidden state after layer 1: model.block on layer 0 directly (not through run_layers).
    layer0 = jax.tree.map(lambda w: w[0], params["layers"])
    fresh = init_cache(cfg, 2, 16, layers=1)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    x, _, _ = model.block(cfg, layer0, model.embed(params, tokens), positions, fresh.k, fresh.v, 0)
    np.testing.assert_allclose(np.asarray(hidden2), np.asarray(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", fast_first(["unstacked", "stacked"]))
def test_readonly_block_equals_written_block(tiny, layout):
    """run_layers_readonly + write_layers == run_layers for a block after ragged prefixes.

    The cache holds stale garbage past each row's length, which the read-only
    path must not see (the written path overwrites it before attending).
    """
    cfg, params = tiny
    layers = params["layers"] if layout == "stacked" else model.unstack(params)["layers"]
    B, T, first = 2, 4, 1
    _, upper = model.split_layers(layers, first)
    rng = np.random.default_rng(0)
    cache = init_cache(cfg, B, CACHE_SLOTS)
    shape = cache.k.shape
    cache = cache.replace(
        k=jnp.asarray(rng.normal(size=shape), jnp.float32), v=jnp.asarray(rng.normal(size=shape), jnp.float32)
    )
    pos0 = jnp.asarray([7, 3], jnp.int32)
    positions = pos0[:, None] + jnp.arange(T)[None]
    x = jnp.asarray(rng.normal(size=(B, T, cfg.d_model)), jnp.float32)

    want_x, want_cache = model.run_layers(cfg, upper, x, positions, cache, first)
    got_x, k_new, v_new = model.run_layers_readonly(cfg, upper, x, positions, cache, first)
    got_cache = model.write_layers(cache, first, k_new, v_new, positions)
    assert k_new.shape == (cfg.n_layers - first, B, T, cfg.n_kv_heads, cfg.head_dim)
    np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(want_cache.k), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_cache.v), np.asarray(want_cache.v), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_cache.k[:first]), np.asarray(cache.k[:first]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_set_slots_writes_like_a_scatter_and_drops_out_of_range_slots(dtype):
    """The cache write (16-bit floats through their bits) equals `.at[].set(mode="drop")`, bit for bit."""
    rng = np.random.default_rng(0)
    cache_lbkse = jnp.asarray(rng.standard_normal((3, 2, 2, 8, 4)), dtype)
    new_btke = jnp.asarray(rng.standard_normal((2, 3, 2, 4)), jnp.float32)  # Cast to the cache's dtype.
    slots_bt = jnp.asarray([[1, 2, 3], [6, 7, 8]])  # Row 1's last slot is past the cache: dropped.
    index = (1, jnp.arange(2)[:, None], slice(None), slots_bt)
    got = jax.jit(lambda c, u: set_slots(c, index, u))(cache_lbkse, new_btke)
    want = cache_lbkse.at[index].set(new_btke.astype(dtype), mode="drop")
    assert got.dtype == cache_lbkse.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert not np.array_equal(np.asarray(got, np.float32), np.asarray(cache_lbkse, np.float32))
    np.testing.assert_array_equal(np.asarray(got[1, 1, :, 7]), np.asarray(new_btke[1, 1].astype(dtype)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_set_slots_gradients_equal_the_scatters(dtype, monkeypatch):
    """16-bit floats are written through integer bits, which carry no tangents: the write's own are
    XLA's scatter's (training runs an exit over a fresh cache), repeated and dropped slots included."""
    monkeypatch.setenv("EESD_CPU_KERNEL", "0")  # The bits path; the CPU kernel's write has its own test.
    rng = np.random.default_rng(0)
    cache_lbkse = jnp.asarray(rng.standard_normal((2, 2, 1, 4, 2)), dtype)
    new_btke = jnp.asarray(rng.standard_normal((2, 3, 1, 2)), dtype)
    index = (1, jnp.arange(2)[:, None], slice(None), jnp.asarray([[0, 1, 1], [2, 3, 9]]))
    loss = lambda write: lambda c, u: jnp.sum(jnp.sin(write(c, u).astype(jnp.float32)))
    got = jax.jit(jax.grad(loss(lambda c, u: set_slots(c, index, u)), argnums=(0, 1)))(cache_lbkse, new_btke)
    want = jax.jit(jax.grad(loss(lambda c, u: c.at[index].set(u, mode="drop")), argnums=(0, 1)))(cache_lbkse, new_btke)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == cache_lbkse.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    assert np.abs(np.asarray(got[1], np.float32)).sum() > 0


def test_run_layers_rejects_layers_outside_cache(tiny):
    cfg, params = tiny
    cache = init_cache(cfg, 1, 8)
    x = model.embed(params, jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(ValueError, match="outside the cache"):
        model.run_layers(cfg, params["layers"], x, jnp.zeros((1, 1), jnp.int32), cache, first_layer=1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_kv_heads", 3, "multiple of n_kv_heads"),
        ("head_dim", 7, "head_dim must be even"),
        ("n_layers", 0, "n_layers must be >= 1"),
    ],
)
def test_model_config_rejects_bad_shapes(tiny, field, value, message):
    import dataclasses

    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tiny[0], **{field: value})


def _llama3_frequencies_as_transformers_writes_them(head_dim, theta, factor, low, high, original_len):
    """The LLaMA-3.1 rule, written out by wavelength as transformers' _compute_llama3_parameters states it."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
    out = []
    for f in inv_freq:
        wavelen = 2 * np.pi / f
        if wavelen < original_len / high:  # High frequency: unchanged.
            out.append(f)
        elif wavelen > original_len / low:  # Low frequency: slowed by factor.
            out.append(f / factor)
        else:  # In between: blend.
            smooth = (original_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def test_rope_llama3_scaling_matches_the_rule():
    scaling = (8.0, 1.0, 4.0, 8192)
    head_dim, theta = 128, 500000.0
    want = _llama3_frequencies_as_transformers_writes_them(head_dim, theta, *scaling)
    got = np.asarray(model.rope_frequencies(head_dim, theta, scaling))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    plain = np.asarray(model.rope_frequencies(head_dim, theta))
    assert (got < plain).any() and (got == plain).any() and ((got > plain / 8) & (got < plain)).any()  # All 3 bands.
    # rope() rotates each (x1, x2) pair by position * frequency.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 2, head_dim)).astype(np.float32)
    pos = np.array([[0, 5, 3000]])
    out = np.asarray(model.rope(jnp.asarray(x), jnp.asarray(pos), theta, scaling))
    angle = pos[0][:, None, None] * want
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    ref = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)
    np.testing.assert_allclose(out, ref, atol=1e-3)  # float32 angles up to 3e3 rad: ~2e-4 rounding.


def test_rope_scaling_reaches_the_forward(tiny):
    cfg, params = tiny
    scaled = dataclasses.replace(cfg, rope_scaling=(8.0, 1.0, 4.0, 16))
    tokens = random_tokens(cfg.vocab_size, (1, 40), seed=2)
    plain_logits, scaled_logits = full_forward(cfg, params, tokens), full_forward(scaled, params, tokens)
    assert not np.allclose(plain_logits, scaled_logits, atol=1e-3)
    with pytest.raises(ValueError, match="rope_scaling needs factor >= 1"):
        dataclasses.replace(cfg, rope_scaling=(0.5, 1.0, 4.0, 16))
