"""A fit as a generator for a napari thread worker.

:func:`fit_events` runs in the worker thread: it prepares the targets and the
initial model (which may read files and compute MIPs), builds the
:class:`~napari_neurogs_mip.train.Trainer`, and relays its events.  It yields
numpy arrays and plain objects only and never touches a layer; the widget
applies them on the main thread.

It never raises.  superqt's ``GeneratorWorker`` treats a ``RuntimeError``
escaping the generator as "the worker was deleted": it only warns and emits
neither ``errored`` nor ``finished`` (superqt 0.9.0 ``GeneratorWorker.work``
and ``WorkerBase.run``), and ``TrainingError`` and CUDA's out-of-memory error
are ``RuntimeError`` subclasses.  So every exception becomes a :class:`Failed`
event and the worker always ends normally.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..device import resolve_device
from ..setup import FitInputs, prepare_fit
from ..train import CheckpointEvent, FinishedEvent, FitConfig, StepEvent, Trainer
from ._layers import LayerDataTuple, model_to_points
from ._threads import stop_at_exit
from ._triton_guard import guard_triton_import

LOGGER = logging.getLogger(__name__)

VIEWER_TIMEOUT_S = 30.0
"""Longest wait for the widget to show the targets before the fit starts anyway."""


@dataclass
class Ready:
    """The trainer exists; the fit is about to start.

    Attributes
    ----------
    trainer
        The trainer (its control and save methods are safe from any thread);
        ``trainer.targets`` holds the target views and their normalised images,
        ``trainer.held_out`` the names of the held-out views (scored at the end,
        never trained on), ``trainer.budget`` the most Gaussians density control
        may reach.  The number of Gaussians changes during the fit (see
        ``StepEvent.num_gaussians``).
    notes
        What was loaded, for the user.
    description
        Device and renderer backend (``Trainer.describe``).
    history
        Loss history so far (non-empty when resuming a checkpoint of ours).
    """

    trainer: Trainer
    notes: list[str]
    description: str
    history: list[float] = field(default_factory=list)


@dataclass
class ModelSnapshot:
    """The fitted model as a Points layer, made in the worker after the fit ended."""

    layer: LayerDataTuple


@dataclass
class Failed:
    """The fit could not start or go on."""

    error: BaseException
    stage: str

    @property
    def message(self) -> str:
        """One line for a notification."""
        text = f"Fit MIP failed while {self.stage}: {type(self.error).__name__}: {self.error}"
        if _out_of_memory(self.error):
            text += (
                " (lower the initial or the maximum number of Gaussians, the resolution or the views, or use the CPU)"
            )
        return text


FitUpdate = Ready | StepEvent | CheckpointEvent | FinishedEvent | ModelSnapshot | Failed


def _out_of_memory(error: BaseException) -> bool:
    kind = getattr(torch, "OutOfMemoryError", None)
    return (kind is not None and isinstance(error, kind)) or "out of memory" in str(error).lower()


class FitControl:
    """Pause/stop requests that may arrive before the trainer exists.

    The widget calls these from the main thread; :func:`fit_events` hands the
    trainer over as soon as it is built and applies any request made while the
    targets were being prepared.
    """

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.stop_requested = False
        self.pause_requested = False
        self._lock = threading.Lock()
        self._viewer_ready = threading.Event()
        stop_at_exit(self)

    def viewer_ready(self) -> None:
        """Called by the widget once the live layers exist: the fit may step."""
        self._viewer_ready.set()

    def wait_for_viewer(self, timeout: float) -> bool:
        """Block the worker until :meth:`viewer_ready` (or a stop, or ``timeout`` seconds)."""
        return self._viewer_ready.wait(timeout)

    def attach(self, trainer: Trainer) -> None:
        """Called by the worker once the trainer exists."""
        with self._lock:
            self.trainer = trainer
            if self.pause_requested:
                trainer.pause()
            if self.stop_requested:
                trainer.stop()

    def pause(self) -> None:
        """Hold the fit before its next step."""
        with self._lock:
            self.pause_requested = True
            if self.trainer is not None:
                self.trainer.pause()

    def resume(self) -> None:
        """Let a held fit go on."""
        with self._lock:
            self.pause_requested = False
            if self.trainer is not None:
                self.trainer.resume()

    def stop(self) -> None:
        """End the fit after the current step (also releases a paused one)."""
        with self._lock:
            self.stop_requested = True
            self._viewer_ready.set()
            if self.trainer is not None:
                self.trainer.stop()


def fit_events(inputs: FitInputs, config: FitConfig, control: FitControl, snapshot: bool = True) -> Iterator[FitUpdate]:
    """Prepare and run a fit, yielding :data:`FitUpdate` events; never raises.

    Parameters
    ----------
    inputs
        Target and initial model (see :func:`napari_neurogs_mip.setup.prepare_fit`).
    config
        Fit settings.
    control
        Receives the trainer; pause/stop requests made early are applied to it.
    snapshot
        Yield the fitted model as a Points layer (:class:`ModelSnapshot`) after the fit.
    """
    stage = "preparing the targets and the initial model"
    try:
        blocked = guard_triton_import()
        prepared = prepare_fit(inputs)  # reads lazy (dask/zarr) layer data here, off the main thread
        stage = "setting up the trainer"
        with _warm_lock:
            pass  # a warm-up still loading the kernels finishes first (no point in racing it)
        trainer = Trainer(prepared.model, prepared.targets, config, prepared.checkpoint, prepared.eval_targets)
        # Before the first step, so that a pause or stop asked for while preparing holds it.
        control.attach(trainer)
        yield Ready(
            trainer,
            [*prepared.notes, prepared.targets.describe(), *([blocked] if blocked else [])],
            trainer.describe(),
            list(trainer.loss_history),
        )
        # Let the main thread build the live layers before stepping: building them
        # while the fit competes for the CPU and the GIL would stall the viewer.
        control.wait_for_viewer(VIEWER_TIMEOUT_S)
        stage = "fitting"
        finished = None
        for event in trainer.run():
            if isinstance(event, FinishedEvent):
                finished = event
            yield event
        if snapshot and finished is not None:
            stage = "converting the fitted model"
            model = trainer.current_model()
            name = "fitted gaussians"
            yield ModelSnapshot(model_to_points(model, name=name, extra={"iteration": finished.iteration}))
    except Exception as error:  # everything, RuntimeError included: see the module docstring
        LOGGER.exception("Fit MIP failed while %s", stage)
        yield Failed(error, stage)


_warm_lock = threading.Lock()
_warmed = False


def warm_up_renderer() -> bool:
    """Load the CPU renderer's compiled kernels once per process, with a one-step fit of a tiny volume.

    The first render of a process loads (or compiles) numba kernels while holding
    the GIL, which would freeze the viewer for a moment when a fit starts; the
    widget calls this in a background thread when it opens instead.  Does
    nothing where ``auto`` picks another device than the CPU (its default backend
    is not numba's there).

    Returns
    -------
    bool
        Whether the kernels were loaded by this call.
    """
    global _warmed
    with _warm_lock:
        if _warmed or resolve_device("auto")[0].type != "cpu":
            return False
        guard_triton_import()
        volume = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
        prepared = prepare_fit(FitInputs(volume=volume, view_specs=["xy"], num_gaussians=4))
        config = FitConfig(iterations=1, device="cpu", preview_every=1)
        for _ in Trainer(prepared.model, prepared.targets, config).run():
            pass
        _warmed = True
        return True
