"""Fine-tuning a LoRA on the emulator, or on the original model as the baseline, with the built-in loop.

`finetune` is a small seeded loop with live callbacks and resumable safetensors checkpoints
(emloc_nb.train_checkpoints), for notebooks and the CLI; emloc_nb.hf_training does the same through
transformers' Trainer. Both write the same adapter (emloc_nb.lora) and history.json to an output directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from .artifacts import verify_manifest
from .atomic import discard
from .config import LoraSpec, TrainSpec
from .errors import EmlocError, first_line
from .faults import fault
from .lora import attach_lora, check_finite_lora, initial_factors, save_adapter
from .measure import phase
from .models import length_multiple, model_dtype, torch_dtype
from .progress import progress as progress_bar
from .scoring import answer_nll
from .serial import read_json, write_json
from .tasks import Task
from .tokens import IGNORE_INDEX, Collator, collator_for, tokenize
from .train_checkpoints import (
    CHECKPOINT,
    check_same_run,
    checkpoint_to_resume,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    training_signature,
)

Callback = Callable[[dict], None]  # receives {"step", "steps", "loss", "lr"} after every optimiser step
# ----------------------------------------------------------------------------- the built-in loop


@dataclass
class TrainResult:
    adapter_dir: Path
    history: list[dict] = field(default_factory=list)  # one entry per step: step, loss, lr


def _order(n: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """Example indices for every step: seeded reshuffles, epoch after epoch, so a resumed run sees the same data."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order.extend(torch.randperm(n, generator=g).tolist())
        epoch += 1
    return order


def examples_seen(n: int, config: TrainSpec, seed: int) -> list[int]:
    """The indices of the training examples that `finetune` with `config` and `seed` trains on, each once."""
    return sorted(set(_order(n, config.steps, config.batch_size, seed)[: config.steps * config.batch_size]))


