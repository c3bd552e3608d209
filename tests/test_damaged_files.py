"""Damaged inputs: truncated, corrupted or random files fail with one clear CheckpointError naming the
file (exit code 2 from the CLI), never with a parser's traceback. Fuzzed over small files made here."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from helpers import files_under

from eesd_jax import cli, engine, exits, gguf_loading, loading, shipped

# A tiny LLaMA: 1 layer, d 8, 2 heads / 1 KV head of 4, ffn 16, vocab 16. Every tensor is a multiple
# of 32 bytes, so a GGUF file ends with tensor data (no alignment padding): every cut loses data.
HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "intermediate_size": 16,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 64,
}
HF_SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.norm.weight": (8,),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.0.post_attention_layernorm.weight": (8,),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.k_proj.weight": (4, 8),
    "model.layers.0.self_attn.v_proj.weight": (4, 8),
    "model.layers.0.self_attn.o_proj.weight": (8, 8),
    "model.layers.0.mlp.gate_proj.weight": (16, 8),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 16),
}
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
}


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in HF_SHAPES.items()}


def write_hf_folder(folder, shards: int = 1):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    names = sorted(HF_SHAPES)
    all_tensors = tensors()
    if shards == 1:
        save_file(all_tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: all_tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def write_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([*(chr(ord("a") + i) for i in range(15)), "ab"])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(0)
    for name, value in tensors().items():
        w.add_tensor(GGUF_NAMES[name], value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def loads_gguf(path):
    gguf_loading.load_gguf(path, use_cache=False)


def loads_folder(path):
    loading.load_model(path.parent)


def loads_tokenizer(path):
    loading.load_tokenizer.cache_clear()
    loading.load_tokenizer(str(path))


def damaged_versions(data: bytes, seed: int, keep_magic: bytes = b""):
    """(kind, bytes): truncations at many points, a few random byte flips, random bytes."""
    rng = random.Random(seed)
    cuts = sorted({0, 1, 4, 7, 8, 9, 16, 24, 64, len(data) // 2, len(data) - 1, *rng.sample(range(len(data)), 12)})
    for cut in cuts:
        yield "truncated", data[:cut]
    for _ in range(40):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        yield "flipped", bytes(flipped)
    for n in (1, 8, 40, 300, len(data)):
        yield "random", keep_magic + bytes(rng.randrange(256) for _ in range(n))


@pytest.mark.parametrize(
    ("make", "load", "magic"),
    [
        pytest.param(lambda d: write_gguf(d / "m.gguf"), loads_gguf, b"GGUF", id="gguf"),
        pytest.param(lambda d: write_gguf(d / "m.gguf"), loads_tokenizer, b"GGUF", id="gguf-tokenizer"),
        pytest.param(lambda d: write_hf_folder(d / "hf") / "model.safetensors", loads_folder, b"", id="safetensors"),
        pytest.param(
            lambda d: sorted(write_hf_folder(d / "hf", shards=2).glob("*.safetensors"))[1],
            loads_folder,
            b"",
            id="safetensors-shard",
        ),
    ],
)
def test_fuzz_damaged_files_fail_cleanly(tmp_path, cache_dir, make, load, magic):
    """Every truncation and random file is refused; a corrupted one loads or is refused; both naming the file."""
    path = make(tmp_path)
    data = path.read_bytes()
    load(path)  # The intact file loads.
    for i, (kind, damaged) in enumerate(damaged_versions(data, seed=len(data), keep_magic=magic)):
        path.write_bytes(damaged)
        try:
            load(path)
        except loading.CheckpointError as e:
            message = str(e)
            # Named: the file, or for a tensor missing from a folder's shards, the folder.
            assert path.name in message or str(path.parent) in message, (kind, i, message)
            assert "\n" not in message
        else:
            assert kind == "flipped", f"{kind} file #{i} ({len(damaged)} bytes) loaded"


def test_truncated_gguf_names_the_problem(tmp_path, cache_dir):
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(loading.CheckpointError, match=rf"^{path}: truncated or corrupted GGUF file \(ValueError"):
        loading.load_model(path)
    assert files_under(cache_dir) == []


def test_truncated_shard_names_the_shard(tmp_path, cache_dir):
    shard = sorted(write_hf_folder(tmp_path / "hf", shards=2).glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(loading.CheckpointError, match=rf"^{shard}: truncated or corrupted safetensors file"):
        loading.load_model(shard.parent)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.json", "{not json", r"config\.json: not valid JSON"),
        ("config.json", "[1, 2]", r"config\.json: expected a JSON object, got list"),
        ("model.safetensors.index.json", '{"weight_map": 3}', r"index\.json: no 'weight_map'"),
    ],
)
def test_damaged_json_names_the_file(tmp_path, name, content, message):
    folder = write_hf_folder(tmp_path / "hf", shards=2)
    (folder / name).write_text(content)
    with pytest.raises(loading.CheckpointError, match=message):
        loading.load_model(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"model.norm.weight": np.full(8, np.nan, np.float32)}, r"'model\.norm\.weight' holds NaN or infinite"),
        (
            {"model.norm.weight": np.ones(9, np.float32)},
            r"'model\.norm\.weight' has shape \(9,\), the config implies \(8,\)",
        ),
    ],
)
def test_refuses_impossible_tensor_values(tmp_path, edit, message):
    from safetensors.numpy import save_file

    folder = write_hf_folder(tmp_path / "hf")
    save_file({**tensors(), **edit}, str(folder / "model.safetensors"))
    with pytest.raises(loading.CheckpointError, match=message):
        loading.load_model(folder)


def test_damaged_params_cache_is_rebuilt(tmp_path, cache_dir):
    path = write_gguf(tmp_path / "m.gguf")
    first = gguf_loading.load_gguf(path)
    (cached,) = files_under(cache_dir)
    cached.write_bytes(cached.read_bytes()[:100])
    second = gguf_loading.load_gguf(path)
    np.testing.assert_array_equal(second.params["embed"], first.params["embed"])
    assert cached.stat().st_size > 100


# ----------------------------------------------------------------------------- exits, through the CLI


@pytest.fixture
def shipped_exit():
    return sorted(shipped.EXITS_DIR.glob("*.safetensors"))[0]


@pytest.mark.parametrize("size", [0, 7, 100, 1 << 20, -1])
def test_cli_truncated_exit_exits_2_before_loading(tmp_path, monkeypatch, capsys, shipped_exit, size):
    path = tmp_path / "exit.safetensors"
    data = shipped_exit.read_bytes()
    path.write_bytes(data[:size])
    monkeypatch.setattr(engine, "load_session", lambda *a, **k: pytest.fail("model loaded despite a damaged exit"))
    for argv in (["generate", "--prompt", "hi"], ["bench"]):
        assert cli.main([*argv, "--exit", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}: truncated or corrupted safetensors file" in err, err


def test_fuzz_damaged_exit_files(tmp_path, tiny):
    """An exit file that passes the CLI's check either loads or is refused with a ValueError."""
    cfg, params = tiny
    ecfg = exits.ExitConfig(1)
    path = tmp_path / "exit.safetensors"
    exits.save_exit(path, exits.init_exit(cfg, params, ecfg), ecfg, "tiny", "fingerprint")
    data = path.read_bytes()
    for i, (kind, damaged) in enumerate(damaged_versions(data, seed=1)):
        path.write_bytes(damaged)
        try:
            loading.check_safetensors(path)
            exits.load_exit(path, cfg, "fingerprint")
        except loading.CheckpointError as e:
            assert str(path) in str(e), (kind, i, str(e))
        except ValueError:  # exits' own refusals (not an exit file, another model, wrong shapes).
            assert kind == "flipped", (kind, i)
        else:
            assert kind == "flipped", f"{kind} exit #{i} loaded"


