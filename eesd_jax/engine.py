"""A loaded model and its EESD engine: what the `eesd` command and the experiments decode with.

from eesd_jax import engine
session = engine.load_session(None)                # The bundled SmolLM2, decode layout.
eng = engine.eesd_engine(session)                  # Its shipped exit, default controller.
ids = engine.encode_prompt(session, "Write a haiku.", chat=None)
gen = engine.decode(session, [ids], 64, eng)       # eng=None: AR.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from eesd_jax import bench, control, eesd, exits, generate, loading, mesh_loading, model, prompts, sharding, shipped
from eesd_jax.model import ModelConfig, Params
from eesd_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class Session:
    """A loaded model, its params on device (model.decode_layout) and its tokenizer."""

    lm: loading.LoadedModel  # params left as loaded; use `params`.
    params: Params  # The same params as jax arrays, in the decode layout (sharded over `mesh` if given).
    tokenizer: object  # None for random weights (bench --random-shape): prompts are token ids.
    load_seconds: float
    mesh: jax.sharding.Mesh | None = None  # From --mesh, or None (one device).

    @property
    def cfg(self) -> ModelConfig:
        return self.lm.cfg

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """generation_config.json's EOS ids (a folder's), then the tokenizer's."""
        return loading.eos_ids(getattr(self.lm, "source", ""), self.tokenizer)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


@dataclasses.dataclass(frozen=True)
class Engine:
    """What EESD decodes with besides the model: its config, the exit and the model's layers split at N."""

    ecfg: eesd.EESDConfig
    exit_params: Params
    split: Params  # eesd.split_params at the exit layer (and context and fuse layers).
    exit_path: str | None  # None: untrained (the LLM's last block on top of layer N).


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk (next to the converted params), so that repeated
    `eesd` invocations skip most of the JIT compile. JAX_COMPILATION_CACHE_DIR overrides."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(loading.cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_session(
    model_path: str | None = None, mesh_spec: str | None = None, dtype: str = "float32", random_shape: str | None = None
) -> Session:
    """Load weights from an HF folder / GGUF file (None: the bundled SmolLM2) and the tokenizer, in `dtype`.

    random_shape (a bench.RANDOM_SHAPES name): random weights at that shape instead, no tokenizer.
    """
    enable_compilation_cache()
    t0 = time.perf_counter()
    mesh = sharding.mesh_from_spec(mesh_spec)
    if random_shape:
        cfg, params = bench.random_model(random_shape, dtype)
        lm = loading.LoadedModel(cfg, params, fingerprint=f"random:{random_shape}", source=f"random:{random_shape}")
    else:  # An HF folder is read slice by slice straight onto the mesh.
        lm = mesh_loading.load_model(model_path, dtype, mesh)
    params = model.decode_layout(jax.tree.map(jnp.asarray, lm.params))
    if mesh is not None:  # Megatron tensor parallel over 'model', batch over 'data'.
        params = sharding.shard_params(params, mesh)
    tokenizer = None if random_shape else lm.tokenizer()
    return Session(lm=lm, params=params, tokenizer=tokenizer, load_seconds=time.perf_counter() - t0, mesh=mesh)


def encode_prompt(session: Session, text: str, chat: bool | None, context: prompts.Context = ()) -> list[int]:
    """Token ids of one prompt (after a conversation's earlier turns); chat=None applies the chat
    template when the tokenizer has one."""
    use_chat = session.has_chat_template if chat is None else chat
    return prompts.encode(session.tokenizer, text, use_chat, context)


def eesd_engine(
    session: Session,
    exit_path: str | None = None,
    exit_layer: int | None = None,
    max_draft: int = 6,
    controller: str = control.ControllerConfig.kind,
    tree: int = 0,
    tree_stop: float = 0.0,
    tree_width_stop: float = 0.0,
    tree_width: int = 4,
) -> Engine:
    """The EESD engine for an exit file (default: the shipped exit for the model, at exit_layer if given;
    none shipped: an untrained exit at exit_layer, default L/4), a draft cap and a controller spec, or
    a draft tree of `tree` nodes per round, tree_width per depth (its depth chosen per round with
    tree_stop > 0, its width with tree_width_stop > 0)."""
    exit_path = exit_path or shipped.default_exit(session.lm, exit_layer)
    if exit_path:
        exit_cfg, exit_params = exits.load_exit(exit_path, session.cfg, session.lm.fingerprint, exit_layer)
    else:  # Untrained: the LLM's last block on top of layer N. Correct, but drafts poorly.
        exit_cfg = exits.ExitConfig(exit_layer or max(1, session.cfg.n_layers // 4))
        exit_params = exits.init_exit(session.cfg, session.params, exit_cfg)
    if session.mesh is not None:
        exit_params = sharding.shard_exit_params(exit_params, session.mesh)
    ecfg = eesd.config_for_exit(
        exit_cfg, exit_path, max_draft, controller, tree, tree_stop, tree_width_stop, tree_width=tree_width
    )
    ecfg.validate(session.cfg)
    split = eesd.split_params(session.params, ecfg.exit_layer, ecfg.context_layer, ecfg.fuse_layers)
    return Engine(ecfg, exit_params, split, str(exit_path) if exit_path else None)


def bench_setup(session: Session, eng: Engine) -> bench.BenchSetup:
    """What bench.run times AR and EESD with."""
    return bench.BenchSetup(session.cfg, session.params, eng.exit_params, eng.ecfg, session.eos_ids, session.mesh)


def decode(
    session: Session,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    eng: Engine | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    on_tokens: Callable | None = None,
) -> generate.Generation:
    """Vanilla autoregressive decoding (eng None: the baseline), or EESD with `eng`: the same tokens as AR
    (greedy) or the same distribution."""
    common = dict(sampling=sampling, eos_ids=session.eos_ids, seed=seed, on_tokens=on_tokens, mesh=session.mesh)
    if eng is None:
        return generate.generate_ar(session.cfg, session.params, prompt_ids, max_new_tokens, **common)
    return generate.generate_eesd(
        session.cfg, session.params, eng.exit_params, eng.ecfg, prompt_ids, max_new_tokens, split=eng.split, **common
    )
