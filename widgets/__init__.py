"""emloc_nb.widgets: interactive views over the core's saved data objects (ipywidgets 8 + plotly).

Each view is a plain class holding `.widget`; it displays itself in Jupyter, takes
the core's data objects (or a run directory via `from_run`), never recomputes the
pipeline and needs no model. `write_report` writes the same figures as one offline
HTML file.
"""

from .activations import ActivationsView
from .correction import CorrectionView, ToyCorrection
from .dashboard import Dashboard
from .drift import DriftView
from .planner import RankPlanner
from .report import write_report
from .spectra import SpectrumView
from .training import TrainingMonitor
from .transfer import AblationView, TransferView

__all__ = [
    "AblationView",
    "ActivationsView",
    "CorrectionView",
    "Dashboard",
    "DriftView",
    "RankPlanner",
    "SpectrumView",
    "ToyCorrection",
    "TrainingMonitor",
    "TransferView",
    "write_report",
]
