"""The memory transients the phase view found, each measured before and after its fix, on SmolLM2.

1. glibc keeps freed large blocks in its heap (its mmap threshold rises as blocks are
   freed), so after the first training step a process never gives a step's activations
   back: emulator fine-tuning at batch 8 and evaluation, under glibc's default and under
   fixed thresholds (`emloc_nb.measure.return_freed_memory`), in interleaved rounds.
2. Drift's vocabulary-wide log-softmaxes over a whole batch (8 × up to 256 tokens × 49152)
   against one example at a time.
3. Calibration's float64 copy of every x.T @ x against adding it into the float64 sum in
   place, at SmolLM2's widest input (1536) and a 1B model's MLP width (5632).
4. Loading: whether load_model / Emulator.load copy the weights (they memory-map them), and
   the peak of a bf16 load from a float32 file (converted one tensor at a time).
5. Saved calibration statistics read layer by layer, as the emulator, drift and correction
   stages read them: every input kept once read (a loaded report held them all) against
   each read when asked for and dropped (`StoredInputs`).
6. The output layer's backward over the kept answer positions (a strided slice), in bf16 and
   float32, against a contiguous copy of them (what `answer_nll` hands a 16-bit head).
7. oneDNN's kernel caches under bf16 frozen weights: emulator fine-tuning at micro-batches of
   one example for 8 steps, each micro-batch as long as its example against padded to a
   multiple of 32 tokens (`models.length_multiple`), and float32 (MKL, no such cache). After
   the steps: the free bytes glibc's heap keeps (mallinfo2) and what malloc_trim returns.

    .venv/bin/python bench/transients.py          # writes results/transients.{json,md}
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from pathlib import Path

from _common import build_default_emulator, child, contention_note, emit, interleaved, machine, median, write_results

THRESHOLDS = ["default", str(128 * 1024), str(1024 * 1024), str(8 * 1024 * 1024)]


def allocator(threshold: str, emulator_dir: str, steps: int) -> dict:
    """Emulator fine-tuning (the default recipe) and evaluation (64 examples) under one glibc mmap threshold."""
    import dataclasses

    from emloc_nb import Emulator, evaluate, load_model, movie_sentiment
    from emloc_nb.config import RunConfig
    from emloc_nb.measure import PhaseMeter, return_freed_memory, rss_mb
    from emloc_nb.models import load_tokenizer
    from emloc_nb.tasks import Task
    from emloc_nb.training import finetune

    if threshold != "default":
        return_freed_memory(int(threshold))
    full = movie_sentiment()
    config = dataclasses.replace(RunConfig().train, steps=steps, checkpoint_every=0)  # the default levers
    task = Task(full.name, full.train.select(range(config.batch_size * steps)), full.test, full.choices)
    with PhaseMeter() as meter, tempfile.TemporaryDirectory() as out:
        baseline = rss_mb()
        tok = load_tokenizer()
        finetune(
            Emulator.load(emulator_dir).model, tok, task, out, lora=RunConfig().lora, config=config, progress=False
        )
        after_training = rss_mb()
        model, _ = load_model()
        evaluate(model, tok, full, limit=64, batch_size=RunConfig().evaluation.batch_size, progress=False)
    p = meter.phases
    return {
        "baseline_rss_mb": baseline,
        "steady_peak_mb": p["train_steps"]["peak_rss_mb"],
        "rss_after_first_step_mb": p["train_steps"]["start_rss_mb"],
        "rss_after_training_mb": after_training,
        "s_per_step": p["train_steps"]["seconds"] / (steps - 1),
        "eval_peak_above_start_mb": p["evaluation"]["peak_rss_mb"] - p["evaluation"]["start_rss_mb"],
        "eval_seconds": p["evaluation"]["seconds"],
    }


def drift_softmax() -> dict:
    """Peak above the forward passes of the end-to-end drift terms: whole batch vs one example at a time."""
    import torch

    from emloc_nb import batches, load_model, movie_sentiment
    from emloc_nb.measure import PhaseMeter, phase, return_freed_memory
    from emloc_nb.structure import model_inputs

    return_freed_memory()
    model, tok = load_model()
    batch = batches(tok, movie_sentiment().test, batch_size=8, limit=8, max_length=256)[0]
    with torch.no_grad():
        out_o = model(**model_inputs(model, batch), use_cache=False).logits
        out_e = out_o + 0.01 * torch.randn_like(out_o)  # an emulator's logits: the same shape is all that matters
    mask = batch["attention_mask"].bool()
    with PhaseMeter() as meter:
        with phase("whole batch"):
            lo, le = out_o.float().log_softmax(-1), out_e.float().log_softmax(-1)
            whole = float((lo.exp() * (lo - le)).sum(-1)[mask].sum())
            del lo, le
        with phase("one example at a time"):
            each = 0.0
            for i in range(len(out_o)):
                lo, le = out_o[i].float().log_softmax(-1), out_e[i].float().log_softmax(-1)
                each += float((lo.exp() * (lo - le)).sum(-1)[mask[i]].sum())
                del lo, le
    p = meter.phases
    return {
        "logits_mb": out_o.numel() * 4 / 2**20,
        "shape": list(out_o.shape),
        "before_mb": p["whole batch"]["peak_rss_mb"] - p["whole batch"]["start_rss_mb"],
        "after_mb": p["one example at a time"]["peak_rss_mb"] - p["one example at a time"]["start_rss_mb"],
        "same_kl": abs(whole - each) <= 1e-4 * abs(whole),
    }


def second_moment(dim: int, tokens: int = 2048) -> dict:
    """Peak of one accumulation of x.T @ x into a float64 sum: through a float64 copy vs in place."""
    import torch

    from emloc_nb.measure import PhaseMeter, phase, return_freed_memory

    return_freed_memory()
    x = torch.randn(tokens, dim)
    total = torch.zeros(dim, dim, dtype=torch.float64)
    with PhaseMeter() as meter:
        with phase("copy"):
            total += (x.T @ x).double()
        with phase("in place"):
            total += x.T @ x
    p = meter.phases
    return {
        "dim": dim,
        "before_mb": p["copy"]["peak_rss_mb"] - p["copy"]["start_rss_mb"],
        "after_mb": p["in place"]["peak_rss_mb"] - p["in place"]["start_rss_mb"],
    }


def loading(what: str, emulator_dir: str) -> dict:
    """Peak of a load and resident memory once every weight is touched, against the weights' size."""
    import torch

    from emloc_nb import Emulator, load_model
    from emloc_nb.measure import PhaseMeter, phase, return_freed_memory, weights_mb

    return_freed_memory()  # as the stage processes load (without it a bf16 load kept 90-220 MB more in 3 of 7 runs)
    with PhaseMeter() as meter:
        with phase("load"):
            if what == "original":
                model = load_model()[0]
            elif what == "original, bf16":
                model = load_model(dtype="bfloat16")[0]
            else:
                model = Emulator.load(emulator_dir).model
        with phase("touch"):
            sum(float(p.detach().float().sum()) for p in model.parameters())
    p = meter.phases
    return {
        "weights_mb": weights_mb(model),
        "load_peak_above_start_mb": p["load"]["peak_rss_mb"] - p["load"]["start_rss_mb"],
        "resident_after_touch_mb": p["touch"]["end_rss_mb"] - p["load"]["start_rss_mb"],
        "dtype": str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
    }


