"""From examples to tokens: the chat template, answer-only labels, and padded batches.

Tokenisation uses the model's chat template, and the labels mask out the prompt, so training
and scoring see only the answer tokens. Padding is masked out of everything downstream
through `attention_mask` and label -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import EmlocError

IGNORE_INDEX = -100


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], answer: str | None) -> tuple[str, str]:
    """The prompt text (ending where the model starts its reply) and the answer text."""
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise EmlocError(
                "The tokenizer's chat template renders the prompt differently once an answer follows. "
                "Use a template whose generation prompt is a prefix of the full chat."
            )
        return prompt, full[len(prompt) :]
    prompt = "\n".join(m["content"] for m in messages) + "\n"
    return prompt, "" if answer is None else answer + (tokenizer.eos_token or "")


def encode_example(tokenizer: PreTrainedTokenizerBase, messages: list[dict], answer: str | None = None) -> dict:
    """input_ids for prompt + answer, and labels that are -100 on the prompt."""
    prompt, reply = _render(tokenizer, messages, answer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
    return {"input_ids": prompt_ids + reply_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + reply_ids}


def shortest_example(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokens of the shortest possible example: a one-letter prompt and answer in the chat template."""
    return len(encode_example(tokenizer, [{"role": "user", "content": "a"}], "b")["input_ids"])


def check_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | None, name: str = "max_length") -> None:
    """A length limit that leaves room for a prompt and an answer after the chat template's own tokens."""
    shortest = shortest_example(tokenizer)
    if max_length is not None and max_length < shortest:
        raise EmlocError(
            f"{name}={max_length} is shorter than the chat template itself: a one-letter prompt and answer take "
            f"{shortest} tokens with this tokenizer, so every example would be cut to template tokens alone, with "
            f"nothing of its prompt and nothing to predict. Set {name} to at least {shortest} (the default is 256)."
        )


def tokenize(
    tokenizer: PreTrainedTokenizerBase, dataset: Dataset, *, max_length: int | None = 512, setting: str = "max_length"
) -> Dataset:
    """Add input_ids/labels columns; examples longer than max_length keep their end (the answer).

    A `max_length` shorter than the chat template's own tokens is refused (`setting` names it).
    """
    check_max_length(tokenizer, max_length, setting)

    def one(row):
        enc = encode_example(tokenizer, row["messages"], row["answer"])
        if max_length and len(enc["input_ids"]) > max_length:
            enc = {k: v[-max_length:] for k, v in enc.items()}
        return enc

    return dataset.map(one, remove_columns=dataset.column_names)


@dataclass
class Collator:
    """Pads a list of encoded examples on the left; padding gets attention 0 and label -100.

    Left padding puts every answer at the end of the batch, so scoring can keep only
    the last logits. position_ids count real tokens only, so outputs do not depend on
    padding. `multiple` rounds the width up (few distinct shapes: `emloc_nb.models.length_multiple`).
    Works as an HF Trainer `data_collator`.
    """

    pad_token_id: int
    multiple: int = 1

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = -(-max(len(f["input_ids"]) for f in features) // self.multiple) * self.multiple
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            if n:
                ids[i, -n:] = torch.as_tensor(f["input_ids"])
                mask[i, -n:] = 1
                labels[i, -n:] = torch.as_tensor(f.get("labels", f["input_ids"]))
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "labels": labels}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def collator_for(tokenizer: PreTrainedTokenizerBase, multiple: int = 1) -> Collator:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise EmlocError("The tokenizer has neither a pad nor an eos token. Set tokenizer.pad_token before use.")
    return Collator(pad, multiple)


def batches(
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    max_length: int | None = 512,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of the first `limit` examples (prompt + answer), e.g. for calibration."""
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    encoded = tokenize(tokenizer, dataset, max_length=max_length)
    collate = collator_for(tokenizer)
    rows = encoded.to_list()
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
