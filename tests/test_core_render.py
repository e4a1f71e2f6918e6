"""The reference renderer against independent math: gradients, voxelised Gaussians, footprints, frames.

Every expectation here is computed in the test from first principles (numpy
voxelisation, a dense per-pixel evaluation of the 2D marginal Gaussians,
Rodrigues rotations), never from the package's own helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_neurogs_mip.frames import Frame, VolumeGeometry
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.render import CUTOFF_SIGMA, render_mip
from napari_neurogs_mip.render.field import voxelize
from napari_neurogs_mip.render.project import project
from napari_neurogs_mip.render.raster_torch import enumerate_pairs
from napari_neurogs_mip.targets import Normalization, targets_from_volume
from napari_neurogs_mip.views import View, make_views, native_view

CUT_Q = CUTOFF_SIGMA**2


# ----------------------------------------------------------------- helpers
def rotation(axis, angle_deg: float) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis`` by ``angle_deg``."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    theta = math.radians(angle_deg)
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * (k @ k)


def quaternion(axis, angle_deg: float, norm: float = 1.0) -> np.ndarray:
    """(w, x, y, z) of the same rotation, scaled by ``norm`` (files hold unnormalised ones)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    half = math.radians(angle_deg) / 2
    return norm * np.array([math.cos(half), *(math.sin(half) * axis)])


