"""Self-distillation data: making it, storing it in shards, and the `Data` view training reads
(docs/design.md, Self-distillation; the on-disk layout is shards.py's).

Pipeline (train.run_distill drives it):
  1. `generate_data`: prompts from prompts.load_prompts sets, responses sampled from the
     LLM itself with generate.generate_ar (batched, jitted), written shard by shard
     (DATA/shards/NNNNN: token ids, lengths, prompt lengths and indices) after
     DATA/manifest.json saying how it is made. Deterministic for a seed; a stopped run
     resumes after its last complete shard. (`text_data` instead cuts a corpus into
     teacher-forced sequences.)
  2. `teacher_pass`: one forward of the frozen LLM (teacher.run_teacher) over each shard,
     adding the teacher's top-k log-probs and ids per position and the layer-N hidden states
     for each N asked (float16): the first N layers are frozen, so the exit trains on these
     directly. Resumes shard by shard too.
  3. `choose_draft_vocab`: the most frequent teacher top-1 tokens (EOS included).
`prepare_data` / `plan_text_data` reuse a data dir whose manifest matches and refuse one
made differently (or in an older format). `load_data` opens the shards as memmaps: `Data`
reads a sequence when asked for it, and `Data.split` holds out whole prompts for
validation. Batches and losses over `Data` are in losses.py.

Position t of a sequence predicts token t+1; the positions trained on are those whose
next token is a response token (t in [prompt_len - 1, length - 1)).
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from eesd_jax import corpus, generate, prompts, self_prompts, shards
from eesd_jax.sampling import SamplingConfig
from eesd_jax.shards import Data
from eesd_jax.teacher import LM, progress_bar, run_teacher

DATA_FORMAT = "eesd_jax.distill_data/2"
TEXT_SHARD = 1024  # Sequences per shard of teacher-forced text.


def prompt_list(sets: Sequence[str], n_per_set: int = 0, lm: LM | None = None) -> list[prompts.Prompt]:
    """Prompts of "source:split" sets (split defaults to "all"), the first n of each (0 = all).

    "self:N[@SEED]" sets are made by the LLM `lm` itself (self_prompts)."""
    out = []
    for spec in sets:
        source, _, split = spec.rpartition(":") if spec.rsplit(":", 1)[-1] in prompts.SPLITS else (spec, "", "all")
        if (made := self_prompts.parse_set(source)) is None:
            out += prompts.load_prompts(source, split, n_per_set or None)
            continue
        if lm is None:
            raise ValueError(f"{spec}: self-made prompts need the model")
        got = [p for p in self_prompts.make_prompts(lm, *made) if split == "all" or p.heldout == (split == "heldout")]
        out += got[: n_per_set or None]
    if not out:
        raise ValueError(f"no prompts in {list(sets)}")
    return out


def validation_prompts(config, n: int = 0, lm: LM | None = None) -> list[prompts.Prompt]:
    """The prompts an exit distilled with `config` held out for validation (config.train.val_every_prompt,
    Data.split's rule): never trained on, disjoint from the held-out sets. n of them spread over
    the list (0: all); the training prompts if the config holds none out (tiny). lm: for self-made sets."""
    pool = prompt_list(config.data.sets, int(config.data.n_per_set), lm)
    if every := int(config.train.val_every_prompt):
        pool = pool[every - 1 :: every]
    return pool[:: max(1, len(pool) // n)][:n] if n else pool


# ----------------------------------------------------------------------------- 1. responses


def data_spec(lm: LM, data_cfg) -> dict:
    """What determines the generated sequences (a data dir is reused only if this matches)."""
    return {
        "model_fingerprint": lm.fingerprint,
        "sets": list(data_cfg.sets),
        "n_per_set": int(data_cfg.n_per_set),
        "samples_per_prompt": int(data_cfg.samples_per_prompt),
        "max_prompt_tokens": int(data_cfg.max_prompt_tokens),
        "max_new_tokens": int(data_cfg.max_new_tokens),
        "temperature": float(data_cfg.temperature),
        "top_p": float(data_cfg.top_p),
        "batch_size": int(data_cfg.batch_size),
        "shard_size": int(data_cfg.shard_size),
        "seed": int(data_cfg.seed),
    }


def generate_data(lm: LM, data_cfg, data_dir, progress: bool = True) -> dict:
    """Sample responses from the LLM into shards of data.shard_size sequences (whole generation batches),
    each written when its batches are done; a stopped run resumes after its last complete shard and
    makes the same data. Returns the manifest."""
    data_dir = pathlib.Path(data_dir)
    spec = data_spec(lm, data_cfg)
    plist = prompt_list(data_cfg.sets, data_cfg.n_per_set, lm)
    manifest = _start(data_dir, spec, lm, {"sets": list(data_cfg.sets), "count": len(plist)})
    manifest["sampling"] = {k: spec[k] for k in ("temperature", "top_p", "max_new_tokens", "max_prompt_tokens")}
    manifest["seed"] = spec["seed"]
    encoded = [lm.encode(p)[-data_cfg.max_prompt_tokens :] for p in plist]
    jobs = [(i, s) for s in range(data_cfg.samples_per_prompt) for i in range(len(plist))]
    order = sorted(range(len(jobs)), key=lambda j: (len(encoded[jobs[j][0]]), j))  # Less padding per batch.
    batches = [order[i : i + data_cfg.batch_size] for i in range(0, len(order), data_cfg.batch_size)]
    per_shard = -(-int(data_cfg.shard_size) // int(data_cfg.batch_size))
    groups = [range(g, min(g + per_shard, len(batches))) for g in range(0, len(batches), per_shard)]
    sampling = SamplingConfig(temperature=data_cfg.temperature, top_p=data_cfg.top_p)
    done = set(shards.complete(data_dir))
    t0 = time.perf_counter()
    bar = progress_bar(progress, total=len(jobs), desc="generate", unit="seq")
    bar.update(sum(len(batches[b]) for k in done for b in groups[k]))
    for k, group in enumerate(groups):
        if k in done:
            continue
        seqs, made = [], []  # Sequences and their jobs, in generation order.
        for b in group:
            gen = generate.generate_ar(
                lm.cfg,
                lm.params,
                [encoded[jobs[j][0]] for j in batches[b]],
                data_cfg.max_new_tokens,
                sampling=sampling,
                eos_ids=lm.eos_ids,
                seed=int(data_cfg.seed) * 1_000_003 + b,
            )
            seqs += [encoded[jobs[j][0]] + toks for j, toks in zip(batches[b], gen.tokens)]
            made += [jobs[j] for j in batches[b]]
            bar.update(len(batches[b]))
        columns = _sequence_columns(seqs, [len(encoded[i]) for i, _ in made], [i for i, _ in made])
        columns |= {
            "prompt_ids": np.array([plist[i].id for i, _ in made]),
            "sample_index": np.array(made, np.int32)[:, 1],
        }
        shards.write_shard(data_dir, k, columns)
    bar.close()
    manifest["seconds"]["generate"] = round(time.perf_counter() - t0, 2)
    return _finish(data_dir, manifest, lm.eos_ids)


def _sequence_columns(seqs, prompt_lens, prompt_index) -> dict[str, np.ndarray]:
    """A shard's sequence columns (position t of a sequence predicts token t + 1; those predicting a
    non-prompt token, t in [prompt_len - 1, length - 1), are trained on)."""
    return {
        "tokens": np.concatenate([np.asarray(s, np.int32) for s in seqs]),
        "lengths": np.array([len(s) for s in seqs], np.int32),
        "prompt_lens": np.asarray(prompt_lens, np.int32),
        "prompt_index": np.asarray(prompt_index, np.int32),
    }


def _start(data_dir: pathlib.Path, spec: dict, lm: LM, prompt_info: dict) -> dict:
    """The manifest of data being made in data_dir (refused if made differently); written first, so a
    stopped run is resumed only with the same spec."""
    manifest = _check_spec(data_dir, spec) or {
        "format": DATA_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "spec": spec,
        "prompts": prompt_info,
        "complete": False,
        "seconds": {},
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(data_dir, manifest)
    return manifest


def _finish(data_dir: pathlib.Path, manifest: dict, eos_ids) -> dict:
    """Record the counts of the sequences written in the manifest and mark it complete."""
    lengths, prompt_lens, ends = [], [], []
    for k in shards.complete(data_dir):
        n, p = np.asarray(shards.read(data_dir, k, "lengths")), np.asarray(shards.read(data_dir, k, "prompt_lens"))
        tokens = shards.read(data_dir, k, "tokens")
        lengths.append(n), prompt_lens.append(p), ends.append(np.where(n > p, tokens[np.cumsum(n) - 1], -1))
    lengths, prompt_lens, ends = map(np.concatenate, (lengths, prompt_lens, ends))
    manifest["counts"] = {
        "sequences": len(lengths),
        "shards": len(shards.complete(data_dir)),
        "tokens": int(lengths.sum()),
        "response_tokens": int((lengths - prompt_lens).sum()),
        "train_positions": int((lengths - prompt_lens).sum()),
    } | ({"eos_hit": int(np.isin(ends, eos_ids).sum())} if eos_ids else {})
    manifest["complete"] = True
    _write_manifest(data_dir, manifest)
    return manifest


def text_spec(lm: LM, text_cfg, docs: Sequence[corpus.Document]) -> dict:
    """What determines teacher-forced text sequences (a text dir is reused only if this matches)."""
    return {
        "model_fingerprint": lm.fingerprint,
        "corpus": str(text_cfg.corpus),
        "corpus_sha256": corpus.fingerprint(docs),
        "seq_len": int(text_cfg.seq_len),
    }


def text_data(lm: LM, text_cfg, docs: Sequence[corpus.Document], data_dir, progress: bool = True) -> dict:
    """Cut a corpus' documents into sequences of text_cfg.seq_len tokens, in shards of TEXT_SHARD; returns
    the manifest.

    Every position but a sequence's last is trained on (prompt_len 1: each predicts the next
    text token); each piece is its own "prompt" (prompt_index), so Data.take_tokens subsamples
    whole pieces.
    """
    data_dir = pathlib.Path(data_dir)
    manifest = _start(data_dir, text_spec(lm, text_cfg, docs), lm, {"sets": [f"text:{text_cfg.corpus}"]})
    manifest |= {"sampling": "teacher-forced", "seed": None}
    t0 = time.perf_counter()
    seqs, doc_ids = [], []
    for doc in progress_bar(progress, iterable=docs, desc="tokenize", unit="doc"):
        token_ids = lm.encode(prompts.Prompt(doc.id, doc.text, chat=False, heldout=False))
        for piece in corpus.chunk(token_ids, int(text_cfg.seq_len)):
            seqs.append(piece)
            doc_ids.append(doc.id)
    if not seqs:
        raise ValueError(f"text corpus {text_cfg.corpus!r} has no document of {corpus.MIN_TOKENS} tokens or more")
    done = set(shards.complete(data_dir))  # Left by a stopped run: the same pieces.
    for k, a in enumerate(range(0, len(seqs), TEXT_SHARD)):
        if k in done:
            continue
        part = range(a, min(a + TEXT_SHARD, len(seqs)))
        columns = _sequence_columns([seqs[i] for i in part], [1] * len(part), part)
        shards.write_shard(data_dir, k, columns | {"prompt_ids": np.array([doc_ids[i] for i in part])})
    manifest["prompts"]["count"] = len(docs)
    manifest["seconds"]["tokenize"] = round(time.perf_counter() - t0, 2)
    return _finish(data_dir, manifest, ())


def _write_manifest(data_dir: pathlib.Path, manifest: dict) -> None:
    tmp = shards.temporary(data_dir / "manifest.json")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(data_dir / "manifest.json")


def read_manifest(data_dir) -> dict | None:
    """The data dir's manifest (None if it has none); a dir of another format is refused."""
    path = pathlib.Path(data_dir) / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != DATA_FORMAT:
        raise ValueError(
            f"{data_dir} holds distillation data of format {manifest.get('format')!r}, not {DATA_FORMAT!r}: "
            "delete it to make it again"
        )
    return manifest


