"""The CPU attention kernel (cpu_kernel.attention): XLA's attention within float error for causal,
tree and two-source masks, a query's result independent of the block it is in (AR step and
verification alike), where model.attend_cache uses it, and the fallback to XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesd_jax import cpu_kernel, model, sharding
from eesd_jax.kv_cache import set_slots

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason=f"CPU kernel not in use: {cpu_kernel.unavailable_reason()}",
)
L, LAYER = 3, 1
# (B, T, S, H, K): one and two rows of a batch, AR / verify / SMALL_BLOCK blocks, short and long caches,
# GQA (SmolLM2's 9 / 3) and plain multi-head.
SHAPES = [(1, 1, 16, 9, 3), (2, 3, 64, 4, 4), (1, 8, 512, 9, 3), (2, 8, 40, 9, 3), (1, 16, 100, 4, 4)]


def _case(B, T, S, H, K, dtype, seed=0, E=64):
    """q [B, T, H, E] float32; caches [L, B, K, S, E] and the block's keys/values [B, T, K, E] in dtype;
    each row's block starting at a random first position (at least 0, so rows may see only themselves)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape)
    q = jnp.asarray(normal(B, T, H, E), jnp.float32)
    k, v = (jnp.asarray(normal(L, B, K, S, E), dtype) for _ in range(2))
    k_new, v_new = (jnp.asarray(normal(B, T, K, E), dtype) for _ in range(2))
    first_b = jnp.asarray(rng.integers(0, S - T + 1, B))
    first_b = first_b.at[0].set(0)  # A row whose first query sees one slot.
    return q, k, v, (k_new, v_new), first_b[:, None] + jnp.arange(T)


def _tree_masks(first_b, T, S, seed):
    """A random draft tree over the block: each token's parent is an earlier one; it sees the cache
    before the block and its ancestors (itself included). Returns (visible over the block's slots
    as `block` takes it [B, T, S], the cache part [B, T, S], the block part [B, T, T])."""
    rng = np.random.default_rng(seed)
    B = first_b.shape[0]
    anc = np.zeros((B, T, T), bool)
    for b in range(B):
        for t in range(T):
            anc[b, t, t] = True
            if t:
                anc[b, t] |= anc[b, rng.integers(0, t)]
    old = np.arange(S)[None, None, :] < np.asarray(first_b)[:, None, None]
    old = np.broadcast_to(old, (B, T, S))
    in_block = np.zeros((B, T, S), bool)
    for b in range(B):
        f = int(first_b[b])
        in_block[b, :, f : f + T] = anc[b]
    return jnp.asarray(old | in_block), jnp.asarray(old), jnp.asarray(anc)


def _written(cache, new, positions_bt):
    """The cache with the block's keys/values written at their positions in every layer (as `block` does)."""
    rows = jnp.arange(positions_bt.shape[0])[:, None]
    return cache.at[:, rows, :, positions_bt].set(new[:, :, None].astype(cache.dtype))  # Update [B, T, L, K, E].


def _all_masks(positions_bt, S, seed):
    """(name, single-source visible, cache part, block part) for causal and tree blocks."""
    first_b = positions_bt[:, 0]
    causal = jnp.arange(S)[None, None, :] <= positions_bt[:, :, None]
    old = jnp.broadcast_to(jnp.arange(S)[None, None, :] < first_b[:, None, None], causal.shape)
    new = positions_bt[:, None, :] <= positions_bt[:, :, None]
    return [("causal", causal, old, new), ("tree", *_tree_masks(first_b, positions_bt.shape[1], S, seed))]


def _uses_kernel(fn, *args) -> bool:
    return cpu_kernel.ATTENTION_TARGET in jax.jit(fn).lower(*args).as_text()


