"""One control for the correction's clamp L, from 0 (naive transfer) through a log range to ∞ (no clamp).

A slider cannot reach either end, so a three-way toggle picks the ends and the
slider sets L in between. The slider steps through 1-2-3-5 values per decade, so
the paper's L = 3 (and 1, 10, ...) is exactly the value used: a log slider's step
would have turned 3 into 10^0.5 = 3.16.
"""

from __future__ import annotations

import math

import ipywidgets as W

L_MIN, L_MAX = 0.01, 100.0
STEPS = [float(f"{m}e{e}") for e in range(-2, 2) for m in (1, 2, 3, 5)] + [L_MAX]  # 0.01, 0.02, ..., 50, 100


def _options(values) -> list[tuple[str, float]]:
    return [(format(v, ".3g"), v) for v in sorted(values)]


class ClampControl:
    """`.value` is the effective L; `.widget` holds the toggle and the slider; `observe(fn)` calls fn(L).

    The slider shows L only in the "clamped at L" mode; in the other two it is disabled (and a static page
    leaves it out), so that one L is on show.
    """

    def __init__(self, value: float = 3.0):
        self.mode = W.ToggleButtons(
            options=[("naive (L = 0)", "naive"), ("clamped at L", "clamp"), ("no clamp (L = ∞)", "inf")],
            value="clamp",
            description="correction",
        )
        self.slider = W.SelectionSlider(options=_options(STEPS), value=3.0, description="L", continuous_update=True)
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
        """Any L ≥ 0: 0 and ∞ pick the ends, anything else moves the slider (clipped to its range; a value
        between its steps becomes a step of its own, so that L is the value asked for).

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
                value = min(L_MAX, max(L_MIN, float(value)))
                steps = [v for _, v in self.slider.options]
                if value not in steps:
                    self.slider.options = _options(steps + [value])
                self.slider.value = value
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
