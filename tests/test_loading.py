"""Checkpoint loading: GGUF files in llama.cpp conventions, the params cache, the bundled model, refusals."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import jax
import numpy as np
import pytest
from helpers import files_under, full_forward, golden_smollm, random_tokens

from eesd_jax import gguf_loading, loading

# ----------------------------------------------------------------------------- writing GGUF like llama.cpp

_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute`: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, folder, arch: str = "llama", rope_scaling: str | None = None, extra_tensors=None) -> None:
    """Write a Hugging Face LLaMA folder (model.safetensors) as an F32 GGUF file the way llama.cpp's converter does."""
    import gguf
    from safetensors.numpy import load_file

    hf = json.loads((folder / "config.json").read_text())
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test llama")
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
        writer.add_rope_scaling_factor(4.0)
    # save_pretrained omits lm_head.weight for tied embeddings, as llama.cpp omits output.weight.
    for name, w in sorted(load_file(str(folder / "model.safetensors")).items()):
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_HF_TO_GGUF_BLOCK[module]}.{leaf}"
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, heads)
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, kv_heads)
        writer.add_tensor(gname, w)
    for gname, w in (extra_tensors or {}).items():
        writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_files(hf_models, tmp_path_factory):
    """kind -> (HF folder, GGUF path of the same weights) for an untied GQA and a tied GQA llama."""
    out = {}
    for kind in ("llama_gqa", "llama_gqa_tied"):
        _, folder = hf_models(kind)
        path = tmp_path_factory.mktemp("gguf") / f"{kind}.gguf"
        write_gguf(path, folder)
        out[kind] = (folder, path)
    return out


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_gqa_tied"])
def test_gguf_matches_hf_folder(gguf_files, cache_dir, kind):
    """The GGUF of a folder loads to the same model (test_model compares the folder with transformers)."""
    folder, path = gguf_files[kind]
    from_gguf = loading.load_model(path)
    from_hf = loading.load_model(folder)
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
        assert getattr(from_gguf.cfg, field) == getattr(from_hf.cfg, field), field
    assert from_gguf.cfg.tie_embeddings == from_hf.cfg.tie_embeddings
    assert from_gguf.cfg.rope_theta == pytest.approx(from_hf.cfg.rope_theta)
    assert from_gguf.cfg.rms_eps == pytest.approx(from_hf.cfg.rms_eps, rel=1e-6)  # Stored as float32.
    assert from_gguf.fingerprint == loading.sha256_file(path)

    tokens = random_tokens(from_hf.cfg.vocab_size, (2, 11), seed=5)
    ours_gguf = full_forward(from_gguf.cfg, from_gguf.params, tokens)
    np.testing.assert_allclose(ours_gguf, full_forward(from_hf.cfg, from_hf.params, tokens), rtol=0, atol=1e-5)


def test_gguf_params_are_cached(gguf_files, cache_dir, monkeypatch):
    _, path = gguf_files["llama_gqa"]
    first = gguf_loading.load_gguf(path)
    cached = cache_dir / "params" / f"{loading.sha256_file(path)}.safetensors"
    assert files_under(cache_dir) == [cached]

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load converted the GGUF file again instead of reading the cache")

    monkeypatch.setattr(gguf_loading, "_convert_gguf", no_conversion)
    second = loading.load_model(path)
    assert second.cfg == first.cfg
    assert second.fingerprint == first.fingerprint
    assert jax.tree.structure(second.params) == jax.tree.structure(first.params)
    jax.tree.map(np.testing.assert_array_equal, second.params, first.params)
    assert files_under(cache_dir) == [cached]


def test_gguf_without_cache_writes_nothing(gguf_files, cache_dir):
    _, path = gguf_files["llama_gqa"]
    loaded = gguf_loading.load_gguf(path, use_cache=False)
    assert loaded.cfg.n_layers > 0
    assert files_under(cache_dir) == []


# ----------------------------------------------------------------------------- the bundled model


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.torch
def test_bundled_model_matches_transformers(smollm, smollm_reference, session_cache_dir):
    assert smollm.fingerprint == loading.sha256_file(loading.bundled_model_path())
    assert (session_cache_dir / "params" / f"{smollm.fingerprint}.safetensors").is_file()

    prompt = smollm_reference["prompt"]
    ref = smollm_reference["logits"]
    ours = full_forward(smollm.cfg, smollm.params, prompt[None])[0]
    assert ours.shape == ref.shape
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-3, f"max |ours - transformers| / max |transformers| = {rel:.2e}"


