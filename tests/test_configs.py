"""Every config file under eesd_jax/configs/ loads and has the required fields; ARG overrides work."""

from __future__ import annotations

import pytest

from eesd_jax import configs


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
    assert {"tiny", "smollm2"} <= set(configs.available())


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