def training_collator(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> Collator:
    """Batches padded as fine-tuning pads them: up to a multiple of `models.length_multiple(model)` tokens."""
    return collator_for(tokenizer, length_multiple(model))


def check_frozen_dtype(model: nn.Module, config: TrainSpec) -> None:
    """A model loaded in another dtype than `frozen_dtype` asks for is refused: converting it here would copy it."""
    if config.frozen_dtype is None:
        return
    wanted, actual = torch_dtype(config.frozen_dtype), model_dtype(model)
    if actual != wanted:
        raise EmlocError(
            f"train.frozen_dtype={config.frozen_dtype!r}, but the model's weights are {actual}. Load it in that dtype "
            f"(load_model(..., dtype={config.frozen_dtype!r}) or Emulator.load(..., dtype={config.frozen_dtype!r})), "
            "or set frozen_dtype to null."
        )


def _enable_checkpointing(model: nn.Module) -> None:
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:  # transformers: "... does not support gradient checkpointing"
        raise EmlocError(
            f"{type(model).__name__} cannot recompute its activations ({first_line(e)}). Set "
            "train.gradient_checkpointing: false."
        ) from None


def finished_result(output_dir: Path, signature: dict) -> TrainResult | None:
    """The adapter an earlier call with the same signature wrote to output_dir, if any (checked in full)."""
    adapter_dir = output_dir / "adapter"
    if not adapter_dir.exists():
        return None
    check_same_run(verify_manifest(adapter_dir, kind="adapter")["config"], signature, adapter_dir)
    history = read_json(output_dir / "history.json")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise EmlocError(f"{output_dir / 'history.json'} is not a list of steps. Delete {output_dir} to retrain.")
    return TrainResult(adapter_dir, history)


def save_result(
    peft_model: PeftModel, output_dir: Path, history: list[dict], signature: dict, initial: dict, **info
) -> TrainResult:
    if not history:
        raise EmlocError("No training step was taken, so there is no adapter to write. Set train.steps ≥ 1.")
    write_json(output_dir / "history.json", history)
    adapter_dir = save_adapter(
        peft_model,
        output_dir / "adapter",
        base_fingerprint=signature["base_fingerprint"],
        info={"run": signature, "final_loss": history[-1]["loss"], **info},
        initial=initial,
        overwrite=True,
    )
    return TrainResult(adapter_dir, history)


def _step(
    peft_model: PeftModel,
    optimizer: torch.optim.Optimizer,
    examples: list[dict],
    collate,
    config: TrainSpec,
    lr: float,
    step: int,
) -> float:
    """One optimiser step on `examples`, in micro-batches whose gradients add up; returns the batch's mean loss.

    Each micro-batch's summed answer-token loss is divided by the whole batch's answer-token
    count, so the gradients add up to those of the full batch's mean: the same update, up to
    the order of float summation.
    """
    micro = config.micro_batch_size or len(examples)
    chunks = [collate(examples[i : i + micro]) for i in range(0, len(examples), micro)]
    tokens = sum(int((c["labels"] != IGNORE_INDEX).sum()) for c in chunks)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for chunk in chunks:
        nll, mask = answer_nll(peft_model, chunk)
        loss = nll[mask].sum() / tokens
        if not torch.isfinite(loss):
            raise EmlocError(
                f"The loss became {float(loss)} at step {step}. Lower the learning rate (now {config.lr})."
            )
        loss.backward()
        total += loss.item()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return total


def finetune(
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
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA on `model` (emulator or original) and write `output_dir/adapter`; `model` itself is left as it was.

    `seed` decides the LoRA's initialisation and the order of the training data; `stats`
    (the original's CalibrationStats) are needed for `lora.init="eigen"`.

    Checkpoints (safetensors: LoRA weights, AdamW moments, RNG state) go to
    `output_dir/checkpoint` every `config.checkpoint_every` steps; a later call with
    the same model and settings resumes from there and ends with the same weights as
    an uninterrupted run (other settings are refused): bitwise on one thread; on several,
    the last bits can differ in some runs. `stop_after` ends early after
    that many steps (to simulate an interruption, or to train in slices from a notebook).
    """
    lora, config = lora or LoraSpec(), config or TrainSpec()
    check_frozen_dtype(model, config)
    output_dir = Path(output_dir)
    adapter_dir, checkpoint_dir = output_dir / "adapter", output_dir / CHECKPOINT
    signature = training_signature(model, lora, config, seed)
    if done := finished_result(output_dir, signature):
        return done
    if len(task.train) == 0:
        raise EmlocError(f"The task {task.name} has no training examples.")
    start, history = 0, []
    resume = checkpoint_to_resume(checkpoint_dir, signature)
    encoded = tokenize(tokenizer, task.train, max_length=config.max_length, setting="train.max_length")
    collate = training_collator(tokenizer, model)
    order = _order(len(encoded), config.steps, config.batch_size, seed)
    callbacks = list(callbacks)

    torch.manual_seed(seed)
    peft_model = attach_lora(model, lora, stats=stats)
    initial = initial_factors(peft_model)
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    try:  # whatever happens, `model` comes back without the LoRA layers
        if config.gradient_checkpointing:
            _enable_checkpointing(model)
        if resume:
            meta, tensors = read_checkpoint(checkpoint_dir, signature)
            restore_checkpoint(meta, tensors, peft_model, optimizer)
            start, history = meta["step"], meta["history"]
        end = config.steps if stop_after is None else min(config.steps, start + stop_after)
        peft_model.train()
        steps = progress_bar(range(start, end), desc="finetune", initial=start, total=config.steps, enabled=progress)
        for step in steps:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            lr = config.lr_at(step)
            # The first step also allocates the optimiser state; the later ones are the steady state.
            with phase("train_first_step" if step == start else "train_steps"):
                loss = _step(peft_model, optimizer, encoded.select(idx).to_list(), collate, config, lr, step)
            check_finite_lora(peft_model, when=f"after step {step + 1}")
            fault("train-step")
            event = {"step": step + 1, "steps": config.steps, "loss": loss, "lr": lr}
            history.append(event)
            for cb in callbacks:
                cb(event)
            done = step + 1
            # Periodically, and always when stop_after ends the call early, so that the next call resumes.
            if done < config.steps and (
                done == end or (config.checkpoint_every and done % config.checkpoint_every == 0)
            ):
                save_checkpoint(checkpoint_dir, peft_model, optimizer, done, history, signature)
        peft_model.eval()
        if len(history) < config.steps:  # stopped early: the checkpoint holds the progress
            return TrainResult(adapter_dir, history)
        result = save_result(peft_model, output_dir, history, signature, initial, task=task.name)
    finally:
        if getattr(model, "is_activation_checkpointing", False):  # is_gradient_checkpointing is deprecated
            model.gradient_checkpointing_disable()
        peft_model.unload()
        model.eval()
    discard(checkpoint_dir)
    return result
