"""The downstream-aware emulator: a copy of the model whose block linears are factored (emloc_nb.factoring).

The emulator is a copy of the model (same class, same module names) whose chosen
layers are LowRankLinear; every other tensor is shared with the original, not copied.
`build_emulator` makes one; `Emulator` saves and loads it as a self-contained directory.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .artifacts import FORMAT_VERSION, artifact_dir, check_fingerprint, verify_manifest
from .calibration import CalibrationStats
from .errors import MODEL, PATH, EmlocError, argument_kinds, first_line
from .factoring import MODES, LowRankLinear, Whiteners, check_whitening, factor_layer
from .fingerprints import fingerprint
from .measure import phase
from .models import load_errors, materialize, resolve_device, torch_dtype
from .progress import progress as progress_bar
from .ranks import RankPlan
from .serial import read_json_object, shard_files, write_json, write_tensors
from .spectra import SpectrumTable
from .structure import block_linears, linear_layers, linear_weight


@dataclass
class Emulator:
    """A compressed copy of a model plus everything needed to inspect and reuse it."""

    model: PreTrainedModel
    spectra: SpectrumTable
    plan: RankPlan
    mode: str
    original_fingerprint: str
    calibration: dict = field(default_factory=dict)  # examples and tokens the statistics came from
    alignment: dict = field(default_factory=dict)  # emloc_nb.alignment's account; empty: the factors as built

    @property
    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.model.named_modules() if isinstance(m, LowRankLinear)}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.model)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    @phase("save")
    @argument_kinds(path=PATH)
    def save(self, path: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
        """Write a self-contained directory: config, weights, metadata, spectra (and the tokenizer), and a manifest."""
        with artifact_dir(
            path,
            overwrite=overwrite,
            kind="emulator",
            model_fingerprint=self.original_fingerprint,
            config=manifest_config(self.plan, self.mode, self.calibration.get("shrinkage", 0.0)),
        ) as tmp:
            write_tensors(tmp / WEIGHTS, _unique_state(self.model))
            write_emulator_metadata(
                tmp,
                model_config=self.model.config,
                model_class=type(self.model).__name__,
                spectra=self.spectra,
                tokenizer=tokenizer,
                original_fingerprint=self.original_fingerprint,
                emulator_fingerprint=self.fingerprint,
                mode=self.mode,
                plan=self.plan,
                ranks=self.ranks,
                layer_bias={
                    n: m.up.bias is not None for n, m in self.model.named_modules() if isinstance(m, LowRankLinear)
                },
                calibration=self.calibration,
                alignment=self.alignment,
            )
        return Path(path)

    @classmethod
    @phase("load")
    @argument_kinds(path=PATH, original=MODEL.optional())
    def load(
        cls, path: str | Path, *, original: nn.Module | None = None, dtype: str | torch.dtype | None = None, device=None
    ) -> Emulator:
        """Load an emulator without its original. With `original`, refuse one built from another model.

        The weights are memory-mapped (converted to `dtype` and placed on `device` one tensor
        at a time when asked), never read into a second copy.
        """
        from accelerate import init_empty_weights

        path = Path(path)
        verify_manifest(
            path, kind="emulator", model_fingerprint=fingerprint(original) if original is not None else None
        )
        meta = read_json_object(
            path / "emulator.json",
            {"kind": str, "original_fingerprint": str, "emulator_fingerprint": str, "mode": str, "plan": dict},
        )
        if meta["kind"] != "emulator":
            raise EmlocError(
                f"{path} is not an emulator directory (no emulator.json of kind 'emulator'). Point at the output of "
                "build_emulator."
            )
        if original is not None:
            check_fingerprint(
                meta["original_fingerprint"],
                fingerprint(original),
                artifact=f"The emulator at {path}",
                model="the given original model",
            )
        with load_errors(path, trust_remote_code=False):
            # A model's own code never runs from an emulator directory: trust_remote_code is off here, always.
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        try:
            ranks, biases = meta["ranks"], meta["layer_bias"]
            for name, rank in ranks.items():
                if (
                    not isinstance(rank, int)
                    or isinstance(rank, bool)
                    or rank < 1
                    or not isinstance(biases[name], bool)
                ):
                    raise ValueError(f"rank {rank!r} of {name}")
                old = model.get_submodule(name)
                w = linear_weight(old)
                _replace(
                    model,
                    name,
                    LowRankLinear(w.shape[1], w.shape[0], rank, bias=biases[name], device="meta", dtype=w.dtype),
                )
            files = weight_files(path)
            materialize(
                model,
                files,
                dtype=None if dtype is None else torch_dtype(dtype),
                device=resolve_device(device or "cpu"),
                incomplete=f"The weights in {path} lack {{missing}}. They are incomplete: rebuild the emulator.",
            )
        except EmlocError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OSError) as e:
            raise EmlocError(f"{path} holds a malformed emulator ({first_line(e)}). Rebuild it.") from None
        emulator = cls(
            model,
            SpectrumTable.load(path / "spectra"),
            RankPlan.from_dict(meta["plan"]),
            meta["mode"],
            meta["original_fingerprint"],
            meta.get("calibration", {}),
            meta.get("alignment", {}),
        )
        check_fingerprint(
            meta["emulator_fingerprint"],
            emulator.fingerprint,
            artifact=f"{path}/emulator.json",
            model=f"the weights in {path}",
        )
        return emulator


def manifest_config(plan: RankPlan, mode: str, shrinkage: float) -> dict:
    """The settings an emulator directory's manifest records (Emulator.save and the streamed build)."""
    return {"plan": plan.to_dict(), "mode": mode, "shrinkage": shrinkage}


