"""The trainer's own rules: clamps, schedules, pause/stop from another thread, NaN caught before a step, warm-up,
and what a stopped fit saves."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.initial_model import init_from_volume
from napari_neurogs_mip.io.checkpoint import load_checkpoint
from napari_neurogs_mip.sample import Imaging, procedural_skeleton, rasterize_skeleton
from napari_neurogs_mip.targets import targets_from_volume
from napari_neurogs_mip.train import (
    FINAL_NAME,
    LOG_AMPLITUDE_RANGE,
    FinishedEvent,
    FitConfig,
    StepEvent,
    Trainer,
    TrainingError,
)

GEOMETRY = VolumeGeometry((12, 32, 32), (2.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    skeleton = procedural_skeleton(GEOMETRY.shape_zyx, seed=5)
    return rasterize_skeleton(skeleton, GEOMETRY.shape_zyx, Imaging(photons=0.0))


def _trainer(volume: np.ndarray, **settings) -> Trainer:
    targets = targets_from_volume(volume, GEOMETRY, ["xy", "xz", "yz"], None)
    model = init_from_volume(volume, GEOMETRY, 40, targets.low, targets.high, 1000)
    config = FitConfig(**{"iterations": 10, "backend": "torch", "device": "cpu", "densify": False, **settings})
    return Trainer(model, targets, config)


def test_parameters_are_clamped_after_a_huge_step(volume):
    trainer = _trainer(volume, lr=1e3, lr_scales=1e3, lr_amplitudes=1e3, grad_clip=1e9)
    trainer.step()
    params = {n: t.detach() for n, t in trainer._params.items()}
    low, high = trainer._box
    assert bool((params["means"] >= low).all() and (params["means"] <= high).all())
    assert float(params["log_scales"].min()) >= math.log(FitConfig().min_scale * 1.0) - 1e-6
    assert float(params["log_scales"].max()) <= math.log(GEOMETRY.longest_side) + 1e-6
    assert LOG_AMPLITUDE_RANGE[0] <= float(params["log_amplitudes"].min())
    assert float(params["log_amplitudes"].max()) <= LOG_AMPLITUDE_RANGE[1]
    # The huge step did move things to the bounds (otherwise the clamps were not exercised).
    assert bool((params["means"] == low).any() or (params["means"] == high).any())


@pytest.mark.parametrize(
    ("schedule", "factors"),
    [("none", [1.0, 1.0, 1.0]), ("cosine", [1.0, 0.55, 0.1]), ("exponential", [1.0, 0.1**0.5, 0.1])],
)
def test_learning_rate_schedules(volume, schedule, factors):
    trainer = _trainer(volume, schedule=schedule, iterations=10)
    seen = []
    for iteration in (0, 5, 10):
        trainer.iteration = iteration
        trainer._schedule()
        group = trainer.optimizer.param_groups[1]
        seen.append(group["lr"] / group["initial_lr"])
    assert seen == pytest.approx(factors)


def test_pause_and_stop_from_another_thread(volume):
    trainer = _trainer(volume, iterations=10_000)
    events = trainer.run()
    first = next(events)
    assert isinstance(first, StepEvent) and first.iteration == 1
    trainer.pause()
    resumed = threading.Event()

    def later() -> None:
        resumed.wait(10)
        trainer.stop()

    worker = threading.Thread(target=later)
    worker.start()
    assert trainer.paused and trainer.iteration == 1
    resumed.set()
    rest = list(events)  # blocks while paused; the other thread's stop releases and ends the run
    worker.join()
    assert isinstance(rest[-1], FinishedEvent) and rest[-1].stopped and rest[-1].iteration == 1


def test_nan_is_caught_before_the_step_is_applied(volume, monkeypatch):
    trainer = _trainer(volume)
    trainer.step()
    before = {n: t.detach().clone() for n, t in trainer._params.items()}
    monkeypatch.setattr(trainer.renderer, "render", lambda model, views: [
        torch.full(v.shape, float("nan"), requires_grad=True) for v in views])  # fmt: skip
    with pytest.raises(TrainingError, match="iteration 2"):
        trainer.step()
    assert trainer.iteration == 1
    for name, tensor in trainer._params.items():
        assert torch.equal(tensor.detach(), before[name]), name


def test_warm_up_leaves_the_fit_untouched(volume):
    trainer = _trainer(volume)
    before = {n: t.detach().clone() for n, t in trainer._params.items()}
    assert trainer.warm_up() >= 0
    assert trainer.iteration == 0 and not trainer.optimizer.state
    for name, tensor in trainer._params.items():
        assert torch.equal(tensor.detach(), before[name]) and tensor.grad is None, name


def test_a_stopped_fit_saves_a_checkpoint_named_by_its_iteration(volume, tmp_path):
    trainer = _trainer(volume, iterations=50, out=str(tmp_path))
    events = trainer.run()
    for event in events:
        if isinstance(event, StepEvent) and event.iteration == 3:
            trainer.stop()
    assert isinstance(event, FinishedEvent) and event.stopped
    assert event.path == tmp_path / "checkpoint_iter3.pt" and not (tmp_path / FINAL_NAME).exists()
    assert load_checkpoint(event.path).iteration == 3
