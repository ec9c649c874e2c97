"""The one place that decides what loads lazily.

emloc-nb has a torch side (models, tokens, the method) and a shell that starts without torch:
`import emloc_nb`, configs and artifacts, the run directory, the stage functions, registry and
runner, the ablation, the CLI. A shell module names the torch-side code it calls as a
"module:attribute" string,

    load_model = lazy("emloc_nb.models:load_model")

imported on first use. That is the only way emloc-nb imports its own code late (the stage
functions use it too, so a stage process loads only what its stage needs); the layering test
(tests/widgets/test_layering.py) reads these strings as imports, so they follow the same one-way
order as every other import (docs/architecture.md).

Inside a function, emloc-nb imports only the third-party packages in THIRD_PARTY: heavy ones that a
shell module needs on one path only (torch and its ecosystem, pandas), and optional or
platform-bound ones (psutil, fcntl, resource; tqdm, whose notebook bars would import the notebook
stack). Every other import sits at the top of its module.
"""

from __future__ import annotations

import importlib

THIRD_PARTY = frozenset(
    {
        "accelerate",
        "datasets",
        "fcntl",
        "huggingface_hub",
        "pandas",
        "peft",
        "psutil",
        "resource",
        "safetensors",
        "tokenizers",
        "torch",
        "tqdm",
        "transformers",
    }
)


def resolve(target: str):
    """The attribute a "module:attribute" string names, importing its module."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class Lazy:
    """Stands for the function or class `target` names; imports it when called or asked for an attribute.

    It looks the name up on every use (a dictionary lookup once the module is imported), as an import
    inside the function would, so a test that patches the module's attribute is seen.
    """

    def __init__(self, target: str):
        self.target = target

    def resolve(self):
        return resolve(self.target)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends probe these: not the target's
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"lazy({self.target!r})"


def lazy(target: str) -> Lazy:
    """`target` ("emloc_nb.module:name"), imported on first use."""
    return Lazy(target)