def statistics(how: str, path: str) -> dict:
    """Peak above the load of reading every layer's covariance from saved statistics, in layer order."""
    from emloc_nb import CalibrationStats
    from emloc_nb.measure import PhaseMeter, phase, return_freed_memory, rss_mb

    return_freed_memory()  # as the stage processes read them
    start = rss_mb()
    with PhaseMeter() as meter:
        stats = CalibrationStats.load(path)
        inputs = dict(stats.inputs.items()) if how == "kept" else stats.inputs  # kept: what loading used to do
        with phase("layers"):
            for name in stats.layers:
                float(inputs[stats.key_for(name)].covariance.trace())
    size = sum(s.second_moment.numel() * 8 for s in inputs.values()) / 2**20
    return {"peak_above_start_mb": meter.phases["layers"]["peak_rss_mb"] - start, "second_moments_mb": size}


def head_backward(dtype: str, layout: str) -> dict:
    """Peak above its start of the output layer's backward over the kept answer positions, SmolLM2's head."""
    import torch

    from emloc_nb import load_model
    from emloc_nb.measure import PhaseMeter, phase, return_freed_memory

    return_freed_memory()
    head = load_model(dtype=dtype)[0].get_output_embeddings().requires_grad_(False)  # frozen, as under a LoRA
    hidden = torch.randn(8, 100, head.in_features, dtype=head.weight.dtype, requires_grad=True)
    float(head.weight.sum())  # read once: a float32 weight is memory-mapped, and its first read adds its pages
    with PhaseMeter() as meter, phase("head"):
        kept = hidden[:, -5:]  # what logits_to_keep hands the head: a strided slice
        kept = kept.contiguous() if layout == "contiguous" else kept
        head(kept).float().logsumexp(-1).sum().backward()
    p = meter.phases["head"]
    weight_mb = head.weight.numel() * head.weight.element_size() / 2**20
    return {"peak_above_start_mb": p["peak_rss_mb"] - p["start_rss_mb"], "weight_mb": weight_mb}


