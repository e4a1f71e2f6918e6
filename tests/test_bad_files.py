"""Bad input files through the CLI: exit status 2, a message naming the file and the culprit (line, key, page or
flag) and what was expected, no traceback, and the output left as it was.

Every file here is real: SWC as text, TIFFs written by tifffile, checkpoints by ``torch.save`` (the good one by a
real two-step fit, then altered one key at a time).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

from cli_checks import assert_bad_input
from napari_neurogs_mip.cli import main
from napari_neurogs_mip.frames import Frame, VolumeGeometry
from napari_neurogs_mip.io.checkpoint import (
    LOG_AMPLITUDE_RANGE,
    LOG_SCALE_RANGE,
    MEAN_LIMIT,
    QUATERNION_NORM_LIMIT,
    load_checkpoint,
    save_checkpoint,
)
from napari_neurogs_mip.io.swc import read_swc
from napari_neurogs_mip.io.tiff import write_volume
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.render import Renderer
from napari_neurogs_mip.views import AXIS_VIEWS, View, make_views

SHAPE = (12, 24, 24)
FAST = ["--iterations", "2", "--backend", "torch", "--device", "cpu", "--num_gaussians", "20"]


def _volume(path: Path, dtype: Any = np.float32) -> np.ndarray:
    data = (np.random.default_rng(0).random(SHAPE) ** 6).astype(dtype)
    tifffile.imwrite(path, data)
    return data


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "volume.tif"
    _volume(path)
    return path


def _fit(target: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--target", str(target), "--out", str(out), *FAST, *extra]


# ---------------------------------------------------------------------------------------------------- SWC
SWC_OK = ["1 1 4 8 8 1.5 -1", "2 3 6 8 8 1.0 1", "3 3 8 9 8 1.0 2"]

# name -> (the rows, the culprit's line (the header is line 1), what the message says)
SWC_CASES: dict[str, tuple[list[str], int, list[str]]] = {
    "cycle": (["1 1 4 8 8 1 3", "2 3 6 8 8 1 1", "3 3 8 9 8 1 2"], 2, ["cycle (1 -> 3 -> 2 -> 1)", "root"]),
    "own-parent": ([SWC_OK[0], "2 3 6 8 8 1 2", SWC_OK[2]], 3, ["node 2 is its own parent"]),
    "negative-radius": ([SWC_OK[0], "2 3 6 8 8 -1 1", SWC_OK[2]], 3, ["radius -1 of node 2", ">= 0"]),
    "fractional-id": ([SWC_OK[0], "2.5 3 6 8 8 1 1", SWC_OK[2]], 3, ["node id '2.5'", "whole number"]),
    "fractional-parent": ([*SWC_OK[:2], "3 3 8 9 8 1 1.5"], 4, ["parent id '1.5'", "whole number"]),
    "text-id": ([SWC_OK[0], "two 3 6 8 8 1 1", SWC_OK[2]], 3, ["node id 'two'", "whole number"]),
    "unknown-parent": ([*SWC_OK[:2], "3 3 8 9 8 1 7"], 4, ["parent 7 of node 3", "-1 for a root"]),
    "duplicate-id": ([*SWC_OK[:2], "2 3 8 9 8 1 1"], 4, ["node id 2 repeats (first on line 3)", "unique"]),
    "nan-coordinate": ([SWC_OK[0], "2 3 nan 8 8 1 1", SWC_OK[2]], 3, ["x = 'nan'", "finite number"]),
    "inf-radius": ([SWC_OK[0], "2 3 6 8 8 inf 1", SWC_OK[2]], 3, ["radius = 'inf'", "finite number"]),
    "overflow": ([SWC_OK[0], "2 3 6 1e300 8 1 1", SWC_OK[2]], 3, ["y = '1e300'", "within +-1e+12"]),
    "short-line": ([SWC_OK[0], "2 3 6 8 8", SWC_OK[2]], 3, ["5 fields", "7 fields"]),
}


def _write_swc(path: Path, rows: list[str]) -> Path:
    path.write_text("# id type x y z radius parent\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("case", list(SWC_CASES))
def test_bad_swc(tmp_path, capsys, target, case):
    rows, line, says = SWC_CASES[case]
    swc = _write_swc(tmp_path / "neuron.swc", rows)
    out = tmp_path / "out"
    assert_bad_input(
        capsys, [*_fit(target, out), "--swc", str(swc)], f"neuron.swc, line {line}:", *says, unchanged=[out]
    )


def test_swc_far_node_reads_exactly(tmp_path):
    # 1e9 voxels is a valid number (whether its ~5e8 Gaussians are affordable is a resource check elsewhere).
    skeleton = read_swc(_write_swc(tmp_path / "far.swc", [SWC_OK[0], "2 3 1e9 8 8 1 1", "3 3 8 9 8 1.0 2.0"]))
    assert skeleton.positions[1, 0] == 1e9 and np.isfinite(skeleton.positions).all()
    assert skeleton.parents.tolist() == [-1, 0, 1]


# ---------------------------------------------------------------------------------------------------- TIFF
def _plain(path: Path) -> None:
    _volume(path)


def _imagej(path: Path) -> None:
    write_volume(path, np.random.default_rng(0).random(SHAPE), (2.0, 1.0, 1.0))


def _zlib(path: Path) -> None:
    tifffile.imwrite(path, np.random.default_rng(0).random(SHAPE).astype(np.float32), compression="zlib")


def _pages(path: Path) -> None:
    with tifffile.TiffWriter(path) as writer:
        for plane in np.random.default_rng(0).random(SHAPE).astype(np.float32):
            writer.write(plane, metadata=None)


# Each writer and cut fails a different way inside tifffile (a short read; an ImageJ stack that would come back as
# one 2D page; compressed strips past the end; a last page cut short with nothing logged).
TRUNCATED = {"plain-half": (_plain, 0.5), "imagej-half": (_imagej, 0.5), "zlib-most": (_zlib, 0.9),
             "pages-tail": (_pages, 0.99)}  # fmt: skip


@pytest.mark.parametrize("case", list(TRUNCATED))
def test_truncated_tiff(tmp_path, capsys, case):
    write, fraction = TRUNCATED[case]
    path = tmp_path / "stack.tif"
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    out = tmp_path / "out"
    assert_bad_input(capsys, _fit(path, out), "stack.tif", "truncated", unchanged=[out])
    assert_bad_input(capsys, ["info", str(path)], "stack.tif", "truncated", unchanged=[out])


@pytest.mark.parametrize(
    ("dtype", "value", "count"), [(np.float32, np.nan, 3), (np.float32, -np.inf, 2), (np.float64, 1e300, 1)]
)
def test_non_finite_volume(tmp_path, capsys, dtype, value, count):
    path = tmp_path / "bad_voxels.tif"
    data = (np.random.default_rng(0).random(SHAPE) ** 6).astype(dtype)
    data.reshape(-1)[[5, 700, 3000][:count]] = value
    tifffile.imwrite(path, data)
    out = tmp_path / "out"
    assert_bad_input(capsys, _fit(path, out), "bad_voxels.tif", f"{count} non-finite voxels", unchanged=[out])


@pytest.mark.parametrize(("flag", "what"), [("--channel", "channel"), ("--time", "time")])
def test_channel_or_time_for_a_plain_stack(tmp_path, capsys, target, flag, what):
    out = tmp_path / "out"
    err = assert_bad_input(capsys, _fit(target, out, flag, "1"), "volume.tif", f"no {what} axis", flag, unchanged=[out])
    assert "axes QYX" in err or "axes ZYX" in err


def _mip_file(path: Path, names: list[Any], bad_pixel: int | None = None) -> Path:
    """Pages as :func:`write_mips` writes them, with any JSON value as the view name."""
    images = np.random.default_rng(1).random((len(names), 16, 16)).astype(np.float32)
    if bad_pixel is not None:
        images[bad_pixel, 3, 4] = np.nan
    with tifffile.TiffWriter(path) as writer:
        for name, image in zip(names, images):
            writer.write(image, description=json.dumps({"view": name, "pixel_size_rc": [1.0, 1.0]}), metadata=None)
    return path


MIP_CASES: dict[str, tuple[list[Any], int | None, list[str]]] = {
    "duplicate-xy": (["xy", "xy", "xz"], None, ["pages 1 and 2 both hold view 'xy'"]),
    "duplicate-orbit": (["xy", "30:15", "az30_el15"], None, ["pages 2 and 3 both hold view 'az30_el15'"]),
    "number-42": (["xy", 42, "yz"], None, ["page 2 names its view 42;", "xy, xz, yz or AZ:EL"]),
    "text-42": (["xy", "xz", "42"], None, ["page 3 names its view '42'", "xy, xz, yz or AZ:EL"]),
    "text-1.5": (["1.5", "xz", "yz"], None, ["page 1 names its view '1.5'", "xy, xz, yz or AZ:EL"]),
    "nan-pixel": (["xy", "xz", "yz"], 1, ["page 2 (view 'xz') holds 1 non-finite pixels"]),
}


@pytest.mark.parametrize("case", list(MIP_CASES))
def test_bad_mip_file(tmp_path, capsys, case):
    names, bad_pixel, says = MIP_CASES[case]
    path = _mip_file(tmp_path / "mips.tif", names, bad_pixel)
    out = tmp_path / "out"
    argv = ["fit", "--target-mips", str(path), "--out", str(out), *FAST]
    assert_bad_input(capsys, argv, "mips.tif", *says, unchanged=[out])


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Any]:
    """The contents of a checkpoint written by a real (two-step) fit: model, metadata and resume state."""
    folder = tmp_path_factory.mktemp("fitted")
    _volume(folder / "volume.tif")
    assert main(["fit", "--target", str(folder / "volume.tif"), "--out", str(folder / "run"), *FAST]) == 0
    data = torch.load(sorted((folder / "run").glob("*.pt"))[-1], weights_only=True)
    assert {"fit_state", "optimizer_state_dict", "density_state", "metadata"} <= set(data)
    return data


def _set(*keys: Any, value: Any) -> Callable[[dict], None]:
    """A change that sets ``data[k0][k1]... = value`` (``value`` may be a function of the old value)."""

    def change(data: dict) -> None:
        *inner, last = keys
        for key in inner:
            data = data[key]
        data[last] = value(data[last]) if callable(value) else value

    return change


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor, tensor[:1]])


def _fill(rows: list[int], value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda tensor: tensor.index_fill(0, torch.tensor(rows), value)


def _drop(key: str) -> Callable[[dict], dict]:
    return lambda mapping: {k: v for k, v in mapping.items() if k != key}


CHECKPOINT_CASES: dict[str, tuple[Callable[[dict], None], list[str]]] = {
    "fit-state-empty": (_set("fit_state", value={}), ["fit_state.means is missing", "floating-point tensor"]),
    "fit-state-list": (_set("fit_state", value=[1, 2]), ["fit_state is [1, 2]", "a dict of the tensors"]),
    "fit-state-no-scales": (_set("fit_state", value=_drop("log_scales")), ["fit_state.log_scales is missing"]),
    "fit-state-int": (_set("fit_state", "quaternions", value=lambda t: t.long()), ["fit_state.quaternions", "int64"]),
    "fit-state-rows": (_set("fit_state", value=lambda fit: {n: _rows(t) for n, t in fit.items()}),
                       ["fit_state.means is a torch.float32 tensor of shape [21, 3]", "20 rows, one per Gaussian"]),
    "fit-state-mismatch": (_set("fit_state", "means", value=_rows), ["(fit_state)", "log_scales has shape (20, 3)"]),
    "adam-rows": (_set("optimizer_state_dict", "state", 0, "exp_avg", value=_rows),
                  ["optimizer_state_dict.state[0].exp_avg", "of shape [20, 3]"]),
    "adam-groups": (_set("optimizer_state_dict", "param_groups", value=lambda g: g[:3]),
                    ["optimizer_state_dict.param_groups", "4 groups, one per parameter"]),
    "adam-order": (_set("optimizer_state_dict", "param_groups", value=lambda g: g[::-1]),
                   ["optimizer_state_dict.param_groups[0].name is 'log_amplitudes'", "'means'"]),
    "adam-betas": (_set("optimizer_state_dict", "param_groups", 1, "betas", value=(0.9, 2.0)),
                   ["optimizer_state_dict.param_groups[1].betas is (0.9, 2.0)", "two numbers in [0, 1)"]),
    "adam-not-dict": (_set("optimizer_state_dict", value="adam"), ["optimizer_state_dict is 'adam'"]),
    "density-rows": (_set("density_state", "steps", value=_rows), ["density_state", "20 Gaussians"]),
    "iteration-negative": (_set("iteration", value=-6), ["iteration is -6", "whole number of steps"]),
    "iteration-absurd": (_set("iteration", value=10**12), ["iteration is 1000000000000", "1e+09"]),
    "iteration-fraction": (_set("iteration", value=3.5), ["iteration is 3.5", "whole number of steps"]),
    "volume-empty": (_set("metadata", "volume", value={}), ["metadata.volume is {}", "shape_zyx"]),
    "volume-negative": (_set("metadata", "volume", "shape_zyx", value=[12, -24, 24]),
                        ["metadata.volume.shape_zyx is [12, -24, 24]", "3 positive whole numbers"]),
    "volume-text": (_set("metadata", "volume", "shape_zyx", value=["a", 24, 24]),
                    ["metadata.volume.shape_zyx is ['a', 24, 24]"]),
    "volume-spacing": (_set("metadata", "volume", "spacing_zyx", value=[1.0, 0.0, 1.0]),
                       ["metadata.volume.spacing_zyx is [1.0, 0.0, 1.0]", "positive finite"]),
    "frame": (_set("metadata", "frame", value="sideways"), ["metadata.frame is 'sideways'", "a frame name"]),
    "views": (_set("metadata", "views", value=[{"name": "xy"}]), ["metadata.views[0]", "View.to_dict"]),
    "renderer-beta": (_set("metadata", "renderer", "beta", value=-1.0), ["metadata.renderer.beta is -1.0"]),
    "huge-amplitudes": (_set("model_state_dict", "log_amplitudes", value=lambda t: torch.full_like(t, 1e4)),
                        ["model_state_dict.log_amplitudes: 20 of 20 values", "[-30, 10]", "worst 10000"]),
    "huge-scales": (_set("model_state_dict", "log_scales", value=_fill([3], 50.0)),
                    ["model_state_dict.log_scales: 3 of 60 values", "[-20, 10]", "worst 50"]),
    "far-means": (_set("fit_state", "means", value=_fill([0, 1], -1e30)),
                  ["fit_state.means: 6 of 60 values", "worst -1e+30"]),
    "zero-quaternions": (_set("model_state_dict", "quaternions", value=_fill([2, 5], 0.0)),
                         ["2 quaternions have zero norm"]),
    "huge-quaternion": (_set("model_state_dict", "quaternions", value=_fill([1], 1e9)),
                        ["model_state_dict.quaternions: 1 of 20 row norms", "worst 2e+09"]),
}  # fmt: skip


def _through_every_command(capsys, tmp_path: Path, target: Path, path: Path, *culprits: str) -> None:
    out, rendered = tmp_path / "out", tmp_path / "rendered"
    rendered.mkdir(exist_ok=True)
    assert_bad_input(capsys, ["info", str(path)], path.name, *culprits, unchanged=[out])
    render = ["render", str(path), "--out", str(rendered / "mips.tif"), "--backend", "torch", "--device", "cpu"]
    assert_bad_input(capsys, [*render, "--shape", *map(str, SHAPE)], path.name, *culprits, unchanged=[rendered])
    assert_bad_input(capsys, [*_fit(target, out), "--checkpoint", str(path)], path.name, *culprits, unchanged=[out])


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint(tmp_path, capsys, target, fitted, case):
    change, culprits = CHECKPOINT_CASES[case]
    data = _copy(fitted)
    change(data)
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    _through_every_command(capsys, tmp_path, target, path, *culprits)


def _copy(value: Any) -> Any:
    """A deep copy of plain values and tensors (so each case alters its own)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def _v7(**extra: Any) -> dict[str, Any]:
    """A NeuRoGS v7 file: the four tensors at the top level, in the [-1, 1] frame."""
    generator = torch.Generator().manual_seed(0)
    return {
        "means": torch.rand(6, 3, generator=generator) * 2 - 1,
        "log_scales": torch.full((6, 3), -2.5),
        "quaternions": torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 6),
        "log_amplitudes": torch.zeros(6),
        **extra,
    }


