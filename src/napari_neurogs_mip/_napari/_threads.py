"""Start the plugin's thread workers on a private thread pool, not Qt's global one.

napari's workers run on ``QThreadPool.globalInstance()``, which has as many
threads as CPU cores.  Qt itself borrows that pool, e.g. to convert large
images in parallel, and then waits for it on the main thread while holding
the GIL (PyQt5 does not release it).  A fit worker blocks its thread for long
stretches (paused, or waiting for the viewer) and Python workers need the GIL,
so on a small machine two of ours could leave Qt nothing to run on: the viewer
would hang (seen on two cores with a fit plus a background task).  Our own
pool keeps the global one free for Qt.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from qtpy.QtCore import QThreadPool

LOGGER = logging.getLogger(__name__)
EXIT_WAIT_MS = 60_000
"""Longest wait at interpreter exit for running workers (a stopped fit ends after one step)."""

MAX_THREADS = 16
"""Threads of the private pool: fits, saves and voxelisations are few and mostly wait."""

_pool: QThreadPool | None = None
_running: set[Any] = set()
"""Workers started here, kept alive until they finish (Qt runs them; Python must not free them)."""
_stoppables: weakref.WeakSet[Any] = weakref.WeakSet()
"""Objects with a ``stop()`` that ends their worker (fit sessions), stopped at exit."""
_exit_hooked = False


def forget_at_close(widget: Any, session: Any) -> None:
    """When ``widget`` is destroyed (closed, or its viewer was), stop its ``session`` and disconnect the
    session's events, so that the run's last events reach no deleted Qt object."""

    def forget(*_: Any, session: Any = session) -> None:  # no reference to the widget: it is gone
        session.stop()
        session.events.disconnect()
        session.status.events.disconnect()

    widget.destroyed.connect(forget)


def stop_at_exit(stoppable: Any) -> None:
    """Call ``stoppable.stop()`` if the interpreter exits while it may still run."""
    _stoppables.add(stoppable)


def _finish_at_exit() -> None:
    """Stop fits and wait for our workers before Python tears down what they use.

    Registered with :mod:`threading`'s exit hooks, which run in reverse order of
    registration: this runs before ``concurrent.futures`` shuts the renderer's
    thread pool down under a worker's feet (and before Qt's threads meet a
    finalising interpreter, which aborts the process).
    """
    for stoppable in list(_stoppables):
        try:
            stoppable.stop()
        except Exception:  # exiting anyway: keep stopping the others
            LOGGER.debug("could not stop %r at exit", stoppable, exc_info=True)
    if _pool is not None and _running:
        _pool.waitForDone(EXIT_WAIT_MS)


def _hook_exit() -> None:
    global _exit_hooked
    if _exit_hooked:
        return
    register = getattr(threading, "_register_atexit", None)  # what concurrent.futures uses
    if register is not None:
        register(_finish_at_exit)
    else:  # pragma: no cover - other Pythons
        import atexit

        atexit.register(_finish_at_exit)
    _exit_hooked = True


def worker_pool() -> QThreadPool:
    """The plugin's thread pool (made on first use)."""
    global _pool
    if _pool is None:
        _pool = QThreadPool()
        _pool.setMaxThreadCount(MAX_THREADS)
    return _pool


def start_worker(worker: Any) -> Any:
    """Start a napari/superqt worker on :func:`worker_pool`; returns it."""
    _hook_exit()
    _running.add(worker)
    worker.finished.connect(lambda: _running.discard(worker))
    worker_pool().start(worker)
    return worker


def _relay(events: Iterator[Any]) -> Iterator[Any]:
    yield from events


def qt_runner(events: Iterator[Any], deliver: Callable[[Any], None], done: Callable[[], None]) -> None:
    """A :data:`._session.Runner` for napari: a generator worker on :func:`worker_pool` that delivers each event,
    and then ``done()``, on the main thread (Qt queues signals from the worker's thread to it)."""
    from napari.qt.threading import create_worker

    worker = create_worker(_relay, events)
    worker.yielded.connect(deliver)
    worker.finished.connect(done)
    start_worker(worker)
