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

Loading refuses, with a :class:`CheckpointError` that names the file and the
key, anything a command would otherwise trip over later or use silently wrong:

* parameters a float32 render cannot represent.  The accepted ranges hold in the
  file's own frame (voxel, micrometre, or volume-sized normalised units):
  ``means`` within +-:data:`MEAN_LIMIT`, ``log_scales`` within
  :data:`LOG_SCALE_RANGE`, ``log_amplitudes`` within :data:`LOG_AMPLITUDE_RANGE`,
  quaternion rows of norm at most :data:`QUATERNION_NORM_LIMIT` (and not zero);
* an iteration that is not a whole number in ``[0, MAX_ITERATION]``;
* a malformed ``metadata`` volume, frame, views, renderer or normalisation, or a
  ``vol_shape`` that is not 3 positive whole numbers;
* our resume state (``fit_state``, ``optimizer_state_dict``, ``density_state``)
  when it does not match the model: missing or mistyped tensors, another number
  of Gaussians, Adam groups other than one per parameter, moments of the wrong
  shape, or bad Adam settings.  So a resumed fit never fails after it started.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
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

MEAN_LIMIT = 1e7
"""Largest ``|mean|`` coordinate, frame units: 10 m in micrometres, 1e7 voxels, or 1e7 volumes in a normalised
frame.  float32 still resolves a unit there, and such a mean mapped to micrometres (at most some 1e5 times larger),
then to pixels as small as 1e-5 um, and squared stays below 1e36, under the float32 maximum of 3.4e38."""
LOG_SCALE_RANGE = (-20.0, 10.0)
"""Accepted natural log of a Gaussian's standard deviations, frame units.  A render works in pixels: the projected
variance is ``exp(2 s)`` times the square of the frame unit in pixels, and the torch renderer forms the determinant
of that 2x2 covariance in float32.  For a frame unit of up to 1e5 pixels (a whole volume 1e5 pixels wide in the
unit frame; a micrometre at 1e-5 um pixels) and ``s <= 10`` the determinant stays below 3e37, under the float32
maximum of 3.4e38.  Measured with such a view: the torch and cpu renderers agree to 1e-6 up to ``s = 11`` and
differ by 26% at ``s = 12``, where torch loses the Gaussian and the cpu renderer (float64 inside) draws it.
``exp(2 * -20) = 4e-18`` is far above float32's smallest normal number (1.2e-38), and the pixel filter draws so
small a Gaussian as a dot.  Real files hold -8.2 to -2.3 (normalised frames); fits clamp to
[log(spacing / 4), log(longest side)]."""
LOG_AMPLITUDE_RANGE = (-30.0, 10.0)
"""Accepted natural log of the peak intensities (targets are normalised to [0, 1]; fits clamp to [-10, 6]).  The
cpu renderer's soft MIP forms ``exp(beta (g - m))`` in float32, where ``g`` and the running maximum ``m`` of
near-equal Gaussians differ by rounding (relative 1.2e-7): ``beta g 1.2e-7`` must stay far below 88, where exp
overflows.  At the default beta of 200, log-amplitudes of 14 gave Inf pixels (the torch renderer: finite ones) and
``log_amplitudes = 1e4`` an image of NaN; at 10 the two agree to 2e-7 for any beta up to 4000 (they part at 8000).
``exp(-30) = 9e-14`` is still a normal float32 number."""
QUATERNION_NORM_LIMIT = 1e8
"""Largest norm of a quaternion row: its square, formed in float32 to normalise it, stays far below 3.4e38.  Zero
rows (no rotation) are refused by :class:`~napari_neurogs_mip.model.GaussianModel`."""
MAX_ITERATION = 10**9
"""Largest iteration a file may record: fits run thousands of steps; a billion would take months."""