@pytest.mark.real_model
@pytest.mark.slow
def test_bundled_model_matches_recorded_transformers(smollm, session_cache_dir):
    """As above, against make_golden.py's record of transformers: at every prompt position its top
    logits, a fixed sample of the others, and no other logit above its top ones (to the tolerance)."""
    golden = golden_smollm()
    assert smollm.fingerprint == golden["gguf_sha256"], "another bundled GGUF: regenerate the golden fixtures"
    assert (session_cache_dir / "params" / f"{smollm.fingerprint}.safetensors").is_file()

    ours = full_forward(smollm.cfg, smollm.params, golden["prompt"][None])[0]
    tol = 1e-3 * golden["scale"]  # The live test's bound: |ours - transformers| <= 1e-3 max |transformers|.
    top_ids, top_values = golden["top_ids"], golden["top_values"]
    np.testing.assert_allclose(np.take_along_axis(ours, top_ids, -1), top_values, rtol=0, atol=tol)
    np.testing.assert_allclose(ours[:, golden["sampled_ids"]], golden["sampled_values"], rtol=0, atol=tol)
    others = ours.copy()
    np.put_along_axis(others, top_ids, -np.inf, -1)
    assert (others.max(-1) <= top_values[:, -1] + tol).all()


# ----------------------------------------------------------------------------- refusals


class _Tripwire:
    """A pickle that, if anything ever unpickles it, creates a directory."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickle_file(path, marker):
    path.write_bytes(pickle.dumps(_Tripwire(marker)))


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt_neox"}, r"unsupported model_type 'gpt_neox'"),
        ({"model_type": None}, r"unsupported model_type None"),
        ({"hidden_act": "gelu"}, r"unsupported hidden_act 'gelu'"),
        ({"num_attention_heads": None}, r"config\.json lacks integer num_attention_heads"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, r"unsupported RoPE scaling"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
            r"'llama3' needs numbers factor, low_freq_factor, high_freq_factor, original_max_position_embeddings",
        ),
    ],
)
def test_refuses_unsupported_config(hf_models, tmp_path, cache_dir, changes, message):
    folder = _edited_copy(hf_models("llama_gqa")[1], tmp_path / "model", **changes)
    with pytest.raises(loading.CheckpointError, match=message):
        loading.load_model(folder)
    assert files_under(cache_dir) == []


@pytest.mark.parametrize("with_config", [True, False])
def test_refuses_pickle_only_folder(tmp_path, cache_dir, with_config):
    folder = tmp_path / "model"
    folder.mkdir()
    if with_config:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker = tmp_path / "unpickled"
    _pickle_file(folder / "pytorch_model.bin", marker)
    with pytest.raises(loading.CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*safetensors"):
        loading.load_model(folder)
    assert not marker.exists()
    assert files_under(cache_dir) == []


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "missing.bin"])
def test_refuses_pickle_paths(tmp_path, cache_dir, name):
    marker = tmp_path / "unpickled"
    if not name.startswith("missing"):
        _pickle_file(tmp_path / name, marker)
    with pytest.raises(loading.CheckpointError, match=r"is a pickle checkpoint; eesd_jax loads only safetensors"):
        loading.load_model(tmp_path / name)
    assert not marker.exists()
    assert files_under(cache_dir) == []


def test_refuses_non_gguf_with_gguf_suffix(tmp_path, cache_dir):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely not a GGUF file" * 10)
    with pytest.raises(loading.CheckpointError, match=r"is not a GGUF file \(bad magic\)"):
        loading.load_model(path)
    assert files_under(cache_dir) == []


def test_refuses_gguf_of_other_architecture(hf_models, tmp_path, cache_dir):
    path = tmp_path / "other.gguf"
    write_gguf(path, hf_models("llama_gqa")[1], arch="gpt2")
    with pytest.raises(loading.CheckpointError, match=r"unsupported GGUF architecture 'gpt2'"):
        loading.load_model(path)
    assert files_under(cache_dir) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        # LLaMA's attention_bias also gives o_proj a bias, which our block does not have.
        ("llama_gqa+attention_bias", r"no place for \(model\.layers\.0\.self_attn\.o_proj\.bias"),
        ("llama_gqa+mlp_bias", r"no place for \(model\.layers\.0\.mlp\.down_proj\.bias"),
    ],
)
def test_refuses_checkpoint_with_unused_tensors(hf_models, cache_dir, name, message):
    """A tensor our architecture would ignore means the model would run wrong: refuse it."""
    with pytest.raises(loading.CheckpointError, match=message):
        loading.load_model(hf_models(name)[1])
    assert files_under(cache_dir) == []


def test_refuses_gguf_with_rope_scaling(hf_models, tmp_path, cache_dir):
    folder = hf_models("llama_gqa")[1]
    write_gguf(tmp_path / "linear.gguf", folder, rope_scaling="linear")
    with pytest.raises(loading.CheckpointError, match=r"unsupported RoPE scaling 'linear'"):
        loading.load_model(tmp_path / "linear.gguf")
    # LLaMA-3.1-style frequency factors come as a tensor.
    write_gguf(tmp_path / "freqs.gguf", folder, extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(loading.CheckpointError, match=r"no place for \(rope_freqs\.weight\)"):
        loading.load_model(tmp_path / "freqs.gguf")
    assert files_under(cache_dir) == []


def test_refuses_folder_with_missing_tensor(hf_models, tmp_path, cache_dir):
    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(hf_models("llama_gqa")[1], tmp_path / "model")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(loading.CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        loading.load_model(folder)
    assert files_under(cache_dir) == []


def test_refuses_sharded_folder_with_missing_shard(hf_models, tmp_path, cache_dir):
    folder = shutil.copytree(hf_models("llama_gqa", shards=3)[1], tmp_path / "model")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(loading.CheckpointError, match=rf"shards named in .* are missing: {shard.name}"):
        loading.load_model(folder)
    assert files_under(cache_dir) == []


def test_refuses_missing_and_unknown_paths(tmp_path, cache_dir):
    with pytest.raises(loading.CheckpointError, match="no such model"):
        loading.load_model(tmp_path / "nothing-here")
    with pytest.raises(loading.CheckpointError, match="no such GGUF file"):
        loading.load_model(tmp_path / "nothing-here.gguf")
    (tmp_path / "weights.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(loading.CheckpointError, match="cannot tell how to load"):
        loading.load_model(tmp_path / "weights.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(loading.CheckpointError, match="has no config.json"):
        loading.load_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(loading.CheckpointError, match=r"has no \*\.safetensors weights"):
        loading.load_model(empty)
    assert files_under(cache_dir) == []


# ----------------------------------------------------------------------------- LLaMA-3.1 config, EOS ids


def test_llama31_rope_scaling_is_read(hf_models, tmp_path, cache_dir):
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    folder = _edited_copy(hf_models("llama_gqa")[1], tmp_path / "m", rope_scaling={"rope_type": "llama3", **scaling})
    assert loading.load_model(folder).cfg.rope_scaling == (8.0, 1.0, 4.0, 8192)
    plain = loading.load_model(hf_models("llama_gqa")[1]).cfg
    assert plain.rope_scaling is None


@pytest.mark.parametrize(
    ("generation_config", "expected"),
    [
        ({"eos_token_id": [128001, 128008, 128009]}, (128001, 128008, 128009, 7)),  # LLaMA-3.1 Instruct's list.
        ({"eos_token_id": 7}, (7,)),
        ({"bos_token_id": 1}, (7,)),
        (None, (7,)),
    ],
)
def test_eos_ids_from_generation_config_and_tokenizer(tmp_path, generation_config, expected):
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    tokenizer = type("Tok", (), {"eos_token_id": 7})()
    assert loading.eos_ids(tmp_path, tokenizer) == expected
    assert loading.eos_ids("random:1b", None) == loading.eos_ids("", None) == ()


def test_the_distillation_teacher_stops_at_every_eos_id(tmp_path):
    import types

    from eesd_jax import engine, model, teacher

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    cfg = model.ModelConfig(vocab_size=8, d_model=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4, ffn_dim=4)
    loaded = loading.LoadedModel(cfg=cfg, params={}, fingerprint="fp", source=str(tmp_path))
    tok = types.SimpleNamespace(eos_token_id=128009)
    session = engine.Session(lm=loaded, params={}, tokenizer=tok, load_seconds=0.0)
    assert teacher.as_lm(session).eos_ids == session.eos_ids == (128001, 128009)


def test_bad_eos_ids_are_refused(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    with pytest.raises(loading.CheckpointError, match=r"generation_config\.json: eos_token_id must be token ids"):
        loading.eos_ids(tmp_path)


# ----------------------------------------------------------------------------- straight onto a mesh

MESH_LOAD = """
import json, sys
import jax, numpy as np
from eesd_jax import loading, mesh_loading, sharding

