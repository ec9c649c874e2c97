"""Artifacts of the shared tiny run, loaded once for all widget tests (no model is loaded here)."""

from __future__ import annotations

import pytest

from emloc_nb.spectra import SpectrumTable


@pytest.fixture(scope="session")
def run_dir(tiny_run):
    return tiny_run.dir


@pytest.fixture(scope="session")
def spectra(tiny_run) -> SpectrumTable:
    return tiny_run.spectra()


@pytest.fixture(scope="session")
def stats(tiny_run):
    return tiny_run.calibration()


@pytest.fixture(scope="session")
def drift_report(tiny_run):
    return tiny_run.drift()


@pytest.fixture(scope="session")
def correction_report(tiny_run):
    return tiny_run.correction()