_WRAPPERS = ("model_state_dict", "state_dict", "model", "gaussians")
_ALIASES = {
    "means": ("means", "xyz", "positions", "mu"),
    "log_scales": ("log_scales", "scales_log"),
    "quaternions": ("quaternions", "quats", "rotations", "rotation"),
    "log_amplitudes": ("log_amplitudes", "log_amplitude", "log_amps"),
    "log_intensities": ("log_intensities", "log_intensity"),
}
_FRAMES = f"a frame name: {', '.join(f.value for f in Frame)}"
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


class _MalformedError(Exception):
    """A value that is not what its key should hold; turned into a :class:`CheckpointError` naming the file."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        super().__init__(key)
        self.key, self.value, self.expected = key, value, expected

    def error(self, path: Path) -> CheckpointError:
        return CheckpointError(f"{path}: {self.key} is {_describe(self.value)}; expected {self.expected}")


_MISSING = object()
"""Stands for an absent key in messages."""


def _describe(value: Any) -> str:
    """A short description of a stored value, for messages."""
    if value is _MISSING:
        return "missing"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    if isinstance(value, (dict, list, tuple)) and len(repr(value)) > 80:
        return f"a {type(value).__name__} of {len(value)} entries"
    return repr(value)


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
        found and expected), wrong shapes, NaN/Inf, values out of range, no Gaussians,
        or malformed metadata, iteration or resume state (see the module docstring).
    """
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors; {_EXPECTED}")
    if {"quats", "logit_opacity"} <= set(data) or "features" in data:
        raise CheckpointError(
            f"{path} is a 3DGS-style colour model (keys: {_describe_keys(data)}), not a MIP intensity model; {_EXPECTED}"
        )
    container, family, prefix = data, "neurogs-v7", ""
    for wrapper in _WRAPPERS:
        if isinstance(data.get(wrapper), dict):
            container, family, prefix = data[wrapper], "end-to-end", f"{wrapper}."
            break
    found = {name: _find(container, name) for name in _ALIASES}
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    ours = metadata.get("format") == FORMAT_NAME
    missing = [n for n in ("means", "log_scales", "quaternions") if found[n] is None]
    if missing or (found["log_amplitudes"] is None and found["log_intensities"] is None):
        raise CheckpointError(f"{path}: unknown checkpoint layout; found keys: {_describe_keys(data)}; {_EXPECTED}")
    tensors = {name: found[name][1].detach().float() for name in ("means", "log_scales", "quaternions")}
    keys = {name: prefix + found[name][0] for name in ("means", "log_scales", "quaternions")}
    if found["log_amplitudes"] is not None:
        tensors["log_amplitudes"] = found["log_amplitudes"][1].detach().float()
        keys["log_amplitudes"] = prefix + found["log_amplitudes"][0]
        frame = Frame.UNIT if family == "end-to-end" else Frame.NEUROGS
    else:
        # Splat trainer: amplitude = sigmoid(log_intensities); log(sigmoid(x)) = -softplus(-x).
        tensors["log_amplitudes"] = -torch.nn.functional.softplus(-found["log_intensities"][1].detach().float())
        keys["log_amplitudes"] = f"{prefix}{found['log_intensities'][0]} (as log-amplitudes, log sigmoid)"
        family, frame = "splat", Frame.NEUROGS
    if tensors["log_amplitudes"].ndim == 2 and tensors["log_amplitudes"].shape[1] == 1:
        tensors["log_amplitudes"] = tensors["log_amplitudes"][:, 0]
    try:
        if ours:
            family, frame = FORMAT_NAME, _checked(_frame, "metadata.frame", metadata.get("frame", "physical"), _FRAMES)
            _check_metadata(metadata)
        elif "volume" in metadata:
            _check_volume("metadata.volume", metadata["volume"])
        if data.get("vol_shape") is not None:  # checked even when the caller's volume wins: the file is broken
            _shape("vol_shape", data["vol_shape"])
        iteration = _iteration(data)
        model = _model(path, f"{family} layout", tensors, frame, keys)
        geometry, source = _geometry(data, metadata, model.means, frame, geometry)
        checkpoint = Checkpoint(
            model.with_geometry(geometry) if geometry is not None else model,
            family, source, metadata if ours else {}, iteration=iteration,
        )  # fmt: skip
        if ours:
            _resume_state(path, data, checkpoint, metadata.get("volume"))
    except _MalformedError as malformed:
        raise malformed.error(path) from None
    return checkpoint


