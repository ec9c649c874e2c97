"""Fingerprints: a stable hash of a model's weights, so artifacts are checked against the model they belong to."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .measure import phase


@phase("fingerprint")
def fingerprint(model: nn.Module) -> str:
    """A stable hash of the weights' names, shapes and a strided sample of their values.

    LoRA adapter weights are ignored, so a model has the same fingerprint with or
    without an adapter attached. The same model in float32 and in bfloat16 has the same
    fingerprint too (values are sampled at bfloat16 precision), so an adapter trained
    with bf16 frozen weights still matches its float32 base.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return fingerprint_of(
        tensor_sample(name.replace(".base_layer.", "."), tensor)
        for name, tensor in model.state_dict().items()
        if "lora_" not in name
    )


def tensor_sample(name: str, tensor: torch.Tensor) -> tuple[str, bytes]:
    """What the fingerprint hashes of one tensor: its name and shape, and 64 strided values."""
    flat = tensor.detach().reshape(-1)
    k = min(64, flat.numel())
    idx = (torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)).to(flat.device)
    values = flat[idx]
    kind = "float" if values.is_floating_point() else str(values.dtype)
    if values.is_floating_point():
        values = values.to(torch.bfloat16)
    return f"{name}:{tuple(tensor.shape)}:{kind}", values.to(torch.float64).cpu().numpy().tobytes()


def fingerprint_of(samples) -> str:
    """The fingerprint from `tensor_sample`s taken in any order (a streamed build takes them one block at a time)."""
    h = hashlib.sha256()
    for head, values in sorted(samples):
        h.update(head.encode())
        h.update(values)
    return h.hexdigest()[:16]
