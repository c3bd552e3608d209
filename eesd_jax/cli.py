"""The `eesd` command.

    eesd generate --prompt "Write a short poem about the sea."
    eesd generate --prompt "def fib(n):" --no-chat --max-new-tokens 64 --json

Structure, so that new modes and subcommands are small additions:
  * `build_parser()` declares subcommands; shared option groups are `add_*_args` helpers.
  * `validate_*` functions check arguments before the model is loaded (exit code 2).
  * `load_session(model)` loads weights (as jax arrays, once) and the tokenizer.
  * `MODES` maps a --mode name to a function running one generation.
  * `main()` turns ValueError (CheckpointError included) into a one-line message, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable

from eesd_jax import __version__

DEFAULT_MAX_NEW_TOKENS = 256
NAMED_PROMPT_SETS = ("humaneval", "chat")
DEFAULT_BENCH_PROMPTS = 8  # --n for a named prompt set.


class UsageError(ValueError):
    """Bad command-line input, detected before any model is loaded."""


# ----------------------------------------------------------------------------- model + tokenizer


@dataclasses.dataclass
class Session:
    """A loaded model, its params on device and its tokenizer, shared by all commands."""

    lm: object  # loading.LoadedModel (params left as loaded; use `params`).
    params: dict  # The same params as jax arrays (per-layer list on CPU).
    tokenizer: object  # None for random weights (bench --random-shape): prompts are token ids.
    load_seconds: float
    engine: tuple | None = None  # EESD (config, exit params, split layers, exit path), built on first use.
    mesh: object = None  # jax.sharding.Mesh from --mesh, or None (one device).

    @property
    def cfg(self):
        return self.lm.cfg

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return () if eos is None else (int(eos),)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk (next to the converted params), so that repeated
    `eesd` invocations skip most of the JIT compile. JAX_COMPILATION_CACHE_DIR overrides."""
    import jax

    from eesd_jax import loading

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(loading.cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_session(
    model: str | None, mesh_spec: str | None = None, dtype: str = "float32", random_shape: str | None = None
) -> Session:
    """Load weights from an HF folder / GGUF file (None: the bundled SmolLM2) and the tokenizer, in `dtype`.

    random_shape (a bench.RANDOM_SHAPES name): random weights at that shape instead, no tokenizer.
    """
    import jax
    import jax.numpy as jnp

    from eesd_jax import bench, loading, sharding

    enable_compilation_cache()
    t0 = time.perf_counter()
    if random_shape:
        cfg, params = bench.random_model(random_shape, dtype)
        lm = loading.LoadedModel(cfg, params, fingerprint=f"random:{random_shape}", source=f"random:{random_shape}")
    else:
        lm = loading.load_model(model, dtype)
    params = bench.decode_layout(jax.tree.map(jnp.asarray, lm.params))
    mesh = sharding.mesh_from_spec(mesh_spec)
    if mesh is not None:  # Megatron tensor parallel over 'model', batch over 'data'.
        params = sharding.shard_params(params, mesh)
    tokenizer = None if random_shape else lm.tokenizer()
    return Session(lm=lm, params=params, tokenizer=tokenizer, load_seconds=time.perf_counter() - t0, mesh=mesh)


def encode_prompt(session: Session, text: str, chat: bool | None) -> list[int]:
    """Token ids of one prompt; chat=None applies the chat template when the tokenizer has one."""
    from eesd_jax import prompts

    use_chat = session.has_chat_template if chat is None else chat
    return prompts.encode(session.tokenizer, text, use_chat)


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


def run_ar(session: Session, prompt_ids: list[int], args, on_tokens: Callable | None):
    """Vanilla autoregressive decoding (the baseline)."""
    from eesd_jax import generate

    return generate.generate_ar(
        session.cfg,
        session.params,
        [prompt_ids],
        args.max_new_tokens,
        sampling=sampling_config(args),
        eos_ids=session.eos_ids,
        seed=args.seed,
        on_tokens=on_tokens,
        mesh=session.mesh,
    )


def eesd_engine(session: Session, args):
    """(EESDConfig, exit params) from --exit / --exit-layer / --controller / --max-draft (built once)."""
    from eesd_jax import eesd, exits, shipped

    if getattr(session, "engine", None) is None:
        exit_path = args.exit or shipped.default_exit(session.lm, args.exit_layer)
        if exit_path:
            exit_cfg, exit_params = exits.load_exit(exit_path, session.cfg, session.lm.fingerprint, args.exit_layer)
        else:  # Untrained: the LLM's last block on top of layer N. Correct, but drafts poorly.
            exit_cfg = exits.ExitConfig(args.exit_layer or max(1, session.cfg.n_layers // 4))
            exit_params = exits.init_exit(session.cfg, session.params, exit_cfg)
        if session.mesh is not None:
            from eesd_jax import sharding

            exit_params = sharding.shard_exit_params(exit_params, session.mesh)
        ecfg = eesd.config_for_exit(exit_cfg, exit_path, args.max_draft, args.controller)
        ecfg.validate(session.cfg)
        split = eesd.split_params(session.params, ecfg.exit_layer, ecfg.context_layer)
        session.engine = (ecfg, exit_params, split, exit_path)
    return session.engine


def run_eesd(session: Session, prompt_ids: list[int], args, on_tokens: Callable | None):
    """Early-exiting speculative decoding: same tokens as AR (greedy) or the same distribution."""
    from eesd_jax import generate

    ecfg, exit_params, split, _ = eesd_engine(session, args)
    return generate.generate_eesd(
        session.cfg,
        session.params,
        exit_params,
        ecfg,
        [prompt_ids],
        args.max_new_tokens,
        sampling=sampling_config(args),
        eos_ids=session.eos_ids,
        seed=args.seed,
        on_tokens=on_tokens,
        split=split,
        mesh=session.mesh,
    )


# Each mode: (session, prompt ids, parsed args, on_tokens or None) -> generate.Generation.
MODES: dict[str, Callable] = {"ar": run_ar, "eesd": run_eesd}


# ----------------------------------------------------------------------------- arguments


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        default=None,
        metavar="data=D,model=M",
        help="shard over a device mesh: rows over 'data', tensor parallel over 'model' (default: one device)",
    )


def validate_mesh(args) -> None:
    if args.mesh is not None:
        from eesd_jax import sharding

        try:
            sharding.parse_mesh(args.mesh)
        except ValueError as e:
            raise UsageError(f"--mesh: {e}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="Hugging Face folder (config.json + safetensors) or .gguf file; default: bundled SmolLM2-135M-Instruct",
    )
    add_dtype_args(p)


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    from eesd_jax.model import DTYPES

    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="params, activations and KV caches (logits and acceptance stay float32); default float32, "
        "bfloat16 on GPU/TPU",
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass; 1.0 = off")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="PRNG seed for sampling (default 0)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt; '-' reads it from stdin")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the tokenizer's chat template (default: on when the tokenizer has one)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"generate at most N tokens (default {DEFAULT_MAX_NEW_TOKENS}); stops earlier at EOS",
    )


def add_eesd_args(p: argparse.ArgumentParser) -> None:
    from eesd_jax import control

    g = p.add_argument_group("EESD")
    g.add_argument(
        "--exit",
        default=None,
        metavar="PATH",
        help="trained exit (.safetensors); default: the shipped exit for the bundled model, "
        "else an untrained exit (correct but slow)",
    )
    g.add_argument(
        "--exit-layer",
        type=int,
        default=None,
        metavar="N",
        help="exit after the first N layers: the best shipped exit there (or --exit's, which must match), "
        "else an untrained one; default: the best shipped exit's N, or L/4 untrained",
    )
    g.add_argument(
        "--controller",
        default=control.ControllerConfig.kind,
        metavar="KIND[:KNOB=V,...]",
        help=f"draft-stop policy and its knobs, e.g. confidence:threshold=0.4 ({', '.join(control.KINDS)}; "
        f"default {control.ControllerConfig.kind})",
    )
    g.add_argument("--max-draft", type=int, default=6, metavar="K", help="draft tokens per round at most (default 6)")


def validate_eesd(args) -> None:
    from eesd_jax import control

    try:
        control.from_spec(args.controller)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--controller {args.controller}: {e}") from None
    if args.max_draft < 1:
        raise UsageError(f"--max-draft must be >= 1, got {args.max_draft}")
    if args.exit_layer is not None and args.exit_layer < 1:
        raise UsageError(f"--exit-layer must be >= 1, got {args.exit_layer}")
    validate_exit_file(args)


def validate_exit_file(args) -> None:
    """--exit names a whole safetensors file (a truncated one is reported here, before the model loads)."""
    from eesd_jax import loading

    if args.exit is not None:
        if not pathlib.Path(args.exit).is_file():
            raise UsageError(f"--exit {args.exit}: no such file")
        loading.check_safetensors(args.exit)


def sampling_config(args):
    from eesd_jax.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


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
        help="humaneval, chat, or a file (JSONL with a 'prompt' field, or one prompt per line)",
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
    add_dtype_args(d)
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
    e.set_defaults(func=cmd_eval_exit, validate=validate_config)


def validate_config(args) -> None:
    from eesd_jax import configs

    try:
        args.config_dict = configs.load_config(args.config)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise UsageError(f"--config {args.config}: {e}") from None
    if hasattr(args, "exit"):
        validate_exit_file(args)


def cmd_distill(args) -> int:
    from eesd_jax import model, teacher, train

    workdir = args.workdir or str(pathlib.Path("runs") / args.config.replace(":", "_").replace("/", "_"))
    lm = None  # float32: run_distill loads the teacher itself.
    if args.dtype != "float32":  # The teacher (and the exit, initialized from it) in another dtype.
        lm = teacher.load_lm(args.config_dict.model)
        cfg, params = model.with_dtype(lm.cfg, lm.params, args.dtype)
        lm = dataclasses.replace(lm, cfg=cfg, params=params)
    path = train.run_distill(args.config_dict, workdir, lm=lm)
    written = [path]
    if args.config_dict.exit.joint_layers:  # run_joint lists an exit per N.
        written = json.loads((pathlib.Path(workdir) / "joint.json").read_text()).values()
    for exit_path in written:
        print(f"exit written to {exit_path}")
    return 0


def cmd_eval_exit(args) -> int:
    from eesd_jax import train

    config = args.config_dict
    if args.prompts:
        with config.eval.ignore_type():
            config.eval.sets = tuple(args.prompts.split(","))
    print(json.dumps(train.run_eval(config, args.exit)))
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


def validate_prompt_set(args) -> None:
    """Resolve --split / --n for the prompt source and load its prompts (args.chosen), before any model."""
    from eesd_jax import prompts

    named = args.prompts in NAMED_PROMPT_SETS
    if not named and not pathlib.Path(args.prompts).is_file():
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


def generation_json(session: Session, gen) -> dict:
    stats = {k: v for k, v in gen.summary().items() if k != "per_row"}
    stats["load_seconds"] = round(session.load_seconds, 4)
    text = session.tokenizer.decode(gen.tokens[0], skip_special_tokens=True)
    return {"text": text, "tokens": gen.tokens[0], "mode": gen.mode, "stats": stats}


def cmd_generate(args) -> int:
    session = load_session(args.model, args.mesh, args.dtype)
    prompt_ids = encode_prompt(session, args.prompt, args.chat)
    if args.compare:
        return compare(session, prompt_ids, args)
    if args.mode is None:  # An untrained exit is correct but slower than AR: EESD only with a trained one.
        from eesd_jax import shipped

        args.mode = "eesd" if (args.exit or shipped.default_exit(session.lm)) else "ar"
    streamer = None if args.json else TextStreamer(session.tokenizer)
    gen = MODES[args.mode](session, prompt_ids, args, streamer)
    if streamer is not None:
        streamer.finish()
        return 0
    print(json.dumps(generation_json(session, gen), ensure_ascii=False))
    return 0


def compare(session: Session, prompt_ids: list[int], args) -> int:
    """AR then EESD on one prompt, each after a compile warm-up run; speeds side by side."""
    results = {}
    for mode in ("ar", "eesd"):
        if not args.json:
            print(f"[{mode}] compiling...", file=sys.stderr, flush=True)
        MODES[mode](session, prompt_ids, args, None)  # Warm-up: compile outside the timing.
        streamer = None if args.json else TextStreamer(session.tokenizer)
        if streamer is not None:
            print(f"--- {mode} ---", flush=True)
        gen = MODES[mode](session, prompt_ids, args, streamer)
        if streamer is not None:
            streamer.finish()
        results[mode] = generation_json(session, gen)
    ar, es = results["ar"]["stats"], results["eesd"]["stats"]
    out = {
        **results,
        "speedup": round(es["tokens_per_second"] / max(ar["tokens_per_second"], 1e-9), 3),
        "identical": results["ar"]["tokens"] == results["eesd"]["tokens"],
    }
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    exit_path = session.engine[3] or "untrained (LLM's last block)"
    print(f"\nexit: {exit_path}, N={session.engine[0].exit_layer}, controller {args.controller}, K={args.max_draft}")
    print(f"AR   {ar['tokens_per_second']:7.2f} tok/s   ({ar['new_tokens']} tokens)")
    print(
        f"EESD {es['tokens_per_second']:7.2f} tok/s   alpha={es['acceptance_rate']:.2f} "
        f"tau={es['mean_accepted_per_round']:.2f}   speedup {out['speedup']:.2f}x   identical: {out['identical']}"
    )
    return 0


def cmd_bench(args) -> int:
    from eesd_jax import bench

    if args.random_shape:
        print(f"bench: random {args.random_shape} weights ({args.dtype}), {len(args.chosen)} random prompts",
              file=sys.stderr, flush=True)  # fmt: skip
    else:
        print(
            f"bench: {len(args.chosen)} prompts from {args.prompts} (split {args.split})", file=sys.stderr, flush=True
        )
    session = load_session(args.model, args.mesh, args.dtype, args.random_shape)
    if args.random_shape:  # No tokenizer: as many prompts of random ids as the prompt set chose.
        ids = bench.random_prompts(len(args.chosen), session.cfg.vocab_size, args.seed)
    else:
        ids = [encode_prompt(session, p.text, p.chat if args.chat is None else args.chat) for p in args.chosen]
    ecfg, exit_params, _, exit_path = eesd_engine(session, args)
    setup = bench.BenchSetup(session.cfg, session.params, exit_params, ecfg, session.eos_ids, session.mesh)

    def progress(mode, gen):
        if not args.json:
            print(f"  {mode}: {gen.new_tokens} tokens, {gen.tokens_per_second:.2f} tok/s", file=sys.stderr, flush=True)

    report = bench.run(
        setup,
        ids,
        args.max_new_tokens,
        args.modes,
        args.batch,
        sampling_config(args),
        args.repeats,
        args.seed,
        progress,
        by_position=args.by_position,
    )
    source = f"random:{args.random_shape}" if args.random_shape else args.prompts
    report["config"].update(prompts=source, split=args.split, exit=exit_path or "untrained", model=session.lm.source)
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
    try:
        args.validate(args)
        return args.func(args)
    except ValueError as e:  # UsageError, CheckpointError and the library's input checks.
        print(f"eesd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