# ----------------------------------------------------------------------------- 2. teacher pass


def teacher_pass(lm: LM, data_dir, layers: Sequence[int], top_k: int, batch_size: int = 8, progress: bool = True):
    """Add to every shard the columns it lacks: hidden_N{n} for each n in layers, and top_k log-probs and
    ids (topk_logp, topk_ids; unless top_k == 0), states and log-probs in float16. Each shard's
    columns are written when its pass is done, so a stopped pass resumes. Returns the updated manifest."""
    data_dir = pathlib.Path(data_dir)
    layers = sorted(set(layers))
    todo = {}  # shard -> (layers, top_k) still to compute.
    for k in shards.complete(data_dir):
        stored_k = shards.read(data_dir, k, "topk_ids").shape[1] if shards.has_column(data_dir, k, "topk_ids") else 0
        need = [n for n in layers if not shards.has_column(data_dir, k, f"hidden_N{n}")]
        if need or stored_k < top_k:
            todo[k] = (need, top_k if stored_k < top_k else 0)
    manifest = read_manifest(data_dir)
    t0 = time.perf_counter()
    n_seq = {k: len(shards.read(data_dir, k, "lengths")) for k in todo}
    bar = progress_bar(progress and bool(todo), total=sum(n_seq.values()), desc="teacher", unit="seq")
    for k, (need, shard_k) in todo.items():
        lengths = np.asarray(shards.read(data_dir, k, "lengths"))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.asarray(shards.read(data_dir, k, "tokens"))
        hidden, logp, ids = run_teacher(lm, tokens, offsets, need, shard_k, batch_size, progress=False)
        columns = {f"hidden_N{n}": h.astype(np.float16) for n, h in hidden.items()}
        shards.add_columns(
            data_dir, k, columns | ({"topk_logp": logp.astype(np.float16), "topk_ids": ids} if shard_k else {})
        )
        bar.update(n_seq[k])
    bar.close()
    if todo:
        manifest["teacher"] = {"top_k": max(top_k, manifest.get("teacher", {}).get("top_k", 0))}
        manifest["hidden_layers"] = sorted(set(manifest.get("hidden_layers", [])) | set(layers))
        manifest["seconds"][f"teacher_{'_'.join(map(str, layers))}"] = round(time.perf_counter() - t0, 2)
        _write_manifest(data_dir, manifest)
    return manifest


