"""Peak host memory of loading a Hugging Face checkpoint: plain (whole model staged in float32, then
cast) against straight onto a mesh (eesd_jax.mesh_loading: each device's slice read, cast, placed).

Writes a random bfloat16 checkpoint at a real shape (2 safetensors shards, as save_pretrained
does) once, then loads it in a fresh subprocess per method on 8 fake CPU devices and reports
  * staging_peak_gb: tracemalloc's peak of Python/numpy allocations during the load, i.e. the
    host copies the loader makes; live_after_gb: those still held after it (on CPU, XLA may
    keep a numpy array as the device buffer without copying, so the loaded params themselves
    can show up here; on an accelerator they would not); transient_gb = peak - live after:
    the staging above the loaded params;
  * rss_peak_gb: the process's peak resident set (ru_maxrss), device buffers included;
  * model_gb (the params in the target dtype) and largest_param_gb (one stacked [L, ...] param).

  python experiments/load_memory.py                          # 1B shape, mesh method only
  python experiments/load_memory.py --methods mesh,plain --layers 2   # plain needs ~2x the f32 model

The plain method holds every tensor in float32 and then the stacked copies (~2 x 4 bytes per
param): at the full 1B shape ~10 GB, so --layers shrinks the model for it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from eesd_jax import shapes

MEASURE = """
import json, resource, sys, time, tracemalloc
import jax, numpy as np
from eesd_jax import loading, mesh_loading, sharding
folder, method, mesh_spec = sys.argv[1:4]
tracemalloc.start()
t0 = time.perf_counter()
if method == "mesh":
    lm = mesh_loading.load_hf_to_mesh(folder, sharding.mesh_from_spec(mesh_spec), "bfloat16")
else:
    lm = loading.load_model(folder, "bfloat16")
    lm.params = sharding.shard_params(lm.params, sharding.mesh_from_spec(mesh_spec))
jax.block_until_ready(lm.params)
seconds = time.perf_counter() - t0
live, peak = tracemalloc.get_traced_memory()
leaves = jax.tree.leaves(lm.params)
print(json.dumps(dict(method=method, mesh=mesh_spec, seconds=round(seconds, 1), staging_peak_gb=round(peak / 1e9, 3),
    live_after_gb=round(live / 1e9, 3), transient_gb=round((peak - live) / 1e9, 3),
    rss_peak_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
    model_gb=round(sum(a.nbytes for a in leaves) / 1e9, 3), largest_param_gb=round(max(a.nbytes for a in leaves) / 1e9, 3),
    params=sum(a.size for a in leaves))))
"""


def write_checkpoint(folder: pathlib.Path, shape: str, layers: int) -> None:
    """Random-enough bfloat16 weights (a cheap pattern: the values do not matter for memory)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from eesd_jax import loading, model

    cfg = model.ModelConfig(**{**shapes.SHAPES[shape], "n_layers": layers})
    hf = {
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    names = {n: loading.hf_tensor_shape(cfg, n) for _, ns in loading.hf_layout(cfg).values() for n in ns}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf))
    pattern = (np.arange(4096) % 97 / 970.0).astype(ml_dtypes.bfloat16)
    half = sorted(names)[: len(names) // 2]
    weight_map = {}
    for part, chosen in enumerate((half, sorted(set(names) - set(half)))):
        file = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({n: np.resize(pattern, names[n]) for n in chosen}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chosen, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(shapes.SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (default: all)")
    ap.add_argument("--methods", default="mesh", help="comma-separated: mesh, plain")
    ap.add_argument("--mesh", default="data=1,model=8", help="mesh over the 8 fake CPU devices")
    ap.add_argument("--dir", default=None, help="where the checkpoint is written (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    layers = args.layers or shapes.SHAPES[args.shape]["n_layers"]
    root = pathlib.Path(args.dir or tempfile.gettempdir())
    folder = root / f"eesd_load_memory_{args.shape}_L{layers}"
    if not (folder / "model.safetensors.index.json").is_file():
        write_checkpoint(folder, args.shape, layers)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    results = []
    for method in args.methods.split(","):
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, str(folder), method, args.mesh],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results.append({"shape": args.shape, "layers": layers, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
