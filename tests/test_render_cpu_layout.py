"""The cpu backend on views whose kernel rows outnumber their lanes (transposed layout of wide views)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.render import Renderer, raster_cpu
from napari_neurogs_mip.views import make_views


@pytest.mark.parametrize("orientation", ["rows", "columns", "auto"])
def test_wide_views_match_reference_in_every_layout(monkeypatch, orientation):
    # 40 x 900 views: in the transposed layout the kernel has 900 rows but only 48 padded lanes.
    geometry = VolumeGeometry((40, 30, 900))
    generator = torch.Generator().manual_seed(3)
    k = 400
    extent = torch.tensor(geometry.extent_xyz, dtype=torch.float32)
    model = GaussianModel(
        means=torch.rand(k, 3, generator=generator) * extent,
        log_scales=torch.rand(k, 3, generator=generator) * 0.8,
        quaternions=torch.randn(k, 4, generator=generator),
        log_amplitudes=torch.rand(k, generator=generator).log(),
        frame="physical",
        geometry=geometry,
    )
    views = make_views(["xy", "xz"], geometry)
    monkeypatch.setattr(raster_cpu, "ORIENTATION", orientation)
    renderer = Renderer.create("cpu", "cpu")
    assert renderer.backend == "cpu", renderer.fallback_reason
    with torch.no_grad():
        fast = renderer.render(model, views)
        reference = Renderer.create("cpu", "torch").render(model, views)
    for image, expected in zip(fast, reference):
        torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-5)
