"""The streamed emulator build's peak memory on a synthetic checkpoint of over 1B parameters.

1. A child writes a random Llama checkpoint (Llama-3.2-1B's shape with SmolLM2's
   vocabulary, 1.07B parameters, sharded safetensors, one tensor generated at a time) to a
   temporary directory; it is never committed.
2. A child calibrates on random token sequences and builds the emulator (ρ = 0.5) with
   `emloc_nb.streaming.build_streaming`, one block at a time; its peak resident memory is
   compared with the checkpoint's size on disk.

Goal: peak ≤ 0.5 × the checkpoint's size.

    .venv/bin/python bench/streaming_build.py      # results/streaming_build.{json,md}; about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import RESULTS, child, contention_note, emit, machine, random_batch, write_results

SHAPE = dict(
    vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True,
)  # fmt: skip
SHARD_BYTES = 1 << 30


def write_checkpoint(directory: Path, dtype: str) -> dict:
    """A random checkpoint of SHAPE in `dtype`, sharded like save_pretrained's, holding one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, torch_dtype=dtype)
    config.save_pretrained(directory)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).named_parameters()}  # tied: the head is not listed
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, total, index = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=getattr(torch, dtype))
        t.normal_(0.0, 0.02, generator=generator) if len(shape) > 1 else t.fill_(1.0)
        shard[name], size = t, size + t.nbytes
        total += t.nbytes
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return {"parameters": sum(s.numel() for s in shapes.values()), "bytes": total, "shards": index}


def build(directory: Path, output: Path, rho: float, examples: int, sequence: int, batch_size: int) -> dict:
    import torch

    from emloc_nb.measure import PhaseMeter, return_freed_memory, rss_mb
    from emloc_nb.streaming import build_streaming

    return_freed_memory()
    generator = torch.Generator().manual_seed(0)
    batches = [
        random_batch(SHAPE["vocab_size"], batch_size, sequence, generator=generator)
        for _ in range(0, examples, batch_size)
    ]
    started = time.time()
    with PhaseMeter() as meter:
        baseline = rss_mb()
        emulator = build_streaming(directory, batches, rho, output, progress=False)
    return {
        "baseline_rss_mb": baseline,
        "peak_mb": meter.peak_rss_mb,
        "phases": meter.phases,
        "seconds": time.time() - started,
        "emulator_parameters": emulator.parameter_count(),
        "emulator_bytes": sum(f.stat().st_size for f in output.glob("*.safetensors")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", help="the checkpoint's dtype (the build computes in float32)")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--examples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--sequence", type=int, default=256, help="tokens per calibration sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from the committed JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *paths = args.child
        if kind == "write":
            emit(write_checkpoint(Path(paths[0]), args.dtype))
        else:
            emit(build(Path(paths[0]), Path(paths[1]), args.rho, args.examples, args.sequence, args.batch_size))
        return

    name = f"streaming_build_{args.dtype}" if args.dtype != "bfloat16" else "streaming_build"
    if args.render:  # the markdown again from the committed JSON, without rerunning
        data = json.loads((RESULTS / f"{name}.json").read_text())
        data["goal"] = goal(data)
        write_results(name, data, render_markdown(data))
        return
    before = machine()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:  # the home disk: /tmp may be small
        checkpoint, output = Path(tmp) / "checkpoint", Path(tmp) / "emulator"
        checkpoint.mkdir()
        written = child(__file__, "--dtype", args.dtype, "--child", "write", checkpoint)
        on_disk = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        print("checkpoint:", written, on_disk, flush=True)
        flags = ["--rho", args.rho, "--examples", args.examples, "--sequence", args.sequence]
        result = child(__file__, *flags, "--batch-size", args.batch_size, "--child", "build", checkpoint, output)
    after = machine()
    data = {"checkpoint": written, "checkpoint_bytes": on_disk, "build": result, "args": vars(args)}
    data |= {"goal": goal(data), "machine": [before, after]}
    write_results(name, data, render_markdown(data))


def goal(data: dict) -> dict:
    """The build's own peak (its phase; loading the result afterwards is not the build) against the checkpoint."""
    peak = data["build"]["phases"]["streamed build"]["peak_rss_mb"]
    on_disk = data["checkpoint_bytes"] / (1 << 20)
    return {"peak_mb": peak, "checkpoint_mb": on_disk, "ratio": peak / on_disk, "met": peak / on_disk <= 0.5}


def render_markdown(data: dict) -> str:
    """The results table, the phases and the goal, from the saved measurements."""
    mb = 1 << 20
    args, written, result, target = data["args"], data["checkpoint"], data["build"], data["goal"]
    on_disk = data["checkpoint_bytes"] / mb
    fp32_mb = written["parameters"] * 4 / mb
    phases = result["phases"]
    peak, ratio = target["peak_mb"], target["ratio"]

    def row(what, value):
        return f"| {what} | {value:.0f} | {value / on_disk:.2f} | {value / fp32_mb:.2f} |"

    lines = [
        "# Streamed emulator build on a synthetic checkpoint",
        "",
        f"Random Llama checkpoint: {written['parameters'] / 1e9:.2f} B parameters (hidden {SHAPE['hidden_size']}, "
        f"intermediate {SHAPE['intermediate_size']}, {SHAPE['num_hidden_layers']} blocks, vocabulary "
        f"{SHAPE['vocab_size']}), {args['dtype']}, {written['shards']} shards, **{on_disk:.0f} MB** on disk "
        f"({fp32_mb:.0f} MB as the float32 weights an in-memory build would hold).",
        "",
        f"Build: `build_streaming`, ρ = {args['rho']:g}, calibration on {args['examples']} random sequences of "
        f"{args['sequence']} tokens (batch {args['batch_size']}, pushed through each block a sequence at a time), "
        "second moments in float64, every layer factored from float64 Gram matrices: those wider in than out "
        "(down, k, v) from their outputs' second moments, the others from their inputs'; blocks in float32.",
        "",
        "| what | MB | × checkpoint on disk | × float32 weights |",
        "|---|---|---|---|",
        row("process baseline (Python, torch, transformers)", result["baseline_rss_mb"]),
        row("**streamed build, peak**", peak),
        row("of which: a block's calibration, peak", phases["calibration"]["peak_rss_mb"]),
        row("afterwards: loading the float32 emulator it wrote, peak", phases["load"]["peak_rss_mb"]),
        "",
        f"Build time {phases['streamed build']['seconds'] / 60:.1f} min; the emulator: "
        f"{result['emulator_parameters'] / 1e9:.2f} B parameters, {result['emulator_bytes'] / mb:.0f} MB.",
        "",
        f"**Goal** (the build's peak ≤ 0.5 × checkpoint size): ×{ratio:.2f}: "
        f"**{'met' if target['met'] else 'not met'}**.",
        "",
        contention_note(*data["machine"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
