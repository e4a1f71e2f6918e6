"""Conversion between napari layers and core objects.

This is the one place where the core's (x, y, z) order meets napari's
(z, y, x) order:

* a Gaussian model becomes a Points layer whose data are the means in voxel
  units, (z, y, x), with ``scale`` = voxel spacing (z, y, x), so world
  coordinates are physical and line up with the target volume's Image layer;
  in a viewer whose volume has more axes (``ZCYX``) the points get those axes
  too (:func:`points_in_axes`), so they take no slider from the volume;
* the per-Gaussian parameters that napari does not draw (physical scales,
  rotation, amplitude) travel as layer *features*, so deleting or adding points
  keeps them aligned and a Points layer converts back to a model exactly;
* MIP images become 2D Image layers with ``scale`` = (dv, du), placed by
  :mod:`._layout`.

Nothing here imports Qt or napari: layers are described as napari
``LayerDataTuple`` triples ``(data, kwargs, layer_type)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..frames import Frame, VolumeGeometry
from ..model import GaussianModel
from ..views import AXIS_VIEWS, View
from ._layout import Label, Placement

LayerDataTuple = tuple[Any, dict[str, Any], str]

MODEL_KEY = "neurogs_model"
"""Layer metadata key holding what a Points layer of Gaussians needs to become a model again."""
ROLE_KEY = "neurogs_role"
"""Layer metadata key naming a live fit layer's role: ``target``, ``rendered`` or ``residual``."""
VIEW_KEY = "view"
"""Layer metadata key naming the view a 2D MIP layer shows (also written by the MIP writer)."""

PROJECTION_KEY = "neurogs_projection"
"""Layer metadata key marking the 2D xy projection of a Gaussian layer (a view of it, not a model)."""

ROLES = ("target", "rendered", "residual")
LABELS_ROLE = "labels"
"""Role of the text layer that names the live MIP layers on the canvas."""
RESIDUAL_COLORMAP = {
    "name": "neurogs residual",
    "colors": [[0.25, 0.65, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.55, 0.1, 1.0]],
    "controls": [0.0, 0.5, 1.0],
}
"""Diverging and black at 0 (a good fit is dark): blue where the render is too dark, orange where too bright."""
RESIDUAL_RANGE = 0.2
"""Residual contrast limits are +-this (targets span [0, 1]), symmetric so that 0 is the colormap's centre."""
SIGMA_COLUMNS = ("sigma_x", "sigma_y", "sigma_z")
QUATERNION_COLUMNS = ("qw", "qx", "qy", "qz")
AMPLITUDE_COLUMN = "amplitude"
DEFAULT_AMPLITUDE = 0.5
"""Amplitude given to points without one (e.g. drawn by hand in napari)."""

_VIEW_NAME = re.compile(r"(?:^|[\s_\-.])(xy|xz|yz|az[-+]?\d*\.?\d+_el[-+]?\d*\.?\d+)$", re.IGNORECASE)


