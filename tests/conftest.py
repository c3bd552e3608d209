"""Fixtures: cache isolation, tiny Hugging Face checkpoints, a tiny random JAX model, a tiny distilled
exit and the bundled SmolLM2. The tiers and the --parity option live in plugin.py; what tests import
by name (golden fixtures, the HF writer, our uncached forward, load_experiment) in helpers.py.

Nothing here writes outside pytest's temporary directories: EESD_JAX_CACHE points at a session temp
dir (or at $EESD_JAX_TEST_CACHE, to reuse a converted bundled model across runs), and tests that
check what loading writes point it at their own tmp_path.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from helpers import golden_hf, random_tensors, write_hf_checkpoint

pytest_plugins = ["plugin"]

# Reference comparisons are float32 against float32: keep accelerator matmuls at full precision
# (the default on CPU already; on GPU/TPU the default would use bf16/tf32 passes).
jax.config.update("jax_default_matmul_precision", "highest")


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
    """The CLI keeps compiled programs on disk (engine.enable_compilation_cache), a process-wide
    setting: after one in-process CLI test every later compile of the session would be written
    there. A full run crashed (SIGSEGV) inside jax's cache writer that way; tests compile fresh."""
    from eesd_jax import engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "enable_compilation_cache", lambda: None)
        yield


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> pathlib.Path:
    """A fresh, empty (not yet created) EESD_JAX_CACHE for one test."""
    path = tmp_path / "eesd_cache"
    monkeypatch.setenv("EESD_JAX_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """get(name, shards=1) -> (record, folder): a recorded checkpoint (tiny_hf.json) written once per session.

    Names: the kinds make_golden.py builds (llama_mha, llama_gqa, llama_gqa_tied, llama_mqa_wide_heads,
    qwen2, mistral), each with transformers' logits recorded, and llama_gqa+attention_bias / +mlp_bias.
    """
    made = {}

    def get(name: str, shards: int = 1):
        if (name, shards) not in made:
            record = golden_hf()[0]["checkpoints"][name]
            folder = tmp_path_factory.mktemp(f"hf_{name}_{shards}")
            write_hf_checkpoint(folder, record["config"], random_tensors(record["tensors"], record["seed"]), shards)
            made[name, shards] = (record, folder)
        return made[name, shards]

    return get


@pytest.fixture(scope="session")
def lm():
    """The tiny config's random teacher (teacher.LM): the distillation tests' LLM."""
    from eesd_jax import configs, teacher

    return teacher.load_lm(configs.load_config("tiny").model)


@pytest.fixture(scope="session")
def tiny_exit(tmp_path_factory) -> str:
    """An exit distilled with the tiny config's recipe (seconds): the experiments scripts' --exit."""
    from eesd_jax import configs, train

    return str(train.run_distill(configs.load_config("tiny"), tmp_path_factory.mktemp("exit"), progress=False))


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


@pytest.fixture(scope="session")
def smollm():
    """Our LoadedModel of the bundled SmolLM2 (load_model() with no arguments)."""
    from eesd_jax import loading

    loaded = loading.load_model()
    # On device once, instead of a host-to-device copy of 0.5 GB in every jitted call.
    return dataclasses.replace(loaded, params=jax.device_put(loaded.params))
