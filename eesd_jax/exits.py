"""The early-exiting layer: one block + final norm (+ optional own LM head) on top of layer N.

Exit params are their own pytree, saved as a safetensors file whose metadata
names the base model (fingerprint) and N, so an exit trained for another model
or another layer is refused before any compute.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import model
from eesd_jax.kv_cache import KVCache
from eesd_jax.model import ModelConfig, Params

FORMAT = "eesd_jax.exit/1"


@dataclasses.dataclass(frozen=True)
class ExitConfig:
    """Where the exit sits and what it owns."""

    layer: int  # N: the exit reads the hidden state after the first N layers.
    own_head: bool = False  # Own LM head (trainable) instead of sharing the LLM's frozen one.
    # Draft only among this many tokens (0 = the whole vocabulary). The exit then
    # owns a head of draft_vocab rows: with a 49k vocabulary the full head costs
    # as much as ~8 SmolLM2 layers per draft token. Tokens outside it get q = 0,
    # which changes speed only (verification is exact for any q).
    draft_vocab: int = 0
    # 0: the exit attends over its own states of layer-N inputs at every position (the
    # paper). c in (N, L): at positions already *verified* it attends over keys/values
    # built from the LLM's hidden state after layer c instead, which verification
    # computes anyway; the tokens drafted in the current round still enter from layer N.
    # Top-layer context at early-exit cost (exits never read their own predictions, so
    # the context is exact for every verified prefix).
    context_layer: int = 0
    # () : the exit's input is the drafted-from token's layer-N state (the paper). Layers j in
    # [N, L] (L: the LLM's final hidden state): the input at a position is fused with the LLM's
    # states after those layers at the *previous* position, by one linear layer (`fused_input`),
    # which verification computes anyway (EAGLE / EAGLE-3). A round's later drafts have no
    # verified previous position: the exit's own output state stands in for each of them.
    fuse_layers: tuple[int, ...] = ()

    def validate(self, cfg: ModelConfig) -> None:
        if not 1 <= self.layer < cfg.n_layers:
            raise ValueError(
                f"exit layer N={self.layer} must be in [1, {cfg.n_layers}) for a {cfg.n_layers}-layer model"
            )
        if self.context_layer and not self.layer < self.context_layer < cfg.n_layers:
            raise ValueError(
                f"context layer {self.context_layer} must be 0 or in ({self.layer}, {cfg.n_layers}) "
                f"for an exit after layer {self.layer}"
            )
        fuse = tuple(self.fuse_layers)
        if list(fuse) != sorted(set(fuse)) or any(not self.layer <= j <= cfg.n_layers for j in fuse):
            raise ValueError(
                f"fuse layers {fuse} must be increasing and in [{self.layer}, {cfg.n_layers}] "
                f"for an exit after layer {self.layer}"
            )
        if not 0 <= self.draft_vocab <= cfg.vocab_size:
            raise ValueError(f"draft_vocab must be in [0, {cfg.vocab_size}], got {self.draft_vocab}")


def init_exit(cfg: ModelConfig, params: Params, exit_cfg: ExitConfig, vocab_ids=None) -> Params:
    """An exit initialized from the LLM's last block, final norm (and LM head rows).

    With draft_vocab > 0, `vocab_ids` ([draft_vocab] token ids, e.g. the most
    frequent in the LLM's own outputs) choose the head rows. At N = L - 1 an
    untrained full-vocabulary exit computes exactly the LLM's own output.
    """
    exit_cfg.validate(cfg)
    exit_params = {
        "block": jax.tree.map(lambda w: jnp.array(w[None]), _last_layer(params["layers"])),  # [1, ...] leaves
        "norm": jnp.array(params["final_norm"]),
    }
    if exit_cfg.fuse_layers:  # Zero weights on the fused states: untrained, the unfused exit exactly.
        F, D = len(exit_cfg.fuse_layers), cfg.d_model
        exit_params["fuse"] = {
            "norm": jnp.tile(jnp.asarray(params["final_norm"])[None], (F, 1)),  # [F, D]
            "w": jnp.zeros((D, F * D), cfg.jnp_dtype),  # (out, in), like model.dense's weights.
        }
    head_vd = params["lm_head"] if "lm_head" in params else params["embed"]
    if exit_cfg.draft_vocab:
        if vocab_ids is None or len(vocab_ids) != exit_cfg.draft_vocab:
            raise ValueError(f"draft_vocab={exit_cfg.draft_vocab} needs that many vocab_ids")
        ids = np.asarray(vocab_ids, np.int32)
        if len(np.unique(ids)) != len(ids) or ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError("vocab_ids must be distinct token ids of the model")
        exit_params["vocab"] = jnp.asarray(ids)
        exit_params["head"] = jnp.take(head_vd, ids, axis=0)
    elif exit_cfg.own_head:
        exit_params["head"] = jnp.array(head_vd)
    return exit_params


def _last_layer(layers: model.Layers) -> Params:
    return layers[-1] if isinstance(layers, list) else jax.tree.map(lambda w: w[-1], layers)


def exit_logits(
    cfg: ModelConfig,
    params: Params,
    exit_params: Params,
    hidden_btd: jax.Array,
    positions_bt: jax.Array,
    exit_cache: KVCache,
) -> tuple[jax.Array, KVCache]:
    """Draft logits [B, T, V] from layer-N hidden states; writes the exit's own cache."""
    x, exit_cache = exit_hidden(cfg, exit_params, hidden_btd, positions_bt, exit_cache)
    return draft_logits(cfg, params, exit_params, x), exit_cache


def exit_hidden(
    cfg: ModelConfig,
    exit_params: Params,
    hidden_btd: jax.Array,
    positions_bt: jax.Array,
    exit_cache: KVCache,
    slots_bt: jax.Array | None = None,
    visible_bts: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """The exit block and its norm over layer-N hidden states: ([B, T, D], the exit's cache written).

    slots_bt, visible_bts: a draft tree's node slots and masks (model.block)."""
    q_bthe, exit_cache = exit_write(cfg, exit_params, hidden_btd, positions_bt, exit_cache, slots_bt)
    return exit_read(cfg, exit_params, hidden_btd, q_bthe, positions_bt, exit_cache, visible_bts), exit_cache


def exit_write(cfg, exit_params, hidden_btd, positions_bt, exit_cache: KVCache, slots_bt=None):
    """`exit_hidden`'s first half (model.block_write): (the queries [B, T, H, E], the exit's cache
    with the tokens' keys/values written)."""
    q_bthe, k, v = model.block_write(
        cfg, block_params(exit_params), hidden_btd, positions_bt, exit_cache.k, exit_cache.v, 0, slots_bt
    )
    return q_bthe, exit_cache.replace(k=k, v=v)


def exit_read(cfg, exit_params, hidden_btd, q_bthe, positions_bt, exit_cache: KVCache, visible_bts=None):
    """`exit_hidden`'s second half (model.block_read, the cache only read) and the exit's norm: [B, T, D]."""
    x = model.block_read(
        cfg, block_params(exit_params), hidden_btd, q_bthe, positions_bt, exit_cache.k, exit_cache.v, 0, visible_bts
    )
    return model.rms_norm(x, exit_params["norm"], cfg.rms_eps)


def block_params(exit_params: Params) -> Params:
    """The exit block's weights, without the stacked [1, ...] axis."""
    return jax.tree.map(lambda w: w[0], exit_params["block"])


def fuse_features(cfg: ModelConfig, exit_params: Params, states_btfd: jax.Array) -> jax.Array:
    """The fused inputs [B, T, F, D] of the LLM's states after the fuse layers (each normed by its own
    scale, as the exit's output is, which stands in for them in a round's later drafts)."""
    return model.rms_norm(states_btfd, exit_params["fuse"]["norm"], cfg.rms_eps)


def fused_input(hidden_btd: jax.Array, exit_params: Params, features_btfd: jax.Array) -> jax.Array:
    """The exit block's input [B, T, D]: the layer-N state plus one linear layer over the fused features
    of the previous position (`fuse_features`, or the exit's own output state in each slot).

    The layer-N state enters with a fixed identity (the block's pre-norm rescales its input), so
    the linear layer over [layer-N state; features] costs F*D*D, not (F+1)*D*D, per draft token.
    """
    B, T, F, D = features_btfd.shape
    w = exit_params["fuse"]["w"]
    return hidden_btd + model.dense(features_btfd.reshape(B, T, F * D).astype(w.dtype), w).astype(hidden_btd.dtype)


def previous_features(features_btfd: jax.Array, first_bfd: jax.Array) -> jax.Array:
    """Features shifted one position later: [first; features[:, :-1]] ([B, T, F, D])."""
    return jnp.concatenate([first_bfd[:, None], features_btfd[:, :-1]], 1)


def write_context(
    cfg: ModelConfig, exit_params: Params, exit_cache: KVCache, context_btd: jax.Array, positions_bt: jax.Array
) -> KVCache:
    """Write the exit's keys/values of verified positions from their context-layer states [B, T, D].

    (ExitConfig.context_layer: they replace the layer-N ones written while drafting.)
    """
    k_btke, v_btke = model.keys_values(cfg, block_params(exit_params), context_btd, positions_bt)
    return model.write_layers(exit_cache, 0, k_btke[None], v_btke[None], positions_bt)


def draft_vocab_logits(params: Params, exit_params: Params, x_btd: jax.Array) -> jax.Array:
    """[B, T, V'] logits over the exit's draft vocabulary (exit_params["vocab"]; else the whole one)."""
    head = {"lm_head": exit_params["head"]} if "head" in exit_params else params
    return model.lm_head(head, x_btd)


def draft_logits(cfg: ModelConfig, params: Params, exit_params: Params, x_btd: jax.Array) -> jax.Array:
    """[B, T, V] draft logits from `exit_hidden`'s output (the draft vocabulary's, or the LLM's head)."""
    logits = draft_vocab_logits(params, exit_params, x_btd)
    if "vocab" in exit_params:  # Scatter the draft vocabulary's logits into the full one.
        full = jnp.full((*logits.shape[:-1], cfg.vocab_size), -jnp.inf, logits.dtype)
        logits = full.at[..., exit_params["vocab"]].set(logits)
    return logits


# ----------------------------------------------------------------------------- files


def save_exit(
    path: str | os.PathLike,
    exit_params: Params,
    exit_cfg: ExitConfig,
    base_name: str,
    base_fingerprint: str,
    extra: dict | None = None,
    dtype: str | None = None,
) -> None:
    """Write the exit atomically as safetensors with its identity in the metadata.

    dtype: the float type of the stored tensors, "float32" (default) or "float16" (half the
    file size); a bfloat16 exit is stored as float32. load_exit casts them to the model's dtype.
    """
    from safetensors.numpy import save_file

    from eesd_jax.loading import _flatten, atomic_write

    meta = {
        "format": FORMAT,
        "exit_layer": str(exit_cfg.layer),
        "own_head": str(exit_cfg.own_head),
        "draft_vocab": str(exit_cfg.draft_vocab),
        "context_layer": str(exit_cfg.context_layer),
        "fuse_layers": json.dumps(list(exit_cfg.fuse_layers)),
        "base_name": base_name,
        "base_fingerprint": base_fingerprint,
        "extra": json.dumps(extra or {}),
    }
    if dtype not in (None, "float16", "float32"):
        raise ValueError(f"exit file dtype must be float16 or float32, got {dtype!r}")
    flat = {k: np.asarray(v) for k, v in _flatten(jax.device_get(exit_params)).items()}
    flat = model.cast_params(flat, dtype or "float32")
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def read_exit_metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: exits are loaded only from .safetensors files")
    if not path.is_file():
        raise ValueError(f"no such exit file: {path}")
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not an eesd_jax exit file (metadata format={meta.get('format')!r})")
    missing = [k for k in ("exit_layer", "own_head", "base_name", "base_fingerprint") if k not in meta]
    if missing:
        raise ValueError(f"{path.name}: exit metadata lacks {', '.join(missing)}")
    return meta


def load_exit(
    path: str | os.PathLike, cfg: ModelConfig, base_fingerprint: str, layer: int | None = None
) -> tuple[ExitConfig, Params]:
    """Load an exit, refusing one made for another base model or another N."""
    from safetensors.numpy import load_file

    from eesd_jax.loading import _unflatten

    meta = read_exit_metadata(path)
    exit_cfg = ExitConfig(
        layer=int(meta["exit_layer"]),
        own_head=meta["own_head"] == "True",
        draft_vocab=int(meta.get("draft_vocab", 0)),
        context_layer=int(meta.get("context_layer", 0)),
        fuse_layers=tuple(json.loads(meta.get("fuse_layers", "[]"))),
    )
    if meta["base_fingerprint"] != base_fingerprint:
        raise ValueError(
            f"{pathlib.Path(path).name} was trained for base model {meta['base_name']!r} "
            f"(fingerprint {meta['base_fingerprint'][:12]}), not this one ({base_fingerprint[:12]})"
        )
    if layer is not None and layer != exit_cfg.layer:
        raise ValueError(f"{pathlib.Path(path).name} is an exit after layer {exit_cfg.layer}, not {layer}")
    exit_cfg.validate(cfg)
    stored = load_file(str(path))
    dt = np.dtype(cfg.dtype)  # Exits may be stored in a narrower float type (save_exit dtype=).
    stored = {k: v.astype(dt) if np.issubdtype(v.dtype, np.floating) else v for k, v in stored.items()}
    params = jax.tree.map(jnp.asarray, _unflatten(stored))
    ids = np.arange(exit_cfg.draft_vocab) if exit_cfg.draft_vocab else None
    expected = jax.eval_shape(lambda p: init_exit(cfg, p, exit_cfg, ids), _shapes_only(cfg))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or jax.tree.leaves(expected) != jax.tree.leaves(got):
        raise ValueError(f"{pathlib.Path(path).name}: tensor names or shapes do not match this model's exit")
    return exit_cfg, params


def _shapes_only(cfg: ModelConfig) -> Params:
    return jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
