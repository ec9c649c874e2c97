"""LoRA on either model: peft's config for a LoraSpec, attaching it, adapters on disk, and the factors.

The emulator keeps the original's module names, so one LoRA config fits both, and an
adapter trained on the emulator has exactly the keys the original expects. Emulator
layers are LowRankLinear rather than nn.Linear, so they are registered with peft as
a custom module type; peft's own LoRA Linear does the rest. Adapters are standard
peft directories plus emloc.json, which records the base model's fingerprint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .artifacts import (
    FORMAT_VERSION,
    atomic_dir,
    read_tensors,
    verify_manifest,
    write_json,
)
from .config import LoraSpec
from .emulator import LowRankLinear
from .errors import EmlocError
from .models import block_linears, fingerprint

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LowRankLoraLinear(LoraLinear):
    """peft's LoRA Linear over an emulator's LowRankLinear."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features


def peft_config(spec: LoraSpec, model: nn.Module) -> LoraConfig:
    """peft's LoraConfig for `spec` on `model` (original or emulator); no targets: every block linear."""
    targets = spec.targets
    if targets is None:
        targets = sorted({n.rsplit(".", 1)[-1] for n in block_linears(model)})
    if not targets:
        raise EmlocError("No LoRA targets: the model has no linear layers in numbered blocks. Set LoraSpec.targets.")
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        use_rslora=spec.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    return config


def attach_lora(model: nn.Module, spec: LoraSpec) -> PeftModel:
    """Wrap `model` (original or emulator) with a fresh LoRA; only the LoRA weights train."""
    config = peft_config(spec, model)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        targets = config.target_modules
        shown = sorted(targets) if isinstance(targets, (set, list)) else targets
        raise EmlocError(
            f"Could not attach LoRA to targets {shown!r} ({str(e).strip().splitlines()[0][:160]}). "
            "Use suffixes of the model's layer names (e.g. 'q_proj') or a regex."
        ) from None
    return peft_model


def _targeted(peft_model: PeftModel) -> dict[str, nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}


# ----------------------------------------------------------------------------- adapters on disk


def save_adapter(
    peft_model: PeftModel, path: str | Path, *, base_fingerprint: str, info: dict | None = None, overwrite: bool = False
) -> Path:
    """A standard peft adapter directory plus emloc.json recording which base it was trained on, and a manifest."""
    info = info or {}
    check_finite_lora(peft_model, when=f"before the adapter was written to {path}")
    with atomic_dir(
        path, overwrite=overwrite, kind="adapter", model_fingerprint=base_fingerprint, config=info.get("run", {})
    ) as tmp:
        peft_model.save_pretrained(tmp)
        write_json(
            tmp / "emloc.json",
            {"format_version": FORMAT_VERSION, "kind": "adapter", "base_fingerprint": base_fingerprint, **info},
        )
    return Path(path)


def load_adapter(model: nn.Module, path: str | Path, *, trainable: bool = False, check_base: bool = True) -> PeftModel:
    """Attach a saved adapter to `model`, refusing one that was trained on another base.

    `check_base=False` applies it anyway: that is the naive transfer of an emulator's
    LoRA onto the original, the baseline the correction is measured against.
    """
    path = Path(path)
    # Checked here, before peft sees the path: peft looks a path that is not a complete local adapter up on the Hub.
    for needed in ("adapter_config.json", ADAPTER_WEIGHTS):
        if not (path / needed).is_file():
            raise EmlocError(
                f"{path} holds no adapter ({needed} is missing). Write one with `emloc finetune` or `emloc correct`, "
                "or give the adapter's directory."
            )
    manifest = verify_manifest(
        path, kind=("adapter", "corrected_adapter"), model_fingerprint=fingerprint(model) if check_base else None
    )
    bad = [k for k, t in read_tensors(path / ADAPTER_WEIGHTS).items() if not torch.isfinite(t).all()]
    if bad:
        raise EmlocError(f"The adapter at {path} has non-finite weights (NaN/Inf) in {bad[:3]}. Retrain it.")
    try:
        config = LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise EmlocError(f"{path}/adapter_config.json is not a LoRA config peft can read ({e}). Recreate it.") from None
    config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), config=config, is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as e:
        _strip_lora(model)  # peft wraps the layers before it loads the weights: leave `model` as it was
        raise EmlocError(
            f"The adapter at {path} ({manifest['kind']}) does not fit this model ({str(e).splitlines()[0][:200]}). "
            "Load it onto the model it was trained for."
        ) from None
    return peft_model


def _strip_lora(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())


def check_finite_lora(peft_model: PeftModel, *, when: str) -> None:
    """Refuse LoRA weights with NaN/Inf: the loss can look fine while some weights have already diverged."""
    bad = [n for n, p in peft_model.named_parameters() if "lora_" in n and not torch.isfinite(p).all()]
    if bad:
        raise EmlocError(
            f"{len(bad)} LoRA weight tensor(s) became non-finite (NaN/Inf) {when}, e.g. {bad[0]}. "
            "Lower the learning rate (train.lr) and train again."
        )


def lora_factors(peft_model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, s) of the active adapter per targeted layer, with ΔW = s · B A."""
    factors = {}
    for name, layer in _targeted(peft_model).items():
        adapter = layer.active_adapters[0]
        factors[name] = (
            layer.lora_A[adapter].weight.detach(),
            layer.lora_B[adapter].weight.detach(),
            float(layer.scaling[adapter]),
        )
    return factors
