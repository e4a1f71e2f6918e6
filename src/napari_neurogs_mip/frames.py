"""Coordinate frames of Gaussian models and the volume geometry that ties them.

A target volume ``V[z, y, x]`` has shape ``(Z, Y, X)`` and voxel spacing
``(sz, sy, sx)`` in physical units (micrometres when known, else 1).
Gaussian means are stored as ``(x, y, z)``.  Every frame is a per-axis affine
map of the voxel frame, ``p_frame = scale * p_voxel + offset`` (``scale`` and
``offset`` in ``(x, y, z)`` order), so converting between frames is exact.

========== ================================================= ===========================
frame      coordinate of voxel index ``i`` along an axis      notes
========== ================================================= ===========================
voxel      ``i``                                             isotropic only if spacing is
physical   ``i * s``                                         the frame fits run in
neurogs    ``-1 + 2 i / (N - 1)`` (align corners)            NeuRoGS v7 raw files
unit       ``i / (N - 1)``                                   end-to-end trainer output
========== ================================================= ===========================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Frame(str, enum.Enum):
    """The coordinate frame a Gaussian model's means and scales live in."""

    VOXEL = "voxel"
    PHYSICAL = "physical"
    NEUROGS = "neurogs"
    UNIT = "unit"

    @classmethod
    def parse(cls, value: str | Frame) -> Frame:
        """Return the frame named by ``value`` (case-insensitive)."""
        if isinstance(value, Frame):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(f.value for f in cls)
            raise ValueError(f"unknown frame {value!r}; expected one of: {names}") from None


@dataclass(frozen=True)
class VolumeGeometry:
    """Shape and voxel spacing of a volume.

    Parameters
    ----------
    shape_zyx
        Number of voxels along (z, y, x).
    spacing_zyx
        Voxel spacing along (z, y, x) in physical units (e.g. micrometres).
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape_zyx)
        spacing = tuple(float(s) for s in self.spacing_zyx)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"volume shape must be 3 positive integers (Z, Y, X), got {self.shape_zyx}")
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"voxel spacing must be 3 positive finite numbers (z, y, x), got {self.spacing_zyx}")
        object.__setattr__(self, "shape_zyx", shape)
        object.__setattr__(self, "spacing_zyx", spacing)

    @property
    def shape_xyz(self) -> np.ndarray:
        """Number of voxels along (x, y, z)."""
        return np.array(self.shape_zyx[::-1], dtype=np.float64)

    @property
    def spacing_xyz(self) -> np.ndarray:
        """Voxel spacing along (x, y, z), physical units."""
        return np.array(self.spacing_zyx[::-1], dtype=np.float64)

    @property
    def extent_xyz(self) -> np.ndarray:
        """Physical distance between the first and last voxel centres along (x, y, z)."""
        return (self.shape_xyz - 1.0) * self.spacing_xyz

    @property
    def longest_side(self) -> float:
        """Physical length of the longest side of the box of voxel centres (at least one voxel)."""
        return float(max(np.max(self.extent_xyz), np.max(self.spacing_xyz)))

    @property
    def centre_xyz(self) -> np.ndarray:
        """Physical position of the volume centre (x, y, z)."""
        return self.extent_xyz / 2.0

    def voxel_to_frame(self, frame: Frame | str) -> tuple[np.ndarray, np.ndarray]:
        """Per-axis affine ``(scale, offset)`` mapping voxel (x, y, z) to ``frame``."""
        frame = Frame.parse(frame)
        n = self.shape_xyz
        # A single-voxel axis has no extent; keep the map invertible by treating it as N = 2.
        span = np.maximum(n - 1.0, 1.0)
        if frame is Frame.VOXEL:
            return np.ones(3), np.zeros(3)
        if frame is Frame.PHYSICAL:
            return self.spacing_xyz.copy(), np.zeros(3)
        if frame is Frame.NEUROGS:
            return 2.0 / span, -np.ones(3)
        return 1.0 / span, np.zeros(3)

    def frame_map(self, source: Frame | str, target: Frame | str) -> tuple[np.ndarray, np.ndarray]:
        """Per-axis affine ``(scale, offset)`` with ``p_target = scale * p_source + offset``."""
        s_scale, s_offset = self.voxel_to_frame(source)
        t_scale, t_offset = self.voxel_to_frame(target)
        scale = t_scale / s_scale
        return scale, t_offset - scale * s_offset

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        """Plain-typed form for checkpoint metadata."""
        return {"shape_zyx": list(self.shape_zyx), "spacing_zyx": list(self.spacing_zyx)}

    @classmethod
    def from_dict(cls, data: dict) -> VolumeGeometry:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(data["shape_zyx"]), tuple(data.get("spacing_zyx", (1.0, 1.0, 1.0))))
