"""A streamed build: calibrate and compress a checkpoint one block at a time, never holding the whole original.

    embeddings → the calibration batches' hidden states at the first block's input
    for each block: load its tensors from the safetensors shards, push the hidden states
                    through it while accumulating its inputs' second moments, factor its
                    linear layers, write its part of the emulator, free it

The peak is about one block, the embeddings and the calibration hidden states, instead
of the whole model (bench/results/streaming_build.md). The statistics, the emulator and
their fingerprints are those the in-memory path (`collect_stats`, `build_emulator`)
gives, up to float summation order (a test checks).

A build that keeps no statistics (`build_streaming`) goes further, for the same emulator up
to rounding and the signs of singular vectors (a test checks):
- each layer wider in than out (down, k, v) is factored from its output's second moment
  (emulator.output_moment): at a 1B model's 8192-wide MLP input, a 2048² matrix instead
  of 8192², 16× less accumulation and no Cholesky factor;
- the calibration sequences go through each block one at a time.

Blocks must take the same inputs in every layer (one attention mask, one set of
rotary embeddings), which holds for Llama-style decoders (Llama, Qwen2, Mistral without
sliding windows); other models are refused with a clear error. Reading the checkpoint a block at a time is
emloc_nb.block_reader.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .artifacts import write_manifest
from .atomic import atomic_dir
from .block_reader import Checkpoint, blocks_of, buffers_to, checkpoint_tokenizer, first_block_input
from .calibration import CalibrationStats, add_gram, collect_stats, mirror_upper
from .emulator import WEIGHTS_INDEX, Emulator, manifest_config, write_emulator_metadata
from .errors import EmlocError
from .factoring import Whiteners, check_whitening, factor_layer, output_moment
from .fingerprints import fingerprint_of, tensor_sample
from .measure import phase
from .models import resolve_device, torch_dtype
from .progress import progress as progress_bar
from .ranks import RankPlan
from .serial import write_json, write_tensors
from .spectra import SpectrumTable
from .structure import (
    block_index,
    block_linears,
    linear_bias,
    linear_layers,
    linear_weight,
)


class _OutputMoments:
    """Forward hooks summing, over real tokens, each layer's Σ (W x)(W x)ᵀ and its input's Σ x² per channel.

    Set `mask` (the batch's attention mask) before each forward; `close()` removes the hooks.
    """

    def __init__(self, block: nn.Module, names: list[str]):
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, list] = {}  # name -> [Σ y yᵀ (float64, upper triangle until close), Σ x², tokens]
        self.handles = [block.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args, output):
            x, y = args[0].detach(), output.detach()
            bias = linear_bias(module)
            if bias is not None:
                y = y - bias
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            if self.mask is not None:
                if self.mask.numel() != x.shape[0]:
                    raise EmlocError(
                        f"The input of {name} has {x.shape[0]} token positions but the attention mask has "
                        f"{self.mask.numel()}; a streamed build cannot tell padding apart in this model."
                    )
                keep = self.mask.reshape(-1).bool()
                x, y = x[keep], y[keep]
            x, y = x.float(), y.float()
            squares = x.square().sum(0, dtype=torch.float64)
            if not torch.isfinite(squares).all() or not torch.isfinite(y).all():
                raise EmlocError(
                    f"Non-finite activations (NaN/Inf) at {name} in calibration. Build in float32 "
                    "(dtype=torch.float32), and check the weights up to this layer for NaN/Inf."
                )
            if name not in self.sums:
                d = y.shape[-1]
                self.sums[name] = [torch.zeros(d, d, dtype=torch.float64, device=y.device), 0, 0]
            total = self.sums[name]
            add_gram(total[0], y)
            total[1] = total[1] + squares
            total[2] += x.shape[0]

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for total in self.sums.values():
            mirror_upper(total[0])


def _factor_from_output(name: str, module: nn.Module, choice, sums: list, eps: float, shrinkage: float):
    moment = output_moment(linear_weight(module), *sums, eps, shrinkage)
    sums.clear()  # the raw sums, freed before the factoring's workspace is taken
    return factor_layer(name, module, choice, None, "whitened", moment=moment)


def _run_block(block: nn.Module, batch: Mapping) -> torch.Tensor:
    out = block(batch["hidden"], **batch["kwargs"])
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
@phase("streamed build")
def stream(
    source: str | os.PathLike,
    *,
    batch_sets: Mapping[str, list[dict]] | None = None,
    stats: CalibrationStats | None = None,
    output: str | os.PathLike | None = None,
    plan: RankPlan | float = 0.5,
    mode: str = "whitened",
    eps: float = 1e-6,
    shrinkage: float = 0.0,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    keep_stats: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, CalibrationStats]:
    """One pass over the blocks of the checkpoint at `source`; returns the statistics of each batch set.

    - `batch_sets` ({"train": batches, "heldout": batches}): calibration batches whose
      hidden states go through each block; its inputs' statistics are collected per set.
    - `output`: write the emulator there (`plan`, `mode`, `eps`, `shrinkage` as in build_emulator),
      factored from the "train" set's statistics, or from `stats` when no set is given.
    - `keep_stats=False`: drop each block's statistics once it is factored (nothing is
      returned), so memory stays at about one block however large the model.
    """
    if not batch_sets and output is None:
        raise EmlocError("Nothing to do: pass batch_sets (to calibrate) and/or output (to build the emulator).")
    if output is not None and stats is None and "train" not in (batch_sets or {}):
        raise EmlocError("Building the emulator needs statistics: pass stats, or batch_sets with a 'train' set.")
    if output is None and not keep_stats:
        raise EmlocError("keep_stats=False with no output keeps nothing. Pass output, or keep the statistics.")
    if mode not in ("whitened", "plain"):
        raise EmlocError(f"Unknown mode {mode!r}. Use 'whitened' (activation-aware) or 'plain' (the SVD baseline).")
    check_whitening(eps, shrinkage)
    dtype, device = torch_dtype(dtype), resolve_device(device)
    checkpoint = Checkpoint(source, trust_remote_code=trust_remote_code)
    if output is not None and Path(output).resolve() in (checkpoint.path.resolve(), *checkpoint.path.resolve().parents):
        raise EmlocError(
            f"The emulator's output {output} would replace the checkpoint it is built from ({checkpoint.path}). "
            "Write it to another directory."
        )
    model = checkpoint.skeleton()
    blocks_name, blocks = blocks_of(model)
    # A config cut to fewer layers than its weights: the emulator would silently drop the rest.
    stored_blocks = {block_index(n) for n in checkpoint.weight_map if n.startswith(f"{blocks_name}.")}
    extra = stored_blocks - {None, *range(len(blocks))}
    if extra:
        raise EmlocError(
            f"{checkpoint.path} holds the weights of {len(extra)} block(s) its config.json does not have "
            f"({blocks_name}.{min(extra)}…; the config has {len(blocks)}). The config and the weights come from "
            "different models: save the model again."
        )
    state = model.state_dict(keep_vars=True)
    stored = {}  # tied weights (the LM head) are read once, under the first of their names the checkpoint has
    for name, p in state.items():
        if name in checkpoint.weight_map:
            stored.setdefault(id(p), name)
    source_of = {name: stored.get(id(p)) for name, p in state.items()}
    missing = [n for n, s in source_of.items() if s is None]
    if missing:
        raise EmlocError(f"{checkpoint.path} lacks {missing[:3]}. The checkpoint is incomplete or of another model.")
    # Names and shapes only: holding the modules would keep every block's loaded weights alive.
    shapes = {n: tuple(linear_weight(m).shape) for n, m in block_linears(model).items()}
    plan = plan if isinstance(plan, RankPlan) else RankPlan(plan)
    choices = plan.resolve(shapes)
    # A build that keeps no statistics factors its layers wider in than out from their outputs' moments: a fraction
    # of the memory, the same emulator up to rounding.
    lean = output is not None and stats is None and not keep_stats and mode == "whitened"
    original_samples, emulator_samples = [], []
    collected: dict[str, dict] = {split: {} for split in batch_sets or {}}
    tokens: dict[str, int] = {}
    rows, spectra, ranks, layer_bias, weight_map = [], {}, {}, {}, {}

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(output, overwrite=overwrite)) if output is not None else None
        # Everything outside the blocks (embeddings, final norm, LM head): read once, written to the emulator,
        # used for the first block's inputs, then freed.
        outer = [n for n in state if block_index(n) is None]
        loaded = checkpoint.tensors(sorted({source_of[n] for n in outer}), dtype=dtype, device=device)
        with checkpoint.mismatch():
            model.load_state_dict({n: loaded[source_of[n]] for n in outer}, strict=False, assign=True)
        model.tie_weights()
        buffers_to(model, device)
        for n in outer:
            original_samples.append(tensor_sample(n, loaded[source_of[n]]))
        emulator_samples += original_samples
        if tmp is not None:
            write_tensors(tmp / "emulator-outer.safetensors", loaded)
            weight_map.update(dict.fromkeys(loaded, "emulator-outer.safetensors"))
        del loaded
        hidden = {
            split: [first_block_input(model, blocks, b) for b in batches]
            for split, batches in (batch_sets or {}).items()
        }
        for parent in {n.rpartition(".")[0] for n in outer}:
            model.get_submodule(parent).to("meta")

        for i in progress_bar(range(len(blocks)), desc="streamed build", total=len(blocks), enabled=progress):
            prefix = f"{blocks_name}.{i}."
            block = blocks[i]
            names = [n for n in state if n.startswith(prefix)]
            loaded = checkpoint.tensors([source_of[n] for n in names], dtype=dtype, device=device)
            with checkpoint.mismatch():
                block.load_state_dict({n.removeprefix(prefix): loaded[source_of[n]] for n in names}, assign=True)
            original_samples += [tensor_sample(n, loaded[source_of[n]]) for n in names]
            del loaded
            local = [n.removeprefix(prefix) for n in shapes if n.startswith(prefix)]
            wide = [n for n in local if lean and shapes[prefix + n][1] > shapes[prefix + n][0]]
            wide = wide if len(wide) < len(local) else []  # collect_stats needs at least one layer to calibrate
            moments = {}
            for split, batches in hidden.items():
                outputs = []
                hooks = _OutputMoments(block, wide) if wide and split == "train" else None

                def forward(b, x, outputs=outputs, hooks=hooks):
                    if hooks is not None:
                        hooks.mask = x.get("attention_mask")
                    outputs.append(_run_block(b, x))

                try:
                    block_stats = collect_stats(
                        block,
                        batches,
                        layers=[n for n in local if n not in wide],
                        forward_fn=forward,
                        progress=False,
                    )
                finally:
                    if hooks is not None:
                        hooks.close()
                if hooks is not None:
                    moments = hooks.sums
                tokens[split] = block_stats.tokens
                collected[split].update(_prefixed(block_stats, prefix))
                hidden[split] = [{**batch, "hidden": h} for batch, h in zip(batches, outputs)]
                del block_stats, hooks  # `collected` holds them, and drops them when the block is done
            if tmp is not None:
                # Without kept statistics each second moment becomes its covariance in place.
                own = CalibrationStats(collected["train"], "", 0) if stats is None else None
                whiteners = Whiteners(stats or own, eps, shrinkage, consume=own is not None and not keep_stats)
                for n in local:
                    full = prefix + n
                    if n in wide:
                        low, row, spectra[full] = _factor_from_output(
                            full, block.get_submodule(n), choices[full], moments.pop(n), eps, shrinkage
                        )
                    else:
                        low, row, spectra[full] = factor_layer(
                            full, block.get_submodule(n), choices[full], whiteners.get(full, device), mode
                        )
                    rows.append(row)
                    if low is not None:
                        parent, _, child = n.rpartition(".")
                        setattr(block.get_submodule(parent) if parent else block, child, low)
                        ranks[full], layer_bias[full] = low.rank, low.up.bias is not None
                del whiteners
                written = {prefix + n: t for n, t in block.state_dict().items()}
                shard = f"emulator-{i:05d}.safetensors"
                write_tensors(tmp / shard, written)
                weight_map.update(dict.fromkeys(written, shard))
                emulator_samples += [tensor_sample(n, t) for n, t in written.items()]
                del written
            blocks[i] = block.to("meta")  # the block's weights are freed here
            del block
            if not keep_stats:  # and its statistics: a 1B model's second moments are several GB in all
                for inputs in collected.values():
                    for key in [k for k in inputs if k.startswith(prefix)]:
                        del inputs[key]

        original_fingerprint = fingerprint_of(original_samples)
        examples = {split: sum(len(b["input_ids"]) for b in batch_sets[split]) for split in collected}
        results = {
            split: CalibrationStats(inputs, original_fingerprint, examples[split])
            for split, inputs in collected.items()
            if keep_stats
        }
        if tmp is not None:
            if stats is not None and stats.model_fingerprint != original_fingerprint:
                raise EmlocError(
                    f"The calibration statistics belong to a model with fingerprint {stats.model_fingerprint}, but "
                    f"{checkpoint.path} has fingerprint {original_fingerprint}. Calibrate this checkpoint first."
                )
            calibration = (
                {"examples": stats.examples, "tokens": stats.tokens}
                if stats is not None
                else {"examples": examples["train"], "tokens": tokens["train"]}
            ) | {"shrinkage": shrinkage}
            skipped = [
                {"name": n, "reason": "outside the repeated blocks (embeddings and the LM head are kept)"}
                for n in linear_layers(model)
                if n not in shapes
            ]
            write_json(tmp / WEIGHTS_INDEX, {"weight_map": weight_map})
            write_emulator_metadata(
                tmp,
                model_config=model.config,
                model_class=type(model).__name__,
                spectra=SpectrumTable(rows, spectra, skipped),
                tokenizer=checkpoint_tokenizer(checkpoint),
                original_fingerprint=original_fingerprint,
                emulator_fingerprint=fingerprint_of(emulator_samples),
                mode=mode,
                plan=plan,
                ranks=ranks,
                layer_bias=layer_bias,
                calibration=calibration,
            )
            # Written last, once the original's fingerprint is known: it lists every file above.
            write_manifest(
                tmp,
                kind="emulator",
                model_fingerprint=original_fingerprint,
                config=manifest_config(plan, mode, shrinkage),
            )
    return results


def _prefixed(stats: CalibrationStats, prefix: str) -> dict:
    """One block's input statistics under the whole model's layer names."""
    for inputs in stats.inputs.values():
        inputs.layers = [prefix + n for n in inputs.layers]
    return {prefix + key: inputs for key, inputs in stats.inputs.items()}


def build_streaming(
    source: str | os.PathLike, batches: list[dict], plan: RankPlan | float, output: str | os.PathLike, **kwargs
) -> Emulator:
    """Calibrate on `batches` and build the emulator into `output` in one streamed pass, holding about one block.

    Each block's statistics are dropped once it is factored (`stream(..., keep_stats=True)`
    keeps them), its layers wider in than out are factored from their outputs' moments, and the
    sequences go through each block one at a time. The emulator is loaded back from `output`
    (memory-mapped).
    """
    sequences = [one for batch in batches for one in _sequences(batch)]
    stream(source, batch_sets={"train": sequences}, output=output, plan=plan, keep_stats=False, **kwargs)
    return Emulator.load(output)


def _sequences(batch: Mapping) -> list[dict]:
    """A calibration batch as batches of one sequence each: every tensor with a row per sequence is split.

    The streamed build holds every sequence's hidden states anyway; pushing them through a block one at
    a time keeps the block's activations (at batch 8 and a 1B model's width, several hundred MB) to one's.
    """
    n = len(batch["input_ids"])
    return [
        {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v for k, v in batch.items()}
        for i in range(n)
    ]
