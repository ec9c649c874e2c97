"""Evaluation: task accuracy and answer loss for any model (+ adapter); emulator-vs-original drift.

Accuracy is a constrained choice for classification tasks (the choice whose answer
tokens have the highest log-likelihood) and exact match of greedy generation
otherwise. Drift compares the emulator with its original per layer (relative output
error on held-out activations), per block (hidden-state cosine) and end to end
(next-token KL and perplexity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .artifacts import FORMAT_VERSION, check_fingerprint, read_json, write_json
from .calibration import CalibrationStats, collect_stats
from .data import IGNORE_INDEX, Task, collator_for, encode_example
from .errors import EmlocError
from .models import accepts, fingerprint, linear_weight, model_inputs, on_device

# ----------------------------------------------------------------------------- answer likelihood


def answer_nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labelled (answer) tokens, and its mask.

    With left padding the answers sit at the end of the batch, so only the last
    logits are computed (the LM head is a large share of a small model's cost).
    """
    batch = on_device(model, batch)
    labels = batch["labels"]
    width = labels.shape[1]
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(labelled) == 0:
        raise EmlocError("The batch has no answer tokens (all labels are -100). Check that examples have answers.")
    keep = min(width, width - int(labelled[0]) + 1)
    extra = {"logits_to_keep": keep} if accepts(model, "logits_to_keep") else {}
    logits = model(**model_inputs(model, batch), use_cache=False, **extra).logits[:, -keep:]
    target = labels[:, width - keep + 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    return nll, target != IGNORE_INDEX


@torch.no_grad()
def choice_logprobs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]],
                    choices: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each choice's answer tokens after each prompt: (N, K), and token counts.

    The prompt runs once; its key/value cache is repeated for the K continuations.
    """
    k = len(choices)
    collate = collator_for(tokenizer)
    prompt_ids, conts = [], []
    for messages in prompts:
        encs = [encode_example(tokenizer, messages, c) for c in choices]
        n_prompt = encs[0]["labels"].count(IGNORE_INDEX)
        prompt_ids.append({"input_ids": encs[0]["input_ids"][:n_prompt]})
        conts.extend(e["input_ids"][n_prompt:] for e in encs)
    batch = on_device(model, collate(prompt_ids))
    device = batch["input_ids"].device
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    out = model(**model_inputs(model, batch), use_cache=True, **extra)
    first = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(k, 0)
    width = max(len(c) for c in conts)
    cont = torch.full((len(conts), width), collate.pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros_like(cont)
    for i, c in enumerate(conts):
        cont[i, :len(c)] = torch.as_tensor(c)
        cont_mask[i, :len(c)] = 1
    cont, cont_mask = cont.to(device), cont_mask.to(device)
    logp = torch.zeros(cont.shape, device=device)
    logp[:, 0] = first.gather(1, cont[:, :1]).squeeze(1)
    if width > 1:
        cache_arg = "cache" if accepts(model, "cache") else "past_key_values"  # renamed in transformers 5.x
        cache = getattr(out, cache_arg)
        cache.batch_repeat_interleave(k)
        mask = torch.cat([batch["attention_mask"].repeat_interleave(k, 0), cont_mask], dim=1)
        step = {"input_ids": cont, "attention_mask": mask,
                "position_ids": batch["position_ids"][:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(width, device=device)}
        rest = model(**model_inputs(model, step), **{cache_arg: cache}, use_cache=True).logits.float().log_softmax(-1)
        logp[:, 1:] = rest[:, :-1].gather(2, cont[:, 1:, None]).squeeze(2)
    logp = logp * cont_mask
    return logp.sum(1).view(-1, k).cpu(), cont_mask.sum(1).view(-1, k).cpu()


@torch.no_grad()
def _generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    collate = collator_for(tokenizer)
    batch = on_device(model, collate([{"input_ids": encode_example(tokenizer, m)["input_ids"]} for m in prompts]))
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=collate.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, *, split: str = "test",
             limit: int | None = 300, batch_size: int = 16, progress: bool = True) -> dict:
    """Accuracy and mean answer-token loss on the first `limit` examples of a split."""
    data = getattr(task, split)
    data = data.select(range(min(limit or len(data), len(data))))
    if len(data) == 0:
        raise EmlocError(f"The {split} split of {task.name} is empty. Use a task with held-out examples.")
    model.eval()
    correct, nll_sum, tokens, predictions = 0, 0.0, 0, []
    collate = collator_for(tokenizer)
    for start in tqdm(range(0, len(data), batch_size), desc=f"evaluate {split}", disable=not progress):
        rows = data.select(range(start, min(start + batch_size, len(data))))
        prompts, answers = list(rows["messages"]), list(rows["answer"])
        if task.choices:
            scores, counts = choice_logprobs(model, tokenizer, prompts, task.choices)
            picked = [task.choices[i] for i in scores.argmax(1).tolist()]
            gold = torch.tensor([task.choices.index(a) for a in answers])
            nll_sum -= float(scores.gather(1, gold[:, None]).sum())
            tokens += int(counts.gather(1, gold[:, None]).sum())
        else:
            enc = collate([encode_example(tokenizer, m, a) for m, a in zip(prompts, answers)])
            nll, mask = answer_nll(model, enc)
            nll_sum += float(nll[mask].sum())
            tokens += int(mask.sum())
            longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
            picked = [p.strip() for p in _generate(model, tokenizer, prompts, longest + 4)]
        correct += sum(p.strip() == a.strip() for p, a in zip(picked, answers))
        predictions.extend(picked)
    return {"accuracy": correct / len(data), "answer_loss": nll_sum / max(tokens, 1), "examples": len(data),
            "predictions": predictions}


# ----------------------------------------------------------------------------- drift


@dataclass
class DriftReport:
    """How far the emulator drifts from its original, per layer, per block and end to end."""

    layers: list[dict]  # name, block, kind, rank, predicted_error, measured_error
    blocks: list[dict]  # block, cosine (mean hidden-state cosine at the block's output)
    summary: dict  # kl, ppl_original, ppl_emulator, ppl_ratio, tokens
    tokens: list[dict] = field(default_factory=list)  # per example: tokens and per-token KL

    def save(self, path: str | Path) -> Path:
        write_json(path, {"format_version": FORMAT_VERSION, "kind": "drift", "layers": self.layers,
                          "blocks": self.blocks, "summary": self.summary, "tokens": self.tokens})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "DriftReport":
        d = read_json(path)
        return cls(d["layers"], d["blocks"], d["summary"], d["tokens"])


def output_energy(m: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """tr(M C Mᵀ): the summed ‖M x‖² over the tokens whose second moment is C, in float64."""
    m = m.double()
    return torch.einsum("oi,ij,oj->", m, covariance.double(), m)


def relative_error(delta: torch.Tensor, weight: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖Δ x‖ / ‖W x‖ summed over the tokens whose second moment is `covariance`: √(tr ΔCΔᵀ / tr WCWᵀ)."""
    num, den = float(output_energy(delta, covariance)), float(output_energy(weight, covariance))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


