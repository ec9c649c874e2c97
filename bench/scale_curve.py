"""Memory against model size, the paper's Figure 1 measured here: inference, LoRA fine-tuning, emulator fine-tuning.

Synthetic Llama-shaped decoders from 135M to 3B parameters (random weights: memory depends
only on shapes), batch 1, sequence 256, the memory levers on (gradient checkpointing, logits
only at the answer positions, LoRA in fp32; frozen weights in fp32 by default because this
CPU lacks avx512_bf16, `--dtype bfloat16` halves them where bf16 matmuls are fast). Each measurement runs
in its own process:

- inference: the original, no-grad forwards; the peak of that phase;
- LoRA fine-tuning of the original, and of emulators at ρ = 0.5 and 0.8: the steady-state
  peak (steps after the first, which also allocates the optimiser state).

An emulator's block linears are low-rank pairs with the ranks `RankPlan(ρ)` gives (random
factors, built on the meta device so that the dense layers never exist).

Extrapolation to 8B and 32B (the language model of a 38B InternVL-class model) from per-block
figures: each setting is measured on the real configuration cut to 1 and to 2 blocks; the
difference is one block's cost and the rest is the embeddings, the head and the process, so
that L blocks cost `outer + L × block`. The same rule, applied to the 3B configuration, is
checked against the full 3B measurement.

    .venv/bin/python bench/scale_curve.py      # results/scale_curve.{json,md,png}; about an hour on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS, child, contention_note, emit, machine, random_batch, train_step, write_results

SEQUENCE, ANSWER_TOKENS = 256, 8
LLAMA = dict(vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)
# SmolLM2's three sizes and a Llama-3.2-3B-shaped model, all with SmolLM2's vocabulary.
CURVE = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, tie_word_embeddings=True),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, tie_word_embeddings=True),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
}  # fmt: skip
EXTRAPOLATED = {
    "3B": CURVE["3B"],
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip
SETTINGS = ["inference", "lora", "emulator@0.5", "emulator@0.8"]
EXTRAPOLATED_SETTINGS = ["inference", "lora", "emulator@0.25", "emulator@0.5"]
PAPER = {"model": "38B", "lora_gb": 94.8, "emloc_gb": 20.1}  # DESIGN.md §2.1, at a 25% memory budget


def make_model(shape: dict, rho: float | None, dtype: str):
    """A random Llama of `shape` in `dtype`; with `rho`, its block linears are low-rank pairs at RankPlan(rho)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from emloc_nb.factoring import LowRankLinear
    from emloc_nb.ranks import RankPlan
    from emloc_nb.structure import block_linears

    config = LlamaConfig(**{**LLAMA, **shape})
    with torch.device("meta"):
        dtype = getattr(torch, dtype)
        model = LlamaForCausalLM(config).to(dtype)
        if rho is not None:
            targets = block_linears(model)
            ranks = RankPlan(rho).resolve({n: tuple(m.weight.shape) for n, m in targets.items()})
            for name, m in targets.items():
                if ranks[name].rank is None:  # kept dense
                    continue
                parent, _, leaf = name.rpartition(".")
                low = LowRankLinear(m.in_features, m.out_features, ranks[name].rank, bias=False, dtype=dtype)
                setattr(model.get_submodule(parent), leaf, low)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were left empty by to_empty
    model.tie_weights()
    return model.eval()


def measure(shape: dict, setting: str, steps: int, dtype: str) -> dict:
    import torch

    from emloc_nb.config import RunConfig
    from emloc_nb.lora import attach_lora
    from emloc_nb.measure import PhaseMeter, return_freed_memory, rss_mb, weights_mb

    return_freed_memory()
    torch.manual_seed(0)
    rho = float(setting.split("@")[1]) if setting.startswith("emulator") else None
    batch = random_batch(shape.get("vocab_size", LLAMA["vocab_size"]), 1, SEQUENCE, answer=ANSWER_TOKENS)
    with PhaseMeter() as meter:
        baseline = rss_mb()
        with meter.phase("load"):
            model = make_model(shape, rho, dtype)
        out = {"baseline_rss_mb": baseline, "weights_mb": weights_mb(model)}
        out["parameters"] = sum(p.numel() for p in model.parameters())
        if setting == "inference":
            with meter.phase("inference"), torch.no_grad():
                for _ in range(steps):
                    model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        use_cache=False,
                        logits_to_keep=1,
                    )
            out["peak_mb"] = meter.phases["inference"]["peak_rss_mb"]
            out["s_per_step"] = meter.phases["inference"]["seconds"] / steps
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            peft_model = attach_lora(model, RunConfig().lora)
            peft_model.train()
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            out["lora_dtype"] = str(trainable[0].dtype)
            optimizer = torch.optim.AdamW(trainable, lr=1e-4)
            for step in range(steps):
                with meter.phase("train_first_step" if step == 0 else "train_steps"):
                    train_step(peft_model, optimizer, batch)
            out["first_step_peak_mb"] = meter.phases["train_first_step"]["peak_rss_mb"]
            out["peak_mb"] = meter.phases["train_steps"]["peak_rss_mb"]
            out["s_per_step"] = meter.phases["train_steps"]["seconds"] / (steps - 1)
    return out


