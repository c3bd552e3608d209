"""Self-distillation on a tiny random teacher (configs/tiny.py): data, losses, training, resume, export.

One uninterrupted run (module fixture) is shared: its data dir is reused by the other runs,
so each later run only trains. Everything here is CPU and takes seconds.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesd_jax import configs, distill_data, evaluation, exits, losses, model, sharding, shards, teacher, train
from eesd_jax.kv_cache import init_cache


def tiny_config(**overrides):
    c = configs.load_config("tiny")
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        with node.ignore_type():
            node[leaf] = value
    return c


@pytest.fixture(scope="module")
def run(lm, tmp_path_factory):
    """An uninterrupted tiny distillation: (config, workdir, exit path)."""
    root = tmp_path_factory.mktemp("distill")
    config = tiny_config(**{"data.dir": str(root / "data")})
    path = train.run_distill(config, root / "full", lm=lm, progress=False)
    return config, root / "full", path


def columns(data_dir) -> dict[str, np.ndarray]:
    """Every column of a data dir's shards, concatenated over the shards."""
    ks = shards.complete(data_dir)
    names = sorted(p.stem for p in shards.shard_dir(data_dir, ks[0]).glob("*.npy"))
    return {n: np.concatenate([shards.read(data_dir, k, n) for k in ks]) for n in names}


def load(path, lm, layer=None):
    return exits.load_exit(path, lm.cfg, lm.fingerprint, layer)


def test_data_is_deterministic_for_a_seed(run, lm, tmp_path):
    config, _, _ = run
    again = distill_data.generate_data(lm, config.data, tmp_path / "again", progress=False)
    first, second = columns(config.data.dir), columns(tmp_path / "again")
    assert first.keys() - second.keys() == {"hidden_N1", "hidden_N2", "topk_ids", "topk_logp"}  # Teacher pass.
    for key in second:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)

    manifest = distill_data.read_manifest(config.data.dir)
    assert manifest == {
        **again,
        "created": manifest["created"],
        "seconds": manifest["seconds"],
        "teacher": manifest["teacher"],
        "hidden_layers": manifest["hidden_layers"],
    }
    assert manifest["complete"] and manifest["counts"]["shards"] == 2  # data.shard_size = one batch of 6.
    assert manifest["model"]["fingerprint"] == lm.fingerprint
    assert manifest["counts"]["sequences"] == 12 and manifest["counts"]["train_positions"] > 200
    assert manifest["hidden_layers"] == [1, 2]  # exit.layer plus data.feature_layers in one pass.

    config.data.seed = 1
    other = distill_data.generate_data(lm, config.data, tmp_path / "other", progress=False)
    assert not np.array_equal(
        columns(tmp_path / "other")["tokens"][: len(first["tokens"])],
        first["tokens"][: other["counts"]["tokens"]],
    )
    config.data.seed = 0


