"""Differentiable MIP rendering of Gaussian models: one entry point, several backends.

``render_mip`` runs two stages with a backend: projection of the 3D Gaussians
into every view (``project.py``, PyTorch autograd, is the reference) and
rasterisation of the 2D Gaussians:

* ``torch``: the references (``project.py``, ``raster_torch.py``), any device;
* ``cpu``: numba kernels for both stages (``project_cpu.py``: fused from the
  model's parameters; ``raster_cpu.py``: parallel over tiles and Gaussians);
* ``triton``: the reference projection, then tile-binned Triton kernels for
  CUDA (``raster_triton.py``);
* ``auto``: ``triton`` on CUDA, ``cpu`` on the CPU, else ``torch``; a backend that
  cannot run falls back to ``torch`` once, with the reason logged and kept on the
  :class:`Renderer`.

Mode ``field`` is the exact MIP of the summed field (``field.py``), axis views only.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model import GaussianModel
from ..views import View
from .project import CUTOFF_SIGMA, DEFAULT_BETA, DEFAULT_EPS, Projection

__all__ = [
    "BACKENDS",
    "CUTOFF_SIGMA",
    "DEFAULT_BETA",
    "DEFAULT_EPS",
    "MODES",
    "Projection",
    "Renderer",
    "Stages",
    "render_mip",
]

LOGGER = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "cpu", "triton")
MODES = ("soft", "max", "field")
# Modules of each backend's (projection, rasterisation) stages.
_MODULES = {
    "torch": ("project", "raster_torch"),
    "cpu": ("project_cpu", "raster_cpu"),
    "triton": ("project", "raster_triton"),
}

Projector = Callable[[GaussianModel, list[View], float, bool], Projection]
"""``project_model(model, views, eps, compensate)`` of a backend."""
Rasterizer = Callable[[Projection, str, float], list[torch.Tensor]]
"""``rasterize(projection, mode, beta)`` of a backend."""


@dataclass(frozen=True)
class Stages:
    """The two stages of a backend."""

    project: Projector
    rasterize: Rasterizer


def _load(backend: str) -> tuple[Stages | None, str | None]:
    """The stages of ``backend`` or the reason it cannot be used."""
    modules = []
    for name in _MODULES[backend]:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ImportError as error:
            return None, f"{backend} backend unavailable: {error}"
        problem = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
        if problem:
            return None, problem
        modules.append(module)
    return Stages(modules[0].project_model, modules[1].rasterize), None


@dataclass
class Renderer:
    """A resolved backend plus render settings.

    Attributes
    ----------
    backend
        The backend that runs (``torch``, ``cpu`` or ``triton``).
    requested
        What the user asked for (may be ``auto``).
    fallback_reason
        Why the requested backend was not used, or ``None``.
    """

    backend: str
    requested: str
    device: torch.device
    mode: str = "soft"
    beta: float = DEFAULT_BETA
    eps: float = DEFAULT_EPS
    compensate: bool = False
    fallback_reason: str | None = None
    stages: Stages | None = None

    @classmethod
    def create(
        cls,
        device: torch.device | str,
        backend: str = "auto",
        mode: str = "soft",
        beta: float = DEFAULT_BETA,
        eps: float = DEFAULT_EPS,
        compensate: bool = False,
    ) -> Renderer:
        """Resolve ``backend`` for ``device`` and check the settings."""
        device = torch.device(device)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if mode not in MODES:
            raise ValueError(f"unknown render mode {mode!r}; expected one of {MODES}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0 (1/intensity), got {beta}")
        if not eps >= 0:
            raise ValueError(f"pixel filter eps must be >= 0 px^2, got {eps}")
        wanted = backend
        if backend == "auto":
            wanted = {"cuda": "triton", "cpu": "cpu"}.get(device.type, "torch")
        if wanted == "triton" and device.type != "cuda" and not _triton_interpreted():
            raise ValueError(f"the triton backend needs a CUDA device (or TRITON_INTERPRET=1), not {device}")
        if wanted == "cpu" and device.type != "cpu":
            raise ValueError(f"the cpu backend runs on the CPU, not {device}")
        stages, reason = _load(wanted)
        chosen = wanted
        if stages is None:
            stages, _ = _load("torch")
            chosen = "torch"
            LOGGER.warning("%s; falling back to the torch reference renderer", reason)
        return cls(chosen, backend, device, mode, beta, eps, compensate, reason, stages)

    @property
    def torch_threads(self) -> int | None:
        """PyTorch CPU threads that suit the torch ops around this backend in a training step (loss,
        optimiser), or ``None`` for PyTorch's default; see :func:`napari_neurogs_mip.device.torch_threads`.

        The cpu kernels bring their own threads: PyTorch's would only compete with them.
        """
        return 1 if self.backend == "cpu" else None

    def describe(self) -> str:
        """One line naming device, backend and why, for logs and the GUI."""
        text = f"device {self.device}, renderer backend {self.backend} (requested {self.requested})"
        return f"{text}; fallback: {self.fallback_reason}" if self.fallback_reason else text

    def render(self, model: GaussianModel, views: list[View]) -> list[torch.Tensor]:
        """Render ``model`` (physical frame) into ``views``; one [H, W] image per view."""
        return render_mip(model, views, self.mode, self.beta, self.eps, self.compensate, stages=self.stages)


def _triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def render_mip(
    model: GaussianModel,
    views: list[View],
    mode: str = "soft",
    beta: float = DEFAULT_BETA,
    eps: float = DEFAULT_EPS,
    compensate: bool = False,
    backend: str = "torch",
    stages: Stages | None = None,
) -> list[torch.Tensor]:
    """Differentiable MIPs of a model in the physical frame, one [H, W] tensor per view.

    Parameters
    ----------
    model
        Gaussians in the physical frame.
    views
        Views in the physical frame (all rendered in one call).
    mode
        ``soft`` (softmax-weighted, ``beta``), ``max`` (hard) or ``field``
        (exact MIP of the summed field; axis views only).
    beta
        Soft-MIP sharpness, 1/intensity.
    eps
        Pixel filter, px^2.
    compensate
        Keep the integral of filtered sub-pixel Gaussians (see ``project``).
    backend
        ``torch``, ``cpu`` or ``triton`` (``auto`` resolves through :class:`Renderer`).
    stages
        An already resolved backend (:attr:`Renderer.stages`); overrides ``backend``.
    """
    if model.frame.value != "physical":
        raise ValueError(f"render_mip takes a model in the physical frame, got {model.frame.value}")
    if mode == "field":
        from .field import field_mips

        return field_mips(model, views)
    if stages is None:
        stages = Renderer.create(model.means.device, backend, mode, beta, eps, compensate).stages
    return stages.rasterize(stages.project(model, views, eps, compensate), mode, beta)
