"""The CPU small-block kernel (cpu_kernel.py): XLA's dot within float error, a row's result
independent of the row count, where model.dense uses it, and the fallback to XLA's dot."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesd_jax import cpu_kernel, eesd, exits, generate, model, sharding

needs_kernel = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_kernel.available(),
    reason=f"CPU kernel not in use: {cpu_kernel.unavailable_reason()}",
)
DTYPES = [jnp.float32, jnp.bfloat16]
# (rows N, D, O): odd D and O (a zero-padded last chunk, a lone last weight row), D < 8, the
# bundled model's widths, and 12-16 rows (two row groups, over blocks of weight rows and a part block).
SHAPES = [(1, 5, 3), (2, 13, 7), (3, 64, 41), (7, 576, 33), (8, 1536, 9), (16, 33, 17), (1, 96, 130), (12, 70, 131)]


def _data(n, d, o, w_dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((o, d)), w_dtype)
    return x, w


def _uses_kernel(fn, *args) -> bool:
    return cpu_kernel.TARGET in jax.jit(fn).lower(*args).as_text()


@needs_kernel
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_xla_dot_within_float_error(shape, w_dtype):
    x, w = _data(*shape, w_dtype)
    got = np.asarray(jax.jit(cpu_kernel.matmul)(x, w), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w.astype(jnp.float32), np.float64)
    exact = x64 @ w64.T
    # The classic bound for a float32 dot of length D: D * eps * sum |x_d w_d|.
    bound = shape[1] * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w64).T)
    assert (np.abs(got - exact) <= bound).all()
    xla = np.asarray(jnp.einsum("nd,od->no", x, w, preferred_element_type=jnp.float32), np.float64)
    assert (np.abs(got - xla) <= 2 * bound).all()


@needs_kernel
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_a_rows_result_does_not_depend_on_the_row_count(w_dtype):
    """Bit for bit: row i of a call of n rows equals the same row alone or in any other block."""
    rows = model.SMALL_BLOCK
    x, w = _data(rows, 100, 131, w_dtype)  # Over 8 rows: weight rows in blocks, the last one part full.
    call = jax.jit(cpu_kernel.matmul)
    full = np.asarray(call(x, w))
    for n in range(1, rows + 1):
        for start in {0, rows - n, (rows - n) // 2}:
            np.testing.assert_array_equal(np.asarray(call(x[start : start + n], w)), full[start : start + n])


@needs_kernel
@pytest.mark.skipif(
    "avx512f" not in (pathlib.Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""),
    reason="the CPU has no AVX-512: the AVX2 path is the one the other tests run",
)
def test_the_avx2_path_on_an_avx512_cpu():
    """The tests above, in a process where EESD_CPU_KERNEL_AVX512=0 keeps the kernel on AVX2."""
    env = {**os.environ, "EESD_CPU_KERNEL_AVX512": "0"}
    select = "float_error or does_not_depend_on_the_row_count"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", select],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout


@needs_kernel
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 8, 16])
def test_one_call_over_several_weights_equals_a_call_each(n, w_dtype):
    """Bit for bit, with weights of sizes that split the threads' chunks inside and across weights."""
    x, _ = _data(n, 72, 1, w_dtype)
    ws = tuple(_data(1, 72, o, w_dtype, seed=o)[1] for o in (200, 13, 64, 1))
    many = jax.jit(cpu_kernel.matmul_many)(x, ws)
    assert len(many) == len(ws)
    for got, w in zip(many, ws, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(cpu_kernel.matmul)(x, w)))
    x_btd = x.reshape(1, n, 72)
    assert _uses_kernel(lambda x, ws: model.dense_many(x, ws), x_btd, ws)
    mixed = [ws[0], ws[1].astype(jnp.float16)]  # Not one kernel dtype: XLA's dot for each, same values.
    for got, w in zip(model.dense_many(x_btd, mixed, jnp.float32), mixed, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(model.dense(x_btd, w, jnp.float32)))


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_rows_round_identically_in_ar_and_verify_shapes(dtype):
    x, w = _data(9, 48, 24, dtype)
    x_btd = x.astype(dtype).reshape(1, 9, 48)
    dense = jax.jit(model.dense, static_argnums=2)
    block = np.asarray(dense(x_btd, w, None))
    assert _uses_kernel(lambda a, b: model.dense(a, b), x_btd, w)
    assert block.dtype == jnp.dtype(dtype)
    for t in range(9):
        np.testing.assert_array_equal(np.asarray(dense(x_btd[:, t : t + 1], w, None))[0, 0], block[0, t])
    logits = dense(x_btd, w, jnp.float32)  # The LM head's float32 logits.
    assert logits.dtype == jnp.float32


