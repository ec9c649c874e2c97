"""What a user installs: the declared Python and dependencies, the conda environments, licence and citation."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_python_and_dependencies_match_the_pins():
    project = _pyproject()["project"]
    assert project["requires-python"] == ">=3.11"  # numpy 2.4, pandas 3 and IPython 9 need 3.11
    assert {"pandas", "huggingface-hub", "datasets", "pyyaml"} <= _names(project["dependencies"])
    pinned = _names(
        line for line in (REPO / "requirements" / "constraints.txt").read_text().splitlines() if "==" in line
    )
    extras = project["optional-dependencies"]
    for name in _names(project["dependencies"]) | set().union(*(_names(v) for v in extras.values())):
        assert name in pinned, f"{name} is declared but has no pin in requirements/constraints.txt"


def test_the_user_environment_has_no_test_tools_and_the_dev_one_has_them():
    def pip_lines(name: str) -> list[str]:
        env = yaml.safe_load((REPO / name).read_text())
        return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))

    assert "-e .[notebook]" in pip_lines("environment.yml")
    assert "-e .[notebook,test,docs]" in pip_lines("environment-dev.yml")
    assert not any("test" in line for line in pip_lines("environment.yml"))


def test_licence_and_citation():
    licence = (REPO / "LICENSE").read_text()
    assert (
        "Apache License" in licence
        and "Version 2.0, January 2004" in licence
        and "END OF TERMS AND CONDITIONS" in licence
    )
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    paper = cff["preferred-citation"]
    assert paper["title"] == "EMLoC: Emulator-based Memory-efficient Fine-tuning with LoRA Correction"
    assert [a["family-names"] for a in paper["authors"]] == ["Lin", "Yu", "Chang", "Wang"]
    assert "2506.12015" in str(paper["identifiers"]) and cff["type"] == "software"