def test_stored_data_layout(run, lm):
    config, _, _ = run
    data = distill_data.load_data(config.data.dir, 1)
    stored = columns(config.data.dir)
    assert len(stored["tokens"]) == data.lengths.sum() and data.n_seq == len(stored["lengths"]) == 12
    assert stored["hidden_N1"].shape == (len(stored["tokens"]), lm.cfg.d_model)
    assert stored["topk_ids"].shape == stored["topk_logp"].shape == (len(stored["tokens"]), config.data.top_k)
    assert stored["hidden_N1"].dtype == stored["topk_logp"].dtype == np.float16 and stored["topk_ids"].dtype == np.int32
    assert stored["prompt_ids"].dtype.kind == "U"
    # Mask = positions predicting a response token.
    for k in range(data.n_seq):
        m = data.sequence(k).mask
        assert m.sum() == data.lengths[k] - data.prompt_lens[k] == data.n_train[k]
        assert m[data.prompt_lens[k] - 1] and not m[-1]
    # Teacher targets and hidden states equal a fresh full forward of one sequence (in float16).
    seq = data.sequence(3)
    toks = jnp.asarray(seq.tokens)[None]
    T = toks.shape[1]

    @jax.jit
    def reference(params, toks):  # Uncached full forward, keeping the hidden state after layer 1.
        cache = init_cache(lm.cfg, 1, T)
        lower, upper = model.split_layers(params["layers"], 1)
        positions = jnp.arange(T)[None]
        h, cache = model.run_layers(lm.cfg, lower, model.embed(params, toks), positions, cache)
        x, _ = model.run_layers(lm.cfg, upper, h, positions, cache, 1)
        return h[0], jax.nn.log_softmax(model.lm_head(params, model.final_norm(params, lm.cfg, x))[0])

    h, logp = map(np.asarray, reference(lm.params, toks))
    half_ulp = 2.0**-11  # float16's rounding, relative; atol: the two forwards' float32 difference.
    np.testing.assert_array_equal(seq.topk_ids[:, 0], logp.argmax(-1))
    np.testing.assert_allclose(seq.topk_logp[:, 0].astype(np.float32), logp.max(-1), rtol=half_ulp, atol=1e-4)
    np.testing.assert_allclose(seq.hidden.astype(np.float32), h, rtol=half_ulp, atol=1e-4)


def test_draft_vocab(run, lm):
    config, _, _ = run
    data = distill_data.load_data(config.data.dir, 1)
    ids = distill_data.choose_draft_vocab(data, 48, lm.cfg.vocab_size, lm.eos_ids)
    assert len(ids) == len(set(ids.tolist())) == 48 and list(ids) == sorted(ids)
    assert set(lm.eos_ids) <= set(ids.tolist())
    top1_counts, _ = distill_data.vocab_counts(data, lm.cfg.vocab_size)
    assert top1_counts.sum() == data.n_train.sum()
    top = np.argsort(-top1_counts, kind="stable")
    n_seen = int((top1_counts > 0).sum())
    assert set(top[: min(n_seen, 40)].tolist()) <= set(ids.tolist())
    vmap = distill_data.vocab_map(lm.cfg.vocab_size, ids)
    assert (vmap[ids] == np.arange(48)).all() and (vmap >= 0).sum() == 48


def test_validation_split_by_prompt(run):
    config, _, _ = run
    data = distill_data.load_data(config.data.dir, 1)
    train_part, val = data.split(3)
    assert set(val.prompt_index % 3) == {2} and 2 not in set(train_part.prompt_index % 3)
    assert train_part.n_seq + val.n_seq == data.n_seq
    assert train_part.lengths.sum() + val.lengths.sum() == data.lengths.sum()
    k = int(np.flatnonzero(data.prompt_index % 3 == 2)[1])  # The second validation sequence.
    for field in ("tokens", "hidden", "topk_ids", "mask"):
        np.testing.assert_array_equal(getattr(val.sequence(1), field), getattr(data.sequence(k), field))
    assert data.split(0) == (data, None)


def test_train_logits_equal_exit_logits(run, lm):
    """The training forward is exits.exit_logits (positions arange(T), fresh cache) on the draft vocabulary."""
    _, _, path = run
    exit_cfg, params = load(path, lm)
    h = jax.random.normal(jax.random.key(1), (2, 9, lm.cfg.d_model))
    ours = jax.jit(losses.exit_train_logits, static_argnums=0)(lm.cfg, losses.frozen_head(lm.params, params), params, h)
    cache = init_cache(lm.cfg, 2, 16, layers=1)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    full, _ = jax.jit(exits.exit_logits, static_argnums=0)(lm.cfg, lm.params, params, h, positions, cache)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(full)[..., np.asarray(params["vocab"])], atol=1e-5)
    outside = np.setdiff1d(np.arange(lm.cfg.vocab_size), np.asarray(params["vocab"]))
    assert np.isneginf(np.asarray(full)[..., outside]).all()
    select = jnp.asarray([[8, 0, 3], [2, 2, 5]])
    picked = jax.jit(losses.exit_train_logits, static_argnums=0)(lm.cfg, params["head"], params, h, select)
    np.testing.assert_allclose(
        np.asarray(picked), np.take_along_axis(np.asarray(ours), select[..., None], 1), atol=1e-6
    )


