"""The fit: Adam on Gaussian parameters so that rendered MIPs match target MIPs.

:class:`Trainer` is a step-by-step generator of events shared by the CLI and
the napari widget.  It fits in the physical frame of the target volume and
stores models in the frame they came in.

Each parameter group has its own learning rate: ``lr`` for the means (steps in
units of the volume's longest side, as if the box were [0, 1], so ``lr`` means
the same for every volume), ``lr_scales``, ``lr_rotations`` and
``lr_amplitudes`` for the log-scales, quaternions and log-amplitudes.  The seed
design's ratios (``0.1 lr``, ``0.1 lr``, ``lr``) froze the shapes: over 1,000
steps log-scales moved by 0.02 (median), so Gaussians stayed round while
neurites are long and thin; the defaults here were chosen by measurement (see
``docs/quality.md``).  With ``densify`` on, :mod:`.densify` adds and removes
Gaussians every ``densify_every`` steps until ``densify_until``, within
``max_gaussians``.  With ``background_noise`` (the default) the loss compares each
render as its view's background noise maxima would show it
(:class:`.losses.BackgroundMax`): the loss terms of the events are those
of the compared renders, previews and scores show the renders themselves.
After each step the parameters are clamped:

* means to the volume box, half a voxel beyond the outer voxel centres;
* log-scales to ``[log(min_scale * finest spacing), log(longest side)]`` (physical units);
* log-amplitudes to ``[-10, 6]`` (the NeuRoGS v7 range).
"""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .densify import DensityChange, DensityStats, NewGaussians, plan_change, spawn, win_counts
from .device import DEVICES, resolve_device, torch_threads
from .frames import Frame
from .io.checkpoint import Checkpoint, check_optimizer_state, save_checkpoint
from .io.run_folder import FINAL_NAME, checkpoint_name
from .losses import SSIM_WINDOW, BackgroundMax, LossWeights, mip_loss
from .metrics import score
from .model import GaussianModel
from .render import BACKENDS, DEFAULT_BETA, MODES, Renderer
from .render.field import check_field_views
from .settings import check_settings, setting
from .targets import DEFAULT_DENOISE, Targets
from .views import View

LOG_AMPLITUDE_RANGE = (-10.0, 6.0)
SCHEDULES = ("none", "cosine", "exponential")
DEFAULT_BUDGET = {"cpu": 60_000, "mps": 200_000, "cuda": 1_000_000}
"""Default ``max_gaussians`` per device type."""


class TrainingError(RuntimeError):
    """The fit cannot go on (e.g. NaN/Inf); the last good state is kept."""


class SaveError(TrainingError):
    """A checkpoint could not be written (disk full, I/O error); earlier checkpoints are intact."""


