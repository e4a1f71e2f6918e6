"""A block-wise fit without Qt: its state, the merged MIPs so far, and events about them.

The *Fit blocks* widget shows a :class:`BlockSession`; tests drive one without a
viewer.  :func:`block_events` runs :func:`..blocks.run.fit_blocks` on a thread of
its own and turns its callbacks into plain events; a runner
(:data:`._session.Runner`: :func:`._session.thread_runner`, or
:func:`._threads.qt_runner`, which delivers them on napari's main thread) carries
them to :meth:`BlockSession.handle`.

**Merged MIPs.**  The hard MIP of a union of Gaussians is the pixel-wise maximum of
the MIPs of its parts (``docs/blocks.md``), so each finished block's Gaussians are
rendered where they reach (:func:`..blocks.mips.render_footprint`, off the main
thread, a render of the block's size) and max-composited into the views of the
whole volume by :meth:`BlockSession.handle` (on the delivering thread, so the
session's images change on one thread only).  In ``max`` mode this is the merged
model's MIP exactly; in ``soft`` mode pixels that Gaussians of two blocks both
reach (the seams) differ slightly from it.  Blocks finished by an earlier run are
shown first.

**Stopping** acts between blocks: the next callback of ``fit_blocks`` (a survey
chunk or a finished block) raises, the blocks not started are cancelled, and the
run folder is left as a killed run leaves it: finished blocks are kept, and a run
with the same settings fits only the rest.

Events (psygnal): :attr:`BlockSession.status` is an evented dataclass (``state``,
``message``, ``done``, ``total``), :attr:`BlockSession.events` a signal group
(``survey``, ``planned``, ``block_done``, ``log``, ``finished``, ``failed``, ``ended``).
Nothing here imports Qt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np
from psygnal import Signal, SignalGroup, evented

from ..views import View
from ._session import Runner, thread_runner

LOGGER = logging.getLogger(__name__)

Patch = tuple[tuple[int, int], tuple[int, int], np.ndarray]
"""A block's MIP in one view where it reaches: row range, column range, image (:func:`..blocks.mips.render_footprint`)."""


class BlockState(Enum):
    """Where a block run is."""

    IDLE = "idle"
    SURVEYING = "surveying"
    FITTING = "fitting"
    MERGING = "merging"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def busy(self) -> bool:
        """Whether a run is under way (a new one cannot start)."""
        return self in (BlockState.SURVEYING, BlockState.FITTING, BlockState.MERGING, BlockState.STOPPING)

    @property
    def stoppable(self) -> bool:
        """Whether Stop acts now (the merge, once begun, is not stopped)."""
        return self in (BlockState.SURVEYING, BlockState.FITTING)


@evented
@dataclass
class BlockStatus:
    """What a session shows; every field change is an event (``status.events.<field>``).

    Attributes
    ----------
    state
        The session's :class:`BlockState`.
    message
        What is happening, for the status line.
    done, total
        Blocks finished (by this run or an earlier one) of the blocks with structure.
    """

    state: BlockState = BlockState.IDLE
    message: str = "ready"
    done: int = 0
    total: int = 0


# ----------------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class SurveyProgress:
    """``done`` of ``total`` chunks of the survey are read."""

    done: int
    total: int


@dataclass(frozen=True)
class Planned:
    """The plan is made.

    Attributes
    ----------
    views
        The merged model's views (made on the whole volume; physical pixel sizes, um).
    total
        Blocks with structure (fitted now or before).
    done_before, to_fit, empty
        Blocks finished by an earlier run, fitted by this one, and skipped for want of structure.
    """

    views: list[View]
    total: int
    done_before: int
    to_fit: int
    empty: int


@dataclass(frozen=True)
class BlockDone:
    """A block is finished: its record, the count so far, and its MIP in each view (``None``: it reaches none)."""

    record: dict[str, Any]
    done: int
    total: int
    patches: list[Patch | None]
    earlier: bool = False
    """Finished by an earlier run (read back, not fitted now)."""


@dataclass(frozen=True)
class Log:
    """A line ``fit_blocks`` printed (volume, cluster, plan, merge)."""

    line: str


@dataclass(frozen=True)
class Finished:
    """The run ended with the merged model (:class:`..blocks.run.BlockFitResult`)."""

    result: Any


@dataclass(frozen=True)
class Stopped:
    """The run stopped on request; the finished blocks are kept."""


@dataclass(frozen=True)
class Failed:
    """The run could not start or go on (blocks that failed, bad input, a cluster that did not start)."""

    error: BaseException

    @property
    def message(self) -> str:
        """A short first line for the notification, then the error."""
        return f"Fit blocks failed\n{type(self.error).__name__}: {self.error}"


BlockUpdate = SurveyProgress | Planned | BlockDone | Log | Finished | Stopped | Failed


# ----------------------------------------------------------------------------------------------- the worker
class _StopRequestedError(Exception):
    """Raised in a callback of ``fit_blocks``: it ends the run as a kill would, between blocks."""


