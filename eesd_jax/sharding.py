"""Device meshes, logical-axis rules, and shardings for params, KV caches and loop/train state.

The model code names *logical* axes only (`model.PARAM_AXES`, `CACHE_AXES` below); one table,
`LOGICAL_RULES`, maps them to the two mesh axes:

  data   batch rows (data parallel; params are replicated over it)
  model  Megatron tensor parallel: query heads, kv heads, MLP width and vocabulary are split,
         so attention and MLP each need one all-reduce of [B, T, D] per layer (after `wo`
         and after `w_down`) and nothing else (`experiments/count_collectives.py` checks the
         compiled HLO). With data > 1, XLA adds four small all-gathers per layer for the
         KV-cache write (the new tokens' k/v and scatter indices, never weights).

Divisibility fallback: a mesh axis is dropped for any array dimension it does not divide,
and that dimension is replicated instead. SmolLM2 (9 heads, 3 kv heads) on model=8 thus
keeps attention replicated (every device computes all heads; no collectives there) while
the MLP (ffn 1536) and vocab (49152) are split; with model=3 both head counts are split.
The same rule covers batch sizes the data axis does not divide. A mesh axis is also used at
most once per array (a PartitionSpec cannot repeat it); the first dimension that claims it wins.

`jax.jit` propagates the shardings of its inputs, so the decoding functions run sharded
unchanged once params (`shard_params`) and batch inputs (`shard_batch`) are placed; caches
created inside a jitted function get their intended layout from `constrain_cache`, which is
a no-op unless a mesh is active (`with jax.set_mesh(mesh):`).

Multi-host: call `maybe_initialize_distributed()` first thing in an entry point; it only
initializes when the environment says this is one process of several. `jax.devices()` then
lists every host's devices and `make_mesh` spans them all.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eesd_jax import model
from eesd_jax.kv_cache import KVCache

log = logging.getLogger(__name__)

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis (or None: replicated). One table for params, caches and state.
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "seq": None,  # New tokens of a call (T); short, never split.
    "cache_seq": None,  # Cache slots (S); split it over 'model' only for very long contexts.
    "embed": None,  # Model width D: replicated, so residual adds and norms need no collectives.
    "heads": "model",
    "kv_heads": "model",  # Falls back to replicated when n_kv_heads % model != 0.
    "head_dim": None,
    "mlp": "model",
    "vocab": "model",  # Embedding rows and LM-head rows: logits come out split over vocab.
    "layers": None,  # Stacked layer axis; scanned, so never split.
}

# Logical axes of the KVCache fields (k, v: [L, B, K, S, E]; lengths: [B]).
CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "lengths": ("batch",),
}

# Logical axes of an early exit's params (exits.init_exit): one stacked block like the model's
# layers, its norm, optionally its own LM head over a draft vocabulary (row ids replicated) and fusion layer.
EXIT_PARAM_AXES = {
    "block": model.PARAM_AXES["layers"],
    "norm": ("embed",),
    "head": ("vocab", "embed"),
    "vocab": (None,),
    "fuse": {"norm": (None, "embed"), "w": ("embed", None)},  # A fused exit's input layer: replicated.
}

LogicalAxes = tuple[str | None, ...]


# ----------------------------------------------------------------------------- meshes


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ('data', 'model') mesh with Auto axis types over `devices` (default: all devices).

    `data=None` takes every device the model axis leaves. data * model must equal the
    device count: a mesh over a subset of devices is almost always a mistake here.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or (data is not None and data < 1):
        raise ValueError(f"mesh sizes must be >= 1, got data={data}, model={model}")
    if data is None:
        if n % model:
            raise ValueError(f"model={model} does not divide the {n} available devices")
        data = n // model
    if data * model != n:
        raise ValueError(
            f"mesh data={data} x model={model} = {data * model} devices, but {n} are available "
            f"({devices[0].platform}); choose sizes whose product is {n}"
        )
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def parse_mesh(spec: str) -> dict[str, int | None]:
    """'data=2,model=4' -> {'data': 2, 'model': 4}; an omitted axis is data=None (the rest) or model=1."""
    sizes: dict[str, int | None] = {"data": None, "model": 1}
    seen = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\w+)\s*=\s*(\d+)", part)
        if not m or m.group(1) not in MESH_AXES:
            raise ValueError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,model=4' (axes {MESH_AXES})")
        if m.group(1) in seen:
            raise ValueError(f"bad mesh spec {spec!r}: axis {m.group(1)!r} given twice")
        seen.add(m.group(1))
        sizes[m.group(1)] = int(m.group(2))
    if not seen:
        raise ValueError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,model=4'")
    return sizes


def mesh_from_spec(spec: str | None) -> Mesh | None:
    """The CLI's `--mesh data=D,model=M`; None -> None (single device, no sharding)."""
    return None if spec is None else make_mesh(**parse_mesh(spec))


