"""A fit as a generator of plain events, for whatever thread runs it.

:func:`fit_events` prepares the targets and the initial model (which may read
files and compute MIPs), builds the :class:`~napari_neurogs_mip.train.Trainer`,
compiles its kernels, and relays its events.  It yields numpy arrays and plain
objects only and never touches a layer; :class:`._session.FitSession` consumes
the events.

It never raises.  superqt's ``GeneratorWorker`` treats a ``RuntimeError``
escaping the generator as "the worker was deleted": it only warns and emits
neither ``errored`` nor ``finished`` (superqt 0.9.0 ``GeneratorWorker.work``
and ``WorkerBase.run``), and ``TrainingError`` and CUDA's out-of-memory error
are ``RuntimeError`` subclasses.  So every exception becomes a :class:`Failed`
event and the generator always ends normally.  Nothing here imports Qt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model import GaussianModel
from ..prepare import FitInputs, prepare_fit
from ..train import CheckpointEvent, FinishedEvent, FitConfig, StepEvent, Trainer
from ._summary import failed_message
from ._triton_guard import guard_triton_import

LOGGER = logging.getLogger(__name__)


@dataclass
class Compiling:
    """The trainer is compiling its renderer's kernels (or loading them from the disk cache) before step 1.

    Attributes
    ----------
    device
        ``CPU`` (numba) or ``GPU`` (Triton): whose kernels.
    """

    device: str

    @property
    def message(self) -> str:
        """The status line while it lasts."""
        return f"compiling {self.device} kernels (once per machine)…"


@dataclass
class Ready:
    """The trainer exists and its kernels are loaded; the fit is about to start.

    Attributes
    ----------
    trainer
        The trainer (its control and save methods are safe from any thread);
        ``trainer.targets`` holds the target views and their normalised images,
        ``trainer.held_out`` the names of the held-out views, ``trainer.budget``
        the most Gaussians density control may reach.
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
class Fitted:
    """The fitted model (a detached copy in the frame it came in), made after the fit ended."""

    model: GaussianModel


@dataclass
class Failed:
    """The fit could not start or go on."""

    error: BaseException
    stage: str

    @property
    def message(self) -> str:
        """A short first line for the toast, then the error."""
        advice = ""
        if _out_of_memory(self.error):
            advice = (
                " (lower the initial or the maximum number of Gaussians, the resolution or the views, or use the CPU)"
            )
        return failed_message(self.stage, self.error, advice)


FitUpdate = Compiling | Ready | StepEvent | CheckpointEvent | FinishedEvent | Fitted | Failed


def _out_of_memory(error: BaseException) -> bool:
    kind = getattr(torch, "OutOfMemoryError", None)
    return (kind is not None and isinstance(error, kind)) or "out of memory" in str(error).lower()


def fit_events(
    inputs: FitInputs, config: FitConfig, cancel: threading.Event, hold: bool = False, snapshot: bool = True
) -> Iterator[FitUpdate]:
    """Prepare and run a fit, yielding :data:`FitUpdate` events; never raises.

    Parameters
    ----------
    inputs
        Target and initial model (see :func:`napari_neurogs_mip.prepare.prepare_fit`).
    config
        Fit settings.
    cancel
        Set to give up before the trainer exists (preparing can take a while);
        after that the trainer's own :meth:`~napari_neurogs_mip.train.Trainer.stop` ends the fit.
    hold
        Pause the trainer before its first step (``Trainer.pause``): the consumer
        resumes it once it has shown the targets, so that building layers does not
        compete with the fit for the CPU.
    snapshot
        Yield the fitted model (:class:`Fitted`) after the fit.
    """
    stage = "preparing"
    try:
        blocked = guard_triton_import()
        prepared = prepare_fit(inputs)  # reads lazy (dask/zarr) layer data here, off the main thread
        if cancel.is_set():
            return
        stage = "setting up"
        trainer = Trainer(prepared.model, prepared.targets, config, prepared.checkpoint, prepared.eval_targets)
        if trainer.compiles_kernels:
            stage = "compiling kernels"
            yield Compiling("CPU" if trainer.device.type == "cpu" else "GPU")
            trainer.warm_up()
        if hold:
            trainer.pause()
        if cancel.is_set():
            trainer.stop()  # run() then ends at once with a consistent model
        notes = [*prepared.notes, prepared.targets.describe(), *([blocked] if blocked else [])]
        yield Ready(trainer, notes, trainer.describe(), list(trainer.loss_history))
        stage = "fitting"
        finished = None
        for event in trainer.run():
            if isinstance(event, FinishedEvent):
                finished = event
            yield event
        if snapshot and finished is not None:
            stage = "converting the model"
            yield Fitted(trainer.current_model())
    except Exception as error:  # everything, RuntimeError included: see the module docstring
        LOGGER.exception("Fit MIP failed while %s", stage)
        yield Failed(error, stage)
