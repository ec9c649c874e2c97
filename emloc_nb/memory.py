"""Memory accounting: what a step must hold, predicted from the tensors themselves.

`footprint` predicts a step's memory from the weights, the trainable state (parameter,
gradient and two AdamW moments per LoRA weight) and the activations autograd saves for the
backward pass, counted with saved-tensor hooks on one real batch. `predict_training` is that
prediction for one LoRA step as `finetune` runs it, on the longest micro-batch
(`longest_examples`). What a run measured is `emloc_nb.measure`; the two side by side, for one
run, are `emloc_nb.budget`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .lora import attach_lora
from .measure import MB, tensor_bytes, weights_mb
from .scoring import answer_nll
from .tokens import tokenize


def footprint(model: nn.Module, batch: dict, *, train: bool = True, checkpointed: bool = False) -> dict:
    """Predicted memory of one step on `batch`, in MB.

    train=True: a LoRA training step (the model should have its LoRA attached, so
    that only LoRA weights require grad); train=False: a no-grad forward.
    checkpointed=True: the step under gradient checkpointing of the repeated blocks,
    which keeps only each block's input and what autograd saves outside the blocks,
    and holds one block's saved activations at a time while the backward recomputes it.
    The step itself runs without checkpointing, each saved tensor attributed to its block.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running: list[int | None] = [None]  # the block whose forward is running, None outside the blocks
    saved: dict[int | None, list[torch.Tensor]] = {None: []}
    block_inputs: list[torch.Tensor] = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.setdefault(running[0], []).append(t)
        return t

    def enter(index):
        def hook(module, args, kwargs):
            running[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                block_inputs.append(hidden)

        return hook

    def leave(module, args, output):
        running[0] = None

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [
        h
        for i, b in enumerate(blocks)
        for h in (b.register_forward_pre_hook(enter(i), with_kwargs=True), b.register_forward_hook(leave))
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        with torch.set_grad_enabled(train), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            nll, mask = answer_nll(model, batch)
            if train and trainable:
                nll[mask].mean().backward()
    finally:
        for h in handles:
            h.remove()
    for p in trainable:
        p.grad = None
    if checkpointed and blocks:
        kept = saved[None] + block_inputs
        base = tensor_bytes(kept)
        recompute = max((tensor_bytes(kept + saved.get(i, [])) - base for i in range(len(blocks))), default=0)
        activations = (base + recompute) / MB
    else:
        activations = tensor_bytes([t for ts in saved.values() for t in ts]) / MB
    weights = weights_mb(model)
    state = 4 * sum(p.numel() * p.element_size() for p in trainable) / MB if train else 0.0
    return {
        "weights_mb": weights,
        "trainable_state_mb": state,
        "activations_mb": activations,
        "total_mb": weights + state + activations,
    }


def predict_training(model: nn.Module, lora, config, batch: dict) -> dict:
    """`footprint` of one LoRA training step of `model` as `finetune` runs it: the LoRA attached, in training
    mode, gradient checkpointing if `config` (a TrainSpec) asks, on `batch` (one micro-batch, collated as
    `finetune` collates it: `training.training_collator(tokenizer, model)`; the run's largest is
    `longest_examples`); `model` is left as it was."""
    peft_model = attach_lora(model, lora)
    peft_model.train()
    try:
        return footprint(peft_model, batch, train=True, checkpointed=config.gradient_checkpointing)
    finally:
        peft_model.eval()
        peft_model.unload()


def longest_examples(tokenizer, dataset, size: int, *, max_length: int) -> list[dict]:
    """The `size` longest examples of `dataset`, tokenized as `finetune` tokenizes them.

    A run's memory peaks at its longest micro-batch, so the planner predicts from these: no micro-batch
    of `size` examples drawn from `dataset` pads to more tokens. The first ones can be much shorter: the
    default recipe's run trains first on an example of 61 tokens, and its longest has 109.
    """
    encoded = tokenize(tokenizer, dataset, max_length=max_length).to_list()
    return sorted(encoded, key=lambda e: len(e["input_ids"]), reverse=True)[:size]
