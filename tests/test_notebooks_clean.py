"""The committed tutorial notebooks are clean, thin, and honour the small-settings switch.

- No outputs and no execution counts.
- Each notebook checks its result with an `assert`, so that nbval (which, with no
  stored outputs, checks that every cell runs) fails on a wrong result too.
- No saved widget state or other notebook metadata beyond the kernel's name.
- The first code cell builds the run with `notebook_run()` (EMLOC_SMALL / EMLOC_RUN_DIR).
- No logic in notebooks: no function or class definitions, loops, comprehensions or lambdas.

To clean notebooks after working in them:

    python tests/test_notebooks_clean.py --fix [notebooks/NAME.ipynb ...]
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = [
    "00_quickstart",
    "01_calibration_activations",
    "02_spectra_and_rank_choices",
    "03_finetune_the_emulator",
    "04_lora_correction_explained",
    "05_memory_budget",
]
ALLOWED_METADATA = {"kernelspec", "language_info"}
LOGIC = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.Lambda,
    ast.comprehension,
)
FIX = "python tests/test_notebooks_clean.py --fix"


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


# ----------------------------------------------------------------------------- checks


def test_the_tutorials_are_all_there():
    assert [p.stem for p in notebook_paths()] == EXPECTED


@pytest.fixture(params=notebook_paths(), ids=lambda p: p.name)
def notebook(request) -> tuple[Path, dict]:
    path = request.param
    nb = json.loads(path.read_text(encoding="utf-8"))
    nbformat.validate(nbformat.from_dict(nb))
    return path, nb


def test_no_outputs_or_execution_counts(notebook):
    path, nb = notebook
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            if cell.get("attachments"):
                problems.append(f"cell {i}: a {cell['cell_type']} cell with attachments")
            continue
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i}: execution_count {cell['execution_count']}")
        problems += [f"cell {i}: a {o['output_type']} output" for o in cell.get("outputs", [])]
    assert not problems, f"{path.name} is not clean:\n  " + "\n  ".join(problems) + f"\nClean it with: {FIX} {path}"


def test_each_notebook_asserts_its_result(notebook):
    path, nb = notebook
    asserts = [c for c in code_cells(nb) if any(isinstance(n, ast.Assert) for n in ast.walk(ast.parse(source(c))))]
    assert asserts, f"{path.name} checks nothing: add an `assert` on its result, or nbval only sees that cells run"


def test_no_saved_widget_state_or_extra_metadata(notebook):
    path, nb = notebook
    extra = set(nb["metadata"]) - ALLOWED_METADATA
    assert not extra, f"{path.name} carries notebook metadata {sorted(extra)} (e.g. saved widget state). Run {FIX}"
    for i, cell in enumerate(nb["cells"]):
        meta = set(cell.get("metadata", {})) - {"tags"}
        assert not meta, f"{path.name} cell {i} carries metadata {sorted(meta)}. Run {FIX}"


def test_first_code_cell_uses_notebook_run(notebook):
    path, nb = notebook
    first = source(code_cells(nb)[0])
    tree = ast.parse(first)
    imported = any(
        isinstance(n, ast.ImportFrom) and n.module == "emloc_nb.run" and any(a.name == "notebook_run" for a in n.names)
        for n in ast.walk(tree)
    )
    called = any(
        isinstance(n, ast.Assign)
        and isinstance(n.value, ast.Call)
        and getattr(n.value.func, "id", None) == "notebook_run"
        and [getattr(t, "id", None) for t in n.targets] == ["run"]
        for n in ast.walk(tree)
    )
    assert imported and called, (
        f"{path.name}: the first code cell must do `from emloc_nb.run import notebook_run` "
        f"and `run = notebook_run()`, so that EMLOC_SMALL and EMLOC_RUN_DIR apply; it is:\n{first}"
    )


def test_notebooks_define_no_logic(notebook):
    path, nb = notebook
    for i, cell in enumerate(code_cells(nb)):
        tree = ast.parse(source(cell))
        found = sorted({type(n).__name__ for n in ast.walk(tree) if isinstance(n, LOGIC)})
        assert not found, (
            f"{path.name} code cell {i} defines logic ({', '.join(found)}). Notebooks only call the "
            f"API; move the logic into emloc_nb or emloc_nb.widgets:\n{source(cell)}"
        )


# ----------------------------------------------------------------------------- the cleaner


def clean(path: Path) -> None:
    """Strip `path` in place as the checks above require."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ALLOWED_METADATA}
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "--fix":
        sys.exit(__doc__)
    for target in [Path(a) for a in args[1:]] or notebook_paths():
        clean(target)
        print("cleaned", target)