def test_selecting_response_positions_changes_nothing(run, lm):
    """The head and loss on response positions only (n_select) give the same metrics as on all positions."""
    config, _, path = run
    data = distill_data.load_data(config.data.dir, 1)
    _, params = load(path, lm)
    assert losses.max_train_positions(data) == max(int(data.sequence(k).mask.sum()) for k in range(data.n_seq))
    n_select = train.select_count(data)  # As in training (and the shape compiled there).
    vmap = jnp.asarray(distill_data.vocab_map(lm.cfg.vocab_size, np.asarray(params["vocab"])))
    idx = [0, 5, 7, 11]
    full = losses.make_batch(data, idx, 48, 48)
    sel = losses.make_batch(data, idx, 48, 48, n_select=n_select)
    assert sel.select.shape == (4, n_select) and full.select.shape == (4, 48)
    m_full, _ = losses._eval_batch(lm.cfg, lm.params, params, vmap, sharding.shard_rows(full, None), 1)
    m_sel, _ = losses._eval_batch(lm.cfg, lm.params, params, vmap, sharding.shard_rows(sel, None), 1)
    for key in ("kl", "ce", "top1", "n"):
        np.testing.assert_allclose(float(m_full[key]), float(m_sel[key]), rtol=1e-5, err_msg=key)


def test_distillation_lowers_kl_and_raises_agreement(run):
    config, workdir, path = run
    report = json.loads((workdir / "run.json").read_text())
    before, after = report["metrics"]["untrained"]["train"], report["metrics"]["trained"]["train"]
    assert after["kl"] < 0.7 * before["kl"]
    assert after["top1"] > before["top1"] + 0.1
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert {"loss", "kl", "top1", "lr", "ce", "grad_norm"} <= records[0].keys()
    assert records[-1]["kl"] < records[0]["kl"]
    meta = exits.read_exit_metadata(path)
    extra = json.loads(meta["extra"])
    assert extra["config"]["exit"]["layer"] == 1 and extra["train_metrics"]["trained"]["train"]["kl"] == after["kl"]
    assert path.stat().st_size < 100_000


def test_resume_ends_with_exactly_the_uninterrupted_params(run, lm, tmp_path):
    config, _, path = run
    workdir = tmp_path / "killed"
    # "Killed" after step 25: the last checkpoint is step 20; steps 21..25 are lost and redone.
    assert train.run_distill(config, workdir, lm=lm, progress=False, stop_at=25) is None
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20]
    resumed = train.run_distill(config, workdir, lm=lm, progress=False)
    report = json.loads((workdir / "run.json").read_text())
    assert report["train"]["resumed_from"] == 20
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 41, 5))
    _, a = load(path, lm)
    _, b = load(resumed, lm)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Checkpoints of another run are not resumed.
    other = tiny_config(**{"data.dir": config.data.dir, "train.lr": 1e-3})
    with pytest.raises(ValueError, match="different run"):
        train.run_distill(other, workdir, lm=lm, progress=False)


def test_exit_for_another_base_model_or_layer_is_refused(run, lm):
    _, _, path = run
    exit_cfg, _ = load(path, lm, layer=1)
    assert exit_cfg == exits.ExitConfig(layer=1, own_head=False, draft_vocab=48)
    with pytest.raises(ValueError, match="not 2"):
        load(path, lm, layer=2)
    spec = dict(configs.load_config("tiny").model.tiny)
    other = teacher.tiny_lm({**spec, "init_seed": 1})
    assert other.fingerprint != lm.fingerprint
    with pytest.raises(ValueError, match="trained for base model"):
        exits.load_exit(path, other.cfg, other.fingerprint)


def test_data_of_another_model_is_not_reused(run, tmp_path):
    config, _, _ = run
    spec = dict(config.model.tiny)
    other = teacher.tiny_lm({**spec, "init_seed": 1})
    with pytest.raises(ValueError, match="made differently"):
        distill_data.prepare_data(other, config, config.data.dir, progress=False)


