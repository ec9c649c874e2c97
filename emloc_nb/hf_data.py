"""`datasets` sources (task.source `hf:NAME` or `hf:DIR`): from the local cache unless downloads are allowed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
from datasets import Dataset, DatasetDict

from .errors import EmlocError
from .fetch import downloads_allowed
from .tasks import HF_PREFIX


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """datasets and huggingface_hub read HF_HUB_OFFLINE at import: force it on for one call, unless allowed."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def hf_dataset(source: str, split: str | None = None) -> Dataset | DatasetDict:
    """`hf:NAME` (a `datasets` dataset, from its cache unless downloads are allowed) or `hf:path/to/dir`.

    A folder is a `save_to_disk` dataset, or files `datasets.load_dataset` reads (parquet, CSV, JSON).
    """
    name = source.removeprefix(HF_PREFIX)
    path = Path(name).expanduser()
    saved = path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
    if saved:
        data = datasets.load_from_disk(str(path))
    else:
        offline = not path.is_dir() and not downloads_allowed()
        try:
            with _hub_offline(offline):
                data = datasets.load_dataset(str(path) if path.is_dir() else name)
        except Exception as e:
            if offline:
                raise EmlocError(
                    f"Dataset {name!r} is not a local folder and could not be loaded from the datasets cache "
                    f"({type(e).__name__}). Fetch it with `huggingface-cli download --repo-type dataset {name}`, or "
                    "allow the download (--allow-download, EMLOC_ALLOW_DOWNLOAD=1; HF_HUB_OFFLINE must be unset)."
                ) from None
            raise EmlocError(f"Could not load the dataset {name!r}: {type(e).__name__}: {e}") from None
    if split is None:
        return data
    if isinstance(data, Dataset):
        raise EmlocError(f"{name} is a single dataset with no splits; leave task.split unset.")
    if split not in data:
        raise EmlocError(f"{name} has the splits {list(data)}, not {split!r}. Set task.split to one of them.")
    return data[split]