@dataclass
class FitConfig:
    """Settings of a fit (plain types, saved in checkpoints); each is described once here (:mod:`.settings`),
    and the CLI flags and the widget controls are built from these descriptions."""

    iterations: int = setting(1000, "total steps to reach, counting a resumed checkpoint's", minimum=1, unit="steps")
    lr: float = setting(1e-3, "learning rate of the means (fraction of the longest side)", positive=True)
    lr_scales: float = setting(1e-2, "learning rate of the log-scales", positive=True)
    lr_rotations: float = setting(1e-2, "learning rate of the quaternions", positive=True)
    lr_amplitudes: float = setting(1e-2, "learning rate of the log-amplitudes", positive=True)
    min_scale: float = setting(0.7, "smallest Gaussian standard deviation, in finest voxel spacings (smaller ones "
                               "fit single noisy voxels)", positive=True, unit="voxels")  # fmt: skip
    denoise: float = setting(DEFAULT_DENOISE, "length of the average taken at each voxel of a target volume along the direction "
                             "in which it varies least (along neurites), before its MIPs are made; 0: the raw volume",
                             minimum=0, group="targets", unit="voxels")  # fmt: skip
    lambda_mse: float = setting(1.0, "weight of the mean squared error", minimum=0, group="loss", flag="--lambda_mse")
    lambda_ssim: float = setting(0.1, "weight of 1 - SSIM", minimum=0, group="loss", flag="--lambda_ssim")
    lambda_l1: float = setting(0.0, "weight of the mean absolute error", minimum=0, group="loss", flag="--lambda_l1")
    background_noise: bool = setting(True, "compare the render as each view's background noise maxima would show it "
                                     "(the render stays noise-free, without haze)", group="loss")  # fmt: skip
    mode: str = setting("soft", "the MIP the fit renders", choices=MODES, group="render")
    beta: float = setting(DEFAULT_BETA, "soft-MIP sharpness (1/intensity)", positive=True, group="render")
    eps: float = setting(0.3, "pixel filter added to each projected covariance", minimum=0, group="render",
                         unit="px^2")  # fmt: skip
    compensate: bool = setting(False, "scale amplitudes for the pixel filter (as 3DGS anti-aliasing)", group="render")
    device: str = setting("auto", "where to compute", choices=DEVICES, group="run")
    backend: str = setting("auto", "renderer backend", choices=BACKENDS, group="run")
    schedule: str = setting("cosine", "learning-rate decay to 0.1x over the fit", choices=SCHEDULES)
    grad_clip: float = setting(1.0, "largest gradient norm of a step", positive=True)
    save_every: int = setting(500, "steps between checkpoints", minimum=1, group="run", unit="steps")
    preview_every: int = setting(10, "steps between rendered previews", minimum=1, group="run", unit="steps")
    seed: int = setting(0, "random seed (initialisation, sample)", minimum=0, maximum=2**63 - 1, group="run")
    out: str | None = None
    densify: bool = setting(True, "add Gaussians where the render misses the target, remove idle ones",
                            group="density")  # fmt: skip
    densify_every: int = setting(100, "steps between density checks", minimum=1, group="density", unit="steps")
    densify_until: int | None = setting(None, "last step of density control (default: 3/4 of the iterations)",
                                        minimum=0, group="density", unit="steps")  # fmt: skip
    max_gaussians: int | None = setting(None, f"budget of Gaussians (default: {DEFAULT_BUDGET['cpu']} on the CPU, {DEFAULT_BUDGET['cuda']} on CUDA)",
                                        minimum=1, group="density")  # fmt: skip

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        check_settings(self)
        LossWeights(self.lambda_mse, self.lambda_ssim, self.lambda_l1)

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed copy."""
        return asdict(self)

    @property
    def last_densify(self) -> int:
        """The last iteration at which density control may act (default: three quarters of the fit)."""
        return self.densify_until if self.densify_until is not None else (3 * self.iterations) // 4

    def gaussian_budget(self, device: torch.device) -> int:
        """``max_gaussians``, or the default for ``device``: what a step renders in tens of ms there."""
        if self.max_gaussians is not None:
            return self.max_gaussians
        return DEFAULT_BUDGET.get(device.type, DEFAULT_BUDGET["cpu"])

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
    num_gaussians: int = 0
    density: str | None = None
    """What density control changed at this step (``None``: it did not run)."""


@dataclass
class CheckpointEvent:
    """A checkpoint file was written."""

    iteration: int
    path: Path


@dataclass
class FinishedEvent:
    """The fit ended (all iterations, or stopped by request).

    ``metrics`` has one entry per training view and per held-out view (names in
    ``held_out``), each the :func:`.metrics.score` of the final render.
    """

    iteration: int
    stopped: bool
    metrics: dict[str, dict[str, float]]
    images: list[np.ndarray]
    path: Path | None = None
    held_out: list[str] = field(default_factory=list)
    num_gaussians: int = 0


Event = StepEvent | CheckpointEvent | FinishedEvent


@dataclass
class _Snapshot:
    model: GaussianModel
    optimizer_state: dict[str, Any]
    iteration: int
    loss_history: list[float] = field(default_factory=list)
    density_state: dict[str, torch.Tensor] = field(default_factory=dict)


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
    eval_targets
        Held-out views: scored by :meth:`metrics` and in the final event, never trained on.
        They must share the targets' volume and normalisation.
    """

    def __init__(
        self,
        model: GaussianModel,
        targets: Targets,
        config: FitConfig,
        checkpoint: Checkpoint | None = None,
        eval_targets: Targets | None = None,
    ) -> None:
        config.validate()
        if config.mode == "field":
            check_field_views(targets.views)
        if eval_targets is not None:
            _check_held_out(targets, eval_targets)
        self.eval_targets = eval_targets
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
        rates = {
            "means": config.lr * longest,
            "log_scales": config.lr_scales,
            "quaternions": config.lr_rotations,
            "log_amplitudes": config.lr_amplitudes,
        }
        # On the CPU PyTorch's fused Adam (one pass per tensor, not a dozen ops): 0.95 -> 0.5 ms of a training step
        # at 12k Gaussians; elsewhere PyTorch's default (None).
        self.optimizer = torch.optim.Adam(
            [{"params": [self._params[n]], "lr": r, "name": n} for n, r in rates.items()],
            fused=True if self.device.type == "cpu" else None,
        )
        self.iteration = 0
        self.loss_history: list[float] = []
        self.budget = config.gaussian_budget(self.device)
        self.density = DensityStats.zeros(self.model.num_gaussians, self.device)
        self.resume_changes: list[str] = []
        """Settings that differ from those the resumed checkpoint was fitted with (all applied)."""
        if checkpoint is not None and checkpoint.optimizer_state is not None and start is not None:
            self._load_optimizer_state(checkpoint.optimizer_state)
            self.iteration = checkpoint.iteration
            if self.iteration >= config.iterations:
                raise ValueError(
                    f"the checkpoint is at iteration {self.iteration}, and iterations={config.iterations} is the "
                    "total to reach: nothing would run; raise iterations (CLI: --iterations, or --extra-iterations N)"
                )
            self.loss_history = list(checkpoint.metadata.get("loss_history", []))
            if checkpoint.density_state is not None:
                self.density = DensityStats.from_tensors(
                    checkpoint.density_state, self.model.num_gaussians, self.device
                )
            saved = checkpoint.metadata.get("config")
            self.resume_changes = _changed_settings(saved if isinstance(saved, dict) else {}, config)
        # Each view's background level: density control only spawns on pixels above it.
        self._levels = targets.foreground_levels()
        self._foregrounds = targets.foregrounds()
        self._foreground_tensors = [torch.as_tensor(f, device=self.device) for f in self._foregrounds]
        self._eval_foregrounds = eval_targets.foregrounds() if eval_targets is not None else []
        self._as_seen = _background_models(targets) if config.background_noise else [None] * len(targets.views)
        self._pixel = float(np.min(geometry.spacing_xyz))
        for group in self.optimizer.param_groups:
            # A resumed state carries the old run's rates: the rates of this config replace them.
            group["initial_lr"] = rates[group["name"]]
        self._schedule()
        self.last_saved: Path | None = None
        """The last checkpoint this trainer wrote."""
        spacing = torch.as_tensor(geometry.spacing_xyz, dtype=physical.means.dtype, device=self.device)
        self._box = (
            -0.5 * spacing,
            torch.as_tensor(geometry.extent_xyz, device=self.device).to(spacing) + 0.5 * spacing,
        )
        self._log_scale_range = (math.log(config.min_scale * float(geometry.spacing_xyz.min())), math.log(longest))
        self.last_change: DensityChange | None = None
        self._clamp()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load a resumed Adam state after checking that it belongs to this model (one group per parameter
        tensor, moments shaped like it; :func:`.io.checkpoint.check_optimizer_state`)."""
        check_optimizer_state(state, self.model)
        self.optimizer.load_state_dict(state)

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
        path = Path(path)
        try:
            written = self._write(path, snapshot)
        except (OSError, RuntimeError) as error:
            raise SaveError(self._save_failure(path, error)) from error
        self.last_saved = written
        return written

    def _save_failure(self, path: Path, error: BaseException) -> str:
        """One line for a failed write: what failed, why, and which earlier checkpoint is intact."""
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        if not full:
            # torch's zip writer reports a full disk as a bare stream error ("basic_ios::clear"); ask the disk.
            with contextlib.suppress(OSError):
                full = shutil.disk_usage(path.parent).free < 1 << 20
        cause = "no space left on device" if full else f"{type(error).__name__}: {str(error).splitlines()[0]}"
        kept = f"the previous checkpoint {self.last_saved} is intact" if self.last_saved else "no checkpoint was kept"
        return f"{cause} writing {path}; {kept} (the model is at iteration {self.iteration})"

    def _snapshot(self) -> _Snapshot:
        state = self.optimizer.state_dict()
        copied = {
            "state": {k: {n: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                      for k, s in state["state"].items()},
            "param_groups": [dict(g) for g in state["param_groups"]],
        }  # fmt: skip
        density = {n: t.detach().cpu().clone() for n, t in self.density.tensors().items()}
        return _Snapshot(self.model.to("cpu"), copied, self.iteration, list(self.loss_history), density)

    def _write(self, path: Path, snapshot: _Snapshot) -> Path:
        stored = snapshot.model.to_frame(self.original_frame, self.targets.geometry)
        extra = {
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            "views": [v.to_dict() for v in self.targets.views],
            "eval_views": [v.to_dict() for v in self.eval_targets.views] if self.eval_targets else [],
            "normalization": {
                "rule": self.targets.normalization.rule,
                "low": self.targets.low,
                "high": self.targets.high,
                "view_background": self.targets.normalization.per_view,
                "view_lows": {v.name: low for v, low in zip(self._all_views(), self._all_view_lows())},
            },
            "loss_history": snapshot.loss_history,
            "renderer": {"backend": self.renderer.backend, "mode": self.config.mode, "beta": self.config.beta},
        }
        loss = snapshot.loss_history[-1] if snapshot.loss_history else None
        return save_checkpoint(
            path, stored, fit_model=snapshot.model, optimizer_state=snapshot.optimizer_state,
            iteration=snapshot.iteration, loss=loss, extra=extra, density_state=snapshot.density_state,
        )  # fmt: skip

    # --------------------------------------------------------------------- fit
    @property
    def compiles_kernels(self) -> bool:
        """Whether the renderer's first call compiles kernels (numba on the CPU, Triton on CUDA): seconds to a
        minute on a machine that has no cached copy yet."""
        return self.renderer.backend in ("cpu", "triton")

    def warm_up(self) -> float:
        """Compile (or load from the cache) every kernel a step uses, on a few of the Gaussians, leaving the fit
        untouched; returns the seconds it took.  Call it before timing steps."""
        start = time.perf_counter()
        with self._lock, torch_threads(self.renderer.torch_threads):
            few = {n: t.detach()[:8].clone().requires_grad_(True) for n, t in self._params.items()}
            model = GaussianModel(**few, frame=Frame.PHYSICAL, geometry=self.targets.geometry)
            loss, _ = mip_loss(self._seen(self.renderer.render(model, self.targets.views)), self._target_tensors,
                               self.weights)  # fmt: skip
            loss.backward()
        return time.perf_counter() - start

    def render(self) -> list[torch.Tensor]:
        """Render the current model into the target views (no gradient)."""
        with torch.no_grad():
            return self.renderer.render(self.model, self.targets.views)

    def metrics(self, images: list[torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
        """:func:`.metrics.score` of every training view, then of every held-out view.

        ``images`` are renders of the training views (default: rendered now); held-out views are rendered here.
        """
        images = images if images is not None else self.render()
        trained = zip(self.targets.views, images, self._target_tensors, self._foregrounds)
        scores = {view.name: score(image, target, fg) for view, image, target, fg in trained}
        if self.eval_targets is not None:
            with torch.no_grad():
                held = self.renderer.render(self.model, self.eval_targets.views)
            targets = self.eval_targets.tensors(self.device)
            for view, image, target, fg in zip(self.eval_targets.views, held, targets, self._eval_foregrounds):
                scores[view.name] = score(image, target, fg)
        return scores

    def _all_views(self) -> list[View]:
        return [*self.targets.views, *(self.eval_targets.views if self.eval_targets is not None else [])]

    def _all_view_lows(self) -> list[float]:
        lows = []
        for targets in (self.targets, self.eval_targets):
            if targets is not None:
                lows += targets.view_lows or [targets.low] * len(targets.views)
        return lows

    @property
    def held_out(self) -> list[str]:
        """Names of the held-out views."""
        return [v.name for v in self.eval_targets.views] if self.eval_targets is not None else []

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
            loss, terms = mip_loss(self._seen(rendered), self._target_tensors, self.weights)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(self._params.values()), self.config.grad_clip)
            if not (math.isfinite(terms["loss"]) and bool(torch.isfinite(norm))):
                raise TrainingError(
                    f"the loss or its gradient became NaN/Inf at iteration {self.iteration + 1} "
                    f"(loss {terms['loss']}); the model was left at iteration {self.iteration}"
                )
            if self._densifying:
                self.density.accumulate(self._params["means"].grad, self._pixel)
            self._schedule()
            self.optimizer.step()
            self._clamp()
            self.iteration += 1
            self.loss_history.append(terms["loss"])
            self.last_change = None
            if self._densifying and self.iteration % self.config.densify_every == 0:
                self.last_change = self._densify([r.detach() for r in rendered])
        return terms, [r.detach() for r in rendered]

    def _seen(self, rendered: list[torch.Tensor]) -> list[torch.Tensor]:
        """The renders as the targets' background noise would show them (:class:`.losses.BackgroundMax`)."""
        return [image if seen is None else seen(image) for image, seen in zip(rendered, self._as_seen)]

    @property
    def _densifying(self) -> bool:
        return self.config.densify and self.iteration < self.config.last_densify

    def _densify(self, rendered: list[torch.Tensor]) -> DensityChange:
        """Spawn, clone, split and prune (see :mod:`.densify`); the optimiser state follows the rows."""
        wins = win_counts(self.model, self.targets.views, self.config.eps)
        new = spawn(self.targets, self._target_tensors, rendered, self._levels, self.budget, self._foreground_tensors)
        split_scale = 1.5 * float(np.max(self.targets.geometry.spacing_xyz))
        change = plan_change(self._params, self.density, wins, new, self.budget, split_scale)
        self._resize(change.keep, change.added)
        self.density.reset_gradients()
        self._clamp()
        return change

    @torch.no_grad()
    def _resize(self, keep: torch.Tensor, added: NewGaussians) -> None:
        """Keep rows ``keep`` of every parameter, append ``added``; Adam moments and density statistics follow
        (zeros for new rows)."""
        new_rows = added.tensors()
        for group in self.optimizer.param_groups:
            name = group["name"]
            old = group["params"][0]
            fresh = new_rows[name].to(device=old.device, dtype=old.dtype)
            param = torch.cat([old.detach()[keep], fresh]).requires_grad_(True)
            state = self.optimizer.state.pop(old, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = torch.cat([state[key][keep], torch.zeros_like(fresh)])
            if state:
                self.optimizer.state[param] = state
            group["params"][0] = param
            self._params[name] = param
        self.density = self.density.select(keep, len(added))
        self.model = GaussianModel(**self._params, frame=Frame.PHYSICAL, geometry=self.targets.geometry)

    def _schedule(self) -> None:
        progress = min(self.iteration / self.config.iterations, 1.0)
        if self.config.schedule == "cosine":
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        elif self.config.schedule == "exponential":
            factor = 0.1**progress
        else:
            factor = 1.0
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
                self.model.num_gaussians,
                self.last_change.describe() if self.last_change is not None else None,
            )
            if out is not None and self.iteration % self.config.save_every == 0:
                yield CheckpointEvent(self.iteration, self.save(out / f"checkpoint_iter{self.iteration}.pt"))
        images = self.render()
        # A stopped fit saves a checkpoint named by its iteration, so the final name only ever holds a finished fit.
        name = checkpoint_name(self.iteration) if stopped else FINAL_NAME
        path = self.save(out / name) if out is not None else None
        yield FinishedEvent(
            self.iteration, stopped, self.metrics(images), [i.cpu().numpy() for i in images], path, self.held_out,
            self.model.num_gaussians,
        )  # fmt: skip


