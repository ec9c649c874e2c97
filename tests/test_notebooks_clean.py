"""The committed tutorial notebooks are clean, thin, and honour the small-settings switch.

- No outputs and no execution counts, except on the few cells marked
  `# NBVAL_CHECK_OUTPUT`: those keep the plain-text reference output nbval compares
  against (nbval only compares a cell whose reference has run, so it keeps a count).
- No saved widget state or other notebook metadata beyond the kernel's name.
- The first code cell builds the run with `notebook_run()` (EMLOC_SMALL / EMLOC_RUN_DIR).
- No logic in notebooks: no function or class definitions, loops, comprehensions or lambdas.

To clean notebooks after working in them (keeps the reference outputs):

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
EXPECTED = ["00_quickstart", "01_calibration_activations", "02_spectra_and_rank_choices",
            "03_finetune_the_emulator", "04_lora_correction_explained", "05_memory_budget"]
CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"
ALLOWED_METADATA = {"kernelspec", "language_info"}
LOGIC = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.AsyncFor, ast.While, ast.Lambda,
         ast.comprehension)
FIX = "python tests/test_notebooks_clean.py --fix"


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def checked(cell: dict) -> bool:
    return any(line.strip() == CHECK_MARKER for line in source(cell).splitlines())


def reference_problem(out: dict) -> str | None:
    """Why `out` may not be kept as a reference output (None: it may)."""
    if out["output_type"] == "execute_result":
        if out.get("execution_count") is not None or set(out["data"]) != {"text/plain"} or out.get("metadata"):
            return "a reference output must be text/plain only, without a count or metadata"
        return None
    if out["output_type"] == "stream" and out.get("name") == "stdout":
        return None
    return f"a {out['output_type']} reference output (keep text/plain or stdout only)"


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
        if not checked(cell):
            if cell.get("execution_count") is not None:
                problems.append(f"cell {i}: execution_count {cell['execution_count']}")
            problems += [f"cell {i}: a {o['output_type']} output" for o in cell.get("outputs", [])]
        else:
            problems += [f"cell {i}: {p}" for p in map(reference_problem, cell.get("outputs", [])) if p]
    assert not problems, f"{path.name} is not clean:\n  " + "\n  ".join(problems) + f"\nClean it with: {FIX} {path}"


def test_checked_cells_hold_their_reference_output(notebook):
    path, nb = notebook
    marked = [c for c in code_cells(nb) if checked(c)]
    assert marked, f"{path.name} has no {CHECK_MARKER} cell: nbval --nbval-lax would compare nothing in it"
    for cell in marked:
        assert cell["outputs"] and cell.get("execution_count") is not None, (
            f"{path.name}: {source(cell)!r} is marked for comparison but stores no reference output (nbval skips a "
            "cell whose reference has not run). Run the cell once under EMLOC_SMALL=1, save, then run " + FIX)


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
    imported = any(isinstance(n, ast.ImportFrom) and n.module == "emloc_nb.pipeline"
                   and any(a.name == "notebook_run" for a in n.names) for n in ast.walk(tree))
    called = any(isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                 and getattr(n.value.func, "id", None) == "notebook_run"
                 and [getattr(t, "id", None) for t in n.targets] == ["run"] for n in ast.walk(tree))
    assert imported and called, (f"{path.name}: the first code cell must do `from emloc_nb.pipeline import notebook_run` "
                                 f"and `run = notebook_run()`, so that EMLOC_SMALL and EMLOC_RUN_DIR apply; it is:\n{first}")


def test_notebooks_define_no_logic(notebook):
    path, nb = notebook
    for i, cell in enumerate(code_cells(nb)):
        tree = ast.parse(source(cell))
        found = sorted({type(n).__name__ for n in ast.walk(tree) if isinstance(n, LOGIC)})
        assert not found, (f"{path.name} code cell {i} defines logic ({', '.join(found)}). Notebooks only call the "
                           f"API; move the logic into emloc_nb or emloc_nb.widgets:\n{source(cell)}")


# ----------------------------------------------------------------------------- the cleaner

def clean(path: Path) -> list[str]:
    """Strip `path` in place as the checks above require; returns warnings about missing references."""
    nb = nbformat.read(path, as_version=4)
    warnings = []
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ALLOWED_METADATA}
    for i, cell in enumerate(nb.cells):
        cell.metadata = {k: v for k, v in cell.metadata.items() if k == "tags"}
        if cell.cell_type != "code":
            continue
        if checked(cell):
            kept = []
            for out in cell.outputs:
                if out.output_type == "execute_result" and "text/plain" in out.data:
                    kept.append(nbformat.v4.new_output("execute_result", data={"text/plain": out.data["text/plain"]},
                                                       execution_count=None))
                elif out.output_type == "stream" and out.name == "stdout":
                    kept.append(nbformat.v4.new_output("stream", name="stdout", text=out.text))
            cell.outputs, cell.execution_count = kept, (1 if kept else None)
            if not kept:
                warnings.append(f"{path.name} cell {i}: no reference output; run it once under EMLOC_SMALL=1 and save")
        else:
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)
    return warnings


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "--fix":
        sys.exit(__doc__)
    for target in [Path(a) for a in args[1:]] or notebook_paths():
        for warning in clean(target):
            print("warning:", warning)
        print("cleaned", target)