def plot(rows: list[dict], png: Path, dtype: str) -> bool:
    """The curve as an interactive-looking plotly figure, rendered to PNG by headless chromium if there is one."""
    import plotly.graph_objects as go

    from emloc_nb.widgets.static import figure_png

    names = {"inference": "inference (original)", "lora": "LoRA fine-tuning (original)"}
    fig = go.Figure()
    for setting in SETTINGS:
        pts = [r for r in rows if r["setting"] == setting]
        label = names.get(setting) or f"LoRA fine-tuning (emulator, ρ = {setting.split('@')[1]})"
        fig.add_scatter(
            x=[r["original_parameters"] / 1e9 for r in pts],
            y=[r["peak_mb"] / 1024 for r in pts],
            mode="lines+markers",
            name=label,
            line={"dash": "dash"} if setting == "inference" else None,
        )
    fig.update_layout(
        title=f"Steady-state peak memory (CPU RSS), batch 1, sequence {SEQUENCE}, {dtype} frozen weights, "
        "gradient checkpointing",
        xaxis_title="parameters of the original (billions)",
        xaxis_type="log",
        yaxis_title="peak resident memory (GiB)",
        width=1000,
        height=560,
        template="plotly_white",
        legend={"x": 0.02, "y": 0.98},
    )
    if not figure_png(fig, png, width=1000, height=560):
        print("no chromium: the PNG is not rendered")
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="steps per measurement (the first is not steady state)")
    parser.add_argument("--sizes", nargs="+", default=list(CURVE))
    parser.add_argument("--extrapolate", nargs="*", default=list(EXTRAPOLATED))
    parser.add_argument(
        "--dtype",
        default="float32",
        help="frozen weights' dtype (bfloat16 halves them; on a CPU without avx512_bf16 "
        "its matmuls run ~7x slower, too slow for 3B here)",
    )
    parser.add_argument("--render", action="store_true", help="rewrite the markdown and PNG from results/*.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        render(json.loads((RESULTS / "scale_curve.json").read_text()))
        return
    if args.child:
        job = json.loads(args.child)
        emit(measure(job["shape"], job["setting"], args.steps, args.dtype))
        return

    before, started = machine(), time.time()

    def run(shape: dict, setting: str) -> dict:
        result = child(
            __file__,
            "--steps",
            args.steps,
            "--dtype",
            args.dtype,
            "--child",
            json.dumps({"shape": shape, "setting": setting}),
        )
        print(setting, {k: v for k, v in result.items() if k.endswith("mb")}, flush=True)
        return result

    rows = [{"size": s, "setting": st, **run(CURVE[s], st)} for s in args.sizes for st in SETTINGS]
    inference = {r["size"]: r for r in rows if r["setting"] == "inference"}
    for r in rows:
        r["vs_inference"] = r["peak_mb"] / inference[r["size"]]["peak_mb"]
        r["original_parameters"] = inference[r["size"]]["parameters"]

    extrapolated = []
    for name in args.extrapolate:
        shape = EXTRAPOLATED[name]
        for setting in EXTRAPOLATED_SETTINGS:
            one, two = (run({**shape, "num_hidden_layers": n}, setting) for n in (1, 2))
            block = two["peak_mb"] - one["peak_mb"]
            outer = one["peak_mb"] - block
            layers = shape["num_hidden_layers"]
            row = {"model": name, "setting": setting, "block_mb": block, "outer_mb": outer, "layers": layers}
            row["predicted_mb"] = outer + layers * block
            row["parameters"] = one["parameters"] + (layers - 1) * (two["parameters"] - one["parameters"])
            measured = next((r for r in rows if r["size"] == name and r["setting"] == setting), None)
            if measured is not None:
                row["measured_mb"] = measured["peak_mb"]
                row["error"] = row["predicted_mb"] / measured["peak_mb"] - 1
            extrapolated.append(row)
    after = machine()
    payload = {"rows": rows, "extrapolated": extrapolated, "paper": PAPER, "args": vars(args)}
    render(payload | {"minutes": (time.time() - started) / 60, "machine": [before, after]})


def render(payload: dict) -> None:
    """results/scale_curve.{json,md,png} from the measurements (`--render` redoes this from the saved JSON)."""
    rows, extrapolated, args = payload["rows"], payload["extrapolated"], argparse.Namespace(**payload["args"])
    before, after = payload["machine"]

    png = RESULTS / "scale_curve.png"
    RESULTS.mkdir(exist_ok=True)
    rendered = plot(rows, png, args.dtype)
    lines = [
        "# Memory against model size (the paper's Figure 1, measured here on CPU)",
        "",
        f"Synthetic Llama-shaped decoders with random weights, batch 1, sequence {SEQUENCE}, loss on the last "
        f"{ANSWER_TOKENS} tokens; frozen weights in {args.dtype}, LoRA (r = 8, all seven projections) in fp32, "
        "gradient checkpointing on. Peak resident memory of each phase, each setting in its own process (the process "
        f"itself, Python and the libraries, is about {rows[0]['baseline_rss_mb']:.0f} MB of every figure). "
        "Fine-tuning: the steady state is the steps after the first (" + f"{args.steps - 1} step(s) here).",
        "",
    ]
    if rendered:
        lines += ["![scale curve](scale_curve.png)", ""]
    lines += [
        "| size | parameters (of the model trained) | setting | weights MB | peak MB | × inference peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['parameters'] / 1e9:.2f} B | {r['setting']} | {r['weights_mb']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['vs_inference']:.2f} |"
        )
    goal = [r for r in rows if r["setting"] == "emulator@0.5"]
    met = all(r["vs_inference"] <= 1.0 for r in goal)
    lines += [
        "",
        "**Goal** (emulator fine-tuning at ρ = 0.5 within the original's inference peak at every size): "
        + ", ".join(f"{r['size']} ×{r['vs_inference']:.2f}" for r in goal)
        + f": **{'met' if met else 'not met'}**.",
    ]
    if extrapolated:
        lines += [
            "",
            "## Extrapolated from per-block figures",
            "",
            "Each setting measured on the configuration cut to 1 and 2 blocks: block = peak(2) − peak(1), "
            "outer = peak(1) − block (embeddings, head, process), predicted = outer + layers × block.",
            "",
            "| model | setting | one block MB | outer MB | layers | predicted GiB | measured GiB | error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in extrapolated:
            measured = f"{r['measured_mb'] / 1024:.2f}" if "measured_mb" in r else "–"
            error = f"{r['error']:+.1%}" if "error" in r else "–"
            lines.append(
                f"| {r['model']} | {r['setting']} | {r['block_mb']:.0f} | {r['outer_mb']:.0f} | {r['layers']} | "
                f"{r['predicted_mb'] / 1024:.1f} | {measured} | {error} |"
            )
        by = {(r["model"], r["setting"]): r["predicted_mb"] / 1024 for r in extrapolated}
        for name in [n for n in ("8B", "32B") if (n, "lora") in by]:
            lora, emu = by[(name, "lora")], by[(name, "emulator@0.25")]
            lines.append(
                f"\n{name}: LoRA on the original {lora:.1f} GB, on the emulator at ρ = 0.25 {emu:.1f} GB "
                f"(×{lora / emu:.1f}), at ρ = 0.5 {by[(name, 'emulator@0.5')]:.1f} GB; inference "
                f"{by[(name, 'inference')]:.1f} GB."
            )
        lines += [
            "",
            f"The paper ({PAPER['model']}, a multimodal model on one GPU, at a 25% memory budget): LoRA "
            f"{PAPER['lora_gb']} GB, EMLoC {PAPER['emloc_gb']} GB (×{PAPER['lora_gb'] / PAPER['emloc_gb']:.1f}). "
            "Its figures include a vision encoder, image tokens (longer sequences) and a GPU's allocator; these are "
            "for a decoder alone at sequence 256 on CPU, so compare the ratios, not the gigabytes.",
        ]
    lines += ["", f"Runtime {payload['minutes']:.0f} min. " + contention_note(before, after)]
    write_results("scale_curve", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
