"""nbval settings for the tutorial notebooks.

make test executes every notebook with `pytest --nbval-lax`: each cell must run without
an error, and each notebook asserts its result. The notebooks are committed without
outputs, so nothing is compared; should a cell be marked `# NBVAL_CHECK_OUTPUT`, rich
outputs (HTML tables, plotly figures, widget views, JavaScript) and stderr (progress
bars, warnings) are still never compared: they change from run to run and are checked
in a real browser by tests/browser instead.
"""

NOT_COMPARED = (
    "text/html",
    "text/markdown",
    "application/javascript",
    "application/vnd.plotly.v1+json",
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
    "image/svg+xml",
    "stderr",
)


def pytest_collectstart(collector):
    if collector.path is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare = tuple(collector.skip_compare) + NOT_COMPARED
