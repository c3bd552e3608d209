"""Every config file under eesd_jax/configs/ loads and has the required fields; ARG overrides work."""

from __future__ import annotations

import pytest

from eesd_jax import configs, model, sharding
from eesd_jax.configs import _pod


@pytest.mark.parametrize("name", configs.available())
def test_every_config_file_loads(name):
    c = configs.load_config(name)  # load_config checks REQUIRED itself; check again explicitly.
    configs.check_config(c, name)
    assert c.exit.layer >= 1 and c.train.steps >= 1 and c.data.top_k >= 1
    assert c.data.sets and c.eval.sets
    assert c.train.ckpt_every >= 1 and c.train.max_to_keep >= 1
    # The same file by path, with an argument.
    by_path = configs.load_config(f"{configs.CONFIG_DIR / name}.py:train.steps=7")
    assert by_path.train.steps == 7 and by_path.exit.layer == c.exit.layer


def test_expected_configs_exist():
    assert {"tiny", "smollm2", "llama2-7b-chat", "llama3.1-8b-instruct", "qwen2.5-7b-instruct"} <= set(
        configs.available()
    )


POD = {"llama2-7b-chat": "llama2-7b", "llama3.1-8b-instruct": "llama3.1-8b", "qwen2.5-7b-instruct": "qwen2.5-7b"}


@pytest.mark.parametrize("name", sorted(POD))
@pytest.mark.parametrize("hw", sorted(_pod.HARDWARE))
def test_pod_presets_fit_their_hardware(name, hw):
    """Each 7B/8B config's preset: a mesh using every chip, batches split evenly over 'data', and the
    dominant per-chip memory of generation and the teacher pass under 85% of HBM."""
    c = configs.load_config(f"{name}:hw={hw}")
    spec, preset = sharding.parse_mesh(c.mesh), _pod.HARDWARE[hw]
    assert spec["data"] * spec["model"] == preset.chips
    assert c.data.batch_size % spec["data"] == 0 and c.train.batch_size % spec["data"] == 0
    seq = c.data.max_prompt_tokens + c.data.max_new_tokens + 32
    shape = _pod.SHAPES[POD[name]]
    assert _pod.memory_per_chip_gb(shape, preset, c.data.batch_size, seq)["total"] < 0.85 * preset.hbm_gb
    assert c.model.dtype == "bfloat16" and 1 <= c.exit.layer < shape["n_layers"]


def test_pod_shapes_are_the_real_models():
    """Parameter counts as published (6.74 B, 8.03 B, 7.62 B); LLaMA-3.1's RoPE scaling parses into ModelConfig."""
    counts = {k: round(_pod.param_count(s) / 1e9, 2) for k, s in _pod.SHAPES.items()}
    assert counts == {"llama2-7b": 6.74, "llama3.1-8b": 8.03, "qwen2.5-7b": 7.62}
    assert model.ModelConfig(**_pod.SHAPES["llama3.1-8b"]).rope_scaling == (8.0, 1.0, 4.0, 8192)


def test_pod_overrides_win_over_the_preset():
    c = configs.load_config("llama3.1-8b-instruct:hw=v5e-8,data.batch_size=16,model=/ckpt/llama")
    assert (c.mesh, c.data.batch_size, c.train.batch_size, c.model.source) == ("data=4,model=2", 16, 32, "/ckpt/llama")
    with pytest.raises(ValueError, match="hw must be one of"):
        configs.load_config("qwen2.5-7b-instruct:hw=v3-8")


def test_smollm2_arg_selects_n_and_draft_vocab():
    assert configs.load_config("smollm2:4").exit.layer == 4
    c = configs.load_config("smollm2:N=8,draft_vocab=4096,own_head=false,data.sets=chat:train+humaneval:heldout")
    assert (c.exit.layer, c.exit.draft_vocab, c.exit.own_head) == (8, 4096, False)
    assert c.data.sets == ("chat:train", "humaneval:heldout")
    assert c.name == "smollm2-N8-dv4096"
    shipped = configs.load_config("smollm2")  # The default shipped exit's recipe.
    assert (shipped.exit.layer, shipped.exit.context_layer, shipped.name) == (2, 0, "smollm2-N2-dv8192")
    assert configs.load_config("smollm2:context=29").name == "smollm2-N2-c29-dv8192"
    assert configs.load_config("smollm2:data.feature_layers=2+4+6").data.feature_layers == (2, 4, 6)
    assert configs.load_config("smollm2:train.lr=3e-4").train.lr == 3e-4


def test_bad_specs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown config"):
        configs.load_config("nope")
    with pytest.raises(ValueError, match="no field"):
        configs.load_config("tiny:train.nope=1")
    with pytest.raises(ValueError, match="not key=value"):
        configs.load_config("tiny:oops")
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import ml_collections\ndef get_config(arg=None):\n    return ml_collections.ConfigDict({'name': 'x'})\n"
    )
    with pytest.raises(ValueError, match="lacks required fields: model"):
        configs.load_config(str(bad))
