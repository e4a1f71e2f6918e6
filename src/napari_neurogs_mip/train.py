"""The fit: Adam on Gaussian parameters so that rendered MIPs match target MIPs.

:class:`Trainer` is a step-by-step generator of events shared by the CLI and
the napari widget.  It fits in the physical frame of the target volume and
stores models in the frame they came in.

Learning rates follow the seed design: means ``lr``, log-scales ``0.1 lr``,
quaternions ``0.1 lr``, log-amplitudes ``lr``.  Mean steps are in units of the
volume's longest side (as if the box were [0, 1]), so ``lr`` means the same for
every volume.  After each step the parameters are clamped:

* means to the volume box, half a voxel beyond the outer voxel centres;
* log-scales to ``[log(0.25 * finest spacing), log(longest side)]`` (physical units);
* log-amplitudes to ``[-10, 6]`` (the NeuRoGS v7 range).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .device import resolve_device, torch_threads
from .frames import Frame
from .io.checkpoint import Checkpoint, save_checkpoint
from .losses import SSIM_WINDOW, LossWeights, mip_loss, psnr, ssim
from .model import GaussianModel
from .render import MODES, Renderer
from .render.field import check_field_views
from .targets import Targets

FINAL_NAME = "neurogs_renderer_optimized.pt"
LOG_AMPLITUDE_RANGE = (-10.0, 6.0)
SCHEDULES = ("none", "cosine", "exponential")


class TrainingError(RuntimeError):
    """The fit cannot go on (e.g. NaN/Inf); the last good state is kept."""


@dataclass
class FitConfig:
    """Settings of a fit (plain types, saved in checkpoints)."""

    iterations: int = 1000
    lr: float = 1e-3
    lambda_mse: float = 1.0
    lambda_ssim: float = 0.1
    lambda_l1: float = 0.0
    mode: str = "soft"
    beta: float = 50.0
    eps: float = 0.3
    compensate: bool = False
    device: str = "auto"
    backend: str = "auto"
    schedule: str = "none"
    grad_clip: float = 1.0
    save_every: int = 500
    preview_every: int = 10
    seed: int = 0
    out: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {self.iterations}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        LossWeights(self.lambda_mse, self.lambda_ssim, self.lambda_l1)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        for name in ("save_every", "preview_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitConfig:
        """Build from a mapping (e.g. YAML), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fit settings {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class StepEvent:
    """One optimisation step done.

    ``images`` (rendered views, float32 numpy) is set every ``preview_every``
    steps and on the last step, else ``None``.
    """

    iteration: int
    total: int
    terms: dict[str, float]
    its_per_second: float
    elapsed: float
    images: list[np.ndarray] | None = None


@dataclass
class CheckpointEvent:
    """A checkpoint file was written."""

    iteration: int
    path: Path


@dataclass
class FinishedEvent:
    """The fit ended (all iterations, or stopped by request)."""

    iteration: int
    stopped: bool
    metrics: dict[str, dict[str, float]]
    images: list[np.ndarray]
    path: Path | None = None


Event = StepEvent | CheckpointEvent | FinishedEvent


@dataclass
class _Snapshot:
    model: GaussianModel
    optimizer_state: dict[str, Any]
    iteration: int
    loss_history: list[float] = field(default_factory=list)


class Trainer:
    """Fits a Gaussian model to target MIPs, one step per ``next()`` of :meth:`run`.

    Parameters
    ----------
    model
        The initial model in any frame; its geometry is replaced by the targets'.
    targets
        Normalised target MIPs and their views.
    config
        Fit settings.
    checkpoint
        A checkpoint of ours to resume from (its optimiser state and iteration).
    """

    def __init__(
        self, model: GaussianModel, targets: Targets, config: FitConfig, checkpoint: Checkpoint | None = None
    ) -> None:
        config.validate()
        if config.mode == "field":
            check_field_views(targets.views)
        self.config = config
        self.targets = targets
        self.device, self.device_note = resolve_device(config.device)
        self.renderer = Renderer.create(
            self.device, config.backend, config.mode, config.beta, config.eps, config.compensate
        )
        self.weights = LossWeights(config.lambda_mse, config.lambda_ssim, config.lambda_l1)
        self.original_frame = model.frame
        geometry = targets.geometry
        start = checkpoint.fit_model if checkpoint is not None and checkpoint.fit_model is not None else None
        physical = (start or model.with_geometry(geometry).to_frame(Frame.PHYSICAL, geometry)).to(self.device)
        self._params = {n: t.detach().clone().requires_grad_(True) for n, t in physical.tensors().items()}
        self.model = GaussianModel(**self._params, frame=Frame.PHYSICAL, geometry=geometry)
        self._target_tensors = targets.tensors(self.device)
        if self.weights.lambda_ssim > 0:
            small = [v.name for v in targets.views if min(v.shape) < SSIM_WINDOW]
            if small:
                raise ValueError(
                    f"views {small} are smaller than the {SSIM_WINDOW}-pixel SSIM window; raise the resolution"
                )
        longest = geometry.longest_side
        groups = [
            {"params": [self._params["means"]], "lr": config.lr * longest, "name": "means"},
            {"params": [self._params["log_scales"]], "lr": 0.1 * config.lr, "name": "log_scales"},
            {"params": [self._params["quaternions"]], "lr": 0.1 * config.lr, "name": "quaternions"},
            {"params": [self._params["log_amplitudes"]], "lr": config.lr, "name": "log_amplitudes"},
        ]
        self.optimizer = torch.optim.Adam(groups)
        self.iteration = 0
        self.loss_history: list[float] = []
        if checkpoint is not None and checkpoint.optimizer_state is not None and start is not None:
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
            self.iteration = checkpoint.iteration
            self.loss_history = list(checkpoint.metadata.get("loss_history", []))
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        spacing = torch.as_tensor(geometry.spacing_xyz, dtype=physical.means.dtype, device=self.device)
        self._box = (
            -0.5 * spacing,
            torch.as_tensor(geometry.extent_xyz, device=self.device).to(spacing) + 0.5 * spacing,
        )
        self._log_scale_range = (math.log(0.25 * float(geometry.spacing_xyz.min())), math.log(longest))
        self._clamp()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()

    # ----------------------------------------------------------------- control
    def pause(self) -> None:
        """Block the run before its next step until :meth:`resume` (or :meth:`stop`)."""
        self._running.clear()

    def resume(self) -> None:
        """Let a paused run go on."""
        self._running.set()

    def stop(self) -> None:
        """End the run after the current step; it finishes with a consistent model."""
        self._stop.set()
        self._running.set()

    @property
    def paused(self) -> bool:
        """Whether a pause is requested."""
        return not self._running.is_set()

    def describe(self) -> str:
        """Device and renderer backend in one line."""
        return f"{self.device_note}; {self.renderer.describe()}"

    # ------------------------------------------------------------------- state
    def current_model(self, frame: Frame | str | None = None) -> GaussianModel:
        """A detached copy of the model (in ``frame``; default: the frame it came in)."""
        with self._lock:
            physical = self.model.to("cpu")
        return physical.to_frame(frame or self.original_frame, self.targets.geometry)

    def save(self, path: str | Path) -> Path:
        """Write the current model (original frame) with resume state; safe to call between steps from any thread."""
        with self._lock:
            snapshot = self._snapshot()
        return self._write(Path(path), snapshot)

    def _snapshot(self) -> _Snapshot:
        state = self.optimizer.state_dict()
        copied = {
            "state": {k: {n: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                      for k, s in state["state"].items()},
            "param_groups": [dict(g) for g in state["param_groups"]],
        }  # fmt: skip
        return _Snapshot(self.model.to("cpu"), copied, self.iteration, list(self.loss_history))

    def _write(self, path: Path, snapshot: _Snapshot) -> Path:
        stored = snapshot.model.to_frame(self.original_frame, self.targets.geometry)
        extra = {
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            "views": [v.to_dict() for v in self.targets.views],
            "normalization": {
                "rule": self.targets.normalization.rule,
                "low": self.targets.low,
                "high": self.targets.high,
            },
            "loss_history": snapshot.loss_history,
            "renderer": {"backend": self.renderer.backend, "mode": self.config.mode, "beta": self.config.beta},
        }
        loss = snapshot.loss_history[-1] if snapshot.loss_history else None
        return save_checkpoint(
            path, stored, fit_model=snapshot.model, optimizer_state=snapshot.optimizer_state,
            iteration=snapshot.iteration, loss=loss, extra=extra,
        )  # fmt: skip

    # --------------------------------------------------------------------- fit
    def render(self) -> list[torch.Tensor]:
        """Render the current model into the target views (no gradient)."""
        with torch.no_grad():
            return self.renderer.render(self.model, self.targets.views)

    def metrics(self, images: list[torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
        """PSNR (dB) and SSIM of each view (SSIM is NaN for views smaller than its 11-pixel window)."""
        images = images if images is not None else self.render()
        return {
            view.name: {
                "psnr": psnr(image, target),
                "ssim": float(ssim(image.double(), target.double())) if min(view.shape) >= SSIM_WINDOW else math.nan,
            }
            for view, image, target in zip(self.targets.views, images, self._target_tensors)
        }

    def step(self) -> tuple[dict[str, float], list[torch.Tensor]]:
        """One Adam step; returns the loss terms and the rendered views (before the step).

        Raises
        ------
        TrainingError
            The loss or a gradient is NaN/Inf; the parameters are left unchanged.
        """
        with self._lock, torch_threads(self.renderer.torch_threads):
            self.optimizer.zero_grad(set_to_none=True)
            rendered = self.renderer.render(self.model, self.targets.views)
            loss, terms = mip_loss(rendered, self._target_tensors, self.weights)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(self._params.values()), self.config.grad_clip)
            if not (math.isfinite(terms["loss"]) and bool(torch.isfinite(norm))):
                raise TrainingError(
                    f"the loss or its gradient became NaN/Inf at iteration {self.iteration + 1} "
                    f"(loss {terms['loss']}); the model was left at iteration {self.iteration}"
                )
            self._schedule()
            self.optimizer.step()
            self._clamp()
            self.iteration += 1
            self.loss_history.append(terms["loss"])
        return terms, [r.detach() for r in rendered]

    def _schedule(self) -> None:
        if self.config.schedule == "none":
            return
        progress = min(self.iteration / self.config.iterations, 1.0)
        if self.config.schedule == "cosine":
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            factor = 0.1**progress
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    @torch.no_grad()
    def _clamp(self) -> None:
        self._params["means"].data = torch.maximum(torch.minimum(self._params["means"], self._box[1]), self._box[0])
        self._params["log_scales"].clamp_(*self._log_scale_range)
        self._params["log_amplitudes"].clamp_(*LOG_AMPLITUDE_RANGE)

    def run(self) -> Iterator[Event]:
        """Fit until ``config.iterations`` or :meth:`stop`, yielding events.

        Writes ``checkpoint_iter{N}.pt`` every ``save_every`` steps and
        ``neurogs_renderer_optimized.pt`` at the end when ``config.out`` is set.
        A NaN/Inf raises :class:`TrainingError` before the bad step is applied, so
        the model stays at the last good iteration and checkpoints on disk are kept.
        """
        out = Path(self.config.out) if self.config.out else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        start_time = time.perf_counter()
        window: list[float] = []
        stopped = False
        while self.iteration < self.config.iterations:
            self._running.wait()
            if self._stop.is_set():
                stopped = True
                break
            tick = time.perf_counter()
            terms, rendered = self.step()
            window = [*window[-19:], time.perf_counter() - tick]
            last = self.iteration == self.config.iterations
            show = last or self.iteration % self.config.preview_every == 0 or self.iteration == 1
            yield StepEvent(
                self.iteration,
                self.config.iterations,
                terms,
                len(window) / sum(window),
                time.perf_counter() - start_time,
                [r.cpu().numpy() for r in rendered] if show else None,
            )
            if out is not None and self.iteration % self.config.save_every == 0:
                yield CheckpointEvent(self.iteration, self.save(out / f"checkpoint_iter{self.iteration}.pt"))
        images = self.render()
        path = self.save(out / FINAL_NAME) if out is not None else None
        yield FinishedEvent(self.iteration, stopped, self.metrics(images), [i.cpu().numpy() for i in images], path)