def test_loss_variants_shared_head_ce_prompt_positions(run, lm, tmp_path):
    """Shared frozen full head, KL + CE, prompt positions weighted: trains the block and norm only."""
    config, _, _ = run
    c = tiny_config(
        **{
            "data.dir": config.data.dir,
            "exit.draft_vocab": 0,
            "train.ce_weight": 0.5,
            "train.prompt_weight": 0.5,
            "train.steps": 4,
            "train.log_every": 2,
            "train.val_every": 4,
        }
    )
    data, val = distill_data.load_data(config.data.dir, 1).split(3)
    params, summary = train.train_exit(c, lm, data, tmp_path, progress=False, val=val)
    assert summary["finished"] and set(params) == {"block", "norm"}
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [2, 4, 4] and all(np.isfinite(r["loss"]) for r in rec[:2])
    assert rec[0]["loss"] > rec[0]["kl"]  # The CE term is in the loss.
    assert 0 <= rec[2]["val_top1"] <= 1 and rec[2]["val_positions"] == val.n_train.sum()
    exits.save_exit(tmp_path / "e.safetensors", params, train.exit_config(c), lm.name, lm.fingerprint)
    assert load(tmp_path / "e.safetensors", lm)[0] == exits.ExitConfig(layer=1)


@pytest.mark.slow
def test_eval_exit_reports_lossless_speculation(run, lm):
    config, _, path = run
    plist = distill_data.prompt_list(config.eval.sets, 1)
    r = evaluation.eval_exit(
        lm,
        path,
        plist,
        max_new_tokens=12,
        max_draft=1,
        controller="fixed",
        warmup=False,
        max_prompt_tokens=config.data.max_prompt_tokens,
        progress=False,
    )
    assert r["identical"] and r["n_identical"] == r["prompts"] == 2
    assert 0 <= r["alpha"] <= 1 and r["tau"] >= 1 and 0 <= r["top1_agreement"] <= 1
    assert r["ar_tokens"] == r["eesd_tokens"] > 0


def test_round_starts_tile_the_response_into_draft_rounds():
    n, first = 20, 6
    assert losses.round_starts(n, first, None).tolist() == list(range(n))
    fixed = losses.round_starts(n, first, 4)
    assert fixed[:first].tolist() == list(range(first))  # The prompt is verified context.
    assert fixed[first:].tolist() == [6] * 4 + [10] * 4 + [14] * 4 + [18] * 2
    rng = np.random.default_rng(0)
    for _ in range(20):
        starts = losses.round_starts(n, first, rng, max_round=3)
        t = np.arange(n)
        assert (starts <= t).all() and (np.diff(starts) >= 0).all() and (t - starts < 3).all()
        assert starts[first] == first and (starts[:first] == t[:first]).all()
        assert set(t[first:] - starts[first:]) <= {0, 1, 2}
    lengths = np.diff(np.flatnonzero(np.diff(losses.round_starts(10_000, 0, rng, max_round=4)) > 0))
    assert set(lengths) == {1, 2, 3, 4}  # Every round length up to max_round occurs.


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("context_layer", 2), ("fuse_layers", (1, 3))])
def test_context_exit_distills_and_decodes_losslessly(run, lm, tmp_path, field, value):
    """exit.context_layer=2 (attend over layer-2 context) or exit.fuse_layers=(1, L) (fuse the previous
    position's layer-1 and final states, trained on simulated rounds): the tiny pipeline trains the
    exit, exports and evaluates it."""
    config, _, _ = run
    c = tiny_config(**{"data.dir": config.data.dir, f"exit.{field}": value})
    path = train.run_distill(c, tmp_path, lm=lm, progress=False)
    exit_cfg, params = load(path, lm)
    assert exit_cfg == exits.ExitConfig(1, draft_vocab=48, **{field: value})
    report = json.loads((tmp_path / "run.json").read_text())
    before, after = report["metrics"]["untrained"]["train"], report["metrics"]["trained"]["train"]
    assert after["kl"] < 0.7 * before["kl"] and after["top1"] > before["top1"] + 0.1

    # Per draft position, on rounds of 3: position 1 is the plain first-draft figure.
    data = distill_data.load_data(config.data.dir, 1, **{field: value})
    m = losses.data_metrics(lm.cfg, lm.params, params, data, 48, 4, 48, round_len=3)
    first = losses.data_metrics(lm.cfg, lm.params, params, data, 48, 4, 48)
    assert len(m["top1_by_draft_position"]) == 3 and m["positions"] == first["positions"]
    # Without its context (fused states) the same exit drafts worse: they carry information.
    if field == "context_layer":
        blind = dataclasses.replace(data, parts=tuple(p | {"context": p["hidden"]} for p in data.parts))
    else:
        assert data.sequence(0).fuse.shape == (data.lengths[0], 2, lm.cfg.d_model)
        zeros = lambda p: p | {"fuse": tuple(np.zeros_like(f) for f in p["fuse"])}  # noqa: E731
        blind = dataclasses.replace(data, parts=tuple(map(zeros, data.parts)))
    assert losses.data_metrics(lm.cfg, lm.params, params, blind, 48, 4, 48)["top1"] < first["top1"]

    plist = distill_data.prompt_list(config.eval.sets, 1)
    r = evaluation.eval_exit(
        lm,
        path,
        plist,
        max_new_tokens=12,
        max_draft=2,
        controller="fixed",
        warmup=False,
        max_prompt_tokens=config.data.max_prompt_tokens,
        progress=False,
    )
    assert r["identical"] and r["eesd_tokens"] > 0 and r["alpha"] > 0


