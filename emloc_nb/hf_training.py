"""Fine-tuning through transformers' Trainer (and so torchrun, accelerate, DeepSpeed): the same LoRA, data,
schedule, checkpoint format and adapter as the built-in loop (emloc_nb.training).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from .atomic import discard
from .config import LoraSpec, TrainSpec
from .errors import EmlocError
from .lora import attach_lora, check_finite_lora, initial_factors
from .tasks import Task
from .tokens import tokenize
from .train_checkpoints import (
    CHECKPOINT,
    checkpoint_to_resume,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    training_signature,
)
from .training import Callback, TrainResult, check_frozen_dtype, finished_result, save_result, training_collator


class CallbackBridge(TrainerCallback):
    """Forwards a Trainer's logs to emloc callbacks (e.g. the training monitor widget)."""

    def __init__(self, callbacks: Iterable[Callback]):
        self.callbacks = list(callbacks)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            event = {
                "step": state.global_step,
                "steps": state.max_steps,
                "loss": float(logs["loss"]),
                "lr": float(logs.get("learning_rate", float("nan"))),
            }
            for cb in self.callbacks:
                cb(event)


class _StopAfter(TrainerCallback):
    """Ends a Trainer run after `steps` more steps, with a checkpoint (as `stop_after` in the built-in loop)."""

    def __init__(self, steps: int):
        self.steps, self.stop_at = steps, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop_at = state.global_step + self.steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.stop_at and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True


class CheckpointingTrainer(Trainer):
    """A Trainer whose checkpoints are the built-in loop's: safetensors and JSON, never a pickle.

    Trainer's own checkpoints hold pickles (optimizer.pt, rng_state.pth, training_args.bin);
    these overrides save and resume the same state in emloc's format instead.
    """

    emloc_checkpoint: Path
    emloc_signature: dict

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:
            save_checkpoint(
                self.emloc_checkpoint,
                self.model,
                self.optimizer,
                self.state.global_step,
                _hf_history(self.state.log_history),
                self.emloc_signature,
                extra={"scheduler": self.lr_scheduler.state_dict()},
                files={"trainer_state.json": json.dumps(asdict(self.state), indent=2, sort_keys=True) + "\n"},
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self._emloc_resume = read_checkpoint(Path(resume_from_checkpoint), self.emloc_signature)
        restore_checkpoint(*self._emloc_resume, self.model, None)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        meta, tensors = self._emloc_resume
        restore_checkpoint(meta, tensors, self.model, self.optimizer)
        self.lr_scheduler.load_state_dict(meta["scheduler"])

    def _load_rng_state(self, checkpoint):
        if checkpoint is not None:
            restore_checkpoint(*self._emloc_resume, self.model, None)  # the RNG right where the run left it

    def _load_scaler(self, checkpoint):
        return  # no loss scaler state: LoRA training here runs in float32


def _hf_history(log_history: list[dict]) -> list[dict]:
    return [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")} for h in log_history if "loss" in h]


def hf_trainer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    output_dir: str | Path,
    *,
    lora: LoraSpec | None = None,
    config: TrainSpec | None = None,
    seed: int = 0,
    stats=None,
    callbacks: Iterable[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    **training_args,
):
    """A transformers Trainer for the same LoRA, data and schedule; works under torchrun (gloo on CPU).

    The schedule is the same cosine decay to a tenth of the rate, but transformers' warm-up starts a
    step earlier (from 0, where the built-in loop starts from lr / warmup_steps), so the two adapters differ.

    Every `config.checkpoint_every` steps it writes a checkpoint in the built-in loop's
    format (safetensors and JSON, no pickles) to `checkpoint_dir` (default
    OUTPUT_DIR/checkpoint); `trainer.train(resume_from_checkpoint=checkpoint_dir)` resumes.
    """
    lora, config = lora or LoraSpec(), config or TrainSpec()
    signature = training_signature(model, lora, config, seed)
    check_frozen_dtype(model, config)
    torch.manual_seed(seed)
    peft_model = attach_lora(model, lora, stats=stats)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    on_cpu = next(model.parameters()).device.type == "cpu"
    micro = config.micro_batch_size or config.batch_size
    defaults = dict(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=config.batch_size // micro,
        learning_rate=config.lr,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},  # as TrainSpec.lr_at
        logging_steps=1,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps" if config.checkpoint_every else "no",
        save_steps=config.checkpoint_every or 500,
        seed=seed,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=on_cpu,
        ddp_backend="gloo" if distributed and on_cpu else None,
        disable_tqdm=True,
    )
    known = {f.name for f in fields(TrainingArguments)}
    for key in training_args:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            raise EmlocError(
                f"{key!r} is not a transformers TrainingArguments setting"
                + (f" (did you mean {', '.join(near)}?)" if near else "")
                + ". See the TrainingArguments reference for the names."
            )
    args = TrainingArguments(**{**defaults, **training_args})
    train = tokenize(tokenizer, task.train, max_length=config.max_length, setting="train.max_length")
    trainer = CheckpointingTrainer(
        model=peft_model,
        args=args,
        train_dataset=train,
        data_collator=training_collator(tokenizer, model),
        callbacks=[CallbackBridge(callbacks), _FiniteLora()],
    )
    trainer.emloc_checkpoint = Path(checkpoint_dir) if checkpoint_dir else Path(output_dir) / CHECKPOINT
    trainer.emloc_signature = signature
    return trainer


class _FiniteLora(TrainerCallback):
    """Stops a Trainer run whose LoRA weights become non-finite (the built-in loop checks the same)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        check_finite_lora(model, when=f"after step {state.global_step}")


def finetune_hf(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    output_dir: str | Path,
    *,
    lora: LoraSpec | None = None,
    config: TrainSpec | None = None,
    seed: int = 0,
    stats=None,
    callbacks: Iterable[Callback] = (),
    stop_after: int | None = None,
    **training_args,
) -> TrainResult:
    """`finetune` through transformers' Trainer (and so torchrun, accelerate, DeepSpeed); the same adapter format.

    It checkpoints and resumes as `finetune` does (the same checkpoint format, in OUTPUT_DIR/checkpoint),
    and `stop_after` ends early after that many steps, leaving a checkpoint.
    """
    lora, config = lora or LoraSpec(), config or TrainSpec()
    output_dir = Path(output_dir)
    signature = training_signature(model, lora, config, seed)
    if done := finished_result(output_dir, signature):
        return done
    checkpoint_dir = output_dir / CHECKPOINT
    resume = checkpoint_to_resume(checkpoint_dir, signature)
    trainer = hf_trainer(
        model,
        tokenizer,
        task,
        output_dir / "trainer",
        lora=lora,
        config=config,
        seed=seed,
        stats=stats,
        callbacks=callbacks,
        checkpoint_dir=checkpoint_dir,
        **training_args,
    )
    if stop_after is not None:
        trainer.add_callback(_StopAfter(stop_after))
    initial = initial_factors(trainer.model)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint_dir) if resume else None)
        history = _hf_history(trainer.state.log_history)
        result = TrainResult(output_dir / "adapter", history)
        finished = trainer.state.global_step >= trainer.state.max_steps  # a max_steps override counts
        if finished and trainer.is_world_process_zero():
            result = save_result(
                trainer.model,
                output_dir,
                history,
                signature,
                initial,
                task=task.name,
                trainer="hf",
                world_size=trainer.args.world_size,
            )
        trainer.accelerator.wait_for_everyone()  # other ranks return once the adapter is on disk
    finally:
        trainer.model.unload()
    if finished and trainer.is_world_process_zero():
        discard(checkpoint_dir)
    return result
