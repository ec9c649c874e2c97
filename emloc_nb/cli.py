"""`emloc`: the pipeline from the command line.

emloc run CONFIG --run-dir DIR            build → fine-tune → correct → evaluate; prints the table
emloc build-emulator --run-dir DIR ...    calibrate, build the emulator, measure its drift
emloc finetune --run-dir DIR              LoRA on the emulator (or --target original); --trainer hf for Trainer/torchrun
emloc correct --run-dir DIR [--clamp L]   the corrected adapter for the original model
emloc evaluate --run-dir DIR [--limit N]  the results table
emloc report --run-dir DIR                one self-contained HTML report (needs the notebook extra)
emloc ablate CONFIG --dir DIR             the paper-style table over seeds, budgets and corrections

Every command takes --run-dir; --set section.key=value changes a setting (repeatable; values are YAML).
Exit status: 0 done, 1 the tool refused or failed (one line on stderr says why and what to do), 2 usage error,
130 / 143 interrupted by Ctrl-C / SIGTERM (nothing half-written is kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .ablation import ablate
from .ablation_methods import AblationSpec
from .config import RunConfig, is_small, parse_setting, small_settings, with_settings
from .errors import EmlocError, system_error
from .lazy import resolve
from .model_sources import pretrained_args
from .results import results_markdown
from .run import Run
from .runner import finetune_with_trainer, interrupted, sigterm_interrupts
from .stages import reconfigure
from .version import __version__

# Flags that stand for a `--set` key: the one place that maps them (value None: the flag was not given).
SHORTCUTS = {
    "model": "model",
    "data": "task.source",
    "prompt_field": "task.prompt_field",
    "answer_field": "task.answer_field",
    "ratio": "emulator.plan.ratio",
    "plan": "emulator.plan",
    "mode": "emulator.mode",
    "calibration_examples": "calibration.examples",
    "clamp": "correction.clamp",
    "limit": "evaluation.limit",
    "device": "device",
    "dtype": "dtype",
}
# The stage each command on an existing run starts at: a --set there may redo it and later stages only.
COMMAND_STAGE = {"correct": "correct", "evaluate": "evaluate"}


def _summary(run) -> None:
    totals = run.spectra().totals()
    print(
        f"emulator: {totals['compressed']}/{totals['layers']} block linears compressed, "
        f"{totals['share_kept']:.2f} of their parameters kept"
    )
    if run.has("drift"):
        drift = run.drift()
        s = drift.summary
        print(
            f"drift on {s['tokens']} held-out tokens: KL {s['kl']:.3f} nats/token, perplexity "
            f"{s['ppl_original']:.1f} → {s['ppl_emulator']:.1f} (×{s['ppl_ratio']:.2f}), "
            f"mean layer error {s['mean_measured_error']:.3f}"
        )
        print("\n| block | hidden-state cosine |\n|---|---|")
        for b in drift.blocks:
            print(f"| {b['block']} | {b['cosine']:.4f} |")


def _changes(args) -> list[tuple[str, object]]:
    """The --set assignments, then the shortcut flags, as (key, value) pairs."""
    changes = [parse_setting(text) for text in getattr(args, "set", None) or []]
    for dest, key in SHORTCUTS.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        if dest == "plan":  # a plan file named on the command line is relative to the working directory
            value = str(Path(value).resolve())
        changes.append((key, value))
    return changes


def _new_config(args):
    config = RunConfig.load(args.config) if getattr(args, "config", None) else RunConfig()
    config = with_settings(config, _changes(args))
    return small_settings(config) if (args.small or is_small()) else config


def _existing_run(args):
    """The run in --run-dir, with any --set / shortcut changes applied (their stale results dropped)."""
    run = Run(args.run_dir, trust_remote_code=args.trust_remote_code)
    changes = _changes(args)
    if changes:
        stage = COMMAND_STAGE.get(args.command, f"finetune_{getattr(args, 'target', 'emulator')}")
        redone = reconfigure(run, changes, command_stage=stage)
        if redone:
            print(f"[emloc] settings changed; redoing: {', '.join(redone)}", flush=True)
    return run


def _adapter_hint(run) -> None:
    adapter = run.verify("corrected_adapter").resolve()  # in full: it is the run's deliverable
    print(f"corrected adapter: {adapter}")
    print(
        "Evaluate it with lm-eval: lm_eval --model hf --model_args "
        f"{pretrained_args(run.config.model)},peft={adapter} --tasks TASK"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emloc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"emloc {__version__}", help="print the version")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND -h for its options)"
    )

    def run_dir(p):
        p.add_argument("--run-dir", required=True, type=Path, help="the run directory (created by run/build-emulator)")

    def stage_options(p):
        run_dir(p)
        p.add_argument(
            "--set",
            action="append",
            metavar="SECTION.KEY=VALUE",
            help="change a setting, e.g. train.steps=100 or 'task.answer_map={0: no, 1: yes}' (repeatable)",
        )
        p.add_argument(
            "--in-process", action="store_true", help="run stages in this process (no per-stage memory figures)"
        )
        p.add_argument(
            "--allow-download",
            action="store_true",
            help="fetch a Hub model or dataset missing from the local cache (never when HF_HUB_OFFLINE is set)",
        )
        p.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="let the model's own code from its checkpoint run (off by default; never read from a config)",
        )

    def new_run_options(p):
        p.add_argument("--overwrite", action="store_true", help="replace a run directory that holds a different run")
        p.add_argument("--small", action="store_true", help="tiny settings that finish in minutes (also EMLOC_SMALL=1)")
        p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto (cuda when there is one)")
        p.add_argument("--dtype", choices=["float32", "bfloat16"], help="the dtype models run in (default float32)")

    p = sub.add_parser("run", help="the whole pipeline from a YAML/JSON config")
    p.add_argument("config", type=Path, help="the run's YAML or JSON config (see configs/default.yaml)")
    stage_options(p)
    new_run_options(p)

    p = sub.add_parser("build-emulator", help="calibrate, build the emulator and measure its drift")
    stage_options(p)
    new_run_options(p)
    p.add_argument("--config", type=Path, help="start from this config file (default: the built-in defaults)")
    p.add_argument("--model", help="the default model's name, a checkpoint directory, a .gguf file or a Hub id")
    p.add_argument(
        "--data", help="'movie-sentiment', a .jsonl/.csv file, or hf:NAME / hf:DIR (a datasets dataset or folder)"
    )
    p.add_argument("--prompt-field", help="the column that holds the prompt (default: prompt)")
    p.add_argument("--answer-field", help="the column that holds the answer (default: answer)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, help="kept share ρ of every block linear, in (0, 1]")
    group.add_argument("--plan", help="a rank plan JSON file (ratio, rules, ranks), e.g. from RankPlanner.save")
    p.add_argument("--mode", choices=["whitened", "plain"], help="activation-aware (whitened, default) or plain SVD")
    p.add_argument("--calibration-examples", type=int, help="examples whose activations shape the emulator")

    p = sub.add_parser("finetune", help="train the LoRA on the emulator (or the original)")
    stage_options(p)
    p.add_argument(
        "--target", choices=["emulator", "original"], default="emulator", help="the model the LoRA is trained on"
    )
    p.add_argument(
        "--trainer",
        choices=["loop", "hf"],
        default="loop",
        help="the built-in loop, or transformers' Trainer (torchrun-ready)",
    )
    p.add_argument(
        "--hf-arg",
        action="append",
        metavar="KEY=VALUE",
        help="a transformers TrainingArguments setting for --trainer hf, e.g. logging_steps=5 (repeatable)",
    )

    p = sub.add_parser("correct", help="write the corrected adapter for the original model")
    stage_options(p)
    p.add_argument("--clamp", type=float, help="the correction's clamp L (inf: no clamp, 0: the naive transfer)")

    p = sub.add_parser("evaluate", help="evaluate every setting and write the results table")
    stage_options(p)
    p.add_argument("--limit", type=int, help="test examples scored per setting")

    p = sub.add_parser("report", help="a self-contained HTML report of a run (plotly.js embedded)")
    run_dir(p)
    p.add_argument("--output", type=Path, help="the HTML file to write (default: RUN_DIR/report.html)")

    p = sub.add_parser("ablate", help="a paper-style table over seeds, budgets and corrections (ablation.md)")
    p.add_argument("config", type=Path, help="the base run config (YAML/JSON); every row varies it")
    p.add_argument("--dir", required=True, type=Path, help="the ablation directory (resumed if it exists)")
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="change a setting of the base config, e.g. train.lr=0.001 (repeatable)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: LoRA init, data order, calibration subset")
    p.add_argument(
        "--budgets", type=float, nargs="+", default=[0.8, 0.6], help="kept shares ρ; the first is the main one"
    )
    p.add_argument("--split", choices=["validation", "test"], default="test", help="validation to choose settings")
    p.add_argument("--methods", nargs="+", help="only these rows (default: all; see emloc_nb.ablation)")
    p.add_argument(
        "--align-steps", type=int, default=32, help="distillation steps of the aligned-* rows' emulator (default 32)"
    )
    p.add_argument("--small", action="store_true", help="tiny settings that finish in minutes (also EMLOC_SMALL=1)")
    p.add_argument("--in-process", action="store_true", help="train in this process (no per-stage processes)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model's own code from its checkpoint run (off by default; never read from a config)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "hf_arg", None) and args.trainer != "hf":
        parser.error("--hf-arg needs --trainer hf")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if getattr(args, "allow_download", False):
        os.environ["EMLOC_ALLOW_DOWNLOAD"] = "1"  # stage processes inherit it
    try:
        with sigterm_interrupts():
            return _dispatch(args)
    except EmlocError as e:  # bad input: one line that names the problem and the fix (2 stays argparse's usage error)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the system refused (permissions, a full disk): not a bug, so no traceback either
        print(f"error: {system_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: every write in progress removed its temporary
        line, code = interrupted(e)
        print(f"error: {line}", file=sys.stderr)
        return code


def _dispatch(args) -> int:
    isolate = not getattr(args, "in_process", False)
    if args.command == "run":
        run = Run(args.run_dir, _new_config(args), overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
        run.run_all(isolate=isolate)
        _summary(run)
        print()
        print(results_markdown(run.results()))
        _adapter_hint(run)
        print(f"Everything is in {run.dir}. Open the tutorials on it with: make lab")
    elif args.command == "build-emulator":
        run = Run(args.run_dir, _new_config(args), overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
        run.run_all(isolate=isolate, until="drift")
        _summary(run)
    elif args.command == "finetune":
        run = _existing_run(args)
        if args.trainer == "hf":
            hf_args = dict(parse_setting(text, flag="--hf-arg") for text in args.hf_arg or [])
            print(f"adapter: {finetune_with_trainer(run, args.target, **hf_args)}")
        else:
            run.run_stage(f"finetune_{args.target}", isolate=isolate)
            print(f"adapter: {run.verify(f'adapter:{args.target}')}")
    elif args.command == "correct":
        run = _existing_run(args)
        run.run_stage("correct", isolate=isolate)
        _adapter_hint(run)
    elif args.command == "evaluate":
        run = _existing_run(args)
        run.run_stage("evaluate", isolate=isolate)
        print(results_markdown(run.results()))
    elif args.command == "report":
        try:  # the report lives on the widgets side (plotly); the core never imports it otherwise
            write_report = resolve("emloc_nb.widgets.report:write_report")
        except ImportError as e:
            raise EmlocError(
                f"The HTML report needs the notebook extra ({e}). Install it with `pip install 'emloc-nb[notebook]'`."
            ) from None
        out = write_report(args.run_dir, args.output)
        print(f"report: {out}")
    elif args.command == "ablate":
        config = _new_config(args)
        spec = AblationSpec(
            seeds=args.seeds,
            budgets=args.budgets,
            split=args.split,
            methods=args.methods,
            align_steps=args.align_steps,
        )
        report = ablate(config, args.dir, spec, isolate=isolate, trust_remote_code=args.trust_remote_code)
        print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
