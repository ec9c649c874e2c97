"""Aligning the emulator with the original before the task LoRA, in the spirit of LoRAM's alignment.

Truncation moves the emulator's next-token distribution away from the original's. A LoRA trained on
the emulator then learns part of that gap along with the task, and the transfer carries it to the
original, where it does not belong. A few steps of distillation shrink the gap first: the emulator's
low-rank factors (and nothing else) are trained to minimise KL(original ‖ emulator) over every token
of the calibration examples.

The original's final hidden states are computed once, without gradients, and its distribution is
recomputed from them through the output layer the two models share, so no vocabulary-sized tensor is
kept. The alignment is folded into the factors: the emulator stays a low-rank copy of the original,
and the transfer to the original needs nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EmlocError
from .factoring import LowRankLinear
from .progress import progress as progress_bar


def final_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """The input of the output layer (after the final norm), shape (batch, tokens, hidden)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[-1]


def token_kl(head: nn.Module, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens of KL(teacher ‖ student), both distributions through the output layer `head`."""
    log_t = F.log_softmax(head(teacher).float(), dim=-1)
    log_s = F.log_softmax(head(student).float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _rows(batches: list[dict]) -> list[dict]:
    """One example per forward: the vocabulary-sized logits of a whole batch would dominate the peak."""
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def mean_kl(emulator: nn.Module, rows: list[dict], teacher: list[torch.Tensor]) -> float:
    head = emulator.get_output_embeddings()
    with torch.no_grad():
        kls = [token_kl(head, final_hidden(emulator, r), t, r["attention_mask"]).item() for r, t in zip(rows, teacher)]
    return sum(kls) / len(kls)


@dataclass
class Targets:
    """The original's final hidden states on each example (one per row), computed once: what the emulator is
    distilled toward (`train`) and checked against (`heldout`)."""

    train: list[dict]
    train_states: list[torch.Tensor]
    heldout: list[dict]
    heldout_states: list[torch.Tensor]


@torch.no_grad()
def distillation_targets(original: nn.Module, batches: list[dict], heldout: list[dict]) -> Targets:
    """The original's side of the distillation, computed once at its inference memory."""
    train_rows, heldout_rows = _rows(batches), _rows(heldout)
    return Targets(
        train_rows,
        [final_hidden(original, r) for r in train_rows],
        heldout_rows,
        [final_hidden(original, r) for r in heldout_rows],
    )


def align_emulator(
    emulator: nn.Module,
    targets: Targets,
    *,
    steps: int,
    lr: float,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Distil `emulator` (in place) toward `targets` for `steps` AdamW steps of `batch_size` training examples.

    Returns what it did: its settings, the training KL of each step, and the mean KL per token on
    the held-out examples before and after (the check that the alignment generalises beyond the examples it saw).
    """
    factors = [p for m in emulator.modules() if isinstance(m, LowRankLinear) for p in m.parameters()]
    if not factors:
        raise EmlocError(
            "This emulator has no low-rank layers to align (every layer is kept dense). Set align_steps: 0."
        )
    if emulator.get_output_embeddings() is None:
        raise EmlocError(f"{type(emulator).__name__} has no output layer to distil through. Set align_steps: 0.")
    before = mean_kl(emulator, targets.heldout, targets.heldout_states)

    trainable = {id(p) for p in factors}
    frozen = [p for p in emulator.parameters() if id(p) not in trainable and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in factors:
        p.requires_grad_(True)
    head = emulator.get_output_embeddings()
    optimizer = torch.optim.AdamW(factors, lr=lr, weight_decay=0.0)
    rows, states = targets.train, targets.train_states
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    history, position = [], 0
    try:
        for _ in progress_bar(range(steps), desc="align", total=steps, enabled=progress):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(batch_size):  # one example per forward, the gradients summed
                i = order[position % len(order)]
                position += 1
                loss = token_kl(head, final_hidden(emulator, rows[i]), states[i], rows[i]["attention_mask"])
                (loss / batch_size).backward()
                total += loss.item() / batch_size
            optimizer.step()
            history.append(total)
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in factors:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    return {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "examples": len(rows),
        "train_kl": history,
        "heldout_kl_before": before,
        "heldout_kl_after": mean_kl(emulator, targets.heldout, targets.heldout_states),
    }