# --------------------------------------------------------------------- axis order
def xyz_to_zyx(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """Reverse the last axis: core (x, y, z) columns to napari (z, y, x)."""
    return np.ascontiguousarray(np.asarray(array)[..., ::-1])


def zyx_to_xyz(array: np.ndarray | Sequence[float]) -> np.ndarray:
    """Reverse the last axis: napari (z, y, x) columns to core (x, y, z)."""
    return np.ascontiguousarray(np.asarray(array, dtype=np.float64)[..., ::-1])


def spatial_columns(ndim: int, axes: str | None = None) -> list[int]:
    """Columns (or scale entries) holding z, y, x: named by ``axes`` (``ZCYX``), else the last three."""
    if axes and len(axes) == ndim and all(a in axes for a in "ZYX"):
        return [axes.index(a) for a in "ZYX"]
    return list(range(max(ndim - 3, 0), ndim))


def spacing_from_scale(scale: Sequence[float] | None, axes: str | None = None) -> tuple[float, float, float]:
    """Voxel spacing (z, y, x) from a layer's ``scale``: its z, y, x entries (the last three unless ``axes`` says
    otherwise; 1.0 where missing)."""
    if scale is None:
        return (1.0, 1.0, 1.0)
    values = [float(s) for s in scale]
    values = [values[i] for i in spatial_columns(len(values), axes)] if len(values) >= 3 else values
    values = [1.0] * (3 - len(values)) + values
    return (values[0], values[1], values[2])


# -------------------------------------------------------------------- Gaussians
def model_to_points(
    model: GaussianModel,
    name: str = "gaussians",
    source: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> LayerDataTuple:
    """A Points layer of ``model``'s Gaussians.

    Parameters
    ----------
    model
        Gaussians in any frame, with a known ``geometry``.
    name
        Layer name.
    source
        File the model came from (kept in the layer metadata).
    extra
        More plain-typed metadata (e.g. the checkpoint family and iteration).

    Returns
    -------
    LayerDataTuple
        Points at the means, (z, y, x) voxel units, ``scale`` = spacing (z, y, x);
        point size ~ the Gaussian's mean diameter (2 sigma); face colour from the amplitude.
    """
    geometry = model.geometry
    if geometry is None:
        raise ValueError("the model's volume geometry is unknown; it cannot be placed in napari")
    physical = model.to_frame(Frame.PHYSICAL, geometry)
    spacing_xyz = geometry.spacing_xyz
    means = physical.means.detach().double().cpu().numpy()
    sigmas = torch.exp(physical.log_scales.detach().double()).cpu().numpy()
    quaternions = physical.quaternions.detach().double().cpu().numpy()
    amplitudes = torch.exp(physical.log_amplitudes.detach().double()).cpu().numpy()
    features = {
        AMPLITUDE_COLUMN: amplitudes,
        **{column: sigmas[:, i] for i, column in enumerate(SIGMA_COLUMNS)},
        **{column: quaternions[:, i] for i, column in enumerate(QUATERNION_COLUMNS)},
    }
    # napari draws a point's size in data units of the displayed axes; those are
    # voxels of the in-plane spacing, so express the diameter in x voxels.
    diameter = 2.0 * np.exp(np.log(sigmas).mean(axis=1)) / float(spacing_xyz[0])
    info: dict[str, Any] = {
        "frame": model.frame.value,
        "volume": geometry.to_dict(),
        "source": str(source) if source is not None else None,
        **dict(extra or {}),
    }
    top = float(amplitudes.max()) if amplitudes.size else 1.0
    kwargs = {
        "name": name,
        "scale": geometry.spacing_zyx,
        "size": diameter,
        "features": features,
        "face_color": AMPLITUDE_COLUMN,
        "face_colormap": "inferno",
        "face_contrast_limits": (0.0, top if top > 0 else 1.0),
        "border_width": 0.0,
        "opacity": 0.8,
        "metadata": {MODEL_KEY: info},
    }
    return xyz_to_zyx(means / spacing_xyz), kwargs, "points"


def points_to_model(
    data: np.ndarray,
    features: Any = None,
    metadata: Mapping[str, Any] | None = None,
    scale: Sequence[float] | None = None,
    size: np.ndarray | float | None = None,
) -> GaussianModel:
    """The model a Points layer stands for, in the frame it was loaded in.

    Parameters
    ----------
    data
        [N, D] point positions, voxel units: the z, y, x columns (the last three, or as
        ``metadata[MODEL_KEY]["axes"]`` names them, see :func:`points_in_axes`).
    features
        The layer's features table; missing columns get defaults (isotropic
        scale from ``size``, no rotation, amplitude :data:`DEFAULT_AMPLITUDE`).
    metadata
        The layer metadata; ``metadata[MODEL_KEY]`` gives the frame and volume.
        Without it (points drawn by hand) the volume is the points' bounding box
        and the model is stored in the NeuRoGS frame.
    scale
        The layer scale: voxel spacing (z, y, x).
    size
        Point sizes (diameters, x voxels), used where sigmas are missing.
    """
    points = np.asarray(data, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"a Gaussian layer needs 3D points (z, y, x); got data of shape {points.shape}")
    info = dict((metadata or {}).get(MODEL_KEY) or {})
    axes = info.get("axes") if isinstance(info.get("axes"), str) else None
    points = points[:, spatial_columns(points.shape[1], axes)]
    if len(points) == 0:
        raise ValueError("the points layer is empty: a model needs at least one Gaussian")
    spacing_zyx = spacing_from_scale(scale, axes)
    if isinstance(info.get("volume"), Mapping):
        shape_zyx = tuple(int(n) for n in info["volume"]["shape_zyx"])
    else:
        shape_zyx = tuple(int(n) for n in np.ceil(points.max(axis=0)).clip(min=0) + 1)
    geometry = VolumeGeometry(shape_zyx, spacing_zyx)
    table = _columns(features, len(points))
    spacing_xyz = geometry.spacing_xyz
    if all(c in table for c in SIGMA_COLUMNS):
        sigmas = np.stack([table[c] for c in SIGMA_COLUMNS], axis=1)
    else:
        diameters = np.broadcast_to(np.asarray(size if size is not None else 2.0, dtype=np.float64), (len(points),))
        sigmas = np.repeat((0.5 * diameters * float(spacing_xyz[0]))[:, None], 3, axis=1)
    if all(c in table for c in QUATERNION_COLUMNS):
        quaternions = np.stack([table[c] for c in QUATERNION_COLUMNS], axis=1)
    else:
        quaternions = np.tile([1.0, 0.0, 0.0, 0.0], (len(points), 1))
    amplitudes = table.get(AMPLITUDE_COLUMN, np.full(len(points), DEFAULT_AMPLITUDE))
    physical = GaussianModel(
        means=torch.as_tensor(zyx_to_xyz(points) * spacing_xyz, dtype=torch.float32),
        log_scales=torch.as_tensor(np.log(np.clip(sigmas, 1e-12, None)), dtype=torch.float32),
        quaternions=torch.as_tensor(quaternions, dtype=torch.float32),
        log_amplitudes=torch.as_tensor(np.log(np.clip(amplitudes, 1e-30, None)), dtype=torch.float32),
        frame=Frame.PHYSICAL,
        geometry=geometry,
    )
    return physical.to_frame(Frame.parse(info.get("frame") or Frame.NEUROGS), geometry)


def _columns(features: Any, count: int) -> dict[str, np.ndarray]:
    """Numeric feature columns of the right length, by name (a DataFrame or a mapping)."""
    if features is None:
        return {}
    names = list(features.columns) if hasattr(features, "columns") else list(features)
    found = {}
    for name in names:
        values = np.asarray(features[name], dtype=np.float64) if _numeric(features[name]) else None
        if values is not None and values.shape == (count,) and np.isfinite(values).all():
            found[str(name)] = values
    return found


def _numeric(column: Any) -> bool:
    try:
        return np.asarray(column).dtype.kind in "biuf"
    except (TypeError, ValueError):
        return False


def points_in_axes(
    layer: LayerDataTuple, axes: str, picks: Mapping[int, int], scale: Sequence[float], translate: Sequence[float]
) -> LayerDataTuple:
    """A 3D Points layer of :func:`model_to_points` given the axes of the volume it was fitted to.

    napari lines layers up by their last axes, so a (z, y, x) layer beside a
    (z, c, y, x) volume would take the volume's channel slider for its z.  Here
    each point gets a column per axis of the volume: z, y, x where the volume
    has them, and the index the volume was picked at (``picks``, by position)
    elsewhere, with the volume's ``scale`` and ``translate`` on those axes.

    Parameters
    ----------
    layer
        The (z, y, x) Points layer.
    axes
        The volume layer's axes (e.g. ``ZCYX``).
    picks
        Index along each non-spatial axis, by position.
    scale, translate
        The volume layer's scale and translate (all its axes).
    """
    data, kwargs, kind = layer
    points = np.asarray(data, dtype=np.float64)
    if axes == "ZYX":
        return points, {**kwargs, "translate": tuple(float(t) for t in translate)}, kind
    full = np.empty((len(points), len(axes)), dtype=np.float64)
    full_scale = [float(s) for s in scale]
    spatial = spatial_columns(len(axes), axes)
    for column, position in enumerate(spatial):
        full[:, position] = points[:, column]
        full_scale[position] = float(kwargs["scale"][column])
    for position, index in picks.items():
        full[:, position] = float(index)
    metadata = dict(kwargs.get("metadata") or {})
    metadata[MODEL_KEY] = {**dict(metadata.get(MODEL_KEY) or {}), "axes": axes}
    embedded = {**kwargs, "scale": tuple(full_scale), "translate": tuple(float(t) for t in translate)}
    embedded["metadata"] = metadata
    embedded["axis_labels"] = tuple(a.lower() for a in axes)
    return full, embedded, kind


def xy_projection(layer: LayerDataTuple) -> LayerDataTuple:
    """The Gaussians of a (z, y, x) Points layer seen from above: 2D points at (y, x), every one of them.

    napari 0.9 draws a 3D Points layer in a 2D view one z slice at a time (only the
    points within half a voxel of it; thick slices are a viewer setting), which shows
    a few of the Gaussians; this layer shows the whole model over the xy MIP.
    """
    data, kwargs, _ = layer
    points = np.asarray(data, dtype=np.float64)
    keep = ("size", "features", "face_color", "face_colormap", "face_contrast_limits", "border_width")
    projected = {key: kwargs[key] for key in keep if key in kwargs}
    projected.update(
        name=f"{kwargs.get('name', 'gaussians')} (xy projection)",
        scale=tuple(kwargs["scale"])[-2:],
        opacity=0.5,
        visible=True,
        metadata={PROJECTION_KEY: str(kwargs.get("name", ""))},
    )
    return np.ascontiguousarray(points[:, -2:]), projected, "points"


def is_model_layer(metadata: Mapping[str, Any] | None) -> bool:
    """Whether a layer's metadata marks it as a Gaussian model layer of ours."""
    return isinstance((metadata or {}).get(MODEL_KEY), Mapping)


def field_image(model: GaussianModel, name: str = "field") -> LayerDataTuple:
    """An Image layer of the model's exact summed field on its voxel grid (may be slow for big models)."""
    from ..render.field import voxelize

    geometry = model.geometry
    if geometry is None:
        raise ValueError("the model's volume geometry is unknown; it cannot be voxelised")
    with torch.no_grad():
        volume = voxelize(model.to_frame(Frame.PHYSICAL, geometry), geometry).cpu().numpy()
    kwargs = {
        "name": name,
        "scale": geometry.spacing_zyx,
        "colormap": "magma",
        "blending": "additive",
        "contrast_limits": (0.0, max(float(volume.max()), 1e-6)),
        "metadata": {"neurogs_field": True},
    }
    return volume.astype(np.float32, copy=False), kwargs, "image"


def volume_image(volume: np.ndarray, geometry: VolumeGeometry, name: str) -> LayerDataTuple:
    """An Image layer of a (z, y, x) volume in physical world units."""
    kwargs = {"name": name, "scale": geometry.spacing_zyx, "colormap": "gray", "metadata": {}}
    return np.asarray(volume), kwargs, "image"


# ------------------------------------------------------------------ MIP layers
def mip_layer(image: np.ndarray, view: View, role: str, placement: Placement) -> LayerDataTuple:
    """A live fit layer ``"<role> <view>"``: targets and renders on [0, 1], residuals on a diverging colormap
    centred at 0 (:data:`RESIDUAL_COLORMAP`, +-:data:`RESIDUAL_RANGE`)."""
    if role not in ROLES:
        raise ValueError(f"unknown layer role {role!r}; expected one of {ROLES}")
    residual = role == "residual"
    kwargs = {
        "name": f"{role} {view.name}",
        "scale": placement.scale,
        "translate": placement.translate,
        "colormap": RESIDUAL_COLORMAP if residual else ("gray" if role == "target" else "inferno"),
        "contrast_limits": (-RESIDUAL_RANGE, RESIDUAL_RANGE) if residual else (0.0, 1.0),
        "metadata": {VIEW_KEY: view.name, ROLE_KEY: role},
    }
    return np.asarray(image, dtype=np.float32), kwargs, "image"


def labels_layer(labels: Sequence[Label], name: str = "view labels") -> LayerDataTuple:
    """A 2D Points layer that only writes text: each label above its position, in screen-sized letters."""
    data = np.asarray([label.position for label in labels], dtype=np.float64).reshape(-1, 2)
    kwargs = {
        "name": name,
        "size": 0.0,
        "features": {"label": [label.text for label in labels]},
        "text": {"string": "{label}", "anchor": "upper_left", "color": "white", "size": 9},
        "face_color": "transparent",
        "border_color": "transparent",
        "border_width": 0.0,
        "metadata": {ROLE_KEY: LABELS_ROLE},
    }
    return data, kwargs, "points"


def residual(rendered: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Signed display residual ``rendered - target`` (what the fit still gets wrong)."""
    return np.asarray(rendered, dtype=np.float32) - np.asarray(target, dtype=np.float32)


def mip_view_name(name: str, metadata: Mapping[str, Any] | None) -> str | None:
    """The view a 2D image layer shows: its ``view`` metadata, else a view name ending the layer name."""
    metadata = metadata or {}
    if isinstance(metadata.get(VIEW_KEY), str):
        return str(metadata[VIEW_KEY])
    match = _VIEW_NAME.search(name.strip())
    return match.group(1).lower() if match else None


def mip_pixel_sizes(scale: Sequence[float] | None) -> tuple[float, float]:
    """Pixel size (rows, columns) of a 2D MIP layer: its scale, which is what napari shows."""
    values = [float(s) for s in (scale if scale is not None else (1.0, 1.0))][-2:]
    return values[0], values[1]


def spacing_from_mips(pixel_sizes: Mapping[str, tuple[float, float]]) -> tuple[float, float, float]:
    """Voxel spacing (z, y, x) implied by the pixel sizes of axis MIPs (1.0 for axes none shows).

    An axis view's name is its (columns, rows) axes: ``xy`` rows/columns are y/x,
    ``xz`` z/x, ``yz`` z/y (see :mod:`napari_neurogs_mip.views`).
    """
    found: dict[str, float] = {}
    for name, (rows, cols) in pixel_sizes.items():
        if name in AXIS_VIEWS:
            found.setdefault(name[1], rows)
            found.setdefault(name[0], cols)
    return (found.get("z", 1.0), found.get("y", 1.0), found.get("x", 1.0))


def full_resolution(data: Any) -> Any:
    """The full-resolution level of an image layer's data (multiscale data is a list of levels)."""
    return data[0] if isinstance(data, (list, tuple)) else data