def test_take_tokens_and_concat(run):
    config, _, _ = run
    data = distill_data.load_data(config.data.dir, 1)
    some = data.take_tokens(150, seed=0)
    assert some.n_train.sum() <= 150 < some.n_train.sum() + data.n_train.max()  # Filled up to one sequence short.
    assert data.take_tokens(0, seed=0) is data and data.take_tokens(150, seed=0).n_seq == some.n_seq
    assert data.take_tokens(150, seed=1).prompt_index.tolist() != some.prompt_index.tolist()
    with pytest.raises(ValueError, match="no whole sequence"):
        data.take_tokens(1, seed=0)

    both = shards.Data.concat([some, data])
    assert both.n_seq == some.n_seq + data.n_seq and both.prompt_index is None
    back = both.subset(range(some.n_seq, both.n_seq))
    for k in range(data.n_seq):
        for field in ("tokens", "mask", "hidden", "topk_logp", "topk_ids"):
            np.testing.assert_array_equal(getattr(back.sequence(k), field), getattr(data.sequence(k), field))


def test_teacher_forced_text_trains_the_exit(run, lm, tmp_path):
    """data.text: a folder of text is cut into sequences, scored by the teacher and trained on."""
    config, _, _ = run
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# Title\n" + "Speculative decoding drafts tokens and verifies them. " * 6)
    (docs / "sub" / "b.txt").write_text("def f(x):\n    return x * 2\n" * 8)
    (docs / "skip.bin").write_bytes(b"\xff" * 100)  # Not a text suffix: ignored.
    (docs / "tiny.txt").write_text("too short")  # Under 32 tokens: no sequence.
    c = tiny_config(
        **{"data.dir": config.data.dir, "data.text.corpus": str(docs), "data.text.seq_len": 40, "data.text.only": True}
    )
    path = train.run_distill(c, tmp_path / "run", lm=lm, progress=False)

    seq = columns(tmp_path / "run" / "text_data")
    want = []  # (document id, tokens) of each expected sequence, in corpus order.
    for name in ("a.md", "sub/b.txt"):
        ids = lm.tokenizer.encode((docs / name).read_text())
        want += [(f"docs/{name}", ids[i : i + 40]) for i in range(0, len(ids), 40) if len(ids[i : i + 40]) >= 32]
    assert seq["prompt_ids"].tolist() == [d for d, _ in want]
    assert [s.tolist() for s in np.split(seq["tokens"], np.cumsum(seq["lengths"])[:-1])] == [w for _, w in want]
    text = distill_data.load_data(tmp_path / "run" / "text_data", 1)
    assert text.n_train.sum() == sum(len(w) - 1 for _, w in want)  # Every position but each sequence's last.

    report = json.loads((tmp_path / "run" / "run.json").read_text())
    before, after = report["metrics"]["untrained"]["train"], report["metrics"]["trained"]["train"]
    assert after["positions"] == text.n_train.sum()  # text.only: the text is all it trained on.
    assert after["kl"] < 0.7 * before["kl"]
    meta = exits.read_exit_metadata(path)
    assert json.loads(meta["extra"])["data"]["text"]["counts"]["train_positions"] == text.n_train.sum()

    text_dir = tmp_path / "run" / "text_data"
    made = distill_data.read_manifest(text_dir)
    (docs / "a.md").write_text("# Changed\n" + "other text " * 40)
    with pytest.raises(ValueError, match=r"made differently \(corpus_sha256 differ\).*data.text.frozen"):
        distill_data.prepare_text_data(lm, c, text_dir, progress=False)  # Another corpus in the same dir is refused.
    # frozen: the data as made is used, whatever the corpus is now, and its manifest is left as it was.
    frozen = tiny_config(**{"data.text.corpus": str(docs), "data.text.seq_len": 40, "data.text.frozen": True})
    assert distill_data.prepare_text_data(lm, frozen, text_dir, progress=False) == made
    with pytest.raises(ValueError, match="another model or seq_len"):
        distill_data.prepare_text_data(lm, tiny_config(**{"data.text.seq_len": 48, "data.text.frozen": True}), text_dir)
    with pytest.raises(ValueError, match="holds no text data"):
        distill_data.prepare_text_data(lm, frozen, tmp_path / "empty", progress=False)


