"""Target MIPs: from a volume (axis or orbit views) or from precomputed MIP images.

* Axis views are the exact ``np.max`` of the volume along an axis.
* Orbit views sample each ray trilinearly at ``ORBIT_STEP`` of the finest voxel
  spacing (inside the volume box only) and take the maximum.
* Lower resolutions are exact area averages of the native MIP (see
  :func:`area_resample`), matching ``View.resampled``.
* Intensities are normalised to [0, 1] with one ``(low, high)`` pair for all
  views, so a Gaussian has the same peak in every view (see :class:`Normalization`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .frames import VolumeGeometry
from .views import AXIS_VIEWS, View, make_views, native_view, output_shape

ORBIT_STEP = 0.5
"""Ray sample spacing for orbit-view targets, in units of the finest voxel spacing."""

_SAMPLES_PER_CHUNK = 1 << 23


@dataclass(frozen=True)
class Normalization:
    """How raw intensities map to [0, 1]: ``clip((x - low) / (high - low), 0, 1)``.

    Rules
    -----
    ``background`` (default)
        ``low`` = median of all MIP pixels (the background level of the MIPs of a
        sparse sample, noise included), ``high`` = their 99.95th percentile.
    ``percentile``
        ``low``/``high`` = the given percentiles of all MIP pixels.
    ``minmax``
        ``low``/``high`` = min/max of all MIP pixels.
    ``fixed``
        ``low``/``high`` as given (e.g. to reuse another run's values).
    """

    rule: str = "background"
    low_percentile: float = 50.0
    high_percentile: float = 99.95
    low: float | None = None
    high: float | None = None

    def fit(self, images: list[np.ndarray]) -> tuple[float, float]:
        """The ``(low, high)`` this rule gives for ``images``."""
        if self.rule == "fixed":
            if self.low is None or self.high is None:
                raise ValueError("the fixed normalisation needs low and high")
            low, high = float(self.low), float(self.high)
        else:
            pixels = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in images])
            if self.rule == "minmax":
                low, high = float(pixels.min()), float(pixels.max())
            elif self.rule in ("background", "percentile"):
                low_p, high_p = (
                    (50.0, 99.95) if self.rule == "background" else (self.low_percentile, self.high_percentile)
                )
                if not 0 <= low_p < high_p <= 100:
                    raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low_p}, {high_p}")
                low, high = (float(v) for v in np.percentile(pixels, [low_p, high_p]))
                if high <= low:
                    # Very sparse images: the percentile lands on the background; use the maximum instead.
                    high = float(pixels.max())
            else:
                raise ValueError(
                    f"unknown normalisation {self.rule!r}; expected background, percentile, minmax or fixed"
                )
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            raise ValueError(
                f"cannot normalise: the intensities are constant or non-finite (low={low}, high={high}); "
                "a target needs contrast"
            )
        return low, high

    def describe(self, low: float, high: float) -> str:
        """Human-readable statement of the rule and its values."""
        return f"{self.rule} normalisation: [{low:.6g}, {high:.6g}] -> [0, 1], clipped"


@dataclass
class Targets:
    """Normalised target MIPs with their views.

    Attributes
    ----------
    views
        Views in the physical frame of ``geometry``.
    images
        float32 [H, W] images in [0, 1], one per view.
    geometry
        The volume the views refer to.
    low, high
        Raw intensities mapped to 0 and 1.
    normalization
        The rule that produced ``low``/``high``.
    """

    views: list[View]
    images: list[np.ndarray]
    geometry: VolumeGeometry
    low: float = 0.0
    high: float = 1.0
    normalization: Normalization = field(default_factory=Normalization)

    def tensors(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The images as tensors on ``device``."""
        return [torch.as_tensor(image, dtype=dtype, device=device) for image in self.images]

    def describe(self) -> str:
        """One line saying what the targets are."""
        views = ", ".join(f"{v.name} {v.height}x{v.width}" for v in self.views)
        return f"{len(self.views)} views ({views}); {self.normalization.describe(self.low, self.high)}"


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] matrix of exact area-overlap fractions (rows sum to 1)."""
    edges = np.linspace(0.0, size_in, size_out + 1)
    left = np.arange(size_in)
    overlap = np.clip(
        np.minimum(edges[1:, None], left[None, :] + 1.0) - np.maximum(edges[:-1, None], left[None, :]), 0.0, None
    )
    return overlap / overlap.sum(axis=1, keepdims=True)


def area_resample(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Exact area-average resampling of [..., H, W] to [..., h, w] (differentiable)."""
    height, width = image.shape[-2:]
    if (height, width) == tuple(shape):
        return image
    rows = torch.as_tensor(_area_weights(height, shape[0]), dtype=image.dtype, device=image.device)
    cols = torch.as_tensor(_area_weights(width, shape[1]), dtype=image.dtype, device=image.device)
    return rows @ image @ cols.T