def write_emulator_metadata(
    folder: Path,
    *,
    model_config,
    model_class: str,
    spectra: SpectrumTable,
    tokenizer,
    original_fingerprint: str,
    emulator_fingerprint: str,
    mode: str,
    plan: RankPlan,
    ranks: dict[str, int],
    layer_bias: dict[str, bool],
    calibration: dict,
    alignment: dict | None = None,
) -> None:
    """Everything of an emulator directory but its weights (Emulator.save and the streamed build write these)."""
    model_config.save_pretrained(folder)
    spectra.save(folder / "spectra")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_json(
        folder / "emulator.json",
        {
            "format_version": FORMAT_VERSION,
            "kind": "emulator",
            "model_class": model_class,
            "original_fingerprint": original_fingerprint,
            "emulator_fingerprint": emulator_fingerprint,
            "mode": mode,
            "plan": plan.to_dict(),
            "ranks": ranks,
            "layer_bias": layer_bias,
            "calibration": calibration,
            "alignment": alignment or {},
        },
    )


WEIGHTS = "emulator.safetensors"
WEIGHTS_INDEX = "emulator.safetensors.index.json"  # a streamed build writes one shard per block


def weight_files(path: Path) -> list[Path]:
    """The emulator's safetensors files: one, or the shards its index lists."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        return shard_files(index, "Rebuild the emulator.")
    return [path / WEIGHTS]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once, under their first name (the input embedding)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            state[name] = tensor
    return state


def _shallow_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose parameters and buffers are the original's tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


@torch.no_grad()
@phase("factoring")
def build_emulator(
    model: PreTrainedModel,
    stats: CalibrationStats | None = None,
    plan: RankPlan | float = 0.5,
    *,
    mode: str = "whitened",
    eps: float = 1e-6,
    shrinkage: float = 0.0,
    progress: bool = True,
) -> Emulator:
    """Compress `model`'s block linears by activation-aware SVD (`mode="plain"`: the unwhitened baseline).

    `plan` is a RankPlan or a uniform kept share ρ. `stats` must come from
    `collect_stats` on this model; it is required for "whitened" and, in "plain"
    mode, used to report the whitened spectra and predicted errors. `shrinkage` λ
    whitens with C + λ·diag(C): a few dozen examples see some directions of a wide
    input only by chance, and the shrinkage trusts those directions less.
    """
    check_whitening(eps, shrinkage)
    if mode not in MODES:
        raise EmlocError(f"Unknown mode {mode!r}. Use 'whitened' (activation-aware) or 'plain' (the SVD baseline).")
    plan = plan if isinstance(plan, RankPlan) else RankPlan(plan)
    if stats is None and mode == "whitened":
        raise EmlocError(
            "The whitened emulator needs calibration statistics. Run collect_stats(model, batches) first, or use "
            "mode='plain'."
        )
    if stats is not None:
        check_fingerprint(
            stats.model_fingerprint, fingerprint(model), artifact="The calibration statistics", model="this model"
        )

    targets = block_linears(model)
    skipped = [
        {"name": n, "reason": "outside the repeated blocks (embeddings and the LM head are kept)"}
        for n in linear_layers(model)
        if n not in targets
    ]
    choices = plan.resolve({n: tuple(linear_weight(m).shape) for n, m in targets.items()})
    emulator_model = _shallow_copy(model)
    rows, spectra = [], {}
    whiteners = Whiteners(stats, eps, shrinkage)
    for name, module in progress_bar(targets.items(), desc="emulator", total=len(targets), enabled=progress):
        low, row, spectra[name] = factor_layer(
            name, module, choices[name], whiteners.get(name, module.weight.device), mode
        )
        rows.append(row)
        if low is not None:
            _replace(emulator_model, name, low)
    calibration = (
        {"examples": stats.examples, "tokens": stats.tokens, "shrinkage": shrinkage} if stats is not None else {}
    )
    return Emulator(emulator_model, SpectrumTable(rows, spectra, skipped), plan, mode, fingerprint(model), calibration)
