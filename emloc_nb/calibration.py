"""Calibration: the second moment of every linear layer's input on downstream examples.

`collect_stats` runs batches through the model with temporary forward pre-hooks and
accumulates, per distinct input tensor, C = Σ x xᵀ over real (non-padding) tokens,
plus per-channel mean |x| and max |x|. Layers that read the same tensor (q/k/v,
gate/up) share one entry. The hooks are removed even if the forward raises, and no
state is left on the modules.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .errors import EmlocError
from .fingerprints import fingerprint
from .measure import phase
from .progress import progress as progress_bar
from .reports import Report
from .serial import StoredGroups
from .structure import accepts, block_linears, check_token_ids, model_inputs, on_device

ForwardFn = Callable[[nn.Module, Mapping], object]


@dataclass
class InputStats:
    """Statistics of one layer input, accumulated over real tokens."""

    second_moment: torch.Tensor  # Σ x xᵀ, float64, (d_in, d_in)
    abs_sum: torch.Tensor  # Σ |x| per channel
    abs_max: torch.Tensor  # max |x| per channel
    tokens: int
    layers: list[str] = field(default_factory=list)  # the linear layers that read this input

    @property
    def dim(self) -> int:
        return self.second_moment.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def covariance(self) -> torch.Tensor:
        """E[x xᵀ] per token (uncentred), the matrix the emulator whitens with."""
        return self.second_moment / max(self.tokens, 1)

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of E[x xᵀ], largest first."""
        return torch.linalg.eigvalsh(self.covariance).flip(0).clamp_min(0)

    def outlier_channels(self, factor: float = 6.0) -> torch.Tensor:
        """Channels whose max |x| exceeds `factor` times the median channel's."""
        return torch.nonzero(self.abs_max > factor * self.abs_max.median()).flatten()


@dataclass
class CalibrationStats(Report):
    """Per-input statistics keyed by the first layer that reads each input.

    `rows` has one summary row per distinct input; `layer(name)` is the InputStats a layer reads.
    """

    kind = "calibration"
    reads_lazily = True  # second moments in float64 outweigh the model: one input in memory at a time

    inputs: Mapping[str, InputStats]  # a dict, or StoredInputs for a loaded report
    model_fingerprint: str
    examples: int

    def _index(self) -> dict[str, tuple[int, list[str]]]:
        """Each input's token count and layers, without reading a saved report's tensors."""
        if isinstance(self.inputs, StoredInputs):
            return {key: (info["tokens"], info["layers"]) for key, info in self.inputs.info.items()}
        return {key: (s.tokens, s.layers) for key, s in self.inputs.items()}

    def key_for(self, layer: str) -> str:
        for key, (_, layers) in self._index().items():
            if layer in layers:
                return key
        raise EmlocError(f"No calibration statistics for layer {layer!r}. Calibrate with that layer included.")

    def layer(self, name: str) -> InputStats:
        return self.inputs[self.key_for(name)]

    @property
    def layers(self) -> list[str]:
        return [name for _, layers in self._index().values() for name in layers]

    @property
    def tokens(self) -> int:
        return max((tokens for tokens, _ in self._index().values()), default=0)

    @cached_property
    def rows(self) -> list[dict]:
        """One row per distinct input (computed once: each needs an eigen-decomposition)."""
        rows = []
        for key, s in self.inputs.items():
            eig = s.eigenvalues()
            rows.append(
                {
                    "input": key,
                    "layers": list(s.layers),
                    "dim": s.dim,
                    "tokens": s.tokens,
                    "mean_abs": float(s.mean_abs.mean()),
                    "max_abs": float(s.abs_max.max()),
                    "outlier_channels": s.outlier_channels().tolist(),
                    "top_eigenvalue": float(eig[0]),
                    "effective_rank": float(eig.sum() ** 2 / (eig**2).sum()) if eig.sum() > 0 else 0.0,
                }
            )
        return rows

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            key: {"second_moment": s.second_moment, "abs_sum": s.abs_sum, "abs_max": s.abs_max}
            for key, s in self.inputs.items()
        }

    def _model_fingerprint(self) -> str:
        return self.model_fingerprint

    def _config(self) -> dict:
        return {"examples": self.examples}

    def _metadata(self) -> dict:
        return {
            "model_fingerprint": self.model_fingerprint,
            "examples": self.examples,
            "inputs": {key: {"tokens": tokens, "layers": layers} for key, (tokens, layers) in self._index().items()},
        }

    @classmethod
    def _from_saved(cls, meta: dict, tensors: Mapping) -> CalibrationStats:
        return cls(StoredInputs(tensors, meta["inputs"]), meta["model_fingerprint"], meta["examples"])


