"""Hugging Face safetensors weights loaded straight onto a device mesh, in the target dtype.

Every param is made by `jax.make_array_from_callback`: for each of this process's devices the
callback reads from the files only the slice that device holds (safetensors' `get_slice` reads
just those bytes), casts it to the target dtype and hands it over. No process stages the whole
model, no float32 copy of it exists anywhere, and on a multi-host slice each host reads only
its own shards. Host memory peaks at one param's local shards (its replicas over 'data' are
read once), e.g. a stacked [L, F, D] MLP weight over the layers: see
experiments/load_memory.py. Shardings are sharding.param_shardings' (Megatron over 'model').
"""

from __future__ import annotations

import contextlib
import math
import os

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy slices of bf16 files)
import numpy as np

from eesd_jax import loading, sharding
from eesd_jax.model import Params


def load_model(path: str | os.PathLike | None, dtype: str, mesh: jax.sharding.Mesh | None) -> loading.LoadedModel:
    """loading.load_model, its params placed on `mesh`: an HF folder slice by slice (load_hf_to_mesh);
    a GGUF file (dequantized whole by its reader anyway) loaded, then sharded."""
    if mesh is not None and path is not None and os.path.isdir(path):
        return load_hf_to_mesh(path, mesh, dtype)
    lm = loading.load_model(path, dtype)
    return (
        lm
        if mesh is None
        else loading.LoadedModel(lm.cfg, sharding.shard_params(lm.params, mesh), lm.fingerprint, lm.source)
    )


def load_hf_to_mesh(path: str | os.PathLike, mesh: jax.sharding.Mesh, dtype: str = "float32") -> loading.LoadedModel:
    """An HF folder's params as global arrays on `mesh`, in `dtype`, equal to load_model's params put there."""
    hf = loading.index_hf_folder(path, dtype)  # Config, names and shapes checked before any data is read.
    layout = loading.hf_layout(hf.cfg)
    target = np.dtype(dtype)
    abstract = _tree({p: jax.ShapeDtypeStruct(shape, target) for p, (shape, _) in layout.items()})
    shardings = sharding.param_shardings(abstract, mesh)
    flat = {}
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(loading.open_safetensors(f)) for f in {f for f, _ in hf.tensors.values()}}

        def read(name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
            file, hf_shape = hf.tensors[name]
            value = _read_slice(files[file].get_slice(name), hf_shape, shape, index)
            return loading.check_finite(str(hf.folder), name, value.astype(np.float32)).astype(target)

        for p, (shape, names) in layout.items():
            flat[p] = _make_array(shape, _get(shardings, p), names, read)
    return loading.LoadedModel(cfg=hf.cfg, params=_tree(flat), fingerprint=hf.fingerprint, source=str(hf.folder))


def _make_array(shape, array_sharding, names: list[str], read) -> jax.Array:
    """One param from its HF tensors (one per layer for a stacked [L, ...] param); each distinct
    shard read once, as replicas ask for the same index."""
    read_shards: dict = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        if key not in read_shards:
            if len(names) == 1:
                read_shards[key] = read(names[0], shape, index)
            else:  # Stacked over layers: index[0] picks the layers.
                layers = range(shape[0])[index[0]]
                read_shards[key] = np.stack([read(names[i], shape[1:], index[1:]) for i in layers])
        return read_shards[key]

    return jax.make_array_from_callback(shape, array_sharding, shard)


def _read_slice(tensor_slice, hf_shape: tuple[int, ...], shape: tuple[int, ...], index: tuple[slice, ...]):
    """index (over `shape`, an HF tensor of `hf_shape` reshaped) read from the file.

    Each HF axis is a group of our axes ((H*E, D) -> (H, E, D)): the file range read covers the
    group's outer axis slice with its inner axes whole (heads are split, head_dim never is), and
    any inner slicing is done in memory."""
    file_index, read_shape, rest = [], [], []
    for axes in _axis_groups(hf_shape, shape):
        start, stop, _ = index[axes[0]].indices(shape[axes[0]])
        inner = math.prod(shape[a] for a in axes[1:])
        file_index.append(slice(start * inner, stop * inner))
        read_shape += [stop - start, *(shape[a] for a in axes[1:])]
        rest += [slice(None), *(index[a] for a in axes[1:])]
    return tensor_slice[tuple(file_index)].reshape(read_shape)[tuple(rest)]


def _axis_groups(hf_shape: tuple[int, ...], shape: tuple[int, ...]) -> list[list[int]]:
    """Our axes making up each HF axis, e.g. (32, 4) and (4, 8, 4) -> [[0, 1], [2]]."""
    groups, axis = [], 0
    for n in hf_shape:
        group, size = [axis], shape[axis]
        axis += 1
        while size < n and axis < len(shape):
            group.append(axis)
            size *= shape[axis]
            axis += 1
        if size != n:
            raise ValueError(f"shape {shape} is not a reshape of {hf_shape}")
        groups.append(group)
    return groups


def _get(tree, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _tree(flat: dict[tuple[str, ...], object]) -> Params:
    out: Params = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out
