"""The frozen teacher LLM for self-distillation: a loaded model or a tiny random one, and its forward pass.

`LM` bundles what the data-making needs (config, params, identity, tokenizer, EOS ids);
`load_lm` builds it from a config's `model` section, `as_lm` from a loaded model or an
engine.Session. `run_teacher` is one forward of the frozen LLM over flat sequences,
returning the layer-N hidden states the exit trains on and the teacher's top-k targets.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import engine, loading, model, prompts, sharding
from eesd_jax.kv_cache import init_cache, round_up
from eesd_jax.model import ModelConfig, Params


def progress_bar(progress: bool, **kw):
    """A tqdm bar (disabled unless `progress`)."""
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kw)


class ByteTokenizer:
    """A toy tokenizer for tiny random models: one id per UTF-8 byte (id 0 is left for EOS)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [1 + b % (self.vocab_size - 1) for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of ids; with skip_special_tokens, without EOS (id 0), as transformers' tokenizers do."""
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) == 0)]
        return bytes((i - 1) % 256 for i in ids).decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class LM:
    """The frozen teacher: model, params (jax arrays), identity, tokenizer, EOS ids."""

    cfg: ModelConfig
    params: Params
    fingerprint: str
    name: str
    tokenizer: object  # transformers tokenizer or ByteTokenizer.
    eos_ids: tuple[int, ...]

    def encode(self, prompt: prompts.Prompt) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(prompt.text)
        return prompts.encode(self.tokenizer, prompt.text, prompt.chat, prompt.context)


def tiny_lm(spec) -> LM:
    """A random LLaMA from a config.model.tiny section; fingerprint = hash of the spec."""
    spec = dict(spec)
    init_seed, scale, eos = spec.pop("init_seed"), spec.pop("init_scale"), spec.pop("eos_id")
    cfg = ModelConfig(name="tiny-random", **spec)
    # model.init_params' layout, drawn with numpy (compiling jax's RNG costs seconds on CPU).
    params = jax.tree.map(jnp.asarray, model.random_params(cfg, np.random.default_rng(init_seed), scale))
    ident = json.dumps(
        {"cfg": dataclasses.asdict(cfg), "seed": init_seed, "scale": scale, "init": "numpy/1"}, sort_keys=True
    )
    return LM(cfg, params, hashlib.sha256(ident.encode()).hexdigest(), cfg.name, ByteTokenizer(cfg.vocab_size), (eos,))


def load_lm(model_cfg) -> LM:
    """The teacher named by a config's `model` section ("tiny", "bundled", a folder or .gguf)."""
    if model_cfg.source == "tiny":
        return tiny_lm(model_cfg.tiny)
    lm = loading.load_model(None if model_cfg.source in ("bundled", "", None) else model_cfg.source)
    return as_lm(lm)


def as_lm(obj: LM | loading.LoadedModel | engine.Session) -> LM:
    """An LM from an LM, a loading.LoadedModel or an engine.Session."""
    if isinstance(obj, LM):
        return obj
    if isinstance(obj, engine.Session):
        tok = obj.tokenizer
        params, loaded = obj.params, obj.lm
    else:
        loaded, tok = obj, obj.tokenizer()
        params = jax.tree.map(jnp.asarray, obj.params)
    from eesd_jax import loading

    eos = loading.eos_ids(getattr(loaded, "source", ""), tok)  # generation_config.json's, then the tokenizer's.
    return LM(loaded.cfg, params, loaded.fingerprint, loaded.cfg.name, tok, eos)


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def _teacher_batch(cfg, params, segments, tokens_bt, top_k):
    """Hidden states after each segment's last layer; teacher top-k log-probs if top_k > 0."""
    B, T = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    hiddens, _ = model.run_segments(cfg, segments, model.embed(params, tokens_bt), positions, init_cache(cfg, B, T))
    if not top_k:
        return hiddens, None, None
    values, ids = top_k_logprobs(model.lm_head(params, model.final_norm(params, cfg, hiddens[-1])), top_k)
    return hiddens, values, ids