def test_a_bad_text_request_is_refused_before_any_data_is_made(lm, tmp_path):
    """The text data is checked before the responses are generated (hours on a CPU)."""
    c = tiny_config(
        **{
            "data.dir": str(tmp_path / "data"),
            "data.text.corpus": "readmes",
            "data.text.dir": str(tmp_path / "no_text"),
            "data.text.frozen": True,
        }
    )
    with pytest.raises(ValueError, match="holds no text data"):
        train.run_distill(c, tmp_path / "run", lm=lm, progress=False)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("workdir", "overrides", "key"),
    [
        ("gs://bucket/run", {}, "data.dir"),  # The default data dir would be under the URL.
        ("run", {"data.dir": "gs://bucket/data"}, "data.dir"),
        ("run", {"data.text.corpus": "readmes", "data.text.dir": "gs://bucket/text"}, "data.text.dir"),
    ],
)
def test_a_url_data_dir_is_refused_before_anything_is_written(tmp_path, workdir, overrides, key):
    """Shards are memory-mapped: the data must be local even when the workdir is a gs:// URL."""
    workdir = workdir if "://" in workdir else tmp_path / workdir
    with pytest.raises(ValueError, match=f"{key}=.*local"):
        train.run_distill(tiny_config(**overrides), workdir, lm=None, progress=False)
    assert not list(tmp_path.iterdir())