@dataclass(frozen=True)
class _Plan:
    """``on_plan``'s news, copied on the fitting thread (the result's records grow there afterwards)."""

    planned: Planned
    folder: Path
    """Where the blocks' files are."""
    earlier: list[dict[str, Any]] = field(default_factory=list)


_END = object()
"""Put last by the fitting thread."""


def block_events(target: Any, out: str | Path, options: dict[str, Any], stop: threading.Event) -> Iterator[BlockUpdate]:
    """Run :func:`..blocks.run.fit_blocks` and yield :data:`BlockUpdate` events; never raises.

    ``fit_blocks`` runs on a thread of its own, so that rendering the finished blocks here never holds up the
    collection of the next ones.  superqt's generator workers only warn about a ``RuntimeError`` escaping the
    generator (see :mod:`._fit_events`), so every error becomes a :class:`Failed` event.

    Parameters
    ----------
    target, out, options
        As :func:`..blocks.run.fit_blocks` takes them (``options``: its keyword arguments but the callbacks).
    stop
        Set to stop the run at its next survey chunk or finished block.
    """
    updates: SimpleQueue[Any] = SimpleQueue()
    fitting = threading.Thread(target=_fit, args=(target, out, options, stop, updates.put), name="fit-blocks")
    fitting.daemon = True  # a viewer closed mid-run must not wait for the cluster at exit
    fitting.start()
    renderer, views, folder, done, total = None, [], None, 0, 0
    while (item := updates.get()) is not _END:
        if isinstance(item, _Plan):
            planned = item.planned
            views, folder, total = planned.views, item.folder, planned.total
            yield planned
            renderer = _renderer(options.get("config"))
            for record in item.earlier:
                done += 1
                yield BlockDone(record, done, total, _patches(record, folder, views, renderer), earlier=True)
        elif isinstance(item, dict):  # a block's record
            done += 1
            yield BlockDone(item, done, total, _patches(item, folder, views, renderer))
        else:
            yield item
    fitting.join()


def _fit(
    target: Any, out: str | Path, options: dict[str, Any], stop: threading.Event, put: Callable[[Any], None]
) -> None:
    """Run ``fit_blocks`` (on the fitting thread), putting its news, then :data:`_END`."""
    from ..blocks.folder import BLOCKS_DIR
    from ..blocks.run import fit_blocks

    def check() -> None:
        if stop.is_set():
            raise _StopRequestedError

    def on_survey(done: int, total: int) -> None:
        put(SurveyProgress(done, total))
        check()

    def on_plan(result: Any, pending: list[Any]) -> None:
        structured = len(result.blocks) - len(result.empty)
        planned = Planned(list(result.views), structured, len(result.done_before), len(pending), len(result.empty))
        earlier = [result.records[n] for n in result.done_before]
        put(_Plan(planned, Path(result.out) / BLOCKS_DIR, earlier))
        check()

    def on_block(record: dict[str, Any], done: int, total: int) -> None:
        put(record)  # finished and written: shown even if the run stops now
        check()

    try:
        result = fit_blocks(
            target, out, **options, on_survey=on_survey, on_plan=on_plan, on_block=on_block,
            log=lambda line: put(Log(line)),
        )  # fmt: skip
        put(Finished(result))
    except _StopRequestedError:
        put(Stopped())
    except Exception as error:  # everything: a GUI run reports what went wrong, never raises
        LOGGER.exception("Fit blocks failed (run folder %s)", out)
        put(Failed(error))
    finally:
        put(_END)


def _renderer(config: Any) -> Any:
    """The renderer of the run's settings, or ``None`` (the merged MIPs then stay blank; the run goes on)."""
    from ..blocks.mips import model_renderer
    from ..train import FitConfig

    try:
        return model_renderer(config or FitConfig())
    except Exception:  # a device the fit may still reach on its workers, e.g. CUDA there but not here
        LOGGER.exception("no renderer for the merged MIPs")
        return None


def _patches(record: dict[str, Any], folder: Path, views: list[View], renderer: Any) -> list[Patch | None]:
    """A finished block's MIP in each view where it reaches (none for a block that kept no Gaussian)."""
    from ..blocks.mips import render_footprint
    from ..io.checkpoint import load_checkpoint

    if renderer is None or not record.get("checkpoint"):
        return [None] * len(views)
    try:
        model = load_checkpoint(folder / record["checkpoint"]).model
        return [render_footprint(model, view, renderer) for view in views]
    except Exception:  # a display problem: the block is finished all the same
        LOGGER.exception("could not render %s for the merged MIPs", record.get("name"))
        return [None] * len(views)


# ------------------------------------------------------------------------------------------------ the session
class BlockEvents(SignalGroup):
    """Events of a block run, emitted on the thread that delivers them (the main thread in napari)."""

    survey = Signal(int, int)
    """``done`` of ``total`` survey chunks read."""
    planned = Signal(object)
    """The plan (:class:`Planned`): the merged MIPs' views exist now (blank)."""
    block_done = Signal(object)
    """A block finished (:class:`BlockDone`); :attr:`BlockSession.images` include it."""
    log = Signal(str)
    """A line of the run's log."""
    finished = Signal(object)
    """The merged model is written (:class:`..blocks.run.BlockFitResult`)."""
    failed = Signal(str)
    """The run failed with this message."""
    ended = Signal()
    """The run is over, however it went."""


