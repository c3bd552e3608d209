"""Count the collectives XLA emits for one sharded verify step, and compare with Megatron TP.

One verify-like forward — embed T new tokens, `model.run_layers` over all layers (reading
and writing the KV cache), final norm, LM head — is jitted with the shardings of
`eesd_jax.sharding` on a ('data', 'model') mesh (default (1, 8) on 8 fake CPU devices),
and the compiled, SPMD-partitioned HLO is parsed for all-reduce, all-gather,
reduce-scatter, collective-permute and all-to-all ops.

The layers run as one `lax.scan`, which XLA compiles to a `while` whose body appears
*once* in the HLO text. So ops are counted per HLO computation and each computation is
weighted by how often it runs: a while body by its trip count (XLA's
`known_trip_count`, = number of layers for the layer scan), everything called from it
accordingly. "per layer" = ops in the layer-scan body (one iteration); "outside" = ops
run once per step (embedding lookup, LM head).

Megatron tensor parallelism expects, per layer, two all-reduces of the [B, T, D]
activations (after the attention output projection and after the MLP down projection)
and no all-gather of weight matrices. Weights are never gathered if every all-gather
listed is activation-sized.

  python experiments/count_collectives.py                      # SmolLM2 shapes, heads divisible by 8
  python experiments/count_collectives.py --config smollm2     # real SmolLM2 shapes (9 heads / 3 kv)
  python experiments/count_collectives.py --mesh data=2,model=4 --tokens 1
  python experiments/count_collectives.py --config llama3.1-8b  # also llama2-7b, qwen2.5-7b

Weights are never materialized: lowering uses shapes only (jax.ShapeDtypeStruct).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys

from eesd_jax import shapes  # Likewise.
from eesd_jax.configs import _pod  # Shapes only: imports no jax (XLA_FLAGS are set before that).

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

SMOLLM2 = {**shapes.SHAPES["smollm2"], "name": "smollm2-shapes"}
CONFIGS = {
    "smollm2": SMOLLM2,
    # Same width, ffn, vocab and depth, but 16 heads / 8 kv heads x 36 so model=8 splits attention too.
    "smollm2-div8": {**SMOLLM2, "n_heads": 16, "n_kv_heads": 8, "head_dim": 36, "name": "smollm2-div8"},
    # Small enough for a unit test.
    "tiny": dict(
        vocab_size=512,
        d_model=64,
        n_layers=3,
        n_heads=8,
        n_kv_heads=8,
        head_dim=8,
        ffn_dim=128,
        tie_embeddings=True,
        max_seq_len=512,
        name="tiny-div8",
    ),
    # The 7B/8B configs' models (eesd_jax/configs/_pod.py): LLaMA-2-7B, LLaMA-3.1-8B, Qwen2.5-7B.
    **_pod.SHAPES,
}

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_OP = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_CALLS = re.compile(r"\b(calls|body|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def split_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """HLO module text -> ({computation name: instruction lines}, entry name)."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            comps[current].append(line)
    if not entry:
        raise ValueError("no ENTRY computation in HLO text")
    return comps, entry


