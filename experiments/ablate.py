"""Ablation studies, one command each: JSON (with provenance), a markdown table and a plot.

  python experiments/ablate.py --study policies                    # as reported: experiments/configs/policies.py
  python experiments/ablate.py --study depth --config tiny          # seconds
  python experiments/ablate.py --study joint --config tiny          # two exits trained together
  python experiments/ablate.py --study policies --config smollm2 --set policies.kinds=fixed+beta-ts --n 4

`--study NAME` alone runs the study as reported: experiments/configs/NAME.py names the model
config and the knobs that differ from study_config's defaults. `--config` picks another model
config and starts from the defaults. Results go to experiments/results/NAME/<config>.{json,md,png}.

Every row is eesd_jax.bench.run: AR and EESD in one process, on the same held-out prompts
(chat + HumanEval), greedy, batch 1, after warm-up: speedup, alpha, tau, mean draft length.
Every row must give AR's output (bench's exactness policy: identical in float32 on CPU);
a row that does not stops the study with NotLossless.

Studies (knobs: study_config, then the study's config file, then --set key=value and the flags):
  policies    every registered draft-stop policy, tuned then reported held out: each knob
              setting in policies.grid is timed (EESD against AR, both on the same prompts) on
              the tuning prompts, the exit's distillation-validation prompts, which it never
              trained on and which are disjoint from the held-out sets; the fastest is then
              benched on the held-out prompts. Plot: held-out speedup against alpha.
              Finished rows are kept in OUT.rows.jsonl: the same command resumes after a stop.
  components  the EESD paper's parts one at a time, each against the paper's full method
              (self-distilled exit, beta-ts, layer-N reuse, bucketed verification) at the
              same N and K: an untrained exit, fixed K, verification that recomputes layers
              [0, N) (EESDConfig.recompute_lower), verification always over K + 1.
  depth       an N x K grid with the `fixed` controller (every round drafts K, so the round's
              measured parts apply exactly): measured speedup against the one predicted from
              eesd_jax.costs' part costs (round_costs.py's) and the measured tau. The exit is the trained one at its
              N, an untrained one (same draft head rows) at every other N.
  joint       multi-exit training (COST-EFF): exits at joint.layers trained in one run with the
              config's recipe (train.run_joint: one data preparation, the same batches), each
              benched held out: the exit a request chooses (`eesd generate --exit-layer N`).
The trained exit: --exit, else the one shipped for the model, else (tiny) one distilled here
with the config's recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import statistics
import tempfile

import ml_collections
import numpy as np

from eesd_jax import bench, control, costs, distill_data, eesd, exits, model, provenance, shipped, teacher, train
from eesd_jax.configs import apply_overrides, load_config

RESULTS = pathlib.Path(__file__).parent / "results"
STUDY_CONFIGS = pathlib.Path(__file__).parent / "configs"


class NotLossless(RuntimeError):
    """EESD output left AR's beyond bench's exactness policy: a bug, never a result."""


def study_config(model_config: str) -> ml_collections.ConfigDict:
    """The studies' knobs; `tiny` shrinks them to run in seconds."""
    tiny = model_config.split(":")[0] == "tiny"
    c = ml_collections.ConfigDict()
    c.n_per_set = 1 if tiny else 2  # Held-out prompts per set (chat, humaneval).
    c.max_new_tokens = 16 if tiny else 64
    c.max_draft = 3 if tiny else 6  # K.
    # Prompts keep their last max_prompt_tokens tokens: long ones then share one compiled cache
    # size (decoding.make_request buckets by 128) beside max_new_tokens and K + 1.
    c.max_prompt_tokens = 96 if tiny else 176
    c.repeats = 1  # Runs per prompt and mode (median).
    c.seed = 0
    c.policies = ml_collections.ConfigDict({"kinds": control.KINDS})
    c.policies.tune_n = 2 if tiny else 8  # Tuning prompts (distill_data.validation_prompts).
    # Knob settings tried per policy ("knob=value"); a policy without an entry runs at its defaults.
    c.policies.grid = ml_collections.ConfigDict(
        {
            "confidence": ("threshold=0.3", "threshold=0.4", "threshold=0.5", "threshold=0.6", "threshold=0.7"),
            "beta-ts": ("break_even=0.0", "break_even=0.3", "break_even=0.5"),
            "calibration-ts": ("break_even=0.0", "break_even=0.3", "break_even=0.5"),
            "entropy": ("max_entropy=1.0", "max_entropy=2.0", "max_entropy=3.0"),
            "margin": ("min_margin=0.1", "min_margin=0.3", "min_margin=0.5"),
            "patience": ("patience=1", "patience=2", "patience=3"),
            "saturation": ("saturation=0.8", "saturation=0.9", "saturation=0.95"),
            "budget": ("budget=1.0", "budget=2.0", "budget=3.0"),
            "gate": ("gate_threshold=0.4", "gate_threshold=0.5", "gate_threshold=0.6"),
            "expected-gain": ("draft_cost=0.15", "draft_cost=0.24", "draft_cost=0.35"),
        }
    )
    if tiny:  # Two settings each: the test runs every policy in seconds.
        for kind, specs in c.policies.grid.items():
            c.policies.grid[kind] = specs[:2]
    c.components = ml_collections.ConfigDict({"controller": "beta-ts"})  # The paper's controller.
    c.depth = ml_collections.ConfigDict()
    # The shipped exit's N, and L - 1, where an untrained exit (the LLM's last block) drafts almost exactly.
    c.depth.layers = (1, 2) if tiny else (2, 29)
    c.depth.max_drafts = (1, 3) if tiny else (1, 4)
    c.depth.cache_len = 128 if tiny else 512  # Part costs are timed at position cache_len // 2.
    c.depth.cost_repeats = 5 if tiny else 15
    c.joint = ml_collections.ConfigDict()
    c.joint.layers = (1, 2) if tiny else (2, 4)  # Exits trained together (train.run_joint), chosen per request.
    c.joint.controller = "confidence"
    c.joint.workdir = ""  # Where the joint run trains (and resumes); "" = a temporary folder.
    return c