def test_exit_metadata_missing_a_key_is_refused(tmp_path, tiny):
    """A well-formed header that lacks an identity key is a ValueError naming the key, not a KeyError."""
    from safetensors.numpy import load_file, save_file

    cfg, params = tiny
    ecfg = exits.ExitConfig(1)
    path = tmp_path / "exit.safetensors"
    exits.save_exit(path, exits.init_exit(cfg, params, ecfg), ecfg, "tiny", "fingerprint")
    meta = exits.read_exit_metadata(path)
    del meta["base_fingerprint"]
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ValueError, match="exit metadata lacks base_fingerprint"):
        exits.load_exit(path, cfg, "fingerprint")


def test_damaged_gguf_through_the_cli(tmp_path, monkeypatch, capsys):
    path = write_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    monkeypatch.setenv("EESD_JAX_CACHE", str(tmp_path / "cache"))
    assert cli.main(["generate", "--prompt", "hi", "--model", str(path), "--mode", "ar"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: truncated or corrupted GGUF file" in err, err


def test_shipped_exit_passes_the_check(shipped_exit, tmp_path):
    loading.check_safetensors(shutil.copy(shipped_exit, tmp_path / "exit.safetensors"))


# ----------------------------------------------------------------------------- tokenizers


def test_folder_tokenizer_missing_or_damaged(tmp_path, cache_dir):
    folder = write_hf_folder(tmp_path / "hf")
    with pytest.raises(loading.CheckpointError, match=rf"^{folder} has no tokenizer"):
        loading.load_tokenizer(str(folder))
    loading.load_tokenizer(str(write_gguf(tmp_path / "m.gguf"))).save_pretrained(str(folder))
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[:50])
    loading.load_tokenizer.cache_clear()
    with pytest.raises(loading.CheckpointError, match=rf"^{folder}: cannot load its tokenizer \(.*\)$"):
        loading.load_tokenizer(str(folder))


def test_damaged_tokenizer_cache_is_rebuilt(tmp_path, cache_dir):
    path = write_gguf(tmp_path / "m.gguf")
    first = loading.load_tokenizer(str(path)).encode("ab ab")
    (cached,) = files_under(cache_dir)
    cached.write_text(cached.read_text()[:100])
    loading.load_tokenizer.cache_clear()
    assert loading.load_tokenizer(str(path)).encode("ab ab") == first
    assert len(cached.read_text()) > 100
