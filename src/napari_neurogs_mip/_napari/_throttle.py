"""A rate limit for showing a fit: however fast the fit steps, the viewer is refreshed at most every interval.

Plain arithmetic on a clock, so the rule is tested without Qt or timing; the
widget asks it how long to wait before the next refresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """At most one refresh per ``interval`` seconds.

    Parameters
    ----------
    interval
        Shortest time between two refreshes, seconds.
    clock
        Seconds from any origin (default :func:`time.perf_counter`).
    """

    def __init__(self, interval: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.interval = float(interval)
        self._clock = clock
        self._last: float | None = None

    def delay(self) -> float:
        """Seconds to wait from now before the next refresh may happen (0: now)."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.interval - self._clock())

    def mark(self) -> None:
        """A refresh happens now."""
        self._last = self._clock()

    def reset(self) -> None:
        """Forget the last refresh (a new fit refreshes at once)."""
        self._last = None