class StoredInputs(Mapping):
    """A saved CalibrationStats' inputs, each read from its file when asked for and not kept.

    A model's second moments in float64 are larger than the model (770 MB for SmolLM2-135M);
    the stages that go layer by layer (emulator, drift, correction) hold one at a time.
    """

    FIELDS = ("second_moment", "abs_sum", "abs_max")

    def __init__(self, groups: Mapping, info: dict):
        fields = groups.fields if isinstance(groups, StoredGroups) else {k: list(v) for k, v in groups.items()}
        if set(fields) != set(info) or any(sorted(fields[key]) != sorted(self.FIELDS) for key in info):
            raise ValueError("its tensors do not match its inputs")
        self.groups = groups
        self.info = {key: {"tokens": int(i["tokens"]), "layers": list(i["layers"])} for key, i in info.items()}

    def __getitem__(self, key: str) -> InputStats:
        info = self.info[key]
        return InputStats(**self.groups[key], tokens=info["tokens"], layers=list(info["layers"]))

    def __iter__(self):
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)


_SLAB = 128  # columns of x.T @ x per product: the upper triangle costs (k + 1) / 2k of the whole for k slabs


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """total += xᵀx (float64 += float32 products), upper triangle only; `mirror_upper` completes it once at the end.

    A slab of columns at a time: half the work of xᵀx, which costs about a forward pass, and no 256 MB
    temporary at width 8192. Summing each batch's float32 product in float64 is blocked summation, and
    the in-place add widens each element as it goes, with no float64 copy of the product.
    """
    for j in range(0, x.shape[1], _SLAB):
        k = min(j + _SLAB, x.shape[1])
        total[:k, j:k] += x[:, :k].T @ x[:, j:k]


def mirror_upper(c: torch.Tensor) -> None:
    """Fill the strict lower triangle of `c` from its upper one, in place, a slab of columns at a time."""
    for j in range(0, c.shape[1], _SLAB):
        k = min(j + _SLAB, c.shape[1])
        c[k:, j:k] = c[j:k, k:].T
        block = c[j:k, j:k]  # computed whole, and a product's two halves may round differently
        block.copy_(block.triu() + block.triu(1).T)


def _default_forward(model: nn.Module, batch: Mapping) -> object:
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}  # the statistics need no logits
    return model(**model_inputs(model, batch), use_cache=False, **extra)


