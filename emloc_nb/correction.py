"""LoRA correction: move a LoRA trained on the emulator onto the original, as a standard peft adapter.

`correct_lora` applies EMLoC's Algorithm 1 to every layer the LoRA targets (emloc_nb.layer_correction),
adds the prior correction when asked (emloc_nb.prior), and writes a peft adapter for the original
model with the scaling folded in (lora_alpha = r), and its CorrectionReport (emloc_nb.correction_report).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .artifacts import artifact_dir, check_fingerprint
from .calibration import CalibrationStats
from .checks import check_value
from .config import CLAMP
from .correction_report import CorrectionReport
from .emulator import Emulator
from .errors import EmlocError
from .fingerprints import fingerprint
from .layer_correction import correct_layer, error_terms, lstsq_kappa, placebo_layer, subspace_cosines
from .lora import INITIAL_A_FILE, load_adapter, lora_factors, write_adapter_info, write_lora_factors
from .measure import phase
from .prior import answer_tokens, fit_prior, label_target, prior_tensors
from .progress import progress as progress_bar
from .scoring import answer_states
from .serial import read_tensors
from .structure import block_index, linear_weight, module_name


def _check_adapter(peft_emulator, factors: dict, adapter_dir) -> str:
    """Refuse adapter content the correction cannot carry over; return its task type.

    load_adapter has refused DoRA, trained biases and modules_to_save already (peft defaults only).
    """
    config = peft_emulator.peft_config[peft_emulator.active_adapter]
    trained = {
        n.removeprefix("base_model.model.").split(".lora_")[0]
        for n, _ in peft_emulator.named_parameters()
        if ".lora_" in n
    }
    if trained - set(factors):
        raise EmlocError(
            f"The adapter at {adapter_dir} puts LoRA on non-linear layers {sorted(trained - set(factors))[:3]}, "
            "which the correction cannot carry over to the original. Train a plain LoRA on linear layers instead."
        )
    return config.task_type


def _top_eigenvectors(calibration: CalibrationStats, name: str, r: int, cache: dict) -> torch.Tensor:
    key = calibration.key_for(name)
    if key not in cache:  # layers that share an input share its eigenvectors
        cache.clear()
        cache[key] = torch.linalg.eigh(calibration.layer(name).covariance.float())[1].flip(1)
    return cache[key][:, :r]


@torch.no_grad()
@phase("correction")
def correct_lora(
    original: nn.Module,
    emulator: Emulator,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    clamp: float = 3.0,
    kappa: str = "clamp",
    heldout: CalibrationStats | None = None,
    calibration: CalibrationStats | None = None,
    prior_prompts: list[list[dict]] | None = None,
    tokenizer=None,
    label_shares: dict[str, float] | None = None,
    placebo_seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> CorrectionReport:
    """Write a corrected, standard peft adapter for `original` to `output_dir`; return the report.

    `adapter_dir` must hold a LoRA trained on this `emulator`, which must have been
    built from `original` (both are checked by fingerprint).
    - `heldout`: statistics of the original's layer inputs on held-out examples; adds the
      before/after errors, and is what `kappa="lstsq"` minimises the error on.
    - `calibration`: the statistics the emulator was built from; adds each LoRA subspace's
      overlap with its input's top eigenvectors.
    - `prior_prompts` (with `tokenizer`): unlabelled prompts on which the prior correction is fitted.
      Its target: `label_shares` (choice -> share of the training answers), or without them the
      fine-tuned emulator's mean answer distribution.
    - `placebo_seed`: write the placebo instead (the correction on a random subspace).
    """
    clamp = check_value(clamp, float, "clamp", CLAMP)
    kappa = check_value(kappa, str, "kappa", {"choices": ("clamp", "lstsq")})
    if kappa == "lstsq" and heldout is None:
        raise EmlocError("kappa='lstsq' minimises the error on held-out inputs: pass heldout= (their statistics).")
    if prior_prompts is not None and (tokenizer is None or not prior_prompts):
        raise EmlocError("The prior correction needs prompts and their tokenizer: pass prior_prompts= and tokenizer=.")
    if label_shares is not None and prior_prompts is None:
        raise EmlocError("label_shares sets the prior correction's target: pass prior_prompts= (and tokenizer=) too.")
    if label_shares is not None and (
        len(label_shares) < 2
        or not all(isinstance(v, (int, float)) and 0 < v < math.inf for v in label_shares.values())
    ):
        raise EmlocError(
            f"label_shares={label_shares!r} must give each of two or more choices a positive share, "
            "e.g. Task.choice_shares()."
        )
    choice_ids = answer_tokens(tokenizer, prior_prompts[0], list(label_shares)) if label_shares is not None else None
    original_fp = fingerprint(original)
    check_fingerprint(emulator.original_fingerprint, original_fp, artifact="The emulator", model="the original model")
    for what, stats in (("held-out", heldout), ("calibration", calibration)):
        if stats is not None:
            check_fingerprint(
                stats.model_fingerprint, original_fp, artifact=f"The {what} statistics", model="the original model"
            )
    adapter_dir = Path(adapter_dir)
    peft_emulator = load_adapter(emulator.model, adapter_dir)  # refuses an adapter trained on another base
    try:
        factors = lora_factors(peft_emulator)
        task_type = _check_adapter(peft_emulator, factors, adapter_dir)
        target = None
        if prior_prompts is not None and label_shares is None:  # the fine-tuned emulator's mean answer distribution
            states = answer_states(peft_emulator, tokenizer, prior_prompts)
            head = peft_emulator.get_output_embeddings()
            target = head(states.to(head.weight.dtype)).double().softmax(-1).mean(0)
    finally:
        peft_emulator.unload()
    initial = read_tensors(adapter_dir / INITIAL_A_FILE) if (adapter_dir / INITIAL_A_FILE).is_file() else {}
    originals, emulated = dict(original.named_modules()), dict(emulator.model.named_modules())

    tensors, rows, stats, ranks, eig_cache = {}, [], {}, {}, {}
    for i, (name, (a, b, s)) in enumerate(
        progress_bar(factors.items(), desc="correction", total=len(factors), enabled=progress)
    ):
        if name not in originals:
            raise EmlocError(
                f"The adapter targets {name}, which the original model lacks. Correct it against the "
                "original model its emulator was built from."
            )
        w, w_e = linear_weight(originals[name]), linear_weight(emulated[name])
        if tuple(w.shape) != (b.shape[0], a.shape[1]) or w.shape != w_e.shape:
            raise EmlocError(
                f"Shapes disagree at {name}: W {tuple(w.shape)}, W_E {tuple(w_e.shape)}, "
                f"B·A {(b.shape[0], a.shape[1])}. The adapter does not belong to this model."
            )
        if not (torch.isfinite(w).all() and torch.isfinite(w_e).all()):
            raise EmlocError(
                f"The {'original' if not torch.isfinite(w).all() else 'emulator'} weights of {name} are not finite "
                "(NaN/Inf). Reload the model in float32, or rebuild the emulator."
            )
        lc = correct_layer(w, w_e, a, b, s, clamp)
        layer_stats = {"b_mean": lc.b_mean, "d_mean": lc.d_mean, "valid": lc.valid, "d_norm2": (lc.d**2).sum(0)}
        if heldout is not None:
            layer_stats.update(error_terms(w, w_e, lc, heldout.layer(name).covariance))
        if kappa == "lstsq":  # replaces the clamp's κ on the valid directions
            lc.kappa = torch.zeros_like(lc.kappa)
            lc.kappa[lc.valid] = lstsq_kappa(layer_stats)
            lc.b = lc.b_prime - lc.d * lc.kappa
        layer_stats["kappa"] = lc.kappa
        a_c, b_c = (lc.a, lc.b) if placebo_seed is None else placebo_layer(w, w_e, a, b, s, clamp, placebo_seed + i)
        u = lc.a.T[:, lc.valid]
        overlap = {"init_overlap": float("nan"), "data_overlap": float("nan")}
        if name in initial and u.shape[1]:
            layer_stats["init_cos"] = subspace_cosines(u, initial[name].T)
        if calibration is not None and u.shape[1]:
            layer_stats["data_cos"] = subspace_cosines(u, _top_eigenvectors(calibration, name, a.shape[0], eig_cache))
        for key in ("init", "data"):
            if f"{key}_cos" in layer_stats:  # mean cos² of the principal angles: 1 = the same subspace
                overlap[f"{key}_overlap"] = float((layer_stats[f"{key}_cos"] ** 2).mean())
        if not (torch.isfinite(a_c).all() and torch.isfinite(b_c).all()):
            raise EmlocError(
                f"The corrected LoRA of {name} is not finite (NaN/Inf). Check the adapter and the emulator."
            )
        # LoRA weights stay at least float32, as trained over 16-bit frozen weights (peft keeps them so)
        dtype = torch.promote_types(originals[name].weight.dtype, torch.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_c.to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_c.to(dtype)
        ranks[name] = a_c.shape[0]
        stats[name] = layer_stats
        rows.append(
            {
                "name": name,
                "block": block_index(name),
                "kind": name.rsplit(".", 1)[-1],
                "lora_rank": a.shape[0],
                "scaling": s,
                "d_norm": float(lc.d.norm()),
                "b_norm": float(lc.b_prime.norm()),
                **overlap,
            }
        )

    fan_in_fan_out = any(isinstance(originals[n], Conv1D) for n in ranks)
    prior = None
    with artifact_dir(
        output_dir,
        overwrite=overwrite,
        kind="corrected_adapter",
        model_fingerprint=original_fp,
        config={
            "clamp": clamp,
            "kappa": kappa,
            "prior": prior_prompts is not None,
            "label_shares": label_shares,
            "placebo_seed": placebo_seed,
        },
    ) as tmp:
        write_lora_factors(tmp, tensors, ranks, task_type=task_type, fan_in_fan_out=fan_in_fan_out)
        if prior_prompts is not None:  # fitted on the original with the layer-corrected LoRA just written
            corrected = load_adapter(original, tmp, check_base=False, manifest=False)
            try:
                states = answer_states(corrected, tokenizer, prior_prompts)
            finally:
                corrected.unload()
            head = original.get_output_embeddings()
            if label_shares is not None:
                target = label_target(states, head, choice_ids, list(label_shares.values()))
            prior = fit_prior(states, head, target, tokenizer=tokenizer)
            prior.target_kind = "labels" if label_shares is not None else "emulator"
            head_name = module_name(original, head)
            a_p, b_p = prior_tensors(prior, head)
            if not (torch.isfinite(a_p).all() and torch.isfinite(b_p).all()):
                raise EmlocError(
                    "The prior correction is not finite (NaN/Inf). Check the adapter and the calibration prompts, "
                    "or set correction.prior=false."
                )
            dtype = torch.promote_types(head.weight.dtype, torch.float32)
            tensors[f"base_model.model.{head_name}.lora_A.weight"] = a_p.to(dtype)
            tensors[f"base_model.model.{head_name}.lora_B.weight"] = b_p.to(dtype)
            write_lora_factors(
                tmp, tensors, {**ranks, head_name: 1}, task_type=task_type, fan_in_fan_out=fan_in_fan_out
            )
        write_adapter_info(
            tmp,
            kind="corrected_adapter",
            base_fingerprint=original_fp,
            info={
                "emulator_fingerprint": emulator.fingerprint,
                "clamp": clamp,
                "kappa": kappa,
                "prior": prior is not None,
                "prior_target": prior.target_kind if prior is not None else None,
                "placebo_seed": placebo_seed,
                "source_adapter": str(adapter_dir),
            },
        )
    return CorrectionReport(clamp, rows, stats, kappa, prior.to_dict() if prior is not None else None)