def _changed_settings(saved: dict[str, Any], config: FitConfig) -> list[str]:
    """``name old -> new`` for the settings of ``config`` that differ from a resumed fit's ``saved`` ones."""
    current = config.to_dict()
    ignored = {"out", "iterations", "device", "preview_every", "save_every"}
    return [
        f"{name} {saved[name]!r} -> {value!r}"
        for name, value in current.items()
        if name in saved and name not in ignored and saved[name] != value
    ]


MIN_BACKGROUND_PIXELS = 256
"""Fewest background pixels a view needs for :class:`.losses.BackgroundMax` (fewer: compared as rendered)."""


def _background_models(targets: Targets) -> list[BackgroundMax | None]:
    """Each view's :class:`.losses.BackgroundMax`, ``None`` where too little of it is background to tell."""
    pairs = zip(targets.images, targets.backgrounds())
    return [BackgroundMax(image[b]) if b.sum() >= MIN_BACKGROUND_PIXELS else None for image, b in pairs]


def _check_held_out(targets: Targets, held_out: Targets) -> None:
    """Held-out views must describe the same volume with the same normalisation, and not be trained on."""
    if held_out.geometry != targets.geometry:
        raise ValueError(f"held-out views are of volume {held_out.geometry}, the targets of {targets.geometry}")
    if (held_out.low, held_out.high) != (targets.low, targets.high):
        raise ValueError("held-out views must share the targets' normalisation (low, high)")
    both = sorted({v.name for v in targets.views} & {v.name for v in held_out.views})
    if both:
        raise ValueError(f"views {both} are both trained on and held out; a held-out view must not be trained on")
