"""Self-distillation data: making it, storing it, and the `Data` container training reads
(docs/design.md, Self-distillation).

Pipeline (train.run_distill drives it):
  1. `generate_data`: prompts from prompts.load_prompts sets, responses sampled from the
     LLM itself with generate.generate_ar (batched, jitted), stored compactly as
     DATA/sequences.npz (flat token ids + offsets, a mask of positions to train on)
     with DATA/manifest.json saying how it was made. Deterministic for a seed.
     (`text_data` instead cuts a corpus into teacher-forced sequences.)
  2. `teacher_pass`: one forward of the frozen LLM (teacher.run_teacher) over each sequence,
     storing the teacher's top-k log-probs and ids per position (DATA/teacher.npz) and the
     layer-N hidden states for each N asked (DATA/hidden_N{n}.npz): the first N layers are
     frozen, so the exit trains on these directly.
  3. `choose_draft_vocab`: the most frequent teacher top-1 tokens (EOS included).
`prepare_data` / `plan_text_data` reuse a data dir whose manifest matches and refuse one
made differently. `Data.split` holds out whole prompts for validation. Batches and losses
over `Data` are in losses.py.

Position t of a sequence predicts token t+1; the positions trained on are those whose
next token is a response token (t in [prompt_len - 1, length - 1)).
All arrays are plain numpy in .npz files (loaded with allow_pickle=False).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from eesd_jax import corpus, generate, prompts, self_prompts, sharding
from eesd_jax.sampling import SamplingConfig
from eesd_jax.teacher import LM, progress_bar, run_teacher

DATA_FORMAT = "eesd_jax.distill_data/1"


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
        "seed": int(data_cfg.seed),
    }


def generate_data(lm: LM, data_cfg, data_dir, progress: bool = True) -> dict:
    """Sample responses from the LLM; write sequences.npz and manifest.json. Returns the manifest."""
    data_dir = pathlib.Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = data_spec(lm, data_cfg)
    plist = prompt_list(data_cfg.sets, data_cfg.n_per_set, lm)
    encoded = [lm.encode(p)[-data_cfg.max_prompt_tokens :] for p in plist]
    jobs = [(i, s) for s in range(data_cfg.samples_per_prompt) for i in range(len(plist))]
    order = sorted(range(len(jobs)), key=lambda j: (len(encoded[jobs[j][0]]), j))  # Less padding per batch.
    batches = [order[i : i + data_cfg.batch_size] for i in range(0, len(order), data_cfg.batch_size)]
    sampling = SamplingConfig(temperature=data_cfg.temperature, top_p=data_cfg.top_p)
    responses: list[list[int]] = [[] for _ in jobs]
    t0 = time.perf_counter()
    bar = progress_bar(progress, total=len(jobs), desc="generate", unit="seq")
    for b, batch in enumerate(batches):
        gen = generate.generate_ar(
            lm.cfg,
            lm.params,
            [encoded[jobs[j][0]] for j in batch],
            data_cfg.max_new_tokens,
            sampling=sampling,
            eos_ids=lm.eos_ids,
            seed=int(data_cfg.seed) * 1_000_003 + b,
        )
        for j, toks in zip(batch, gen.tokens):
            responses[j] = toks
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0

    seqs = [encoded[i] + responses[j] for j, (i, _) in enumerate(jobs)]
    counts = _write_sequences(
        data_dir,
        seqs,
        [len(encoded[i]) for i, _ in jobs],
        [i for i, _ in jobs],
        [s for _, s in jobs],
        [plist[i].id for i, _ in jobs],
    )
    eos_hit = sum(1 for r in responses if r and r[-1] in lm.eos_ids)
    manifest = {
        "format": DATA_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "spec": spec,
        "prompts": {"sets": list(data_cfg.sets), "count": len(plist)},
        "sampling": {k: spec[k] for k in ("temperature", "top_p", "max_new_tokens", "max_prompt_tokens")},
        "seed": spec["seed"],
        "counts": counts | {"eos_hit": eos_hit},
        "seconds": {"generate": round(seconds, 2)},
    }
    _write_manifest(data_dir, manifest)
    return manifest


def _write_sequences(data_dir, seqs, prompt_lens, prompt_index, sample_index, prompt_ids) -> dict:
    """DATA/sequences.npz (flat tokens + offsets; positions predicting a non-prompt token are trained)."""
    lengths = np.array([len(s) for s in seqs], np.int32)
    prompt_lens = np.asarray(prompt_lens, np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([np.asarray(s, np.int32) for s in seqs])
    mask = np.zeros(len(tokens), bool)
    for k in range(len(seqs)):
        mask[offsets[k] + prompt_lens[k] - 1 : offsets[k + 1] - 1] = True  # Predicts a response token.
    _save_npz(
        pathlib.Path(data_dir) / "sequences.npz",
        tokens=tokens,
        offsets=offsets,
        prompt_lens=prompt_lens,
        mask=mask,
        prompt_index=np.asarray(prompt_index, np.int32),
        sample_index=np.asarray(sample_index, np.int32),
        prompt_ids=np.array(prompt_ids),
    )
    return {
        "sequences": len(seqs),
        "tokens": int(lengths.sum()),
        "response_tokens": int((lengths - prompt_lens).sum()),
        "train_positions": int(mask.sum()),
    }


def text_spec(lm: LM, text_cfg, docs: Sequence[corpus.Document]) -> dict:
    """What determines teacher-forced text sequences (a text dir is reused only if this matches)."""
    return {
        "model_fingerprint": lm.fingerprint,
        "corpus": str(text_cfg.corpus),
        "corpus_sha256": corpus.fingerprint(docs),
        "seq_len": int(text_cfg.seq_len),
    }


def text_data(lm: LM, text_cfg, docs: Sequence[corpus.Document], data_dir, progress: bool = True) -> dict:
    """Cut a corpus' documents into sequences of text_cfg.seq_len tokens; write sequences.npz and manifest.json.

    Every position but a sequence's last is trained on (prompt_len 1: each predicts the next
    text token); each piece is its own "prompt" (prompt_index), so Data.take_tokens subsamples
    whole pieces.
    """
    data_dir = pathlib.Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seqs, doc_ids = [], []
    for doc in progress_bar(progress, iterable=docs, desc="tokenize", unit="doc"):
        token_ids = lm.encode(prompts.Prompt(doc.id, doc.text, chat=False, heldout=False))
        for piece in corpus.chunk(token_ids, int(text_cfg.seq_len)):
            seqs.append(piece)
            doc_ids.append(doc.id)
    if not seqs:
        raise ValueError(f"text corpus {text_cfg.corpus!r} has no document of {corpus.MIN_TOKENS} tokens or more")
    counts = _write_sequences(data_dir, seqs, [1] * len(seqs), range(len(seqs)), [0] * len(seqs), doc_ids)
    manifest = {
        "format": DATA_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": lm.name, "fingerprint": lm.fingerprint},
        "spec": text_spec(lm, text_cfg, docs),
        "prompts": {"sets": [f"text:{text_cfg.corpus}"], "count": len(docs)},
        "sampling": "teacher-forced",
        "seed": None,
        "counts": counts,
        "seconds": {"tokenize": round(time.perf_counter() - t0, 2)},
    }
    _write_manifest(data_dir, manifest)
    return manifest


def _write_manifest(data_dir: pathlib.Path, manifest: dict) -> None:
    def write():
        tmp = data_dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(data_dir / "manifest.json")

    sharding.main_writes("distill_data.manifest", write)


def _save_npz(path, **arrays) -> None:
    """np.savez by process 0 (every process of a multi-host run made the same arrays)."""
    sharding.main_writes(f"distill_data.{pathlib.Path(path).name}", lambda: np.savez(path, **arrays))


def read_manifest(data_dir) -> dict | None:
    path = pathlib.Path(data_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- 2. teacher pass


def teacher_pass(
    lm: LM, data_dir, layers: Sequence[int], top_k: int, batch_size: int = 8, progress: bool = True, half=()
) -> dict:
    """Store teacher.npz (unless top_k == 0) and hidden_N{n}.npz for each n (float16 for n in `half`);
    update the manifest."""
    data_dir = pathlib.Path(data_dir)
    seq = load_npz(data_dir / "sequences.npz")
    t0 = time.perf_counter()
    hidden, logp, ids = run_teacher(lm, seq["tokens"], seq["offsets"], layers, top_k, batch_size, progress, half=half)
    manifest = read_manifest(data_dir)
    if top_k:
        top1 = ids[seq["mask"], 0]
        _save_npz(
            data_dir / "teacher.npz",
            topk_logp=logp,
            topk_ids=ids,
            # Draft-vocabulary ranking: teacher top-1 counts on train positions, then top-k mass.
            top1_counts=np.bincount(top1, minlength=lm.cfg.vocab_size).astype(np.int64),
            topk_mass=np.bincount(
                ids[seq["mask"]].ravel(), np.exp(logp[seq["mask"]]).ravel(), minlength=lm.cfg.vocab_size
            ),
        )
        manifest["teacher"] = {"top_k": top_k}
    for n, h in hidden.items():
        _save_npz(data_dir / f"hidden_N{n}.npz", hidden=h)
    manifest.setdefault("hidden_layers", [])
    manifest["hidden_layers"] = sorted(set(manifest["hidden_layers"]) | set(hidden))
    manifest["seconds"][f"teacher_{'_'.join(map(str, sorted(hidden)))}"] = round(time.perf_counter() - t0, 2)
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
        if manifest is None or not (data_dir / "sequences.npz").is_file():
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
    if manifest is None or not (data_dir / "sequences.npz").is_file():
        manifest = make_sequences()
    e, d = config.exit, config.data
    read = {int(e.layer), *map(int, d.feature_layers)} | {int(e.context_layer)} - {0}
    half = {int(n) for n in e.get("fuse_layers", ())} - read  # Fused exits' inputs only: stored in float16.
    want = sorted(read | half)
    top_k = int(d.top_k)
    teacher_ok = manifest.get("teacher", {}).get("top_k", 0) >= top_k and (data_dir / "teacher.npz").is_file()
    missing = [n for n in want if not (data_dir / f"hidden_N{n}.npz").is_file()]
    if not teacher_ok:
        manifest = teacher_pass(lm, data_dir, want, top_k, config.data.batch_size, progress, half)
    elif missing:
        manifest = teacher_pass(lm, data_dir, missing, 0, config.data.batch_size, progress, half)
    return manifest


@dataclasses.dataclass
class Data:
    """Everything training needs for one exit layer, flat over sequences (see module doc)."""

    tokens: np.ndarray  # [total] int32.
    offsets: np.ndarray  # [n_seq + 1] int64.
    prompt_lens: np.ndarray  # [n_seq] int32.
    mask: np.ndarray  # [total] bool: position predicts a response token.
    hidden: np.ndarray  # [total, D] float32 layer-N hidden state.
    topk_logp: np.ndarray  # [total, C] float32 teacher top-k log-probs (full-vocabulary softmax).
    topk_ids: np.ndarray  # [total, C] int32.
    top1_counts: np.ndarray  # [V] int64.
    topk_mass: np.ndarray  # [V] float64.
    prompt_index: np.ndarray | None = None  # [n_seq] which prompt each sequence answers.
    context: np.ndarray | None = None  # [total, D] float32 context-layer hidden state (ExitConfig.context_layer).
    fuse: np.ndarray | None = None  # [total, F, D] float16 states after the fuse layers (ExitConfig.fuse_layers).

    @property
    def n_seq(self) -> int:
        return len(self.prompt_lens)

    def subset(self, seq_idx: Sequence[int]) -> Data:
        """The sequences seq_idx (in that order), vocabulary statistics recomputed from them."""
        seq_idx = np.asarray(seq_idx, np.int64)
        pos = np.concatenate([np.arange(self.offsets[k], self.offsets[k + 1]) for k in seq_idx] or [[]]).astype(int)
        lengths = np.diff(self.offsets)[seq_idx]
        mask = self.mask[pos]
        ids, logp = self.topk_ids[pos], self.topk_logp[pos]
        V = len(self.top1_counts)
        return Data(
            tokens=self.tokens[pos],
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            prompt_lens=self.prompt_lens[seq_idx],
            mask=mask,
            hidden=self.hidden[pos],
            topk_logp=logp,
            topk_ids=ids,
            top1_counts=np.bincount(ids[mask, 0], minlength=V).astype(np.int64),
            topk_mass=np.bincount(ids[mask].ravel(), np.exp(logp[mask]).ravel(), minlength=V),
            prompt_index=None if self.prompt_index is None else self.prompt_index[seq_idx],
            context=None if self.context is None else self.context[pos],
            fuse=None if self.fuse is None else self.fuse[pos],
        )

    def take_tokens(self, budget: int, seed: int) -> Data:
        """Sequences in a seeded random order, as many as fit `budget` trained positions (0 = all)."""
        if not budget:
            return self
        order = np.random.default_rng(seed).permutation(self.n_seq)
        per_seq = np.add.reduceat(self.mask, self.offsets[:-1])[order]
        keep = order[np.cumsum(per_seq) <= budget]
        if not len(keep):
            raise ValueError(f"a budget of {budget} trained positions holds no whole sequence")
        return self.subset(np.sort(keep))

    @staticmethod
    def concat(parts: Sequence[Data]) -> Data:
        """The sequences of every part, in order; no prompt index (the parts' indices would collide)."""
        if any((p.context is None) != (parts[0].context is None) for p in parts):
            raise ValueError("cannot mix data with and without context-layer states")
        if any((p.fuse is None) != (parts[0].fuse is None) for p in parts):
            raise ValueError("cannot mix data with and without fuse-layer states")
        cat = lambda field: (
            None if getattr(parts[0], field) is None else np.concatenate([getattr(p, field) for p in parts])
        )  # noqa: E731
        lengths = np.concatenate([np.diff(p.offsets) for p in parts])
        return Data(
            tokens=cat("tokens"),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            prompt_lens=cat("prompt_lens"),
            mask=cat("mask"),
            hidden=cat("hidden"),
            topk_logp=cat("topk_logp"),
            topk_ids=cat("topk_ids"),
            top1_counts=sum(p.top1_counts for p in parts),
            topk_mass=sum(p.topk_mass for p in parts),
            context=cat("context"),
            fuse=cat("fuse"),
        )

    def split(self, every: int) -> tuple[Data, Data | None]:
        """(train, validation): sequences of prompts with index % every == every - 1 validate (every=0: none)."""
        if not every:
            return self, None
        if self.prompt_index is None:
            raise ValueError("this data has no prompt index to split by")
        val = self.prompt_index % every == every - 1
        if val.all() or not val.any():
            raise ValueError(f"validation split every {every} prompts leaves an empty part")
        return self.subset(np.flatnonzero(~val)), self.subset(np.flatnonzero(val))


def load_data(
    data_dir, layer: int, top_k: int | None = None, context_layer: int = 0, fuse_layers: Sequence[int] = ()
) -> Data:
    data_dir = pathlib.Path(data_dir)
    seq, teacher = load_npz(data_dir / "sequences.npz"), load_npz(data_dir / "teacher.npz")
    k = top_k or teacher["topk_ids"].shape[1]
    return Data(
        tokens=seq["tokens"],
        offsets=seq["offsets"],
        prompt_lens=seq["prompt_lens"],
        mask=seq["mask"],
        hidden=load_npz(data_dir / f"hidden_N{layer}.npz")["hidden"],
        topk_logp=teacher["topk_logp"][:, :k],
        topk_ids=teacher["topk_ids"][:, :k],
        top1_counts=teacher["top1_counts"],
        topk_mass=teacher["topk_mass"],
        prompt_index=seq["prompt_index"],
        context=load_npz(data_dir / f"hidden_N{context_layer}.npz")["hidden"] if context_layer else None,
        fuse=np.stack([load_npz(data_dir / f"hidden_N{n}.npz")["hidden"].astype(np.float16) for n in fuse_layers], 1)
        if fuse_layers
        else None,
    )


# ----------------------------------------------------------------------------- 3. draft vocabulary


def choose_draft_vocab(data: Data, size: int, eos_ids: Sequence[int] = ()) -> np.ndarray:
    """The `size` most frequent teacher top-1 tokens (ties: top-k mass, then id), EOS included, sorted."""
    V = len(data.top1_counts)
    if not 0 < size <= V:
        raise ValueError(f"draft vocabulary size must be in [1, {V}], got {size}")
    rank = np.lexsort((np.arange(V), -data.topk_mass, -data.top1_counts))  # Last key is primary.
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