attend = jax.jit(model.attend_cache)
attend_xla = jax.jit(model._attend_xla)
kernel = jax.jit(cpu_kernel.attention)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_xla_attention_within_float_error(shape, dtype):
    """Against XLA's attention in float32 over the same (bfloat16-valued) keys/values: one source
    (`block`, the block written into the cache) and two (`block_readonly`), causal and tree masks."""
    B, T, S, H, K = shape
    q, k, v, (k_new, v_new), positions = _case(B, T, S, H, K, dtype, seed=S)
    k_all, v_all = _written(k, k_new, positions), _written(v, v_new, positions)
    f32 = lambda a: a.astype(jnp.float32)
    for name, visible, old, new in _all_masks(positions, S, seed=T):
        one = kernel(q, k_all, v_all, LAYER, visible)
        two = kernel(q, k, v, LAYER, old, (k_new, v_new, new))
        assert one.dtype == two.dtype == jnp.float32
        want = np.asarray(attend_xla(q, f32(k_all), f32(v_all), LAYER, visible, None))
        np.testing.assert_allclose(np.asarray(one).reshape(want.shape), want, rtol=2e-6, atol=2e-6, err_msg=name)
        want = np.asarray(attend_xla(q, f32(k), f32(v), LAYER, old, (f32(k_new), f32(v_new), new)))
        np.testing.assert_allclose(np.asarray(two).reshape(want.shape), want, rtol=2e-6, atol=2e-6, err_msg=name)


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attend_cache_runs_the_kernel_in_the_cache_dtype(dtype):
    B, T, S, H, K = 2, 4, 48, 9, 3
    q, k, v, new, positions = _case(B, T, S, H, K, dtype)
    _, visible, old, new_btt = _all_masks(positions, S, 0)[0]
    for args in [(q, k, v, LAYER, visible, None), (q, k, v, LAYER, old, (*new, new_btt))]:
        assert _uses_kernel(model.attend_cache, *args)
        got, want = attend(*args), attend_xla(*args)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape == (B, T, H * 64)
        # bfloat16: XLA weights the values in bfloat16, the kernel in float32 (one rounding at the end).
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@needs_kernel
def test_a_row_that_sees_nothing_averages_every_slot_as_xla_does():
    q, k, v, new, positions = _case(1, 2, 24, 4, 4, jnp.float32)
    none = jnp.zeros((1, 2, 24), bool)
    np.testing.assert_allclose(
        np.asarray(kernel(q, k, v, LAYER, none)).reshape(1, 2, -1),
        np.asarray(attend_xla(q, k, v, LAYER, none, None)),
        rtol=2e-6,
        atol=2e-6,
    )


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_query_rounds_identically_in_an_ar_step_and_in_a_verification(dtype):
    """Bit for bit: token t of a verification (cache before the block + the block's own keys, T = 8)
    equals the same query in a T = 1 step over the cache with the block written, in a T = 8 step,
    and alone in a batch of one."""
    B, T, S, H, K = 2, 8, 96, 9, 3
    q, k, v, (k_new, v_new), positions = _case(B, T, S, H, K, dtype, seed=3)
    k_all, v_all = _written(k, k_new, positions), _written(v, v_new, positions)
    for name, visible, old, new in _all_masks(positions, S, seed=5):
        verify = np.asarray(kernel(q, k, v, LAYER, old, (k_new, v_new, new)))
        block = np.asarray(kernel(q, k_all, v_all, LAYER, visible))
        np.testing.assert_array_equal(block, verify, err_msg=name)
        for t in range(T):
            step = kernel(q[:, t : t + 1], k_all, v_all, LAYER, visible[:, t : t + 1])
            np.testing.assert_array_equal(np.asarray(step)[:, 0], verify[:, t], err_msg=name)
        alone = kernel(q[1:], k[:, 1:], v[:, 1:], LAYER, old[1:], (k_new[1:], v_new[1:], new[1:]))
        np.testing.assert_array_equal(np.asarray(alone)[0], verify[1], err_msg=name)