class Gaussians:
    """K Gaussians given by mean, standard deviations, rotation and amplitude (physical frame, float64)."""

    def __init__(self, specs: list[tuple], geometry: VolumeGeometry | None = None) -> None:
        self.means = np.array([s[0] for s in specs], dtype=np.float64)
        self.sigmas = np.array([s[1] for s in specs], dtype=np.float64)
        rotations = [(s[2], s[3]) if len(s) > 3 else ((0.0, 0.0, 1.0), 0.0) for s in specs]
        self.rotations = np.array([rotation(a, d) for a, d in rotations])
        self.quaternions = np.array([quaternion(a, d, 0.5 + i) for i, (a, d) in enumerate(rotations)])
        self.amplitudes = np.array([s[4] if len(s) > 4 else 1.0 for s in specs], dtype=np.float64)
        self.covariances = np.einsum("kij,kj,klj->kil", self.rotations, self.sigmas**2, self.rotations)
        self.geometry = geometry

    def params(self) -> list[torch.Tensor]:
        """Leaf tensors (means, log_scales, quaternions, log_amplitudes) that require grad."""
        values = (self.means, np.log(self.sigmas), self.quaternions, np.log(self.amplitudes))
        return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]

    def model(self) -> GaussianModel:
        return GaussianModel(*[p.detach() for p in self.params()], frame=Frame.PHYSICAL, geometry=self.geometry)

    def points_q(self, points: np.ndarray) -> np.ndarray:
        """3D Mahalanobis distances [K, ...] of physical points [..., 3]."""
        delta = points[None] - self.means.reshape(-1, *([1] * (points.ndim - 1)), 3)
        precision = np.linalg.inv(self.covariances)
        return np.einsum("k...i,kij,k...j->k...", delta, precision, delta)

    def voxelize(self, geometry: VolumeGeometry, cutoff: bool = True, oversample: tuple = (1, 1, 1)) -> np.ndarray:
        """Summed field at voxel centres [Z, Y, X] (optionally finer along some axes: ``oversample`` (z, y, x))."""
        axes = [
            np.arange(n * f - (f - 1)) / f * s for n, f, s in zip(geometry.shape_zyx, oversample, geometry.spacing_zyx)
        ]
        z, y, x = np.meshgrid(*axes, indexing="ij")
        q = self.points_q(np.stack([x, y, z], axis=-1))
        values = self.amplitudes[:, None, None, None] * np.exp(-0.5 * q)
        if cutoff:
            values = np.where(q <= CUT_Q, values, 0.0)
        return values.sum(axis=0)

    def dense_q(self, view: View, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel 2D Mahalanobis distances [K, H, W] of every Gaussian in ``view`` and the filtered peaks [K]."""
        axes = np.stack([np.asarray(view.u) / view.du, np.asarray(view.v) / view.dv], axis=1)  # [3, 2]
        centre = (self.means - np.asarray(view.origin)) @ axes  # [K, 2] (col, row)
        cov2 = np.einsum("ia,kij,jb->kab", axes, self.covariances, axes)
        filtered = cov2 + eps * np.eye(2)
        cols, rows = np.meshgrid(np.arange(view.width), np.arange(view.height))
        delta = np.stack([cols, rows], axis=-1)[None] - centre[:, None, None, :]
        q = np.einsum("khwa,kab,khwb->khw", delta, np.linalg.inv(filtered), delta)
        return q, self.amplitudes

    def dense_render(self, view: View, mode: str, beta: float = 50.0, eps: float = 0.3, compensate: bool = False):
        """The MIP of section 4 of the math notes, evaluated at every pixel for every Gaussian."""
        q, amplitudes = self.dense_q(view, eps)
        if compensate:
            axes = np.stack([np.asarray(view.u) / view.du, np.asarray(view.v) / view.dv], axis=1)
            cov2 = np.einsum("ia,kij,jb->kab", axes, self.covariances, axes)
            amplitudes = amplitudes * np.sqrt(np.linalg.det(cov2) / np.linalg.det(cov2 + eps * np.eye(2)))
        g = amplitudes[:, None, None] * np.exp(-0.5 * q)
        inside = q <= CUT_Q
        if mode == "max":
            return np.where(inside, g, -np.inf).max(axis=0).clip(min=0.0)
        weight = np.where(inside, np.exp(beta * (g - np.where(inside, g, -np.inf).max(axis=0))), 0.0)
        norm = weight.sum(axis=0)
        return np.where(norm > 0, (weight * g).sum(axis=0) / np.where(norm > 0, norm, 1.0), 0.0)


def render(model: GaussianModel, views: list[View], mode: str, **kwargs) -> list[np.ndarray]:
    with torch.no_grad():
        return [i.numpy() for i in render_mip(model, views, mode=mode, backend="torch", **kwargs)]


# -------------------------------------------------------- (a) gradients
GRAD_GEOMETRY = VolumeGeometry((8, 12, 10), (1.5, 1.0, 1.0))
GRAD_VIEWS = make_views(["xy", "xz", "yz", "30:20"], GRAD_GEOMETRY)

SOFT_SCENE = [
    ((3.1, 4.2, 4.6), (1.0, 1.3, 1.6), (1, 2, 3), 30.0, 0.8),
    ((5.3, 6.1, 6.2), (1.2, 0.9, 1.5), (0, 1, 1), -50.0, 0.6),
    ((4.2, 5.3, 5.1), (1.1, 1.4, 1.2), (1, 0, 0), 70.0, 0.7),
]
MAX_SCENE = [
    ((2.0, 2.5, 2.4), (0.7, 0.8, 0.9), (1, 1, 0), 25.0, 0.9),
    ((7.6, 8.8, 8.4), (0.8, 0.7, 0.9), (0, 1, 2), -40.0, 0.5),
]
FIELD_SCENE = [
    ((3.3, 4.6, 4.4), (1.3, 1.0, 1.6), (1, 2, 3), 30.0, 0.8),
    ((5.2, 6.3, 6.7), (1.1, 1.4, 1.2), (0, 1, 1), -50.0, 0.6),
]


def _assert_no_pixel_near_cutoff(gaussians: Gaussians, views: list[View], eps: float = 0.3) -> None:
    for view in views:
        q, _ = gaussians.dense_q(view, eps)
        margin = float(np.abs(q - CUT_Q).min())
        assert margin > 1e-3, f"scene unfit for gradcheck: a pixel of {view.name} sits at q = 9 +- {margin}"


@pytest.mark.parametrize(("mode", "scene"), [("soft", SOFT_SCENE), ("max", MAX_SCENE)])
def test_gradcheck_splat_modes(mode, scene):
    gaussians = Gaussians(scene, GRAD_GEOMETRY)
    _assert_no_pixel_near_cutoff(gaussians, GRAD_VIEWS)
    if mode == "max":
        # The arg-max must be stable under the perturbation: where footprints overlap, a clear winner.
        for view in GRAD_VIEWS:
            q, amplitudes = gaussians.dense_q(view, 0.3)
            g = np.where(q <= CUT_Q, amplitudes[:, None, None] * np.exp(-0.5 * q), -1.0)
            top = np.sort(g, axis=0)
            both = top[-2] >= 0
            assert not both.any() or float(np.min(top[-1][both] - top[-2][both])) > 1e-3

    def fn(means, log_scales, quaternions, log_amplitudes):
        model = GaussianModel(means, log_scales, quaternions, log_amplitudes, frame=Frame.PHYSICAL)
        return tuple(render_mip(model, GRAD_VIEWS, mode=mode, beta=5.0, backend="torch"))

    params = gaussians.params()
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4)
    # gradcheck would also pass for a function that ignores a parameter: make sure none is ignored.
    sum(image.sum() for image in fn(*params)).backward()
    for name, p in zip(("means", "log_scales", "quaternions", "log_amplitudes"), params):
        assert p.grad is not None and float(p.grad.abs().max()) > 1e-4, name


def test_gradcheck_field_mode():
    gaussians = Gaussians(FIELD_SCENE, GRAD_GEOMETRY)
    views = make_views(["xy", "xz", "yz"], GRAD_GEOMETRY)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(GRAD_GEOMETRY.shape_xyz.astype(int),
                                                                     GRAD_GEOMETRY.spacing_xyz)], indexing="ij"), -1)  # fmt: skip
    margin = float(np.abs(gaussians.points_q(grid) - CUT_Q).min())
    assert margin > 1e-3, f"scene unfit for gradcheck: a voxel sits at q = 9 +- {margin}"

    def fn(means, log_scales, quaternions, log_amplitudes):
        model = GaussianModel(means, log_scales, quaternions, log_amplitudes, frame=Frame.PHYSICAL,
                              geometry=GRAD_GEOMETRY)  # fmt: skip
        return tuple(render_mip(model, views, mode="field"))

    params = gaussians.params()
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6, rtol=1e-4)
    sum(image.sum() for image in fn(*params)).backward()
    for p in params:
        assert p.grad is not None and float(p.grad.abs().max()) > 1e-4


# ---------------------------------- (b) voxelised Gaussians vs rendered views
VOX_GEOMETRY = VolumeGeometry((14, 20, 18), (2.0, 1.0, 1.25))
_RAY_AXIS = {"xy": 0, "xz": 1, "yz": 2}  # numpy axis of V[z, y, x] each view projects along


def _assert_matches_voxel_mip(rendered: np.ndarray, expected: np.ndarray, amplitude: float) -> None:
    """Equal to 1e-3 inside the cut-off, 0 outside; a thin band at the cut-off may be either."""
    cut = amplitude * math.exp(-0.5 * CUT_Q)
    inside, outside = expected > 1.5 * cut, expected < cut / 1.5
    assert inside.sum() > 20
    assert float(np.abs(rendered - expected)[inside].max()) < 1e-3
    assert float(np.abs(rendered[outside]).max(initial=0.0)) == 0.0
    band = ~inside & ~outside
    assert np.all((np.abs(rendered - expected) < 1e-3)[band] | (rendered[band] == 0.0))


@pytest.mark.parametrize("name", ["xy", "xz", "yz"])
def test_axis_aligned_gaussian_matches_voxel_max(name):
    # In-plane off the grid, on a voxel plane along the ray (so the voxel max hits the peak).
    voxel = {"xy": (9.3, 8.6, 6.0), "xz": (9.3, 8.0, 6.4), "yz": (9.0, 8.6, 6.4)}[name]
    mean = np.array(voxel) * VOX_GEOMETRY.spacing_xyz
    gaussians = Gaussians([(mean, (2.0, 1.5, 3.0), (0, 0, 1), 0.0, 0.7)], VOX_GEOMETRY)
    assert np.all(gaussians.sigmas / VOX_GEOMETRY.spacing_xyz >= 1.0)
    expected = gaussians.voxelize(VOX_GEOMETRY, cutoff=False).max(axis=_RAY_AXIS[name])
    (rendered,) = render(gaussians.model(), [native_view(name, VOX_GEOMETRY)], "max", eps=0.0)
    assert rendered.shape == expected.shape
    _assert_matches_voxel_mip(rendered, expected, 0.7)
    (soft,) = render(gaussians.model(), [native_view(name, VOX_GEOMETRY)], "soft", eps=0.0)
    np.testing.assert_allclose(soft, rendered, atol=1e-12)


@pytest.mark.parametrize("name", ["xy", "xz", "yz"])
def test_rotated_gaussian_matches_supersampled_voxel_max(name):
    mean = np.array([10.7, 9.4, 13.1])
    gaussians = Gaussians([(mean, (3.0, 1.4, 2.2), (1, -2, 3), 50.0, 0.9)], VOX_GEOMETRY)
    oversample = [1, 1, 1]
    oversample[_RAY_AXIS[name]] = 40  # rays sampled 40x finer than the voxels
    fine = gaussians.voxelize(VOX_GEOMETRY, cutoff=False, oversample=tuple(oversample))
    expected = fine.max(axis=_RAY_AXIS[name])
    (rendered,) = render(gaussians.model(), [native_view(name, VOX_GEOMETRY)], "max", eps=0.0)
    _assert_matches_voxel_mip(rendered, expected, 0.9)
    # At voxel resolution along the ray the maximum is missed: the supersampling matters.
    assert (
        float(np.abs(gaussians.voxelize(VOX_GEOMETRY, cutoff=False).max(axis=_RAY_AXIS[name]) - rendered).max()) > 1e-3
    )


def test_field_voxelize_and_field_mode_match_numpy():
    specs = [
        ((9.0, 8.0, 12.0), (2.0, 1.5, 3.0), (1, 2, 3), 30.0, 0.6),
        ((11.5, 10.0, 14.0), (2.5, 1.2, 2.4), (0, 1, 1), -60.0, 0.5),
        ((3.0, 15.0, 20.0), (1.3, 1.1, 2.5), (1, 0, 0), 10.0, 0.8),
    ]
    geometry = VolumeGeometry((16, 20, 16), (2.0, 1.0, 1.25))
    gaussians = Gaussians(specs, geometry)
    expected = gaussians.voxelize(geometry)
    model = gaussians.model()
    np.testing.assert_allclose(voxelize(model).numpy(), expected, atol=1e-12)
    views = make_views(["xy", "xz", "yz"], geometry)
    for view, image in zip(views, render(model, views, "field")):
        np.testing.assert_allclose(image, expected.max(axis=_RAY_AXIS[view.name]), atol=1e-12)
    # Half resolution: 2 x 2 area averages of the native MIPs (all sides are even).
    half = make_views(["xy", "xz", "yz"], geometry, 2)
    for view, image in zip(half, render(model, half, "field")):
        native = expected.max(axis=_RAY_AXIS[view.name])
        blocks = native.reshape(native.shape[0] // 2, 2, native.shape[1] // 2, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(image, blocks, atol=1e-12)
    # The scene must test a sum, not a max: two Gaussians overlap and add up somewhere.
    single = [Gaussians([spec], geometry).voxelize(geometry) for spec in specs]
    assert float((expected - np.max(single, axis=0)).max()) > 0.05


@pytest.mark.parametrize(
    ("mode", "compensate"), [("soft", False), ("max", False), ("soft", True)], ids=["soft", "max", "compensated"]
)
def test_many_gaussians_match_dense_reference_on_orbit_views(mode, compensate):
    geometry = VolumeGeometry((12, 26, 22), (2.0, 0.75, 1.0))
    rng = np.random.default_rng(7)
    extent = geometry.extent_xyz
    specs = [
        (rng.uniform(-0.1, 1.1, 3) * extent, rng.uniform(0.4, 3.0, 3), rng.normal(size=3), rng.uniform(0, 180),
         rng.uniform(0.2, 1.0))
        for _ in range(25)
    ]  # fmt: skip
    gaussians = Gaussians(specs, geometry)
    views = make_views(["xy", "yz", "30:20", "-70:45"], geometry)
    images = render(gaussians.model(), views, mode, beta=20.0, eps=0.3, compensate=compensate)
    for view, image in zip(views, images):
        expected = gaussians.dense_render(view, mode, beta=20.0, eps=0.3, compensate=compensate)
        assert image.shape == view.shape
        np.testing.assert_allclose(image, expected, atol=1e-10, err_msg=view.name)
        assert expected.max() > 0.1


# ------------------------------------------------------ (c) memory scaling
def test_pairs_scale_with_footprints_not_image_size():
    geometry = VolumeGeometry((8, 512, 512))
    view = native_view("xy", geometry)
    rng = np.random.default_rng(3)
    k = 40

    def pair_count(sigma: float) -> tuple[int, Gaussians]:
        means = np.column_stack([rng.uniform(-5, 517, (k, 2)), rng.uniform(0, 7, k)])
        specs = [(m, (sigma, 0.7 * sigma, sigma), rng.normal(size=3), 40.0, 0.5) for m in means]
        gaussians = Gaussians(specs, geometry)
        model = gaussians.model()
        projection = project(model.means, model.covariances(), model.amplitudes(), [view])
        pair, _, x, y = enumerate_pairs(projection)
        assert bool(((x >= 0) & (x < view.width) & (y >= 0) & (y < view.height)).all())
        return int(pair.numel()), gaussians

    small, gaussians = pair_count(1.0)
    large, _ = pair_count(4.0)
    assert 0 < small < 1e-3 * view.height * view.width * k
    # Pairs cover every pixel inside a cut-off ellipse and grow with the ellipse area (16x here).
    q, _ = gaussians.dense_q(view, 0.3)
    assert small >= int((q <= CUT_Q).sum())
    assert 8 * small < large < 30 * small
    # The bounding rectangles lose nothing: the sparse render equals the dense evaluation.
    (image,) = render(gaussians.model(), [view], "soft", beta=20.0)
    np.testing.assert_allclose(image, gaussians.dense_render(view, "soft", beta=20.0), atol=1e-10)


# ------------------------------------------------- (d) orbit view targets
@pytest.mark.parametrize(("spec", "axis_name"), [("0:0", "yz"), ("-90:0", "xz"), ("-90:90", "xy")])
def test_orbit_target_equals_axis_mip(spec, axis_name):
    rng = np.random.default_rng(11)
    volume = rng.random((9, 14, 11)).astype(np.float32)
    volume[4, 7, 10] = volume[3, 13, 0] = volume[0, 0, 5] = volume[8, 2, 3] = 2.0  # extremes on the box faces
    geometry = VolumeGeometry(volume.shape)
    orbit = native_view(spec, geometry)
    axis = native_view(axis_name, geometry)
    assert orbit.shape == axis.shape
    # Same pixel grid: origins differ only along the ray (orthographic depth is irrelevant).
    shift = np.asarray(orbit.origin) - np.asarray(axis.origin)
    assert abs(shift @ np.asarray(axis.u)) < 1e-9 and abs(shift @ np.asarray(axis.v)) < 1e-9
    np.testing.assert_allclose(orbit.u, axis.u, atol=1e-12)
    np.testing.assert_allclose(orbit.v, axis.v, atol=1e-12)
    targets = targets_from_volume(volume, geometry, [axis_name, spec], normalization=Normalization("minmax"))
    # minmax is fitted on the three native axis MIPs, whatever views are trained.
    assert targets.low == pytest.approx(min(float(volume.max(axis=a).min()) for a in range(3)))
    assert targets.high == pytest.approx(2.0)
    expected = (volume.max(axis=_RAY_AXIS[axis_name]) - targets.low) / (targets.high - targets.low)
    np.testing.assert_allclose(targets.images[0], expected, atol=1e-6)
    np.testing.assert_allclose(targets.images[1], targets.images[0], atol=1e-5)


def test_orbit_render_agrees_with_orbit_target_of_voxelised_gaussian():
    geometry = VolumeGeometry((30, 34, 36))
    # Off-centre, so a flipped or swapped camera axis would move the peak.
    gaussians = Gaussians([((22.0, 11.5, 17.0), (5.0, 4.0, 4.5), (1, 1, 0), 35.0, 1.0)], geometry)
    volume = gaussians.voxelize(geometry, cutoff=False).astype(np.float32)
    view = native_view("35:25", geometry)
    targets = targets_from_volume(volume, geometry, ["35:25"], normalization=Normalization("fixed", low=0.0, high=1.0))
    (rendered,) = render(gaussians.model(), [view], "max", eps=0.0)
    target = targets.images[0]
    # A target pixel is the brightest voxel whose centre projects within half a pixel of the pixel centre, so near
    # the peak neighbouring pixels can share a value and the arg-max may move by one pixel.
    peak_target = np.unravel_index(target.argmax(), target.shape)
    peak_rendered = np.unravel_index(rendered.argmax(), rendered.shape)
    assert max(abs(int(a) - int(b)) for a, b in zip(peak_target, peak_rendered)) <= 1
    # The render is the exact marginal on the pixel's ray; the target holds voxels whose centres lie up to 0.71 px
    # (half a pixel diagonally) off that ray, over which a Gaussian of sigma >= 4 px changes by at most
    # 0.71 / (4 sqrt(e)) = 0.11.
    difference = np.abs(target - rendered)
    assert float(difference.max()) < 0.11
    assert float(difference.mean()) < 0.01


# --------------------------------------------------- (e) frame conversions
def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frame_round_trips_are_exact(dtype):
    geometry = VolumeGeometry((10, 40, 30), (2.0, 0.5, 0.75))
    rng = np.random.default_rng(5)
    specs = [
        (rng.uniform(0, 1, 3) * geometry.extent_xyz, rng.uniform(0.3, 3.0, 3), rng.normal(size=3), rng.uniform(0, 180))
        for _ in range(30)
    ]  # fmt: skip
    gaussians = Gaussians(specs, geometry)
    physical = gaussians.model().to("cpu", dtype)
    tolerance = 1e-6 if dtype == torch.float64 else 1e-5
    spacing = geometry.spacing_xyz
    span = geometry.shape_xyz - 1
    # voxel i -> frame coordinate, per the table of the math notes
    expected_maps = {
        "voxel": (np.ones(3), np.zeros(3)),
        "physical": (spacing, np.zeros(3)),
        "neurogs": (2.0 / span, -np.ones(3)),
        "unit": (1.0 / span, np.zeros(3)),
    }
    for name, (scale, offset) in expected_maps.items():
        converted = physical.to_frame(name)
        assert converted.frame is Frame(name)
        a = torch.tensor(scale / spacing, dtype=torch.float64)
        means = torch.tensor(gaussians.means) * a + torch.tensor(offset)
        covariances = torch.tensor(gaussians.covariances) * a[:, None] * a[None, :]
        assert _relative(converted.means.double(), means) < tolerance, name
        assert _relative(converted.covariances().double(), covariances) < tolerance, name
        torch.testing.assert_close(converted.amplitudes().double(), torch.tensor(gaussians.amplitudes))
        for back_to in expected_maps:
            round_trip = converted.to_frame(back_to).to_frame("physical")
            assert _relative(round_trip.means.double(), torch.tensor(gaussians.means)) < tolerance, (name, back_to)
            assert _relative(round_trip.covariances().double(), torch.tensor(gaussians.covariances)) < tolerance
    # Per-Gaussian, not only in aggregate: every covariance survives physical -> neurogs -> unit -> physical.
    trip = physical.to_frame("neurogs").to_frame("unit").to_frame("voxel").to_frame("physical").covariances().double()
    per_gaussian = (trip - torch.tensor(gaussians.covariances)).flatten(1).norm(dim=1) / torch.tensor(
        gaussians.covariances
    ).flatten(1).norm(dim=1)
    assert float(per_gaussian.max()) < 10 * tolerance


def test_frame_conversion_needs_geometry_and_renders_identically():
    geometry = VolumeGeometry((10, 16, 12), (2.0, 1.0, 0.5))
    gaussians = Gaussians([((3.0, 7.0, 9.0), (1.5, 1.0, 2.0), (1, 2, 0), 40.0, 0.8)], geometry)
    neurogs = gaussians.model().to_frame("neurogs")
    with pytest.raises(ValueError, match="geometry"):
        GaussianModel(neurogs.means, neurogs.log_scales, neurogs.quaternions, neurogs.log_amplitudes,
                      frame=Frame.NEUROGS).to_frame("physical")  # fmt: skip
    views = make_views(["xy", "xz", "yz", "20:30"], geometry)
    direct = render(gaussians.model(), views, "soft")
    via = render(neurogs.to_frame("physical"), views, "soft")
    for a, b in zip(direct, via):
        np.testing.assert_allclose(a, b, atol=1e-9)
    with pytest.raises(ValueError, match="physical frame"):
        render_mip(neurogs, views)
