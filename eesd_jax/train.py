"""Training the early-exiting layer: optax AdamW, orbax checkpoints with exact resume, export.

    from eesd_jax import configs, train
    path = train.run_distill(configs.load_config("smollm2:N=6"), "runs/smollm2_n6")

`run_distill` = data (distill_data.prepare_data, reused when it matches) -> training
(`train_exit`) -> export (exits.save_exit with the config and metrics in its metadata).
WORKDIR holds: data/ (unless config.data.dir), checkpoints/ (orbax), metrics.jsonl
(one record per log step), run.json (stage wall times, metrics, the exit's path),
exit_N{n}.safetensors. evaluation.eval_exit then measures the exit in real EESD decoding.

Resume: the batch of step s is a function of (train.seed, s) alone (shards.batch_stream: a fresh
shuffle of the sequences per epoch, read from the data's shards; each process makes its rows),
and the optimizer state is checkpointed with the params, so a run killed mid-way and restarted
ends with exactly the params of an uninterrupted one.

Mesh: everything runs where the teacher's params lie (sharding.mesh_of): batch rows over 'data'
(each process's rows of a global batch), the exit's float32 master weights and Adam moments
sharded like one LLM layer, checkpoints of those global arrays. Multi-host: process 0 alone
writes logs, run.json and the export, so the workdir must be shared. A URL workdir (gs://)
goes through etils.epath; the data stays on each host's local disk (data.dir, `local_dir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eesd_jax import distill_data, exits, losses, model, sharding, shards, teacher
from eesd_jax.kv_cache import round_up
from eesd_jax.model import ModelConfig, Params
from eesd_jax.teacher import LM

STATE_FORMAT = "eesd_jax.train_state/1"


# ----------------------------------------------------------------------------- pieces


def split_trainable(exit_params: Params, train_head: bool) -> tuple[Params, Params]:
    """(trainable, static): the block, norm and fusion layer train; an own head too when train_head; vocab ids
    never."""
    names = {"block", "norm", "fuse"} | ({"head"} if train_head else set())
    return (
        {k: v for k, v in exit_params.items() if k in names},
        {k: v for k, v in exit_params.items() if k not in names},
    )


def make_optimizer(tcfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup + cosine decay and global-norm clipping; no decay on norm scales."""
    steps, lr = int(tcfg.steps), float(tcfg.lr)
    warmup = max(0, min(int(tcfg.warmup_steps), steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * float(tcfg.end_lr_frac)
    )

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)

    tx = optax.chain(
        optax.clip_by_global_norm(float(tcfg.clip_norm)),
        optax.adamw(schedule, weight_decay=float(tcfg.weight_decay), mask=decay_mask),
    )
    return tx, schedule


def make_train_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    kl_weight: float,
    ce_weight: float,
    n_round: int = 1,
    state_shardings=None,
):
    """The jitted AdamW step on the trainable exit params, (head_vd, static, state, vmap_v, batch) -> (state,
    metrics); `state` is donated (updated in place). n_round: the longest simulated round a fused exit
    runs (losses.exit_train_logits). The state holds float32 master weights; the exit computes in the
    LLM's dtype (cfg.dtype). state_shardings: the state's layout on a mesh, kept from step to step
    (one compile)."""

    def train_step(head_vd, static, state, vmap_v, batch):
        def loss_fn(trainable):
            exit_params = {**static, **model.cast_params(trainable, cfg.dtype)}
            head = exit_params.get("head", head_vd)
            logits = losses.exit_train_logits(
                cfg, head, exit_params, batch.hidden, batch.select, batch.context, batch.start, batch.fuse, n_round
            )
            return losses.distill_loss(logits, vmap_v, batch, kl_weight, ce_weight)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt}, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    if state_shardings is None:
        return jax.jit(train_step, donate_argnames=("state",))
    replicated = NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, P())
    return jax.jit(train_step, donate_argnames=("state",), out_shardings=(state_shardings, replicated))


def select_count(*datas: shards.Data | None) -> int:
    """Positions per row the head and loss run on: the most response positions of any sequence,
    rounded up (one fixed count, so few compiled shapes)."""
    return round_up(max(losses.max_train_positions(d) for d in datas if d is not None), 16)