def _model(
    path: Path, where: str, tensors: dict[str, torch.Tensor], frame: Frame, keys: dict[str, str]
) -> GaussianModel:
    """The model of ``tensors`` (shapes, finiteness and ranges checked; ``keys`` name them as stored)."""
    try:
        model = GaussianModel(**tensors, frame=frame)
    except ValueError as error:
        raise CheckpointError(f"{path} ({where}): {error}") from error
    limits = {"means": (-MEAN_LIMIT, MEAN_LIMIT), "log_scales": LOG_SCALE_RANGE, "log_amplitudes": LOG_AMPLITUDE_RANGE}
    for name, (low, high) in limits.items():
        _check_range(path, keys[name], getattr(model, name), low, high, "values")
    norms = model.quaternions.double().norm(dim=-1)
    _check_range(path, keys["quaternions"], norms, 0.0, QUATERNION_NORM_LIMIT, "row norms")
    return model


def _check_range(path: Path, key: str, values: torch.Tensor, low: float, high: float, what: str) -> None:
    """Refuse values outside ``[low, high]``, naming how many and the worst (the module docstring says why)."""
    excess = torch.maximum(low - values.double(), values.double() - high)
    count = int((excess > 0).sum())
    if count:
        worst = float(values.reshape(-1)[excess.reshape(-1).argmax()])
        raise CheckpointError(
            f"{path}: {key}: {count} of {values.numel()} {what} lie outside [{low:g}, {high:g}] (worst {worst:.6g}), "
            f"beyond what a float32 render represents (the accepted ranges are explained in {__name__})"
        )


def _checked(check: Callable[[Any], Any], key: str, value: Any, expected: str) -> Any:
    """``check(value)``; its ``ValueError``, ``TypeError`` or ``KeyError`` is reported as a malformed ``key``."""
    try:
        return check(value)
    except (ValueError, TypeError, KeyError) as error:
        raise _MalformedError(key, value, f"{expected} ({type(error).__name__}: {error})") from None


def _frame(value: Any) -> Frame:
    if not isinstance(value, str):
        raise TypeError(f"got a {type(value).__name__}")
    return Frame.parse(value)


