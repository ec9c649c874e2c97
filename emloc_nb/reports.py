"""The one shape every report object has: save/load as a directory, rows, to_frame, layer(name).

A report is a plain data object a stage returns and a widget draws:

    report.save(path, overwrite=False)   a directory, written atomically: <kind>.json (metadata, with
                                         format_version and kind), when there are tensors
                                         <kind>.safetensors (per-layer tensors keyed "layer/field"), and
                                         manifest.json (the files' SHA-256; emloc_nb.artifacts)
    Report.load(path)                    the same object back, without any model, after checking the manifest
    report.rows                          a list of dicts: one per layer, input or example
    report.to_frame()                    those rows as a pandas DataFrame (indexed by layer name when rows have one)
    report.layer(name)                   what the report holds for one layer, where it has layers

Subclasses say what goes into the files (`_metadata`, `_tensors`) and how to rebuild
themselves from them (`_from_saved`); they never write files themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .artifacts import (
    FORMAT_VERSION,
    MANIFEST,
    artifact_dir,
    verify_manifest,
    verify_side_manifest,
    write_side_manifest,
)
from .errors import PATH, EmlocError, argument_kinds
from .serial import StoredGroups, read_json_object, write_grouped, write_json

if TYPE_CHECKING:
    import torch


class Report:
    """Base class of the saveable report objects; see the module docstring."""

    kind: ClassVar[str]  # names the files and is recorded in the metadata
    # True: _from_saved gets the tensor groups as a StoredGroups, each read when asked for (large reports).
    reads_lazily: ClassVar[bool] = False
    # A subclass also has `rows` (list[dict]), a field or a property. It is not declared here,
    # where it would be an inherited default that dataclass subclasses pick up.

    # -- what a subclass provides
    def _metadata(self) -> dict:
        raise NotImplementedError

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict[str, dict[str, torch.Tensor]]):
        raise NotImplementedError

    def _model_fingerprint(self) -> str | None:
        """The fingerprint of the model the report belongs to, where it records one (for the manifest)."""
        return None

    def _config(self) -> dict:
        """The settings that produced the report, where it knows them (for the manifest)."""
        return {}

    # -- the shared shape
    @argument_kinds(path=PATH)
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the report as a directory; a non-empty `path` is refused unless `overwrite=True`."""
        with artifact_dir(
            path,
            overwrite=overwrite,
            kind=self.kind,
            model_fingerprint=self._model_fingerprint(),
            config=self._config(),
        ) as tmp:
            self._write_files(tmp)
        return Path(path)

    def save_into(self, directory: str | Path) -> Path:
        """Write the report's files into an existing directory that holds other things too, each file atomically.

        For a report that lives beside the artifacts it sums up (an ablation's runs); `load(directory)` reads it.
        Its own manifest, <kind>.manifest.json, lists the report's files only (written last).
        """
        directory = Path(directory)
        files = self._write_files(directory)
        write_side_manifest(
            directory,
            self.side_manifest(),
            kind=self.kind,
            files=files,
            model_fingerprint=self._model_fingerprint(),
            config=self._config(),
        )
        return directory

    @classmethod
    def side_manifest(cls) -> str:
        """The manifest's name for a report saved with `save_into`."""
        return f"{cls.kind}.manifest.json"

    def _write_files(self, directory: Path) -> list[str]:
        tensors = self._tensors()
        written = []
        if tensors:
            write_grouped(directory / f"{self.kind}.safetensors", tensors)
            written.append(f"{self.kind}.safetensors")
        write_json(
            directory / f"{self.kind}.json", {"format_version": FORMAT_VERSION, "kind": self.kind, **self._metadata()}
        )
        return [*written, f"{self.kind}.json"]

    @classmethod
    @argument_kinds(path=PATH)
    def load(cls, path: str | Path):
        """The report saved at `path`, after checking every file against its manifest."""
        path = Path(path)
        if (path / cls.side_manifest()).is_file() and not (path / MANIFEST).is_file():
            verify_side_manifest(path, cls.side_manifest(), kind=cls.kind)  # written by save_into
        else:
            verify_manifest(path, kind=cls.kind)
        meta = read_json_object(path / f"{cls.kind}.json", {"kind": str})
        if meta["kind"] != cls.kind:
            raise EmlocError(
                f"{path} holds a {meta['kind']!r} artifact, not a {cls.kind!r} one. "
                "Load it with the class that wrote it."
            )
        tensor_file = path / f"{cls.kind}.safetensors"
        groups = StoredGroups(tensor_file) if tensor_file.is_file() else None
        tensors = {} if groups is None else groups if cls.reads_lazily else groups.read_all()
        try:
            return cls._from_saved(meta, tensors)
        except EmlocError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise EmlocError(
                f"{path} holds a malformed {cls.kind} report ({type(e).__name__}: {str(e)[:100]}). Recreate it."
            ) from None

    def to_frame(self):
        """The rows as a pandas DataFrame, indexed by layer name when the rows name layers."""
        import pandas as pd  # pandas comes with datasets; imported here to keep `import emloc_nb` light

        frame = pd.DataFrame(self.rows)
        return frame.set_index("name") if "name" in frame.columns else frame


class LayerReport(Report):
    """A report with one row per layer (each row has a "name"): `layer(name)` is that row."""

    @property
    def names(self) -> list[str]:
        return [r["name"] for r in self.rows]

    def layer(self, name: str):
        for row in self.rows:
            if row["name"] == name:
                return row
        shown = ", ".join(self.names[:3])
        raise EmlocError(f"{name!r} is not a layer of this {self.kind} report. Layers: {shown}, ...")