def _run_identity(config, data_spec: dict, vocab_ids) -> dict:
    """What a resumed run must share with the run that wrote the checkpoints."""
    vocab_hash = hashlib.sha256(np.asarray(vocab_ids).tobytes()).hexdigest() if vocab_ids is not None else None
    return {
        "format": STATE_FORMAT,
        "exit": config.exit.to_dict(),
        "train": config.train.to_dict(),
        "data_spec": data_spec,
        "data_top_k": int(config.data.top_k),
        "vocab_sha256": vocab_hash,
    }


def as_path(path: str | os.PathLike) -> pathlib.Path:
    """A local path as a pathlib.Path; a URL (gs://...) as an etils.epath.Path, which has the same methods."""
    if "://" in str(path):
        from etils import epath

        return epath.Path(path)
    return pathlib.Path(path)


def local_dir(configured: str, workdir, name: str, key: str) -> pathlib.Path:
    """The local folder of distillation data: `configured`, else WORKDIR/name. Shards are memory-mapped,
    so the data must be on a local (or mounted) disk; with a URL workdir every host keeps its own copy
    in `key`, a local path (ValueError before any compute otherwise)."""
    path = str(configured) or f"{workdir}/{name}"
    if "://" in path:
        raise ValueError(
            f"{key}={path!r}: distillation data is memory-mapped from a local disk; set {key} to a local "
            "path (with a gs:// workdir each host makes and reads its own copy there)"
        )
    return pathlib.Path(path)


def _size(path) -> int:
    stat = path.stat()
    return stat.st_size if hasattr(stat, "st_size") else stat.length  # pathlib's or epath's stat.


