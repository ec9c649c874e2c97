"""Memory: tensor accounting (what a step must hold) and measured peaks, phase by phase.

`footprint` predicts a step's memory from the tensors themselves: the weights, the
trainable state (parameter, gradient and two AdamW moments per LoRA weight) and the
activations autograd saves for the backward pass, counted with saved-tensor hooks on
one real batch.

`PhaseMeter` measures: inside it, each `phase("load")`, `phase("train_steps")`, ...
records the peak resident memory of that phase alone (and the peak CUDA memory on a
GPU). The peak is reset at the start of each phase:
- on Linux, by writing 5 to /proc/self/clear_refs, which resets VmHWM;
- elsewhere (macOS, Windows), by a thread that samples the resident set (psutil);
- on CUDA, by torch.cuda.reset_peak_memory_stats.
The functions of the pipeline mark their own phases (load_model: "load", collect_stats:
"calibration", build_emulator: "factoring", finetune: "train_first_step" then
"train_steps", the steady state, evaluate: "evaluation", ...); outside a PhaseMeter a
phase costs nothing and records nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

MB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    """A /proc/self/status field (VmRSS, VmHWM) in MB, or None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def rss_mb() -> float:
    """Current resident set size of this process."""
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    import psutil  # a dependency of accelerate

    return psutil.Process().memory_info().rss / MB


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, or since the last peak reset (Linux)."""
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    import resource

    # macOS reports ru_maxrss in bytes, Linux in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (MB if sys.platform == "darwin" else 1024)


class _ClearRefs:
    """Linux: the kernel keeps the peak (VmHWM); writing 5 to clear_refs resets it to the current RSS."""

    @staticmethod
    def available() -> bool:
        if _status_mb("VmHWM") is None:
            return False
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        _CLEAR_REFS.write_text("5")

    def peak(self) -> float:
        return _status_mb("VmHWM")

    def close(self) -> None:
        pass


class _Sampler:
    """Elsewhere: a daemon thread samples the resident set every `interval` seconds and keeps the maximum.

    Allocations shorter than the interval can be missed; the kernel's own peak (Linux) cannot.
    """

    def __init__(self, interval: float = 0.005):
        self._peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._peak = max(self._peak, rss_mb())

    def reset(self) -> None:
        self._peak = rss_mb()

    def peak(self) -> float:
        self._peak = max(self._peak, rss_mb())
        return self._peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def _cuda_reset() -> None:
    for d in _cuda_devices():
        torch.cuda.reset_peak_memory_stats(d)


def _cuda_peak_mb() -> float | None:
    devices = _cuda_devices()
    return sum(torch.cuda.max_memory_allocated(d) for d in devices) / MB if devices else None


MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold, which it otherwise raises as blocks are freed


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc give large freed blocks back to the OS at once; True if it applied (glibc only).

    By default glibc raises its mmap threshold each time a large block is freed, so later
    large tensors (activations, gradients) come from its heap, and once freed they stay
    in the process: after the first training step the resident set never falls back. A
    fixed threshold serves each block above it by its own mmap, returned when freed
    (bench/results/transients.md measures what this saves and costs).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, int(threshold)))


_ACTIVE: contextvars.ContextVar[PhaseMeter | None] = contextvars.ContextVar("emloc_phase_meter", default=None)


class PhaseMeter:
    """Peak memory (and seconds) per phase of the code run inside it.

        with PhaseMeter() as meter:
            with phase("load"):
                ...
        meter.phases   # {"load": {"peak_rss_mb", "start_rss_mb", "end_rss_mb", "seconds"[, "peak_cuda_mb"]}}
        meter.peak_rss_mb   # the peak over everything run inside the meter

    Phases may nest: an inner phase's peak counts toward the outer one's too. A phase
    entered again under the same name keeps its largest peak and adds up its seconds.
    """

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self._open: list[dict] = []  # running maxima of the phases now open, outermost first
        self._overall = {"rss": 0.0, "cuda": None}
        self._source = None
        self._token = None

    @property
    def method(self) -> str:
        return "clear_refs" if isinstance(self._source, _ClearRefs) else "sampled"

    @property
    def peak_rss_mb(self) -> float:
        self._fold()
        return self._overall["rss"]

    @property
    def peak_cuda_mb(self) -> float | None:
        self._fold()
        return self._overall["cuda"]

    def __enter__(self) -> PhaseMeter:
        self._source = _ClearRefs() if _ClearRefs.available() else _Sampler()
        self._reset()
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        self._fold()
        _ACTIVE.reset(self._token)
        self._source.close()

    def _fold(self) -> None:
        """Carry the peak since the last reset into every open phase and the overall peak."""
        rss, cuda = self._source.peak(), _cuda_peak_mb()
        for running in [*self._open, self._overall]:
            running["rss"] = max(running["rss"], rss)
            if cuda is not None:
                running["cuda"] = max(running["cuda"] or 0.0, cuda)

    def _reset(self) -> None:
        self._source.reset()
        _cuda_reset()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._fold()
        self._reset()
        start = rss_mb()
        running = {"rss": start, "cuda": None}
        self._open.append(running)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self._fold()
            self._open.pop()
            record = {
                "peak_rss_mb": running["rss"],
                "start_rss_mb": start,
                "end_rss_mb": rss_mb(),
                "seconds": seconds,
            }
            if running["cuda"] is not None:
                record["peak_cuda_mb"] = running["cuda"]
            old = self.phases.get(name)
            if old is not None:  # the same phase again: its largest peak, its total time
                record = {
                    **record,
                    "peak_rss_mb": max(old["peak_rss_mb"], record["peak_rss_mb"]),
                    "start_rss_mb": old["start_rss_mb"],
                    "seconds": old["seconds"] + seconds,
                }
                if "peak_cuda_mb" in old:
                    record["peak_cuda_mb"] = max(old["peak_cuda_mb"], record.get("peak_cuda_mb", 0.0))
            self.phases[name] = record


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Record the enclosed code as phase `name` of the active PhaseMeter; without one, do nothing."""
    meter = _ACTIVE.get()
    if meter is None:
        yield
        return
    with meter.phase(name):
        yield


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def weights_mb(model: nn.Module) -> float:
    """Unique parameter and buffer bytes (tied weights count once)."""
    return _bytes(list(model.parameters()) + list(model.buffers())) / MB


