"""The fine-tuning checkpoint, one format for both trainers, and the signature that decides when one may be reused.

A checkpoint is state.safetensors (LoRA weights, optimizer moments, RNG state) and state.json (step,
history, optimizer settings); never a pickle. A checkpoint or a finished adapter is reused only by a
run with the same signature: the same base model (fingerprint and dtype), LoRA, schedule and seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from .artifacts import artifact_dir, verify_manifest
from .config import LoraSpec, TrainSpec
from .errors import EmlocError
from .fingerprints import fingerprint
from .models import model_dtype
from .serial import read_json_object, read_tensors, write_json, write_tensors

# TrainSpec settings that change memory and time but not the trained weights (beyond float summation order,
# which over bf16 frozen weights is bf16's rounding: micro-batched adapters then differ by about as much as
# bf16 ones differ from float32 ones).
MEMORY_LEVERS = ("checkpoint_every", "gradient_checkpointing", "micro_batch_size")
CHECKPOINT = "checkpoint"  # the checkpoint directory in an output directory, and its manifest kind


def save_checkpoint(
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
    with artifact_dir(path, overwrite=True, kind=CHECKPOINT, config=signature) as tmp:
        write_tensors(tmp / "state.safetensors", tensors)
        write_json(
            tmp / "state.json",
            {"step": step, "history": history, "param_groups": opt_state["param_groups"], **(extra or {})},
        )
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def read_checkpoint(path: Path, signature: dict) -> tuple[dict, dict]:
    """(state.json, tensors) of a checkpoint, after checking its manifest and that it belongs to this run."""
    manifest = verify_manifest(path, kind=CHECKPOINT)
    check_same_run(manifest["config"], signature, path)
    meta = read_json_object(path / "state.json", {"step": int, "history": list, "param_groups": list})
    return meta, read_tensors(path / "state.safetensors")


def restore_checkpoint(
    meta: dict, tensors: dict, peft_model: PeftModel, optimizer: torch.optim.Optimizer | None
) -> None:
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


def training_signature(model: nn.Module, lora: LoraSpec, config: TrainSpec, seed: int) -> dict:
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


def check_same_run(recorded: dict | None, signature: dict, where: Path) -> None:
    if recorded == signature:
        return
    differ = sorted(k for k in signature if (recorded or {}).get(k) != signature[k])
    raise EmlocError(
        f"{where} was written by another fine-tuning run (it differs in: {', '.join(differ)}). "
        "Use another output directory, or delete this one to start again."
    )


def checkpoint_to_resume(checkpoint_dir: Path, signature: dict) -> bool:
    """Whether a checkpoint of this same run is there to resume from (one of another run is refused)."""
    if not checkpoint_dir.exists():
        return False
    check_same_run(verify_manifest(checkpoint_dir, kind=CHECKPOINT)["config"], signature, checkpoint_dir)
    return True