# ----------------------------------------------------------------------------- logical -> mesh


def logical_to_spec(
    axes: LogicalAxes, shape: tuple[int, ...], mesh_shape: Mapping[str, int], rules: Mapping[str, Any] = LOGICAL_RULES
) -> P:
    """PartitionSpec for an array with these logical axes, dropping mesh axes that don't fit.

    A mesh axis is dropped for a dimension when it does not divide the dimension's size
    (the dimension is then replicated), when the mesh has no such axis, or when an earlier
    dimension already uses it. Unknown logical names raise, so a typo cannot silently
    replicate a weight.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match an array of shape {shape}")
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}; known: {sorted(rules)}")
        wanted = rules.get(name) if name is not None else None
        wanted = () if wanted is None else (wanted,) if isinstance(wanted, str) else tuple(wanted)
        kept: list[str] = []
        for ax in wanted:
            if (
                ax in mesh_shape
                and ax not in used
                and size % (math.prod(mesh_shape[a] for a in kept) * mesh_shape[ax]) == 0
            ):
                kept.append(ax)
                used.add(ax)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def named(mesh: Mesh, axes: LogicalAxes | None, shape: tuple[int, ...]) -> NamedSharding:
    """NamedSharding for one array; axes=None means fully replicated."""
    if axes is None:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh.shape))


def _key_name(k) -> str | None:
    for attr in ("key", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return None  # Sequence index: not a name.


def _lookup(table: Mapping, names: list[str]):
    node: Any = table
    for n in names:
        if not isinstance(node, Mapping) or n not in node:
            return None
        node = node[n]
    return node if isinstance(node, tuple) else None


def _axes_for_path(path, ndim: int, table: Mapping) -> LogicalAxes | None:
    """Logical axes for the longest suffix of `path` that is a path in `table` (and has ndim axes).

    Matching a suffix lets one table serve the params and anything that mirrors them, such
    as an optimizer's per-param moments inside a train state (opt_state.mu['layers']['wq']).
    Per-layer leaves of the unstacked layout (a list under 'layers') drop the 'layers' axis.
    """
    names = [n for n in map(_key_name, path) if n is not None]
    in_list = any(_key_name(k) is None for k in path)  # e.g. params["layers"][i]["wq"] (model.unstack)
    for start in range(len(names)):
        axes = _lookup(table, names[start:])
        if axes is None:
            continue
        if len(axes) == ndim:
            return axes
        if in_list and axes[0] == "layers" and len(axes) == ndim + 1:
            return axes[1:]  # One layer of the unstacked (list) layout: no layer axis.
    return None


def _leaf_axes(path, x, table: Mapping, batch_size: int | None, strict: bool) -> LogicalAxes | None:
    ndim = len(np.shape(x))
    axes = _axes_for_path(path, ndim, table)
    if axes is not None:
        return axes
    if strict:
        raise KeyError(
            f"no logical axes for param {jax.tree_util.keystr(path)} of shape {np.shape(x)}: add it (with one "
            "logical axis per dimension) to the axes table, e.g. model.PARAM_AXES"
        )
    if batch_size is not None and ndim >= 1 and np.shape(x)[0] == batch_size:
        return ("batch",) + (None,) * (ndim - 1)
    return None


def _map_axes(fn, tree, table: Mapping, batch_size: int | None, strict: bool):
    """tree_map of fn(logical axes, leaf) over array leaves; KVCache fields use CACHE_AXES."""

    def one(path, x):
        if isinstance(x, KVCache):
            return x.replace(**{f: fn(CACHE_AXES[f], getattr(x, f)) for f in CACHE_AXES})
        return fn(_leaf_axes(path, x, table, batch_size, strict), x)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, KVCache))


def tree_logical_axes(
    tree, table: Mapping = model.PARAM_AXES, batch_size: int | None = None, strict: bool = False
) -> Any:
    """Per-leaf logical axes (None = replicated) for any pytree of arrays.

    Rules, first match wins: KVCache subtrees use `CACHE_AXES`; leaves whose path ends in a
    path of `table` use it; leaves whose leading dim equals `batch_size` are batch-major
    ('batch' on axis 0); everything else (scalars, PRNG keys, counters) is replicated.
    `strict` makes a leaf that no table entry covers an error (used for params, so a new
    weight without a PARAM_AXES entry is caught instead of silently replicated).
    """
    return _map_axes(lambda axes, x: axes, tree, table, batch_size, strict)


def tree_shardings(
    tree, mesh: Mesh, table: Mapping = model.PARAM_AXES, batch_size: int | None = None, strict: bool = False
):
    """NamedShardings (same structure as `tree`) from `tree_logical_axes` and `LOGICAL_RULES`."""
    return _map_axes(lambda axes, x: named(mesh, axes, np.shape(x)), tree, table, batch_size, strict)


def param_shardings(params, mesh: Mesh, table: Mapping = model.PARAM_AXES):
    """Shardings of a model's (or an exit's, with its own table) params; optional leaves may be absent."""
    return tree_shardings(params, mesh, table, strict=True)


def exit_param_shardings(exit_params, mesh: Mesh):
    """Shardings of an early exit's params (`EXIT_PARAM_AXES`): Megatron TP like the model's layers."""
    return tree_shardings(exit_params, mesh, EXIT_PARAM_AXES, strict=True)


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """k, v [L, B, K, S, E]: batch over data, kv heads over model where they divide; lengths by batch."""
    return tree_shardings(cache, mesh, table={})


def state_shardings(state, mesh: Mesh, batch_size: int, table: Mapping = model.PARAM_AXES):
    """Decode-loop or train state: caches as caches, param-like leaves as params, batch-major rows
    over data, the rest (PRNG keys, counters, step) replicated."""
    return tree_shardings(state, mesh, table, batch_size=batch_size)


# ----------------------------------------------------------------------------- placing arrays


def put(tree, shardings):
    """Place a pytree of (host or device) arrays with the given shardings.

    Single process: `jax.device_put`. Multi-process: every process holds the full value
    (same params / prompts everywhere) and contributes the shards its devices own.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s)  # Already global: reshard.
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def shard_params(params, mesh: Mesh, table: Mapping = model.PARAM_AXES):
    return put(params, param_shardings(params, mesh, table))


