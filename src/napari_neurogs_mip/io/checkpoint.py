"""Checkpoint files of the NeuRoGS family: load every known layout, save one that all can read.

Loading accepts (see ``docs/formats.md``):

=====================  ==========================================  ========  ==========
family                 layout                                      frame     amplitude
=====================  ==========================================  ========  ==========
neurogs-v7             the 4 tensors at the top level              neurogs   exp
end-to-end             ``model_state_dict`` holding the 4 tensors  unit      exp
splat                  ``log_intensities`` instead of amplitudes   neurogs   sigmoid
napari-neurogs-mip     ours: end-to-end layout + ``metadata``      stored    exp
=====================  ==========================================  ========  ==========

Files are read with ``torch.load(weights_only=True)``: nothing but tensors and
plain values is ever unpickled.  Saving keeps the 4 NeuRoGS tensor names under
``model_state_dict`` in the model's own frame, with plain-typed metadata
beside them, and is atomic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..frames import Frame, VolumeGeometry
from ..model import PARAMETER_NAMES, GaussianModel
from .atomic import atomic_path

FORMAT_NAME = "napari-neurogs-mip"
FORMAT_VERSION = 1
DEFAULT_GRID = 128
"""Voxels per axis assumed for a normalised-frame file that records no volume shape."""

_WRAPPERS = ("model_state_dict", "state_dict", "model", "gaussians")
_ALIASES = {
    "means": ("means", "xyz", "positions", "mu"),
    "log_scales": ("log_scales", "scales_log"),
    "quaternions": ("quaternions", "quats", "rotations", "rotation"),
    "log_amplitudes": ("log_amplitudes", "log_amplitude", "log_amps"),
    "log_intensities": ("log_intensities", "log_intensity"),
}
_EXPECTED = (
    "expected one of: {means, log_scales, quaternions, log_amplitudes} (NeuRoGS v7) at the top level or under "
    "'model_state_dict'; or {means, log_scales, quaternions, log_intensities} (splat trainer)"
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a NeuRoGS-family model."""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes
    ----------
    model
        The Gaussians in the file's frame; ``model.geometry`` is set when the file
        (or the caller) tells the volume.
    family
        Which layout the file had.
    geometry_source
        Where ``model.geometry`` came from (for messages).
    metadata
        Our plain-typed metadata (empty for foreign files).
    optimizer_state
        Adam state of the fit this file came from (ours only), else ``None``.
    fit_model
        The parameters exactly as the optimiser held them (physical frame), ours only, and only
        when loaded for the volume the fit ran on.
    iteration
        Iteration the file was written at (0 when unknown).
    density_state
        Density-control statistics of the fit (ours only, with ``fit_model``), for exact resuming.
    """

    model: GaussianModel
    family: str
    geometry_source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    fit_model: GaussianModel | None = None
    iteration: int = 0
    density_state: dict[str, torch.Tensor] | None = None


def _read(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the (weights-only) unpickler raises many types, e.g. KeyError on text files
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: truncated, corrupt, not a torch.save file, "
            f"or holding objects other than tensors and plain values ({type(error).__name__})"
        ) from error


def _find(tensors: dict[str, Any], name: str) -> tuple[str, torch.Tensor] | None:
    for alias in _ALIASES[name]:
        for key, value in tensors.items():
            if isinstance(value, torch.Tensor) and (key == alias or key.endswith("." + alias)):
                return key, value
    return None


def _describe_keys(data: dict[str, Any]) -> str:
    parts = []
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{key} {list(value.shape)}")
        elif isinstance(value, dict):
            parts.append(f"{key} {{{', '.join(map(str, list(value)[:8]))}{', ...' if len(value) > 8 else ''}}}")
        else:
            parts.append(str(key))
    return ", ".join(parts) or "(none)"


def load_checkpoint(path: str | os.PathLike, geometry: VolumeGeometry | None = None) -> Checkpoint:
    """Load a checkpoint of any NeuRoGS family.

    Parameters
    ----------
    path
        The ``.pt``/``.pth`` file.
    geometry
        The target volume, when known: it fixes the extent of normalised frames
        and wins over anything the file says.

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        Not a torch file, truncated, an unknown layout (the message lists the keys
        found and expected), wrong shapes, NaN/Inf or no Gaussians.
    """
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors; {_EXPECTED}")
    if {"quats", "logit_opacity"} <= set(data) or "features" in data:
        raise CheckpointError(
            f"{path} is a 3DGS-style colour model (keys: {_describe_keys(data)}), not a MIP intensity model; {_EXPECTED}"
        )
    container, family = data, "neurogs-v7"
    for wrapper in _WRAPPERS:
        if isinstance(data.get(wrapper), dict):
            container, family = data[wrapper], "end-to-end"
            break
    found = {name: _find(container, name) for name in _ALIASES}
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    ours = metadata.get("format") == FORMAT_NAME
    missing = [n for n in ("means", "log_scales", "quaternions") if found[n] is None]
    if missing or (found["log_amplitudes"] is None and found["log_intensities"] is None):
        raise CheckpointError(f"{path}: unknown checkpoint layout; found keys: {_describe_keys(data)}; {_EXPECTED}")
    tensors = {name: found[name][1].detach().float() for name in ("means", "log_scales", "quaternions")}
    if found["log_amplitudes"] is not None:
        tensors["log_amplitudes"] = found["log_amplitudes"][1].detach().float()
        frame = Frame.UNIT if family == "end-to-end" else Frame.NEUROGS
    else:
        # Splat trainer: amplitude = sigmoid(log_intensities); log(sigmoid(x)) = -softplus(-x).
        tensors["log_amplitudes"] = -torch.nn.functional.softplus(-found["log_intensities"][1].detach().float())
        family, frame = "splat", Frame.NEUROGS
    if tensors["log_amplitudes"].ndim == 2 and tensors["log_amplitudes"].shape[1] == 1:
        tensors["log_amplitudes"] = tensors["log_amplitudes"][:, 0]
    if ours:
        family, frame = FORMAT_NAME, Frame.parse(metadata.get("frame", "physical"))
    geometry, source = _geometry(data, metadata, tensors["means"], frame, geometry)
    try:
        model = GaussianModel(**tensors, frame=frame, geometry=geometry)
    except ValueError as error:
        raise CheckpointError(f"{path} ({family} layout): {error}") from error
    checkpoint = Checkpoint(model, family, source, metadata if ours else {}, iteration=_iteration(data))
    fitted_on = metadata.get("volume")
    same_volume = not isinstance(fitted_on, dict) or VolumeGeometry.from_dict(fitted_on) == geometry
    # The optimiser's parameters live in the physical frame of the volume the fit ran on: on another
    # volume they would be wrong, so the fit restarts from the mapped model instead of resuming.
    if ours and same_volume and isinstance(data.get("fit_state"), dict):
        fit = data["fit_state"]
        checkpoint.fit_model = GaussianModel(**{n: fit[n].float() for n in PARAMETER_NAMES}, frame=Frame.PHYSICAL,
                                             geometry=geometry)  # fmt: skip
        checkpoint.optimizer_state = data.get("optimizer_state_dict")
        density = data.get("density_state")
        if isinstance(density, dict) and all(isinstance(t, torch.Tensor) for t in density.values()):
            checkpoint.density_state = density
    return checkpoint


def _iteration(data: dict[str, Any]) -> int:
    for key in ("iteration", "step", "epoch"):
        if isinstance(data.get(key), (int, float)):
            return int(data[key])
    return 0


def _geometry(
    data: dict[str, Any],
    metadata: dict[str, Any],
    means: torch.Tensor,
    frame: Frame,
    given: VolumeGeometry | None,
) -> tuple[VolumeGeometry | None, str]:
    """The volume the file refers to and where that came from."""
    if given is not None:
        return given, "target volume"
    if isinstance(metadata.get("volume"), dict):
        return VolumeGeometry.from_dict(metadata["volume"]), "checkpoint metadata"
    shape = data.get("vol_shape")
    if isinstance(shape, (tuple, list, torch.Tensor)) and len(shape) == 3:
        return VolumeGeometry(tuple(int(n) for n in shape)), "vol_shape in the file"
    aabb = data.get("aabb")
    if isinstance(aabb, torch.Tensor) and tuple(aabb.shape) == (3, 2):
        sides = (aabb[:, 1] - aabb[:, 0]).double().numpy()
        if np.all(sides >= 1):
            shape_xyz = np.round(sides).astype(int) + 1
            return VolumeGeometry(tuple(int(n) for n in shape_xyz[::-1])), "aabb in the file (taken as voxel units)"
    finite = means[torch.isfinite(means).all(dim=1)]
    if frame in (Frame.VOXEL, Frame.PHYSICAL) and finite.numel():
        top = np.ceil(finite.double().amax(0).numpy()).clip(min=0) + 1
        return VolumeGeometry(tuple(int(n) for n in top[::-1])), "bounding box of the means (no volume recorded)"
    if frame in (Frame.NEUROGS, Frame.UNIT):
        return (
            VolumeGeometry((DEFAULT_GRID,) * 3),
            f"assumed {DEFAULT_GRID}^3 voxel grid (the file records no volume shape; give a target to map it)",
        )
    return None, "unknown"


def save_checkpoint(
    path: str | os.PathLike,
    model: GaussianModel,
    *,
    fit_model: GaussianModel | None = None,
    optimizer_state: dict[str, Any] | None = None,
    iteration: int = 0,
    loss: float | None = None,
    extra: dict[str, Any] | None = None,
    density_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (in its own frame) with metadata, atomically.

    Parameters
    ----------
    path
        Destination file; its folder must exist.
    model
        The model in the frame it should be stored in (usually the frame it came in).
    fit_model, optimizer_state
        The optimiser's view of the parameters and its state, for exact resuming.
    iteration, loss
        Progress of the fit.
    extra
        Plain-typed metadata (views, config, seed, loss history, normalisation, ...).
    density_state
        Per-Gaussian density-control statistics (tensors), for exact resuming.
    """
    from .. import __version__

    model.validate()
    metadata: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "frame": model.frame.value,
        "volume": model.geometry.to_dict() if model.geometry else None,
        "package_version": __version__,
        "torch_version": torch.__version__,
    }
    metadata.update(extra or {})
    metadata = _plain(metadata, "metadata")
    payload: dict[str, Any] = {
        "model_state_dict": {n: t.detach().cpu().float().contiguous() for n, t in model.tensors().items()},
        "num_gaussians": model.num_gaussians,
        "iteration": int(iteration),
        "metadata": metadata,
    }
    if loss is not None:
        payload["loss"] = float(loss)
    if model.geometry is not None:
        payload["vol_shape"] = tuple(model.geometry.shape_zyx)
    if fit_model is not None:
        payload["fit_state"] = {n: t.detach().cpu().float().contiguous() for n, t in fit_model.tensors().items()}
    if optimizer_state is not None:
        payload["optimizer_state_dict"] = _to_cpu(optimizer_state)
    if density_state:
        payload["density_state"] = _to_cpu(density_state)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain Python types (what ``weights_only`` loading accepts), or ``TypeError``."""
    if value is None:
        return None
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            # Exact built-in types: subclasses (e.g. torch.__version__) are not loadable.
            return kind(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"checkpoint {where} holds a {type(value).__name__}; only plain types can be saved")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