class BlockSession:
    """One block run at a time: start, stop, the merged MIPs so far.

    Parameters
    ----------
    runner
        How the run's events reach :meth:`handle` (default :func:`._session.thread_runner`).
    """

    def __init__(self, runner: Runner = thread_runner) -> None:
        self.status = BlockStatus()
        self.events = BlockEvents()
        self.views: list[View] = []
        self.images: list[np.ndarray] = []
        """The merged MIP of the finished blocks in each view (float32, normalised intensities)."""
        self.lines: list[str] = []
        """The run's log so far."""
        self.out: Path | None = None
        self.result: Any = None
        self._runner = runner
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()

    @property
    def state(self) -> BlockState:
        """The current :class:`BlockState`."""
        return self.status.state

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run has ended (for scripts and tests); whether it did within ``timeout`` seconds."""
        return self._done.wait(timeout)

    def start(self, target: Any, out: str | Path, **options: Any) -> None:
        """Start a block run: ``target``, ``out`` and ``options`` as :func:`..blocks.run.fit_blocks` takes them
        (``config``, ``cluster``, ``block``, ``halo``, ``view_specs``... but not the callbacks).

        Raises
        ------
        RuntimeError
            A run is under way.
        """
        if self.state.busy:
            raise RuntimeError("a block run is under way; stop it first")
        self.views, self.images, self.lines, self.result, self.out = [], [], [], None, Path(out)
        self._stop = threading.Event()
        self._done.clear()
        self.status.done, self.status.total = 0, 0
        self.status.state = BlockState.SURVEYING
        self.status.message = "starting the cluster and surveying the volume…"
        self._runner(block_events(target, out, options, self._stop), self.handle, self._ended)

    def stop(self) -> None:
        """Stop when the next block (or survey chunk) finishes; the finished blocks are kept.  The merge, once
        begun, is not stopped: it is short and leaves the merged model whole."""
        if self.state.stoppable:
            self._stop.set()
            self.status.state = BlockState.STOPPING
            self.status.message = "stopping when the next block finishes (finished blocks are kept)…"

    # ----------------------------------------------------------------- events
    def handle(self, update: BlockUpdate) -> None:
        """Apply one event of the run (called by the runner) and re-emit it."""
        if isinstance(update, SurveyProgress):
            self.status.message = f"survey: {update.done} of {update.total} chunks read"
            self.events.survey.emit(update.done, update.total)
        elif isinstance(update, Planned):
            self._on_planned(update)
        elif isinstance(update, BlockDone):
            self._on_block(update)
        elif isinstance(update, Log):
            self.lines.append(update.line)
            self.events.log.emit(update.line)
        elif isinstance(update, Finished):
            self.result = update.result
            self.status.state = BlockState.FINISHED
            self.status.message = update.result.summary()
            self.events.finished.emit(update.result)
        elif isinstance(update, Stopped):
            self.status.state = BlockState.STOPPED
            self.status.message = (
                f"stopped: {self.status.done} of {self.status.total} blocks finished, kept in {self.out}; start "
                "again with the same settings to fit the rest"
            )
        elif isinstance(update, Failed):
            self.status.state = BlockState.FAILED
            self.status.message = update.message
            self.events.failed.emit(update.message)

    def _on_planned(self, planned: Planned) -> None:
        self.views = list(planned.views)
        self.images = [np.zeros(view.shape, dtype=np.float32) for view in self.views]
        self.status.total = planned.total
        if self.state is not BlockState.STOPPING:
            self.status.state = BlockState.FITTING if planned.to_fit else BlockState.MERGING
        self.status.message = (
            f"{planned.total} blocks with structure ({planned.done_before} finished before, {planned.to_fit} to "
            f"fit now), {planned.empty} skipped as empty"
        )
        self.events.planned.emit(planned)

    def _on_block(self, block: BlockDone) -> None:
        for image, patch in zip(self.images, block.patches):
            if patch is not None:
                (r0, r1), (c0, c1), part = patch
                np.maximum(image[r0:r1, c0:c1], part, out=image[r0:r1, c0:c1])
        self.status.done = block.done
        if self.state is BlockState.FITTING:
            self.status.message = f"{block.record['name']} finished ({block.done} of {block.total})"
        self.events.block_done.emit(block)
        if block.done == block.total and self.state is BlockState.FITTING:
            self.status.state = BlockState.MERGING
            self.status.message = "merging the blocks and writing the merged model's MIPs…"

    def _ended(self) -> None:
        """Called by the runner after the last event, on its delivering thread."""
        if self.state.busy:  # the thread ended without a last word: cannot happen, but never stay busy
            self.status.state = BlockState.STOPPED
        self._done.set()
        self.events.ended.emit()
