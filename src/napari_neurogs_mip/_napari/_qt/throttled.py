"""A refresh that runs on the Qt thread at most once per interval, however often it is asked for."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QObject, QTimer

from .._throttle import Throttle


class ThrottledCall(QObject):
    """Calls ``function`` at most once per ``interval`` seconds (the rule of :class:`.._throttle.Throttle`).

    :meth:`request` calls it at the next turn of the event loop when the last call is old
    enough, else once when it is; requests in between are merged into that one.  Lives on the Qt thread of its
    ``parent`` and is deleted with it, its timer too.

    Parameters
    ----------
    function
        What to call (no arguments).
    interval
        Shortest time between two calls, seconds.
    """

    def __init__(self, function: Callable[[], None], interval: float, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._function = function
        self._throttle = Throttle(interval)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.now)

    def request(self) -> None:
        """Call at the next turn of the event loop if the last call is old enough, else once when it is."""
        if not self._timer.isActive():
            self._timer.start(int(self._throttle.delay() * 1000))

    def now(self) -> None:
        """Call at once, cancelling a pending request (e.g. the last refresh of a run)."""
        self._timer.stop()
        self._throttle.mark()
        self._function()

    def cancel(self) -> None:
        """Drop a pending request."""
        self._timer.stop()

    def reset(self) -> None:
        """Forget the last call and drop a pending request: the next request is not held back (a new run)."""
        self._timer.stop()
        self._throttle.reset()
