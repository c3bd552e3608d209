"""The `eesd` command's shared option groups (`add_*_args`) and their checks (`validate_*`).

Each check runs before any model is loaded and raises UsageError (exit code 2 in cli.main).
"""

from __future__ import annotations

import argparse
import pathlib

DEFAULT_MAX_NEW_TOKENS = 256


class UsageError(ValueError):
    """Bad command-line input, detected before any model is loaded."""


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


def add_dtype_args(p: argparse.ArgumentParser, default: str | None = "float32") -> None:
    """--dtype; default None: the config's model.dtype (distill, eval-exit)."""
    from eesd_jax.model import DTYPES

    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=default,
        help="params, activations and KV caches (logits and acceptance stay float32); "
        f"default {default or 'the config model.dtype, float32'}, bfloat16 on GPU/TPU",
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


TREE = (3, 3)  # The default draft: a tree of 3 nodes, 3 per depth (the study's fastest on CPU).
MAX_DRAFT = 6  # A chain's default draft cap (--tree 0).


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
        "--tree",
        type=int,
        default=TREE[0],
        metavar="N",
        help=f"draft a tree of N nodes per round, --tree-width per depth (a multiple of it); 0 = a chain "
        f"(--controller, --max-draft). Default {TREE[0]}: one depth of the exit's {TREE[1]} likeliest tokens, "
        "the fastest measured on CPU",
    )
    g.add_argument(
        "--tree-width",
        type=int,
        default=TREE[1],
        metavar="W",
        help=f"with --tree: nodes per depth, the W children likeliest by the exit (default {TREE[1]})",
    )
    g.add_argument(
        "--controller",
        default=None,
        metavar="KIND[:KNOB=V,...]",
        help=f"with --tree 0 (a chain): draft-stop policy and its knobs, e.g. confidence:threshold=0.4 "
        f"({', '.join(control.KINDS)}; default {control.ControllerConfig.kind})",
    )
    g.add_argument(
        "--max-draft",
        type=int,
        default=None,
        metavar="J",
        help=f"with --tree 0 (a chain): draft tokens per round at most (default {MAX_DRAFT})",
    )
    g.add_argument(
        "--tree-stop",
        type=float,
        default=0.0,
        metavar="G",
        help="with --tree: grow a depth only while the exit's expected accepted drafts from it (calibrated "
        "per row) reach G, so each round picks its depth; about a depth's cost in AR steps, e.g. 0.25 "
        "(experiments/round_costs.py); 0 = every depth every round (default)",
    )
    g.add_argument(
        "--tree-width-stop",
        type=float,
        default=0.0,
        metavar="G",
        help="with --tree: keep a depth's next-ranked node (up to --tree-width) only while its expected "
        "accepted drafts, from each row's record of which ranks the LLM accepts, reach G, so each round picks "
        "its width; about a node's verification cost per depth in AR steps (costs.width_cost); 0 = all "
        "--tree-width per depth (default)",
    )


def validate_eesd(args) -> None:
    """Checks the EESD flags (without changing them: a chain's --controller / --max-draft stay None
    when not given, `chain_flags` fills them)."""
    from eesd_jax import control

    given = [f for f, v in (("--controller", args.controller), ("--max-draft", args.max_draft)) if v is not None]
    if args.tree and given:
        raise UsageError(
            f"{' and '.join(given)} shape a chain's drafts, and --tree {args.tree} drafts a tree: add --tree 0"
        )
    controller, max_draft = chain_flags(args)
    try:
        control.from_spec(controller)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--controller {controller}: {e}") from None
    if max_draft < 1:
        raise UsageError(f"--max-draft must be >= 1, got {max_draft}")
    if args.tree_width < 1:
        raise UsageError(f"--tree-width must be >= 1, got {args.tree_width}")
    if args.tree < 0 or args.tree % args.tree_width:
        raise UsageError(f"--tree must be 0 or a positive multiple of --tree-width {args.tree_width}, got {args.tree}")
    if args.tree_stop < 0 or (args.tree_stop and not args.tree):
        raise UsageError(f"--tree-stop must be >= 0 and needs --tree, got {args.tree_stop}")
    if args.tree_width_stop < 0 or (args.tree_width_stop and not args.tree):
        raise UsageError(f"--tree-width-stop must be >= 0 and needs --tree, got {args.tree_width_stop}")
    if args.exit_layer is not None and args.exit_layer < 1:
        raise UsageError(f"--exit-layer must be >= 1, got {args.exit_layer}")
    validate_exit_file(args)


def chain_flags(args) -> tuple[str, int]:
    """(--controller, --max-draft) with a chain's defaults where not given."""
    from eesd_jax import control

    controller = control.ControllerConfig.kind if args.controller is None else args.controller
    return controller, MAX_DRAFT if args.max_draft is None else args.max_draft


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