def prepare_data(lm: LM, config, data_dir, progress: bool = True) -> dict:
    """Make sure DATA has sequences, teacher targets and layer-N hidden states; reuse what matches."""
    spec = data_spec(lm, config.data)
    return _prepare(lm, config, data_dir, spec, lambda: generate_data(lm, config.data, data_dir, progress), progress)


def prepare_text_data(lm: LM, config, data_dir, progress: bool = True) -> dict:
    """prepare_data for the teacher-forced corpus of config.data.text."""
    return plan_text_data(lm, config, data_dir)(progress)


def plan_text_data(lm: LM, config, data_dir):
    """Check what config.data.text asks of data_dir, before any compute; returns prepare(progress) -> manifest.

    With data.text.frozen the corpus is not read: the text data already in data_dir is used as
    it was made (its manifest records the corpus and its sha256), as long as it was made by this
    model at this seq_len. A corpus like "readmes" changes when packages are installed, and
    the teacher pass over it takes most of an hour on a CPU.
    """
    text_cfg, data_dir = config.data.text, pathlib.Path(data_dir)
    if text_cfg.frozen:
        manifest = read_manifest(data_dir)
        if manifest is None or not manifest.get("complete"):
            raise ValueError(f"data.text.frozen: {data_dir} holds no text data to use (run once without frozen)")
        spec = manifest["spec"]
        made_for = {"model_fingerprint": lm.fingerprint, "seq_len": int(text_cfg.seq_len)}
        if any(spec.get(k) != v for k, v in made_for.items()):
            raise ValueError(f"data.text.frozen: {data_dir} was made for another model or seq_len than this config's")
        docs = None  # Not read: the sequences are there.
    else:
        docs = corpus.load_corpus(text_cfg.corpus)
        spec = text_spec(lm, text_cfg, docs)
        _check_spec(data_dir, spec)

    def prepare(progress: bool = True) -> dict:
        make = lambda: text_data(lm, text_cfg, docs, data_dir, progress)  # noqa: E731
        return _prepare(lm, config, data_dir, spec, make, progress)

    return prepare