def shape_cache(dtype: str, multiple: str, emulator_dir: str, steps: int = 8) -> dict:
    """Resident memory after each step of emulator fine-tuning at micro-batches of 1, batch lengths padded or not."""
    import dataclasses

    import emloc_nb.training
    from emloc_nb import Emulator, movie_sentiment
    from emloc_nb.config import RunConfig
    from emloc_nb.measure import PhaseMeter, return_freed_memory, rss_mb
    from emloc_nb.models import load_tokenizer
    from emloc_nb.tasks import Task

    return_freed_memory()
    emloc_nb.training.length_multiple = lambda model: int(multiple)  # the setting under test, for any dtype
    frozen = None if dtype == "float32" else dtype
    config = dataclasses.replace(
        RunConfig().train, steps=steps, checkpoint_every=0, micro_batch_size=1, frozen_dtype=frozen
    )
    full = movie_sentiment()
    task = Task(full.name, full.train.select(range(config.batch_size * steps)), full.test, full.choices)
    model, tok = Emulator.load(emulator_dir, dtype=dtype).model, load_tokenizer()
    after: list[float] = []
    with PhaseMeter() as meter, tempfile.TemporaryDirectory() as out:
        emloc_nb.training.finetune(
            model,
            tok,
            task,
            out,
            lora=RunConfig().lora,
            config=config,
            progress=False,
            callbacks=[lambda event: after.append(rss_mb())],
        )
    p = meter.phases["train_steps"]
    before_trim, heap_free, returned = rss_mb(), glibc_heap_free_mb(), None
    if heap_free is not None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        returned = before_trim - rss_mb()
    return {
        "rss_after_step_mb": after,
        "steady_peak_mb": p["peak_rss_mb"],
        "s_per_step": p["seconds"] / (steps - 1),
        "heap_free_mb": heap_free,
        "returned_by_trim_mb": returned,
    }


