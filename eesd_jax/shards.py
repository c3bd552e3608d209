"""The distillation data on disk, in shards written as they are made, and streamed back with grain.

DATA/shards/NNNNN/ is one shard: a folder of .npy files, one per column. Per-sequence columns
(`lengths`, `prompt_lens`, `prompt_index`, `sample_index`, `prompt_ids`) have a row per sequence;
per-position ones (`tokens`, the teacher pass' `hidden_N{n}`, `topk_logp`, `topk_ids`) a row per
position, the shard's sequences one after another. A shard's folder appears by a rename once its
sequence columns are written, and each column the teacher pass adds later appears by a rename
too, so whatever is there is complete: a stopped run resumes at the first missing shard or
column (distill_data). Columns are read back as memmaps: `Data` (distill_data.load_data) reads
a sequence's slices when asked for it, never the whole set.

`batch_stream` is the training order: grain's per-epoch shuffles of the sequences (seeded), cut
into global batches, each process taking its own rows. It is random access (step -> batch), so
training resumed at step s continues the stream at s.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

SHARDS = "shards"


def shard_dir(data_dir, k: int) -> pathlib.Path:
    return pathlib.Path(data_dir) / SHARDS / f"{k:05d}"


def complete(data_dir) -> list[int]:
    """The shards whose sequences are written, in order."""
    root = pathlib.Path(data_dir) / SHARDS
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def write_shard(data_dir, k: int, columns: dict[str, np.ndarray]) -> None:
    """Shard k with these columns, appearing at once (written to a temporary folder, then renamed).

    Every process of a multi-process run makes the same data and may write it: each writes its own
    temporary folder, and one that finds the shard there already drops its copy."""
    final = shard_dir(data_dir, k)
    tmp = temporary(final)
    shutil.rmtree(tmp, ignore_errors=True)  # Left by a run stopped mid-write.
    tmp.mkdir(parents=True)
    for name, array in columns.items():
        np.save(tmp / f"{name}.npy", array, allow_pickle=False)
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp)  # Another process wrote it first.


def add_columns(data_dir, k: int, columns: dict[str, np.ndarray]) -> None:
    """Add (or replace) columns of shard k, each appearing at once."""
    for name, array in columns.items():
        path = shard_dir(data_dir, k) / f"{name}.npy"
        with (tmp := temporary(path)).open("wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)


def temporary(path: pathlib.Path) -> pathlib.Path:
    """Where this process writes `path` before renaming it (hidden; one per process)."""
    return path.with_name(f".{path.name}.p{jax.process_index()}.tmp")


def has_column(data_dir, k: int, name: str) -> bool:
    return (shard_dir(data_dir, k) / f"{name}.npy").is_file()


def read(data_dir, k: int, name: str) -> np.ndarray:
    """Column `name` of shard k as a read-only memmap (nothing is read until sliced)."""
    path = shard_dir(data_dir, k) / f"{name}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the data's teacher pass did not store {name}")
    return np.load(path, mmap_mode="r", allow_pickle=False)


@dataclasses.dataclass(frozen=True)
class Seq:
    """One sequence's arrays, slices of its shard's memmaps (read from disk when used)."""

    tokens: np.ndarray  # [n] int32.
    mask: np.ndarray  # [n] bool: position predicts a response token.
    hidden: np.ndarray  # [n, D] layer-N hidden states (float16 on disk).
    topk_logp: np.ndarray  # [n, C] teacher top-k log-probs (full-vocabulary softmax).
    topk_ids: np.ndarray  # [n, C] int32.
    context: np.ndarray | None  # [n, D] context-layer states (ExitConfig.context_layer).
    fuse: np.ndarray | None  # [n, F, D] states after the fuse layers (ExitConfig.fuse_layers).


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
    """The sequences training reads for one exit layer, each fetched from its shard when asked for
    (`sequence`): the per-position arrays stay on disk. Selections (subset, split, take_tokens,
    concat) only re-index the small per-sequence arrays."""

    parts: tuple[dict, ...]  # Per shard: tokens, hidden, topk_logp, topk_ids[, context][, fuse (a tuple)].
    part: np.ndarray  # [n_seq] the part holding each sequence.
    start: np.ndarray  # [n_seq] its first position there.
    lengths: np.ndarray  # [n_seq]
    prompt_lens: np.ndarray  # [n_seq]
    prompt_index: np.ndarray | None  # [n_seq] which prompt each sequence answers.
    top_k: int  # Teacher log-probs used per position (the first top_k stored).

    @property
    def n_seq(self) -> int:
        return len(self.lengths)

    @property
    def n_train(self) -> np.ndarray:
        """[n_seq] positions trained on (predicting a response token)."""
        return self.lengths - self.prompt_lens

    def sequence(self, i: int) -> Seq:
        p, a = self.parts[self.part[i]], int(self.start[i])
        n, k = int(self.lengths[i]), self.top_k
        t = np.arange(n)
        return Seq(
            tokens=p["tokens"][a : a + n],
            mask=(t >= self.prompt_lens[i] - 1) & (t < n - 1),
            hidden=p["hidden"][a : a + n],
            topk_logp=p["topk_logp"][a : a + n, :k],
            topk_ids=p["topk_ids"][a : a + n, :k],
            context=p["context"][a : a + n] if "context" in p else None,
            fuse=np.stack([f[a : a + n] for f in p["fuse"]], 1) if "fuse" in p else None,
        )

    def subset(self, seq_idx: Sequence[int]) -> Data:
        """The sequences seq_idx, in that order."""
        idx = np.asarray(seq_idx, np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return dataclasses.replace(
            self,
            **{f: pick(getattr(self, f)) for f in ("part", "start", "lengths", "prompt_lens", "prompt_index")},
        )

    def take_tokens(self, budget: int, seed: int) -> Data:
        """Sequences in a seeded random order, as many as fit `budget` trained positions (0 = all)."""
        if not budget:
            return self
        order = np.random.default_rng(seed).permutation(self.n_seq)
        keep = order[np.cumsum(self.n_train[order]) <= budget]
        if not len(keep):
            raise ValueError(f"a budget of {budget} trained positions holds no whole sequence")
        return self.subset(np.sort(keep))

    @staticmethod
    def concat(datas: Sequence[Data]) -> Data:
        """The sequences of every one, in order; no prompt index (their indices would collide)."""
        if len({("context" in d.parts[0], "fuse" in d.parts[0]) for d in datas}) > 1:
            raise ValueError("cannot mix data with and without context-layer or fuse-layer states")
        first = np.cumsum([0] + [len(d.parts) for d in datas[:-1]])
        return Data(
            parts=sum((d.parts for d in datas), ()),
            part=np.concatenate([d.part + f for d, f in zip(datas, first)]),
            start=np.concatenate([d.start for d in datas]),
            lengths=np.concatenate([d.lengths for d in datas]),
            prompt_lens=np.concatenate([d.prompt_lens for d in datas]),
            prompt_index=None,
            top_k=min(d.top_k for d in datas),
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

    @staticmethod
    def from_arrays(tokens, offsets, prompt_lens, hidden, topk_logp, topk_ids, context=None, fuse=None) -> Data:
        """Data over arrays in memory, flat over sequences like a shard ([total, ...]; fuse [total, F, D])."""
        lengths = np.diff(offsets)
        part = {"tokens": tokens, "hidden": hidden, "topk_logp": topk_logp, "topk_ids": topk_ids}
        part |= {} if context is None else {"context": context}
        part |= {} if fuse is None else {"fuse": tuple(np.moveaxis(fuse, 1, 0))}
        n = len(lengths)
        return Data(
            (part,), np.zeros(n, np.int64), offsets[:-1], lengths, np.asarray(prompt_lens), None, topk_ids.shape[1]
        )


def batch_stream(
    n_seq: int,
    batch_size: int,
    seed: int,
    make: Callable[[int, np.ndarray], object],
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """[step] -> make(step, ids): ids [batch_size / P] int, this process's rows of training step `step`.

    The global stream is grain's shuffle of range(n_seq) with `seed`, reshuffled every epoch,
    cut into batches of batch_size sequences; process p of P (default: jax's) takes rows
    [p * B/P, (p + 1) * B/P) of each, so the processes' rows partition every global batch.
    """
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if batch_size % count:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of the {count} processes")
    rows = slice(p * (batch_size // count), (p + 1) * (batch_size // count))
    ds = grain.MapDataset.range(n_seq).shuffle(seed=seed).repeat(None).batch(batch_size)
    return ds.map_with_index(lambda step, ids: make(step, ids[rows]))


def prefetched(stream: grain.MapDataset, start: int, end: int):
    """Iterate stream[start:end] in order, the next batches made on background threads while training."""
    return iter(stream[start:end].to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
