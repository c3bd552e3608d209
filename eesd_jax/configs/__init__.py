"""Experiment configs: ml_collections `get_config(arg)` files, and how to load them.

A config is named by a spec "PATH[:ARG]": PATH is a .py file defining get_config(arg)
or the stem of a file in this folder ("tiny", "smollm2"). ARG is passed to get_config as
a string (absl config_flags style); the files here read it with `apply_overrides`:
comma-separated `key=value` items, e.g. "smollm2:N=4,draft_vocab=8192,train.steps=300".
A bare integer item means the exit layer N ("smollm2:4").

Every config has the sections of `REQUIRED` (tests/test_configs.py checks each file here).
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).parent

# Section -> fields every config must have (values are the config's own business).
REQUIRED = {
    "": ("name",),
    "model": ("source",),
    "exit": ("layer", "own_head", "draft_vocab", "context_layer"),
    "data": (
        "dir",
        "sets",
        "n_per_set",
        "samples_per_prompt",
        "max_prompt_tokens",
        "max_new_tokens",
        "temperature",
        "top_p",
        "batch_size",
        "seed",
        "top_k",
        "feature_layers",
        "response_tokens",
        "text",
    ),
    "train": (
        "steps",
        "batch_size",
        "seq_len",
        "seq_bucket",
        "lr",
        "end_lr_frac",
        "warmup_steps",
        "weight_decay",
        "clip_norm",
        "kl_weight",
        "ce_weight",
        "prompt_weight",
        "train_head",
        "val_every_prompt",
        "val_every",
        "seed",
        "ckpt_every",
        "max_to_keep",
        "log_every",
        "max_round",
    ),
    "eval": ("sets", "n_per_set", "max_new_tokens", "max_draft", "controller"),
}

# Short names accepted in ARG (besides full dotted paths).
ALIASES = {
    "model": "model.source",
    "N": "exit.layer",
    "layer": "exit.layer",
    "own_head": "exit.own_head",
    "draft_vocab": "exit.draft_vocab",
    "context": "exit.context_layer",
    "fuse": "exit.fuse_layers",
    "steps": "train.steps",
    "lr": "train.lr",
    "n_per_set": "data.n_per_set",
    "max_new": "data.max_new_tokens",
    "temperature": "data.temperature",
    "seed": "train.seed",
    "text": "data.text.corpus",
}


def available() -> list[str]:
    """Names of the config files in this folder."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def _parse_value(text: str, like):
    """`text` as the type of the existing value `like`."""
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, (tuple, list)):
        items = text.replace("+", " ").split()  # "a+b": commas already separate overrides.
        elem = like[0] if like else None
        if isinstance(elem, str):
            return tuple(items)
        return tuple(_literal(t) if elem is None else _parse_value(t, elem) for t in items)
    if isinstance(like, str):
        return text
    return _literal(text)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply "key=value,key=value" (or a bare int = exit layer) to `config` in place.

    Keys are dotted paths ("train.steps") or ALIASES ("N"). Values take the type of
    the field they replace; tuple fields take '+'-separated items ("sets=chat:train+humaneval:train").
    """
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            if item.lstrip("-").isdigit():
                item = f"N={item}"
            else:
                raise ValueError(f"config override {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        path = ALIASES.get(key, key).split(".")
        node = config
        for part in path[:-1]:
            if part not in node:
                raise ValueError(f"config has no section {part!r} (override {item!r})")
            node = node[part]
        if path[-1] not in node:
            raise ValueError(f"config has no field {'.'.join(path)!r} (override {item!r})")
        with node.ignore_type():
            node[path[-1]] = _parse_value(value, node[path[-1]])
    return config


def split_spec(spec: str) -> tuple[str, str | None]:
    """ "path/to/file.py:arg" or "name:arg" -> (path or name, arg or None)."""
    if ".py:" in spec:
        path, arg = spec.split(".py:", 1)
        return path + ".py", arg
    if spec.endswith(".py") or ":" not in spec:
        return spec, None
    name, arg = spec.split(":", 1)
    return name, arg


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load a config from "PATH[:ARG]" (PATH: a .py file, or a name in eesd_jax/configs/)."""
    target, arg = split_spec(spec)
    path = pathlib.Path(target)
    if path.suffix != ".py":
        path = CONFIG_DIR / f"{target}.py"
        if not path.is_file():
            raise ValueError(f"unknown config {target!r}: give a .py file or one of {', '.join(available())}")
    if not path.is_file():
        raise ValueError(f"no such config file: {path}")
    module_name = f"_eesd_config_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(module_name, None)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg)")
    config = module.get_config(arg)
    check_config(config, str(path))
    return config


