"""A safetensors checkpoint read block by block: which shard holds each tensor, the model's block list, and what
its first block is called with. What the streamed build (emloc_nb.streaming) walks over.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from .errors import EmlocError, first_line
from .model_sources import checkpoint_files, resolve_checkpoint
from .models import skeleton
from .serial import read_tensors, safetensors_header
from .structure import (
    block_index,
    block_linears,
    check_token_ids,
    model_inputs,
    on_device,
)


class Checkpoint:
    """A safetensors checkpoint directory read a few tensors at a time: which file holds each, and its skeleton."""

    def __init__(self, source: str | os.PathLike, *, trust_remote_code: bool = False):
        self.path = resolve_checkpoint(source)
        self.trust_remote_code = trust_remote_code
        files = checkpoint_files(self.path)
        if not files:
            raise EmlocError(
                f"{self.path} has no model.safetensors or model.safetensors.index.json, which a streamed build "
                "reads. Save the model with save_pretrained, or set emulator.streaming: false."
            )
        self.weight_map = {name: file for file in files for name in safetensors_header(file)}

    def skeleton(self) -> nn.Module:
        """The model with its parameters on the meta device; buffers such as rotary frequencies are real."""
        model = skeleton(self.path, trust_remote_code=self.trust_remote_code)
        model.tie_weights()  # a tied head (SmolLM2's) is stored once, under the embeddings' name
        model.eval()
        return model

    @contextlib.contextmanager
    def mismatch(self):
        """Loading its tensors into the skeleton: a shape or dtype its config does not expect, as one EmlocError."""
        try:
            yield
        except EmlocError:
            raise
        except (RuntimeError, ValueError) as e:
            raise EmlocError(
                f"{self.path} holds tensors its config.json does not describe ({first_line(e)}). The config and the "
                "weights come from different models: save the model again."
            ) from None

    def tensors(self, names: list[str], *, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors, converted and placed one at a time (serial.read_tensors)."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise EmlocError(f"{self.path} lacks {missing[:3]}. The checkpoint is incomplete or of another model.")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            out.update(read_tensors(file, dtype=dtype, device=device, names=keys))
        return out


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor, kwargs: dict):
        self.hidden, self.kwargs = hidden, kwargs


class _Capture(nn.Module):
    """Stands in for the first block: records what the model passes it, then stops the forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        if hasattr(block, "attention_type"):
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise EmlocError("A streamed build needs blocks called with keyword arguments after the hidden states.")
        raise _Captured(hidden_states, kwargs)


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks ("model.layers") and its name."""
    names = {n.rsplit(f".{block_index(n)}.", 1)[0] for n in block_linears(model)}
    if len(names) != 1:
        raise EmlocError(f"Found block lists {sorted(names)}; a streamed build needs exactly one.")
    name = names.pop()
    blocks = model.get_submodule(name)
    if not isinstance(blocks, nn.ModuleList):
        raise EmlocError(f"{name} is not a ModuleList of blocks; this model cannot be built by streaming.")
    # transformers names each block's mask in config.layer_types (Qwen2, Gemma); older models on the block itself
    layer_types = getattr(model.config, "layer_types", None)
    kinds = set(layer_types) if layer_types else {getattr(b, "attention_type", None) for b in blocks}
    if len(kinds) > 1:
        raise EmlocError(
            f"The blocks of this model take different attention masks ({sorted(map(str, kinds))}); a streamed build "
            "needs one for all. Set emulator.streaming: false."
        )
    return name, blocks


def buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the real buffers (rotary frequencies) to `device`; the blocks' meta parameters stay where they are."""
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[key] = buffer.to(device)


def first_block_input(model: nn.Module, blocks: nn.ModuleList, batch: dict) -> dict:
    """The batch as the first block sees it: hidden states and the keyword arguments the model passes blocks."""
    check_token_ids(model, batch)
    first = blocks[0]
    blocks[0] = _Capture(first)
    try:
        moved = on_device(model, batch)
        model(**model_inputs(model, moved), use_cache=False)
    except _Captured as c:
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch.get("attention_mask"),
            "hidden": c.hidden,
            "kwargs": {k: v for k, v in c.kwargs.items() if k not in ("use_cache",)},
        }
    finally:
        blocks[0] = first
    raise EmlocError("The model never called its first block; it cannot be built by streaming.")


def checkpoint_tokenizer(checkpoint: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(checkpoint.path), trust_remote_code=checkpoint.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError):  # a checkpoint without tokenizer files (a synthetic benchmark model)
        return None
