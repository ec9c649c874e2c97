"""What each stage of a run computes: one function per stage, and the steps they share with the ablation.

A stage function takes (run, stage, part, progress) and returns extra fields for its stage
record; the registry (emloc_nb.stages) lists them. They reach the torch side through lazy names
(emloc_nb.lazy), so that each stage process imports what its own stage uses and no more (the
libraries a process loads count in its measured peak), and the registry, the runner and the CLI
import no torch at all. The ablation builds its rows from the same steps: `transfer_lora` carries
the emulator's LoRA over to the original, `evaluate_adapter` scores a model with an adapter.
"""

from __future__ import annotations

from pathlib import Path

from .config import resolve_prior_target
from .errors import EmlocError
from .eval_settings import SETTINGS
from .lazy import lazy
from .measure import weights_mb

align_emulator = lazy("emloc_nb.alignment:align_emulator")
distillation_targets = lazy("emloc_nb.alignment:distillation_targets")
collect_stats = lazy("emloc_nb.calibration:collect_stats")
build_emulator = lazy("emloc_nb.emulator:build_emulator")
stream = lazy("emloc_nb.streaming:stream")
drift = lazy("emloc_nb.emulator_drift:drift")
finetune = lazy("emloc_nb.training:finetune")
finetune_hf = lazy("emloc_nb.hf_training:finetune_hf")
correct_lora = lazy("emloc_nb.correction:correct_lora")
load_adapter = lazy("emloc_nb.lora:load_adapter")
evaluate = lazy("emloc_nb.evaluation:evaluate")


def base_model(run, which: str, dtype: str | None = None):
    """(model, tokenizer) of the "original" or the "emulator": the one place that picks them.

    On the run's device, in its dtype or in `dtype` (fine-tuning with bf16 frozen weights).
    """
    if which == "original":
        return run.original(dtype)
    if which == "emulator":
        return run.emulator(dtype=dtype).model, run.emulator_tokenizer()
    raise EmlocError(f"Unknown base model {which!r}: use 'original' or 'emulator'.")


def _streamed(run, progress: bool, **what):
    """emloc_nb.streaming.stream on the run's model, device and dtype (emulator.streaming: true)."""
    c = run.config
    return stream(
        c.model, dtype=c.dtype, device=c.device, trust_remote_code=run.trust_remote_code, progress=progress, **what
    )


def calibrate_stage(run, stage, part: str | None, progress: bool) -> dict:
    if run.config.emulator.streaming:  # both sets in one pass over the blocks; the whole original is never loaded
        sets = _streamed(
            run, progress, batch_sets={"train": run.batches("train"), "heldout": run.batches("validation")}
        )
        for split, stats in sets.items():
            stats.save(run.path(f"calibration:{split}"), overwrite=True)
        return {}
    model, _ = base_model(run, stage.model)
    for stats, examples in (("train", "train"), ("heldout", "validation")):
        collect_stats(model, run.batches(examples), progress=progress).save(
            run.path(f"calibration:{stats}"), overwrite=True
        )
    return {"weights_mb": weights_mb(model)}


def emulator_stage(run, stage, part: str | None, progress: bool) -> dict:
    e = run.config.emulator
    if e.streaming:
        _streamed(
            run,
            progress,
            stats=run.calibration("train"),
            output=run.path("emulator"),
            plan=run.config.rank_plan(),
            mode=e.mode,
            eps=e.eps,
            shrinkage=e.shrinkage,
            overwrite=True,
        )
        return {}
    model, tokenizer = base_model(run, stage.model)
    emulator = build_emulator(
        model,
        run.calibration("train"),
        run.config.rank_plan(),
        mode=e.mode,
        eps=e.eps,
        shrinkage=e.shrinkage,
        progress=progress,
    )
    if e.align_steps:  # folded into the factors before saving: every later stage sees the aligned emulator
        targets = distillation_targets(model, run.batches("train"), run.batches("validation"))
        emulator.alignment = align_emulator(
            emulator.model,
            targets,
            steps=e.align_steps,
            lr=e.align_lr,
            batch_size=run.config.calibration.batch_size,
            seed=run.config.seed,
            progress=progress,
        )
    emulator.save(run.path("emulator"), tokenizer=tokenizer, overwrite=True)
    return {"weights_mb": weights_mb(emulator.model), **({"alignment": emulator.alignment} if e.align_steps else {})}


def drift_stage(run, stage, part: str | None, progress: bool) -> dict:
    model, tokenizer = base_model(run, stage.model)
    report = drift(
        model,
        run.emulator(with_original=True),
        run.batches("validation"),
        heldout=run.calibration("heldout"),
        tokenizer=tokenizer,
        progress=progress,
    )
    report.save(run.path("drift"), overwrite=True)
    return {}


