"""A functional LLaMA-family decoder over explicit param pytrees.

Axis glossary (used in names, einsum strings and `PARAM_AXES`):
  B batch, T new tokens in this call, S cache length, D model width,
  H query heads, K kv heads, G query heads per kv head (H = K * G), E head dim,
  F ffn width, V vocab, L layers.
Decoding and distillation add: P prompt width, M new tokens (budget), J draft slots per
round (EESDConfig.max_draft; a verify block holds J + 1), C teacher top-k candidates
(distillation targets), R positions a distillation loss is taken at (losses.Batch) or
rounds of a trace (eesd.RoundTrace), V' draft vocabulary (an exit's head).

Per-layer params are stacked on a leading L axis, so "the first N layers" and
"layers N..L" are ranges run by one `lax.scan` (`run_layers`). Weights are stored
(out, in) as in Hugging Face checkpoints: contracting the last axis was measured
faster for the one-token matmuls that dominate decoding on CPU (docs/design.md, CPU notes).

Everything else — prefill, an incremental step, drafting through an early exit,
verifying a draft block — composes `embed`, `run_layers`, `final_norm` and
`lm_head`. The hidden state after any layer n (an exit) is what `run_layers`
returns for the first n layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import cpu_kernel
from eesd_jax.kv_cache import KVCache, init_cache, set_slots

Params = dict[str, Any]

# Logical axes of every param leaf; sharding.py maps them to mesh axes.
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("vocab", "embed"),
    "layers": {
        "attn_norm": ("layers", "embed"),
        "wq": ("layers", "heads", "head_dim", "embed"),
        "wk": ("layers", "kv_heads", "head_dim", "embed"),
        "wv": ("layers", "kv_heads", "head_dim", "embed"),
        "bq": ("layers", "heads", "head_dim"),
        "bk": ("layers", "kv_heads", "head_dim"),
        "bv": ("layers", "kv_heads", "head_dim"),
        "wo": ("layers", "embed", "heads", "head_dim"),
        "mlp_norm": ("layers", "embed"),
        "w_gate": ("layers", "mlp", "embed"),
        "w_up": ("layers", "mlp", "embed"),
        "w_down": ("layers", "embed", "mlp"),
    },
}


# Param / activation / KV-cache dtypes the library runs in. Logits, softmax, norms and the
# acceptance math stay float32 in every case (lm_head, _scores, rms_norm, sampling.py).
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a LLaMA-family model (LLaMA-2/3, SmolLM2, Mistral, Qwen2)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 adds biases to the q/k/v projections.
    max_seq_len: int = 4096
    dtype: str = "float32"  # Activation and param dtype.
    name: str = "llama"  # Free-form identity, recorded in exit files.
    # LLaMA-3.1 RoPE scaling ("rope_type": "llama3"): (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None = plain RoPE.
    rope_scaling: tuple[float, float, float, int] | None = None

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.rope_scaling is not None:  # A tuple (hashable: cfg is a static jit argument), also from JSON lists.
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
            factor, low, high, _ = self.rope_scaling
            if not (factor >= 1 and 0 < low < high):
                raise ValueError(
                    f"rope_scaling needs factor >= 1 and 0 < low_freq_factor < high_freq_factor, "
                    f"got {self.rope_scaling}"
                )

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


def cast_params(params: Params, dtype: str) -> Params:
    """params with every floating leaf in `dtype` (integer leaves, e.g. an exit's vocab ids, kept).

    Works on numpy and jax leaves alike; a leaf already in `dtype` is returned as is.
    """
    dt = jnp.dtype(dtype)
    cast = lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dt else a
    return jax.tree.map(cast, params)


def with_dtype(cfg: ModelConfig, params: Params, dtype: str) -> tuple[ModelConfig, Params]:
    """(cfg, params) of the same model in another dtype: params, activations and KV caches follow cfg.dtype."""
    return dataclasses.replace(cfg, dtype=dtype), cast_params(params, dtype)


def init_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.02) -> Params:
    """Random params (tests and tiny configs); real weights come from loading.py."""
    L, D, H, K, E, F, V = (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.ffn_dim,
        cfg.vocab_size,
    )
    shapes = {
        "wq": (L, H, E, D),
        "wk": (L, K, E, D),
        "wv": (L, K, E, D),
        "wo": (L, D, H, E),
        "w_gate": (L, F, D),
        "w_up": (L, F, D),
        "w_down": (L, D, F),
    }
    if cfg.qkv_bias:
        shapes.update(bq=(L, H, E), bk=(L, K, E), bv=(L, K, E))
    keys = iter(jax.random.split(key, len(shapes) + 2))
    dt = cfg.jnp_dtype
    layers = {name: (scale * jax.random.normal(next(keys), s)).astype(dt) for name, s in shapes.items()}
    layers["attn_norm"] = jnp.ones((L, D), dt)
    layers["mlp_norm"] = jnp.ones((L, D), dt)
    params = {
        "embed": (scale * jax.random.normal(next(keys), (V, D))).astype(dt),
        "final_norm": jnp.ones((D,), dt),
        "layers": layers,
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = (scale * jax.random.normal(next(keys), (V, D))).astype(dt)
    return params


# ----------------------------------------------------------------------------- small pieces


def rms_norm(x_btd: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
    x32 = x_btd.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale_d.astype(jnp.float32)).astype(x_btd.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> jax.Array:
    """[E/2] float32 inverse frequencies; with LLaMA-3.1 scaling, long wavelengths (beyond
    original_len / low_freq_factor) slowed by `factor`, short ones (below original_len /
    high_freq_factor) kept, and a linear blend of the two in between (in 1 / wavelength)."""
    half = head_dim // 2
    inv_freq_f = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    if scaling is not None:
        factor, low, high, original_len = scaling
        smooth_f = jnp.clip((original_len * inv_freq_f / (2 * jnp.pi) - low) / (high - low), 0.0, 1.0)
        inv_freq_f = (1 - smooth_f) * inv_freq_f / factor + smooth_f * inv_freq_f
    return inv_freq_f


def rope(x_bthe: jax.Array, positions_bt: jax.Array, theta: float, scaling: tuple | None = None) -> jax.Array:
    """Rotary embedding, rotate-half convention (Hugging Face LLaMA); scaling: ModelConfig.rope_scaling."""
    half = x_bthe.shape[-1] // 2
    inv_freq_f = rope_frequencies(2 * half, theta, scaling)
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq_f
    sin = jnp.sin(angles_btf)[:, :, None, :]
    cos = jnp.cos(angles_btf)[:, :, None, :]
    x1, x2 = x_bthe[..., :half].astype(jnp.float32), x_bthe[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthe.dtype)


def embed(params: Params, tokens_bt: jax.Array) -> jax.Array:
    """[B, T] token ids -> [B, T, D] embeddings."""
    return jnp.take(params["embed"], tokens_bt, axis=0)


def final_norm(params: Params, cfg: ModelConfig, x_btd: jax.Array) -> jax.Array:
    return rms_norm(x_btd, params["final_norm"], cfg.rms_eps)


def lm_head(params: Params, x_btd: jax.Array) -> jax.Array:
    """[B, T, D] normed hidden -> [B, T, V] float32 logits (tied or untied head)."""
    w_vd = params["lm_head"] if "lm_head" in params else params["embed"]
    return dense(x_btd, w_vd, jnp.float32)


def dense(x_btd: jax.Array, w_od: jax.Array, out_dtype=None) -> jax.Array:
    """[B, T, D] @ stored (out, in) weight [O, D] -> [B, T, O].

    On CPU, up to SMALL_BLOCK rows (decode, verify and draft shapes) run on the small-block
    kernel (cpu_kernel.py) when it is available: it streams the weight once for all rows, and
    a row's result does not depend on how many rows share the call. Otherwise XLA's dot; for
    2..SMALL_BLOCK rows with the weight as its left operand ("od,btd->obt"): XLA:CPU's GEMM
    packs its right operand, so the block there is cheap while the weight streams once (a 2..8
    token block cost ~2x a one-token step with the weight on the right, ~1.3x on the left). One
    row (a GEMV) and long blocks (prefill, teacher passes: 1.4-1.7x slower weight-left) keep
    the usual order.
    """
    B, T, D = x_btd.shape
    if cpu_kernel.applies(B * T, w_od):
        return dense_many(x_btd, [w_od], out_dtype)[0]
    if 1 < B * T <= SMALL_BLOCK:
        return jnp.einsum("od,btd->obt", w_od, x_btd, preferred_element_type=out_dtype).transpose(1, 2, 0)
    return jnp.einsum("btd,od->bto", x_btd, w_od, preferred_element_type=out_dtype)


SMALL_BLOCK = 32  # Rows (B * T) up to which dense() uses the CPU kernel, else puts the weight on the left.


def dense_many(x_btd: jax.Array, ws_od: Sequence[jax.Array], out_dtype=None) -> list[jax.Array]:
    """[dense(x_btd, w) for w in ws_od], on the CPU kernel in one call where it applies to all
    (q/k/v, gate/up: one thread-pool dispatch, the weights' rows balanced together)."""
    B, T, D = x_btd.shape
    if len({w.dtype for w in ws_od}) == 1 and all(cpu_kernel.applies(B * T, w) for w in ws_od):
        ys_no = cpu_kernel.matmul_many(x_btd.reshape(B * T, D), tuple(ws_od))
        return [y.reshape(B, T, -1).astype(out_dtype or jnp.result_type(x_btd, w)) for y, w in zip(ys_no, ws_od)]
    return [dense(x_btd, w, out_dtype) for w in ws_od]


# ----------------------------------------------------------------------------- one block


def block(
    cfg: ModelConfig,
    p: Params,
    x_btd: jax.Array,
    positions_bt: jax.Array,
    k_lbkse: jax.Array,
    v_lbkse: jax.Array,
    layer_idx: jax.Array,
    slots_bt: jax.Array | None = None,
    visible_bts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pre-norm transformer block over T new tokens.

    Writes the new tokens' keys/values into layer `layer_idx` of the stacked
    cache at their positions (a scatter of T slots per row, so the rest of the
    cache is updated in place; positions past the cache are dropped), then
    attends causally by position: a query at position p sees cache slots s <= p.
    Slots past a row's accepted length are never visible before being
    overwritten, which is what makes rollback a pure length update.

    A draft tree (tree.py) passes the slots its nodes live in (`slots_bt`, default: their
    positions) and which slots each sees (`visible_bts` [B, T, S], default: s <= position).

    Returns (x_btd, k_lbkse, v_lbkse).
    """
    q_bthe, k_lbkse, v_lbkse = block_write(cfg, p, x_btd, positions_bt, k_lbkse, v_lbkse, layer_idx, slots_bt)
    return block_read(cfg, p, x_btd, q_bthe, positions_bt, k_lbkse, v_lbkse, layer_idx, visible_bts), k_lbkse, v_lbkse


def block_write(cfg: ModelConfig, p: Params, x_btd, positions_bt, k_lbkse, v_lbkse, layer_idx, slots_bt=None):
    """`block`'s first half: the new tokens' queries [B, T, H, E], their keys/values written at
    slots_bt (default: their positions). Returns (q_bthe, k_lbkse, v_lbkse)."""
    B, T, _ = x_btd.shape
    q_bthe, k_btke, v_btke = _qkv(cfg, p, x_btd, positions_bt)
    rows_bt = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    slots_bt = positions_bt if slots_bt is None else slots_bt
    # The slice between the indices puts the indexed [B, T] dims first: the update is [B, T, K, E].
    k_lbkse = set_slots(k_lbkse, (layer_idx, rows_bt, slice(None), slots_bt), k_btke)
    v_lbkse = set_slots(v_lbkse, (layer_idx, rows_bt, slice(None), slots_bt), v_btke)
    return q_bthe, k_lbkse, v_lbkse


def block_read(
    cfg: ModelConfig, p: Params, x_btd, q_bthe, positions_bt, k_lbkse, v_lbkse, layer_idx, visible_bts=None
) -> jax.Array:
    """`block`'s second half, reading the cache only: attention over the visible slots (default:
    s <= position), output projection and MLP ([B, T, D]). A draft tree's deepest nodes need
    only the first half (tree.draft)."""
    if visible_bts is None:
        visible_bts = jnp.arange(k_lbkse.shape[3])[None, None, :] <= positions_bt[:, :, None]
    o_btn = attend_cache(q_bthe, k_lbkse, v_lbkse, layer_idx, visible_bts)
    return _out_and_mlp(cfg, p, x_btd, o_btn)


def block_readonly(
    cfg: ModelConfig,
    p: Params,
    x_btd: jax.Array,
    positions_bt: jax.Array,
    k_lbkse: jax.Array,
    v_lbkse: jax.Array,
    layer_idx: jax.Array,
    new_btt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`block` for a block of consecutive positions that leaves the cache alone.

    Layer `layer_idx` of the stacked cache (k, v: [L, B, K, S, E]) is only read, for the slots before each
    row's block (s < positions_bt[:, 0]); the block attends to its own keys and
    values causally. The same attention as `block`, but the new keys/values are
    returned ([B, T, K, E]) for the caller to write (`write_layers`): inside a
    lax.switch branch (EESD verification), a cache written in place was copied
    whole by XLA on every call. A draft tree's block (tree.py) is not consecutive: `new_btt`
    [B, T, T] then says which block tokens each sees (its ancestors); its first token is the lowest.

    Returns (x_btd, k_btke, v_btke).
    """
    B, T, _ = x_btd.shape
    q_bthe, k_btke, v_btke = _qkv(cfg, p, x_btd, positions_bt)
    S = k_lbkse.shape[3]
    old_bts = jnp.arange(S)[None, None, :] < positions_bt[:, :1, None]
    if new_btt is None:
        new_btt = positions_bt[:, None, :] <= positions_bt[:, :, None]
    old_bts = jnp.broadcast_to(old_bts, (B, T, S))
    o_btn = attend_cache(q_bthe, k_lbkse, v_lbkse, layer_idx, old_bts, (k_btke, v_btke, new_btt))
    return _out_and_mlp(cfg, p, x_btd, o_btn), k_btke, v_btke


def block_with_context(
    cfg: ModelConfig, p: Params, x_btd: jax.Array, context_btd: jax.Array, start_bt: jax.Array
) -> jax.Array:
    """One block over a whole sequence whose keys/values come from two sources (an exit in training).

    Position t attends to context-derived keys/values (from `context_btd`, e.g. the
    LLM's top-layer states) at positions u < start_bt[t], and to its own block's
    (from `x_btd`) at start_bt[t] <= u <= t. With start = the first position of each
    draft round this is exactly what an exit with a context layer sees when drafting:
    verified positions from the context layer, the round's drafted ones from layer N.
    Positions are arange(T). Returns [B, T, D].
    """
    B, T, _ = x_btd.shape
    positions_bt = jnp.broadcast_to(jnp.arange(T), (B, T))
    q_bthe, k_btke, v_btke = _qkv(cfg, p, x_btd, positions_bt)
    k_ctx, v_ctx = keys_values(cfg, p, context_btd, positions_bt)
    u_11u = jnp.arange(T)[None, None, :]
    own_btu = (u_11u >= start_bt[:, :, None]) & (u_11u <= positions_bt[:, :, None])
    ctx_btu = u_11u < start_bt[:, :, None]
    ctx = (heads_major(k_ctx), heads_major(v_ctx), ctx_btu)
    o_btn = _attend_two(q_bthe, ctx, (heads_major(k_btke), heads_major(v_btke), own_btu))
    return _out_and_mlp(cfg, p, x_btd, o_btn)


def keys_values(cfg: ModelConfig, p: Params, x_btd: jax.Array, positions_bt: jax.Array):
    """The block's keys and values [B, T, K, E] of hidden states x_btd (RoPE applied)."""
    _, k_btke, v_btke = _qkv(cfg, p, x_btd, positions_bt)
    return k_btke, v_btke


def heads_major(x_btke: jax.Array) -> jax.Array:
    """[B, T, K, E] keys or values -> [B, K, T, E], the cache's layout."""
    return x_btke.transpose(0, 2, 1, 3)


def attend_cache(q_bthe, k_lbkse, v_lbkse, layer_idx, visible_bts, new=None) -> jax.Array:
    """Attention of q [B, T, H, E] over layer `layer_idx` of the stacked cache k, v [L, B, K, S, E]
    (visible_bts [B, T, S]) and, given new = (k, v [B, T, K, E], visible [B, T, T]), the block's own
    keys/values, with one softmax: [B, T, H*E] in the cache's dtype.

    On CPU for small blocks (cpu_kernel.attention_applies) the attention kernel reads the layer in
    place and only the visible slots, with a query's arithmetic the same in an AR step and in a
    verification; elsewhere XLA's dots over the layer sliced out.
    """
    if cpu_kernel.attention_applies(q_bthe, k_lbkse):
        return _attend_on_kernel(q_bthe, k_lbkse, v_lbkse, layer_idx, visible_bts, new)
    return _attend_xla(q_bthe, k_lbkse, v_lbkse, layer_idx, visible_bts, new)


def _attend_xla(q_bthe, k_lbkse, v_lbkse, layer_idx, visible_bts, new):
    k_bkse, v_bkse = k_lbkse[layer_idx], v_lbkse[layer_idx]
    if new is None:
        probs = jax.nn.softmax(_scores(q_bthe, k_bkse, visible_bts), axis=-1).astype(v_bkse.dtype)
        return _weighted_values(probs, v_bkse)
    k_btke, v_btke, new_btt = new
    return _attend_two(q_bthe, (k_bkse, v_bkse, visible_bts), (heads_major(k_btke), heads_major(v_btke), new_btt))


@jax.custom_jvp
def _attend_on_kernel(q_bthe, k_lbkse, v_lbkse, layer_idx, visible_bts, new):
    B, T, H, E = q_bthe.shape
    o_bthe = cpu_kernel.attention(q_bthe, k_lbkse, v_lbkse, layer_idx, visible_bts, new)
    return o_bthe.reshape(B, T, H * E).astype(v_lbkse.dtype)


@_attend_on_kernel.defjvp
def _attend_on_kernel_jvp(primals, tangents):
    """Tangents through XLA's attention (the kernel has no transpose; gradients rarely reach it)."""
    return _attend_on_kernel(*primals), jax.jvp(_attend_xla, primals, tangents)[1]


def _attend_two(q_bthe: jax.Array, source_a, source_b) -> jax.Array:
    """Attention of q over two (k [B, K, S, E], v, visible [B, T, S]) sources with one softmax: [B, T, H*E].

    The [..., Sa + Sb] scores are small; the keys/values themselves are never concatenated.
    """
    (k_a, v_a, vis_a), (k_b, v_b, vis_b) = source_a, source_b
    scores = jnp.concatenate([_scores(q_bthe, k_a, vis_a), _scores(q_bthe, k_b.astype(k_a.dtype), vis_b)], -1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_a.dtype)
    S = k_a.shape[2]
    return _weighted_values(probs[..., :S], v_a) + _weighted_values(probs[..., S:], v_b.astype(v_a.dtype))


def _qkv(cfg: ModelConfig, p: Params, x_btd: jax.Array, positions_bt: jax.Array):
    """Queries [B, T, H, E] and keys, values [B, T, K, E] of the new tokens, RoPE applied."""
    B, T, D = x_btd.shape
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # Projections are 2-D matmuls against the stored (out, in) weights: head-shaped
    # einsums made XLA:CPU copy a transposed weight every layer and step.
    h = rms_norm(x_btd, p["attn_norm"], cfg.rms_eps)
    q, k, v = dense_many(h, [p["wq"].reshape(H * E, D), p["wk"].reshape(K * E, D), p["wv"].reshape(K * E, D)])
    q_bthe, k_btke, v_btke = q.reshape(B, T, H, E), k.reshape(B, T, K, E), v.reshape(B, T, K, E)
    if cfg.qkv_bias:
        q_bthe, k_btke, v_btke = q_bthe + p["bq"], k_btke + p["bk"], v_btke + p["bv"]
    rot = lambda x: rope(x, positions_bt, cfg.rope_theta, cfg.rope_scaling)
    return rot(q_bthe), rot(k_btke), v_btke


def _scores(q_bthe: jax.Array, k_bkse: jax.Array, visible_bts: jax.Array) -> jax.Array:
    """Scaled float32 attention scores [B, K, G, T, S]; invisible slots get the float32 minimum."""
    B, T, H, E = q_bthe.shape
    _, K, S, _ = k_bkse.shape
    # One batched dot over (B, K) with the (G, T) query rows merged: the cache layer is read in
    # its own layout (a 5-d einsum made XLA:CPU copy it transposed every layer and step).
    q_bkqe = q_bthe.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4).reshape(B, K, -1, E)
    scores = jnp.einsum("bkqe,bkse->bkqs", q_bkqe, k_bkse, preferred_element_type=jnp.float32) * (E**-0.5)
    scores = scores.reshape(B, K, H // K, T, S)
    return jnp.where(visible_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)


def _weighted_values(probs_bkgts: jax.Array, v_bkse: jax.Array) -> jax.Array:
    """Attention output [B, T, H*E] of probs over the slots' values (the dot as in _scores)."""
    B, K, G, T, S = probs_bkgts.shape
    o_bkqe = jnp.einsum("bkqs,bkse->bkqe", probs_bkgts.reshape(B, K, G * T, S), v_bkse)
    return o_bkqe.reshape(B, K, G, T, -1).transpose(0, 3, 1, 2, 4).reshape(B, T, -1)


def _out_and_mlp(cfg: ModelConfig, p: Params, x_btd: jax.Array, o_btn: jax.Array) -> jax.Array:
    """The attention output projection and the MLP, each with its residual."""
    x_btd = x_btd + dense(o_btn, p["wo"].reshape(x_btd.shape[-1], -1))
    h = rms_norm(x_btd, p["mlp_norm"], cfg.rms_eps)
    gate_btf, up_btf = dense_many(h, [p["w_gate"], p["w_up"]])
    return x_btd + dense(jax.nn.silu(gate_btf) * up_btf, p["w_down"])


Layers = Params | list[Params]  # Stacked [n, ...] leaves, or one pytree per layer.


def num_layers(layers: Layers) -> int:
    return len(layers) if isinstance(layers, list) else jax.tree.leaves(layers)[0].shape[0]


def run_layers(
    cfg: ModelConfig,
    layers: Layers,
    x_btd: jax.Array,
    positions_bt: jax.Array,
    cache: KVCache,
    first_layer: int = 0,
    slots_bt: jax.Array | None = None,
    visible_bts: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run a contiguous range of layers over T new tokens; the forward primitive.

    `layers` are layers first_layer .. first_layer + n - 1 of `cache` (k, v:
    [L', B, K, S, E]), in one of two layouts with identical results:
      * stacked ([n, ...] leaves, as stored and sharded): one lax.scan, a small
        program that compiles fast;
      * a list of per-layer pytrees (`unstack`): unrolled. XLA:CPU copies a
        layer's weights out of a stacked array on every step (a dot cannot read
        a slice at a traced index), which made decoding ~3x slower on CPU, so
        the decode loops run on this layout there.
    Returns the hidden state after the last layer and the cache with those
    layers' slots written. slots_bt, visible_bts: as in `block` (draft trees).
    """

    def step(carry, p, layer_idx):
        x, k, v = carry
        return block(cfg, p, x, positions_bt, k, v, layer_idx, slots_bt, visible_bts), None

    (x_btd, k, v), _ = _over_layers(layers, first_layer, cache, step, (x_btd, cache.k, cache.v))
    return x_btd, cache.replace(k=k, v=v)


def run_layers_readonly(
    cfg: ModelConfig,
    layers: Layers,
    x_btd: jax.Array,
    positions_bt: jax.Array,
    cache: KVCache,
    first_layer: int = 0,
    new_btt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`run_layers` over a block of consecutive positions, leaving the cache alone (`block_readonly`).

    Returns (x_btd, k_nbtke, v_nbtke): the hidden state and the n layers' new
    keys/values, for `write_layers`. new_btt: a draft tree's mask (`block_readonly`).
    """

    def step(x, p, layer_idx):
        x, k_btke, v_btke = block_readonly(cfg, p, x, positions_bt, cache.k, cache.v, layer_idx, new_btt)
        return x, (k_btke, v_btke)

    x_btd, (k_nbtke, v_nbtke) = _over_layers(layers, first_layer, cache, step, x_btd)
    return x_btd, k_nbtke, v_nbtke


def write_layers(
    cache: KVCache, first_layer: int, k_nbtke: jax.Array, v_nbtke: jax.Array, positions_bt: jax.Array
) -> KVCache:
    """Write keys/values of layers first_layer .. first_layer + n - 1 at their positions (one scatter, in place)."""
    n = k_nbtke.shape[0]
    layer_n11 = jnp.arange(first_layer, first_layer + n)[:, None, None]
    rows_1b1 = jnp.arange(positions_bt.shape[0])[None, :, None]
    index = (layer_n11, rows_1b1, slice(None), positions_bt[None])  # The update: [n, B, T, K, E].
    return cache.replace(k=set_slots(cache.k, index, k_nbtke), v=set_slots(cache.v, index, v_nbtke))


def _over_layers(layers: Layers, first_layer: int, cache: KVCache, step, carry):
    """(carry, stacked ys) of `carry, y = step(carry, layer params, layer index)` over the layers.

    Unrolled for a list of layers (static indices), one lax.scan over stacked ones.
    """
    n = num_layers(layers)
    if not 0 <= first_layer < first_layer + n <= cache.k.shape[0]:
        raise ValueError(f"layers [{first_layer}, {first_layer + n}) are outside the cache's {cache.k.shape[0]}")
    if isinstance(layers, list) or n == 1:
        per_layer = layers if isinstance(layers, list) else [jax.tree.map(lambda w: w.reshape(w.shape[1:]), layers)]
        ys = []
        for i, p in enumerate(per_layer):
            carry, y = step(carry, p, first_layer + i)
            ys.append(y)
        return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)
    xs = (layers, jnp.arange(first_layer, first_layer + n))
    return jax.lax.scan(lambda c, xs: step(c, *xs), carry, xs)


def unstack(params: Params) -> Params:
    """params with `layers` as a list of per-layer pytrees (the fast CPU layout); outside jit."""
    layers = params["layers"]
    if isinstance(layers, list):
        return params
    return {**params, "layers": [jax.tree.map(lambda w, i=i: w[i], layers) for i in range(num_layers(layers))]}


def decode_layout(params: Params) -> Params:
    """params in the layout the decode loops run fastest in on this backend: per-layer lists on CPU
    (run_layers: XLA:CPU copies a layer out of a stacked array each step), stacked elsewhere."""
    return unstack(params) if jax.default_backend() == "cpu" else params


def split_layers(layers: Layers, n: int) -> tuple[Layers, Layers]:
    """(layers [0, n), layers [n, L)) in the same layout; call outside jit."""
    if isinstance(layers, list):
        return layers[:n], layers[n:]
    return jax.tree.map(lambda w: w[:n], layers), jax.tree.map(lambda w: w[n:], layers)


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens_bt: jax.Array,
    positions_bt: jax.Array,
    cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """Full forward over T new tokens: ([B, T, V] float32 logits, cache)."""
    x, cache = run_layers(cfg, params["layers"], embed(params, tokens_bt), positions_bt, cache)
    return lm_head(params, final_norm(params, cfg, x)), cache


def run_segments(
    cfg: ModelConfig, segments: Sequence[Layers], x_btd: jax.Array, positions_bt: jax.Array, cache: KVCache
) -> tuple[list[jax.Array], KVCache]:
    """Consecutive layer ranges from layer 0 on (e.g. eesd.split_params): the hidden state after each, and the
    cache with their slots written."""
    hiddens, first = [], 0
    for layers in segments:
        x_btd, cache = run_layers(cfg, layers, x_btd, positions_bt, cache, first)
        hiddens.append(x_btd)
        first += num_layers(layers)
    return hiddens, cache


@functools.partial(jax.jit, static_argnums=0)
def forward_uncached(cfg: ModelConfig, params: Params, tokens_bt: jax.Array) -> jax.Array:
    """[B, T, V] float32 logits of whole sequences (positions 0..T-1) from a fresh cache: the reference forward."""
    B, T = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    return forward(cfg, params, tokens_bt, positions, init_cache(cfg, B, T))[0]


def random_params(cfg: ModelConfig, rng: np.random.Generator | np.random.RandomState, scale: float) -> Params:
    """numpy params in init_params' layout: norm scales 1, every other weight scale * N(0, 1) (no jax.random
    compiles per shape, which cost seconds on CPU)."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (
            np.ones(s.shape, s.dtype)
            if "norm" in jax.tree_util.keystr(path)
            else (scale * rng.standard_normal(s.shape)).astype(s.dtype)
        ),
        shapes,
    )