def axis_mip(volume: torch.Tensor, name: str) -> torch.Tensor:
    """Exact MIP of a [Z, Y, X] volume for an axis view (``xy``, ``xz`` or ``yz``)."""
    return volume.amax(dim={"xy": 0, "xz": 1, "yz": 2}[name])


def orbit_mip(volume: torch.Tensor, geometry: VolumeGeometry, view: View) -> torch.Tensor:
    """MIP of a [Z, Y, X] volume for a native-resolution orbit view, by ray sampling.

    Each ray is sampled every ``ORBIT_STEP`` x the finest spacing between the
    points where it enters and leaves the box of voxel centres; trilinear
    interpolation.  Rays that miss the box get the volume's minimum.
    """
    device, dtype = volume.device, volume.dtype
    extent = torch.as_tensor(geometry.extent_xyz, dtype=torch.float64)
    u, v, w = (torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in (view.u, view.v, view.w))
    step = ORBIT_STEP * float(np.min(geometry.spacing_xyz))
    cols = torch.arange(view.width, dtype=torch.float64) * view.du
    rows = torch.arange(view.height, dtype=torch.float64) * view.dv
    starts = torch.as_tensor(view.origin, dtype=torch.float64) + rows[:, None, None] * v + cols[None, :, None] * u
    # Slab method: the ray p(t) = start + t w is inside [0, extent] for t in [t_in, t_out].
    # Along an axis the ray is parallel to, it is inside for all t or for none.
    parallel = w.abs() < 1e-12
    w_safe = torch.where(parallel, torch.ones_like(w), w)
    t_a = (0.0 - starts) / w_safe
    t_b = (extent - starts) / w_safe
    tolerance = 1e-9 * float(extent.max().clamp_min(1.0))
    inside = (starts >= -tolerance) & (starts <= extent + tolerance)
    infinity = torch.full_like(t_a, math.inf)
    t_low = torch.where(parallel, torch.where(inside, -infinity, infinity), torch.minimum(t_a, t_b))
    t_high = torch.where(parallel, torch.where(inside, infinity, -infinity), torch.maximum(t_a, t_b))
    t_in = t_low.amax(-1)
    t_out = t_high.amin(-1)
    counts = torch.where(t_out >= t_in, torch.floor((t_out - t_in) / step).long() + 1, torch.zeros_like(t_in).long())
    result = torch.full((view.height, view.width), float(volume.min()), dtype=dtype, device=device)
    vol = volume[None, None]
    scale = torch.where(extent > 0, 2.0 / extent.clamp_min(1e-300), torch.zeros_like(extent))
    rows_per_chunk = max(1, _SAMPLES_PER_CHUNK // max(1, view.width * max(1, int(counts.max()))))
    for r0 in range(0, view.height, rows_per_chunk):
        r1 = min(view.height, r0 + rows_per_chunk)
        n = int(counts[r0:r1].max())
        if n == 0:
            continue
        t = t_in[r0:r1, :, None] + step * torch.arange(n, dtype=torch.float64)
        points = starts[r0:r1, :, None, :] + t[..., None] * w  # [r, W, n, 3] physical (x, y, z)
        grid = (points * scale - 1.0).to(dtype=dtype, device=device)
        samples = F.grid_sample(vol, grid[None], mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
        valid = (torch.arange(n)[None, None, :] < counts[r0:r1, :, None]).to(device)
        samples = torch.where(valid, samples, torch.full_like(samples, -math.inf))
        best = samples.amax(-1)
        result[r0:r1] = torch.where(torch.isfinite(best), best, result[r0:r1])
    return result


def volume_mips(volume: np.ndarray | torch.Tensor, geometry: VolumeGeometry, views: list[View]) -> list[torch.Tensor]:
    """Raw (unnormalised) MIPs of ``volume`` in ``views`` (each at its own resolution)."""
    tensor = torch.as_tensor(np.asarray(volume, dtype=np.float32)) if isinstance(volume, np.ndarray) else volume
    images = []
    for view in views:
        native = native_view(view.name, geometry) if view.is_axis else _native_orbit(view, geometry)
        image = axis_mip(tensor, view.name) if view.is_axis else orbit_mip(tensor, geometry, native)
        images.append(area_resample(image.double(), view.shape).to(tensor.dtype))
    return images


def _native_orbit(view: View, geometry: VolumeGeometry) -> View:
    return native_view(f"{view.azimuth}:{view.elevation}", geometry)


def targets_from_volume(
    volume: np.ndarray,
    geometry: VolumeGeometry,
    view_specs: list[str],
    resolution: float | tuple[int, int] | None = None,
    normalization: Normalization | None = None,
) -> Targets:
    """Normalised MIP targets of a [Z, Y, X] volume.

    The normalisation is fitted on the axis MIPs at native resolution (the
    orbit views share it), so it does not depend on which views are trained.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"a target volume must be 3D (Z, Y, X), got shape {volume.shape}")
    if tuple(volume.shape) != geometry.shape_zyx:
        raise ValueError(f"volume shape {volume.shape} does not match geometry {geometry.shape_zyx}")
    if not np.isfinite(volume).all():
        raise ValueError("the target volume holds NaN/Inf values")
    normalization = normalization or Normalization()
    tensor = torch.as_tensor(volume.astype(np.float32, copy=False))
    reference = [axis_mip(tensor, name).numpy() for name in AXIS_VIEWS]
    low, high = normalization.fit(reference)
    views = make_views(view_specs, geometry, resolution)
    images = [_normalise(image.numpy(), low, high) for image in volume_mips(tensor, geometry, views)]
    return Targets(views, images, geometry, low, high, normalization)


def targets_from_mips(
    images: dict[str, np.ndarray],
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0),
    geometry: VolumeGeometry | None = None,
    normalization: Normalization | None = None,
) -> Targets:
    """Normalised targets from precomputed MIP images keyed by view name.

    Axis images are taken as native-resolution MIPs; their shapes give the
    volume shape (they must agree).  Orbit images (``AZ:EL`` names) need the
    volume ``geometry`` (or axis images beside them) and may have any size.
    """
    if not images:
        raise ValueError("no MIP images given")
    for name, image in images.items():
        if np.asarray(image).ndim != 2:
            raise ValueError(f"MIP image {name!r} must be 2D, got shape {np.asarray(image).shape}")
        if not np.isfinite(image).all():
            raise ValueError(f"MIP image {name!r} holds NaN/Inf values")
    geometry = geometry or _geometry_from_axis_images(images, spacing_zyx)
    views = []
    for name, image in images.items():
        native = native_view(name, geometry)
        if native.is_axis and native.shape != image.shape:
            raise ValueError(f"MIP image {name!r} has shape {image.shape}; the volume's {name} MIP is {native.shape}")
        views.append(native.resampled(output_shape(native.shape, tuple(image.shape))))
    normalization = normalization or Normalization()
    low, high = normalization.fit(list(images.values()))
    return Targets(views, [_normalise(i, low, high) for i in images.values()], geometry, low, high, normalization)


def shown_axes(images: dict[str, np.ndarray]) -> set[str]:
    """The volume axes (``z``, ``y``, ``x``) whose sizes the axis MIPs among ``images`` show."""
    return {axis for name in images if name in AXIS_VIEWS for axis in name}


def _geometry_from_axis_images(
    images: dict[str, np.ndarray], spacing_zyx: tuple[float, float, float]
) -> VolumeGeometry:
    sizes: dict[str, set[int]] = {"z": set(), "y": set(), "x": set()}
    for name, image in images.items():
        if name in AXIS_VIEWS:
            rows, cols = name[1], name[0]
            sizes[rows].add(image.shape[0])
            sizes[cols].add(image.shape[1])
    for axis, found in sizes.items():
        if len(found) > 1:
            raise ValueError(f"the axis MIP images disagree on the {axis} size: {sorted(found)}")
    missing = [axis for axis in "zyx" if axis not in shown_axes(images)]
    if missing:
        raise ValueError(
            f"cannot tell the volume's {', '.join(missing)} size from views {list(images)}; "
            "give the volume shape (FitInputs.volume_shape, --volume-shape; or a checkpoint that knows it), "
            "or add the axis MIPs that show it"
        )
    return VolumeGeometry((sizes["z"].pop(), sizes["y"].pop(), sizes["x"].pop()), spacing_zyx)


def _normalise(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((np.asarray(image, dtype=np.float64) - low) / (high - low), 0.0, 1.0).astype(np.float32)