@needs_kernel
def test_gradients_flow_through_the_kernel():
    q, k, v, new, positions = _case(1, 3, 20, 4, 4, jnp.float32)
    _, visible, old, new_btt = _all_masks(positions, 20, 0)[0]

    def loss(q, k, v, use):
        o = (model.attend_cache if use else model._attend_xla)(q, k, v, LAYER, old, (*new, new_btt))
        return jnp.sum(jnp.sin(o))

    assert _uses_kernel(lambda q, k, v: loss(q, k, v, True), q, k, v)
    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, True)
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, False)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_the_kernel_serves_only_small_blocks_on_one_device(monkeypatch):
    q, k, v, _, positions = _case(1, 2, 40, 4, 4, jnp.float32)
    visible = _all_masks(positions, 40, 0)[0][1]
    uses = lambda q, vis: _uses_kernel(lambda q, vis: model.attend_cache(q, k, v, LAYER, vis), q, vis)  # Fresh jits.
    assert uses(q, visible)
    long_q = jnp.zeros((1, model.SMALL_BLOCK + 1, 4, 64))
    assert not uses(long_q, jnp.ones((1, model.SMALL_BLOCK + 1, 40), bool))  # Prefill.
    assert not _uses_kernel(lambda q: model.attend_cache(q, k.astype(jnp.float16), v, LAYER, visible), q)
    with jax.set_mesh(sharding.make_mesh()):  # A mesh: XLA's dots, which the partitioner can shard.
        assert not uses(q, visible)
    with monkeypatch.context() as m:  # Several devices: a jit may shard its inputs without a mesh.
        m.setattr(jax, "device_count", lambda: 8)
        assert not uses(q, visible)
    monkeypatch.setenv("EESD_CPU_KERNEL", "0")
    assert not uses(q, visible)


@pytest.mark.parametrize("why", ["env", "missing"])
def test_fallback_is_xlas_attention(monkeypatch, why):
    if why == "env":
        monkeypatch.setenv("EESD_CPU_KERNEL", "0")
    else:
        monkeypatch.setattr(cpu_kernel, "unavailable_reason", lambda: cpu_kernel.load(None))
    q, k, v, new, positions = _case(2, 3, 32, 9, 3, jnp.float32)
    _, visible, old, new_btt = _all_masks(positions, 32, 0)[0]
    for args in [(q, k, v, LAYER, visible, None), (q, k, v, LAYER, old, (*new, new_btt))]:
        fresh = lambda *a: model.attend_cache(*a)  # A fresh jit: the flag is read at trace time.
        assert not _uses_kernel(fresh, *args)
        got = jax.jit(fresh)(*args)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(attend_xla(*args)))


@needs_kernel
def test_bfloat16_cache_writes_on_the_kernel_equal_xlas_scatter():
    """Bit for bit, as `block` (one layer, [B, T] slots: consecutive, a tree's, past the cache and
    negative) and `write_layers` ([n, B, T]) write; gradients as through XLA's scatter."""
    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.standard_normal((L, 2, 3, 20, 16)), jnp.bfloat16)
    rows = jnp.arange(2)[:, None]
    cases = [
        (1, rows, jnp.asarray([[4, 5, 6], [0, 1, 2]])),
        (2, rows, jnp.asarray([[9, 3, 17], [19, 20, 25]])),  # 20, 25: past the cache, dropped.
        (0, rows, jnp.asarray([[-1, 2, 3], [5, -3, 7]])),  # Negative: from the end, as jnp indexes.
        (jnp.arange(1, 3)[:, None, None], rows[None], jnp.asarray([[[4, 5, 6], [0, 1, 2]]])),
    ]
    write = lambda c, layer, r, s, u: set_slots(c, (layer, r, slice(None), s), u)
    xla = lambda c, layer, r, s, u: c.at[layer, r, :, s].set(u.astype(c.dtype), mode="drop")
    for layer, r, slots in cases:
        shape = jnp.broadcast_shapes(jnp.shape(layer), r.shape, slots.shape) + (3, 16)
        update = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        assert cpu_kernel.WRITE_TARGET in jax.jit(write).lower(cache, layer, r, slots, update).as_text()
        np.testing.assert_array_equal(
            np.asarray(jax.jit(write)(cache, layer, r, slots, update)),
            np.asarray(jax.jit(xla)(cache, layer, r, slots, update)),
        )
    update = jnp.asarray(rng.standard_normal((2, 3, 3, 16)), jnp.bfloat16)
    loss = lambda w: lambda c, u: jnp.sum(jnp.sin(w(c, *cases[0], u).astype(jnp.float32)) * 1.5)
    got = jax.grad(loss(write), argnums=(0, 1))(cache, update)
    want = jax.grad(loss(xla), argnums=(0, 1))(cache, update)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert cpu_kernel.WRITE_TARGET not in jax.jit(write).lower(cache.astype(jnp.float32), *cases[0], update).as_text()