def top_k_logprobs(logits: jax.Array, k: int, group: int = 64) -> tuple[jax.Array, jax.Array]:
    """The k largest log-probs of the softmax over the last axis, and their ids (int32), largest first.

    Exact, without sorting the vocabulary (XLA's top_k sorts it: ~1 ms per position at 49k on
    this CPU, experiments/teacher_topk.py): the k largest entries lie in the k groups of `group`
    consecutive ids with the largest maxima, so the top k of those k * group entries are the answer
    (among equal entries either may be picked). Falls back to a plain top_k for small vocabularies.
    """
    *lead, V = logits.shape
    lse = jax.nn.logsumexp(logits, -1, keepdims=True)
    if V % group or V // group < 4 * k:
        values, ids = jax.lax.top_k(logits, k)
        return values - lse, ids.astype(jnp.int32)
    groups = logits.reshape(*lead, V // group, group)
    _, g = jax.lax.top_k(jnp.max(groups, -1), k)  # [..., k] the groups with the k largest maxima.
    candidates = jnp.take_along_axis(groups, g[..., None], -2).reshape(*lead, k * group)
    values, j = jax.lax.top_k(candidates, k)
    ids = jnp.take_along_axis(g, j // group, -1) * group + j % group
    return values - lse, ids.astype(jnp.int32)


def run_teacher(
    lm: LM,
    tokens: np.ndarray,
    offsets: np.ndarray,
    layers: Sequence[int],
    top_k: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "teacher",
):
    """One pass of the frozen LLM over every sequence.

    Returns ({n: [total, D] hidden after layer n}, [total, C] top-k log-probs, [total, C] ids),
    flat like `tokens`; n = L is the final state (before the final norm).
    With top_k = 0 only the first max(layers) layers run.
    """
    cfg = lm.cfg
    layers = sorted(set(int(n) for n in layers))
    if any(not 1 <= n <= cfg.n_layers for n in layers):
        raise ValueError(f"feature layers {layers} must be in [1, {cfg.n_layers}]")
    bounds = sorted(set(layers) | ({cfg.n_layers} if top_k else set()))
    starts = tuple([0] + bounds[:-1])
    segments = [jax.tree.map(lambda w, a=a, b=b: w[a:b], lm.params["layers"]) for a, b in zip(starts, bounds)]
    lengths = np.diff(offsets)
    total = int(offsets[-1])
    hidden = {n: np.zeros((total, cfg.d_model), np.float32) for n in layers}
    top_logp = np.zeros((total, top_k), np.float32)
    top_ids = np.zeros((total, top_k), np.int32)
    order = np.argsort(lengths, kind="stable")
    mesh = sharding.mesh_of(lm.params)
    bar = progress_bar(progress, total=len(order), desc=desc, unit="seq")
    i = 0
    while i < len(order):
        T = round_up(int(lengths[order[min(i + batch_size, len(order)) - 1]]), 64)
        rows = max(1, min(batch_size, 2048 // T))  # Bounds the memory of the [B, T, V] logits.
        idx = order[i : i + rows]
        tok = np.zeros((rows, T), np.int32)
        for r, k in enumerate(idx):
            tok[r, : lengths[k]] = tokens[offsets[k] : offsets[k + 1]]
        tok = sharding.shard_rows(tok, mesh)  # Rows over 'data' (where they divide), the LLM as its params lie.
        hs, logp, ids = sharding.fetch(_teacher_batch(cfg, lm.params, segments, tok, top_k))
        for r, k in enumerate(idx):
            a, b, n = offsets[k], offsets[k + 1], lengths[k]
            for layer, h in zip(bounds, hs):
                if layer in hidden:
                    hidden[layer][a:b] = h[r, :n]
            if top_k:
                top_logp[a:b], top_ids[a:b] = logp[r, :n], ids[r, :n]
        i += len(idx)
        bar.update(len(idx))
    bar.close()
    return hidden, top_logp, top_ids
