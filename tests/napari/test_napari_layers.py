"""Layer <-> core conversion (no viewer needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_neurogs_mip._napari._layers import (
    leading_volume,
    mip_view_name,
    model_to_points,
    points_to_model,
    spacing_from_mips,
    view_layout,
    xyz_to_zyx,
    zyx_to_xyz,
)
from napari_neurogs_mip.frames import Frame, VolumeGeometry
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.views import make_views

GEOMETRY = VolumeGeometry((12, 16, 20), (3.0, 1.0, 0.5))


def test_axis_order_helpers_are_inverse() -> None:
    points = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(xyz_to_zyx(points)[:, 0], points[:, 2])
    np.testing.assert_array_equal(zyx_to_xyz(xyz_to_zyx(points)), points)


@pytest.mark.parametrize("frame", [Frame.PHYSICAL, Frame.VOXEL, Frame.NEUROGS, Frame.UNIT])
def test_points_round_trip_is_exact(frame: Frame) -> None:
    generator = torch.Generator().manual_seed(0)
    physical = GaussianModel(
        means=torch.rand(30, 3, generator=generator) * torch.as_tensor(GEOMETRY.extent_xyz, dtype=torch.float32),
        log_scales=torch.log(0.2 + torch.rand(30, 3, generator=generator)),
        quaternions=torch.randn(30, 4, generator=generator),
        log_amplitudes=torch.log(0.05 + torch.rand(30, generator=generator)),
        frame=Frame.PHYSICAL,
        geometry=GEOMETRY,
    )
    model = physical.to_frame(frame)
    data, kwargs, _ = model_to_points(model)
    back = points_to_model(data, kwargs["features"], kwargs["metadata"], kwargs["scale"])
    assert back.frame is frame and back.geometry == GEOMETRY
    np.testing.assert_allclose(back.means.numpy(), model.means.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(back.covariances().numpy(), model.covariances().numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(back.log_amplitudes.numpy(), model.log_amplitudes.numpy(), atol=1e-6)


def test_view_layout_puts_views_side_by_side() -> None:
    views = make_views(["xy", "xz", "yz", "30:15"], GEOMETRY)
    rows = view_layout(views, 2, x_start=100.0)
    assert len(rows) == 2 and all(len(row) == 4 for row in rows)
    for row in rows:
        right = 100.0
        for view, placement in zip(views, row):
            assert placement.scale == (view.dv, view.du)
            assert placement.translate[1] >= right
            right = placement.translate[1] + view.width * view.du
    top_height = max(v.height * v.dv for v in views)
    assert all(p.translate[0] > top_height for p in rows[1])


def test_mip_names_and_spacing() -> None:
    assert mip_view_name("target xz", {}) == "xz"
    assert mip_view_name("cell_05-yz", None) == "yz"
    assert mip_view_name("whatever", {"view": "az30_el15"}) == "az30_el15"
    assert mip_view_name("volume", {}) is None
    assert spacing_from_mips({"xy": (0.5, 0.25), "xz": (2.0, 0.25)}) == (2.0, 0.5, 0.25)


def test_leading_volume_picks_channel_and_time() -> None:
    data = np.arange(2 * 3 * 4 * 5 * 6).reshape(2, 3, 4, 5, 6)
    np.testing.assert_array_equal(leading_volume(data, [1, 2]), data[1, 2])
    np.testing.assert_array_equal(leading_volume([data[0], data[0][:, ::2]], [1]), data[0, 1])
    with pytest.raises(ValueError, match="out of range"):
        leading_volume(data, [2, 0])
    with pytest.raises(ValueError, match="leading axes"):
        leading_volume(data, [0])