@pytest.mark.parametrize("shape", [[-4, 8, 8], [0, 8, 8], [2.5, 8, 8], [8, 8], "big"], ids=str)
def test_v7_bad_vol_shape(tmp_path, capsys, target, shape):
    path = tmp_path / "v7.pt"
    torch.save(_v7(vol_shape=shape, step=3000), path)
    _through_every_command(capsys, tmp_path, target, path, f"vol_shape is {shape!r}", "3 positive whole numbers")


def test_v7_large_vol_shape_is_a_legal_shape(tmp_path, capsys):
    # Whether 4000^3 voxels are affordable is a resource check, not a format one.
    path = tmp_path / "v7.pt"
    torch.save(_v7(vol_shape=torch.tensor([4000, 4000, 4000])), path)
    assert main(["info", str(path)]) == 0
    assert "(4000, 4000, 4000)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- accepted extremes
def _extreme_model() -> GaussianModel:
    """Gaussians at the edges of the accepted ranges (physical frame, spacing 1): huge and tiny, bright and dim,
    rotated, with unnormalised quaternions, near-equal overlapping peaks, and two means far outside."""
    low_s, high_s = LOG_SCALE_RANGE
    low_a, high_a = LOG_AMPLITUDE_RANGE
    scales = [
        [high_s, high_s - 1, high_s - 2],
        [high_s] * 3,
        [low_s] * 3,
        [0.5, 0.0, -0.5],
        [1.0, 1.0, 0.2],
        [1.0, 0.9, 0.2],
        [high_s - 0.5, 0.0, low_s],
        [0.0] * 3,
        [0.0] * 3,
    ]
    quaternions = [
        [0.9, 0.3, -0.2, 0.25],
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.5, 0.5],
        [0.2, 0.9, 0.1, -0.3],
        [QUATERNION_NORM_LIMIT, 0.0, 0.0, 0.0],
        [1e-6, 1e-6, 0.0, 0.0],
        [0.1, 0.7, 0.7, 0.1],
        [1.0, 0.0, 0.0, 0.0],
        [1.0, 0.0, 0.0, 0.0],
    ]
    amplitudes = [high_a, low_a, high_a, high_a - 1e-6, high_a, high_a - 1e-6, 0.0, high_a, high_a]
    means = [[12.0, 12.0, 6.0]] * 7 + [[MEAN_LIMIT, 0.0, 0.0], [-MEAN_LIMIT, -MEAN_LIMIT, MEAN_LIMIT]]
    return GaussianModel(torch.tensor(means), torch.tensor(scales), torch.tensor(quaternions),
                         torch.tensor(amplitudes), frame=Frame.PHYSICAL)  # fmt: skip


