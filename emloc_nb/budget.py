"""A run's memory budget: predicted (tensor accounting, emloc_nb.memory) against measured (its stage records)."""

from __future__ import annotations

from .memory import footprint, longest_examples, predict_training
from .stage_bodies import base_model
from .tokens import collator_for
from .training import examples_seen, training_collator

# (row, model, training?, the stage that measures it, its steady-state phase)
BUDGET_ROWS = [
    ("inference, original", "original", False, "evaluate-original", "evaluation"),
    ("inference, emulator", "emulator", False, "evaluate-emulator", "evaluation"),
    ("LoRA fine-tuning, original", "original", True, "finetune_original", "train_steps"),
    ("LoRA fine-tuning, emulator", "emulator", True, "finetune_emulator", "train_steps"),
]


def budget(run, *, batch_size: int | None = None) -> list[dict]:
    """Predicted (tensor accounting) against measured memory for one run, per setting.

    Rows: inference and LoRA fine-tuning of the original and of the emulator. The
    prediction uses the run's longest batch of the size a step runs (the micro-batch when the
    run micro-batches, or `batch_size`), from the examples it trains on, with the models as
    the stages load them (bf16 frozen weights when train.frozen_dtype says so, gradient
    checkpointing when on). `predicted_peak_mb` adds the stage's process baseline (Python and
    the libraries: its resident memory as it began to load the model) to that total;
    `measured_peak_mb` is the peak of the stage's steady-state phase (train_steps, after the
    first step; evaluation), and `error` their relative gap.
    For inference only the weights are predicted: a forward's short-lived activations
    and key/value cache are not accounted.
    """
    config = run.config.train
    size = batch_size or config.micro_batch_size or config.batch_size
    tokenizer = run.tokenizer()
    training_set = run.task().train
    seen = training_set.select(examples_seen(len(training_set), config, run.config.seed))
    examples = longest_examples(tokenizer, seen, size, max_length=config.max_length)
    records = run.stage_records()
    rows = []
    for label, which, train, stage, steady in BUDGET_ROWS:
        net, _ = base_model(run, which, config.frozen_dtype if train else None)
        if train:
            predicted = predict_training(net, run.config.lora, config, training_collator(tokenizer, net)(examples))
        else:
            predicted = footprint(net, collator_for(tokenizer)(examples), train=False)
        record = records.get(stage, {})
        phases = record.get("phases", {})
        # The process as it began to load the model: the libraries a stage imports lazily (about 120 MB) are in.
        baseline = phases.get("load", {}).get("start_rss_mb", record.get("baseline_rss_mb"))
        measured = phases.get(steady, {}).get("peak_rss_mb")
        peak = predicted["total_mb"] + baseline if baseline is not None else None
        rows.append(
            {
                "setting": label,
                **predicted,
                "process_baseline_mb": baseline,
                "predicted_peak_mb": peak,
                "measured_peak_mb": measured,
                "error": peak / measured - 1 if peak is not None and measured else None,
                "stage_peak_mb": record.get("peak_rss_mb"),
            }
        )
    return rows
