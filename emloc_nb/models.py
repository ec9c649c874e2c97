"""Loading models: a causal LM and its tokenizer in a dtype, on a device, one tensor at a time; and its skeleton.

Where a model comes from (the default model, checkpoints, Hub ids) is emloc_nb.model_sources.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import EmlocError, first_line
from .measure import phase
from .model_sources import DEFAULT_MODEL, checkpoint_files, resolve_source
from .serial import read_tensors, safetensors_header


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
    placed on `device` one by one (serial.read_tensors), so no second copy is held.
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


def load_tokenizer(source: str | os.PathLike = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """The model's tokenizer alone, without its weights."""
    path, gguf_file = resolve_source(source)
    with load_errors(path, trust_remote_code, gguf_file):
        return AutoTokenizer.from_pretrained(
            str(path), gguf_file=gguf_file, trust_remote_code=trust_remote_code, local_files_only=True
        )


def skeleton(source: str | os.PathLike = DEFAULT_MODEL, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model's structure with no weights in memory (parameters on the meta device), e.g. to check a plan."""
    from accelerate import init_empty_weights

    path, gguf_file = resolve_source(source)
    with load_errors(path, trust_remote_code, gguf_file):
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
    path, gguf_file = resolve_source(source)  # a Hub id resolves to its cached snapshot: never the Hub here
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
    with load_errors(path, trust_remote_code, gguf_file):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)  # memory-mapped, not copied
    model.to(device)  # a GGUF file is dequantized on the CPU first
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def load_errors(path: Path, trust_remote_code, gguf_file: str | None = None) -> Iterator[None]:
    """transformers' errors for a checkpoint it cannot use, as one-line EmlocErrors; and a real boolean to trust.

    With `gguf_file`, the error names that file: a GGUF file is read by transformers' GGUF parser, whose errors
    (a struct error, a JSON error from a fallback) describe its body, not the checkpoint directory.
    """
    if not isinstance(trust_remote_code, bool):
        raise EmlocError(
            f"trust_remote_code must be True or False, not {type(trust_remote_code).__name__} {trust_remote_code!r}. "
            "Pass a real boolean."
        )
    try:
        yield
    except (EmlocError, MemoryError):
        raise
    except Exception as e:  # transformers and the GGUF parser raise many kinds (struct.error among them)
        text = str(e)
        if "trust_remote_code" in text and not trust_remote_code:
            raise EmlocError(
                f"{path} asks to run its own code (auto_map), which emloc-nb never does unless you ask. "
                "Pass --trust-remote-code (trust_remote_code=True) only if you trust that code."
            ) from None
        if gguf_file is not None:
            raise EmlocError(
                f"{path / gguf_file} is not a GGUF file transformers can read ({first_line(e)}). Check the file "
                "(download it again), or pass a checkpoint directory."
            ) from None
        raise EmlocError(
            f"{path} is not a checkpoint transformers can load ({first_line(e)}). Check its files."
        ) from None