def shard_exit_params(exit_params, mesh: Mesh):
    return put(exit_params, exit_param_shardings(exit_params, mesh))


def shard_batch(tree, mesh: Mesh):
    """Batch-major arrays ([B, ...] each): rows over 'data' (replicated where B doesn't divide)."""
    return put(tree, jax.tree.map(lambda x: named(mesh, ("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x)), tree))


def mesh_of(tree) -> Mesh | None:
    """The mesh a pytree's arrays are placed on (the first NamedSharding found), or None (one device)."""
    for x in jax.tree.leaves(tree):
        if isinstance(getattr(x, "sharding", None), NamedSharding):
            return x.sharding.mesh
    return None


def shard_rows(tree, mesh: Mesh | None):
    """shard_batch on a mesh; without one, plain device arrays."""
    return jax.tree.map(jax.numpy.asarray, tree) if mesh is None else shard_batch(tree, mesh)


def process_rows(tree, mesh: Mesh | None):
    """This process's rows of a global batch ([B / P, ...] each, P processes) -> global [B, ...] arrays, rows
    over 'data'. One process: shard_rows. Which global rows a process's rows become is the mesh's
    choice (a permutation of the batch's rows, the same at every step)."""
    if jax.process_count() == 1:
        return shard_rows(tree, mesh)
    if mesh is None or mesh.shape["data"] % jax.process_count():
        raise ValueError(
            f"{jax.process_count()} processes each make their rows of a batch: the mesh's 'data' axis must be a "
            "multiple of the process count"
        )

    def one(x):
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        if shape[0] % mesh.shape["data"]:
            raise ValueError(f"a batch of {shape[0]} rows cannot be split over data={mesh.shape['data']}")
        return jax.make_array_from_process_local_data(named(mesh, ("batch",) + (None,) * (x.ndim - 1), shape), x, shape)

    return jax.tree.map(one, tree)


def replicate(tree, mesh: Mesh):
    return put(tree, jax.tree.map(lambda x: NamedSharding(mesh, P()), tree))


def fetch(tree):
    """Host numpy copies of (possibly sharded) arrays, on every process.

    `np.asarray` fails on arrays with shards on other hosts (multi-host, rows split over
    'data'); those are all-gathered across processes first.
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------- inside jit


def active_mesh_shape() -> dict[str, int] | None:
    """Axis sizes of the mesh set by `jax.set_mesh` (also while tracing), or None."""
    m = jax.sharding.get_abstract_mesh()
    return None if m.empty else dict(m.shape)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """`with_sharding_constraint` by logical axes under the active mesh; identity without one."""
    mesh_shape = active_mesh_shape()
    if mesh_shape is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh_shape))


def constrain_cache(cache: KVCache) -> KVCache:
    """Pin a cache made inside jit (e.g. by prefill) to its intended layout; identity without a mesh."""
    return cache.replace(**{f: constrain(getattr(cache, f), CACHE_AXES[f]) for f in CACHE_AXES})


# ----------------------------------------------------------------------------- multi-host

_MULTI_PROCESS_HINTS: dict[str, Callable[[str], bool]] = {
    "JAX_COORDINATOR_ADDRESS": lambda v: bool(v),  # Explicit coordinator (with JAX_NUM_PROCESSES etc.).
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # Cloud TPU / GKE: more than one host in the slice.
    "TPU_PROCESS_ADDRESSES": lambda v: "," in v,
    "MEGASCALE_COORDINATOR_ADDRESS": lambda v: bool(v),  # Multislice TPU.
    "OMPI_COMM_WORLD_SIZE": lambda v: v.isdigit() and int(v) > 1,  # mpirun.
    "SLURM_NTASKS": lambda v: v.isdigit() and int(v) > 1,  # srun with several tasks.
}


def multi_process_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment says this process is one of several.

    EESD_DISTRIBUTED=1 forces it (the tpu/ scripts set it on every worker, since a plain
    ssh shell on a TPU VM pod carries no such variable; jax then finds the hosts from the
    TPU metadata server); EESD_DISTRIBUTED=0 forbids it.
    """
    env = os.environ if env is None else env
    flag = env.get("EESD_DISTRIBUTED", "").strip().lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return any(name in env and test(env[name]) for name, test in _MULTI_PROCESS_HINTS.items())


def maybe_initialize_distributed(force: bool | None = None) -> bool:
    """`jax.distributed.initialize()` when running as one of several processes; else nothing.

    Call at the top of an entry point, before any JAX computation. `force=True/False`
    overrides the environment. Returns whether the distributed runtime is initialized.
    """
    if jax.distributed.is_initialized():
        return True
    if not (multi_process_requested() if force is None else force):
        return False
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def is_main_process() -> bool:
    """True on process 0 only: the one that writes logs, results and exports."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process gets here (a no-op in one process); `name` must be the same on all."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def main_writes(name: str, write: Callable[[], Any]) -> None:
    """Run write() on process 0 only, then wait for it on every process.

    Multi-host runs share one workdir: every process computes the same results, one writes
    them, and no process reads a file before it is whole.
    """
    if is_main_process():
        write()
    sync(name)
