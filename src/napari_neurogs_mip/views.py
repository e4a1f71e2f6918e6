"""Orthographic MIP views of a volume, in the physical frame.

A :class:`View` maps a physical point ``p`` (x, y, z) to the image point
``((u . (p - o)) / du, (v . (p - o)) / dv)`` in (column, row) pixels, where
integer coordinates are pixel centres.  Axis views at native resolution put
pixel centres on voxel centres:

====  ====================  ===========  =========  =========
view  target                shape        u (cols)   v (rows)
====  ====================  ===========  =========  =========
xy    ``V.max(axis=0)``     (Y, X)       x          y
xz    ``V.max(axis=1)``     (Z, X)       x          z
yz    ``V.max(axis=2)``     (Z, Y)       y          z
====  ====================  ===========  =========  =========

Orbit views look along ``w = (cos el cos az, cos el sin az, sin el)`` with
``u = (-sin az, cos az, 0)`` and ``v = w x u``: azimuth 0 is the ``yz`` view,
azimuth -90 the ``xz`` view, elevation 90 (azimuth -90) the ``xy`` view.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .frames import VolumeGeometry

AXIS_VIEWS = ("xy", "xz", "yz")
# (u axis, v axis, ray axis) as indices into (x, y, z).
_AXES = {"xy": (0, 1, 2), "xz": (0, 2, 1), "yz": (1, 2, 0)}

Resolution = None | float | tuple[int, int]


@dataclass(frozen=True)
class View:
    """An orthographic view: pixel grid and camera axes in the physical frame.

    Attributes
    ----------
    name
        ``xy``, ``xz``, ``yz`` or ``az{deg}_el{deg}``.
    origin
        Physical position (x, y, z) of the centre of pixel (row 0, column 0).
    u, v
        Unit vectors (x, y, z) along image columns and rows.
    du, dv
        Pixel size along columns and rows, physical units.
    height, width
        Image shape in pixels.
    azimuth, elevation
        Degrees, for orbit views; ``None`` for axis views.
    """

    name: str
    origin: tuple[float, float, float]
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    du: float
    dv: float
    height: int
    width: int
    azimuth: float | None = None
    elevation: float | None = None

    def __post_init__(self) -> None:
        # Plain Python numbers only: views are stored in checkpoint metadata.
        for name in ("origin", "u", "v"):
            object.__setattr__(self, name, tuple(float(c) for c in getattr(self, name)))
        for name in ("du", "dv"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("height", "width"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.height, self.width)

    @property
    def w(self) -> np.ndarray:
        """Unit ray direction ``u x v`` (x, y, z)."""
        return np.cross(np.asarray(self.u), np.asarray(self.v))

    @property
    def is_axis(self) -> bool:
        """Whether this is one of the three axis views."""
        return self.name in AXIS_VIEWS

    def resampled(self, shape: tuple[int, int]) -> View:
        """The view whose pixels are area averages of this view's pixels on a ``shape`` grid."""
        height, width = (int(n) for n in shape)
        if height < 1 or width < 1:
            raise ValueError(f"resolution must be positive, got {shape}")
        ratio_u, ratio_v = self.width / width, self.height / height
        origin = (
            np.asarray(self.origin)
            + (0.5 * ratio_u - 0.5) * self.du * np.asarray(self.u)
            + (0.5 * ratio_v - 0.5) * self.dv * np.asarray(self.v)
        )
        return View(
            name=self.name,
            origin=tuple(origin),
            u=self.u,
            v=self.v,
            du=self.du * ratio_u,
            dv=self.dv * ratio_v,
            height=height,
            width=width,
            azimuth=self.azimuth,
            elevation=self.elevation,
        )

    def to_dict(self) -> dict:
        """Plain-typed form for checkpoint metadata."""
        return {
            "name": self.name,
            "origin": list(self.origin),
            "u": list(self.u),
            "v": list(self.v),
            "du": self.du,
            "dv": self.dv,
            "height": self.height,
            "width": self.width,
            "azimuth": self.azimuth,
            "elevation": self.elevation,
        }

    @classmethod
    def from_dict(cls, data: dict) -> View:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)  # ``__post_init__`` makes tuples of plain numbers


def _unit(index: int) -> tuple[float, float, float]:
    axis = [0.0, 0.0, 0.0]
    axis[index] = 1.0
    return (axis[0], axis[1], axis[2])


