"""The `eesd` command.

    eesd generate --prompt "Write a short poem about the sea."
    eesd generate --prompt "def fib(n):" --no-chat --max-new-tokens 64 --json

Structure, so that new modes and subcommands are small additions:
  * `build_parser()` declares subcommands; shared option groups are `add_*_args` helpers
    (cli_args.py).
  * `validate_*` functions (here and in cli_args.py) check arguments before the model is loaded
    (exit code 2).
  * `engine.load_session(model)` loads weights (as jax arrays, once) and the tokenizer;
    `engine_from_args` builds the EESD engine from the EESD flags.
  * `run_mode` runs one generation of a --mode (`MODES`).
  * `main()` turns ValueError (CheckpointError included) into a one-line message, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Callable

from eesd_jax import __version__
from eesd_jax.cli_args import (
    UsageError,
    add_dtype_args,
    add_eesd_args,
    add_mesh_args,
    add_model_args,
    add_prompt_args,
    add_sampling_args,
    chain_flags,
    sampling_config,
    validate_eesd,
    validate_exit_file,
    validate_mesh,
)

NAMED_PROMPT_SETS = ("humaneval", "chat")
DEFAULT_BENCH_PROMPTS = 8  # --n for a named prompt set.


# ----------------------------------------------------------------------------- streaming


class TextStreamer:
    """Prints decoded text as tokens arrive.

    Decodes the whole sequence so far and prints only the new suffix, so tokens that
    carry part of a UTF-8 character or leading whitespace come out right. A trailing
    replacement character (an incomplete byte sequence) is held back until completed.
    """

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, new_tokens_per_row: list[list[int]]) -> None:
        self.tokens.extend(new_tokens_per_row[0])
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text

    def finish(self) -> None:
        self._emit(final=True)
        self.out.write("\n")
        self.out.flush()


# ----------------------------------------------------------------------------- modes


def engine_from_args(session, args):
    """engine.eesd_engine from --exit / --exit-layer / --max-draft / --controller / --tree / --tree-stop /
    --tree-width-stop / --tree-width."""
    from eesd_jax import engine

    return engine.eesd_engine(
        session,
        args.exit,
        args.exit_layer,
        *reversed(chain_flags(args)),  # max_draft, controller
        args.tree,
        args.tree_stop,
        args.tree_width_stop,
        tree_width=args.tree_width,
    )


def run_mode(mode: str, session, prompt_ids: list[int], args, on_tokens: Callable | None):
    """One generation of `mode` ("ar", or "eesd" with the engine the EESD flags ask for)."""
    from eesd_jax import engine

    eng = engine_from_args(session, args) if mode == "eesd" else None
    sampling = sampling_config(args)
    return engine.decode(session, [prompt_ids], args.max_new_tokens, eng, sampling, args.seed, on_tokens)


MODES = ("ar", "eesd")


# ----------------------------------------------------------------------------- arguments


def validate_generate(args) -> None:
    """Everything checkable without the model; raises UsageError."""
    if args.prompt == "-":
        args.prompt = sys.stdin.read()
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        sampling_config(args)
    except ValueError as e:
        msg = str(e)
        for field in ("temperature", "top_k", "top_p"):
            msg = msg.replace(field, "--" + field.replace("_", "-"))
        raise UsageError(msg) from None
    if args.model is not None and not pathlib.Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or folder")
    validate_eesd(args)
    validate_mesh(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eesd", description="Early-exiting speculative decoding in JAX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text for one prompt", description="Generate text for one prompt.")
    add_prompt_args(g)
    add_sampling_args(g)
    add_model_args(g)
    add_eesd_args(g)
    add_mesh_args(g)
    g.add_argument(
        "--mode",
        choices=sorted(MODES),
        default=None,
        help="decoding algorithm (default: eesd when a trained exit is given or shipped for the model, else ar)",
    )
    g.add_argument("--compare", action="store_true", help="run AR and EESD on the prompt in one process and compare")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate, validate=validate_generate)

    b = sub.add_parser(
        "bench",
        help="benchmark AR against EESD on a prompt set",
        description="Benchmark AR against EESD on the same prompts, after warm-up.",
    )
    b.add_argument(
        "--prompts",
        default="chat",
        metavar="SOURCE",
        help="humaneval, chat, or a file: .jsonl ('prompt' or a conversation per line), .json (ShareGPT: "
        "every user turn, earlier turns as context), .parquet or a datasets folder (with pyarrow), .txt (a line each)",
    )
    b.add_argument(
        "--split",
        choices=("all", "train", "heldout"),
        default=None,
        help="prompt split (default: all of a file's prompts; for humaneval and chat, heldout: "
        "the prompts self-distillation never trains on)",
    )
    b.add_argument(
        "--n",
        type=int,
        default=None,
        metavar="N",
        help=f"the first N prompts of the split; more than it has is an error "
        f"(default: all of a file's, {DEFAULT_BENCH_PROMPTS} of humaneval or chat)",
    )
    b.add_argument("--max-new-tokens", type=int, default=128, metavar="M")
    b.add_argument("--modes", default="ar,eesd", help="comma-separated modes (default ar,eesd)")
    b.add_argument("--batch", type=int, default=1, metavar="B")
    b.add_argument("--repeats", type=int, default=1, metavar="R", help="timed runs per prompt; medians reported")
    b.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="chat template (default: on for instructions, off for HumanEval completions)",
    )
    add_sampling_args(b)
    add_model_args(b)
    b.add_argument(
        "--random-shape",
        choices=("smollm2", "1b", "8b"),
        default=None,
        help="random weights at a real shape (SmolLM2-135M, LLaMA-3.2-1B, LLaMA-3-8B) instead of --model, "
        "with an untrained exit and random prompt ids of the --prompts count; refused when it would not fit",
    )
    add_eesd_args(b)
    add_mesh_args(b)
    b.add_argument(
        "--by-position",
        action="store_true",
        help="also report acceptance by draft position (one more, traced EESD pass, not timed)",
    )
    b.add_argument("--json", action="store_true", help="print only the final JSON line")
    b.set_defaults(func=cmd_bench, validate=validate_bench)
    add_distill_parsers(sub)
    return parser


def add_distill_parsers(sub) -> None:
    d = sub.add_parser(
        "distill",
        help="self-distill an early exit (data, training, export)",
        description="Generate data with the LLM itself, train the exit, export it as safetensors.",
    )
    d.add_argument(
        "--config",
        default="smollm2",
        metavar="PATH[:ARG]",
        help="ml_collections config: a name in eesd_jax/configs (tiny, smollm2) or a .py file, "
        "with an optional :arg (e.g. smollm2:N=6,draft_vocab=8192)",
    )
    d.add_argument("--workdir", default=None, metavar="DIR", help="data, checkpoints, metrics (default runs/<config>)")
    add_dtype_args(d, default=None)
    add_mesh_args(d)
    d.set_defaults(func=cmd_distill, validate=validate_config)

    e = sub.add_parser("eval-exit", help="top-1 agreement, alpha and tau of a trained exit on held-out prompts")
    e.add_argument("--exit", required=True, metavar="PATH", help="exit .safetensors file")
    e.add_argument(
        "--config", default="smollm2", metavar="PATH[:ARG]", help="config naming the model and eval settings"
    )
    e.add_argument(
        "--prompts",
        default=None,
        metavar="SOURCE",
        help="comma-separated prompt sets (humaneval, chat, a file); default: the config's",
    )
    add_dtype_args(e, default=None)
    add_mesh_args(e)
    e.set_defaults(func=cmd_eval_exit, validate=validate_config)


def validate_config(args) -> None:
    from eesd_jax import configs

    try:
        args.config_dict = configs.load_config(args.config)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise UsageError(f"--config {args.config}: {e}") from None
    validate_mesh(args)
    if hasattr(args, "exit"):
        validate_exit_file(args)
    config = args.config_dict  # --dtype / --mesh go into the config, so that config.json records them.
    if args.dtype is not None:
        config.model.dtype = args.dtype
    if args.mesh is not None:
        config.mesh = args.mesh


def load_teacher(config):
    """The config's teacher LM in config.model.dtype, its params sharded over config.mesh (if any).

    Megatron tensor parallel over 'model', replicated over 'data' (an HF folder read straight onto
    the mesh); every stage then runs on the params' mesh (sharding.mesh_of), rows over 'data'."""
    from eesd_jax import mesh_loading, model, sharding, teacher

    dtype, mesh = config.model.get("dtype", "float32"), sharding.mesh_from_spec(config.get("mesh") or None)
    if config.model.source != "tiny":  # Real weights: an HF folder read slice by slice onto the mesh.
        source = None if config.model.source in ("bundled", "", None) else config.model.source
        return teacher.as_lm(mesh_loading.load_model(source, dtype, mesh))
    lm = teacher.load_lm(config.model)
    if dtype != lm.cfg.dtype:  # The teacher (and the exit, initialized from it) in another dtype.
        cfg, params = model.with_dtype(lm.cfg, lm.params, dtype)
        lm = dataclasses.replace(lm, cfg=cfg, params=params)
    return lm if mesh is None else dataclasses.replace(lm, params=sharding.shard_params(lm.params, mesh))