@needs_kernel
def test_dense_picks_the_kernel_only_for_small_blocks_on_one_device(monkeypatch):
    w = jnp.ones((24, 16), jnp.float32)
    dense = lambda x, w: model.dense(x, w)
    assert _uses_kernel(dense, jnp.ones((1, 1, 16)), w)  # AR / draft step.
    assert _uses_kernel(dense, jnp.ones((2, model.SMALL_BLOCK // 2, 16)), w)  # SMALL_BLOCK rows.
    assert not _uses_kernel(dense, jnp.ones((1, model.SMALL_BLOCK + 1, 16)), w)  # Prefill.
    assert not _uses_kernel(dense, jnp.ones((1, 2, 16)), w.astype(jnp.float16))  # Not a kernel dtype.
    with jax.set_mesh(sharding.make_mesh()):  # A mesh: XLA's dot, which the partitioner can shard.
        assert not _uses_kernel(dense, jnp.ones((1, 2, 16)), w)
    with monkeypatch.context() as m:  # Several devices: a jit may shard its inputs without a mesh.
        m.setattr(jax, "device_count", lambda: 8)
        assert not _uses_kernel(dense, jnp.ones((1, 2, 16)), w)
    monkeypatch.setenv("EESD_CPU_KERNEL", "0")
    assert not _uses_kernel(dense, jnp.ones((1, 2, 16)), w)


@pytest.mark.parametrize("why", ["env", "missing"])
def test_fallback_is_xlas_dot(monkeypatch, why):
    if why == "env":
        monkeypatch.setenv("EESD_CPU_KERNEL", "0")
        assert "off" in cpu_kernel.status()
    else:
        monkeypatch.setattr(cpu_kernel, "unavailable_reason", lambda: cpu_kernel.load(None))
        assert not cpu_kernel.available() and "unavailable" in cpu_kernel.status()
    x, w = _data(4, 24, 10, jnp.float32)
    x_btd = x.reshape(2, 2, 24)
    dense = lambda x, w: model.dense(x, w, jnp.float32)
    assert not _uses_kernel(dense, x_btd, w)
    want = jnp.einsum("od,btd->obt", w, x_btd, preferred_element_type=jnp.float32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(jax.jit(dense)(x_btd, w)), np.asarray(want))


def test_load_reports_why_not(tmp_path):
    assert "not built" in cpu_kernel.load(None)
    (tmp_path / "bad.so").write_text("not a library")
    assert "cannot load" in cpu_kernel.load(tmp_path / "bad.so")


@needs_kernel
def test_gradients_flow_through_the_kernel():
    x, w = _data(3, 20, 6, jnp.float32)

    def loss(x, w, use):
        ys = cpu_kernel.matmul_many(x, (w, 2 * w)) if use else (x @ w.T, x @ (2 * w).T)
        return jnp.sum(jnp.sin(ys[0]) * ys[1])

    got = jax.grad(loss, argnums=(0, 1))(x, w, True)
    want = jax.grad(loss, argnums=(0, 1))(x, w, False)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_greedy_eesd_equals_ar_on_the_kernel(tiny):
    cfg, params = tiny
    x = jnp.ones((1, 1, cfg.d_model), cfg.jnp_dtype)
    assert _uses_kernel(lambda x: model.lm_head(params, x), x)
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43]]
    exit_params = exits.init_exit(cfg, params, exits.ExitConfig(1))
    ar = generate.generate_ar(cfg, params, prompts, 24)
    es = generate.generate_eesd(cfg, params, exit_params, eesd.EESDConfig(exit_layer=1, max_draft=4), prompts, 24)
    assert es.tokens == ar.tokens
