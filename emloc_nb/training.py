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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback

from .artifacts import (
    atomic_dir,
    discard,
    fault,
    read_json,
    read_json_object,
    read_tensors,
    verify_manifest,
    write_json,
    write_tensors,
)
from .config import LoraSpec, TrainSpec
from .data import IGNORE_INDEX, Collator, Task, collator_for, tokenize
from .errors import EmlocError, first_line
from .lora import attach_lora, check_finite_lora, initial_factors, save_adapter
from .measure import phase
from .models import fingerprint, length_multiple, model_dtype, torch_dtype
from .progress import progress as progress_bar
from .scoring import answer_nll

Callback = Callable[[dict], None]  # receives {"step", "steps", "loss", "lr"} after every optimiser step
# TrainSpec settings that change memory and time but not the trained weights (beyond float summation order,
# which over bf16 frozen weights is bf16's rounding: micro-batched adapters then differ by about as much as
# bf16 ones differ from float32 ones).
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


def examples_seen(n: int, config: TrainSpec, seed: int) -> list[int]:
    """The indices of the training examples that `finetune` with `config` and `seed` trains on, each once."""
    return sorted(set(_order(n, config.steps, config.batch_size, seed)[: config.steps * config.batch_size]))


def training_collator(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> Collator:
    """Batches padded as fine-tuning pads them: up to a multiple of `models.length_multiple(model)` tokens."""
    return collator_for(tokenizer, length_multiple(model))


CHECKPOINT = "checkpoint"  # the checkpoint directory in an output directory, and its manifest kind


def _save_checkpoint(
    path: Path,
    peft_model: PeftModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list[dict],
    signature: dict,
    *,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> None:
    """One checkpoint format for both trainers: state.safetensors (LoRA weights, optimizer moments, RNG) and
    state.json (step, history, optimizer settings, and `extra`, e.g. the scheduler), plus any JSON `files`."""
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    opt_state = optimizer.state_dict()
    tensors = {f"param/{n}": p for n, p in trainable.items()}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{idx}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    with atomic_dir(path, overwrite=True, kind=CHECKPOINT, config=signature) as tmp:
        write_tensors(tmp / "state.safetensors", tensors)
        write_json(
            tmp / "state.json",
            {"step": step, "history": history, "param_groups": opt_state["param_groups"], **(extra or {})},
        )
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def _read_checkpoint(path: Path, signature: dict) -> tuple[dict, dict]:
    """(state.json, tensors) of a checkpoint, after checking its manifest and that it belongs to this run."""
    manifest = verify_manifest(path, kind=CHECKPOINT)
    _check_same_run(manifest["config"], signature, path)
    meta = read_json_object(path / "state.json", {"step": int, "history": list, "param_groups": list})
    return meta, read_tensors(path / "state.safetensors")


def _restore(meta: dict, tensors: dict, peft_model: PeftModel, optimizer: torch.optim.Optimizer | None) -> None:
    """Put a checkpoint's LoRA weights, optimizer state (when given) and RNG state back."""
    params = dict(peft_model.named_parameters())
    try:
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("param/"):
                    params[key.removeprefix("param/")].copy_(value)
        if optimizer is not None:
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith("optim/"):
                    _, idx, name = key.split("/", 2)
                    state.setdefault(int(idx), {})[name] = value
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng/torch"])
        if "rng/cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng/cuda"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise EmlocError(
            f"The checkpoint does not fit this LoRA ({type(e).__name__}: {str(e)[:120]}). "
            "Delete the checkpoint directory to start again."
        ) from None


def _signature(model: nn.Module, lora: LoraSpec, config: TrainSpec, seed: int) -> dict:
    """What decides the trained weights: an adapter or checkpoint is reused only for the same signature.

    The model's dtype is part of it: the fingerprint ignores dtype (one model in float32 or bf16), but a
    checkpoint resumed in another dtype would give an adapter trained half in each.
    """
    train = {k: v for k, v in asdict(config).items() if k not in MEMORY_LEVERS}
    signature = {
        "base_fingerprint": fingerprint(model),
        "dtype": str(model_dtype(model)).removeprefix("torch."),
        "lora": asdict(lora),
        "train": train,
        "seed": seed,
    }
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


def _enable_checkpointing(model: nn.Module) -> None:
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:  # transformers: "... does not support gradient checkpointing"
        raise EmlocError(
            f"{type(model).__name__} cannot recompute its activations ({first_line(e)}). Set "
            "train.gradient_checkpointing: false."
        ) from None


def _check_same_run(recorded: dict | None, signature: dict, where: Path) -> None:
    if recorded == signature:
        return
    differ = sorted(k for k in signature if (recorded or {}).get(k) != signature[k])
    raise EmlocError(
        f"{where} was written by another fine-tuning run (it differs in: {', '.join(differ)}). "
        "Use another output directory, or delete this one to start again."
    )


def _finished(output_dir: Path, signature: dict) -> TrainResult | None:
    """The adapter an earlier call with the same signature wrote to output_dir, if any (checked in full)."""
    adapter_dir = output_dir / "adapter"
    if not adapter_dir.exists():
        return None
    _check_same_run(verify_manifest(adapter_dir, kind="adapter")["config"], signature, adapter_dir)
    history = read_json(output_dir / "history.json")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise EmlocError(f"{output_dir / 'history.json'} is not a list of steps. Delete {output_dir} to retrain.")
    return TrainResult(adapter_dir, history)


def _write_adapter(
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


def _checkpoint_if_any(checkpoint_dir: Path, signature: dict) -> bool:
    """Whether a checkpoint of this same run is there to resume from (one of another run is refused)."""
    if not checkpoint_dir.exists():
        return False
    _check_same_run(verify_manifest(checkpoint_dir, kind=CHECKPOINT)["config"], signature, checkpoint_dir)
    return True


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
    _check_frozen_dtype(model, config)
    output_dir = Path(output_dir)
    adapter_dir, checkpoint_dir = output_dir / "adapter", output_dir / CHECKPOINT
    signature = _signature(model, lora, config, seed)
    if done := _finished(output_dir, signature):
        return done
    if len(task.train) == 0:
        raise EmlocError(f"The task {task.name} has no training examples.")
    start, history = 0, []
    resume = _checkpoint_if_any(checkpoint_dir, signature)
    encoded = tokenize(tokenizer, task.train, max_length=config.max_length)
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
            meta, tensors = _read_checkpoint(checkpoint_dir, signature)
            _restore(meta, tensors, peft_model, optimizer)
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
                _save_checkpoint(checkpoint_dir, peft_model, optimizer, done, history, signature)
        peft_model.eval()
        if len(history) < config.steps:  # stopped early: the checkpoint holds the progress
            return TrainResult(adapter_dir, history)
        result = _write_adapter(peft_model, output_dir, history, signature, initial, task=task.name)
    finally:
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        peft_model.unload()
        model.eval()
    discard(checkpoint_dir)
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


class _StopAfter(TrainerCallback):
    """Ends a Trainer run after `steps` more steps, with a checkpoint (as `stop_after` in the built-in loop)."""

    def __init__(self, steps: int):
        self.steps, self.stop_at = steps, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop_at = state.global_step + self.steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.stop_at and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True


def _trainer_class():
    from transformers import Trainer

    class CheckpointingTrainer(Trainer):
        """A Trainer whose checkpoints are the built-in loop's: safetensors and JSON, never a pickle.

        Trainer's own checkpoints hold pickles (optimizer.pt, rng_state.pth, training_args.bin);
        these overrides save and resume the same state in emloc's format instead.
        """

        emloc_checkpoint: Path
        emloc_signature: dict

        def _save_checkpoint(self, model, trial):
            if self.args.should_save:
                _save_checkpoint(
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
            self._emloc_resume = _read_checkpoint(Path(resume_from_checkpoint), self.emloc_signature)
            _restore(*self._emloc_resume, self.model, None)

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None:
                return
            meta, tensors = self._emloc_resume
            _restore(meta, tensors, self.model, self.optimizer)
            self.lr_scheduler.load_state_dict(meta["scheduler"])

        def _load_rng_state(self, checkpoint):
            if checkpoint is not None:
                _restore(*self._emloc_resume, self.model, None)  # the RNG right where the run left it

        def _load_scaler(self, checkpoint):
            return  # no loss scaler state: LoRA training here runs in float32

    return CheckpointingTrainer


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
    from transformers import TrainingArguments

    lora, config = lora or LoraSpec(), config or TrainSpec()
    signature = _signature(model, lora, config, seed)
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
    train = tokenize(tokenizer, task.train, max_length=config.max_length)
    trainer = _trainer_class()(
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
    signature = _signature(model, lora, config, seed)
    if done := _finished(output_dir, signature):
        return done
    checkpoint_dir = output_dir / CHECKPOINT
    resume = _checkpoint_if_any(checkpoint_dir, signature)
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
    if finished and trainer.is_world_process_zero():
        discard(checkpoint_dir)
    return result