def test_accepted_extremes_load_and_the_renderers_agree(tmp_path, capsys):
    geometry = VolumeGeometry(SHAPE)
    path = save_checkpoint(tmp_path / "extreme.pt", _extreme_model().with_geometry(geometry))
    model = load_checkpoint(path).model
    assert main(["info", str(path)]) == 0
    assert re.search(r"\b(inf|nan)\b", capsys.readouterr().out) is None
    # Native axis views, and a view of 1e-5-unit pixels: a frame unit of 1e5 pixels, what the log-scale bound allows.
    tiny = View("tiny", (12.0 - 8e-5, 12.0 - 8e-5, 6.0), (0.6, 0.8, 0.0), (0.0, 0.0, 1.0), 1e-5, 1e-5, 16, 16)
    views = [*make_views(list(AXIS_VIEWS), geometry), tiny]
    images = {}
    for backend in ("torch", "cpu"):
        renderer = Renderer.create(torch.device("cpu"), backend, "soft", 200.0)
        with torch.no_grad():
            images[backend] = renderer.render(model, views)
    for view, a, b in zip(views, images["torch"], images["cpu"]):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), view.name
        peak = float(a.abs().max())
        assert peak > math.exp(LOG_AMPLITUDE_RANGE[1]) / 2, view.name  # the bright Gaussians are drawn
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * peak, msg=view.name)