def train_lora(run, target: str, train=finetune, **options) -> tuple:
    """(model, TrainResult) of training the run's LoRA on its "emulator" or "original" with `train`.

    `train` is the built-in loop (`finetune`) or transformers' Trainer (`finetune_hf`); both get the
    run's task, settings and output directory, and the model as the fine-tuning stage loads it.
    """
    model, tokenizer = base_model(run, target, run.config.train.frozen_dtype)
    stats = run.calibration("train") if run.config.lora.init == "eigen" else None  # a data-aligned LoRA starts there
    result = train(
        model,
        tokenizer,
        run.task(),
        run.path(f"finetune:{target}"),
        lora=run.config.lora,
        config=run.config.train,
        seed=run.config.seed,
        stats=stats,
        **options,
    )
    return model, result


def finetune_stage(run, stage, part: str | None, progress: bool) -> dict:
    model, result = train_lora(run, stage.model, progress=progress)
    return {"weights_mb": weights_mb(model), "final_loss": result.history[-1]["loss"]}


def finetune_with_trainer(run, target: str, **training_args) -> Path:
    """The fine-tuning stage's LoRA through transformers' Trainer (emloc_nb.runner.finetune_with_trainer runs it)."""
    return train_lora(run, target, finetune_hf, **training_args)[1].adapter_dir


def prior_inputs(run, prior: bool, prior_target: str) -> dict:
    """correct_lora's prior arguments for a run: its calibration prompts and, for the label target, the shares."""
    if not prior:
        return {"prior_prompts": None, "label_shares": None}
    task = run.task()
    labels = resolve_prior_target(prior_target, bool(task.choices)) == "labels"
    return {
        "prior_prompts": list(run.calibration_examples("train")["messages"]),
        "label_shares": task.choice_shares() if labels else None,
    }


def transfer_lora(
    run,
    output: Path,
    *,
    clamp: float = 3.0,
    kappa: str = "clamp",
    prior: bool = False,
    prior_target: str = "emulator",
    placebo_seed: int | None = None,
    data_overlap: bool = True,
    progress: bool = True,
):
    """Write the run's emulator LoRA, corrected for the original, to `output`; return its CorrectionReport.

    `data_overlap=False` skips the report's overlaps with the inputs' top eigenvectors (they cost an
    eigendecomposition per input, and the adapter does not depend on them).
    """
    model, tokenizer = base_model(run, "original")
    return correct_lora(
        model,
        run.emulator(with_original=True),
        run.adapter_dir("emulator"),
        output,
        clamp=clamp,
        kappa=kappa,
        heldout=run.calibration("heldout"),
        calibration=run.calibration("train") if data_overlap else None,
        tokenizer=tokenizer,
        placebo_seed=placebo_seed,
        overwrite=True,
        progress=progress,
        **prior_inputs(run, prior, prior_target),
    )


def correct_stage(run, stage, part: str | None, progress: bool) -> dict:
    c = run.config.correction
    report = transfer_lora(
        run,
        run.path("corrected_adapter"),
        clamp=c.clamp,
        kappa=c.kappa,
        prior=c.prior,
        prior_target=c.prior_target,
        progress=progress,
    )
    report.save(run.path("correction"), overwrite=True)
    return {}


def evaluate_adapter(
    run,
    model,
    tokenizer,
    adapter: Path | None,
    output: Path,
    *,
    check_base: bool = True,
    split: str,
    limit: int | None,
    batch_size: int,
    progress: bool,
) -> dict:
    """Score `model` (with the adapter at `adapter`, if any) on the run's task; save the EvalResult to `output`."""
    from peft import PeftModel

    if adapter is not None:
        model = load_adapter(model, adapter, check_base=check_base)
    try:
        result = evaluate(
            model, tokenizer, run.task(), split=split, limit=limit, batch_size=batch_size, progress=progress
        )
        record = {"weights_mb": weights_mb(model)}
    finally:
        if isinstance(model, PeftModel):  # in-process runs share the loaded models across stages
            model.unload()
    result.save(output, overwrite=True)
    return record


def evaluate_stage(run, stage, setting: str | None, progress: bool) -> dict:
    s, ev = SETTINGS[setting], run.config.evaluation
    model, tokenizer = base_model(run, s.base)
    return evaluate_adapter(
        run,
        model,
        tokenizer,
        run.adapter_dir(s.adapter) if s.adapter else None,
        run.path(f"evaluation:{setting}"),
        check_base=s.check_base,
        split=ev.split,
        limit=ev.limit,
        batch_size=ev.batch_size,
        progress=progress,
    )
