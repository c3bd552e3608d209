"""The KV cache: an explicit pytree stacked over layers, with per-row lengths."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp

from eesd_jax import cpu_kernel

if TYPE_CHECKING:
    from eesd_jax.model import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, for every row and slot.

    Slot s of row b holds position s. Only slots < lengths[b] are meaningful;
    the rest are stale or unwritten, and attention never sees them before they
    are overwritten (model.block masks by position), so rolling back rejected
    draft tokens is just lowering `lengths`.
    """

    # Heads before slots: attention's dots read a layer [B, K, S, E] in place (slots before heads
    # made XLA:CPU copy each layer's keys and values into that order on every step).
    k: jax.Array  # [L, B, K, S, E] keys after RoPE.
    v: jax.Array  # [L, B, K, S, E] values.
    lengths: jax.Array  # [B] int32: number of valid slots (positions 0..len-1) per row.

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, layers: int | None = None, dtype=None) -> KVCache:
    """An empty cache of `layers` layers (default: the model's; an exit's own cache has 1), in cfg's dtype
    unless `dtype` says otherwise."""
    shape = (cfg.n_layers if layers is None else layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    dtype = cfg.jnp_dtype if dtype is None else dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))


def set_slots(a: jax.Array, index, update: jax.Array) -> jax.Array:
    """a.at[index].set(update, mode="drop") (out-of-range slots dropped), in place for 16-bit floats too.

    XLA:CPU has no bfloat16 / float16 scatter: it converted the whole cache to float32 and back
    around every write (~1.4 ms per write for SmolLM2's cache, 60 writes per AR step). On one CPU
    a bfloat16 cache's (layer, rows, :, slots) write runs on the kernel (cpu_kernel.write_slots),
    which touches only the written slots; elsewhere on CPU a scatter of the same bits as 16-bit
    integers is exact (XLA:CPU still copies the cache around that bitcast); other backends scatter.
    """
    update = update.astype(a.dtype)
    if len(index) == 4 and _is_slice(index[2]) and not any(map(_is_slice, index[:2] + index[3:])):
        if cpu_kernel.write_applies(a):
            return _write_on_kernel(a, index[0], index[1], index[3], update)
    scatter = lambda a, update: a.at[index].set(update, mode="drop")  # noqa: E731
    # Accelerators scatter 16-bit floats natively: the bits' round trip is XLA:CPU's workaround only.
    if a.dtype.itemsize != 2 or not jnp.issubdtype(a.dtype, jnp.floating) or jax.default_backend() != "cpu":
        return scatter(a, update)

    @jax.custom_jvp  # Integer bits carry no tangents: the write's own, as XLA's scatter's.
    def write_bits(a, update):
        bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)  # noqa: E731
        return jax.lax.bitcast_convert_type(bits(a).at[index].set(bits(update), mode="drop"), a.dtype)

    write_bits.defjvp(lambda primals, tangents: (write_bits(*primals), jax.jvp(scatter, primals, tangents)[1]))
    return write_bits(a, update)


def _is_slice(i) -> bool:
    return isinstance(i, slice)


@jax.custom_jvp
def _write_on_kernel(a, layer, rows, slots, update):
    return cpu_kernel.write_slots(a, layer, rows, slots, update)


@_write_on_kernel.defjvp
def _write_on_kernel_jvp(primals, tangents):
    """Tangents through XLA's scatter (training runs an exit over a fresh cache)."""
    scatter = lambda a, layer, rows, slots, u: a.at[layer, rows, :, slots].set(u, mode="drop")  # noqa: E731
    return _write_on_kernel(*primals), jax.jvp(scatter, primals, tangents)[1]


def round_up(n: int, multiple: int = 128) -> int:
    """Cache lengths are bucketed so that nearby request sizes share a compile."""
    return -(-n // multiple) * multiple
