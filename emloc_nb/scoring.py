"""Scoring answers: the likelihood of answer tokens, constrained choice among answers, greedy generation.

The training loss (`answer_nll`), the evaluation (`emloc_nb.evaluation`) and the memory
accounting all score answers through these functions, so they agree on what an
answer's likelihood is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from .errors import EmlocError
from .structure import accepts, model_inputs, on_device
from .tokens import IGNORE_INDEX, collator_for, encode_example


def answer_nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labelled (answer) tokens, and its mask.

    With left padding the answers sit at the end of the batch, so only the last
    logits are computed (the LM head is a large share of a small model's cost).
    """
    batch = on_device(model, batch)
    labels = batch["labels"]
    width = labels.shape[1]
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(labelled) == 0:
        raise EmlocError("The batch has no answer tokens (all labels are -100). Check that examples have answers.")
    keep = min(width, width - int(labelled[0]) + 1)
    extra = {"logits_to_keep": keep} if accepts(model, "logits_to_keep") else {}
    head = model.get_output_embeddings()
    # The head reads a strided slice (the kept positions). Over a 16-bit weight, torch's CPU backward then copies
    # the weight once per sequence (about 430 MB for SmolLM2 at batch 8, bench/results/transients.md, item 6); a
    # contiguous input avoids it. float32 has no such copy and keeps its kernels (and its results, bit for bit).
    hook = (
        head.register_forward_pre_hook(_contiguous_input)
        if head is not None and head.weight.dtype != torch.float32
        else None
    )
    try:
        logits = model(**model_inputs(model, batch), use_cache=False, **extra).logits[:, -keep:]
    finally:
        if hook is not None:
            hook.remove()
    target = labels[:, width - keep + 1 :]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    return nll, target != IGNORE_INDEX


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


@torch.no_grad()
def choice_logprobs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]], choices: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each choice's answer tokens after each prompt: (N, K), and token counts.

    The prompt runs once; its key/value cache is repeated for the K continuations.
    """
    k = len(choices)
    collate = collator_for(tokenizer)
    prompt_ids, conts = [], []
    for messages in prompts:
        encs = [encode_example(tokenizer, messages, c) for c in choices]
        n_prompt = encs[0]["labels"].count(IGNORE_INDEX)
        prompt_ids.append({"input_ids": encs[0]["input_ids"][:n_prompt]})
        conts.extend(e["input_ids"][n_prompt:] for e in encs)
    batch = on_device(model, collate(prompt_ids))
    device = batch["input_ids"].device
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    out = model(**model_inputs(model, batch), use_cache=True, **extra)
    first = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(k, 0)
    width = max(len(c) for c in conts)
    cont = torch.full((len(conts), width), collate.pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros_like(cont)
    for i, c in enumerate(conts):
        cont[i, : len(c)] = torch.as_tensor(c)
        cont_mask[i, : len(c)] = 1
    cont, cont_mask = cont.to(device), cont_mask.to(device)
    logp = torch.zeros(cont.shape, device=device)
    logp[:, 0] = first.gather(1, cont[:, :1]).squeeze(1)
    if width > 1:
        cache_arg = "cache" if accepts(model, "cache") else "past_key_values"  # renamed in transformers 5.x
        cache = getattr(out, cache_arg)
        cache.batch_repeat_interleave(k)
        mask = torch.cat([batch["attention_mask"].repeat_interleave(k, 0), cont_mask], dim=1)
        step = {
            "input_ids": cont,
            "attention_mask": mask,
            "position_ids": batch["position_ids"][:, -1:].repeat_interleave(k, 0)
            + 1
            + torch.arange(width, device=device),
        }
        rest = model(**model_inputs(model, step), **{cache_arg: cache}, use_cache=True).logits.float().log_softmax(-1)
        logp[:, 1:] = rest[:, :-1].gather(2, cont[:, 1:, None]).squeeze(2)
    logp = logp * cont_mask
    return logp.sum(1).view(-1, k).cpu(), cont_mask.sum(1).view(-1, k).cpu()


@torch.no_grad()
def answer_states(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]], *, batch_size: int = 16
) -> torch.Tensor:
    """The output layer's input where each prompt's answer starts (N, d), in float32 on the CPU.

    The output layer is linear, so these states give the first answer token's logits
    under any change to that layer alone: what the prior correction fits.
    """
    captured: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: captured.append(args[0][:, -1].detach().float().cpu())
    )
    collate = collator_for(tokenizer)
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = on_device(model, collate([{"input_ids": encode_example(tokenizer, m)["input_ids"]} for m in chunk]))
            model(**model_inputs(model, batch), use_cache=False, **extra)
    finally:
        hook.remove()
    return torch.cat(captured)


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]], max_new_tokens: int
) -> list[str]:
    """Greedy replies to each prompt, as text (special tokens dropped)."""
    collate = collator_for(tokenizer)
    batch = on_device(model, collate([{"input_ids": encode_example(tokenizer, m)["input_ids"]} for m in prompts]))
    out = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=collate.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