def test_joint_run_trains_an_exit_per_layer_on_one_data_preparation(run, lm, tmp_path):
    """exit.joint_layers (COST-EFF multi-exit training): an exit at every N from one run and one data
    preparation. The LLM is frozen, so each exit is the one a run of its own trains on that data."""
    from safetensors.numpy import load_file

    config, _, alone = run
    with pytest.raises(ValueError, match=r"exit layer N=3 must be in \[1, 3\)"):  # Checked before any data is made.
        train.run_distill(tiny_config(**{"exit.joint_layers": (3,)}), tmp_path / "bad", lm=lm, progress=False)
    assert not (tmp_path / "bad" / "data").exists()
    joint_cfg = tiny_config(**{"data.dir": config.data.dir, "exit.joint_layers": (2,)})
    first = train.run_distill(joint_cfg, tmp_path / "joint", lm=lm, progress=False)
    paths = json.loads((tmp_path / "joint" / "joint.json").read_text())
    assert list(paths) == ["1", "2"] and str(first) == paths["1"]
    ours, theirs = load_file(paths["1"]), load_file(str(alone))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    exit_cfg, _ = load(paths["2"], lm, layer=2)
    assert exit_cfg == exits.ExitConfig(layer=2, own_head=False, draft_vocab=48)
    assert not np.array_equal(load_file(paths["2"])["norm"], ours["norm"])  # Trained on its own layer's states.


@pytest.mark.parametrize("V,k", [(4096, 8), (96, 5)])
def test_teacher_top_k_equals_a_full_sort(V, k):
    """teacher.top_k_logprobs (k best groups of 64, then their top k) = log_softmax + top_k over the vocabulary,
    also when the top k crowd into one group and when the vocabulary is too small for groups."""
    logits = 3.0 * jax.random.normal(jax.random.key(0), (3, 5, V))
    logits = logits.at[0, 0, 64:128].add(20.0)  # Row (0, 0): its whole top k lies in one group.
    want_v, want_i = jax.lax.top_k(jax.nn.log_softmax(logits, -1), k)
    got_v, got_i = teacher.top_k_logprobs(logits, k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))  # Random floats: no ties.
    np.testing.assert_allclose(np.asarray(got_v), np.asarray(want_v), atol=1e-6)
    assert got_i.dtype == jnp.int32


def test_self_made_prompts_are_filtered_deduplicated_and_deterministic(lm):
    """self:N sets: the tiny model's own samples from its template prefix, n distinct ones, the same for
    the same seed, other ones for another seed; held out every 5th; the model is required."""
    from eesd_jax import self_prompts

    keep = lambda text: len(text) >= 3  # noqa: E731  (a random model writes no English: length only)
    made = self_prompts.make_prompts(lm, 7, seed=1, max_new_tokens=32, batch_size=16, keep=keep)
    assert len(made) == 7 and len({self_prompts._key(p.text) for p in made}) == 7
    assert all(keep(p.text) and p.chat for p in made) and [p.heldout for p in made].count(True) == 1
    again = self_prompts.make_prompts(lm, 7, seed=1, max_new_tokens=32, batch_size=16, keep=keep)
    self_prompts._made.clear()  # Made anew, not the process cache: still the same.
    assert [p.text for p in self_prompts.make_prompts(lm, 7, 1, 32, 16, keep=keep)] == [p.text for p in again]
    other = self_prompts.make_prompts(lm, 7, seed=2, max_new_tokens=32, batch_size=16, keep=keep)
    assert [p.text for p in other] != [p.text for p in made]
    with pytest.raises(ValueError, match="passed the filters"):
        self_prompts.make_prompts(lm, 3, max_new_tokens=32, batch_size=16, max_batches=1)  # English filter
    with pytest.raises(ValueError, match="need the model"):
        distill_data.prompt_list(["self:4"])
    with pytest.raises(ValueError, match="expected self:N"):
        distill_data.prompt_list(["self:x"], lm=lm)


def test_self_made_prompt_filter():
    from eesd_jax import self_prompts

    assert self_prompts.acceptable("How do I reverse a linked list in Python without recursion?")
    assert not self_prompts.acceptable("Hi?")  # Too short.
    assert not self_prompts.acceptable("Объясни, пожалуйста, как работает быстрая сортировка.")  # Not English.
    assert not self_prompts.acceptable("the cat the cat the cat the cat the cat the cat")  # Repeats itself.
    assert self_prompts.parse_set("self:200") == (200, 0) and self_prompts.parse_set("self:5@3") == (5, 3)
    assert self_prompts.parse_set("chat") is None