def check_config(config: ml_collections.ConfigDict, where: str = "config") -> None:
    """Raise ValueError naming every required field the config lacks."""
    missing = []
    for section, fields in REQUIRED.items():
        node = config if not section else config.get(section)
        if node is None:
            missing.append(section)
            continue
        missing += [f"{section + '.' if section else ''}{f}" for f in fields if f not in node]
    if missing:
        raise ValueError(f"{where} lacks required fields: {', '.join(missing)}")


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every config; files override what they need."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.model = ml_collections.ConfigDict()
    c.model.source = "bundled"  # "bundled" (SmolLM2-135M-Instruct), "tiny", an HF folder or a .gguf file.
    c.model.dtype = "float32"  # The teacher's params, activations and caches (eesd distill --dtype sets it).
    c.mesh = ""  # "data=D,model=M": the teacher sharded over a device mesh (eesd distill --mesh sets it).

    c.exit = ml_collections.ConfigDict()
    c.exit.layer = 6  # N: the exit reads the hidden state after the first N layers.
    c.exit.own_head = False  # Full-vocabulary own head (trainable) instead of the LLM's frozen one.
    c.exit.draft_vocab = 0  # >0: own head over the most frequent draft_vocab tokens of the data.
    c.exit.file_dtype = "float32"  # Float type of the exported file; "float16" halves it.
    c.exit.context_layer = 0  # c > N: attend over layer-c states at verified positions (exits.ExitConfig).
    # Layers in [N, L] whose states at the previous position the exit's input fuses (exits.ExitConfig).
    c.exit.fuse_layers = ()
    # COST-EFF multi-exit training: exits at these N too, from the same data and batches (train.run_joint).
    c.exit.joint_layers = ()

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # Where data lives; "" = WORKDIR/data. Share one dir between runs for other N.
    c.data.sets = ("chat:train", "humaneval:train")  # prompts.load_prompts(source, split) sets.
    c.data.n_per_set = 0  # First n prompts of each set; 0 = all.
    c.data.samples_per_prompt = 1  # Responses per prompt (different sampling keys).
    c.data.max_prompt_tokens = 512  # Longer prompts keep their last tokens.
    c.data.max_new_tokens = 128
    c.data.temperature = 0.7  # 0 = greedy responses.
    c.data.top_p = 0.95
    c.data.batch_size = 8  # Generation and teacher-pass batch.
    c.data.shard_size = 1024  # Sequences per data shard (whole generation batches): a stopped run redoes at most one.
    c.data.seed = 0
    c.data.top_k = 64  # Teacher log-probs stored per position.
    c.data.feature_layers = ()  # Extra N whose layer-N hidden states the teacher pass also stores.
    c.data.response_tokens = 0  # Trained positions drawn from the responses' training split (0 = all).
    # Teacher-forced text (eesd_jax.corpus) trained on besides, or instead of, the sampled responses.
    c.data.text = ml_collections.ConfigDict()
    c.data.text.corpus = ""  # "" = none; "readmes" or a path.
    c.data.text.dir = ""  # Where its data lives; "" = WORKDIR/text_data.
    c.data.text.seq_len = 512  # Tokens per sequence the corpus is cut into.
    c.data.text.max_tokens = 0  # Trained positions drawn from it (0 = all).
    c.data.text.only = False  # Train on the text alone (the responses' validation split still validates).
    # Use the text data already in data.text.dir as made, without reading the corpus again (its
    # manifest names the corpus and its sha256; "readmes" changes whenever packages are installed).
    c.data.text.frozen = False

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300
    c.train.batch_size = 8  # Sequences per step.
    c.train.seq_len = 512  # Longer sequences keep their last seq_len positions.
    c.train.seq_bucket = 64  # A batch is padded to a multiple of this (few compiled shapes).
    c.train.lr = 1e-4
    c.train.end_lr_frac = 0.1  # Cosine decay ends at lr * end_lr_frac.
    c.train.warmup_steps = 20
    c.train.weight_decay = 0.01
    c.train.clip_norm = 1.0
    c.train.kl_weight = 1.0  # KL(teacher top-k || draft).
    c.train.ce_weight = 0.0  # CE on the teacher's sampled tokens.
    c.train.prompt_weight = 0.0  # Loss weight of prompt positions (response positions weigh 1).
    c.train.train_head = True  # Train the exit's own head (own_head / draft_vocab); shared heads stay frozen.
    c.train.val_every_prompt = 0  # k > 0: prompts with index % k == k - 1 are held out for validation.
    c.train.val_every = 50  # Validation KL / top-1 every this many steps (and at the end).
    c.train.seed = 0  # Data order.
    c.train.ckpt_every = 100
    c.train.max_to_keep = 2
    c.train.log_every = 10
    c.train.max_round = 4  # With a context layer: simulated draft rounds are 1..max_round tokens long.

    c.eval = ml_collections.ConfigDict()
    c.eval.sets = ("chat:heldout", "humaneval:heldout")
    c.eval.n_per_set = 8
    c.eval.max_new_tokens = 128
    c.eval.max_draft = 8
    c.eval.controller = "confidence"
    return c
