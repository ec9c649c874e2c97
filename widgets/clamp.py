"""One control for the correction's clamp L, from 0 (naive transfer) through a log range to ∞ (no clamp).

A log slider cannot reach either end, so a three-way toggle picks the ends and the
slider sets L in between.
"""

from __future__ import annotations

import math

import ipywidgets as W

L_MIN, L_MAX = 0.01, 100.0


class ClampControl:
    """`.value` is the effective L; `.widget` holds the toggle and the slider; `observe(fn)` calls fn(L)."""

    def __init__(self, value: float = 3.0):
        self.mode = W.ToggleButtons(
            options=[("naive (L = 0)", "naive"), ("clamp L", "clamp"), ("no clamp (L = ∞)", "inf")],
            value="clamp",
            description="L",
        )
        self.slider = W.FloatLogSlider(
            value=3.0,
            base=10,
            min=math.log10(L_MIN),
            max=math.log10(L_MAX),
            step=0.05,
            description="L",
            readout_format=".3g",
            continuous_update=True,
        )
        self.widget = W.HBox([self.mode, self.slider])
        self._callbacks: list = []
        self._holding = False
        self.set(value)
        self.mode.observe(self._changed, names="value")
        self.slider.observe(self._changed, names="value")

    @property
    def value(self) -> float:
        if self.mode.value == "naive":
            return 0.0
        if self.mode.value == "inf":
            return math.inf
        return float(self.slider.value)

    def set(self, value: float) -> None:
        """Any L ≥ 0: 0 and ∞ pick the ends, anything else moves the slider (clipped to its range).

        Observers are called once, with the new L, if it changed.
        """
        before = self.value
        self._holding = True  # moving the slider, then the mode, would each report, the first with a stale L
        try:
            if value == 0:
                self.mode.value = "naive"
            elif math.isinf(value):
                self.mode.value = "inf"
            else:
                self.slider.value = min(L_MAX, max(L_MIN, value))
                self.mode.value = "clamp"
        finally:
            self._holding = False
        self.slider.disabled = self.mode.value != "clamp"
        if self.value != before:
            self._notify()

    def observe(self, fn) -> None:
        self._callbacks.append(fn)

    def _changed(self, _) -> None:
        if self._holding:
            return
        self.slider.disabled = self.mode.value != "clamp"
        self._notify()

    def _notify(self) -> None:
        for fn in self._callbacks:
            fn(self.value)