def _jsonable(tree):
    return json.loads(json.dumps(tree, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# ----------------------------------------------------------------------------- training


def train_exit(
    config,
    lm: LM,
    data: shards.Data,
    workdir,
    vocab_ids=None,
    progress: bool = True,
    stop_at: int | None = None,
    data_spec: dict | None = None,
    val: shards.Data | None = None,
) -> tuple[Params, dict]:
    """Train the exit of config.exit on `data`, resuming from WORKDIR/checkpoints.

    stop_at: stop after that many steps as if killed (no extra save): a later call
    resumes from the last periodic checkpoint. Returns (exit params, summary).
    """
    from tqdm.auto import tqdm

    t = config.train
    workdir = as_path(workdir)
    exit_cfg = exit_config(config)
    mesh = sharding.mesh_of(lm.params)  # The LLM's mesh (None: one device): the exit trains on it too.
    init = exits.init_exit(lm.cfg, lm.params, exit_cfg, vocab_ids)
    own_head = "head" in init
    trainable, static = split_trainable(init, bool(t.train_head) and own_head)
    trainable = model.cast_params(trainable, "float32")  # Master weights (and so Adam's moments) in float32.
    head_vd = losses.frozen_head(lm.params, init) if "head" not in trainable else jnp.zeros((0, lm.cfg.d_model))
    vmap = jnp.asarray(distill_data.vocab_map(lm.cfg.vocab_size, vocab_ids))
    tx, schedule = make_optimizer(t)
    state = {"params": trainable, "opt": tx.init(trainable)}
    state_sh = None
    if mesh is not None:  # The exit Megatron-sharded like the LLM's layers, its Adam moments alike.
        state_sh = sharding.tree_shardings(state, mesh, sharding.EXIT_PARAM_AXES)
        state, static = sharding.put(state, state_sh), sharding.shard_exit_params(static, mesh)
        vmap = sharding.replicate(vmap, mesh)
        if sharding.mesh_of(head_vd) is None:  # The placeholder of an exit training its own head.
            head_vd = sharding.replicate(head_vd, mesh)
    train_step = make_train_step(
        lm.cfg,
        tx,
        float(t.kl_weight),
        float(t.ce_weight),
        int(t.max_round) if exit_cfg.fuse_layers else 1,
        state_sh,
    )

    ckpt_dir = workdir / "checkpoints"
    identity = _jsonable(_run_identity(config, data_spec or {}, vocab_ids))
    ident_path = workdir / "train_identity.json"
    mngr = ocp.CheckpointManager(
        ckpt_dir.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=int(t.max_to_keep),
            save_interval_steps=int(t.ckpt_every),
            create=True,
            enable_async_checkpointing=False,
        ),
    )
    start = mngr.latest_step() or 0
    if start:
        if not ident_path.is_file() or json.loads(ident_path.read_text()) != identity:
            raise ValueError(
                f"{ckpt_dir} holds checkpoints of a different run (config or data differ); "
                "use another workdir or delete them"
            )
        state = mngr.restore(start, args=ocp.args.StandardRestore(state))  # On a mesh: in state's shardings.
        if mesh is None:  # Restored arrays come back committed to a device, which would recompile the train step.
            state = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), state)
    else:
        sharding.main_writes("train.identity", lambda: ident_path.write_text(json.dumps(identity, indent=1)))

    n_select = select_count(data, val)

    def validate(done, exit_trainable):
        m = losses.data_metrics(
            lm.cfg,
            lm.params,
            {**static, **model.cast_params(exit_trainable, lm.cfg.dtype)},
            val,
            int(t.seq_len),
            int(t.batch_size),
            int(t.seq_bucket),
            n_select,
        )
        rec = {"step": done, **{f"val_{k}": v for k, v in m.items()}}
        say(f"step {done:>6}  validation: kl {m['kl']:.4f}  top1 {m['top1']:.3f}")
        return rec

    metrics_path = workdir / "metrics.jsonl"
    records = []
    if sharding.is_main_process() and metrics_path.is_file():  # Drop records past the checkpoint resumed.
        records = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= start]

    def log(rec: dict | None = None) -> None:
        """Append a record to metrics.jsonl (process 0; rewritten whole, as object stores cannot append)."""
        records.extend([json.dumps(rec)] if rec else [])
        if sharding.is_main_process():
            metrics_path.write_text("".join(line + "\n" for line in records))

    log()

    steps = int(t.steps)
    end = steps if stop_at is None else min(steps, int(stop_at))
    acc: list[dict] = []
    t0 = last_t = time.perf_counter()
    n_tokens = 0
    main = sharding.is_main_process()  # One progress report in a multi-host run.
    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"train N={exit_cfg.layer}",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    say = bar.write if main else lambda text: None

    # Processes make their rows of a batch apart: one padded length, so that they run one SPMD program.
    bucket = int(t.seq_bucket) if jax.process_count() == 1 else round_up(int(t.seq_len), int(t.seq_bucket))

    def make_batch(step, idx):
        rounds = np.random.default_rng([int(t.seed), step, jax.process_index()])  # Resume-exact, like the order.
        args = (int(t.seq_len), bucket, float(t.prompt_weight), n_select, rounds, int(t.max_round))
        return losses.make_batch(data, idx, *args)

    stream = shards.batch_stream(data.n_seq, int(t.batch_size), int(t.seed), make_batch)
    for step, batch in zip(range(start, end), shards.prefetched(stream, start, end)):
        n_tokens += batch.weights.shape[0] * batch.weights.shape[1] * jax.process_count()
        state, m = train_step(head_vd, static, state, vmap, sharding.process_rows(batch, mesh))
        acc.append(m)
        done = step + 1
        if done % int(t.log_every) == 0 or done == steps:
            got = sharding.fetch(acc)
            now = time.perf_counter()
            rec = {
                "step": done,
                **{k: round(float(np.mean([a[k] for a in got])), 6) for k in ("loss", "kl", "ce", "top1", "grad_norm")},
                "lr": float(schedule(done - 1)),
                "seconds_per_step": round((now - last_t) / len(got), 4),
                "positions_per_s": round(n_tokens / (now - last_t), 1),
            }
            log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}", top1=f"{rec['top1']:.3f}")
            say(
                f"step {done:>6}  loss {rec['loss']:.4f}  kl {rec['kl']:.4f}  top1 {rec['top1']:.3f}"
                f"  lr {rec['lr']:.2e}  {rec['seconds_per_step']:.3f}s/step"
            )
            acc, last_t, n_tokens = [], now, 0
        if val is not None and (done % int(t.val_every) == 0 or done == steps):
            log(validate(done, state["params"]))
        if done % int(t.ckpt_every) == 0 or done == steps:
            mngr.save(done, args=ocp.args.StandardSave(state), force=True)
        bar.update(1)
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    exit_params = sharding.fetch({**static, **model.cast_params(state["params"], lm.cfg.dtype)})
    summary = {
        "steps_done": end,
        "steps": steps,
        "finished": end == steps,
        "resumed_from": start,
        "n_select": n_select,
        "mesh": None if mesh is None else dict(mesh.shape),
        "processes": jax.process_count(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return jax.tree.map(jnp.asarray, exit_params), summary


# ----------------------------------------------------------------------------- the whole run


def exit_config(config) -> exits.ExitConfig:
    e = config.exit
    fuse = tuple(int(j) for j in e.get("fuse_layers", ()))
    return exits.ExitConfig(int(e.layer), bool(e.own_head), int(e.draft_vocab), int(e.get("context_layer", 0)), fuse)


def run_distill(config, workdir, lm: LM | None = None, progress: bool = True, stop_at: int | None = None):
    """Data -> training -> export for one config. Returns the exported exit's path (None if stopped early).

    lm: the teacher, if already loaded (an LM, loading.LoadedModel or engine.Session);
    default: teacher.load_lm(config.model). stop_at: see train_exit. With config.exit.joint_layers,
    exits at those N too (run_joint); the path returned is still exit.layer's.
    """
    workdir = as_path(workdir)
    data_dir = local_dir(config.data.dir, workdir, "data", "data.dir")
    if config.data.text.corpus:
        text_dir = local_dir(config.data.text.dir, workdir, "text_data", "data.text.dir")
    workdir.mkdir(parents=True, exist_ok=True)
    if tuple(config.exit.get("joint_layers", ())):
        paths = run_joint(config, workdir, lm, progress, stop_at)
        return None if paths is None else paths[int(config.exit.layer)]
    config_json = json.dumps(_jsonable(config.to_dict()), indent=1)
    sharding.main_writes("train.config", lambda: (workdir / "config.json").write_text(config_json))
    seconds = {}
    t0 = time.perf_counter()
    lm = teacher.load_lm(config.model) if lm is None else teacher.as_lm(lm)
    exit_cfg = exit_config(config)
    exit_cfg.validate(lm.cfg)
    lm = dataclasses.replace(lm, params=jax.tree.map(jnp.asarray, lm.params))
    seconds["load_model"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    t = config.train
    if config.data.text.corpus:  # Checked before the responses, which may take hours to make.
        prepare_text = distill_data.plan_text_data(lm, config, text_dir)
    manifest = distill_data.prepare_data(lm, config, data_dir, progress)
    all_data = distill_data.load_data(
        data_dir, exit_cfg.layer, int(config.data.top_k), exit_cfg.context_layer, exit_cfg.fuse_layers
    )
    data, val = all_data.split(int(t.val_every_prompt))
    data = data.take_tokens(int(config.data.response_tokens), int(config.data.seed))
    data_spec, data_info = (
        manifest["spec"],
        {k: manifest[k] for k in ("counts", "prompts", "sampling", "seed", "created")},
    )
    if config.data.text.corpus:
        text_manifest = prepare_text(progress)
        text = distill_data.load_data(
            text_dir, exit_cfg.layer, int(config.data.top_k), exit_cfg.context_layer, exit_cfg.fuse_layers
        )
        text = text.take_tokens(int(config.data.text.max_tokens), int(config.data.seed))
        data = text if config.data.text.only else shards.Data.concat([data, text])
        data_spec = data_spec | {"text": text_manifest["spec"]}  # Checkpoints resume only on the same text.
        data_info["text"] = {k: text_manifest[k] for k in ("spec", "counts", "seconds")}
    vocab_ids = (
        distill_data.choose_draft_vocab(data, exit_cfg.draft_vocab, lm.cfg.vocab_size, lm.eos_ids)
        if exit_cfg.draft_vocab
        else None
    )
    seconds["data"] = round(time.perf_counter() - t0, 2)

    def metrics(exit_params):
        args = (int(t.seq_len), int(t.batch_size), int(t.seq_bucket), select_count(data, val))
        out = {"train": losses.data_metrics(lm.cfg, lm.params, exit_params, data, *args)}
        if val is not None:
            out["val"] = losses.data_metrics(lm.cfg, lm.params, exit_params, val, *args)
        return out

    t0 = time.perf_counter()
    before = metrics(exits.init_exit(lm.cfg, lm.params, exit_cfg, vocab_ids))
    seconds["metrics_before"] = round(time.perf_counter() - t0, 2)

    exit_params, summary = train_exit(config, lm, data, workdir, vocab_ids, progress, stop_at, data_spec, val=val)
    seconds["train"] = summary["seconds"]
    if not summary["finished"]:
        return None

    t0 = time.perf_counter()
    after = metrics(exit_params)
    seconds["metrics_after"] = round(time.perf_counter() - t0, 2)
    path = workdir / f"exit_N{exit_cfg.layer}.safetensors"
    extra = {
        "config": _jsonable(config.to_dict()),
        "data": data_info,
        "train_metrics": {"untrained": before, "trained": after, **summary},
    }
    file_dtype = str(config.exit.get("file_dtype", "float32"))
    store = {} if file_dtype == "float32" else {"dtype": file_dtype}
    if not sharding.is_main_process():  # Every process trained the same exit; process 0 exports it.
        sharding.sync("train.export")
        return path
    exits.save_exit(path, exit_params, exit_cfg, lm.name, lm.fingerprint, extra=_jsonable(extra), **store)
    run = {
        "exit": str(path),
        "exit_bytes": _size(path),
        "seconds": seconds,
        "data_seconds": manifest.get("seconds", {}),
        "metrics": {"untrained": before, "trained": after},
        "counts": manifest["counts"],
        "text": data_info.get("text"),
        "train": summary,
    }
    (workdir / "run.json").write_text(json.dumps(run, indent=1))
    sharding.sync("train.export")
    return path


def run_joint(config, workdir, lm: LM | None = None, progress: bool = True, stop_at: int | None = None):
    """Multi-exit training (COST-EFF): exits at exit.layer and every exit.joint_layers N from one run.

    The data is made once, its teacher pass storing every N's hidden states, and each exit trains
    on the same batch stream (same seed) in WORKDIR/N{n}, exported as WORKDIR/N{n}/exit_N{n}.safetensors.
    The LLM is frozen, so exits do not interact through the loss: training them in one step
    would give each the same updates as this. Returns {N: path} (None if stopped early);
    WORKDIR/joint.json lists them, and eesd generate / bench --exit-layer N pick one.
    """
    workdir = as_path(workdir)
    layers = list(dict.fromkeys([int(config.exit.layer), *map(int, config.exit.joint_layers)]))
    lm = teacher.load_lm(config.model) if lm is None else teacher.as_lm(lm)
    for n in layers:  # Every N is checked before any data is made.
        dataclasses.replace(exit_config(config), layer=n).validate(lm.cfg)
    paths = {}
    for n in layers:
        c = ml_collections.ConfigDict(config.to_dict())
        c.exit.layer, c.exit.joint_layers = n, ()
        c.data.dir = config.data.dir or str(workdir / "data")  # One data dir: generated once.
        c.data.feature_layers = tuple(sorted({*map(int, config.data.feature_layers), *layers} - {n}))
        if c.data.text.corpus:
            c.data.text.dir = config.data.text.dir or str(workdir / "text_data")
        if (path := run_distill(c, workdir / f"N{n}", lm, progress, stop_at)) is None:
            return None
        paths[n] = path
    joint = json.dumps({str(n): str(p) for n, p in paths.items()}, indent=1)
    sharding.main_writes("train.joint", lambda: (workdir / "joint.json").write_text(joint))
    return paths
