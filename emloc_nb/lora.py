"""LoRA on either model: peft's config for a LoraSpec, attaching it, adapters on disk, and the factors.

The emulator keeps the original's module names, so one LoRA config fits both, and an
adapter trained on the emulator has exactly the keys the original expects. Emulator
layers are LowRankLinear rather than nn.Linear, so they are registered with peft as
a custom module type; peft's own LoRA Linear does the rest. Adapters are standard
peft directories plus emloc.json, which records the base model's fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .artifacts import FORMAT_VERSION, artifact_dir, verify_manifest
from .checks import check_value
from .config import LoraSpec
from .errors import EmlocError, first_line
from .factoring import LowRankLinear
from .fingerprints import fingerprint
from .measure import phase
from .serial import read_json_object, read_tensors, write_json, write_tensors
from .structure import block_linears, check_lora_rank

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INFO = "emloc.json"  # beside peft's files: the base the adapter is for, and how it was made
INITIAL_A_FILE = "initial_lora_A.safetensors"  # beside an adapter: A at initialisation, per layer


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


@contextlib.contextmanager
def _quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing`: a warning that is not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def attach_lora(model: nn.Module, spec: LoraSpec, *, stats=None) -> PeftModel:
    """Wrap `model` (original or emulator) with a fresh LoRA; only the LoRA weights train.

    `spec.init="eigen"` starts each A on the top-r eigenvectors of its layer's input second
    moment (from `stats`, CalibrationStats of the original), at the row norm of peft's own
    initialisation, so that the LoRA's input subspace is one the data uses. B starts at zero
    either way, so the model's output does not change.
    """
    config = peft_config(spec, model)
    check_lora_rank(model, spec.r, spec.targets)
    if spec.init == "eigen" and stats is None:
        raise EmlocError("LoRA init 'eigen' needs the calibration statistics: pass stats= (or use init='random').")
    try:
        with _quiet_peft():
            peft_model = get_peft_model(model, config)
    except ValueError as e:
        targets = config.target_modules
        shown = sorted(targets) if isinstance(targets, (set, list)) else targets
        raise EmlocError(
            f"Could not attach LoRA to targets {shown!r} ({str(e).strip().splitlines()[0][:160]}). "
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
    """A standard peft adapter directory plus emloc.json recording which base it was trained on, and a manifest.

    `initial` (A at initialisation, per layer) is kept beside it, for the correction's diagnostics; the
    manifest covers it too.
    """
    info = info or {}
    check_finite_lora(peft_model, when=f"before the adapter was written to {path}")
    with artifact_dir(
        path, overwrite=overwrite, kind="adapter", model_fingerprint=base_fingerprint, config=info.get("run", {})
    ) as tmp:
        peft_model.save_pretrained(tmp)
        if initial:
            write_tensors(tmp / INITIAL_A_FILE, initial)
        write_adapter_info(tmp, kind="adapter", base_fingerprint=base_fingerprint, info=info)
    return Path(path)


def write_lora_factors(
    directory: Path, tensors: dict, ranks: dict[str, int], *, task_type, fan_in_fan_out: bool
) -> None:
    """A standard peft adapter's files from its factors (as keyed in peft's state), with the scaling folded in
    (lora_alpha = r for every layer): what an adapter computed rather than trained (the corrected one) is."""
    r = max(ranks.values())
    LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        use_rslora=False,
        lora_dropout=0.0,
        bias="none",
        task_type=task_type,
        fan_in_fan_out=fan_in_fan_out,
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: k for n, k in ranks.items() if k != r},
    ).save_pretrained(str(directory))
    write_tensors(directory / ADAPTER_WEIGHTS, tensors)


def write_adapter_info(directory: Path, *, kind: str, base_fingerprint: str, info: dict) -> None:
    """emloc.json of an adapter directory: its kind ("adapter" or "corrected_adapter"), the fingerprint of the
    base it is for (load_adapter refuses another base), and `info` (how it was made)."""
    write_json(
        directory / ADAPTER_INFO,
        {"format_version": FORMAT_VERSION, "kind": kind, "base_fingerprint": base_fingerprint, **info},
    )


@phase("adapter_load")
def load_adapter(
    model: nn.Module, path: str | Path, *, trainable: bool = False, check_base: bool = True, manifest: bool = True
) -> PeftModel:
    """Attach a saved adapter to `model`, refusing one that was trained on another base.

    `check_base=False` applies it anyway: that is the naive transfer of an emulator's
    LoRA onto the original, the baseline the correction is measured against.
    `manifest=False` is for an adapter directory still being written (it has no manifest
    yet); its weights and config are checked all the same.
    """
    path = Path(path)
    # Checked here, before peft sees the path: peft looks a path that is not a complete local adapter up on the Hub.
    for needed in ("adapter_config.json", ADAPTER_WEIGHTS):
        if not (path / needed).is_file():
            raise EmlocError(
                f"{path} holds no adapter ({needed} is missing). Write one with `emloc finetune` or `emloc correct`, "
                "or give the adapter's directory."
            )
    kind = "adapter being written"
    if manifest:
        kind = verify_manifest(
            path, kind=("adapter", "corrected_adapter"), model_fingerprint=fingerprint(model) if check_base else None
        )["kind"]
    bad = [k for k, t in read_tensors(path / ADAPTER_WEIGHTS).items() if not torch.isfinite(t).all()]
    if bad:
        raise EmlocError(f"The adapter at {path} has non-finite weights (NaN/Inf) in {bad[:3]}. Retrain it.")
    config = _read_lora_config(path / "adapter_config.json", model)
    try:
        with _quiet_peft():
            peft_model = PeftModel.from_pretrained(model, str(path), config=config, is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, ImportError, IndexError) as e:
        _strip_lora(model)  # peft wraps the layers before it loads the weights: leave `model` as it was
        raise EmlocError(
            f"The adapter at {path} ({kind}) does not fit this model ({first_line(e)}). "
            "Load it onto the model it was trained for."
        ) from None
    return peft_model


# The adapter_config.json fields emloc-nb's adapters set, checked as RunConfig fields are. Every other field must
# keep peft's default, so that no option peft would act on (e.g. a megatron module to import) slips through.
_LORA_FIELDS = {
    "r": (int, {"min": 1}),
    "lora_alpha": (float, {"gt": 0}),
    "lora_dropout": (float, {"min": 0, "lt": 1}),
    "target_modules": (list[str] | str, {"nonempty": True, "regex": True}),
    "rank_pattern": (dict, {}),
    "alpha_pattern": (dict, {}),
    "use_rslora": (bool, {}),
    "fan_in_fan_out": (bool, {}),
    "inference_mode": (bool, {}),
    "task_type": (str | None, {}),
}
_INFORMATIONAL = {"peft_type", "peft_version", "base_model_name_or_path", "revision", "auto_mapping"}


def _read_lora_config(path: Path, model: nn.Module) -> LoraConfig:
    """The LoraConfig of an adapter_config.json, checked field by field before peft acts on any of it."""
    raw = read_json_object(path, {"peft_type": str})
    where = f"{path}: "
    if raw["peft_type"] != "LORA":
        raise EmlocError(f"{where}peft_type is {raw['peft_type']!r}, not 'LORA'. Load a LoRA adapter.")
    largest = max((max(_dims(m)) for m in block_linears(model).values()), default=1)
    checked = {}
    for key, (hint, meta) in _LORA_FIELDS.items():
        if key in raw:
            checked[key] = check_value(raw[key], hint, where + key, meta)
    for key in ("rank_pattern", "alpha_pattern"):
        for name, value in checked.get(key, {}).items():
            check_value(value, int if key == "rank_pattern" else float, f"{where}{key}[{name!r}]", {"gt": 0})
    for rank in [checked.get("r", 8), *checked.get("rank_pattern", {}).values()]:
        check_value(rank, int, f"{where}r", {"max": largest, "hint": "the largest layer dimension of this model"})
    defaults = json.loads(json.dumps(LoraConfig().to_dict(), default=str))
    odd = [k for k in raw if k not in _LORA_FIELDS and k not in _INFORMATIONAL and raw[k] != defaults.get(k, raw[k])]
    odd += [k for k in raw if k not in defaults]
    if odd:
        raise EmlocError(
            f"{where}sets {sorted(odd)[:3]}, which emloc-nb adapters never use. Load an adapter written by emloc-nb."
        )
    config = LoraConfig(**checked)
    config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    return config


def _dims(module: nn.Module) -> tuple[int, int]:
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


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
