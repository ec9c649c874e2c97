"""Memory: tensor accounting (what a step must hold) and measured process peaks.

`footprint` predicts a step's memory from the tensors themselves: the weights, the
trainable state (parameter, gradient and two AdamW moments per LoRA weight) and the
activations autograd saves for the backward pass, counted with saved-tensor hooks on
one real batch. The pipeline measures the real thing: each stage runs in its own
process and records its peak resident set size.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import nn

MB = 2**20


def rss_mb() -> float:
    """Current resident set size of this process."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def weights_mb(model: nn.Module) -> float:
    """Unique parameter and buffer bytes (tied weights count once)."""
    return _bytes(list(model.parameters()) + list(model.buffers())) / MB


def footprint(model: nn.Module, batch: dict, *, train: bool = True) -> dict:
    """Predicted memory of one step on `batch`, in MB.

    train=True: a LoRA training step (the model should have its LoRA attached, so
    that only LoRA weights require grad); train=False: a no-grad forward.
    """
    from .scoring import answer_nll

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.set_grad_enabled(train), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, mask = answer_nll(model, batch)
        if train and trainable:
            nll[mask].mean().backward()
    for p in trainable:
        p.grad = None
    weights = weights_mb(model)
    state = 4 * sum(p.numel() * p.element_size() for p in trainable) / MB if train else 0.0
    activations = _bytes(saved) / MB
    return {
        "weights_mb": weights,
        "trainable_state_mb": state,
        "activations_mb": activations,
        "total_mb": weights + state + activations,
    }


def budget(run, *, batch_size: int | None = None) -> list[dict]:
    """Predicted (tensor accounting) against measured (stage peak RSS) memory for one run.

    Rows: inference and LoRA fine-tuning of the original, and of the emulator. The
    prediction uses one real training batch; the measurement is the peak resident
    memory of the stage process that did the work (it includes Python and the
    libraries, reported as the stage's baseline).
    """
    from .data import collator_for, tokenize
    from .lora import attach_lora

    model, tokenizer = run.original()
    emulator = run.emulator().model
    size = batch_size or run.config.train.batch_size
    encoded = tokenize(tokenizer, run.task().train.select(range(size)), max_length=run.config.train.max_length)
    batch = collator_for(tokenizer)(encoded.to_list())
    records = run.stage_records()
    rows = []
    for label, net, train, stage in [
        ("inference, original", model, False, "evaluate-original"),
        ("inference, emulator", emulator, False, "evaluate-emulator"),
        ("LoRA fine-tuning, original", model, True, "finetune_original"),
        ("LoRA fine-tuning, emulator", emulator, True, "finetune_emulator"),
    ]:
        target = attach_lora(net, run.config.lora) if train else net
        predicted = footprint(target, batch, train=train)
        if train:
            target.unload()
        record = records.get(stage, {})
        rows.append(
            {
                "setting": label,
                **predicted,
                "measured_peak_mb": record.get("peak_rss_mb"),
                "process_baseline_mb": record.get("baseline_rss_mb"),
            }
        )
    return rows