@torch.no_grad()
@phase("calibration")
def collect_stats(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    layers: Iterable[str] | None = None,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Run `batches` through `model` and collect input statistics for `layers`.

    `batches` yields dicts with `input_ids` and, optionally, `attention_mask` (1 for
    real tokens). `forward_fn(model, batch)` replaces the default forward call, e.g.
    for multimodal inputs; the mask is still read from `batch["attention_mask"]`.
    `layers` defaults to every linear layer inside the model's blocks.
    """
    modules = dict(model.named_modules())
    names = list(block_linears(model)) if layers is None else list(layers)
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise EmlocError(f"Layers {unknown[:3]} are not modules of this model. Use names from model.named_modules().")
    if not names:
        raise EmlocError(
            "No layers to calibrate: the model has no linear layers inside numbered blocks. Pass layers=[...]."
        )
    forward_fn = forward_fn or _default_forward

    inputs: dict[str, InputStats] = {}
    owner: dict[str, str] = {}  # layer -> key of the input it reads
    step: dict = {"mask": None, "seen": {}, "batch": 0}

    def hook(name: str):
        def pre_hook(module, args):
            x = args[0]
            seen = step["seen"]
            if id(x) in seen and seen[id(x)][0]() is x:  # the same tensor was already counted this forward
                key = seen[id(x)][1]
                if owner.setdefault(name, key) != key:
                    raise EmlocError(f"{name} read different inputs across batches; calibrate with a fixed forward.")
                if name not in inputs[key].layers:
                    inputs[key].layers.append(name)
                return
            seen[id(x)] = (weakref.ref(x), name)  # weak: holding layer inputs until the forward ends costs memory
            key = owner.setdefault(name, name)
            x = x.detach()
            mask = step["mask"]
            x = x.reshape(-1, x.shape[-1])  # some models (OPT) flatten (batch, time) before their MLP
            if mask is not None:
                if mask.numel() != x.shape[0]:
                    raise EmlocError(
                        f"The input of {name} has {x.shape[0]} token positions but the attention mask has "
                        f"{mask.numel()}, "
                        "so padding cannot be told apart. Calibrate with batches of equal-length examples and no "
                        "attention_mask, or pass a forward_fn whose layer inputs follow the mask."
                    )
                x = x[mask.reshape(-1)]
            x = x.float()
            s = inputs.get(key)
            if s is None:  # accumulated where the activations are (on the GPU when the model is), moved at the end
                d = x.shape[-1]
                s = inputs[key] = InputStats(
                    torch.zeros(d, d, dtype=torch.float64, device=x.device),
                    torch.zeros(d, dtype=torch.float64, device=x.device),
                    torch.zeros(d, dtype=torch.float64, device=x.device),
                    0,
                    [name],
                )
            if x.shape[0] == 0:
                return
            magnitude = x.abs()
            column_sums = magnitude.sum(0)
            if not torch.isfinite(column_sums).all():  # a NaN/Inf anywhere in x reaches its column's sum
                raise EmlocError(
                    f"Non-finite activations (NaN/Inf) at the input of {name} in calibration batch {step['batch']}. "
                    "Load the model in float32 (dtype=torch.float32), and check the weights before it for NaN/Inf."
                )
            add_gram(s.second_moment, x)
            s.abs_sum += column_sums
            s.abs_max = torch.maximum(s.abs_max, magnitude.amax(0).double())
            s.tokens += x.shape[0]

        return pre_hook

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    examples = 0
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(progress_bar(batches, desc="calibration", enabled=progress)):
            batch = on_device(model, batch)
            check_token_ids(model, batch)
            mask = batch.get("attention_mask")
            step.update(mask=None if mask is None else mask.bool(), seen={}, batch=i)
            forward_fn(model, batch)
            examples += len(batch["input_ids"])
    finally:
        for h in handles:
            h.remove()
        step["seen"] = {}
        model.train(was_training)

    for s in inputs.values():
        mirror_upper(s.second_moment)
        s.second_moment, s.abs_sum, s.abs_max = s.second_moment.cpu(), s.abs_sum.cpu(), s.abs_max.cpu()
    if examples == 0:
        raise EmlocError("The calibration set is empty. Pass at least one batch of examples (64 is the usual size).")
    if not inputs or all(s.tokens == 0 for s in inputs.values()):
        raise EmlocError(
            "Every calibration token is padding (attention_mask is all 0). Check the collator and the examples."
        )
    missing = [n for n in names if n not in owner]
    if missing:
        raise EmlocError(
            f"Layers {missing[:3]} never ran during calibration. Drop them from `layers`, or check the forward."
        )
    return CalibrationStats(inputs, fingerprint(model), examples)
