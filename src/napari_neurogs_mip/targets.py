"""Target MIPs: from a volume (axis or orbit views) or from precomputed MIP images.

* Axis views are the exact ``np.max`` of the volume along an axis.
* Orbit views use the same definition of a pixel: the maximum over the voxels
  whose centres project nearest to its centre (see :func:`orbit_mip`).
* Lower resolutions are exact area averages of the native MIP (see
  :func:`area_resample`), matching ``View.resampled``.
* Targets built from a volume also give, per pixel, the physical position of
  the voxel behind its value (``Targets.peaks``), for back-projecting image
  features into the volume.
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
from .metrics import FOREGROUND_FLOOR, foreground_level, foreground_mask
from .views import AXIS_VIEWS, View, make_views, native_view, output_shape

_RAY_DIM = {"xy": 0, "xz": 1, "yz": 2}
"""The volume dimension (of Z, Y, X) each axis view looks along."""

VIEW_BACKGROUND_LIMIT = 0.25
"""Largest raise of a view's ``low`` by its own background, as a fraction of ``high - low``."""

_VOXELS_PER_CHUNK = 1 << 23
"""Voxels :func:`orbit_mip` projects at once (bounds its scratch memory to a few hundred MB)."""

_INDEX_BITS = 32
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_EMPTY = torch.iinfo(torch.int64).min
"""The key of a pixel that holds no voxel: below every real key (see ``_keys``)."""


DEFAULT_DENOISE = 1.0
"""Default length, in voxels, of the average along structures a volume target gets before its MIPs are made
(:func:`.denoise.denoise_along_structures`; ``FitConfig.denoise``).  On the rasterised neuron its ``yz`` MIP came
closest to the noise-free one at 1 voxel (38.93 dB; raw 33.98): 0.8 left more noise (38.39), 1.2 flattened bends
and the soma more (38.79, foreground bias -0.007 of the range); see docs/quality.md."""


@dataclass(frozen=True)
class Normalization:
    """How raw intensities map to [0, 1]: ``clip((x - low) / (high - low), 0, 1)``.

    Rules
    -----
    ``background`` (default)
        ``low`` = median of the MIPs' background pixels (:func:`background_median`:
        the pixels below each MIP's foreground level, noise included), ``high`` =
        the 99.95th percentile of all MIP pixels.  The median clips the noise:
        the mode of the background (tried) left half the noise above 0 and cost
        the rasterised neuron 0.05-0.2 in SSIM against its noise-free volume.
        On a sparse neuron this is the median of all pixels; on dense nuclei
        (half of every MIP is nucleus) the median of all pixels lay on the
        nuclei and clipped the dimmer ones to 0.
    ``percentile``
        ``low``/``high`` = the given percentiles of all MIP pixels.
    ``minmax``
        ``low``/``high`` = min/max of all MIP pixels.
    ``fixed``
        ``low``/``high`` as given (e.g. to reuse another run's values).

    Per-view background (``view_background``; default: on for the ``background``
    rule only): each view's ``low`` is raised to its own background's median.  A
    MIP's background is the maximum of the noise along its rays, so it grows
    with the ray length: on the rasterised neuron (Poisson noise) the ``xz`` and
    ``yz`` MIPs (647 and 813 voxels deep) sat 0.01 above the ``xy`` MIP (100
    deep).  With one ``low`` the model had to paint that bias as a faint haze,
    which cost 1.3-1.7 dB (and SSIM 0.68 -> 0.94 in ``xz``) against the
    noise-free volume; a Gaussian's peak now differs between views by that 1 %.
    """

    rule: str = "background"
    low_percentile: float = 50.0
    high_percentile: float = 99.95
    low: float | None = None
    high: float | None = None
    view_background: bool | None = None

    @property
    def per_view(self) -> bool:
        """Whether each view's background (its median) is subtracted."""
        return self.rule == "background" if self.view_background is None else self.view_background

    def view_low(self, image: np.ndarray, low: float, high: float, level: float | None = None) -> float:
        """The ``low`` of one view's raw MIP ``image``: ``low``, or the view's background median when higher.

        ``level`` is the image's :func:`raw_level` if known.  The view's background raises ``low`` by at most
        a quarter of ``high - low``: a background that bright is more likely structure the estimate took for
        background.
        """
        if not self.per_view:
            return low
        return min(max(low, background_median(image, level)), low + VIEW_BACKGROUND_LIMIT * (high - low))

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
                if self.rule == "background":
                    # The background's median is never above the median of all pixels (a lowest subset).
                    background = np.concatenate([_background_pixels(np.asarray(i)) for i in images])
                    low, high = float(np.median(background)), float(np.percentile(pixels, high_p))
                else:
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
        text = f"{self.rule} normalisation: [{low:.6g}, {high:.6g}] -> [0, 1], clipped"
        return f"{text}; each view's own background (its median) subtracted" if self.per_view else text