def _result_shape(line: str, op: str) -> tuple[str, int]:
    """(result type text, bytes) of an instruction line `%x = TYPE op(...)`."""
    head = line.split(" = ", 1)[1]
    type_text = head[: head.index(op + "(") if op + "(" in head else head.index(op)].strip()
    nbytes = 0
    for dtype, dims in _SHAPE.findall(type_text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        nbytes += n * _DTYPE_BYTES.get(dtype, 4)
    return type_text, nbytes


def count_collectives(hlo: str) -> dict:
    """Collectives per computation, weighted by how many times each computation runs."""
    comps, entry = split_computations(hlo)
    # Call graph with multiplicities: while bodies run known_trip_count times.
    edges: dict[str, list[tuple[str, int, bool]]] = {name: [] for name in comps}
    for name, lines in comps.items():
        for line in lines:
            trip = _TRIP.search(line)
            for kind, callee in _CALLS.findall(line):
                if kind == "body":
                    edges[name].append((callee, int(trip.group(1)) if trip else 1, trip is None))
                elif kind != "to_apply":  # Reducers of all-reduce etc. hold no collectives.
                    edges[name].append((callee, 1, False))
            for group in _BRANCHES.findall(line):
                edges[name] += [(c.strip().lstrip("%"), 1, False) for c in group.split(",") if c.strip()]
    runs: dict[str, int] = {}
    unknown_trip = False

    def visit(name: str, times: int):
        nonlocal unknown_trip
        runs[name] = runs.get(name, 0) + times
        for callee, mult, unknown in edges.get(name, []):
            unknown_trip |= unknown
            visit(callee, times * mult)

    visit(entry, 1)
    ops = []
    for name, lines in comps.items():
        for line in lines:
            m = _OP.search(line)
            if m and runs.get(name):
                type_text, nbytes = _result_shape(line, m.group(0)[:-1])
                source = re.search(r'op_name="([^"]*)"', line)
                ops.append(
                    dict(
                        op=m.group(1),
                        computation=name,
                        runs=runs[name],
                        shape=type_text,
                        bytes=nbytes,
                        source=source.group(1).rsplit("/", 2)[-2] if source else "",
                    )
                )
    # The layer scan: the while body with the largest trip count.
    bodies = {callee: mult for es in edges.values() for callee, mult, _ in es if mult > 1}
    layer_body = max(bodies, key=bodies.get) if bodies else None
    in_body = _reachable(layer_body, edges) if layer_body else set()
    per_layer = {c: 0 for c in COLLECTIVES}
    outside = {c: 0 for c in COLLECTIVES}
    total = {c: 0 for c in COLLECTIVES}
    for o in ops:
        total[o["op"]] += o["runs"]
        if o["computation"] in in_body:
            per_layer[o["op"]] += o["runs"] // bodies[layer_body]
        else:
            outside[o["op"]] += o["runs"]
    return dict(
        ops=ops,
        per_layer=per_layer,
        outside_layers=outside,
        total=total,
        layer_trip_count=bodies.get(layer_body, 0),
        layer_computations=sorted(in_body),
        unknown_trip_count=unknown_trip,
    )


def _reachable(root: str, edges) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += [c for c, _, _ in edges.get(n, [])]
    return seen


def verify_step_hlo(cfg, mesh, tokens: int = 8, batch: int = 1, cache_len: int = 256) -> str:
    """Compiled HLO text of one sharded verify-like step (shapes only, nothing materialized)."""
    import jax
    import jax.numpy as jnp

    from eesd_jax import model, sharding
    from eesd_jax.kv_cache import init_cache

    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, cache_len))
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    param_sh = sharding.param_shardings(params, mesh)
    cache_sh = sharding.cache_shardings(cache, mesh)
    batch_sh = sharding.named(mesh, ("batch", "seq"), (batch, tokens))

    def verify(params, tokens_bt, positions_bt, cache):
        x = model.embed(params, tokens_bt)
        x, cache = model.run_layers(cfg, params["layers"], x, positions_bt, cache)
        return model.lm_head(params, model.final_norm(params, cfg, x)), cache

    fn = jax.jit(
        verify,
        in_shardings=(param_sh, batch_sh, batch_sh, cache_sh),
        out_shardings=(None, cache_sh),
        donate_argnums=3,
    )
    return fn.lower(params, ids, ids, cache).compile().as_text()