read = []  # Elements read from the files, per tensor slice.
real_read = mesh_loading._read_slice
mesh_loading._read_slice = lambda *a: read.append(int(np.prod(real_read(*a).shape))) or real_read(*a)
out = {}
for folder in sys.argv[1:]:
    for spec, dtype in (("data=2,model=4", "float32"), ("data=1,model=8", "bfloat16"), ("data=8,model=1", "float32")):
        read.clear()
        mesh = sharding.mesh_from_spec(spec)
        got, plain = mesh_loading.load_hf_to_mesh(folder, mesh, dtype), loading.load_model(folder, dtype)
        want = sharding.param_shardings(plain.params, mesh)
        out[f"{folder} {spec} {dtype}"] = dict(
            equal=all(jax.tree.leaves(jax.tree.map(
                lambda a, b: a.dtype == b.dtype and bool(np.array_equal(np.asarray(a), b)), got.params, plain.params))),
            shardings=all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, got.params, want))),
            same_model=got.cfg == plain.cfg and got.fingerprint == plain.fingerprint,
            elements_read=sum(read), elements=sum(a.size for a in jax.tree.leaves(plain.params)),
        )
print(json.dumps(out))
"""


def test_hf_folder_loads_straight_onto_a_mesh(hf_models):
    """On a fake 8-device mesh: params equal the plain load's (in either dtype), placed with param_shardings,
    and every element of the model is read from the files exactly once (replicas are not re-read)."""
    import subprocess
    import sys

    folders = [str(hf_models("qwen2", shards=2)[1]), str(hf_models("llama_gqa_tied")[1])]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", MESH_LOAD, *folders], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for case, r in results.items():
        assert r["equal"] and r["shardings"] and r["same_model"], case
        assert r["elements_read"] == r["elements"], case
