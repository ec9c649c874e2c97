"""A model's structure: its linear layers and repeated blocks, what its forward takes, and its inputs."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import BATCH, EmlocError, check_kind

# ----------------------------------------------------------------------------- structure helpers


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) matrix a layer applies: Conv1D stores it transposed, a factored layer as a product."""
    if hasattr(module, "dense_weight"):
        return module.dense_weight()
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The index of the repeated block a module sits in (model.layers.3.mlp -> 3), if any."""
    m = _BLOCK_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by module name, in model order.

    A factored layer (one with `dense_weight()`, like the emulator's LowRankLinear)
    counts as one layer; its factors are not listed.
    """
    layers: dict[str, nn.Module] = {}
    factored: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(f + ".") for f in factored):
            continue
        if hasattr(m, "dense_weight"):
            factored.append(name)
            layers[name] = m
        elif is_linear(m):
            layers[name] = m
    return layers


def _shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear layer, without computing a factored layer's product."""
    if hasattr(module, "dense_weight"):
        return module.out_features, module.in_features
    return tuple(linear_weight(module).shape)


def lora_target_shapes(model: nn.Module, targets: list[str] | str | None) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear layer a LoRA's `targets` name, matched as peft matches them.

    A list names layers by suffix ("q_proj", "self_attn.q_proj"), a string is a regex the whole
    name must match, and None stands for the suffixes of every block linear (emloc_nb.lora.peft_config).
    """
    layers = linear_layers(model)
    if targets is None:
        targets = sorted({n.rsplit(".", 1)[-1] for n in block_linears(model)})
    if isinstance(targets, str):
        return {n: _shape(m) for n, m in layers.items() if re.fullmatch(targets, n)}
    return {n: _shape(m) for n, m in layers.items() if any(n == t or n.endswith(f".{t}") for t in targets)}


def check_lora_rank(model: nn.Module, r: int, targets: list[str] | str | None, name: str = "lora.r") -> None:
    """A LoRA rank no wider than the narrowest layer it targets, checked before peft allocates (d_in + d_out)·r
    weights for each: B·A on a d_out × d_in layer has rank at most min(d_out, d_in)."""
    shapes = lora_target_shapes(model, targets)
    if not shapes:
        return  # no target at all: attaching says so
    narrowest = min(shapes, key=lambda n: min(shapes[n]))
    bound = min(shapes[narrowest])
    if r > bound:
        d_out, d_in = shapes[narrowest]
        raise EmlocError(
            f"{name}={r} is wider than the layers the LoRA targets: {narrowest} is {d_out} × {d_in}, so B·A has "
            f"rank at most {bound}, and a wider LoRA only allocates more weights ((d_in + d_out) · r per layer). "
            f"Set {name} to at most {bound}."
        )


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The name under which `module` sits in `model`."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise EmlocError(f"{type(module).__name__} is not a module of this model. Pass a module taken from the model.")


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the repeated blocks: what EMLoC compresses by default.

    Embeddings, norms and the LM head sit outside the blocks and are kept.
    """
    return {name: m for name, m in linear_layers(model).items() if block_index(name) is not None}


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether the (base) model's forward takes `argument`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def on_device(model: nn.Module, batch: dict) -> dict:
    """`batch` with its tensors on the model's device (collators build them on the CPU)."""
    check_kind(batch, BATCH, "batch")
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The batch entries this model's forward takes: input_ids, attention_mask and, if accepted, position_ids."""
    keys = ["input_ids", "attention_mask"] + (["position_ids"] if accepts(model, "position_ids") else [])
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def nothing_to_predict(what: str) -> EmlocError:
    """The error for batches in which no real token has a real token after it: there is nothing to predict."""
    return EmlocError(
        f"{what}: no example in the batches has two real tokens, so there is no next token to predict. Build the "
        "batches with a longer max_length (at least the chat template's own length), or give longer examples."
    )


def check_token_ids(model: nn.Module, batch: Mapping) -> None:
    """A batch's input_ids as the model's embedding can read them: an integer tensor inside its vocabulary."""
    ids = batch.get("input_ids")
    if not torch.is_tensor(ids) or ids.is_floating_point() or ids.is_complex():
        raise EmlocError(
            f"batch['input_ids'] must be a tensor of token ids, not {type(ids).__name__}"
            f"{'' if not torch.is_tensor(ids) else ' of ' + str(ids.dtype)}. Build batches with emloc_nb.batches."
        )
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None)
    if not vocab or not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise EmlocError(
            f"Token id {high if high >= vocab else low} is outside the model's vocabulary (0..{vocab - 1}). "
            "Tokenize with this model's tokenizer."
        )