def raw_level(image: np.ndarray) -> float:
    """The foreground level (:func:`.metrics.foreground_level`) of a raw MIP, in its own intensity units.

    Estimated on the MIP before normalisation, where no background is clipped: the estimate fails on a
    normalised dense image (nuclei over half of it), whose clipped background it cannot tell from the
    dimmest structure.  The floor (0.02) becomes that share of the MIP's range.
    """
    values = np.asarray(image, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    lowest, highest = float(values.min()), float(values.max())
    if highest <= lowest:
        return highest
    return lowest + foreground_level(_dequantised((values - lowest) / (highest - lowest))) * (highest - lowest)


def _dequantised(values: np.ndarray) -> np.ndarray:
    """``values`` spread uniformly over their quantisation step when they lie on a grid of few levels.

    Photon counts and 8/12-bit stacks give MIPs a few dozen background values: the estimator's quantiles
    then land on ties and halve the noise (the rasterised neuron: sigma 0.0037 measured for 0.0066 true).
    Spreading each value over its step (seeded, so the level is reproducible) restores the distribution.
    """
    distinct = np.unique(values)
    if distinct.size > values.size // 4 or distinct.size < 8:
        return values
    gaps = np.diff(distinct)
    step = float(gaps.min())
    if float(np.median(gaps)) > 1.01 * step:
        return values  # not a grid of levels (e.g. a few noise-free intensities): nothing to spread
    return values + np.random.default_rng(0).uniform(-step / 2, step / 2, values.shape)


def normalised_level(level: float, low: float, high: float) -> float:
    """A :func:`raw_level` in the units of its normalised target (``low`` -> 0, ``high`` -> 1).

    At least :data:`.metrics.FOREGROUND_FLOOR`: a background the normalisation clipped at 0 and any noise
    below the floor stay background.
    """
    return max((level - low) / (high - low), FOREGROUND_FLOOR)


def _background_pixels(image: np.ndarray, level: float | None = None) -> np.ndarray:
    """The finite pixels of a raw MIP at or below its :func:`raw_level` (``level``, if known)."""
    values = np.asarray(image, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    return values[values <= (raw_level(values) if level is None else level)]


def background_median(image: np.ndarray, level: float | None = None) -> float:
    """The median of a raw MIP's background pixels: the pixels at or below its foreground level (``level``,
    its :func:`raw_level`, if known).

    On a sparse sample it is about the median of all pixels; where structure covers half the MIP or more
    (nuclei) it stays on the background, where the median of all pixels would lie on the structure.
    """
    return float(np.median(_background_pixels(image, level)))


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
    view_lows
        The raw intensity each view maps to 0 (``low``, or the view's own background, see
        :class:`Normalization`); ``None`` means ``low`` for every view.
    peaks
        For targets built from a volume, one float32 [H, W, 3] array per view:
        ``peaks[v][row, col]`` is the physical position (x, y, z) of the voxel
        centre that gives pixel (row, col) of view ``v`` its value (for a
        resampled view, that of the brightest native pixel in its area), NaN
        where no voxel does (orbit-view pixels whose ray misses the volume).
        ``None`` for targets built from MIP images.
    levels
        Each view's foreground level in normalised units, estimated on its raw MIP
        (:func:`normalised_level`); ``None``: estimated on the normalised images.
    """

    views: list[View]
    images: list[np.ndarray]
    geometry: VolumeGeometry
    low: float = 0.0
    high: float = 1.0
    normalization: Normalization = field(default_factory=Normalization)
    peaks: list[np.ndarray] | None = None
    view_lows: list[float] | None = None
    levels: list[float] | None = None

    def foreground_levels(self) -> list[float]:
        """Each view's foreground level (normalised units): pixels above it are structure, not background."""
        return self.levels if self.levels is not None else [foreground_level(image) for image in self.images]

    def foregrounds(self) -> list[np.ndarray]:
        """Each view's undilated foreground (:func:`.metrics.foreground_mask` at :meth:`foreground_levels`)."""
        return [foreground_mask(i, dilate=0, level=v) for i, v in zip(self.images, self.foreground_levels())]

    def backgrounds(self) -> list[np.ndarray]:
        """Each view's background pixels (bool [H, W]): outside its foreground dilated by 2 pixels (blur tails
        are not background), on rays that meet the volume (orbit pixels beside it hold no noise)."""
        masks = [~foreground_mask(i, dilate=2, level=v) for i, v in zip(self.images, self.foreground_levels())]
        if self.peaks is not None:
            masks = [m & ~np.isnan(p[..., 0]) for m, p in zip(masks, self.peaks)]
        return masks

    def tensors(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The images as tensors on ``device``."""
        return [torch.as_tensor(image, dtype=dtype, device=device) for image in self.images]

    def peak_positions(self, view_index: int, pixels: np.ndarray) -> np.ndarray:
        """Physical positions of the voxels behind some pixels of one view.

        Parameters
        ----------
        view_index
            Index into ``views``.
        pixels
            Integer [N, 2] (row, column) pixel indices of that view.

        Returns
        -------
        np.ndarray
            float32 [N, 3] physical (x, y, z) positions, ``peaks[view_index][row, col]``.
        """
        if self.peaks is None:
            raise ValueError("these targets have no peak positions (they were built from MIP images, not a volume)")
        pixels = np.asarray(pixels)
        if pixels.ndim != 2 or pixels.shape[1] != 2 or not np.issubdtype(pixels.dtype, np.integer):
            raise ValueError(
                f"pixels must be an integer [N, 2] array of (row, column), got {pixels.dtype} {pixels.shape}"
            )
        return self.peaks[view_index][pixels[:, 0], pixels[:, 1]]

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
    return volume.amax(dim=_RAY_DIM[name])


def axis_mip_argmax(volume: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MIP of a [Z, Y, X] volume for an axis view and the voxel that gives each pixel its value.

    Returns
    -------
    image
        The MIP, as :func:`axis_mip`.
    index
        int64, same shape: flat index into ``volume.reshape(-1)`` of the first
        voxel along the ray holding the maximum (``np.argmax`` along the axis).
    """
    dim = _RAY_DIM[name]
    image, depth = volume.max(dim=dim)
    strides = (volume.shape[1] * volume.shape[2], volume.shape[2], 1)
    first, second = (d for d in range(3) if d != dim)
    rows = torch.arange(volume.shape[first], device=volume.device)[:, None] * strides[first]
    cols = torch.arange(volume.shape[second], device=volume.device)[None, :] * strides[second]
    return image, depth * strides[dim] + rows + cols


def orbit_mip(volume: torch.Tensor, geometry: VolumeGeometry, view: View) -> tuple[torch.Tensor, torch.Tensor]:
    """MIP of a [Z, Y, X] volume for a native-resolution orbit view, and the voxel behind each pixel.

    A pixel holds the voxels whose centres project (orthographically, along
    ``view.w``) nearest to its centre, and its value is their maximum: the
    definition of an axis view, where a pixel holds exactly the voxels of its
    ray.  A voxel coarser than the pixels along an axis also projects from
    points spread through its box along that axis (:func:`_voxel_offsets`), so
    it reaches every pixel its box covers.  Where the projected voxel lattice
    is still sparser than the pixel grid
    (e.g. the rows between the z planes of an anisotropic volume seen
    side-on), pixels whose ray crosses the box of voxel centres may hold no
    voxel; they take the value of their brightest 8-neighbour that holds one,
    repeated until none is left (3x3 max-dilation into empty pixels only), so
    a hole takes a value from its nearest hits.  Pixels that hold no voxel and
    whose ray misses the box get the volume's minimum.

    Returns
    -------
    image
        [H, W] MIP, dtype of ``volume``.
    index
        [H, W] int64 flat index into ``volume.reshape(-1)`` of the voxel that
        gives each pixel its value (the lowest index among equal maxima), so
        ``image == volume.reshape(-1)[index]``; -1 where no voxel does.
    """
    depth, height, width = volume.shape
    if volume.numel() >= 1 << _INDEX_BITS:
        raise ValueError(f"orbit targets support volumes of fewer than 2^{_INDEX_BITS} voxels, got {volume.numel()}")
    device = volume.device
    spacing, origin = geometry.spacing_xyz, np.asarray(view.origin)
    # Image coordinates of voxel (z, y, x) are affine in (x, y, z): col = cu . (x, y, z) + col0 (rows likewise).
    # The 0.5 makes floor() pick the nearest pixel centre; the 1 shifts pixels into a grid with a one-pixel
    # border, where clamping parks every voxel that projects off the image (cheaper than masking them).
    cu = np.asarray(view.u) * spacing / view.du
    cv = np.asarray(view.v) * spacing / view.dv
    col0 = 1.5 - float(np.asarray(view.u) @ origin) / view.du
    row0 = 1.5 - float(np.asarray(view.v) @ origin) / view.dv
    x = torch.arange(width, dtype=torch.float64, device=device)
    x_col, x_row = x * cu[0], x * cv[0]
    lines = volume.reshape(-1, width)  # one line of x per (z, y)
    padded = (view.height + 2, view.width + 2)
    keys = torch.full((padded[0] * padded[1],), _EMPTY, dtype=torch.int64, device=device)
    lines_per_chunk = max(1, _VOXELS_PER_CHUNK // width)
    for offset in _voxel_offsets(spacing, min(view.du, view.dv)):
        shift_col, shift_row = float(cu @ offset), float(cv @ offset)
        for l0 in range(0, depth * height, lines_per_chunk):
            l1 = min(depth * height, l0 + lines_per_chunk)
            line = torch.arange(l0, l1, device=device)
            z, y = (line // height).double(), (line % height).double()
            col = torch.add((col0 + shift_col + cu[1] * y + cu[2] * z)[:, None], x_col)
            row = torch.add((row0 + shift_row + cv[1] * y + cv[2] * z)[:, None], x_row)
            col = col.floor_().clamp_(0, padded[1] - 1)
            row = row.floor_().clamp_(0, padded[0] - 1)
            pixel = row.mul_(padded[1]).add_(col).long()  # exact in float64
            index = torch.arange(l0 * width, l1 * width, device=device)
            keys.scatter_reduce_(0, pixel.reshape(-1), _keys(lines[l0:l1].reshape(-1), index), reduce="amax")
    keys = _fill_holes(keys.reshape(padded)[1:-1, 1:-1], _rays_hit_box(geometry, view).to(device))
    index = _key_index(keys)
    image = torch.where(index >= 0, volume.reshape(-1)[index.clamp_min(0)], volume.min())
    return image, index


def _voxel_offsets(spacing_xyz: np.ndarray, pixel: float) -> list[np.ndarray]:
    """Points inside a voxel (voxel units, centred) that stand for its whole box at a ``pixel`` sampling.

    A voxel coarser than a pixel along an axis (z of an anisotropic stack) is
    cut into ``ceil(spacing / pixel)`` slices along it, so that its projection
    covers the pixels its box covers: with centres only, a neurite seen
    obliquely would break into one dash per z plane.
    """
    counts = [max(1, math.ceil(s / pixel - 1e-9)) for s in spacing_xyz]
    axes = [(np.arange(n) + 0.5) / n - 0.5 for n in counts]
    return [np.array(point) for point in np.array(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).T]


def native_mip(volume: torch.Tensor, geometry: VolumeGeometry, view: View) -> tuple[torch.Tensor, torch.Tensor]:
    """MIP and arg-max voxel index of a native-resolution view (see :func:`axis_mip_argmax`, :func:`orbit_mip`)."""
    return axis_mip_argmax(volume, view.name) if view.is_axis else orbit_mip(volume, geometry, view)


def resample_argmax(image: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Arg-max voxel index of a native MIP resampled to ``shape`` (as :func:`area_resample`).

    Each output pixel takes the voxel index of the brightest native pixel
    that overlaps its area (the lowest voxel index among equal values; a
    native pixel without a voxel, index -1, only where no other overlaps).
    """
    height, width = image.shape
    if (height, width) == tuple(shape):
        return index
    keys = torch.where(index >= 0, _keys(image, index.clamp_min(0)), _EMPTY)
    keys = torch.stack([keys[lo:hi].amax(0) for lo, hi in _overlaps(height, shape[0])])
    keys = torch.stack([keys[:, lo:hi].amax(1) for lo, hi in _overlaps(width, shape[1])], dim=1)
    return _key_index(keys)


def voxel_positions(index: torch.Tensor | np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """Physical (x, y, z) positions of voxel centres given by flat indices into a [Z, Y, X] volume.

    Returns
    -------
    np.ndarray
        float32 [..., 3]: ``(x, y, z) * geometry.spacing_xyz`` of the voxel
        with flat index ``z * Y * X + y * X + x``; NaN where the index is -1.
    """
    flat = torch.as_tensor(index).cpu().numpy()
    _, height, width = geometry.shape_zyx
    voxel = np.stack([flat % width, (flat // width) % height, flat // (width * height)], axis=-1)
    positions = (voxel * geometry.spacing_xyz).astype(np.float32)
    positions[flat < 0] = np.nan
    return positions


def volume_mips_and_peaks(
    volume: np.ndarray | torch.Tensor, geometry: VolumeGeometry, views: list[View]
) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Raw (unnormalised) MIPs of ``volume`` in ``views`` and their peak positions.

    Returns
    -------
    images
        One [H, W] MIP per view at its own resolution (native MIP, area-averaged).
    peaks
        One float32 [H, W, 3] array per view: physical (x, y, z) of the voxel
        centre that gives each pixel its value (for a resampled view, that of
        the brightest native pixel in its area, see :func:`resample_argmax`);
        NaN where no voxel does.
    """
    tensor = torch.as_tensor(np.asarray(volume, dtype=np.float32)) if isinstance(volume, np.ndarray) else volume
    images, peaks = [], []
    for view in views:
        native = native_view(view.name, geometry) if view.is_axis else _native_orbit(view, geometry)
        image, index = native_mip(tensor, geometry, native)
        images.append(area_resample(image.double(), view.shape).to(tensor.dtype))
        peaks.append(voxel_positions(resample_argmax(image, index, view.shape), geometry))
    return images, peaks


def _native_orbit(view: View, geometry: VolumeGeometry) -> View:
    return native_view(f"{view.azimuth}:{view.elevation}", geometry)


def _keys(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by value (as float32), then by lower voxel index: one ``amax`` finds both."""
    bits = values.to(torch.float32).contiguous().view(torch.int32)
    # Flipping the magnitude bits of negative floats (sign-extended by the shift) makes the int32 order the float
    # order; the index goes to the 32 free low bits, reversed so that lower indices win ties.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return torch.sub(_INDEX_MASK, index).add_(ordered, alpha=1 << _INDEX_BITS)


def _key_index(keys: torch.Tensor) -> torch.Tensor:
    """The voxel index in ``keys`` (inverse of :func:`_keys`); -1 for empty keys."""
    return torch.where(keys == _EMPTY, -1, _INDEX_MASK - (keys & _INDEX_MASK))


def _fill_holes(keys: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Give empty pixels of ``inside`` the largest key among their 8 neighbours, until none changes."""
    height, width = keys.shape
    while True:
        holes = inside & (keys == _EMPTY)
        if not bool(holes.any()):
            return keys
        padded = F.pad(keys, (1, 1, 1, 1), value=_EMPTY)
        best = torch.stack([padded[dr : dr + height, dc : dc + width] for dr in range(3) for dc in range(3)]).amax(0)
        fill = holes & (best != _EMPTY)
        # A hole whose nearest voxels lie beyond pixels outside the box (a sliver at the box's silhouette) keeps none.
        if not bool(fill.any()):
            return keys
        keys = torch.where(fill, best, keys)


def _rays_hit_box(geometry: VolumeGeometry, view: View) -> torch.Tensor:
    """[H, W] bool: whether the ray through each pixel centre crosses the (closed) box of voxel centres."""
    extent = geometry.extent_xyz
    tolerance = 1e-9 * max(float(extent.max()), 1.0)  # rays along a box face count as inside
    cols = np.arange(view.width) * view.du
    rows = np.arange(view.height)[:, None] * view.dv
    hit = np.ones(view.shape, dtype=bool)
    t_in = np.full(view.shape, -np.inf)
    t_out = np.full(view.shape, np.inf)
    # Slab method: along each axis the ray start + t w is within [0, extent] for t in an interval (or always/never).
    for axis, w in enumerate(view.w):
        start = view.origin[axis] + rows * view.v[axis] + cols * view.u[axis]
        low, high = -tolerance, extent[axis] + tolerance
        if abs(w) < 1e-12:
            hit &= (start >= low) & (start <= high)
        else:
            t_a, t_b = (low - start) / w, (high - start) / w
            t_in = np.maximum(t_in, np.minimum(t_a, t_b))
            t_out = np.minimum(t_out, np.maximum(t_a, t_b))
    return torch.as_tensor(hit & (t_in <= t_out))


def _overlaps(size_in: int, size_out: int) -> list[tuple[int, int]]:
    """Per output pixel, the range of input pixels that overlap its area (exact integer arithmetic)."""
    return [(i * size_in // size_out, -(-(i + 1) * size_in // size_out)) for i in range(size_out)]


def targets_from_volume(
    volume: np.ndarray,
    geometry: VolumeGeometry,
    view_specs: list[str],
    resolution: float | tuple[int, int] | None = None,
    normalization: Normalization | None = None,
) -> Targets:
    """Normalised MIP targets of a [Z, Y, X] volume in the views named by ``view_specs``, with their peak positions.

    See :func:`targets_for_views`.
    """
    return targets_for_views(volume, geometry, make_views(view_specs, geometry, resolution), normalization)


def targets_for_views(
    volume: np.ndarray,
    geometry: VolumeGeometry,
    views: list[View],
    normalization: Normalization | None = None,
    view_lows: list[float] | None = None,
    range_of: np.ndarray | None = None,
) -> Targets:
    """Normalised MIP targets of a [Z, Y, X] volume in ``views`` (e.g. those a checkpoint records).

    The normalisation is fitted on the axis MIPs at native resolution (the
    orbit views share it), so it does not depend on which views are trained;
    ``range_of`` (default: ``volume``) is the volume they are taken of: the raw
    stack when ``volume`` is its denoised copy, so that one stack has one
    range whether it is denoised or not.  ``view_lows`` (one per view, e.g. a
    fit's own) replace the per-view lows the rule would give.
    ``Targets.peaks`` is filled (see :func:`volume_mips_and_peaks`).
    """
    if view_lows is not None and len(view_lows) != len(views):
        raise ValueError(f"{len(view_lows)} view lows for {len(views)} views")
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"a target volume must be 3D (Z, Y, X), got shape {volume.shape}")
    if tuple(volume.shape) != geometry.shape_zyx:
        raise ValueError(f"volume shape {volume.shape} does not match geometry {geometry.shape_zyx}")
    if not np.isfinite(volume).all():
        raise ValueError("the target volume holds NaN/Inf values")
    normalization = normalization or Normalization()
    tensor = torch.as_tensor(volume.astype(np.float32, copy=False))
    if range_of is None:
        reference = [axis_mip(tensor, name).numpy() for name in AXIS_VIEWS]
    else:
        if np.shape(range_of) != volume.shape:
            raise ValueError(f"the volume of the range has shape {np.shape(range_of)}, not {volume.shape}")
        # Along each axis in turn: the values of the three axis MIPs (their layout does not matter here).
        reference = [np.asarray(range_of).max(axis=axis).astype(np.float32) for axis in range(3)]
    low, high = normalization.fit(reference)
    raw, peaks = volume_mips_and_peaks(tensor, geometry, views)
    raw_images = [image.numpy() for image in raw]
    raw_levels = [raw_level(image) for image in raw_images]
    lows = view_lows or [normalization.view_low(i, low, high, v) for i, v in zip(raw_images, raw_levels)]
    images = [_normalise(image, view_low, high) for image, view_low in zip(raw_images, lows)]
    # Orbit pixels whose rays miss the volume hold its minimum: no background, so not measured.
    missed = [np.isnan(p[..., 0]) for p in peaks]
    seen_levels = [
        raw_level(np.where(m, np.nan, image)) if m.any() else level
        for image, m, level in zip(raw_images, missed, raw_levels)
    ]
    levels = [normalised_level(level, view_low, high) for level, view_low in zip(seen_levels, lows)]
    return Targets(list(views), images, geometry, low, high, normalization, peaks, lows, levels)


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
    raw_levels = [raw_level(i) for i in images.values()]
    lows = [normalization.view_low(np.asarray(i), low, high, v) for i, v in zip(images.values(), raw_levels)]
    normalised = [_normalise(i, view_low, high) for i, view_low in zip(images.values(), lows)]
    levels = [normalised_level(v, view_low, high) for v, view_low in zip(raw_levels, lows)]
    return Targets(views, normalised, geometry, low, high, normalization, view_lows=lows, levels=levels)


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
