"""A fit session without Qt: its state, its trainer, the latest step and images, and events about them.

The Fit MIP widget shows a :class:`FitSession`; tests drive one without a
viewer.  A *runner* carries the events of :func:`._fit_events.fit_events` from
the thread that computes them to :meth:`FitSession.handle`: :func:`thread_runner`
(a plain thread, the default) or the napari thread worker of
:func:`._threads.qt_runner`, which delivers them on the main thread.

Pausing and stopping are the trainer's own (``Trainer.pause``/``resume``/``stop``,
safe from any thread): the session keeps no second copy of them.  Only while the
trainer does not exist yet can a fit be cancelled, by an event the preparation
checks.

Events (psygnal): :attr:`FitSession.status` is an evented dataclass (``state``,
``message``...), :attr:`FitSession.events` a signal group (``ready``, ``step``,
``finished``, ``fitted``, ``failed``, ``ended``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from psygnal import Signal, SignalGroup, evented

from ..prepare import FitInputs
from ..train import CheckpointEvent, FinishedEvent, FitConfig, StepEvent, Trainer
from ..views import View
from ._fit_events import Compiling, Failed, Fitted, FitUpdate, Ready, fit_events

LOGGER = logging.getLogger(__name__)

Runner = Callable[[Iterator[FitUpdate], Callable[[FitUpdate], None], Callable[[], None]], None]
"""``runner(events, deliver, done)``: iterate ``events`` off the caller's thread, ``deliver`` each, then ``done()``."""


class FitState(Enum):
    """Where a session is."""

    IDLE = "idle"
    PREPARING = "preparing"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def busy(self) -> bool:
        """Whether a fit is under way (a new one cannot start)."""
        return self in (FitState.PREPARING, FitState.RUNNING, FitState.PAUSED, FitState.STOPPING)


@evented
@dataclass
class FitStatus:
    """What a session shows; every field change is an event (``status.events.<field>``).

    Attributes
    ----------
    state
        The session's :class:`FitState`.
    message
        What is happening, for the status line (steps go to :attr:`FitSession.last_step`).
    backend
        Device and renderer backend of the current fit.
    num_gaussians
        Gaussians after the latest step (density control changes the count).
    density
        What density control did last, for the status line.
    """

    state: FitState = FitState.IDLE
    message: str = "ready"
    backend: str = ""
    num_gaussians: int = 0
    density: str = ""


class SessionEvents(SignalGroup):
    """Events of a fit, emitted on the thread that delivers them (the main thread in napari)."""

    ready = Signal(object)
    """The trainer exists (:class:`._fit_events.Ready`); its targets can be shown."""
    step = Signal(object)
    """A :class:`~napari_neurogs_mip.train.StepEvent`."""
    checkpoint = Signal(object)
    """A periodic checkpoint was written (:class:`~napari_neurogs_mip.train.CheckpointEvent`)."""
    finished = Signal(object)
    """The fit ended (:class:`~napari_neurogs_mip.train.FinishedEvent`)."""
    fitted = Signal(object)
    """The fitted model (:class:`~napari_neurogs_mip.model.GaussianModel`)."""
    failed = Signal(str)
    """The fit failed with this message."""
    ended = Signal()
    """The run is over, however it went."""


def thread_runner(events: Iterator[FitUpdate], deliver: Callable[[FitUpdate], None], done: Callable[[], None]) -> None:
    """Run ``events`` in a daemon thread, delivering each on that thread (for use without Qt)."""

    def run() -> None:
        try:
            for update in events:
                deliver(update)
        finally:
            done()

    threading.Thread(target=run, name="fit-session", daemon=True).start()