def _is_whole(value: Any) -> bool:
    """Whether ``value`` is a whole number (``7`` or ``7.0``; not ``True``, ``7.5`` or ``inf``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return False
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or value.is_integer()


def _is_number(value: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    """Whether ``value`` is a finite real number in ``[low, high]`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and low <= value <= high


def _shape(key: str, value: Any) -> tuple[int, int, int]:
    """A volume shape: 3 positive whole numbers (any size: whether it is affordable is not a format question)."""
    entries = value.tolist() if isinstance(value, torch.Tensor) and value.ndim == 1 else value
    if not (isinstance(entries, (list, tuple)) and len(entries) == 3 and all(_is_whole(n) and n >= 1 for n in entries)):
        raise _MalformedError(key, value, "3 positive whole numbers (Z, Y, X)")
    return (int(entries[0]), int(entries[1]), int(entries[2]))


def _check_volume(key: str, value: Any) -> None:
    """``None`` (unknown) or ``{"shape_zyx": 3 positive whole numbers, "spacing_zyx": 3 positive numbers}``."""
    if value is None:
        return
    if not isinstance(value, dict) or "shape_zyx" not in value:
        raise _MalformedError(
            key, value, "None or a dict with 'shape_zyx' (3 positive whole numbers) and 'spacing_zyx'"
        )
    _shape(f"{key}.shape_zyx", value["shape_zyx"])
    spacing = value.get("spacing_zyx", (1.0, 1.0, 1.0))
    if not (isinstance(spacing, (list, tuple)) and len(spacing) == 3 and all(_is_number(s, 1e-300) for s in spacing)):
        raise _MalformedError(f"{key}.spacing_zyx", spacing, "3 positive finite numbers (z, y, x)")


def _check_views(key: str, value: Any) -> None:
    """A list of views as :meth:`View.to_dict` writes them."""
    from ..views import View

    if not isinstance(value, list):
        raise _MalformedError(key, value, "a list of views")
    for index, entry in enumerate(value):
        view = _checked(lambda v: View.from_dict(dict(v)), f"{key}[{index}]", entry, "a view as View.to_dict writes it")
        sane = isinstance(view.name, str) and view.height >= 1 and view.width >= 1
        if not (sane and _is_number(view.du, 1e-300) and _is_number(view.dv, 1e-300)):
            raise _MalformedError(
                f"{key}[{index}]", entry, "a view with a name, a positive size and positive pixel sizes"
            )


def _check_renderer(key: str, value: Any) -> None:
    from ..render import MODES

    if not isinstance(value, dict):
        raise _MalformedError(key, value, "a dict of render settings")
    if value.get("mode") is not None and value["mode"] not in MODES:
        raise _MalformedError(f"{key}.mode", value["mode"], f"one of {MODES}")
    if value.get("beta") is not None and not _is_number(value["beta"], 1e-300):
        raise _MalformedError(f"{key}.beta", value["beta"], "a positive finite number")


def _check_normalization(key: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _MalformedError(key, value, "a dict with 'low' and 'high'")
    for name in ("low", "high"):
        if name in value and not _is_number(value[name]):
            raise _MalformedError(f"{key}.{name}", value[name], "a finite number")
    lows = value.get("view_lows", {})
    if not (isinstance(lows, dict) and all(_is_number(v) for v in lows.values())):
        raise _MalformedError(f"{key}.view_lows", lows, "a dict of view name -> finite number")


def _check_loss_history(key: str, value: Any) -> None:
    if not (isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise _MalformedError(key, value, "a list of numbers")


_METADATA_CHECKS = {
    "volume": _check_volume,
    "views": _check_views,
    "eval_views": _check_views,
    "renderer": _check_renderer,
    "normalization": _check_normalization,
    "loss_history": _check_loss_history,
}
"""Metadata keys the commands read, and their checks (each raises :class:`_MalformedError`)."""


def _check_metadata(metadata: dict[str, Any]) -> None:
    for name, check in _METADATA_CHECKS.items():
        if name in metadata:
            check(f"metadata.{name}", metadata[name])


def _iteration(data: dict[str, Any]) -> int:
    """The iteration the file records (``iteration``, ``step`` or ``epoch``), 0 when it records none."""
    for key in ("iteration", "step", "epoch"):
        value = data.get(key)
        if value is None:
            continue
        if not (_is_whole(value) and 0 <= float(value) <= MAX_ITERATION):
            raise _MalformedError(key, value, f"a whole number of steps in [0, {MAX_ITERATION:.0e}]")
        return int(value)
    return 0


def _resume_state(path: Path, data: dict[str, Any], checkpoint: Checkpoint, fitted_on: Any) -> None:
    """Check our resume state against the model and attach it when the volume is the one the fit ran on.

    The optimiser's parameters live in the physical frame of the volume the fit ran on: on another volume they
    would be wrong, so the fit restarts from the mapped model instead of resuming.
    """
    fit = data.get("fit_state")
    if fit is None:
        return
    model = checkpoint.model
    fit_model = _fit_model(path, fit, model.num_gaussians)
    optimizer = data.get("optimizer_state_dict")
    if optimizer is not None:
        _check_optimizer(optimizer, fit_model)
    density = data.get("density_state")
    if density is not None:
        _check_density(density, model.num_gaussians)
    geometry = model.geometry
    if fitted_on is None or geometry is None or VolumeGeometry.from_dict(fitted_on) == geometry:
        checkpoint.fit_model = fit_model.with_geometry(geometry) if geometry is not None else fit_model
        checkpoint.optimizer_state = optimizer
        checkpoint.density_state = density


def _fit_model(path: Path, fit: Any, count: int) -> GaussianModel:
    """The optimiser's parameters (physical frame), checked like the model's and against its ``count``."""
    if not isinstance(fit, dict):
        raise _MalformedError("fit_state", fit, f"a dict of the tensors {', '.join(PARAMETER_NAMES)} (physical frame)")
    for name in PARAMETER_NAMES:
        if not isinstance(fit.get(name), torch.Tensor) or not fit[name].is_floating_point():
            raise _MalformedError(f"fit_state.{name}", fit.get(name, _MISSING), "a floating-point tensor")
    keys = {name: f"fit_state.{name}" for name in PARAMETER_NAMES}
    fit_model = _model(path, "fit_state", {n: fit[n].detach().float() for n in PARAMETER_NAMES}, Frame.PHYSICAL, keys)
    if fit_model.num_gaussians != count:
        raise _MalformedError("fit_state.means", fit["means"], f"{count} rows, one per Gaussian of the model")
    return fit_model


_ADAM_SETTINGS = {
    "lr": (lambda v: _is_number(v, 0.0), "a finite number >= 0"),
    "eps": (lambda v: _is_number(v, 0.0), "a finite number >= 0"),
    "weight_decay": (lambda v: _is_number(v, 0.0), "a finite number >= 0"),
    "betas": (
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b, 0.0, 1.0 - 1e-12) for b in v),
        "two numbers in [0, 1)",
    ),
    **{
        flag: (lambda v: v is None or isinstance(v, bool), "true, false or None")
        for flag in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused")
    },
}
"""Adam settings a parameter group may hold: (check, what is expected)."""


def check_optimizer_state(state: Any, fit_model: GaussianModel, source: str = "the checkpoint") -> None:
    """Check an Adam state (``optimizer_state_dict``) against the model it resumes, as :func:`load_checkpoint`
    does for a file; for states built in memory.

    Raises
    ------
    CheckpointError
        Naming ``source``, the key and what was expected.
    """
    try:
        _check_optimizer(state, fit_model)
    except _MalformedError as error:
        raise CheckpointError(f"{source}: {error.key} is {_describe(error.value)}; expected {error.expected}") from None


def _check_optimizer(state: Any, fit_model: GaussianModel) -> None:
    """Adam state as the trainer saves it: one group per parameter, in :data:`PARAMETER_NAMES` order, each with
    one parameter whose moments (if any) have its shape."""
    key = "optimizer_state_dict"
    groups = state.get("param_groups") if isinstance(state, dict) else None
    moments = state.get("state") if isinstance(state, dict) else None
    if not (isinstance(groups, list) and isinstance(moments, dict)):
        raise _MalformedError(key, state, "a dict with 'state' (a dict) and 'param_groups' (a list), as Adam saves it")
    if len(groups) != len(PARAMETER_NAMES):
        expected = f"{len(PARAMETER_NAMES)} groups, one per parameter ({', '.join(PARAMETER_NAMES)})"
        raise _MalformedError(f"{key}.param_groups", groups, expected)
    ids = []
    for index, (group, name) in enumerate(zip(groups, PARAMETER_NAMES)):
        where = f"{key}.param_groups[{index}]"
        params = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(params, list) and len(params) == 1 and _is_whole(params[0])):
            raise _MalformedError(where, group, "a dict whose 'params' lists one parameter id")
        if group.get("name", name) != name:
            raise _MalformedError(f"{where}.name", group["name"], f"{name!r} (the groups follow {PARAMETER_NAMES})")
        for setting, (check, expected) in _ADAM_SETTINGS.items():
            if setting in group and not check(group[setting]):
                raise _MalformedError(f"{where}.{setting}", group[setting], expected)
        ids.append(params[0])
    if len(set(ids)) != len(ids) or set(moments) - set(ids):
        raise _MalformedError(f"{key}.state", list(moments), f"moments of the group parameters {ids} only, each once")
    for pid, group, (name, parameter) in zip(ids, groups, fit_model.tensors().items()):
        entry = moments.get(pid)
        if entry is not None:
            _check_moments(f"{key}.state[{pid}]", entry, name, tuple(parameter.shape), bool(group.get("amsgrad")))


def _check_moments(key: str, entry: Any, name: str, shape: tuple[int, ...], amsgrad: bool) -> None:
    """Adam's moments of parameter ``name``: finite tensors of its ``shape`` (squares >= 0), and a step >= 0."""
    if not isinstance(entry, dict):
        raise _MalformedError(key, entry, f"a dict of Adam moments of {name}")
    step = entry.get("step", _MISSING)
    if not (_is_whole(step) and float(step) >= 0):
        raise _MalformedError(f"{key}.step", step, "a whole number >= 0")
    for moment in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())):
        value = entry.get(moment, _MISSING)
        fine = isinstance(value, torch.Tensor) and value.is_floating_point() and tuple(value.shape) == shape
        signed = moment == "exp_avg"  # the others are (maxima of) squares
        if not (fine and bool(torch.isfinite(value).all()) and (signed or bool((value >= 0).all()))):
            expected = f"a finite float tensor of shape {list(shape)} (like {name}){'' if signed else ', >= 0'}"
            raise _MalformedError(f"{key}.{moment}", value, expected)


def _check_density(density: Any, count: int) -> None:
    """Density-control statistics: the tensors :meth:`DensityStats.tensors` saves, shaped for ``count`` Gaussians."""
    from ..densify import DensityStats

    if not isinstance(density, dict):
        raise _MalformedError("density_state", density, "a dict of tensors")
    expected = f"the density statistics of {count} Gaussians"
    stats = _checked(lambda d: DensityStats.from_tensors(d, count, "cpu"), "density_state", density, expected)
    for (name, value), like in zip(stats.tensors().items(), DensityStats.zeros(count).tensors().values()):
        if value.shape != like.shape or not bool(torch.isfinite(value).all()):
            raise _MalformedError(f"density_state.{name}", density[name], f"finite values of shape {list(like.shape)}")


def _geometry(
    data: dict[str, Any],
    metadata: dict[str, Any],
    means: torch.Tensor,
    frame: Frame,
    given: VolumeGeometry | None,
) -> tuple[VolumeGeometry | None, str]:
    """The volume the file refers to and where that came from (``metadata.volume`` is checked already)."""
    if given is not None:
        return given, "target volume"
    if isinstance(metadata.get("volume"), dict):
        return VolumeGeometry.from_dict(metadata["volume"]), "checkpoint metadata"
    if data.get("vol_shape") is not None:
        return VolumeGeometry(_shape("vol_shape", data["vol_shape"])), "vol_shape in the file"
    aabb = data.get("aabb")
    if isinstance(aabb, torch.Tensor) and tuple(aabb.shape) == (3, 2):
        sides = (aabb[:, 1] - aabb[:, 0]).double().numpy()
        if np.all(sides >= 1):
            shape_xyz = np.round(sides).astype(int) + 1
            return VolumeGeometry(tuple(int(n) for n in shape_xyz[::-1])), "aabb in the file (taken as voxel units)"
    if frame in (Frame.VOXEL, Frame.PHYSICAL):
        top = np.ceil(means.double().amax(0).numpy()).clip(min=0) + 1
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
