"""The CPU small-block kernels (eesd_jax/kernels/: matmul and attention) as jax.ffi custom calls.

For decode, verify and draft shapes (rows = B * T <= model.SMALL_BLOCK) XLA:CPU's GEMM costs
2.5-3.7x a one-row GEMV for 2-8 rows; the kernel streams each weight row once for all rows, so
verifying a few tokens costs about one AR step. A row's result depends only on that row, with
the same arithmetic whatever the row count: AR (one row) and verification (k + 1 rows) round
identically. The attention kernel (kernels/attention.cc) reads one layer of the stacked KV cache
in place (XLA copied it out for its dots) and only the slots a query sees, with the same
arithmetic for a query whatever the block: in an AR step and in a verification alike. The
same library writes a bfloat16 cache's new slots in place (`write_slots`; XLA:CPU's bfloat16
scatter converts the whole cache to float32 and back).

The library is built by setup.py at install time (an optional extension: no compiler, no
kernel). It is used only when all of these hold, else `model.dense` and the attention keep XLA:
  * the library was built and this CPU has AVX2 and FMA;
  * EESD_CPU_KERNEL is not "0" (read when a function is traced);
  * the default backend is the CPU, with one device and no mesh set (`jax.set_mesh`): a custom
    call is opaque to the SPMD partitioner (it would gather sharded operands whole), and a jit
    can shard its inputs over several devices without a mesh in context.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
import pathlib

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

TARGET = "eesd_small_matmul"
ATTENTION_TARGET = "eesd_attention"
WRITE_TARGET = "eesd_write_slots"
LIBRARY = "_small_matmul"  # setup.py's extension eesd_jax._small_matmul.
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)


def library_path() -> pathlib.Path | None:
    """The built library inside the package, or None when it was not built."""
    here = pathlib.Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (path := here / f"{LIBRARY}{suffix}").exists():
            return path
    return None


def load(path: pathlib.Path | None) -> str | None:
    """Register the kernel from the library at `path`; None on success, else why not."""
    if path is None:
        return "not built at install (no C++ compiler, or not an x86-64 machine)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        return f"cannot load {path}: {e}"
    if not lib.eesd_small_matmul_supported():
        return "this CPU lacks AVX2/FMA"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.EesdSmallMatmul), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.EesdAttention), platform="cpu")
    jax.ffi.register_ffi_target(WRITE_TARGET, jax.ffi.pycapsule(lib.EesdWriteSlots), platform="cpu")
    return None


@functools.cache
def unavailable_reason() -> str | None:
    """None once the kernel is registered (loads it on the first call, logging the outcome), else why not."""
    why_not = load(library_path())
    log.info("eesd_jax CPU kernel %s", f"unavailable ({why_not})" if why_not else "loaded")
    return why_not


def available() -> bool:
    return unavailable_reason() is None


def status() -> str:
    """One line for logs and `make`: whether small-block matmuls run on the kernel."""
    if not enabled():
        return "eesd_jax CPU kernel: off (EESD_CPU_KERNEL=0), XLA's dot for small blocks"
    why_not = unavailable_reason()
    if why_not:
        return f"eesd_jax CPU kernel: unavailable ({why_not}), XLA's dot for small blocks"
    return (
        "eesd_jax CPU kernel: loaded, small-block matmuls on CPU stream each weight once and attention reads "
        "the cache in place (EESD_CPU_KERNEL=0 disables)"
    )


def enabled() -> bool:
    return os.environ.get("EESD_CPU_KERNEL", "1").strip() != "0"


def applies(rows: int, w_od: jax.Array) -> bool:
    """Whether dense() over `rows` rows with weight w_od runs on the kernel (decided at trace time)."""
    return w_od.ndim == 2 and w_od.dtype in WEIGHT_DTYPES and _runs_here(rows)


def attention_applies(q_bthe: jax.Array, k_lbkse: jax.Array) -> bool:
    """Whether `attention` serves these queries over this stacked cache (decided at trace time)."""
    B, T, H, E = q_bthe.shape
    K = k_lbkse.shape[2]
    return k_lbkse.dtype in WEIGHT_DTYPES and E % 8 == 0 and H % K == 0 and _runs_here(B * T)


def write_applies(cache_lbkse: jax.Array) -> bool:
    """Whether `write_slots` writes this cache: bfloat16 (XLA:CPU scatters it through float32)."""
    return cache_lbkse.dtype == jnp.bfloat16 and cache_lbkse.ndim == 5 and _runs_here(None)


def _runs_here(rows: int | None) -> bool:
    """A small block (any size for rows=None) on one CPU device without a mesh, the kernel loaded and not off."""
    from eesd_jax import model  # The threshold lives with dense(); model imports this module.

    return (
        (rows is None or 1 <= rows <= model.SMALL_BLOCK)
        and enabled()
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
        and jax.sharding.get_abstract_mesh().empty
        and available()
    )


def attention(q_bthe, k_lbkse, v_lbkse, layer_idx, visible_bts, new=None) -> jax.Array:
    """Attention of q [B, T, H, E] over layer `layer_idx` of the stacked cache k, v [L, B, K, S, E]
    (visible_bts [B, T, S]) and, given new = (k, v [B, T, K, E], visible [B, T, T]), the block's own
    keys/values, with one softmax: [B, T, H, E] float32. The cache is read in place, not sliced."""
    B, T, H, E = q_bthe.shape
    _, _, K, _, _ = k_lbkse.shape
    if new is None:
        empty = jnp.zeros((B, 0, K, E), k_lbkse.dtype)
        new = (empty, empty, jnp.zeros((B, T, 0), bool))
    k_new, v_new, visible_new = new
    out = jax.ShapeDtypeStruct((B, T, H, E), jnp.float32)
    call = jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")
    layer = jnp.asarray(layer_idx, jnp.int32)
    cast = lambda a: a.astype(k_lbkse.dtype)
    args = (q_bthe.astype(jnp.float32), k_lbkse, v_lbkse, layer, visible_bts.astype(bool))
    return call(*args, cast(k_new), cast(v_new), visible_new.astype(bool))


def matmul(x_nd: jax.Array, w_od: jax.Array) -> jax.Array:
    """x[N, D] . w[O, D]^T -> [N, O] float32 on the kernel (x taken as float32, w float32 or bfloat16)."""
    return matmul_many(x_nd, (w_od,))[0]


@jax.custom_jvp
def matmul_many(x_nd: jax.Array, ws: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """(x . w^T for w in ws) in one kernel call: [N, O_i] float32 each; the weights share a dtype.

    One call for q/k/v or gate/up: the thread pool is dispatched once and the weights' rows
    are balanced over its threads together. Each output is bitwise `matmul(x, w)`.
    """
    if not available():
        raise RuntimeError("the eesd_jax CPU kernel is unavailable (see the log); use model.dense")
    outs = tuple(jax.ShapeDtypeStruct((x_nd.shape[0], w.shape[0]), jnp.float32) for w in ws)
    return tuple(jax.ffi.ffi_call(TARGET, outs, vmap_method="sequential")(x_nd.astype(jnp.float32), *ws))


@matmul_many.defjvp
def _matmul_many_jvp(primals, tangents):
    """The product rule through XLA's dot (the kernel has no transpose; gradients rarely reach it)."""
    (x, ws), (dx, dws) = primals, tangents
    dot = lambda a, b: jnp.einsum("nd,od->no", a, b, preferred_element_type=jnp.float32)
    return matmul_many(x, ws), tuple(dot(dx, w) + dot(x, dw) for w, dw in zip(ws, dws, strict=True))


def write_slots(cache_lbkse, layer, rows, slots, update) -> jax.Array:
    """cache.at[layer, rows, :, slots].set(update, mode="drop") written in place (the output aliases the
    cache): the indices broadcast together, update [*their shape, K, E] in the cache's dtype."""
    L, B, K, S, E = cache_lbkse.shape
    index = [i.astype(jnp.int32).reshape(-1) for i in jnp.broadcast_arrays(layer, rows, slots)]
    update = update.astype(cache_lbkse.dtype).reshape(-1, K, E)
    out = jax.ShapeDtypeStruct(cache_lbkse.shape, cache_lbkse.dtype)
    call = jax.ffi.ffi_call(WRITE_TARGET, out, input_output_aliases={0: 0}, vmap_method="sequential")
    return call(cache_lbkse, *index, update)
