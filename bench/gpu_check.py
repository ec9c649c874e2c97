"""The GPU path, once: every stage on one device, with its peak memory per phase.

A synthetic Llama (random weights: memory depends only on shapes; `--size` is one of
scale_curve's shapes, or `tiny`) in `--dtype` on `--device`, and random token batches
(batch 8, sequence 256, the last 8 tokens the answer, as in scale_curve):

- calibration (`collect_stats`) and factoring (`build_emulator`, ρ = `--rho`) on the device;
- inference: no-grad forwards of the original;
- LoRA fine-tuning (r = 8 on all seven projections, LoRA weights in float32) of the emulator
  and of the original: the first step, then the steady state;
- the correction (`correct_lora`, L = 3) of the emulator's adapter for the original.

On CUDA the peak of each phase is `torch.cuda.max_memory_allocated` (PhaseMeter resets it per
phase); the process's resident memory is recorded beside it.

    python3 bench/gpu_check.py --device cuda --size 1.7B --results $OUT    # a lent GPU machine (bench/README.md)
    .venv/bin/python bench/gpu_check.py --device cpu --size tiny --results /tmp/x   # this script's own check
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, machine, random_batch, train_step, write_results
from scale_curve import ANSWER_TOKENS, CURVE, LLAMA, SEQUENCE
from transformers import LlamaConfig, LlamaForCausalLM

from emloc_nb import build_emulator, collect_stats, fingerprint
from emloc_nb.config import LoraSpec
from emloc_nb.correction import correct_lora
from emloc_nb.lora import attach_lora, initial_factors, save_adapter
from emloc_nb.measure import PhaseMeter, phase
from emloc_nb.structure import model_inputs, on_device

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    **CURVE,
}  # fmt: skip
BATCH = 8


def train(model, which: str, data: list[dict], steps: int, adapter_dir: Path | None = None) -> float:
    """`steps` LoRA steps on `model` (the first one alone, then the steady state); the last loss."""
    peft_model = attach_lora(model, LoraSpec())
    peft_model.train()
    initial = initial_factors(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    loss = float("nan")
    for step in range(steps):
        with phase(f"{which}: {'train_first_step' if step == 0 else 'train_steps'}"):
            loss = train_step(peft_model, optimizer, data[step % len(data)])
    if adapter_dir is not None:
        save_adapter(peft_model, adapter_dir, base_fingerprint=fingerprint(model), initial=initial)
    del optimizer
    peft_model.unload()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--size", default="1.7B", choices=list(SHAPES))
    parser.add_argument("--rho", type=float, default=0.5, help="the emulator's kept share of the block linears")
    parser.add_argument("--steps", type=int, default=4, help="LoRA steps per model (the first, then the steady state)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where gpu_check.{json,md} go")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    before = machine()
    config = LlamaConfig(**{**LLAMA, **SHAPES[args.size]})
    generator = torch.Generator().manual_seed(0)

    def batches(n: int) -> list[dict]:
        return [
            random_batch(config.vocab_size, BATCH, SEQUENCE, answer=ANSWER_TOKENS, generator=generator)
            for _ in range(n)
        ]

    calibration, training = batches(8), batches(args.steps)
    started = time.perf_counter()
    with PhaseMeter() as meter, tempfile.TemporaryDirectory() as tmp:
        with phase("load"), torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
        stats = collect_stats(model, calibration, progress=False)
        emulator = build_emulator(model, stats, args.rho, progress=False)
        with phase("inference"), torch.no_grad():
            for batch in calibration:
                model(**model_inputs(model, on_device(model, batch)), logits_to_keep=ANSWER_TOKENS)
        losses = {
            "emulator": train(emulator.model, "emulator", training, args.steps, Path(tmp) / "adapter"),
            "original": train(model, "original", training, args.steps),
        }
        correct_lora(model, emulator, Path(tmp) / "adapter", Path(tmp) / "corrected", progress=False)
    seconds = time.perf_counter() - started
    after = machine()
    params = sum(p.numel() for p in model.parameters())
    on_gpu = device.type == "cuda"
    unit = "peak GPU memory (MB, max_memory_allocated)" if on_gpu else "peak resident memory (MB)"
    peaks = {name: p.get("peak_cuda_mb") if on_gpu else p["peak_rss_mb"] for name, p in meter.phases.items()}
    inference = peaks["inference"]
    device_name = torch.cuda.get_device_name(device) if on_gpu else before["cpu"]
    lines = [
        "# The GPU path, once: every stage on one device",
        "",
        f"Synthetic Llama `{args.size}` ({params / 1e6:,.0f}M parameters, random weights) in {args.dtype} on "
        f"{device_name}; batch {BATCH} × {SEQUENCE} tokens; emulator at ρ = {args.rho:g}; LoRA r = 8 on all "
        f"seven projections, {args.steps} steps per model. torch {torch.__version__}; {seconds:.0f} s in all.",
        "",
        f"| phase | {unit} | × inference | seconds |",
        "|---|---|---|---|",
    ]
    for name, p in meter.phases.items():
        lines.append(f"| {name} | {peaks[name]:.0f} | {peaks[name] / inference:.2f} | {p['seconds']:.1f} |")
    lines += ["", f"Final losses (random tokens: only that they are finite matters): {losses}."]
    payload = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "device": device_name,
        "parameters": params,
        "phases": meter.phases,
        "peaks_mb": peaks,
        "losses": losses,
        "seconds": seconds,
        "machine": [before, after],
    }
    write_results("gpu_check", payload, "\n".join(lines), directory=args.results)


if __name__ == "__main__":
    main()
