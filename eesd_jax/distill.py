"""Self-distillation data and losses for the early-exiting layer (docs/design.md, Self-distillation).

Pipeline (train.run_distill drives it):
  1. `generate_data`: prompts from prompts.load_prompts sets, responses sampled from the
     LLM itself with generate.generate_ar (batched, jitted), stored compactly as
     DATA/sequences.npz (flat token ids + offsets, a mask of positions to train on)
     with DATA/manifest.json saying how it was made. Deterministic for a seed.
  2. `teacher_pass`: one forward of the frozen LLM over each sequence, storing the
     teacher's top-k log-probs and ids per position (DATA/teacher.npz) and the layer-N
     hidden states for each N asked (DATA/hidden_N{n}.npz): the first N layers are
     frozen, so the exit trains on these directly.
  3. `choose_draft_vocab`: the most frequent teacher top-1 tokens (EOS included).
  4. `make_batch` / `distill_loss`: KL(teacher top-k || draft) (renormalized over top-k ∩
     draft vocabulary) and / or CE on the sampled tokens, on whole sequences: the exit
     block runs over every position (it attends over previous ones, as when drafting),
     the head and the loss only on the selected (response) positions. `Data.split`
     holds out whole prompts for validation.
  (train.eval_exit then measures top-1 agreement, α and τ in real greedy EESD decoding.)

Position t of a sequence predicts token t+1; the positions trained on are those whose
next token is a response token (t in [prompt_len - 1, length - 1)).
All arrays are plain numpy in .npz files (loaded with allow_pickle=False).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eesd_jax import corpus, generate, model, prompts
from eesd_jax.kv_cache import init_cache, round_up
from eesd_jax.model import ModelConfig, Params
from eesd_jax.sampling import SamplingConfig

DATA_FORMAT = "eesd_jax.distill_data/1"


def _tqdm(progress: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, dynamic_ncols=True, **kw)


# ----------------------------------------------------------------------------- the teacher LM


class ByteTokenizer:
    """A toy tokenizer for tiny random models: one id per UTF-8 byte (id 0 is left for EOS)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [1 + b % (self.vocab_size - 1) for b in text.encode("utf-8")]


@dataclasses.dataclass
class LM:
    """The frozen teacher: model, params (jax arrays), identity, tokenizer, EOS ids."""

    cfg: ModelConfig
    params: Params
    fingerprint: str
    name: str
    tokenizer: object  # transformers tokenizer or ByteTokenizer.
    eos_ids: tuple[int, ...]

    def encode(self, prompt: prompts.Prompt) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(prompt.text)
        return prompts.encode(self.tokenizer, prompt.text, prompt.chat)


def tiny_lm(spec) -> LM:
    """A random LLaMA from a config.model.tiny section; fingerprint = hash of the spec."""
    spec = dict(spec)
    init_seed, scale, eos = spec.pop("init_seed"), spec.pop("init_scale"), spec.pop("eos_id")
    cfg = ModelConfig(name="tiny-random", **spec)
    # model.init_params' layout, drawn with numpy (compiling jax's RNG costs seconds on CPU).
    rng = np.random.default_rng(init_seed)
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
        else jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)  # fmt: skip
    ident = json.dumps(
        {"cfg": dataclasses.asdict(cfg), "seed": init_seed, "scale": scale, "init": "numpy/1"}, sort_keys=True
    )
    return LM(cfg, params, hashlib.sha256(ident.encode()).hexdigest(), cfg.name, ByteTokenizer(cfg.vocab_size), (eos,))


def load_lm(model_cfg) -> LM:
    """The teacher named by a config's `model` section ("tiny", "bundled", a folder or .gguf)."""
    if model_cfg.source == "tiny":
        return tiny_lm(model_cfg.tiny)
    from eesd_jax import loading

    lm = loading.load_model(None if model_cfg.source in ("bundled", "", None) else model_cfg.source)
    return as_lm(lm)


