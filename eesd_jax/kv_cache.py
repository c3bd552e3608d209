"""The KV cache: an explicit pytree stacked over layers, with per-row lengths."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, for every row and slot.

    Slot s of row b holds position s. Only slots < lengths[b] are meaningful;
    the rest are stale or unwritten, and attention never sees them before they
    are overwritten (model.block masks by position), so rolling back rejected
    draft tokens is just lowering `lengths`.
    """

    k: jax.Array  # [L, B, S, K, E] keys after RoPE.
    v: jax.Array  # [L, B, S, K, E] values.
    lengths: jax.Array  # [B] int32: number of valid slots (positions 0..len-1) per row.

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
    shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))


def round_up(n: int, multiple: int = 128) -> int:
    """Cache lengths are bucketed so that nearby request sizes share a compile."""
    return -(-n // multiple) * multiple
