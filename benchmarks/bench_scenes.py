"""The scenes of ``bench_cpu.py`` and ``bench_gpu.py``: random Gaussians in the real neuron's volume box.

K = 12,145 Gaussians (as many as the shared NeuRoGS checkpoint) inside the
100 x 647 x 813 (Z, Y, X) volume box, sigma 1-3 voxels per principal axis,
random rotations, amplitudes 0.2-1; physical frame = voxel units (spacing 1).
Targets are the scene rendered once; training starts from a perturbed copy.
``torch`` is imported by the callers (lazily, in their measuring processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VOLUME_ZYX = (100, 647, 813)
NUM_GAUSSIANS = 12_145


@dataclass(frozen=True)
class Scenario:
    """One benchmark configuration: the scene and the backends measured on it."""

    name: str
    num_gaussians: int
    volume_zyx: tuple[int, int, int]
    resolution: tuple[int, int] | None
    backends: tuple[str, ...]
    note: str = ""


def random_gaussians(k: int, geometry: Any, generator: Any, device: Any = "cpu") -> dict:
    """Gaussians inside the volume box, sigma 1-3 voxels, random rotations, amplitudes 0.2-1."""
    import torch

    extent = torch.tensor(geometry.extent_xyz, dtype=torch.float32)
    params = {
        "means": torch.rand(k, 3, generator=generator) * extent,
        "log_scales": torch.log(1 + 2 * torch.rand(k, 3, generator=generator)),
        "quaternions": torch.randn(k, 4, generator=generator),
        "log_amplitudes": torch.log(0.2 + 0.8 * torch.rand(k, generator=generator)),
    }
    return {name: value.to(device) for name, value in params.items()}


def perturbed(params: dict, generator: Any) -> dict:
    """A nearby starting point for the training steps."""
    import torch

    noise = {"means": 0.5, "log_scales": 0.1, "quaternions": 0.1, "log_amplitudes": 0.1}
    return {
        name: value + noise[name] * torch.randn(value.shape, generator=generator).to(value.device)
        for name, value in params.items()
    }
