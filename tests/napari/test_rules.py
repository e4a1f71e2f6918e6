"""Domain rules of the napari front-end, without a viewer: layer axes, target choice, refresh rate, messages."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_neurogs_mip._napari._axes import (
    LayerAxes,
    file_axes,
    label_axes,
    layer_axes,
    parse_axes,
    planes_needed,
    select_volume,
    volume_problem,
    world_to_index,
)
from napari_neurogs_mip._napari._summary import TOAST_LINE, exported_message, finished_message
from napari_neurogs_mip._napari._target_rules import LayerInfo, mip_set, offered_starts, offered_targets
from napari_neurogs_mip._napari._throttle import Throttle
from napari_neurogs_mip.train import FinishedEvent


def write_hyperstack(path, shape=(61, 2, 32, 32), data: np.ndarray | None = None) -> np.ndarray:
    """An ImageJ Z, C, Y, X hyperstack (``data``, or random of ``shape``): z 2.0 um, xy 0.5 um (2 pixels per um)."""
    data = np.random.default_rng(0).random(shape).astype(np.float32) if data is None else data
    metadata = {"axes": "ZCYX", "spacing": 2.0, "unit": "um"}
    tifffile.imwrite(path, data, imagej=True, resolution=(2, 2), metadata=metadata)
    return data


def test_the_axes_of_a_napari_opened_hyperstack_come_from_its_file(tmp_path) -> None:
    """napari's reader gives (61, 2, 32, 32) with scale 1: the file says ZCYX at 2.0 x 0.5 x 0.5 um."""
    path = tmp_path / "stack.tif"
    write_hyperstack(path)
    found = layer_axes((61, 2, 32, 32), ("-4", "-3", "-2", "-1"), (1, 1, 1, 1), str(path), ["pixel"] * 4)
    assert found == LayerAxes("ZCYX", (2.0, 0.5, 0.5), "stack.tif (ImageJ)")
    # A layer of another shape from the same file (ours: one per channel) does not take the file's axes.
    assert file_axes(path, (61, 32, 32)) is None
    assert file_axes(tmp_path / "missing.tif", (61, 2, 32, 32)) is None