def glibc_heap_free_mb() -> float | None:
    """Free bytes inside glibc's heaps (mallinfo2's fordblks), or None where glibc < 2.33 or not glibc."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None

    fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in fields]

    mallinfo2.restype = Mallinfo2
    return mallinfo2().fordblks / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            emit(build_default_emulator(*rest))
        elif kind == "allocator":
            emit(allocator(rest[0], rest[1], args.steps))
        elif kind == "drift":
            emit(drift_softmax())
        elif kind == "moment":
            emit(second_moment(int(rest[0])))
        elif kind == "load":
            emit(loading(rest[0], rest[1]))
        elif kind == "statistics":
            emit(statistics(rest[0], rest[1]))
        elif kind == "head":
            emit(head_backward(rest[0], rest[1]))
        elif kind == "shapes":
            emit(shape_cache(rest[0], rest[1], rest[2]))
        return

    before = machine()
    with tempfile.TemporaryDirectory() as tmp:
        emulator_dir, stats_dir = str(Path(tmp) / "emulator"), str(Path(tmp) / "calibration")
        child(__file__, "--child", "build", emulator_dir, stats_dir)
        runs = interleaved(
            THRESHOLDS,
            args.rounds,
            lambda t: child(__file__, "--steps", args.steps, "--child", "allocator", t, emulator_dir),
        )
        loads = {
            w: child(__file__, "--child", "load", w, emulator_dir) for w in ("original", "original, bf16", "emulator")
        }
        reads = {how: child(__file__, "--child", "statistics", how, stats_dir) for how in ("kept", "dropped")}
        shapes = {
            (dtype, multiple): child(__file__, "--child", "shapes", dtype, multiple, emulator_dir)
            for dtype, multiple in (("bfloat16", "1"), ("bfloat16", "32"), ("float32", "1"))
        }
    drift = child(__file__, "--child", "drift")
    moments = [child(__file__, "--child", "moment", d) for d in (1536, 5632)]
    heads = {
        (dtype, layout): child(__file__, "--child", "head", dtype, layout)
        for dtype in ("bfloat16", "float32")
        for layout in ("strided", "contiguous")
    }
    after = machine()

    alloc = {
        t: {
            "steady_peak_mb": max(r["steady_peak_mb"] for r in rs),
            "rss_after_first_step_mb": median(r["rss_after_first_step_mb"] for r in rs),
            "s_per_step": median(r["s_per_step"] for r in rs),
            "eval_peak_above_start_mb": max(r["eval_peak_above_start_mb"] for r in rs),
            "eval_seconds": median(r["eval_seconds"] for r in rs),
            "runs": rs,
        }
        for t, rs in runs.items()
    }
    base = alloc["default"]

    def label(t):
        return "glibc default (rising)" if t == "default" else f"fixed {int(t) // 1024} KiB"

    lines = [
        "# Memory transients found by the phase view, before and after",
        "",
        "## 1. Freed blocks kept by glibc's heap",
        "",
        "Emulator (ρ = 0.8) fine-tuning at the default recipe (batch 8, one example at a time; steady state: steps 2–"
        f"{args.steps}), then evaluation of the original on 64 examples, in the same process; "
        f"{args.rounds} interleaved rounds (peaks: the largest; times: medians).",
        "",
        "| glibc mmap threshold | training steady-state peak MB | RSS after the first step MB | s/step | "
        "eval peak above its start MB | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for t, a in alloc.items():
        lines.append(
            f"| {label(t)} | {a['steady_peak_mb']:.0f} | {a['rss_after_first_step_mb']:.0f} | "
            f"{a['s_per_step']:.2f} (×{a['s_per_step'] / base['s_per_step']:.2f}) | "
            f"{a['eval_peak_above_start_mb']:.0f} | "
            f"{a['eval_seconds']:.1f} (×{a['eval_seconds'] / base['eval_seconds']:.2f}) |"
        )
    lines += [
        "",
        "## 2. Drift's vocabulary-wide log-softmaxes",
        "",
        f"Logits of one batch: {drift['shape']} = {drift['logits_mb']:.0f} MB per model. Peak above the two models' "
        f"logits: whole batch **{drift['before_mb']:.0f} MB**, one example at a time **{drift['after_mb']:.0f} MB** "
        f"(same KL: {drift['same_kl']}).",
        "",
        "## 3. Calibration's float64 copy of each x.T @ x",
        "",
        "| input width | through a float64 copy MB | in place MB |",
        "|---|---|---|",
    ]
    for m in moments:
        lines.append(f"| {m['dim']} | {m['before_mb']:.0f} | {m['after_mb']:.0f} |")
    lines += [
        "",
        "## 4. Loading (no transient: the weights are memory-mapped)",
        "",
        "| load | weights MB | peak of the load above its start MB | resident once every weight is read MB |",
        "|---|---|---|---|",
    ]
    for w, lo in loads.items():
        lines.append(
            f"| {w} ({lo['dtype']}) | {lo['weights_mb']:.0f} | {lo['load_peak_above_start_mb']:.0f} | "
            f"{lo['resident_after_touch_mb']:.0f} |"
        )
    lines += [
        "",
        "## 5. Saved calibration statistics, read layer by layer",
        "",
        f"SmolLM2's second moments (64 calibration examples, float64): {reads['kept']['second_moments_mb']:.0f} MB. "
        "Peak above the start of reading every layer's covariance in layer order, as the emulator, drift and "
        "correction stages do: each input kept once read (what a loaded report did) "
        f"**{reads['kept']['peak_above_start_mb']:.0f} MB**; each read when asked for and dropped (`StoredInputs`) "
        f"**{reads['dropped']['peak_above_start_mb']:.0f} MB**.",
    ]
    lines += [
        "",
        "## 6. The output layer's backward over the kept answer positions",
        "",
        "SmolLM2's head (the tied embeddings, 49152 × 576) on the last 5 of 100 positions of 8 sequences, as "
        "`answer_nll` asks for them (`logits_to_keep`): peak of forward and backward above their start.",
        "",
        "| weights | head input | head weight MB | peak above start MB |",
        "|---|---|---|---|",
    ]
    for (dtype, layout), h in heads.items():
        lines.append(f"| {dtype} | {layout} | {h['weight_mb']:.0f} | {h['peak_above_start_mb']:.0f} |")
    lines += [
        "",
        "## 7. oneDNN's kernel caches under bf16 frozen weights",
        "",
        "Emulator (ρ = 0.8) fine-tuning at micro-batches of one example (batch 8), 8 steps: resident memory after "
        "steps 1, 2, 4 and 8, the peak of steps 2–8, the time of a step; then the free memory glibc's heap keeps "
        "(mallinfo2) and what `malloc_trim(0)` gives back of it.",
        "",
        "| frozen weights | each micro-batch's length | RSS after step 1 / 2 / 4 / 8 MB | steady-state peak MB "
        "| s/step | heap's free MB | returned by malloc_trim MB |",
        "|---|---|---|---|---|---|---|",
    ]

    def mb(value):
        return "–" if value is None else f"{value:.0f}"

    for (dtype, multiple), sc in shapes.items():
        rss = " / ".join(f"{sc['rss_after_step_mb'][i]:.0f}" for i in (0, 1, 3, 7))
        length = "its example's" if multiple == "1" else f"padded to a multiple of {multiple}"
        lines.append(
            f"| {dtype} | {length} | {rss} | {sc['steady_peak_mb']:.0f} | {sc['s_per_step']:.2f} | "
            f"{mb(sc['heap_free_mb'])} | {mb(sc['returned_by_trim_mb'])} |"
        )
    lines += ["", contention_note(before, after)]
    write_results(
        "transients",
        {
            "allocator": alloc,
            "drift": drift,
            "second_moment": moments,
            "loading": loads,
            "statistics": reads,
            "head_backward": [{"dtype": d, "layout": lo, **h} for (d, lo), h in heads.items()],
            "shape_cache": [{"dtype": d, "multiple": int(m), **sc} for (d, m), sc in shapes.items()],
            "args": vars(args),
            "machine": [before, after],
        },
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