def footprint(model: nn.Module, batch: dict, *, train: bool = True, checkpointed: bool = False) -> dict:
    """Predicted memory of one step on `batch`, in MB.

    train=True: a LoRA training step (the model should have its LoRA attached, so
    that only LoRA weights require grad); train=False: a no-grad forward.
    checkpointed=True: the step under gradient checkpointing of the repeated blocks,
    which keeps only each block's input and what autograd saves outside the blocks,
    and holds one block's saved activations at a time while the backward recomputes it.
    The step itself runs without checkpointing, each saved tensor attributed to its block.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .scoring import answer_nll

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running: list[int | None] = [None]  # the block whose forward is running, None outside the blocks
    saved: dict[int | None, list[torch.Tensor]] = {None: []}
    block_inputs: list[torch.Tensor] = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.setdefault(running[0], []).append(t)
        return t

    def enter(index):
        def hook(module, args, kwargs):
            running[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                block_inputs.append(hidden)

        return hook

    def leave(module, args, output):
        running[0] = None

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [
        h
        for i, b in enumerate(blocks)
        for h in (b.register_forward_pre_hook(enter(i), with_kwargs=True), b.register_forward_hook(leave))
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        with torch.set_grad_enabled(train), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            nll, mask = answer_nll(model, batch)
            if train and trainable:
                nll[mask].mean().backward()
    finally:
        for h in handles:
            h.remove()
    for p in trainable:
        p.grad = None
    if checkpointed and blocks:
        kept = saved[None] + block_inputs
        base = _bytes(kept)
        recompute = max((_bytes(kept + saved.get(i, [])) - base for i in range(len(blocks))), default=0)
        activations = (base + recompute) / MB
    else:
        activations = _bytes([t for ts in saved.values() for t in ts]) / MB
    weights = weights_mb(model)
    state = 4 * sum(p.numel() * p.element_size() for p in trainable) / MB if train else 0.0
    return {
        "weights_mb": weights,
        "trainable_state_mb": state,
        "activations_mb": activations,
        "total_mb": weights + state + activations,
    }


def predict_training(model: nn.Module, lora, config, batch: dict) -> dict:
    """`footprint` of one LoRA training step of `model` as `finetune` runs it: the LoRA attached, in training
    mode, gradient checkpointing if `config` (a TrainSpec) asks, on `batch` (one micro-batch, collated as
    `finetune` collates it: `training.training_collator(tokenizer, model)`; the run's largest is
    `longest_examples`); `model` is left as it was."""
    from .lora import attach_lora

    peft_model = attach_lora(model, lora)
    peft_model.train()
    try:
        return footprint(peft_model, batch, train=True, checkpointed=config.gradient_checkpointing)
    finally:
        peft_model.eval()
        peft_model.unload()


def longest_examples(tokenizer, dataset, size: int, *, max_length: int) -> list[dict]:
    """The `size` longest examples of `dataset`, tokenized as `finetune` tokenizes them.

    A run's memory peaks at its longest micro-batch, so the planner predicts from these: no micro-batch
    of `size` examples drawn from `dataset` pads to more tokens. The first ones can be much shorter: the
    default recipe's run trains first on an example of 61 tokens, and its longest has 109.
    """
    from .data import tokenize

    encoded = tokenize(tokenizer, dataset, max_length=max_length).to_list()
    return sorted(encoded, key=lambda e: len(e["input_ids"]), reverse=True)[:size]


# (row, model, training?, the stage that measures it, its steady-state phase)
BUDGET_ROWS = [
    ("inference, original", "original", False, "evaluate-original", "evaluation"),
    ("inference, emulator", "emulator", False, "evaluate-emulator", "evaluation"),
    ("LoRA fine-tuning, original", "original", True, "finetune_original", "train_steps"),
    ("LoRA fine-tuning, emulator", "emulator", True, "finetune_emulator", "train_steps"),
]


def budget(run, *, batch_size: int | None = None) -> list[dict]:
    """Predicted (tensor accounting) against measured memory for one run, per setting.

    Rows: inference and LoRA fine-tuning of the original and of the emulator. The
    prediction uses the run's longest batch of the size a step runs (the micro-batch when the
    run micro-batches, or `batch_size`), from the examples it trains on, with the models as
    the stages load them (bf16 frozen weights when train.frozen_dtype says so, gradient
    checkpointing when on). `predicted_peak_mb` adds the stage's process baseline (Python and
    the libraries: its resident memory as it began to load the model) to that total;
    `measured_peak_mb` is the peak of the stage's steady-state phase (train_steps, after the
    first step; evaluation), and `error` their relative gap.
    For inference only the weights are predicted: a forward's short-lived activations
    and key/value cache are not accounted.
    """
    from .data import collator_for
    from .stages import base_model
    from .training import examples_seen, training_collator

    config = run.config.train
    size = batch_size or config.micro_batch_size or config.batch_size
    tokenizer = run.tokenizer()
    training_set = run.task().train
    seen = training_set.select(examples_seen(len(training_set), config, run.config.seed))
    examples = longest_examples(tokenizer, seen, size, max_length=config.max_length)
    records = run.stage_records()
    rows = []
    for label, which, train, stage, steady in BUDGET_ROWS:
        net, _ = base_model(run, which, config.frozen_dtype if train else None)
        if train:
            predicted = predict_training(net, run.config.lora, config, training_collator(tokenizer, net)(examples))
        else:
            predicted = footprint(net, collator_for(tokenizer)(examples), train=False)
        record = records.get(stage, {})
        phases = record.get("phases", {})
        # The process as it began to load the model: the libraries a stage imports lazily (about 120 MB) are in.
        baseline = phases.get("load", {}).get("start_rss_mb", record.get("baseline_rss_mb"))
        measured = phases.get(steady, {}).get("peak_rss_mb")
        peak = predicted["total_mb"] + baseline if baseline is not None else None
        rows.append(
            {
                "setting": label,
                **predicted,
                "process_baseline_mb": baseline,
                "predicted_peak_mb": peak,
                "measured_peak_mb": measured,
                "error": peak / measured - 1 if peak is not None and measured else None,
                "stage_peak_mb": record.get("peak_rss_mb"),
            }
        )
    return rows
