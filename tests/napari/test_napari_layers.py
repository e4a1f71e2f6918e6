"""Layer <-> core conversion and the MIP layout (no viewer needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_neurogs_mip._napari._layers import (
    RESIDUAL_COLORMAP,
    mip_layer,
    mip_view_name,
    model_to_points,
    points_in_axes,
    points_to_model,
    spacing_from_mips,
    xy_projection,
    xyz_to_zyx,
    zyx_to_xyz,
)
from napari_neurogs_mip._napari._layout import (
    best_columns,
    camera_for_box,
    layout_box,
    layout_labels,
    view_layout,
)
from napari_neurogs_mip.frames import Frame, VolumeGeometry
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.views import make_views

GEOMETRY = VolumeGeometry((12, 16, 20), (3.0, 1.0, 0.5))


def test_axis_order_helpers_are_inverse() -> None:
    points = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(xyz_to_zyx(points)[:, 0], points[:, 2])
    np.testing.assert_array_equal(zyx_to_xyz(xyz_to_zyx(points)), points)


def _random_model() -> GaussianModel:
    generator = torch.Generator().manual_seed(0)
    return GaussianModel(
        means=torch.rand(30, 3, generator=generator) * torch.as_tensor(GEOMETRY.extent_xyz, dtype=torch.float32),
        log_scales=torch.log(0.2 + torch.rand(30, 3, generator=generator)),
        quaternions=torch.randn(30, 4, generator=generator),
        log_amplitudes=torch.log(0.05 + torch.rand(30, generator=generator)),
        frame=Frame.PHYSICAL,
        geometry=GEOMETRY,
    )


@pytest.mark.parametrize("frame", [Frame.PHYSICAL, Frame.VOXEL, Frame.NEUROGS, Frame.UNIT])
def test_points_round_trip_is_exact(frame: Frame) -> None:
    model = _random_model().to_frame(frame)
    data, kwargs, _ = model_to_points(model)
    back = points_to_model(data, kwargs["features"], kwargs["metadata"], kwargs["scale"])
    assert back.frame is frame and back.geometry == GEOMETRY
    np.testing.assert_allclose(back.means.numpy(), model.means.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back.covariances().numpy(), model.covariances().numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(back.log_amplitudes.numpy(), model.log_amplitudes.numpy(), atol=1e-6)


def test_view_layout_puts_views_side_by_side_with_labels_above() -> None:
    views = make_views(["xy", "xz", "yz", "30:15"], GEOMETRY)
    rows = view_layout(views, 2, x_start=100.0)
    assert len(rows) == 2 and all(len(row) == 4 for row in rows)
    for row in rows:
        right = 100.0
        for view, placement in zip(views, row):
            assert placement.scale == (view.dv, view.du)
            assert placement.translate[1] >= right
            right = placement.translate[1] + view.width * view.du
    # The top row starts level with the volume (y = 0), so xy's rows line up with the volume's.
    assert all(p.translate[0] == 0.0 for p in rows[0])
    bottom = max(p.translate[0] + (v.height - 0.5) * v.dv for v, p in zip(views, rows[0]))
    labels = layout_labels(views, ["target", "rendered"], rows)
    assert [label.text for label in labels[:2]] == ["target xy", "xz"]  # the role once per row
    assert labels[4].text == "rendered xy"
    # Each label sits on its image's top-left corner, and the second row leaves room for its labels.
    assert labels[0].position == (-0.5 * views[0].dv, 100.0 - 0.5 * views[0].du)
    assert all(label.position[0] > bottom for label in labels[4:])
    low, high = layout_box(views, rows)
    edge = rows[1][-1].translate[1] + (views[-1].width - 0.5) * views[-1].du  # the last image's right edge
    assert low[0] < labels[0].position[0] and low[1] < 100.0 and high[1] == pytest.approx(edge)
    # The camera fits that box on the canvas: the limiting side fills 96 % of it.
    centre, zoom = camera_for_box(low, high, (600, 800))
    assert centre == pytest.approx(tuple((low + high) / 2))
    assert zoom == pytest.approx(0.96 * min(600 / (high[0] - low[0]), 800 / (high[1] - low[1])))


def test_many_views_wrap_to_fill_a_tall_canvas() -> None:
    views = make_views(["xy", "xz", "yz", "30:15", "60:15"], GEOMETRY)
    rows = view_layout(views, 2, columns=3)
    # Line 1: xy, xz, yz (target row, then rendered row); line 2: the orbit views, below both rows.
    assert [p.translate[1] for p in rows[0][3:]] == [p.translate[1] for p in rows[0][:2]]
    assert rows[0][3].translate[0] > rows[1][0].translate[0] > rows[0][0].translate[0] == 0.0
    assert best_columns(views, 2, (400, 4000)) == 5  # a wide canvas: one line
    assert best_columns(views, 2, (3000, 300)) < 5  # a tall one: more lines


def test_residual_layer_is_diverging_and_centred() -> None:
    view = make_views(["xy"], GEOMETRY)[0]
    _, kwargs, _ = mip_layer(np.zeros((16, 20)), view, "residual", view_layout([view], 1)[0][0])
    low, high = kwargs["contrast_limits"]
    assert low == -high < 0 and kwargs["colormap"] is RESIDUAL_COLORMAP
    colors = np.asarray(RESIDUAL_COLORMAP["colors"])
    assert RESIDUAL_COLORMAP["controls"][1] == 0.5 and np.all(colors[1, :3] == 0)  # 0 is black: a fit reads dark
    assert colors[0, 2] > colors[0, 0] and colors[2, 0] > colors[2, 2]  # blue below, orange above


def test_points_in_the_axes_of_a_hyperstack_round_trip() -> None:
    """In a Z, C, Y, X viewer the fitted points get a C column (the channel fitted), and convert back exactly."""
    model = _random_model().to_frame(Frame.NEUROGS)
    layer = model_to_points(model)
    data, kwargs, _ = points_in_axes(layer, "ZCYX", {1: 1}, (1.0, 1.0, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0))
    assert data.shape == (30, 4) and np.all(data[:, 1] == 1)
    np.testing.assert_allclose(data[:, [0, 2, 3]], layer[0])
    assert kwargs["scale"] == (3.0, 1.0, 1.0, 0.5) and kwargs["axis_labels"] == ("z", "c", "y", "x")
    back = points_to_model(data, kwargs["features"], kwargs["metadata"], kwargs["scale"])
    np.testing.assert_allclose(back.means.numpy(), model.means.numpy(), rtol=1e-5, atol=1e-5)
    projected, projection, kind = xy_projection(layer)
    assert kind == "points" and projected.shape == (30, 2) and projection["scale"] == (1.0, 0.5)
    np.testing.assert_array_equal(projected, layer[0][:, 1:])


def test_mip_names_and_spacing() -> None:
    assert mip_view_name("target xz", {}) == "xz"
    assert mip_view_name("cell_05-yz", None) == "yz"
    assert mip_view_name("whatever", {"view": "az30_el15"}) == "az30_el15"
    assert mip_view_name("volume", {}) is None
    assert spacing_from_mips({"xy": (0.5, 0.25), "xz": (2.0, 0.25)}) == (2.0, 0.5, 0.25)
