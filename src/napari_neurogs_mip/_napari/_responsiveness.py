"""How long the viewer's main thread stalls while the Fit MIP widget runs a fit: a measurement, not a test.

The stalls depend on the machine and its load (a shared two-core machine
stalls for whatever else runs on it), so they are measured by a benchmark
(``benchmarks/bench_responsiveness.py``), which calls :func:`measure_stalls`.
What is deterministic (the worker never touches a layer; refreshes are
throttled) is tested in ``tests/napari``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

TICK_MS = 10
"""Interval of the timer whose lateness measures the stalls."""


@dataclass
class Stalls:
    """Main-thread gaps between ticks of a :data:`TICK_MS` timer, seconds.

    Attributes
    ----------
    gaps
        Every gap from Start to the end of the fit.
    stepping
        The gaps after the live layers first showed a render (the fit stepping), without the building of the layers.
    iterations
        Iterations the fit ran.
    """

    gaps: list[float] = field(default_factory=list)
    stepping: list[float] = field(default_factory=list)
    iterations: int = 0

    @property
    def longest(self) -> float:
        """The longest gap, seconds (0 without ticks)."""
        return max(self.gaps, default=0.0)

    @property
    def longest_stepping(self) -> float:
        """The longest gap while the fit stepped, seconds."""
        return max(self.stepping, default=0.0)


def measure_stalls(widget: Any, iterations: int, timeout: float = 600.0) -> Stalls:
    """Run a fit of ``iterations`` with ``widget`` (a docked FitWidget) and time the main thread's gaps.

    A full garbage collection of the heap napari, torch and pandas build takes a
    quarter of a second whatever the widget does; the objects made before the
    fit are frozen out of collection meanwhile, so the measurement is about the
    widget's own work.

    Raises
    ------
    TimeoutError
        The fit did not end within ``timeout`` seconds.
    RuntimeError
        The fit failed.
    """
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    widget.settings_panel.set_value("iterations", iterations)
    stalls = Stalls()
    stepping = [False]
    ended: list[Any] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        stalls.gaps.append(now - last[0])
        if stepping[0]:
            stalls.stepping.append(now - last[0])
        last[0] = now

    def mark_stepping(_: int) -> None:
        stepping[0] = True

    timer = QTimer()
    timer.setInterval(TICK_MS)
    timer.timeout.connect(tick)
    widget.layers_updated.connect(mark_stepping)
    widget.run_ended.connect(lambda: ended.append(True))
    gc.collect()
    gc.freeze()
    try:
        timer.start()
        last[0] = time.perf_counter()
        widget.start()
        start = time.perf_counter()
        while not ended:
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"the fit did not end within {timeout} s")
            app.processEvents()
            time.sleep(0.001)
        timer.stop()
    finally:
        gc.unfreeze()
        widget.layers_updated.disconnect(mark_stepping)
    result = widget.session.result
    if result is None:
        raise RuntimeError(f"the fit did not finish: {widget.session.status.message}")
    stalls.iterations = result.iteration
    return stalls
