"""Random scenes shared by the backend agreement tests (reference vs cpu vs triton).

Each scene is a set of leaf tensors (physical frame) plus views; the views are
deliberately non-square, not multiples of any tile size, and include orbit
views.  The scenes cover K in {0, 1, 50, 500}, sub-pixel and larger-than-image
Gaussians, Gaussians partly and fully off-image, and empty tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.model import covariance
from napari_neurogs_mip.render.project import Projection, project
from napari_neurogs_mip.views import View, make_views

PARAMETERS = ("means", "log_scales", "quaternions", "log_amplitudes")


@dataclass
class Scene:
    """Leaf parameters and views of one test scene."""

    name: str
    params: dict[str, torch.Tensor]
    views: list[View]
    eps: float = 0.3
    compensate: bool = False

    def project(self) -> Projection:
        """Project the scene (differentiable w.r.t. ``params``)."""
        p = self.params
        return project(
            p["means"], covariance(p["log_scales"], p["quaternions"]), torch.exp(p["log_amplitudes"]),
            self.views, self.eps, self.compensate,
        )  # fmt: skip

    def fresh(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Scene:
        """A copy whose parameters are new leaves that require grad."""
        params = {
            k: v.detach().to(dtype=dtype, device=device).clone().requires_grad_(True) for k, v in self.params.items()
        }
        return Scene(self.name, params, self.views, self.eps, self.compensate)


def _params(
    k: int, extent: torch.Tensor, generator: torch.Generator, log_scale: tuple[float, float], spread: float = 1.0
) -> dict[str, torch.Tensor]:
    centre = extent / 2
    means = centre + (torch.rand(k, 3, generator=generator, dtype=torch.float64) - 0.5) * extent * spread
    lo, hi = log_scale
    return {
        "means": means,
        "log_scales": lo + (hi - lo) * torch.rand(k, 3, generator=generator, dtype=torch.float64),
        "quaternions": torch.randn(k, 4, generator=generator, dtype=torch.float64) * 1.5,
        "log_amplitudes": -2.0 + 2.0 * torch.rand(k, generator=generator, dtype=torch.float64),
    }


def make_scenes() -> list[Scene]:
    """The shared scenes (float64 parameters; call ``fresh`` before use)."""
    generator = torch.Generator().manual_seed(1234)
    geometry = VolumeGeometry((13, 37, 45), (2.0, 1.0, 1.0))
    extent = torch.tensor(geometry.extent_xyz)
    axis = make_views(["xy", "xz", "yz"], geometry)
    mixed = make_views(["xy", "xz", "30:20"], geometry) + make_views(["-75:-40"], geometry, (19, 27))
    scenes = [
        Scene("empty", _params(0, extent, generator, (0.0, 1.0)), axis),
        Scene("single", _params(1, extent, generator, (0.5, 1.5)), mixed),
        Scene("k50", _params(50, extent, generator, (-0.5, 1.2)), mixed),
        Scene("k500", _params(500, extent, generator, (-1.0, 1.0)), axis + make_views(["60:10"], geometry)),
        Scene("subpixel", _params(50, extent, generator, (-3.0, -1.5)), mixed, eps=0.3, compensate=True),
        Scene("huge", _params(5, extent, generator, (3.0, 4.0)), mixed),
        Scene("off_image", _params(50, extent, generator, (-0.3, 1.5), spread=1.8), mixed),
        Scene("clustered_empty_tiles", _params(50, extent * 0.15, generator, (-0.5, 0.5)), axis),
    ]
    return scenes


def render(scene: Scene, rasterize: Callable[[Projection, str, float], list[torch.Tensor]], mode: str, beta: float):
    """Project and rasterise ``scene``; returns one image per view."""
    return rasterize(scene.project(), mode, beta)


def parameter_gradients(
    scene: Scene,
    rasterize: Callable[[Projection, str, float], list[torch.Tensor]],
    mode: str,
    beta: float,
    seed: int = 7,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Images and gradients of a fixed random linear loss w.r.t. every parameter."""
    images = render(scene, rasterize, mode, beta)
    generator = torch.Generator().manual_seed(seed)
    loss = sum((img * torch.randn(img.shape, generator=generator, dtype=img.dtype)).sum() for img in images)
    grads = torch.autograd.grad(loss, [scene.params[p] for p in PARAMETERS], allow_unused=True)
    out = {}
    for name, grad in zip(PARAMETERS, grads):
        out[name] = torch.zeros_like(scene.params[name]) if grad is None else grad
    return [img.detach() for img in images], out
