"""--dtype: bfloat16 params, exits and caches; losslessness within a dtype; the flag's plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesd_jax import bench, cli, decoding, eesd, engine, exits, generate, loading, model, train

PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43]]


def dtypes(tree) -> set:
    return {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def tiny_bf16(tiny):
    return model.with_dtype(*tiny, "bfloat16")


@pytest.mark.slow
def test_bf16_greedy_eesd_equals_bf16_greedy_ar(tiny_bf16):
    cfg, params = tiny_bf16
    assert cfg.dtype == "bfloat16" and dtypes(params) == {"bfloat16"}
    exit_params = exits.init_exit(cfg, params, exits.ExitConfig(1))
    assert dtypes(exit_params) == {"bfloat16"}
    ar = generate.generate_ar(cfg, params, PROMPTS, 24)
    es = generate.generate_eesd(cfg, params, exit_params, eesd.EESDConfig(exit_layer=1, max_draft=3), PROMPTS, 24)
    assert ar.tokens == es.tokens
    assert es.stats["accepted"] > 0  # Some drafts were verified and kept, not all rejected.


def test_bf16_caches_and_float32_logits(tiny_bf16):
    cfg, params = tiny_bf16
    req = decoding.make_request(cfg, PROMPTS, 4)
    cache, logits, _ = decoding.prefill(cfg, params, jnp.asarray(req.tokens_bp), jnp.asarray(req.prompt_lens_b), 64)
    assert cache.k.dtype == cache.v.dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32


def test_exit_files_round_trip_through_bf16(tiny_bf16, tmp_path):
    cfg, params = tiny_bf16
    ecfg = exits.ExitConfig(1)
    path = tmp_path / "exit.safetensors"
    exits.save_exit(path, exits.init_exit(cfg, params, ecfg), ecfg, "tiny", "fp")  # bf16 params, stored float32.
    _, loaded = exits.load_exit(path, cfg, "fp")
    assert dtypes(loaded) == {"bfloat16"}
    _, loaded32 = exits.load_exit(path, model.with_dtype(cfg, params, "float32")[0], "fp")
    assert dtypes(loaded32) == {"float32"}


def test_load_model_casts_and_keeps_the_fingerprint(hf_models):
    folder = hf_models("llama_gqa")[1]
    f32, bf16 = loading.load_model(folder), loading.load_model(folder, dtype="bfloat16")
    assert bf16.cfg.dtype == "bfloat16" and dtypes(bf16.params) == {"bfloat16"}
    assert bf16.fingerprint == f32.fingerprint  # Exits trained in either dtype stay usable.
    np.testing.assert_array_equal(np.asarray(bf16.params["embed"]), f32.params["embed"].astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="dtype must be one of"):
        loading.load_model(folder, dtype="float16")


class _Loaded(Exception):
    pass


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["generate", "--prompt", "hi"], ("float32", None)),
        (["generate", "--prompt", "hi", "--dtype", "bfloat16"], ("bfloat16", None)),
        (["bench", "--dtype", "bfloat16", "--n", "2"], ("bfloat16", None)),
        (["bench", "--random-shape", "8b", "--dtype", "bfloat16", "--n", "2"], ("bfloat16", "8b")),
    ],
)
def test_dtype_flag_reaches_the_loader(argv, expected, monkeypatch):
    seen = []

    def fake_load(model, mesh=None, dtype="float32", random_shape=None):
        seen.append((dtype, random_shape))
        raise _Loaded

    monkeypatch.setattr(engine, "load_session", fake_load)
    with pytest.raises(_Loaded):
        cli.main(argv)
    assert seen == [expected]


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["bench"], ["distill", "--config", "tiny"]])
def test_bad_dtype_exits_2(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--dtype", "float16"])
    assert e.value.code == 2
    assert "--dtype" in capsys.readouterr().err


def test_random_shape_refuses_model_and_exit(capsys):
    assert cli.main(["bench", "--random-shape", "smollm2", "--model", "x.gguf"]) == 2
    assert "--random-shape" in capsys.readouterr().err


def test_distill_dtype_casts_the_teacher(monkeypatch, tmp_path):
    got = []
    monkeypatch.setattr(train, "run_distill", lambda config, workdir, lm=None: got.append(lm) or "exit.safetensors")
    assert cli.main(["distill", "--config", "tiny", "--workdir", str(tmp_path), "--dtype", "bfloat16"]) == 0
    assert got[0].cfg.dtype == "bfloat16" and dtypes(got[0].params) == {"bfloat16"}
    assert cli.main(["distill", "--config", "tiny", "--workdir", str(tmp_path)]) == 0
    assert got[1].cfg.dtype == "float32" and dtypes(got[1].params) == {"float32"}  # The config's dtype.


def test_random_shape_too_big_is_refused(monkeypatch):
    monkeypatch.setattr(bench, "available_memory", lambda device=None: 20e9)
    with pytest.raises(ValueError, match="try --dtype bfloat16"):
        bench.random_model("8b", "float32")  # 32 GB of params.
    with pytest.raises(ValueError, match="GB free"):
        bench.random_model("8b", "bfloat16")  # 16 GB > 0.7 * 20 GB.


def test_random_shape_has_the_named_shape():
    cfg, params = bench.random_model("smollm2", "bfloat16", n_layers=1, vocab_size=256)  # Shrunk: CPU RNG is slow.
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (576, 9, 3, 64, 1536)
    assert params["layers"]["w_gate"].shape == (1, 1536, 576) and dtypes(params) == {"bfloat16"}
    big = bench.RANDOM_SHAPES["1b"]
    assert (big.n_layers, big.d_model, big.n_heads, big.n_kv_heads, big.ffn_dim) == (16, 2048, 32, 8, 8192)
    assert bench.param_bytes(bench.RANDOM_SHAPES["8b"]) == pytest.approx(32.1e9, rel=0.01)  # 8.03B float32.
