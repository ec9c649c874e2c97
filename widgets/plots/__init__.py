"""Pure plotly figures, one module per stage: the core's data objects in, a `go.Figure` out.

    common       colours, layout, titles, trace lookup, short layer names, per-block bars, labels
    activations  calibration activations       spectra     spectra and rank choices
    drift        emulator vs original           correction  the LoRA correction
    training     loss curves                    memory      predicted and measured memory

The live views and the static HTML report both draw with these, so a figure looks the
same in both. Nothing here imports ipywidgets.
"""
