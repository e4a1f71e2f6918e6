"""The fit session without a viewer: states, events, the trainer's pause/stop, cancelling, failures."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gui_free import gui_modules_loaded
from napari_neurogs_mip._napari import _fit_events
from napari_neurogs_mip._napari._fit_events import Compiling, Failed, Fitted, Ready, fit_events
from napari_neurogs_mip._napari._session import FitSession, FitState
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.prepare import FitInputs
from napari_neurogs_mip.train import CheckpointEvent, FinishedEvent, FitConfig, StepEvent, Trainer

TIMEOUT = 120.0


def _inputs() -> FitInputs:
    rng = np.random.default_rng(0)
    volume = rng.random((16, 24, 24)).astype(np.float32) * 0.1
    volume[6:10, 8:16, 8:16] += 1.0
    return FitInputs(volume=volume, voxel_size=(2.0, 0.5, 0.5), view_specs=["xy", "xz", "yz"], num_gaussians=30)


def _config(iterations: int = 6) -> FitConfig:
    return FitConfig(iterations=iterations, device="cpu", preview_every=2, lambda_ssim=0.0)


def _recorder(session: FitSession) -> dict[str, list]:
    seen: dict[str, list] = {"states": [], "messages": [], "steps": [], "finished": [], "fitted": [], "failed": []}
    session.status.events.state.connect(lambda state: seen["states"].append(state))
    session.status.events.message.connect(lambda text: seen["messages"].append(text))
    session.events.step.connect(seen["steps"].append)
    session.events.finished.connect(seen["finished"].append)
    session.events.fitted.connect(seen["fitted"].append)
    session.events.failed.connect(seen["failed"].append)
    return seen


def test_a_session_fits_without_a_viewer() -> None:
    session = FitSession()
    seen = _recorder(session)
    session.start(_inputs(), _config())
    assert session.wait(TIMEOUT)
    assert seen["states"] == [FitState.PREPARING, FitState.RUNNING, FitState.FINISHED]
    assert "compiling CPU kernels (once per machine)…" in seen["messages"]
    assert [s.iteration for s in seen["steps"]] == [1, 2, 3, 4, 5, 6]
    assert len(seen["finished"]) == 1 and not seen["finished"][0].stopped
    assert isinstance(seen["fitted"][0], GaussianModel)
    # The latest step and images stay with the session.
    assert session.last_step.iteration == 6 and session.images_iteration == 6
    assert [image.shape for image in session.images] == [t.shape for t in session.targets]
    assert [v.name for v in session.views] == ["xy", "xz", "yz"]


def test_pause_resume_and_stop_are_the_trainers() -> None:
    """``hold`` pauses the trainer itself before step 1; pause/resume/stop act on the trainer, not on a copy."""
    session = FitSession()
    seen = _recorder(session)
    ready = threading.Event()
    session.events.ready.connect(lambda _: ready.set())
    session.start(_inputs(), _config(iterations=100_000), hold=True)
    assert ready.wait(TIMEOUT)
    trainer = session.trainer
    assert trainer.paused and trainer.iteration == 0 and session.state is FitState.RUNNING
    with pytest.raises(RuntimeError, match="under way"):
        session.start(_inputs(), _config())
    session.pause()  # paused by the user while held: release must not let it go
    session.release()
    assert trainer.paused and session.state is FitState.PAUSED
    session.resume()
    assert not trainer.paused and session.state is FitState.RUNNING
    step = threading.Event()
    session.events.step.connect(lambda event: event.iteration >= 3 and step.set())
    assert step.wait(TIMEOUT)
    session.stop()
    assert session.state is FitState.STOPPING and trainer._stop.is_set()
    assert session.wait(TIMEOUT)
    assert session.state is FitState.FINISHED and seen["finished"][0].stopped
    assert seen["finished"][0].iteration == trainer.iteration < 100_000


def test_stop_while_preparing_cancels(monkeypatch) -> None:
    gate = threading.Event()
    prepare = _fit_events.prepare_fit

    def slow_prepare(inputs):
        gate.wait(TIMEOUT)
        return prepare(inputs)

    monkeypatch.setattr(_fit_events, "prepare_fit", slow_prepare)
    session = FitSession()
    session.start(_inputs(), _config())
    assert session.state is FitState.PREPARING
    session.stop()
    assert session.state is FitState.STOPPING
    gate.set()
    assert session.wait(TIMEOUT)
    assert session.state is FitState.IDLE and session.trainer is None and session.result is None
    assert session.status.message == "cancelled before the fit started"


def test_a_failure_is_a_state_with_a_short_first_line(monkeypatch) -> None:
    def broken_step(self):
        raise RuntimeError("forced failure in Trainer.step")  # what superqt would swallow: must become an event

    monkeypatch.setattr(Trainer, "step", broken_step)
    session = FitSession()
    seen = _recorder(session)
    session.start(_inputs(), _config())
    assert session.wait(TIMEOUT)
    assert session.state is FitState.FAILED
    [message] = seen["failed"]
    first, rest = message.split("\n", 1)
    assert first == "Fit MIP failed while fitting" and "forced failure in Trainer.step" in rest
    assert session.trainer is not None  # the last consistent model can still be saved


def test_bad_inputs_fail_while_preparing() -> None:
    session = FitSession()
    session.start(FitInputs(volume=np.zeros((4, 5), np.float32)), _config())
    assert session.wait(TIMEOUT)
    assert session.state is FitState.FAILED
    assert session.status.message.startswith("Fit MIP failed while preparing\nValueError: the target volume must be 3D")


def test_the_worker_yields_plain_data_only() -> None:
    """What crosses from the worker thread is events and numpy arrays: nothing of napari, no layer."""
    events = list(fit_events(_inputs(), _config(iterations=4), threading.Event(), hold=False, snapshot=True))
    kinds = [type(event) for event in events]
    assert kinds[0] is Compiling and kinds[1] is Ready and kinds[-2:] == [FinishedEvent, Fitted]
    allowed = (Compiling, Ready, StepEvent, CheckpointEvent, FinishedEvent, Fitted, Failed)
    assert all(isinstance(event, allowed) for event in events)
    for event in events:
        for image in getattr(event, "images", None) or []:
            assert type(image) is np.ndarray
    modules = {type(value).__module__.split(".")[0] for event in events for value in vars(event).values()}
    assert not modules & {"napari", "qtpy", "PyQt5", "superqt", "vispy"}, modules


def test_session_and_rules_load_no_qt_or_napari() -> None:
    code = (
        "import napari_neurogs_mip._napari._session, napari_neurogs_mip._napari._fit_events\n"
        "import napari_neurogs_mip._napari._axes, napari_neurogs_mip._napari._layout\n"
        "import napari_neurogs_mip._napari._target_rules, napari_neurogs_mip._napari._layers\n"
        "import napari_neurogs_mip._napari._summary, napari_neurogs_mip._napari._throttle\n"
        "import napari_neurogs_mip._napari._reader, napari_neurogs_mip._napari._tiff_reader\n"
        "import napari_neurogs_mip._napari._writer, napari_neurogs_mip._napari._sample_data"
    )
    assert gui_modules_loaded(code) == []