@torch.no_grad()
def drift(original: nn.Module, emulator, batches: list[dict], *, heldout: CalibrationStats | None = None,
          tokenizer: PreTrainedTokenizerBase | None = None, token_examples: int = 4, progress: bool = True) -> DriftReport:
    """Compare `emulator` (an Emulator) with `original` on held-out `batches`.

    Per-layer errors use the second moments of the original's inputs on these
    batches (`heldout`, collected here if not given), so they measure each layer
    alone; block cosines and KL measure the drift as it accumulates.
    """
    original_fp = fingerprint(original)
    check_fingerprint(emulator.original_fingerprint, original_fp, artifact="The emulator", model="the original model")
    if heldout is None:
        heldout = collect_stats(original, batches, layers=emulator.spectra.names, progress=progress)
    check_fingerprint(heldout.model_fingerprint, original_fp, artifact="The held-out statistics", model="the original model")
    originals = dict(original.named_modules())
    emulated = dict(emulator.model.named_modules())
    layers = []
    for row in emulator.spectra.rows:
        w = linear_weight(originals[row["name"]]).detach()
        delta = w - linear_weight(emulated[row["name"]]).detach()
        layers.append({"name": row["name"], "block": row["block"], "kind": row["kind"], "rank": row["rank"],
                       "predicted_error": row["predicted_error"],
                       "measured_error": relative_error(delta, w, heldout.for_layer(row["name"]).covariance)})

    cos_sum: torch.Tensor | None = None
    kl_sum = nll_o = nll_e = 0.0
    n_tok = n_pred = 0
    examples = []
    for batch in tqdm(batches, desc="drift", disable=not progress):
        batch = on_device(original, batch)
        inputs = model_inputs(original, batch)
        out_o = original(**inputs, output_hidden_states=True, use_cache=False)
        out_e = emulator.model(**inputs, output_hidden_states=True, use_cache=False)
        mask = batch["attention_mask"].bool()
        cos = torch.stack([F.cosine_similarity(a.float(), b.float(), dim=-1)[mask].sum()
                           for a, b in zip(out_o.hidden_states[1:], out_e.hidden_states[1:])])
        cos_sum = cos if cos_sum is None else cos_sum + cos
        n_tok += int(mask.sum())
        lo, le = out_o.logits.float().log_softmax(-1), out_e.logits.float().log_softmax(-1)
        kl = (lo.exp() * (lo - le)).sum(-1)  # KL(original ‖ emulator) per position
        kl_sum += float(kl[mask].sum())
        pred = mask[:, :-1] & mask[:, 1:]  # positions whose next token is real
        target = batch["input_ids"][:, 1:, None]
        nll_o -= float(lo[:, :-1].gather(2, target).squeeze(2)[pred].sum())
        nll_e -= float(le[:, :-1].gather(2, target).squeeze(2)[pred].sum())
        n_pred += int(pred.sum())
        for i in range(len(batch["input_ids"])):
            if len(examples) < token_examples and tokenizer is not None:
                ids = batch["input_ids"][i][mask[i]]
                examples.append({"tokens": tokenizer.convert_ids_to_tokens(ids.tolist()), "kl": kl[i][mask[i]].tolist()})
    blocks = [{"block": b, "cosine": float(c) / n_tok} for b, c in enumerate(cos_sum.tolist())]
    ppl_o, ppl_e = math.exp(nll_o / n_pred), math.exp(nll_e / n_pred)
    summary = {"kl": kl_sum / n_tok, "ppl_original": ppl_o, "ppl_emulator": ppl_e, "ppl_ratio": ppl_e / ppl_o,
               "tokens": n_tok, "mean_measured_error": sum(r["measured_error"] for r in layers) / max(len(layers), 1)}
    return DriftReport(layers, blocks, summary, examples)
