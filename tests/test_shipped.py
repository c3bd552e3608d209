"""The trained exits shipped for the bundled SmolLM2: found by fingerprint, the best drafter the default,
small, lossless, and they draft."""

import pathlib

import pytest
from safetensors import safe_open

from eesd_jax import control, eesd, exits, generate, prompts, shipped

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def shipped_exit(smollm):
    path = shipped.default_exit(smollm)
    assert path is not None, f"no exit in {shipped.EXITS_DIR} was trained for the bundled model"
    return path


def test_shipped_exit_is_small_and_stored_in_float16(smollm, shipped_exit):
    assert pathlib.Path(shipped_exit).stat().st_size <= 20 * 2**20
    with safe_open(shipped_exit, "numpy") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    exit_cfg, _ = exits.load_exit(shipped_exit, smollm.cfg, smollm.fingerprint)
    assert 1 <= exit_cfg.layer <= smollm.cfg.n_layers // 3 and exit_cfg.draft_vocab > 0


def test_shipped_exit_is_lossless_and_its_drafts_are_accepted(smollm, shipped_exit):
    tok = smollm.tokenizer()
    ids = [prompts.encode(tok, p.text, p.chat) for p in prompts.load_prompts("chat", "heldout", 2)]
    exit_cfg, exit_params = exits.load_exit(shipped_exit, smollm.cfg, smollm.fingerprint)
    eos = (int(tok.eos_token_id),)
    ar = generate.generate_ar(smollm.cfg, smollm.params, ids, 48, eos_ids=eos)
    fixed = control.ControllerConfig(kind="fixed")  # One draft per round.
    ecfg = eesd.EESDConfig(exit_cfg.layer, 1, fixed, context_layer=exit_cfg.context_layer)
    out = generate.generate_eesd(smollm.cfg, smollm.params, exit_params, ecfg, ids, 48, eos_ids=eos)
    assert out.tokens == ar.tokens
    # alpha = agreement of one draft with the LLM: ~0 untrained at N=2, 0.134 for the first
    # shipped exit (100 steps at lr 5e-4), 0.274 for the paper exit (400 steps at 2e-3) and
    # 0.314 for the context exit trained with READMEs, the default.
    assert out.stats["acceptance_rate"] > 0.29, out.stats


def test_every_shipped_exit_loads_for_the_bundled_model_and_is_lossless(smollm):
    """The paper's exit (layer-2 context) and the context exit (verified positions from layer 29) ship;
    the one with the higher recorded validation top-1 is the default. Both decode as AR."""
    paths = shipped.exits_for(smollm)
    assert len(paths) == 2 and shipped.default_exit(smollm) == str(paths[0])
    assert exits.load_exit(paths[0], smollm.cfg, smollm.fingerprint)[0].context_layer == smollm.cfg.n_layers - 1
    assert shipped.validation_top1(paths[0]) > shipped.validation_top1(paths[1]) > 0.3
    tok = smollm.tokenizer()
    ids = [prompts.encode(tok, p.text, p.chat) for p in prompts.load_prompts("chat", "heldout", 1)]
    eos = (int(tok.eos_token_id),)
    ar = generate.generate_ar(smollm.cfg, smollm.params, ids, 24, eos_ids=eos)
    contexts = set()
    for path in paths:
        exit_cfg, exit_params = exits.load_exit(path, smollm.cfg, smollm.fingerprint)
        contexts.add(exit_cfg.context_layer)
        ecfg = eesd.EESDConfig(exit_cfg.layer, 4, context_layer=exit_cfg.context_layer)
        out = generate.generate_eesd(smollm.cfg, smollm.params, exit_params, ecfg, ids, 24, eos_ids=eos)
        assert out.tokens == ar.tokens, path.name
    assert contexts == {0, smollm.cfg.n_layers - 1}


def test_a_request_picks_the_best_shipped_exit_at_its_layer(smollm):
    """--exit-layer N: the best shipped exit at N (what a joint run's several N are for), else none."""
    at_2 = shipped.exits_for(smollm, layer=2)
    assert at_2 == shipped.exits_for(smollm) and shipped.default_exit(smollm, 2) == str(at_2[0])
    assert shipped.exits_for(smollm, layer=4) == [] and shipped.default_exit(smollm, 4) is None
