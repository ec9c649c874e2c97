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

from .artifacts import FORMAT_VERSION, atomic_dir, check_fingerprint, read_json, write_json, write_tensors
from .config import LoraSpec
from .emulator import LowRankLinear
from .errors import EmlocError
from .memory import phase
from .models import block_linears, fingerprint

INITIAL_A_FILE = "initial_lora_A.safetensors"  # beside an adapter: A at initialisation, per layer


class LowRankLoraLinear(LoraLinear):
    """peft's LoRA Linear over an emulator's LowRankLinear."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features


def peft_config(spec: LoraSpec, model: nn.Module) -> LoraConfig:
    """peft's LoraConfig for `spec` on `model` (original or emulator); no targets: every block linear."""
    if spec.r < 1:
        raise EmlocError(f"LoRA rank r={spec.r} must be at least 1.")
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


def attach_lora(model: nn.Module, spec: LoraSpec, *, stats=None) -> PeftModel:
    """Wrap `model` (original or emulator) with a fresh LoRA; only the LoRA weights train.

    `spec.init="eigen"` starts each A on the top-r eigenvectors of its layer's input second
    moment (from `stats`, CalibrationStats of the original), at the row norm of peft's own
    initialisation, so that the LoRA's input subspace is one the data uses. B starts at zero
    either way, so the model's output does not change.
    """
    config = peft_config(spec, model)
    if spec.init == "eigen" and stats is None:
        raise EmlocError("LoRA init 'eigen' needs the calibration statistics: pass stats= (or use init='random').")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise EmlocError(
            f"Could not attach LoRA to targets {config.target_modules!r}: {e}. "
            "Use suffixes of the model's layer names (e.g. 'q_proj') or a regex."
        ) from None
    if spec.init == "eigen":
        eigenvectors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, layer in _targeted(peft_model).items():
                a = layer.lora_A[layer.active_adapters[0]].weight
                key = stats.key_for(name)
                if key not in eigenvectors:
                    eigenvectors = {key: torch.linalg.eigh(stats.inputs[key].covariance.float())[1].flip(1)}
                a.copy_(eigenvectors[key][:, : a.shape[0]].T / 3**0.5)  # kaiming-uniform rows have norm ≈ 1/√3
    return peft_model


def initial_factors(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """A of every targeted layer as it is now (call it right after attach_lora)."""
    return {name: a.clone() for name, (a, _, _) in lora_factors(peft_model).items()}


def _targeted(peft_model: PeftModel) -> dict[str, nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}


# ----------------------------------------------------------------------------- adapters on disk


def save_adapter(
    peft_model: PeftModel,
    path: str | Path,
    *,
    base_fingerprint: str,
    info: dict | None = None,
    initial: dict[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """A standard peft adapter directory plus emloc.json recording which base it was trained on.

    `initial` (A at initialisation, per layer) is kept beside it, for the correction's diagnostics.
    """
    with atomic_dir(path, overwrite=overwrite) as tmp:
        peft_model.save_pretrained(tmp)
        if initial:
            write_tensors(tmp / INITIAL_A_FILE, initial)
        write_json(
            tmp / "emloc.json",
            {"format_version": FORMAT_VERSION, "kind": "adapter", "base_fingerprint": base_fingerprint, **(info or {})},
        )
    return Path(path)


@phase("adapter_load")
def load_adapter(model: nn.Module, path: str | Path, *, trainable: bool = False, check_base: bool = True) -> PeftModel:
    """Attach a saved adapter to `model`, refusing one that was trained on another base.

    `check_base=False` applies it anyway: that is the naive transfer of an emulator's
    LoRA onto the original, the baseline the correction is measured against.
    """
    path = Path(path)
    if not (path / "adapter_config.json").is_file():  # also keeps peft from looking the path up on the Hub
        raise EmlocError(
            f"{path} holds no adapter (no adapter_config.json). "
            "Write one with `emloc finetune` or `emloc correct`, or give the adapter's directory."
        )
    if check_base:
        meta_file = path / "emloc.json"
        if not meta_file.is_file():
            raise EmlocError(
                f"The adapter at {path} does not record which model it was trained on (no emloc.json), "
                "so it cannot be checked. Pass check_base=False to apply it anyway."
            )
        check_fingerprint(
            read_json(meta_file)["base_fingerprint"],
            fingerprint(model),
            artifact=f"The adapter at {path}",
            model="the model it is loaded onto",
        )
    config = LoraConfig.from_pretrained(str(path))
    config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    return PeftModel.from_pretrained(model, str(path), config=config, is_trainable=trainable)


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