def as_lm(obj) -> LM:
    """An LM from an LM, a loading.LoadedModel, or a cli.Session-like object (lm, params, tokenizer)."""
    if isinstance(obj, LM):
        return obj
    if hasattr(obj, "lm") and hasattr(obj, "tokenizer"):  # cli.Session
        tok = obj.tokenizer
        params, loaded = obj.params, obj.lm
    else:  # loading.LoadedModel
        loaded, tok = obj, obj.tokenizer()
        params = jax.tree.map(jnp.asarray, obj.params)
    eos = () if tok.eos_token_id is None else (int(tok.eos_token_id),)
    return LM(loaded.cfg, params, loaded.fingerprint, loaded.cfg.name, tok, eos)


def prompt_list(sets: Sequence[str], n_per_set: int = 0) -> list[prompts.Prompt]:
    """Prompts of "source:split" sets (split defaults to "all"), the first n of each (0 = all)."""
    out = []
    for spec in sets:
        source, _, split = spec.rpartition(":") if spec.rsplit(":", 1)[-1] in prompts.SPLITS else (spec, "", "all")
        out += prompts.load_prompts(source, split, n_per_set or None)
    if not out:
        raise ValueError(f"no prompts in {list(sets)}")
    return out


def validation_prompts(config, n: int = 0) -> list[prompts.Prompt]:
    """The prompts an exit distilled with `config` held out for validation (config.train.val_every_prompt,
    Data.split's rule): never trained on, disjoint from the held-out sets. n of them spread over
    the list (0: all); the training prompts if the config holds none out (tiny)."""
    pool = prompt_list(config.data.sets, int(config.data.n_per_set))
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
    plist = prompt_list(data_cfg.sets, data_cfg.n_per_set)
    encoded = [lm.encode(p)[-data_cfg.max_prompt_tokens :] for p in plist]
    jobs = [(i, s) for s in range(data_cfg.samples_per_prompt) for i in range(len(plist))]
    order = sorted(range(len(jobs)), key=lambda j: (len(encoded[jobs[j][0]]), j))  # Less padding per batch.
    batches = [order[i : i + data_cfg.batch_size] for i in range(0, len(order), data_cfg.batch_size)]
    sampling = SamplingConfig(temperature=data_cfg.temperature, top_p=data_cfg.top_p)
    responses: list[list[int]] = [[] for _ in jobs]
    t0 = time.perf_counter()
    bar = _tqdm(progress, total=len(jobs), desc="generate", unit="seq")
    for b, batch in enumerate(batches):
        gen = generate.generate_ar(
            lm.cfg, lm.params, [encoded[jobs[j][0]] for j in batch], data_cfg.max_new_tokens,
            sampling=sampling, eos_ids=lm.eos_ids, seed=int(data_cfg.seed) * 1_000_003 + b,
        )  # fmt: skip
        for j, toks in zip(batch, gen.tokens):
            responses[j] = toks
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0

    seqs = [encoded[i] + responses[j] for j, (i, _) in enumerate(jobs)]
    counts = _write_sequences(
        data_dir, seqs, [len(encoded[i]) for i, _ in jobs], [i for i, _ in jobs], [s for _, s in jobs],
        [plist[i].id for i, _ in jobs],
    )  # fmt: skip
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
    np.savez(
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
    for doc in _tqdm(progress, iterable=docs, desc="tokenize", unit="doc"):
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
    tmp = data_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(data_dir / "manifest.json")


def read_manifest(data_dir) -> dict | None:
    path = pathlib.Path(data_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- 2. teacher pass


@functools.partial(jax.jit, static_argnames=("cfg", "starts", "top_k"))
def _teacher_batch(cfg, params, segments, tokens_bt, starts, top_k):
    """Hidden states after each segment's last layer; teacher top-k log-probs if top_k > 0."""
    B, T = tokens_bt.shape
    cache = init_cache(cfg.n_layers, B, T, cfg.n_kv_heads, cfg.head_dim, cfg.jnp_dtype)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = model.embed(params, tokens_bt)
    hiddens = []
    for start, seg in zip(starts, segments):
        x, cache = model.run_layers(cfg, seg, x, positions, cache, start)
        hiddens.append(x)
    if not top_k:
        return hiddens, None, None
    logp = jax.nn.log_softmax(model.lm_head(params, model.final_norm(params, cfg, x)), axis=-1)
    values, ids = jax.lax.top_k(logp, top_k)
    return hiddens[:-1], values, ids.astype(jnp.int32)


def run_teacher(
    lm: LM,
    tokens: np.ndarray,
    offsets: np.ndarray,
    layers: Sequence[int],
    top_k: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "teacher",
):
    """One pass of the frozen LLM over every sequence.

    Returns ({n: [total, D] hidden after layer n}, [total, k] top-k log-probs, [total, k] ids),
    flat like `tokens`. With top_k = 0 only the first max(layers) layers run.
    """
    cfg = lm.cfg
    layers = sorted(set(int(n) for n in layers))
    if any(not 1 <= n < cfg.n_layers for n in layers):
        raise ValueError(f"feature layers {layers} must be in [1, {cfg.n_layers})")
    bounds = layers + ([cfg.n_layers] if top_k else [])
    starts = tuple([0] + bounds[:-1])
    segments = [jax.tree.map(lambda w, a=a, b=b: w[a:b], lm.params["layers"]) for a, b in zip(starts, bounds)]
    lengths = np.diff(offsets)
    total = int(offsets[-1])
    hidden = {n: np.zeros((total, cfg.d_model), np.float32) for n in layers}
    top_logp = np.zeros((total, top_k), np.float32)
    top_ids = np.zeros((total, top_k), np.int32)
    order = np.argsort(lengths, kind="stable")
    bar = _tqdm(progress, total=len(order), desc=desc, unit="seq")
    i = 0
    while i < len(order):
        T = round_up(int(lengths[order[min(i + batch_size, len(order)) - 1]]), 64)
        rows = max(1, min(batch_size, 2048 // T))  # Bounds the memory of the [B, T, V] logits.
        idx = order[i : i + rows]
        tok = np.zeros((rows, T), np.int32)
        for r, k in enumerate(idx):
            tok[r, : lengths[k]] = tokens[offsets[k] : offsets[k + 1]]
        hs, logp, ids = jax.device_get(_teacher_batch(cfg, lm.params, segments, jnp.asarray(tok), starts, top_k))
        for r, k in enumerate(idx):
            a, b, n = offsets[k], offsets[k + 1], lengths[k]
            for layer, h in zip(layers, hs):
                hidden[layer][a:b] = h[r, :n]
            if top_k:
                top_logp[a:b], top_ids[a:b] = logp[r, :n], ids[r, :n]
        i += len(idx)
        bar.update(len(idx))
    bar.close()
    return hidden, top_logp, top_ids


def teacher_pass(
    lm: LM, data_dir, layers: Sequence[int], top_k: int, batch_size: int = 8, progress: bool = True
) -> dict:
    """Store teacher.npz (unless top_k == 0) and hidden_N{n}.npz for each n; update the manifest."""
    data_dir = pathlib.Path(data_dir)
    seq = load_npz(data_dir / "sequences.npz")
    t0 = time.perf_counter()
    hidden, logp, ids = run_teacher(lm, seq["tokens"], seq["offsets"], layers, top_k, batch_size, progress)
    manifest = read_manifest(data_dir)
    if top_k:
        top1 = ids[seq["mask"], 0]
        np.savez(
            data_dir / "teacher.npz",
            topk_logp=logp,
            topk_ids=ids,
            # Draft-vocabulary ranking: teacher top-1 counts on train positions, then top-k mass.
            top1_counts=np.bincount(top1, minlength=lm.cfg.vocab_size).astype(np.int64),
            topk_mass=np.bincount(ids[seq["mask"]].ravel(), np.exp(logp[seq["mask"]]).ravel(),
                                  minlength=lm.cfg.vocab_size),
        )  # fmt: skip
        manifest["teacher"] = {"top_k": top_k}
    for n, h in hidden.items():
        np.savez(data_dir / f"hidden_N{n}.npz", hidden=h)
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
    want = sorted({int(e.layer), *map(int, d.feature_layers)} | {int(e.context_layer)} - {0})
    top_k = int(d.top_k)
    teacher_ok = manifest.get("teacher", {}).get("top_k", 0) >= top_k and (data_dir / "teacher.npz").is_file()
    missing = [n for n in want if not (data_dir / f"hidden_N{n}.npz").is_file()]
    if not teacher_ok:
        manifest = teacher_pass(lm, data_dir, want, top_k, config.data.batch_size, progress)
    elif missing:
        manifest = teacher_pass(lm, data_dir, missing, 0, config.data.batch_size, progress)
    return manifest


@dataclasses.dataclass
class Data:
    """Everything training needs for one exit layer, flat over sequences (see module doc)."""

    tokens: np.ndarray  # [total] int32.
    offsets: np.ndarray  # [n_seq + 1] int64.
    prompt_lens: np.ndarray  # [n_seq] int32.
    mask: np.ndarray  # [total] bool: position predicts a response token.
    hidden: np.ndarray  # [total, D] float32 layer-N hidden state.
    topk_logp: np.ndarray  # [total, k] float32 teacher log-probs (full-vocabulary softmax).
    topk_ids: np.ndarray  # [total, k] int32.
    top1_counts: np.ndarray  # [V] int64.
    topk_mass: np.ndarray  # [V] float64.
    prompt_index: np.ndarray | None = None  # [n_seq] which prompt each sequence answers.
    context: np.ndarray | None = None  # [total, D] float32 context-layer hidden state (ExitConfig.context_layer).

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
            tokens=self.tokens[pos], offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            prompt_lens=self.prompt_lens[seq_idx], mask=mask, hidden=self.hidden[pos], topk_logp=logp, topk_ids=ids,
            top1_counts=np.bincount(ids[mask, 0], minlength=V).astype(np.int64),
            topk_mass=np.bincount(ids[mask].ravel(), np.exp(logp[mask]).ravel(), minlength=V),
            prompt_index=None if self.prompt_index is None else self.prompt_index[seq_idx],
            context=None if self.context is None else self.context[pos],
        )  # fmt: skip

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
        cat = lambda field: (
            None if getattr(parts[0], field) is None else np.concatenate([getattr(p, field) for p in parts])
        )  # noqa: E731
        lengths = np.concatenate([np.diff(p.offsets) for p in parts])
        return Data(
            tokens=cat("tokens"), offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            prompt_lens=cat("prompt_lens"), mask=cat("mask"), hidden=cat("hidden"), topk_logp=cat("topk_logp"),
            topk_ids=cat("topk_ids"), top1_counts=sum(p.top1_counts for p in parts),
            topk_mass=sum(p.topk_mass for p in parts),
            context=cat("context"),
        )  # fmt: skip

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


def load_data(data_dir, layer: int, top_k: int | None = None, context_layer: int = 0) -> Data:
    data_dir = pathlib.Path(data_dir)
    seq, teacher = load_npz(data_dir / "sequences.npz"), load_npz(data_dir / "teacher.npz")
    k = top_k or teacher["topk_ids"].shape[1]
    return Data(
        tokens=seq["tokens"], offsets=seq["offsets"], prompt_lens=seq["prompt_lens"], mask=seq["mask"],
        hidden=load_npz(data_dir / f"hidden_N{layer}.npz")["hidden"],
        topk_logp=teacher["topk_logp"][:, :k], topk_ids=teacher["topk_ids"][:, :k],
        top1_counts=teacher["top1_counts"], topk_mass=teacher["topk_mass"], prompt_index=seq["prompt_index"],
        context=load_npz(data_dir / f"hidden_N{context_layer}.npz")["hidden"] if context_layer else None,
    )  # fmt: skip


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


# ----------------------------------------------------------------------------- 4. batches and losses


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """B sequences padded to T positions, of which R (`select`) carry a loss (R = T, or fewer:
    the head and the loss then run on the response positions only, not on the prompt)."""

    hidden: np.ndarray  # [B, T, D] layer-N hidden states.
    select: np.ndarray  # [B, R] int32: positions (in T) the loss and metrics are taken at.
    topk_logp: np.ndarray  # [B, R, k] teacher top-k log-probs there.
    topk_ids: np.ndarray  # [B, R, k]
    next_tokens: np.ndarray  # [B, R] the sampled token that follows (0 past the end).
    weights: np.ndarray  # [B, R] loss weight: 1 response positions, prompt_weight prompt ones, 0 padding.
    response: np.ndarray  # [B, R] bool: position predicts a response token (metrics).
    start: np.ndarray  # [B, T] int32 the first position of the draft round each position belongs to.
    context: np.ndarray | None = None  # [B, T, D] context-layer states (ExitConfig.context_layer), else None.


Rounds = np.random.Generator | int | None  # How make_batch / round_starts tile a sequence into draft rounds.


def round_starts(n: int, first: int, rounds: Rounds, max_round: int = 4) -> np.ndarray:
    """[n] the first position of the simulated draft round each position belongs to.

    Positions before `first` (the prompt) are verified context: each starts its own. From
    `first` on, rounds tile the rest: None makes every position a round start (what the
    first draft token of a round sees); an int k, rounds of exactly k (position j of a
    round is draft token j + 1); a Generator, rounds of uniform random length 1..max_round
    (training: every draft position, in proportion).
    """
    starts = np.arange(n)
    if rounds is None:
        return starts
    t = max(first, 0)
    while t < n:
        length = rounds if isinstance(rounds, int) else int(rounds.integers(1, max_round + 1))
        starts[t : t + length] = t
        t += length
    return starts


def make_batch(
    data: Data,
    seq_idx: Sequence[int],
    seq_len: int,
    bucket: int,
    prompt_weight: float = 0.0,
    n_select: int = 0,
    rounds: Rounds = None,
    max_round: int = 4,
) -> Batch:
    """Sequences (their last seq_len positions) padded to a multiple of `bucket`.

    With n_select > 0 and prompt_weight == 0, only the (at most n_select) response
    positions of each row are selected: R = min(T, n_select). With a context layer in
    `data`, `rounds` and `max_round` choose the draft rounds (round_starts).
    """
    spans = []
    for k in seq_idx:
        a, b = int(data.offsets[k]), int(data.offsets[k + 1])
        spans.append((max(a, b - seq_len), b))
    T = min(round_up(max(b - a for a, b in spans), bucket), round_up(seq_len, bucket))
    R = min(T, n_select) if n_select and not prompt_weight else T
    B, D, K = len(spans), data.hidden.shape[1], data.topk_ids.shape[1]
    out = Batch(
        hidden=np.zeros((B, T, D), np.float32),
        select=np.zeros((B, R), np.int32),
        topk_logp=np.zeros((B, R, K), np.float32),
        topk_ids=np.zeros((B, R, K), np.int32),
        next_tokens=np.zeros((B, R), np.int32),
        weights=np.zeros((B, R), np.float32),
        response=np.zeros((B, R), bool),
        start=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        context=None if data.context is None else np.zeros((B, T, D), np.float32),
    )
    for r, (a, b) in enumerate(spans):
        n = b - a
        out.hidden[r, :n] = data.hidden[a:b]
        k = int(seq_idx[r])
        first_new = int(data.offsets[k]) + int(data.prompt_lens[k]) - a  # The first generated token's index.
        out.start[r, :n] = round_starts(n, first_new, rounds, max_round)
        if data.context is not None:
            out.context[r, :n] = data.context[a:b]
        mask = data.mask[a:b]
        pos = np.arange(n) if R == T else np.flatnonzero(mask)
        if len(pos) > R:
            raise ValueError(f"a sequence has {len(pos)} train positions, more than n_select={R}")
        m = len(pos)
        out.select[r, :m] = pos
        out.topk_logp[r, :m] = data.topk_logp[a + pos]
        out.topk_ids[r, :m] = data.topk_ids[a + pos]
        has_next = pos + 1 < n
        out.next_tokens[r, :m] = np.where(has_next, data.tokens[np.minimum(a + pos + 1, b - 1)], 0)
        out.response[r, :m] = mask[pos]
        out.weights[r, :m] = np.where(mask[pos], 1.0, np.where(has_next, prompt_weight, 0.0))
    return out


def max_train_positions(data: Data) -> int:
    """The most train (response) positions any sequence has: n_select for make_batch."""
    counts = np.add.reduceat(data.mask.astype(np.int64), data.offsets[:-1]) if data.n_seq else np.zeros(1)
    return int(counts.max())


def exit_train_logits(
    cfg: ModelConfig,
    head_vd: jax.Array,
    exit_params: Params,
    hidden_btd: jax.Array,
    select_br: jax.Array | None = None,
    context_btd: jax.Array | None = None,
    start_bt: jax.Array | None = None,
) -> jax.Array:
    """Draft logits [B, R, V'] (V' = draft vocabulary or full vocabulary).

    The same computation as exits.exit_logits with a fresh one-layer cache and positions
    arange(T), without scattering a draft vocabulary into the full one; the block runs on
    all T positions, the head only on the R selected ones (default: all). `head_vd` is
    the exit's own head, or the LLM's frozen one. With a context layer, context_btd and
    start_bt (Batch.context, Batch.start) give each position the mixture it sees when
    drafting (model.block_with_context).
    """
    B, T, _ = hidden_btd.shape
    if context_btd is None:
        cache = init_cache(1, B, T, cfg.n_kv_heads, cfg.head_dim, hidden_btd.dtype)
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        x, _ = model.run_layers(cfg, exit_params["block"], hidden_btd, positions, cache)
    else:
        block = jax.tree.map(lambda w: w[0], exit_params["block"])
        x = model.block_with_context(cfg, block, hidden_btd, context_btd, start_bt)
    if select_br is not None:
        x = jnp.take_along_axis(x, select_br[..., None], axis=1)
    x = model.rms_norm(x, exit_params["norm"], cfg.rms_eps)
    return jnp.einsum("btd,vd->btv", x, head_vd, preferred_element_type=jnp.float32)


def distill_loss(logits_btv, vmap_v, batch, kl_weight: float, ce_weight: float):
    """Weighted KL(teacher top-k ∩ draft vocab || draft) + CE on the sampled tokens; (loss, metrics).

    vmap_v: [V] index of each token in the draft logits' last axis, -1 outside. Metrics
    are over response positions: kl, ce, top1 (draft argmax == teacher argmax).
    """
    logq = jax.nn.log_softmax(logits_btv, axis=-1)
    dix = vmap_v[batch.topk_ids]  # [B, T, k]
    valid = dix >= 0
    has = valid.any(-1)
    # Teacher renormalized over its top-k ∩ draft vocabulary (all-invalid rows: dummy zeros, weight 0).
    log_p = jax.nn.log_softmax(jnp.where(valid, batch.topk_logp, jnp.where(has[..., None], -jnp.inf, 0.0)), -1)
    log_p = jnp.where(valid, log_p, 0.0)
    logq_k = jnp.take_along_axis(logq, jnp.maximum(dix, 0), axis=-1)
    kl = jnp.sum(jnp.where(valid, jnp.exp(log_p) * (log_p - logq_k), 0.0), -1)  # [B, T]

    nd = vmap_v[batch.next_tokens]
    ce = -jnp.take_along_axis(logq, jnp.maximum(nd, 0)[..., None], axis=-1)[..., 0]

    w_kl = batch.weights * has
    w_ce = batch.weights * (nd >= 0)
    loss = 0.0
    if kl_weight:
        loss += kl_weight * jnp.sum(w_kl * kl) / jnp.maximum(jnp.sum(w_kl), 1e-9)
    if ce_weight:
        loss += ce_weight * jnp.sum(w_ce * ce) / jnp.maximum(jnp.sum(w_ce), 1e-9)

    resp = batch.response.astype(jnp.float32)
    n_resp = jnp.maximum(jnp.sum(resp), 1.0)
    agree = agreement(logq, dix)
    metrics = {
        "kl": jnp.sum(resp * has * kl) / jnp.maximum(jnp.sum(resp * has), 1.0),
        "ce": jnp.sum(resp * (nd >= 0) * ce) / jnp.maximum(jnp.sum(resp * (nd >= 0)), 1.0),
        "top1": jnp.sum(resp * agree) / n_resp,
        "n": jnp.sum(resp),
    }
    return loss, metrics


def agreement(logits_btv: jax.Array, dix_btk: jax.Array) -> jax.Array:
    """[B, T] bool: the draft's argmax is the teacher's top-1 (draft-index space; -1 outside: a miss)."""
    return jnp.argmax(logits_btv, -1) == dix_btk[..., 0]


def frozen_head(lm_params: Params, exit_params: Params) -> jax.Array:
    """The head the exit drafts with: its own, or the LLM's (tied: the embedding)."""
    if "head" in exit_params:
        return exit_params["head"]
    return lm_params["lm_head"] if "lm_head" in lm_params else lm_params["embed"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _eval_batch(cfg, lm_params, exit_params, vmap_v, batch):
    head = frozen_head(lm_params, exit_params)
    logits = exit_train_logits(cfg, head, exit_params, batch.hidden, batch.select, batch.context, batch.start)
    _, m = distill_loss(logits, vmap_v, batch, 1.0, 1.0)
    return m, agreement(logits, vmap_v[batch.topk_ids])


def data_metrics(
    cfg: ModelConfig,
    lm_params: Params,
    exit_params: Params,
    data: Data,
    seq_len: int = 512,
    batch_size: int = 8,
    bucket: int = 64,
    n_select: int = 0,
    round_len: int = 0,
) -> dict:
    """KL / CE / top-1 agreement of an exit over every sequence of `data` (response positions).

    Each position is the first draft of a round (for a context exit: every earlier position
    verified), so top1 is the first draft's acceptance given a correct prefix. With
    round_len = K > 0 the responses are tiled into rounds of K instead, and
    top1_by_draft_position[j] is the top-1 agreement of draft token j + 1 given correct
    earlier drafts (an exit without a context layer computes the same thing at every j:
    its figures differ only by which positions fall at j).
    """
    vmap = jnp.asarray(vocab_map(cfg.vocab_size, np.asarray(exit_params["vocab"]) if "vocab" in exit_params else None))
    order = np.argsort(np.diff(data.offsets), kind="stable")
    sums, n = {"kl": 0.0, "ce": 0.0, "top1": 0.0}, 0.0
    by_pos = np.zeros((2, max(round_len, 1)))  # (agreements, positions) per draft position.
    n_select = max(n_select, round_up(max_train_positions(data), 16))
    for i in range(0, len(order), batch_size):
        b = make_batch(data, order[i : i + batch_size], seq_len, bucket, n_select=n_select, rounds=round_len or None)
        m, agree = jax.device_get(_eval_batch(cfg, lm_params, exit_params, vmap, to_device(b)))
        for key in sums:
            sums[key] += float(m[key]) * float(m["n"])
        n += float(m["n"])
        j = (b.select - np.take_along_axis(b.start, b.select, 1))[b.response]
        np.add.at(by_pos, (0, j), agree[b.response])
        np.add.at(by_pos, (1, j), 1)
    out = {key: round(v / max(n, 1.0), 6) for key, v in sums.items()} | {"positions": int(n)}
    if round_len:
        out["top1_by_draft_position"] = [round(float(a / max(c, 1)), 4) for a, c in by_pos.T]
    return out


def to_device(batch: Batch) -> Batch:
    return jax.tree.map(jnp.asarray, batch)