def test_axes_from_labels_scale_or_a_guess() -> None:
    assert label_axes(("t", "Z", "channel", "y", "x")) == "TZCYX"
    assert label_axes(("-3", "-2", "-1")) is None and label_axes(("z", "z", "x")) is None
    labelled = layer_axes((5, 3, 40, 50), ("z", "c", "y", "x"), (2.0, 1.0, 0.5, 0.5), None)
    assert labelled == LayerAxes("ZCYX", (2.0, 0.5, 0.5), "layer axis labels, voxel size from its scale")
    guessed = layer_axes((2, 61, 32, 32), ("-4", "-3", "-2", "-1"), (1, 1, 1, 1), None, ["pixel"] * 4)
    assert guessed.axes == "CZYX" and guessed.guessed and guessed.spacing_zyx is None
    assert layer_axes((9, 8, 7), ("a", "b", "c"), (3.0, 1.0, 1.0), None).spacing_zyx == (3.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("text", "ndim", "message"),
    [("zyx", 4, "give 4 letters"), ("ZQYX", 4, "Q is not one of"), ("ZZYX", 4, "once"), ("CTYX", 4, "z is missing")],
)
def test_typed_axes_are_checked(text, ndim, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_axes(text, ndim)
    assert parse_axes(" z c y x ", 4) == "ZCYX"


def test_select_volume_picks_along_any_axis_and_orders_zyx() -> None:
    data = np.arange(3 * 2 * 4 * 5).reshape(3, 2, 4, 5)
    np.testing.assert_array_equal(select_volume(data, "ZCYX", {1: 1}), data[:, 1])
    np.testing.assert_array_equal(select_volume(data, "ZCXY", {1: 0}), data[:, 0].transpose(0, 2, 1))
    with pytest.raises(ValueError, match="out of range for the channel axis"):
        select_volume(data, "ZCYX", {1: 2})
    with pytest.raises(ValueError, match="choose an index along the channel axis"):
        select_volume(data, "ZCYX", {})


def test_a_block_that_cannot_be_a_volume_is_named() -> None:
    """The misread hyperstack: (2, 32, 32) picked along a 61-entry axis guessed as channels."""
    guessed = LayerAxes("CZYX", None, "guessed", guessed=True)
    message = volume_problem((2, 32, 32), guessed, "stack", 11)
    assert "'stack' as axes CZYX gives a 2 x 32 x 32 (z, y, x) volume with only 2 along z" in message
    assert "for the SSIM window" in message and "type the layer's axes" in message and "ZCYX" in message
    assert volume_problem((61, 32, 32), guessed, "stack", 11) is None
    assert "a volume needs at least 2" in volume_problem((1, 32, 32), guessed, "stack", 2)


def test_planes_needed_follow_the_resolution() -> None:
    assert planes_needed(None, ssim=True) == 11 and planes_needed(None, ssim=False) == 2
    assert planes_needed(2.0, ssim=True) == 22  # halved, 21 planes make 10 rows (round half to even), 22 make 11
    assert planes_needed((64, 64), ssim=True) == 2  # every view is 64 x 64 whatever the depth


def test_world_to_index() -> None:
    assert world_to_index(7.9, 2.0, 0.0, 61) == 4
    assert world_to_index(-3.0, 1.0, 0.0, 5) == 0 and world_to_index(99.0, 1.0, 0.0, 5) == 4
    assert world_to_index(5.0, 1.0, 4.0, 5) == 1


def test_targets_and_starts_on_offer() -> None:
    layers = [
        LayerInfo("volume", "image", 3),
        LayerInfo("photo", "image", 2, rgb=True),
        LayerInfo("cell xz", "image", 2),
        LayerInfo("cell xy", "image", 2),
        LayerInfo("other yz", "image", 2, metadata={"neurogs_role": "target"}),
        LayerInfo("rendered xy", "image", 2, metadata={"neurogs_role": "rendered"}),
        LayerInfo("residual xy", "image", 2, metadata={"neurogs_role": "residual"}),
        LayerInfo("model", "points", 3),
        LayerInfo("model (xy projection)", "points", 2, metadata={"neurogs_projection": "model"}),
        LayerInfo("view labels", "points", 2, metadata={"neurogs_role": "labels"}),
    ]
    assert offered_targets(layers) == ["volume", "cell xz", "cell xy", "other yz"]
    assert offered_starts(layers) == ["model"]
    assert mip_set(layers[2], "xz", layers) == {"xz": "cell xz", "xy": "cell xy", "yz": "other yz"}
    with pytest.raises(ValueError, match="sideways"):
        mip_set(layers[2], "sideways", layers)


def test_the_throttle_allows_one_refresh_per_interval() -> None:
    now = [0.0]
    throttle = Throttle(0.5, clock=lambda: now[0])
    refreshes = 0
    for tick in range(1000):  # a fit stepping every millisecond for a second
        now[0] = tick * 0.001
        if throttle.delay() == 0.0:
            throttle.mark()
            refreshes += 1
    assert refreshes == 2
    assert throttle.delay() == pytest.approx(0.5 - (0.999 - 0.5))
    throttle.reset()
    assert throttle.delay() == 0.0


def test_notifications_lead_with_a_complete_short_line(tmp_path) -> None:
    metrics = {
        name: {"psnr": 30.0 + i, "fg_psnr": 25.0, "recall": 0.9, "ssim": 0.8}
        for i, name in enumerate(["xy", "xz", "yz", "az30_el20"])
    }
    event = FinishedEvent(300, False, metrics, [], held_out=["az30_el20"], num_gaussians=2345)
    first, *rest = finished_message(event).split("\n")
    assert first == "Fit MIP finished: PSNR 31.0 dB" and len(first) <= TOAST_LINE
    assert "held-out 33.0 dB" in rest[0] and "2,345 Gaussians" in rest[1]
    files = [tmp_path / f"mips_{v}.tif" for v in ("xy", "xz")]
    first, detail = exported_message(files, 300).split("\n")
    assert first == "Fit MIP: exported 2 MIP TIFFs" and "mips_xy.tif, mips_xz.tif" in detail