def cmd_distill(args) -> int:
    from eesd_jax import train

    workdir = args.workdir or str(pathlib.Path("runs") / args.config.replace(":", "_").replace("/", "_"))
    path = train.run_distill(args.config_dict, workdir, lm=load_teacher(args.config_dict))
    written = [path]
    if args.config_dict.exit.joint_layers:  # run_joint lists an exit per N.
        written = json.loads((pathlib.Path(workdir) / "joint.json").read_text()).values()
    for exit_path in written:
        print(f"exit written to {exit_path}")
    return 0


def cmd_eval_exit(args) -> int:
    from eesd_jax import evaluation

    config = args.config_dict
    if args.prompts:
        with config.eval.ignore_type():
            config.eval.sets = tuple(args.prompts.split(","))
    print(json.dumps(evaluation.run_eval(config, args.exit, lm=load_teacher(config))))
    return 0


def validate_bench(args) -> None:
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        raise UsageError(f"--modes must name some of {', '.join(sorted(MODES))}, got {args.modes!r}")
    args.modes = modes
    for flag in ("n", "max_new_tokens", "batch", "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        sampling_config(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    validate_eesd(args)
    validate_mesh(args)
    validate_prompt_set(args)
    if args.random_shape and (args.model or args.exit):
        raise UsageError("--random-shape makes random weights and an untrained exit: drop --model / --exit")
    if args.by_position and args.tree:
        raise UsageError("--by-position traces chain rounds: add --tree 0")


def validate_prompt_set(args) -> None:
    """Resolve --split / --n for the prompt source and load its prompts (args.chosen), before any model."""
    from eesd_jax import prompts

    named = args.prompts in NAMED_PROMPT_SETS
    if not named and not pathlib.Path(args.prompts).exists():
        raise UsageError(f"--prompts {args.prompts}: neither {' nor '.join(NAMED_PROMPT_SETS)} nor an existing file")
    if args.split is None:  # A file is the user's own selection: all of it unless a split is asked for.
        args.split = "heldout" if named else "all"
    if args.n is None and named:
        args.n = DEFAULT_BENCH_PROMPTS
    try:
        args.chosen = prompts.load_prompts(args.prompts, split=args.split, n=args.n)
    except ValueError as e:
        raise UsageError(f"--prompts {args.prompts}: {e}") from None


# ----------------------------------------------------------------------------- commands


def generation_json(session, gen) -> dict:
    stats = {k: v for k, v in gen.summary().items() if k != "per_row"}
    stats["load_seconds"] = round(session.load_seconds, 4)
    text = session.tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
    return {"text": text, "tokens": gen.tokens[0], "mode": gen.mode, "stats": stats}


def cmd_generate(args) -> int:
    from eesd_jax import engine

    session = engine.load_session(args.model, args.mesh, args.dtype)
    prompt_ids = engine.encode_prompt(session, args.prompt, args.chat)
    if args.compare:
        return compare(session, prompt_ids, args)
    if args.mode is None:  # An untrained exit is correct but slower than AR: EESD only with a trained one.
        from eesd_jax import shipped

        args.mode = "eesd" if (args.exit or shipped.default_exit(session.lm)) else "ar"
    streamer = None if args.json else TextStreamer(session.tokenizer)
    gen = run_mode(args.mode, session, prompt_ids, args, streamer)
    if streamer is not None:
        streamer.finish()
        return 0
    print(json.dumps(generation_json(session, gen), ensure_ascii=False))
    return 0


def compare(session, prompt_ids: list[int], args) -> int:
    """AR then EESD on one prompt through bench.run (each after a compile warm-up run); speeds side by side."""
    from eesd_jax import bench, engine

    eng = engine_from_args(session, args)
    if not args.json:
        print("compiling and timing AR and EESD...", file=sys.stderr, flush=True)
    setup = engine.bench_setup(session, eng)
    sampling = sampling_config(args)
    timed = bench.run(setup, [prompt_ids], args.max_new_tokens, sampling=sampling, seed=args.seed, step_costs=False)
    results = {mode: generation_json(session, timed.generations[mode][0]) for mode in ("ar", "eesd")}
    ar, es = results["ar"]["stats"], results["eesd"]["stats"]
    out = {
        **results,
        "speedup": round(es["tokens_per_second"] / max(ar["tokens_per_second"], 1e-9), 3),
        "identical": results["ar"]["tokens"] == results["eesd"]["tokens"],
    }
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for mode in ("ar", "eesd"):
        print(f"--- {mode} ---\n{results[mode]['text']}")
    exit_path = eng.exit_path or "untrained (LLM's last block)"
    e = eng.ecfg
    drafts = (
        f"tree {e.tree}, {e.tree_width} per depth" if e.tree else f"controller {e.controller.kind}, J={e.max_draft}"
    )
    print(f"\nexit: {exit_path}, N={e.exit_layer}, {drafts}")
    print(f"AR   {ar['tokens_per_second']:7.2f} tok/s   ({ar['new_tokens']} tokens)")
    print(
        f"EESD {es['tokens_per_second']:7.2f} tok/s   alpha={es['acceptance_rate']:.2f} "
        f"tau={es['mean_accepted_per_round']:.2f}   speedup {out['speedup']:.2f}x   identical: {out['identical']}"
    )
    return 0


def cmd_bench(args) -> int:
    from eesd_jax import bench, engine

    if args.random_shape:
        print(
            f"bench: random {args.random_shape} weights ({args.dtype}), {len(args.chosen)} random prompts",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            f"bench: {len(args.chosen)} prompts from {args.prompts} (split {args.split})", file=sys.stderr, flush=True
        )
    session = engine.load_session(args.model, args.mesh, args.dtype, args.random_shape)
    if args.random_shape:  # No tokenizer: as many prompts of random ids as the prompt set chose.
        ids = bench.random_prompts(len(args.chosen), session.cfg.vocab_size, args.seed)
    else:
        ids = [
            engine.encode_prompt(session, p.text, p.chat if args.chat is None else args.chat, p.context)
            for p in args.chosen
        ]
    eng = engine_from_args(session, args)

    def progress(mode, gen):
        if not args.json:
            print(f"  {mode}: {gen.new_tokens} tokens, {gen.tokens_per_second:.2f} tok/s", file=sys.stderr, flush=True)

    report = bench.run(
        engine.bench_setup(session, eng),
        ids,
        args.max_new_tokens,
        args.modes,
        args.batch,
        sampling_config(args),
        args.repeats,
        args.seed,
        progress,
        by_position=args.by_position,
    ).report
    source = f"random:{args.random_shape}" if args.random_shape else args.prompts
    report["config"].update(
        prompts=source, split=args.split, exit=eng.exit_path or "untrained", model=session.lm.source
    )
    if not args.json:
        print(bench.format_table(report))
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    # transformers is only our tokenizer; its notices (e.g. "PyTorch was not found") are noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    from eesd_jax import sharding

    sharding.maybe_initialize_distributed()  # Multi-host (TPU pod slices): a no-op in one process.
    with contextlib.ExitStack() as stack:
        if not sharding.is_main_process():  # SPMD: every process runs this; only process 0 prints results.
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            args.validate(args)
            return args.func(args)
        except ValueError as e:  # UsageError, CheckpointError and the library's input checks (any process).
            print(f"eesd {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
