"""The prior correction: a logit offset that gives the corrected model a target mean answer distribution.

The emulator's drift biases its answers, the LoRA learns to undo that bias, and on the original
the undoing overshoots into a bias of its own. A rank-1 LoRA on the output layer,
ΔW_out = b aᵀ with a·h ≈ 1 at the answer position, adds the logit offset b that gives the
original + corrected LoRA a target mean answer distribution over the (unlabelled) calibration
prompts; it ships in the corrected adapter. The target is either the training answers' class
shares (a model fitted by maximum likelihood with a free output bias predicts, on average over
its training prompts, the class shares of its labels; the transfer loses that and this restores
it), or the fine-tuned emulator's own mean answer distribution (for generation tasks, which have
no classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import EmlocError
from .tokens import IGNORE_INDEX, encode_example


@dataclass
class PriorFit:
    """The prior correction's logit offset and what it did, on the tokens it acts on (its support)."""

    token_ids: list[int]
    tokens: list[str]  # the support tokens as text
    bias: list[float]  # logit offset per support token
    target: list[float]  # the target mean probability of each support token
    before: list[float]  # the original + corrected LoRA's, without the offset
    after: list[float]  # and with it
    spread: float  # std over the prompts of a·h (1 ± spread: how constant the rank-1 offset is)
    direction: torch.Tensor = field(repr=False)  # a, (d,)
    target_kind: str = "emulator"  # whose mean distribution the target is: "labels" or "emulator"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "direction"}


def fit_prior(
    states: torch.Tensor,
    head: nn.Module,
    target: torch.Tensor,
    *,
    tokenizer=None,
    min_prob: float = 1e-3,
    steps: int = 200,
    tol: float = 1e-7,
) -> PriorFit:
    """The offset b on the support tokens such that softmax(head(h) + b a·h), averaged over `states`, matches `target`.

    `target` is a mean next-token distribution over the same prompts (`label_target` or the
    fine-tuned emulator's); the support is every token either side gives at least `min_prob` on average.
    """
    with torch.no_grad():
        logits = head(states.to(head.weight.dtype)).double()
    target = target.double()
    mean = states.double().mean(0)
    direction = mean / mean.dot(mean)
    t = states.double() @ direction  # ≈ 1: the rank-1 LoRA's gain at each prompt
    before = logits.softmax(-1).mean(0)
    support = ((before >= min_prob) | (target >= min_prob)).nonzero().flatten()
    b = torch.zeros(len(support), dtype=torch.float64)
    for _ in range(steps):  # iterative proportional fitting of the mean distribution on the support
        shifted = logits.clone()
        shifted[:, support] += t[:, None] * b
        p = shifted.softmax(-1).mean(0)[support]
        step = p.log() - target[support].clamp_min(1e-30).log()
        b -= step
        if float(step.abs().max()) < tol:
            break
    shifted = logits.clone()
    shifted[:, support] += t[:, None] * b
    after = shifted.softmax(-1).mean(0)
    ids = support.tolist()
    return PriorFit(
        ids,
        [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids],
        b.tolist(),
        target[support].tolist(),
        before[support].tolist(),
        after[support].tolist(),
        float(t.std()) if len(t) > 1 else 0.0,
        direction.float(),
    )


def answer_tokens(tokenizer, prompt: list[dict], choices: list[str]) -> list[int]:
    """The token each choice's answer starts with after `prompt`; they must differ to tell the choices apart."""
    ids = []
    for choice in choices:
        enc = encode_example(tokenizer, prompt, choice)
        n_prompt = enc["labels"].count(IGNORE_INDEX)
        ids.append(enc["input_ids"][n_prompt] if len(enc["input_ids"]) > n_prompt else None)
    if None in ids or len(set(ids)) < len(ids):
        raise EmlocError(
            f"The choices {choices} do not start with distinct tokens, so no class prior can be fitted on the first "
            "answer token. Set correction.prior_target: emulator."
        )
    return ids


def label_target(states: torch.Tensor, head: nn.Module, token_ids: list[int], shares: list[float]) -> torch.Tensor:
    """The mean next-token distribution of `states` with its mass on the choices' tokens re-split by `shares`."""
    with torch.no_grad():
        mean = head(states.to(head.weight.dtype)).double().softmax(-1).mean(0)
    target = mean.clone()
    ids = torch.tensor(token_ids)
    target[ids] = mean[ids].sum() * torch.tensor(shares, dtype=torch.float64) / sum(shares)
    return target


def prior_tensors(fit: PriorFit, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-1 LoRA (A = aᵀ, B = b on the support) that adds the offset to the output layer."""
    b = torch.zeros(head.weight.shape[0], 1)
    b[fit.token_ids, 0] = torch.tensor(fit.bias, dtype=b.dtype)
    return fit.direction[None, :].clone(), b