def reported(study: str) -> ml_collections.ConfigDict:
    """experiments/configs/<study>.py's get_config(): the model config and knobs the reported run used."""
    path = STUDY_CONFIGS / f"{study}.py"
    spec = importlib.util.spec_from_file_location(f"study_config_{study}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def merge(c: ml_collections.ConfigDict, knobs, where: str = "") -> ml_collections.ConfigDict:
    """Set `knobs` (nested) on `c` in place; a knob study_config does not have is an error."""
    for key, value in knobs.items():
        if key not in c:
            raise ValueError(f"study knob {where}{key} is not one of study_config's")
        if isinstance(c[key], ml_collections.ConfigDict):
            merge(c[key], value, f"{where}{key}.")
        else:
            with c.ignore_type():
                c[key] = value
    return c


@dataclasses.dataclass
class Setup:
    lm: teacher.LM  # params in model.decode_layout.
    exit_cfg: exits.ExitConfig  # The trained exit's.
    exit_params: dict
    exit_name: str
    exit_path: str  # Where the exit was loaded from; what was fitted for it sits beside it (control.for_exit).
    ids: list[list[int]]  # Held-out prompts' token ids.
    tune_ids: list[list[int]]  # Tuning prompts' token ids (policies study).
    c: ml_collections.ConfigDict
    rows_file: pathlib.Path | None = None  # Finished rows, one JSON line each (policies study).
    config: ml_collections.ConfigDict | None = None  # The model config: its recipe trains the joint study's exits.

    def untrained(self, layer: int, **fields) -> dict:
        """An untrained exit after `layer` (the LLM's last block) with the trained one's head rows."""
        ecfg = dataclasses.replace(self.exit_cfg, layer=layer, **fields)
        return exits.init_exit(self.lm.cfg, self.lm.params, ecfg, self.exit_params.get("vocab"))

    def run(self, exit_params: dict, ecfg: eesd.EESDConfig, ids, modes=("ar", "eesd"), step_costs=True) -> dict:
        # Every controller setting is a new compiled loop: drop the earlier ones when they near
        # the kernel's memory-map limit.
        bench.free_executables_near_map_limit()
        setup = bench.BenchSetup(self.lm.cfg, self.lm.params, exit_params, ecfg, self.lm.eos_ids)
        return bench.run(
            setup, ids, self.c.max_new_tokens, modes, repeats=self.c.repeats, seed=self.c.seed, step_costs=step_costs
        ).report

    def bench(self, label: str, exit_params: dict, ecfg: eesd.EESDConfig) -> dict:
        """bench.run's report for one EESD configuration; NotLossless if its output left AR's."""
        r = self.run(exit_params, ecfg, self.ids)
        if not r["exactness"]["within_policy"]:
            raise NotLossless(f"{label}: EESD output differs from AR: {r['mismatches']}")
        e = r["modes"]["eesd"]
        print(f"{label}: speedup {r['speedup']:.3f}x, alpha {e['acceptance_rate']:.3f}", flush=True)
        return {
            "speedup": r["speedup"],
            "median_speedup": r["median_speedup"],
            "identical": r["identical"],
            "alpha": e["acceptance_rate"],
            "tau": e["mean_accepted_per_round"],
            "mean_draft": e["mean_draft_length"],
            "ar_tok_s": r["modes"]["ar"]["tokens_per_second"],
            "eesd_tok_s": e["tokens_per_second"],
            "cost_ratio": r["cost_ratio"],
        }

    def ecfg(self, layer: int | None = None, controller: str = "beta-ts", **fields) -> eesd.EESDConfig:
        """EESD at N = `layer` (default the exit's) and K; `controller`: a control.from_spec spec."""
        ecfg = eesd.config_for_exit(self.exit_cfg, self.exit_path, self.c.max_draft, controller)
        return dataclasses.replace(ecfg, exit_layer=layer or ecfg.exit_layer, **fields)


# ----------------------------------------------------------------------------- studies


def tune(s: Setup, kind: str) -> list[dict]:
    """Each of `kind`'s grid settings timed on the tuning prompts against AR timed there just before.

    Speedup here is the ratio of the per-prompt median tokens/s (bench.run's median_speedup),
    so that --repeats R > 1 damps run-to-run noise in the choice."""
    ar = s.run(s.exit_params, s.ecfg(controller=kind), s.tune_ids, ("ar",))["modes"]["ar"]
    trials = []
    for spec in [f"{kind}:{knob}" for knob in s.c.policies.grid.get(kind, ())] or [kind]:
        e = s.run(s.exit_params, s.ecfg(controller=spec), s.tune_ids, ("eesd",), step_costs=False)["modes"]["eesd"]
        speedup = round(e["median_tokens_per_second"] / ar["median_tokens_per_second"], 3)
        trials.append(
            {
                "controller": spec,
                "speedup": speedup,
                "alpha": e["acceptance_rate"],
                "tau": e["mean_accepted_per_round"],
                "mean_draft": e["mean_draft_length"],
            }
        )
        print(f"tune {spec}: speedup {speedup:.3f}x, alpha {e['acceptance_rate']:.3f}", flush=True)
    return trials


def policies(s: Setup) -> dict:
    """Every policy at its fastest grid setting on the tuning prompts, benched on the held-out ones.

    Each finished row is appended to s.rows_file at once (an hour's study here); a rerun with the
    same settings takes the rows it finds there instead of measuring them again."""
    base = {"settings": s.c.to_dict(), "exit": s.exit_name}
    del base["settings"]["policies"]["kinds"]  # A rerun may add or drop policies.

    def key(kind: str) -> dict:  # As JSON reads it back. The gate's row also depends on the exit's fitted weights.
        fitted = {"fitted": s.ecfg(controller=kind).controller.gate_weights} if kind == "gate" else {}
        return json.loads(json.dumps({**base, **fitted}))

    done = {}
    if s.rows_file and s.rows_file.exists():
        for line in s.rows_file.read_text().splitlines():
            saved = json.loads(line)
            if saved["key"] == key(saved["row"]["policy"]):
                done[saved["row"]["policy"]] = saved["row"]
    rows = []
    for kind in s.c.policies.kinds:
        if kind in done:
            print(f"{kind}: the row in {s.rows_file}", flush=True)
            rows.append(done[kind])
            continue
        trials = tune(s, kind)
        best = max(trials, key=lambda t: t["speedup"])
        rows.append(
            {
                "policy": kind,
                "tuned": best["controller"],
                "tune_speedup": best["speedup"],
                **s.bench(best["controller"], s.exit_params, s.ecfg(controller=best["controller"])),
                "trials": trials,
            }
        )
        if s.rows_file:
            with s.rows_file.open("a") as f:
                f.write(json.dumps({"key": key(kind), "row": rows[-1]}) + "\n")
    return {"rows": rows, "tuned_on": f"{len(s.tune_ids)} tuning prompts (distill_data.validation_prompts)"}


def components(s: Setup) -> dict:
    """The paper's method, then each of its parts replaced by the alternative, all else equal."""
    kind, K = s.c.components.controller, s.c.max_draft
    rows = [
        ("EESD (paper)", "all parts", s.exit_params, s.ecfg(controller=kind)),
        ("untrained exit", "self-distillation", s.untrained(s.exit_cfg.layer), s.ecfg(controller=kind)),
        (f"fixed K={K}", "Thompson sampling", s.exit_params, s.ecfg(controller="fixed")),
        ("recompute layers [0, N)", "layer-N reuse", s.exit_params, s.ecfg(controller=kind, recompute_lower=True)),
        (
            f"verify always K+1={K + 1}",
            "bucketed verification",
            s.exit_params,
            s.ecfg(controller=kind, buckets=(K + 1,)),
        ),
    ]
    out = [{"variant": v, "tests": t, "controller": e.controller.kind, **s.bench(v, p, e)} for v, t, p, e in rows]
    for r in out:
        r["vs_paper"] = round(r["speedup"] / out[0]["speedup"], 3)
    return {"rows": out}


def depth(s: Setup) -> dict:
    """N x K with `fixed`: measured speedup against tau * AR step / the round's measured parts."""
    d, cfg = s.c.depth, s.lm.cfg
    draft_vocab = len(s.exit_params["vocab"]) if "vocab" in s.exit_params else 0
    tokens = sorted({k + 1 for k in d.max_drafts})
    ms = costs.measure(cfg, s.lm.params, d.layers, tokens, draft_vocab, d.cache_len, d.cost_repeats)
    rows = []
    for n in d.layers:
        trained = n == s.exit_cfg.layer
        exit_params = s.exit_params if trained else s.untrained(n, context_layer=0)
        for k in d.max_drafts:
            # An untrained exit drafts from layer N alone: a context layer is part of what training taught.
            context = {} if trained else {"context_layer": 0}
            ecfg = dataclasses.replace(s.ecfg(n, "fixed"), max_draft=k, **context)
            r = s.bench(f"N={n} K={k}", exit_params, ecfg)
            # Prefill and the budget's last short rounds are outside the model: it is decode-only.
            predicted = r["tau"] * ms["ar_step"] / costs.round_ms(ms, n, k)
            rows.append(
                {
                    "N": n,
                    "K": k,
                    "exit": "trained" if trained else "untrained",
                    **r,
                    "round_ms": round(costs.round_ms(ms, n, k), 2),
                    "predicted": round(predicted, 3),
                }
            )
    ratio = round(float(np.median([r["predicted"] / r["speedup"] for r in rows])), 3)
    return {"rows": rows, "part_ms": {k: round(v, 3) for k, v in ms.items()}, "predicted_over_measured_median": ratio}


def joint(s: Setup) -> dict:
    """Multi-exit training (COST-EFF): exits at joint.layers from one run (config's recipe, one data
    preparation), each benched held out with joint.controller: the exit a request would choose."""
    j = s.c.joint
    config = ml_collections.ConfigDict(s.config.to_dict())
    config.exit.layer, config.exit.joint_layers = int(j.layers[0]), tuple(j.layers[1:])
    with tempfile.TemporaryDirectory() as tmp:
        # Training loads its own teacher: s.lm's params are in the decode layout (model.decode_layout).
        paths = train.run_joint(config, pathlib.Path(j.workdir or tmp), progress=False)
        rows = []
        for n, path in paths.items():
            exit_cfg, exit_params = exits.load_exit(path, s.lm.cfg, s.lm.fingerprint)
            ecfg = eesd.config_for_exit(exit_cfg, path, s.c.max_draft, j.controller)
            val_top1 = shipped.validation_top1(path)
            rows.append(
                {
                    "N": n,
                    "val_top1": None if val_top1 < 0 else round(val_top1, 3),
                    **s.bench(f"joint N={n}", exit_params, ecfg),
                }
            )
    return {"rows": rows, "recipe": config.name, "train_steps": int(config.train.steps)}


STUDIES = {"policies": policies, "components": components, "depth": depth, "joint": joint}


# ----------------------------------------------------------------------------- tables and plots


def markdown(study: str, rows: list[dict]) -> str:
    cols = {
        "policies": ["policy", "tuned", "tune_speedup"],
        "components": ["variant", "tests", "controller", "vs_paper"],
        "depth": ["N", "K", "exit", "round_ms", "predicted"],
        "joint": ["N", "val_top1"],
    }[study] + ["speedup", "identical", "alpha", "tau", "mean_draft", "cost_ratio", "ar_tok_s", "eesd_tok_s"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    head = "| " + " | ".join(c.replace("_", " ") for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(fmt(r[c]) for c in cols) + " |\n" for r in rows)


def plot(study: str, rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display on CI or TPU VMs.
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if study == "components":
        names = [r["variant"] for r in rows]
        ax.barh(names[::-1], [r["speedup"] for r in rows][::-1], color="tab:blue")
        for i, r in enumerate(rows[::-1]):
            ax.annotate(f" α {r['alpha']:.2f}, τ {r['tau']:.2f}", (r["speedup"], i), va="center", fontsize=8)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="speedup EESD / AR", title="the paper's parts, one at a time")
    else:
        x, label = ("predicted", "predicted from part costs and τ") if study == "depth" else ("alpha", "acceptance α")
        for r in rows:
            ax.scatter(r[x], r["speedup"])
            name = {"depth": f"N={r.get('N')} K={r.get('K')}", "joint": f"N={r.get('N')}"}.get(study, r.get("policy"))
            ax.annotate(name, (r[x], r["speedup"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if study == "depth":
            lim = [min(min(r[x], r["speedup"]) for r in rows) * 0.9, max(max(r[x], r["speedup"]) for r in rows) * 1.1]
            ax.plot(lim, lim, color="grey", lw=0.8, ls=":", label="measured = predicted")
            ax.legend(fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel=label, ylabel="measured speedup EESD / AR", title=f"{study} (greedy, batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def trained_exit(config, lm: teacher.LM, path: str | None, workdir: str) -> tuple[exits.ExitConfig, dict, str, str]:
    """(exit config, params, name, path): --exit, else the shipped exit, else one distilled now (tiny: seconds)."""
    if path is None and (path := shipped.default_exit(lm)) is None:
        path = str(train.run_distill(config, workdir, lm=lm, progress=False))
        name = f"distilled here with {config.name} (train.steps={config.train.steps})"
    else:
        name = pathlib.Path(path).name
    exit_cfg, exit_params = exits.load_exit(path, lm.cfg, lm.fingerprint)
    return exit_cfg, exit_params, name, str(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", choices=tuple(STUDIES), required=True)
    ap.add_argument(
        "--config",
        help="config naming the LLM and its exit (tiny: in seconds); default: the study's config file's, with its knobs",
    )
    ap.add_argument("--exit", default=None, help="the trained exit (.safetensors); default: see above")
    ap.add_argument("--n", type=int, help="held-out prompts per set (chat, humaneval): n_per_set")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--max-draft", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--set", default="", help="study knob overrides, e.g. depth.layers=2+8,depth.max_drafts=1+4")
    ap.add_argument("--out", help="output stem: OUT.json, OUT.md, OUT.png (default results/STUDY/CONFIG)")
    args = ap.parse_args(argv)
    if args.config is None:  # The study as reported.
        args.config, knobs = (study := reported(args.study)).config, study.knobs
    else:
        knobs = {}
    config = load_config(args.config)
    c = apply_overrides(merge(study_config(args.config), knobs), args.set)
    for flag, key in (
        ("n", "n_per_set"),
        ("max_new_tokens", "max_new_tokens"),
        ("max_draft", "max_draft"),
        ("repeats", "repeats"),
    ):
        if getattr(args, flag) is not None:
            c[key] = getattr(args, flag)
    lm = teacher.load_lm(config.model)
    with tempfile.TemporaryDirectory() as workdir:
        exit_cfg, exit_params, exit_name, exit_path = trained_exit(config, lm, args.exit, workdir)
    lm = dataclasses.replace(lm, params=model.decode_layout(lm.params))
    prompts = distill_data.prompt_list(("chat:heldout", "humaneval:heldout"), c.n_per_set)
    ids, tune_ids = (
        [lm.encode(p)[-c.max_prompt_tokens :] for p in ps]
        for ps in (prompts, distill_data.validation_prompts(config, c.policies.tune_n))
    )
    out = pathlib.Path(args.out or RESULTS / args.study / args.config.split(":")[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    s = Setup(lm, exit_cfg, exit_params, exit_name, exit_path, ids, tune_ids, c, out.with_suffix(".rows.jsonl"), config)
    found = STUDIES[args.study](s)
    result = {
        "study": args.study,
        "config": args.config,
        "model": lm.name,
        "exit": {"name": exit_name, "layer": exit_cfg.layer, "context_layer": exit_cfg.context_layer},
        "settings": c.to_dict(),
        "n_prompts": len(ids),
        "prompt_tokens_median": statistics.median(len(i) for i in ids),
        **found,
        "exactness_policy": bench.EXACTNESS_POLICY,
        "provenance": provenance.record(seed=c.seed),
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(args.study, found["rows"])
    out.with_suffix(".md").write_text(table)
    plot(args.study, found["rows"], out.with_suffix(".png"))
    print(table)
    return result


if __name__ == "__main__":
    main()
