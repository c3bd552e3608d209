"""The distillation data on disk, in shards written as they are made, and streamed back with grain.

DATA/shards/NNNNN/ is one shard: a folder of .npy files, one per column. Per-sequence columns
(`lengths`, `prompt_lens`, `prompt_index`, `sample_index`, `prompt_ids`) have a row per sequence;
per-position ones (`tokens`, the teacher pass' `hidden_N{n}`, `topk_logp`, `topk_ids`) a row per
position, the shard's sequences one after another. A shard's folder appears by a rename once its
sequence columns are written, and each column the teacher pass adds later appears by a rename
too, so whatever is there is complete: a stopped run resumes at the first missing shard or
column (distill_data). Columns are read back as memmaps, so a reader holds what it slices out,
never the whole set.

`batch_stream` is the training order: grain's per-epoch shuffles of the sequences (seeded), cut
into global batches, each process taking its own rows. It is random access (step -> batch), so
training resumed at step s continues the stream at s.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Callable

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
    """Shard k with these columns, appearing at once (written to a temporary folder, then renamed)."""
    final = shard_dir(data_dir, k)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # Left by a run stopped mid-write.
    tmp.mkdir(parents=True)
    for name, array in columns.items():
        np.save(tmp / f"{name}.npy", array, allow_pickle=False)
    tmp.rename(final)


def add_columns(data_dir, k: int, columns: dict[str, np.ndarray]) -> None:
    """Add (or replace) columns of shard k, each appearing at once."""
    for name, array in columns.items():
        path = shard_dir(data_dir, k) / f"{name}.npy"
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)


def has_column(data_dir, k: int, name: str) -> bool:
    return (shard_dir(data_dir, k) / f"{name}.npy").is_file()


def read(data_dir, k: int, name: str) -> np.ndarray:
    """Column `name` of shard k as a read-only memmap (nothing is read until sliced)."""
    path = shard_dir(data_dir, k) / f"{name}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the data's teacher pass did not store {name}")
    return np.load(path, mmap_mode="r", allow_pickle=False)


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