def report(cfg, mesh, counts: dict, tokens: int, batch: int) -> str:
    """Human-readable table and verdict against the Megatron pattern."""
    from eesd_jax import sharding

    mesh_txt = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    act_bytes = batch * tokens * cfg.d_model * cfg.jnp_dtype.itemsize
    lines = [
        f"config {cfg.name}: L={cfg.n_layers} D={cfg.d_model} H={cfg.n_heads} K={cfg.n_kv_heads} "
        f"E={cfg.head_dim} F={cfg.ffn_dim} V={cfg.vocab_size}; mesh {mesh_txt}; B={batch} T={tokens}",
        "specs: " + _spec_summary(cfg, mesh, sharding),
        f"layer scan: one while body in the HLO, run {counts['layer_trip_count']} times (known_trip_count); "
        "body ops are counted once and multiplied by the trip count.",
        "",
        f"{'collective':<20}{'per layer':>10}{'outside':>10}{'total':>8}",
    ]
    for c in COLLECTIVES:
        lines.append(f"{c:<20}{counts['per_layer'][c]:>10}{counts['outside_layers'][c]:>10}{counts['total'][c]:>8}")
    lines.append("")
    for o in counts["ops"]:
        where = "layer body" if o["computation"] in counts["layer_computations"] else o["computation"]
        lines.append(f"  {o['op']:<18} x{o['runs']:<4} {o['shape']:<24} {o['bytes']:>9} B  {where}: {o['source']}")
    weight_bytes = min(cfg.ffn_dim * cfg.d_model, cfg.n_heads * cfg.head_dim * cfg.d_model) * cfg.jnp_dtype.itemsize
    big_gathers = [o for o in counts["ops"] if o["op"] == "all-gather" and o["bytes"] >= weight_bytes]
    ar = counts["per_layer"]["all-reduce"]
    m = mesh.shape["model"]
    attn_split, mlp_split = m > 1 and cfg.n_heads % m == 0, m > 1 and cfg.ffn_dim % m == 0
    expected = int(attn_split) + int(mlp_split)
    ok = ar == expected and not big_gathers
    lines += [
        "",
        f"Megatron pattern: per layer one all-reduce of [B,T,D] ({act_bytes} B) after the attention output "
        "projection and one after the MLP down projection, for each of the two that is split over 'model'; "
        "no weight all-gathers.",
        f"here: attention split over model={m}: {'yes' if attn_split else 'no (heads not divisible: replicated)'}; "
        f"MLP split: {'yes' if mlp_split else 'no'} -> expected {expected} all-reduce(s) per layer.",
        f"measured: {ar} all-reduce(s) per layer; all-gathers >= one weight matrix ({weight_bytes} B): "
        f"{len(big_gathers)}. " + ("MATCHES" if ok else "DIFFERS"),
    ]
    counts["expected_all_reduce_per_layer"] = expected
    counts["matches_megatron"] = ok
    return "\n".join(lines)


def _spec_summary(cfg, mesh, sharding) -> str:
    import jax

    from eesd_jax import model

    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    sh = sharding.param_shardings(params, mesh)
    keys = ("wq", "wk", "wo", "w_gate", "w_down")
    return ", ".join(f"{k} {tuple(sh['layers'][k].spec)}" for k in keys) + f", embed {tuple(sh['embed'].spec)}"


def run(config: str, mesh_spec: str, tokens: int, batch: int, cache_len: int, hlo_out: str | None = None) -> dict:
    """Lower, compile, count; returns the JSON-able summary (and prints nothing)."""
    from eesd_jax import model, sharding

    cfg = model.ModelConfig(**CONFIGS[config])
    mesh = sharding.mesh_from_spec(mesh_spec)
    hlo = verify_step_hlo(cfg, mesh, tokens, batch, cache_len)
    if hlo_out:
        with open(hlo_out, "w") as f:
            f.write(hlo)
    counts = count_collectives(hlo)
    summary = {
        "config": config,
        "model": dataclasses.asdict(cfg),
        "mesh": dict(mesh.shape),
        "batch": batch,
        "tokens": tokens,
        "cache_len": cache_len,
        **{k: counts[k] for k in ("per_layer", "outside_layers", "total", "layer_trip_count", "unknown_trip_count")},
        "all_gather_bytes": [o["bytes"] for o in counts["ops"] if o["op"] == "all-gather"],
        "ops": counts["ops"],
        "table": report(cfg, mesh, counts, tokens, batch),
    }
    summary["expected_all_reduce_per_layer"] = counts["expected_all_reduce_per_layer"]
    summary["matches_megatron"] = counts["matches_megatron"]
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="smollm2-div8")
    ap.add_argument("--mesh", default="data=1,model=8", help="mesh axes, e.g. data=2,model=4")
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices when no accelerator (default 8)")
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per verify step (T)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--hlo-out", help="also write the compiled HLO text here")
    args = ap.parse_args(argv)
    # Fake devices must be configured before jax is imported.
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    summary = run(args.config, args.mesh, args.tokens, args.batch, args.cache_len, args.hlo_out)
    print(summary.pop("table"))
    summary.pop("ops")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