class FitSession:
    """One fit at a time: start, pause, resume, stop, save; the latest step and images.

    Parameters
    ----------
    runner
        How the fit's events reach :meth:`handle` (default :func:`thread_runner`).
    """

    def __init__(self, runner: Runner = thread_runner) -> None:
        self.status = FitStatus()
        self.events = SessionEvents()
        self.trainer: Trainer | None = None
        self.views: list[View] = []
        self.targets: list[np.ndarray] = []
        self.images: list[np.ndarray] | None = None
        """The latest rendered views (numpy), ``None`` before the first preview."""
        self.images_iteration = 0
        self.last_step: StepEvent | None = None
        self.result: FinishedEvent | None = None
        self._runner = runner
        self._cancel = threading.Event()
        self._held = False
        self._done = threading.Event()
        self._done.set()

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> FitState:
        """The current :class:`FitState`."""
        return self.status.state

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run has ended (for scripts and tests); whether it did within ``timeout`` seconds."""
        return self._done.wait(timeout)

    # ---------------------------------------------------------------- control
    def start(self, inputs: FitInputs, config: FitConfig, hold: bool = False, snapshot: bool = True) -> None:
        """Start a fit (see :func:`._fit_events.fit_events` for ``hold`` and ``snapshot``).

        Raises
        ------
        RuntimeError
            A fit is under way.
        """
        if self.state.busy:
            raise RuntimeError("a fit is under way; stop it first")
        self.trainer, self.views, self.targets = None, [], []
        self.images, self.images_iteration, self.last_step, self.result = None, 0, None, None
        self._cancel = threading.Event()
        self._held = hold
        self._done.clear()
        self.status.num_gaussians, self.status.density, self.status.backend = 0, "", ""
        self.status.state = FitState.PREPARING
        self.status.message = "preparing the targets and the initial model…"
        self._runner(fit_events(inputs, config, self._cancel, hold, snapshot), self.handle, self._ended)

    def pause(self) -> None:
        """Hold a running fit before its next step."""
        if self.state is FitState.RUNNING and self.trainer is not None:
            self.trainer.pause()
            self.status.state = FitState.PAUSED

    def resume(self) -> None:
        """Let a paused fit go on (a fit still held for display goes on at :meth:`release`)."""
        if self.state is FitState.PAUSED and self.trainer is not None:
            self.status.state = FitState.RUNNING
            if not self._held:
                self.trainer.resume()

    def release(self) -> None:
        """The targets are shown: a fit started with ``hold`` may step now (unless the user paused it)."""
        self._held = False
        if self.state is FitState.RUNNING and self.trainer is not None:
            self.trainer.resume()

    def stop(self) -> None:
        """End the fit after the current step (a paused one at once); before the trainer exists, cancel it."""
        if not self.state.busy:
            return
        self._cancel.set()
        if self.trainer is not None:
            self.trainer.stop()
        self.status.state = FitState.STOPPING
        self.status.message = "stopping after the current step…"

    def save(self, path: str | Path) -> Path:
        """Write the current model with its optimiser state (any time once the trainer exists).

        Raises
        ------
        RuntimeError
            No fit has started yet.
        """
        if self.trainer is None:
            raise RuntimeError("nothing to save yet; start a fit first")
        return self.trainer.save(path)

    # ----------------------------------------------------------------- events
    def handle(self, update: FitUpdate) -> None:
        """Apply one event of the fit (called by the runner) and re-emit it."""
        if isinstance(update, StepEvent):
            if update.density is not None:
                self.status.density = (
                    f"density control at step {update.iteration}: {update.density} "
                    f"({self.status.num_gaussians:,} → {update.num_gaussians:,} Gaussians)"
                )
            self.last_step = update
            self.status.num_gaussians = update.num_gaussians
            if update.images is not None:
                self.images, self.images_iteration = update.images, update.iteration
            self.events.step.emit(update)
        elif isinstance(update, Compiling):
            self.status.message = update.message
        elif isinstance(update, Ready):
            self._on_ready(update)
        elif isinstance(update, FinishedEvent):
            self.result = update
            self.images, self.images_iteration = update.images, update.iteration
            self.status.num_gaussians = update.num_gaussians
            self.events.finished.emit(update)
        elif isinstance(update, CheckpointEvent):
            self.events.checkpoint.emit(update)
        elif isinstance(update, Fitted):
            self.events.fitted.emit(update.model)
        elif isinstance(update, Failed):
            self.status.state = FitState.FAILED
            self.status.message = update.message
            self.events.failed.emit(update.message)

    def _on_ready(self, ready: Ready) -> None:
        trainer = ready.trainer
        self.trainer = trainer
        self.views = list(trainer.targets.views)
        self.targets = list(trainer.targets.images)
        self.status.num_gaussians = trainer.model.num_gaussians
        self.status.backend = ready.description
        if self._cancel.is_set():
            trainer.stop()  # stopped while preparing: the worker may not have seen it
        elif self.state is FitState.PREPARING:
            self.status.state = FitState.RUNNING
        held = f"; holding out {', '.join(trainer.held_out)}" if trainer.held_out else ""
        self.status.message = (
            f"fitting {', '.join(v.name for v in self.views)} with {trainer.model.num_gaussians:,} Gaussians{held}…"
        )
        self.events.ready.emit(ready)

    def _ended(self) -> None:
        """Called by the runner after the last event, on its delivering thread."""
        if self.status.state is not FitState.FAILED:
            finished = self.result is not None
            self.status.state = FitState.FINISHED if finished else FitState.IDLE
            if not finished:
                self.status.message = "cancelled before the fit started"
        self._done.set()
        self.events.ended.emit()