def native_view(spec: str, geometry: VolumeGeometry) -> View:
    """The view named ``spec`` (``xy``, ``xz``, ``yz`` or ``AZ:EL`` in degrees) at native resolution."""
    if spec in _AXES:
        iu, iv, _ = _AXES[spec]
        shape = geometry.shape_xyz.astype(int)
        spacing = geometry.spacing_xyz
        return View(spec, (0.0, 0.0, 0.0), _unit(iu), _unit(iv), spacing[iu], spacing[iv], shape[iv], shape[iu])
    azimuth, elevation = parse_orbit(spec)
    return orbit_view(azimuth, elevation, geometry)


def parse_orbit(spec: str) -> tuple[float, float]:
    """Azimuth and elevation (degrees) of an ``AZ:EL`` or ``azAZ_elEL`` view name."""
    match = re.fullmatch(r"\s*(?:az)?([-+]?\d*\.?\d+)\s*[:_,]\s*(?:el)?([-+]?\d*\.?\d+)\s*", spec)
    if match is None:
        raise ValueError(f"unknown view {spec!r}; expected xy, xz, yz or AZIMUTH:ELEVATION in degrees (e.g. 30:15)")
    return float(match.group(1)), float(match.group(2))


def orbit_view(azimuth: float, elevation: float, geometry: VolumeGeometry) -> View:
    """An orbit view about the volume centre; pixels are the finest voxel spacing wide."""
    az, el = math.radians(azimuth), math.radians(elevation)
    w = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    u = np.array([-math.sin(az), math.cos(az), 0.0])
    v = np.cross(w, u)
    pixel = float(np.min(geometry.spacing_xyz))
    corners = np.array(np.meshgrid(*[[0.0, e] for e in geometry.extent_xyz], indexing="ij")).reshape(3, -1).T
    centre = geometry.centre_xyz
    # Half-sizes of the projected box, snapped to whole pixels so the centre lands on a pixel (or edge).
    half_u = np.max(np.abs((corners - centre) @ u))
    half_v = np.max(np.abs((corners - centre) @ v))
    width = math.floor(2 * half_u / pixel + 1e-6) + 1
    height = math.floor(2 * half_v / pixel + 1e-6) + 1
    origin = centre - (width - 1) / 2 * pixel * u - (height - 1) / 2 * pixel * v
    return View(
        name=f"az{azimuth:g}_el{elevation:g}",
        origin=tuple(float(c) for c in origin),
        u=tuple(float(c) for c in u),
        v=tuple(float(c) for c in v),
        du=pixel,
        dv=pixel,
        height=height,
        width=width,
        azimuth=float(azimuth),
        elevation=float(elevation),
    )


def output_shape(native_shape: tuple[int, int], resolution: Resolution) -> tuple[int, int]:
    """Image shape of a view at ``resolution``: native (None), a downsampling factor, or ``(H, W)``."""
    if resolution is None:
        return native_shape
    if isinstance(resolution, (tuple, list)):
        if len(resolution) != 2 or min(int(r) for r in resolution) < 1:
            raise ValueError(f"resolution must be two positive integers H W, got {resolution}")
        return (int(resolution[0]), int(resolution[1]))
    factor = float(resolution)
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(f"downsampling factor must be a finite number >= 1, got {resolution}")
    return (max(1, round(native_shape[0] / factor)), max(1, round(native_shape[1] / factor)))


def make_views(specs: list[str], geometry: VolumeGeometry, resolution: Resolution = None) -> list[View]:
    """Views named by ``specs`` at ``resolution``."""
    if not specs:
        raise ValueError("at least one view is needed")
    views = []
    for spec in specs:
        native = native_view(spec.strip(), geometry)
        views.append(native.resampled(output_shape(native.shape, resolution)))
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise ValueError(f"views repeat: {names}")
    return views


def default_view_specs(num_views: int) -> list[str]:
    """The seed's ``--num_views`` meaning: 1-3 are xy, xz, yz in order; more adds orbit views spread in azimuth."""
    if num_views < 1:
        raise ValueError(f"--num_views must be >= 1, got {num_views}")
    specs = list(AXIS_VIEWS[: min(num_views, 3)])
    extra = num_views - 3
    specs += [f"{180.0 * (i + 0.5) / extra:g}:0" for i in range(max(extra, 0))]
    return specs


def parse_view_specs(text: str) -> list[str]:
    """Split a comma list such as ``xy,xz,30:15`` into view specs, validating each."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    for spec in specs:
        if spec not in _AXES:
            parse_orbit(spec)
    if not specs:
        raise ValueError(f"no views in {text!r}")
    return specs