def _check_spec(data_dir: pathlib.Path, spec: dict) -> dict | None:
    """The data dir's manifest (None if it has none); refused if it says the data was made differently,
    naming what differs."""
    manifest = read_manifest(data_dir)
    made = (manifest or {}).get("spec")
    if made is not None and made != spec:
        differ = sorted(k for k in made.keys() | spec.keys() if made.get(k) != spec.get(k))
        raise ValueError(
            f"{data_dir} holds data made differently ({', '.join(differ)} differ); "
            "use another workdir or data dir, or delete it"
            + (" (or data.text.frozen=true to train on that text data as made)" if "corpus_sha256" in differ else "")
        )
    return manifest


def _prepare(lm: LM, config, data_dir, spec: dict, make_sequences, progress: bool) -> dict:
    data_dir = pathlib.Path(data_dir)
    manifest = _check_spec(data_dir, spec)
    if manifest is None or not manifest.get("complete"):
        manifest = make_sequences()
    e, d = config.exit, config.data
    want = {int(e.layer), *map(int, d.feature_layers), *map(int, e.get("fuse_layers", ()))} | {int(e.context_layer)}
    return teacher_pass(lm, data_dir, sorted(want - {0}), int(d.top_k), int(d.batch_size), progress)


def load_data(
    data_dir, layer: int, top_k: int | None = None, context_layer: int = 0, fuse_layers: Sequence[int] = ()
) -> Data:
    """The data dir's sequences for an exit at `layer` (its first top_k teacher log-probs; default all),
    over memmaps of its shards."""
    manifest = read_manifest(data_dir)
    if manifest is None or not manifest.get("complete"):
        raise ValueError(f"{data_dir} holds no complete distillation data (run eesd distill to make it)")
    parts, per_seq = [], []
    for p, k in enumerate(shards.complete(data_dir)):
        col = functools.partial(shards.read, data_dir, k)
        parts.append(
            {"tokens": col("tokens"), "hidden": col(f"hidden_N{layer}"), "topk_logp": col("topk_logp")}
            | {"topk_ids": col("topk_ids")}
            | ({"context": col(f"hidden_N{context_layer}")} if context_layer else {})
            | ({"fuse": tuple(col(f"hidden_N{n}") for n in fuse_layers)} if fuse_layers else {})
        )
        lengths = np.asarray(col("lengths"), np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        per_seq.append((np.full(len(lengths), p), starts, lengths, col("prompt_lens"), col("prompt_index")))
    part, start, lengths, prompt_lens, prompt_index = (np.concatenate(a) for a in zip(*per_seq))
    return Data(
        tuple(parts),
        part,
        start,
        lengths,
        prompt_lens.astype(np.int64),
        prompt_index,
        top_k or parts[0]["topk_ids"].shape[1],
    )


# ----------------------------------------------------------------------------- 3. draft vocabulary


def vocab_counts(data: Data, vocab_size: int, chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """([V] int64 teacher top-1 counts, [V] float64 teacher top-k mass) over the trained positions,
    read a sequence at a time (counted every `chunk` positions)."""
    top1, mass = np.zeros(vocab_size, np.int64), np.zeros(vocab_size)
    ids, logp = [], []

    def count():
        if ids:
            i, lp = np.concatenate(ids), np.concatenate(logp).astype(np.float64)
            top1[:] += np.bincount(i[:, 0], minlength=vocab_size)
            mass[:] += np.bincount(i.ravel(), np.exp(lp).ravel(), minlength=vocab_size)
            ids.clear(), logp.clear()

    for k in range(data.n_seq):
        s = data.sequence(k)
        ids.append(s.topk_ids[s.mask]), logp.append(s.topk_logp[s.mask])
        if sum(len(i) for i in ids) >= chunk:
            count()
    count()
    return top1, mass


def choose_draft_vocab(data: Data, size: int, vocab_size: int, eos_ids: Sequence[int] = ()) -> np.ndarray:
    """The `size` most frequent teacher top-1 tokens (ties: top-k mass, then id), EOS included, sorted."""
    V = vocab_size
    if not 0 < size <= V:
        raise ValueError(f"draft vocabulary size must be in [1, {V}], got {size}")
    top1_counts, topk_mass = vocab_counts(data, V)
    rank = np.lexsort((np.arange(V), -topk_mass, -top1_counts))  # Last key is primary.
    eos = [int(e) for e in eos_ids if 0 <= int(e) < V][:size]
    rest = [int(t) for t in rank if t not in eos][: size - len(eos)]
    return np.sort(np.array(eos + rest, np.int32))


def vocab_map(vocab_size: int, vocab_ids: np.ndarray | None) -> np.ndarray:
    """[V] int32: a token's index in the draft vocabulary, -1 outside (identity when None)."""
    if vocab_ids is None:
        return np.arange(vocab_size, dtype=np.int32)
    out = np.full(vocab_size, -1, np.int32)
    out[np.asarray(vocab_ids)] = np.arange(len(vocab_ids), dtype=np.int32)
    return out
