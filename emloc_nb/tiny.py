"""Tiny randomly initialised models and a character tokenizer, built offline: for tests and examples."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .errors import EmlocError

_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer with a ChatML template, built offline."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token=None,
    )
    tok.chat_template = _TINY_CHAT_TEMPLATE
    return tok


def tiny_model(
    family: str = "llama", *, seed: int = 0, layers: int = 2, hidden: int = 64
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised model of the given family, small enough for unit tests."""
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    # A larger init than the usual 0.02 gives logits a real scale, so a LoRA can visibly learn in a few steps.
    common = dict(
        vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,
        eos_token_id=tokenizer.eos_token_id,
    )
    decoder = dict(  # Llama and Qwen2 take the same settings
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )
    configs = {
        "llama": lambda: LlamaConfig(**decoder),
        "qwen2": lambda: Qwen2Config(**decoder),
        "gpt2": lambda: GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common),
        "opt": lambda: OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden + 32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            word_embed_proj_dim=hidden,
            max_position_embeddings=512,
            **common,
        ),
    }
    if family not in configs:
        raise EmlocError(f"Unknown tiny model family {family!r}. Choose one of {sorted(configs)}.")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[family]())
    model.eval()
    return model, tokenizer
