"""Fine-tuning a LoRA on the emulator, or on the original model as the baseline.

Two ways to train, one loss: `finetune` (a small seeded loop with live callbacks and
resumable safetensors checkpoints, for notebooks and the CLI) and `hf_trainer` (a
transformers Trainer over the same collator, which also runs under torchrun / DDP).
Both write the same adapter (emloc_nb.lora) and history.json to an output directory.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback

from .artifacts import atomic_dir, read_json, read_tensors, write_json, write_tensors
from .config import LoraSpec, TrainSpec
from .data import IGNORE_INDEX, Task, collator_for, tokenize
from .errors import EmlocError
from .lora import attach_lora, initial_factors, save_adapter
from .memory import phase
from .models import fingerprint, model_dtype, torch_dtype
from .progress import progress as progress_bar
from .scoring import answer_nll

Callback = Callable[[dict], None]  # receives {"step", "steps", "loss", "lr"} after every optimiser step
# TrainSpec settings that change memory and time but not the trained weights (beyond float summation order).
MEMORY_LEVERS = ("checkpoint_every", "gradient_checkpointing", "micro_batch_size")


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


def _save_checkpoint(
    path: Path, peft_model: PeftModel, optimizer: torch.optim.Optimizer, step: int, history: list[dict], signature: dict
) -> None:
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    opt_state = optimizer.state_dict()
    tensors = {f"param/{n}": p for n, p in trainable.items()}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{idx}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    with atomic_dir(path, overwrite=True) as tmp:
        write_tensors(tmp / "state.safetensors", tensors)
        write_json(
            tmp / "state.json",
            {"step": step, "history": history, "param_groups": opt_state["param_groups"], "run": signature},
        )


def _load_checkpoint(path: Path, peft_model: PeftModel, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    meta = read_json(path / "state.json")
    tensors = read_tensors(path / "state.safetensors")
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param/"):
                params[key.removeprefix("param/")].copy_(value)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    return meta["step"], meta["history"]


def _signature(base_fingerprint: str, lora: LoraSpec, config: TrainSpec, seed: int) -> dict:
    """What decides the trained weights: an adapter or checkpoint is reused only for the same signature."""
    train = {k: v for k, v in asdict(config).items() if k not in MEMORY_LEVERS}
    signature = {"base_fingerprint": base_fingerprint, "lora": asdict(lora), "train": train, "seed": seed}
    return json.loads(json.dumps(signature))  # as read back


def _check_frozen_dtype(model: nn.Module, config: TrainSpec) -> None:
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


def _check_same_run(recorded: dict | None, signature: dict, where: Path) -> None:
    if recorded == signature:
        return
    differ = sorted(k for k in signature if (recorded or {}).get(k) != signature[k])
    raise EmlocError(
        f"{where} was written by another fine-tuning run (it differs in: {', '.join(differ)}). "
        "Use another output directory, or delete this one to start again."
    )


def _finished(output_dir: Path, signature: dict) -> TrainResult | None:
    """The adapter an earlier call with the same signature wrote to output_dir, if any."""
    adapter_dir = output_dir / "adapter"
    if not (adapter_dir / "emloc.json").is_file():
        return None
    _check_same_run(read_json(adapter_dir / "emloc.json").get("run"), signature, adapter_dir)
    return TrainResult(adapter_dir, read_json(output_dir / "history.json"))


def _write_adapter(
    peft_model: PeftModel, output_dir: Path, history: list[dict], signature: dict, initial: dict, **info
) -> TrainResult:
    write_json(output_dir / "history.json", history)
    adapter_dir = save_adapter(
        peft_model,
        output_dir / "adapter",
        base_fingerprint=signature["base_fingerprint"],
        info={"run": signature, "final_loss": history[-1]["loss"] if history else None, **info},
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
    an uninterrupted run (other settings are refused). `stop_after` ends early after
    that many steps (to simulate an interruption, or to train in slices from a notebook).
    """
    lora, config = lora or LoraSpec(), config or TrainSpec()
    _check_frozen_dtype(model, config)
    output_dir = Path(output_dir)
    adapter_dir, checkpoint_dir = output_dir / "adapter", output_dir / "checkpoint"
    signature = _signature(fingerprint(model), lora, config, seed)
    if done := _finished(output_dir, signature):
        return done
    if len(task.train) == 0:
        raise EmlocError(f"The task {task.name} has no training examples.")
    start, history = 0, []
    if (checkpoint_dir / "state.json").is_file():
        _check_same_run(read_json(checkpoint_dir / "state.json").get("run"), signature, checkpoint_dir)
    encoded = tokenize(tokenizer, task.train, max_length=config.max_length)
    collate = collator_for(tokenizer)
    order = _order(len(encoded), config.steps, config.batch_size, seed)
    callbacks = list(callbacks)

    torch.manual_seed(seed)
    peft_model = attach_lora(model, lora, stats=stats)
    initial = initial_factors(peft_model)
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:  # whatever happens, `model` comes back without the LoRA layers
        if (checkpoint_dir / "state.json").is_file():
            start, history = _load_checkpoint(checkpoint_dir, peft_model, optimizer)
        end = config.steps if stop_after is None else min(config.steps, start + stop_after)
        peft_model.train()
        steps = progress_bar(range(start, end), desc="finetune", initial=start, total=config.steps, enabled=progress)
        for step in steps:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            lr = config.lr_at(step)
            # The first step also allocates the optimiser state; the later ones are the steady state.
            with phase("train_first_step" if step == start else "train_steps"):
                loss = _step(peft_model, optimizer, encoded.select(idx).to_list(), collate, config, lr, step)
            event = {"step": step + 1, "steps": config.steps, "loss": loss, "lr": lr}
            history.append(event)
            for cb in callbacks:
                cb(event)
            done = step + 1
            # Periodically, and always when stop_after ends the call early, so that the next call resumes.
            if done < config.steps and (
                done == end or (config.checkpoint_every and done % config.checkpoint_every == 0)
            ):
                _save_checkpoint(checkpoint_dir, peft_model, optimizer, done, history, signature)
        peft_model.eval()
        if len(history) < config.steps:  # stopped early: the checkpoint holds the progress
            return TrainResult(adapter_dir, history)
        result = _write_adapter(peft_model, output_dir, history, signature, initial, task=task.name)
    finally:
        if config.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        peft_model.unload()
        model.eval()
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- HF Trainer


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
    **training_args,
):
    """A transformers Trainer for the same LoRA, data and schedule; works under torchrun (gloo on CPU).

    It saves no checkpoints by default: a Trainer's checkpoints are pickles. Pass
    save_strategy="steps" to have them anyway.
    """
    from transformers import Trainer, TrainingArguments

    lora, config = lora or LoraSpec(), config or TrainSpec()
    _check_frozen_dtype(model, config)
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
        save_strategy="no",
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
    train = tokenize(tokenizer, task.train, max_length=config.max_length)
    return Trainer(
        model=peft_model,
        args=args,
        train_dataset=train,
        data_collator=collator_for(tokenizer),
        callbacks=[CallbackBridge(callbacks)],
    )


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
    **training_args,
) -> TrainResult:
    """`finetune` through transformers' Trainer (and so torchrun, accelerate, DeepSpeed); the same adapter format."""
    lora, config = lora or LoraSpec(), config or TrainSpec()
    output_dir = Path(output_dir)
    signature = _signature(fingerprint(model), lora, config, seed)
    if done := _finished(output_dir, signature):
        return done
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
        **training_args,
    )
    initial = initial_factors(trainer.model)
    try:
        trainer.train()
        history = [
            {"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")}
            for h in trainer.state.log_history
            if "loss" in h
        ]
        result = TrainResult(output_dir / "adapter", history)
        if trainer.is_world_process_zero():
            result = _write_adapter(
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
    return result
