"""GGUF files -> (ModelConfig, float32 params) and their embedded tokenizer (llama architecture).

Tensors are dequantized with the `gguf` package, llama.cpp's interleaved Q/K rows are put back in
rotate-half order, and the converted params are cached on disk as safetensors keyed by the file's
sha256 (the bundled model then loads in seconds). loading.load_model is the entry point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from eesd_jax.loading import (
    CheckpointError,
    LoadedModel,
    _flatten,
    _unflatten,
    atomic_write,
    cache_dir,
    config_from_hf,
    damage_reported,
    open_safetensors,
    params_from_tensors,
    sha256_file,
)
from eesd_jax.model import ModelConfig

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_name_to_hf(name: str) -> str:
    if name in _GGUF_TO_HF:
        return _GGUF_TO_HF[name]
    parts = name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK_TO_HF[parts[2]]}.{parts[3]}"
    return name


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows (back to rotate-half order)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key, default=None):
    """A GGUF metadata value: str, number, or a list of them (arrays)."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        parts = [field.parts[i] for i in field.data]
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(p).decode("utf-8") for p in parts]
        return [p.tolist()[0] for p in parts]
    part = field.parts[field.data[0]]
    return bytes(part).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]


def _gguf_metadata(reader, prefix: str) -> dict[str, Any]:
    """Every metadata field whose key starts with prefix, decoded."""
    return {key: _gguf_field(reader, key) for key in reader.fields if key.startswith(prefix)}


def open_gguf(path: pathlib.Path):
    """gguf.GGUFReader over path (it parses every header and tensor extent), a damaged file a CheckpointError."""
    import gguf

    with damage_reported(path, "GGUF"):
        return gguf.GGUFReader(str(path))


def _convert_gguf(path: pathlib.Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    import gguf

    reader = open_gguf(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path.name}: unsupported GGUF architecture {arch!r}; eesd_jax reads 'llama' GGUF files")
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[_gguf_name_to_hf(t.name)] = data.reshape([int(d) for d in reversed(t.shape)])
    if "model.embed_tokens.weight" not in tensors:
        raise CheckpointError(f"{path.name}: tensor 'token_embd.weight' is missing")
    sizes = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    invalid = [f"llama.{k}" for k in sizes if not isinstance(v := _gguf_field(reader, f"llama.{k}"), int) or v < 1]
    if invalid:
        raise CheckpointError(f"{path.name}: metadata {', '.join(invalid)} missing or invalid")
    heads = _gguf_field(reader, "llama.attention.head_count")
    scaling = _gguf_field(reader, "llama.rope.scaling.type", "none")
    kv_heads = _gguf_field(reader, "llama.attention.head_count_kv", heads)
    d_model = _gguf_field(reader, "llama.embedding_length")
    hf = {
        "model_type": "llama",
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "hidden_size": d_model,
        "num_hidden_layers": _gguf_field(reader, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _gguf_field(reader, "llama.attention.key_length", d_model // heads),
        "intermediate_size": _gguf_field(reader, "llama.feed_forward_length"),
        "rope_theta": _gguf_field(reader, "llama.rope.freq_base", 10000.0),
        "rms_norm_eps": _gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        "max_position_embeddings": _gguf_field(reader, "llama.context_length", 4096),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "rope_scaling": {"rope_type": "default" if scaling in ("none", None) else scaling},
    }
    try:
        cfg = config_from_hf(hf, name=_gguf_field(reader, "general.name", path.stem))
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    for i in range(cfg.n_layers):
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        tensors[q] = _unpermute(tensors[q], cfg.n_heads)
        tensors[k] = _unpermute(tensors[k], cfg.n_kv_heads)
    return cfg, tensors


def load_gguf(path: str | os.PathLike, use_cache: bool = True) -> LoadedModel:
    """Load a llama-architecture GGUF file as float32 params (cached by sha256)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file (bad magic)")
    digest = sha256_file(path)
    cached = cache_dir() / "params" / f"{digest}.safetensors"
    if use_cache and cached.is_file():
        try:
            with open_safetensors(cached) as f:
                cfg = ModelConfig(**json.loads(f.metadata()["model_config"]))
                params = _unflatten({key: f.get_tensor(key) for key in f.keys()})
            return LoadedModel(cfg=cfg, params=params, fingerprint=digest, source=str(path))
        except CheckpointError:
            pass  # A damaged cache file (a full disk, say) is rebuilt from the GGUF below.
    with damage_reported(path, "GGUF"):  # A header that parses can still describe nonsense.
        cfg, tensors = _convert_gguf(path)
    params = params_from_tensors(path.name, cfg, tensors)
    if use_cache:
        meta = {"model_config": json.dumps(dataclasses.asdict(cfg)), "source_sha256": digest}
        atomic_write(cached, lambda tmp: save_file(_flatten(params), tmp, metadata=meta))
    return LoadedModel(cfg=cfg, params=params, fingerprint=digest, source=str(path))


# Bump when gguf_tokenizer.build changes what it makes, so stale cached tokenizers are rebuilt.
TOKENIZER_CACHE_FORMAT = 1


def gguf_tokenizer(path: pathlib.Path):
    """(tokenizers.Tokenizer, wrapper config) of a GGUF file, built once and cached by sha256."""
    from tokenizers import Tokenizer

    from eesd_jax import gguf_tokenizer as builder

    cached = cache_dir() / "tokenizers" / f"{sha256_file(path)}.v{TOKENIZER_CACHE_FORMAT}.json"
    if cached.is_file():
        try:
            saved = json.loads(cached.read_text("utf-8"))
            return Tokenizer.from_str(saved["tokenizer"]), saved["config"]
        except Exception:  # Our own cache file, damaged somehow (tokenizers raises bare Exception): rebuild it.
            pass
    with damage_reported(path, "GGUF"):
        meta = _gguf_metadata(open_gguf(path), "tokenizer.")
    try:
        tok, config = builder.build(meta)
    except builder.TokenizerMetadataError as e:
        raise CheckpointError(f"{path}: {e}") from None
    saved = json.dumps({"tokenizer": tok.to_str(), "config": config})
    atomic_write(cached, lambda tmp: pathlib.Path(tmp).write_text(saved, "utf-8"))
    return tok, config
