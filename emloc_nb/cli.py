"""`emloc`: the pipeline from the command line.

emloc run CONFIG --run-dir DIR          build → fine-tune → correct → evaluate; prints the table
emloc build-emulator --output DIR ...   calibrate, build the emulator, measure its drift
emloc finetune --run-dir DIR            LoRA on the emulator (or --target original); --trainer hf for Trainer/torchrun
emloc correct --run-dir DIR             the corrected adapter for the original model
emloc evaluate --run-dir DIR            the results table
emloc report RUN_DIR                    one self-contained HTML report (needs the notebook extra)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .errors import EmlocError


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


def _config_from_flags(args):
    from .config import RunConfig, is_small, small_settings

    config = RunConfig.load(args.config) if getattr(args, "config", None) else RunConfig()
    d = config.to_dict()
    if getattr(args, "model", None):
        d["model"] = args.model
    if getattr(args, "data", None):
        d["task"]["source"] = args.data
    if getattr(args, "prompt_field", None):
        d["task"]["prompt_field"] = args.prompt_field
    if getattr(args, "answer_field", None):
        d["task"]["answer_field"] = args.answer_field
    if getattr(args, "ratio", None) is not None:
        d["emulator"]["plan"] = {"ratio": args.ratio}
    if getattr(args, "plan", None):
        d["emulator"]["plan"] = str(Path(args.plan).resolve())
    if getattr(args, "mode", None):
        d["emulator"]["mode"] = args.mode
    if getattr(args, "calibration_examples", None) is not None:
        d["calibration"]["examples"] = args.calibration_examples
    config = RunConfig.from_dict(d)
    return small_settings(config) if (getattr(args, "small", False) or is_small()) else config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="emloc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, run_dir=True):
        if run_dir:
            p.add_argument("--run-dir", required=True, type=Path, help="the run directory")
        p.add_argument(
            "--in-process", action="store_true", help="run stages in this process (no per-stage memory figures)"
        )
        p.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="let the model's own code from its checkpoint run (off by default; never read from a config)",
        )

    p = sub.add_parser("run", help="the whole pipeline from a YAML/JSON config")
    p.add_argument("config", type=Path)
    common(p)
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that holds a different run")
    p.add_argument("--small", action="store_true", help="tiny settings that finish in minutes (also EMLOC_SMALL=1)")

    p = sub.add_parser("build-emulator", help="calibrate, build the emulator and measure its drift")
    p.add_argument("--output", required=True, type=Path, help="run directory to write")
    p.add_argument("--config", type=Path, help="start from this config file")
    p.add_argument("--model", help="default model name, HF checkpoint directory or .gguf file")
    p.add_argument("--data", help="'movie-sentiment' (default) or a .jsonl/.csv file with prompt/answer fields")
    p.add_argument("--prompt-field")
    p.add_argument("--answer-field")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ratio", type=float, help="kept share ρ of every block linear, in (0, 1]")
    group.add_argument("--plan", help="a rank plan JSON file (ratio, rules, ranks)")
    p.add_argument("--mode", choices=["whitened", "plain"])
    p.add_argument("--calibration-examples", type=int)
    p.add_argument("--overwrite", action="store_true", help="replace a run directory that holds a different run")
    p.add_argument("--small", action="store_true")
    common(p, run_dir=False)

    p = sub.add_parser("finetune", help="train the LoRA on the emulator (or the original)")
    common(p)
    p.add_argument("--target", choices=["emulator", "original"], default="emulator")
    p.add_argument(
        "--trainer",
        choices=["loop", "hf"],
        default="loop",
        help="built-in loop, or transformers' Trainer (torchrun-ready)",
    )

    for name, text in [
        ("correct", "write the corrected adapter for the original model"),
        ("evaluate", "evaluate every setting and write the results table"),
    ]:
        common(sub.add_parser(name, help=text))

    p = sub.add_parser("report", help="a self-contained HTML report of a run (plotly.js embedded)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", type=Path, help="default: RUN_DIR/report.html")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _dispatch(args)
    except EmlocError as e:  # bad input: one line that names the problem and the fix (2 stays argparse's usage error)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the system refused (permissions, a full disk): not a bug, so no traceback either
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}. Check the path, its permissions and free space.", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    from .config import RunConfig, is_small, small_settings
    from .run import Run
    from .stages import finetune_with_trainer, results_markdown

    isolate = not getattr(args, "in_process", False)
    if args.command == "run":
        config = RunConfig.load(args.config)
        if args.small or is_small():
            config = small_settings(config)
        run = Run(args.run_dir, config, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
        run.run_all(isolate=isolate)
        _summary(run)
        print()
        print(results_markdown(run.results()))
        print(f"Everything is in {run.dir}. Open it with: jupyter lab notebooks/00_quickstart.ipynb")
    elif args.command == "build-emulator":
        run = Run(
            args.output, _config_from_flags(args), overwrite=args.overwrite, trust_remote_code=args.trust_remote_code
        )
        run.run_all(isolate=isolate, until="drift")
        _summary(run)
    elif args.command == "finetune":
        run = Run(args.run_dir, trust_remote_code=args.trust_remote_code)
        if args.trainer == "hf":
            print(f"adapter: {finetune_with_trainer(run, args.target)}")
        else:
            run.run_stage(f"finetune_{args.target}", isolate=isolate)
            print(f"adapter: {run.adapter_dir(args.target)}")
    elif args.command == "correct":
        run = Run(args.run_dir, trust_remote_code=args.trust_remote_code)
        run.run_stage("correct", isolate=isolate)
        print(f"corrected adapter: {run.adapter_dir('corrected')}")
    elif args.command == "evaluate":
        run = Run(args.run_dir, trust_remote_code=args.trust_remote_code)
        run.run_stage("evaluate", isolate=isolate)
        print(results_markdown(run.results()))
    elif args.command == "report":
        try:  # the report lives on the widgets side (plotly); the core never imports it otherwise
            write_report = importlib.import_module("emloc_nb.widgets.report").write_report
        except ImportError as e:
            raise EmlocError(
                f"The HTML report needs the notebook extra ({e}). Install it with `pip install 'emloc-nb[notebook]'`."
            ) from None
        out = write_report(args.run_dir, args.output or args.run_dir / "report.html")
        print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
