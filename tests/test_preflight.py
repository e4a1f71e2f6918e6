"""The memory preflight: inputs that would allocate until they die are refused first, in one line; normal
fits are not refused.

Refusals run through the CLI against a fixed amount of available memory (``available_memory`` patched:
the machine running the tests may have any amount), with the function that would make the large
allocation patched to fail: a refusal that came after it would show as an ``AssertionError``, not as
exit status 2.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import napari_neurogs_mip.initial_model as init_module
import napari_neurogs_mip.preflight as preflight
import napari_neurogs_mip.prepare as fit_setup
import napari_neurogs_mip.render.field as field_module
from cli_checks import assert_bad_input
from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.initial_model import init_from_swc
from napari_neurogs_mip.io.swc import Skeleton, read_swc
from napari_neurogs_mip.preflight import (
    FitPlan,
    ResourceError,
    available_memory,
    cgroup_headroom,
    check_fit_resources,
    check_render_resources,
    estimate_fit_memory,
    swc_gaussian_count,
)
from napari_neurogs_mip.prepare import VOLUME_VIEWS, FitInputs, prepare_fit
from napari_neurogs_mip.views import AXIS_VIEWS, make_views

GIB = 1 << 30
WORKSTATION = 22 * GIB
"""Available memory of a 24 GB machine."""
LAPTOP = 5 * GIB
"""Available memory of an 8 GB laptop with its desktop, a browser and napari open."""
SWC_SHAPE = (100, 647, 813)


def _with_memory(monkeypatch, available: int) -> None:
    monkeypatch.setattr(preflight, "available_memory", lambda device="cpu": available)


def _forbid_allocations(monkeypatch) -> None:
    """Make every large allocation of ``prepare_fit`` fail loudly, so the check must come before it."""

    def allocated(*args, **kwargs):
        raise AssertionError("allocated")

    monkeypatch.setattr(fit_setup, "targets_for_views", allocated)
    monkeypatch.setattr(fit_setup, "targets_from_mips", allocated)
    monkeypatch.setattr(field_module, "voxelize", allocated)
    for name in ("init_from_volume", "init_from_bright_voxels", "init_from_swc", "init_from_mips"):
        monkeypatch.setattr(init_module, name, allocated)


@pytest.fixture
def tiny_tif(tmp_path: Path) -> Path:
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((12, 24, 24)) ** 6).astype(np.float32))
    return path


# ------------------------------------------------------------------ the five inputs that used to die


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--sample", "--resolution", "20000", "20000"], "--resolution"),  # 10 GB of targets: MemoryError after 102 s
        (["--sample", "--num_gaussians", "1000000000"], "--num_gaussians"),  # 7.45 GiB traceback after 78 s
        (["--sample", "--max-gaussians", "1000000000"], "--max-gaussians"),  # density control's budget
    ],
)
def test_fit_too_large_for_a_workstation_is_refused_before_allocating(monkeypatch, capsys, tmp_path, extra, flag):
    _with_memory(monkeypatch, WORKSTATION)
    _forbid_allocations(monkeypatch)
    out = tmp_path / "run"
    err = assert_bad_input(capsys, ["fit", *extra, "--out", str(out)], flag, "GiB", "available", unchanged=[out])
    assert err.count("\n") == 1 and "the largest part is" in err
    assert not out.exists()


def test_swc_far_outside_the_volume_is_refused_before_placing_gaussians(monkeypatch, capsys, tmp_path, tiny_tif):
    swc = tmp_path / "far.swc"
    # One edge a billion voxels long, radius 2: 5e8 Gaussians along it.
    swc.write_text("# id type x y z radius parent\n1 1 2 2 2 2 -1\n2 3 1000000000 2 2 2 1\n")
    assert swc_gaussian_count(read_swc(swc), VolumeGeometry((12, 24, 24))) == 499_999_999
    _with_memory(monkeypatch, WORKSTATION)
    _forbid_allocations(monkeypatch)
    out = tmp_path / "run"
    argv = ["fit", "--target", str(tiny_tif), "--swc", str(swc), "--out", str(out)]
    err = assert_bad_input(capsys, argv, "--swc", "499,999,999 Gaussians", "GiB", unchanged=[out])
    assert not out.exists() and err.count("\n") == 1


def test_self_reconstruction_of_a_huge_v7_grid_is_refused_before_voxelising(monkeypatch, capsys, tmp_path):
    count = 6
    path = tmp_path / "v7.pt"
    # A NeuRoGS v7 file: its volume shape is the top-level ``vol_shape`` (see io.checkpoint._geometry).
    torch.save(
        {
            "means": torch.rand(count, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1,
            "log_scales": torch.full((count, 3), -2.5),
            "quaternions": torch.tensor([[1.0, 0.0, 0.0, 0.0]] * count),
            "log_amplitudes": torch.zeros(count),
            "vol_shape": (4000, 4000, 4000),
        },
        path,
    )
    _with_memory(monkeypatch, WORKSTATION)
    _forbid_allocations(monkeypatch)
    out = tmp_path / "run"
    err = assert_bad_input(capsys, ["fit", "--checkpoint", str(path), "--self-reconstruct", "--out", str(out)],
                           "--target", "GiB",
                           "4000 x 4000 x 4000", unchanged=[out, path])  # fmt: skip
    assert not out.exists() and err.count("\n") == 1


def test_two_thousand_views_are_refused_on_a_laptop(monkeypatch, capsys, tmp_path):
    # The model puts 2000 views of the sample at about 18 GiB (14 GiB of them the projections of the 60,000
    # Gaussians of the CPU budget into every view): refused on the laptop, with the number of views that fit.
    _with_memory(monkeypatch, LAPTOP)
    _forbid_allocations(monkeypatch)
    out = tmp_path / "run"
    argv = ["fit", "--sample", "--num_views", "2000", "--out", str(out)]
    err = assert_bad_input(capsys, argv, "--num_views", "GiB", unchanged=[out])
    largest = int(re.search(r"at most ([\d,]+) views", err).group(1).replace(",", ""))
    assert 5 <= largest < 2000
    assert not out.exists()


# ------------------------------------------------------------------ limits come from the model


def _sample_plan(**changes) -> FitPlan:
    geometry = VolumeGeometry((40, 128, 128), (1.5, 0.5, 0.5))
    settings = {"views": make_views(list(VOLUME_VIEWS), geometry), "geometry": geometry, "num_gaussians": 2345,
                "volume_dtype": np.dtype(np.float32)}  # fmt: skip
    settings.update(changes)
    return FitPlan(**settings)


def test_the_gaussians_said_to_fit_do_fit_and_twice_as_many_do_not():
    plan = _sample_plan(num_gaussians=10**9)
    with pytest.raises(ResourceError, match="--num_gaussians") as refused:
        check_fit_resources(plan, "cpu", available=WORKSTATION)
    largest = int(re.search(r"at most ([\d,]+) Gaussians", str(refused.value)).group(1).replace(",", ""))
    check_fit_resources(_sample_plan(num_gaussians=largest), "cpu", available=WORKSTATION)
    with pytest.raises(ResourceError):
        check_fit_resources(_sample_plan(num_gaussians=2 * largest), "cpu", available=WORKSTATION)


def test_the_resolution_said_to_fit_does_fit():
    geometry = VolumeGeometry((40, 128, 128), (1.5, 0.5, 0.5))
    plan = _sample_plan(views=make_views(list(VOLUME_VIEWS), geometry, (20000, 20000)), resolution=(20000, 20000))
    with pytest.raises(ResourceError, match="--resolution") as refused:
        check_fit_resources(plan, "cpu", available=LAPTOP)
    height, width = map(int, re.search(r"--resolution to (\d+) (\d+)", str(refused.value)).groups())
    assert height == width < 20000
    fits = make_views(list(VOLUME_VIEWS), geometry, (height, width))
    check_fit_resources(_sample_plan(views=fits, resolution=(height, width)), "cpu", available=LAPTOP)


def test_downsample_is_advised_without_a_resolution():
    # A 30000 x 30000 xy MIP as the target (no volume in memory): its pixels are what does not fit.
    geometry = VolumeGeometry((4, 30000, 30000))
    plan = FitPlan(make_views(["xy"], geometry), geometry, 1000, init="mips")
    with pytest.raises(ResourceError, match=r"--downsample \d") as refused:
        check_fit_resources(plan, "cpu", available=LAPTOP)
    factor = float(re.search(r"--downsample ([\d.]+)", str(refused.value)).group(1))
    check_fit_resources(replace(plan, views=make_views(["xy"], geometry, factor)), "cpu", available=LAPTOP)


# ------------------------------------------------------------------ normal fits pass


def test_the_sample_fit_passes_on_a_laptop_and_fails_on_almost_nothing(monkeypatch):
    _with_memory(monkeypatch, LAPTOP)
    prepared = prepare_fit(FitInputs(sample=True, device="cpu"))
    assert prepared.model.num_gaussians > 0
    _with_memory(monkeypatch, 64 << 20)
    with pytest.raises(ResourceError, match=r"GiB.*available"):
        prepare_fit(FitInputs(sample=True, device="cpu"))


@pytest.mark.parametrize("available", [LAPTOP, WORKSTATION])
def test_a_100x647x813_volume_with_five_views_and_60000_gaussians_passes(available):
    # Estimated at 0.9 GiB (targets' build 0.4 GiB, the foreground start's copies 0.4 GiB, training 0.9 GiB of
    # which 0.6 GiB is density control's chunk); measured 0.6 GiB above the loaded volume (see preflight).
    geometry = VolumeGeometry(SWC_SHAPE)
    plan = FitPlan(make_views(list(VOLUME_VIEWS), geometry), geometry, 60_000, max_gaussians=60_000,
                   volume_dtype=np.dtype(np.uint16))  # fmt: skip
    estimate = check_fit_resources(plan, "cpu", available=available)
    assert 0.5 * GIB < estimate.total < 1.5 * GIB


def test_prepare_fit_checks_the_device_it_is_given(monkeypatch):
    seen = []

    def available(device="cpu"):
        seen.append(str(device))
        return WORKSTATION

    monkeypatch.setattr(preflight, "available_memory", available)
    prepare_fit(FitInputs(sample=True, device="cpu", view_specs=["xy"], num_gaussians=10))
    assert seen == ["cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            prepare_fit(FitInputs(sample=True, device="cuda", view_specs=["xy"], num_gaussians=10))


# ------------------------------------------------------------------ the model's parts against real arrays


def test_held_targets_are_exactly_sixteen_bytes_a_pixel(monkeypatch):
    _with_memory(monkeypatch, WORKSTATION)
    prepared = prepare_fit(FitInputs(sample=True, device="cpu", resolution=(48, 40), num_gaussians=50))
    targets = prepared.targets
    images = sum(image.nbytes for image in targets.images)
    peaks = sum(peak.nbytes for peak in targets.peaks)
    pixels = sum(v.height * v.width for v in targets.views)
    assert images == 4 * pixels and peaks == 12 * pixels
    plan = _sample_plan(views=targets.views)
    held = [p for p in estimate_fit_memory(plan, "cpu").parts if p.stage == "held"]
    assert [p.nbytes for p in held] == [images + peaks]


def test_swc_count_matches_init_from_swc():
    geometry = VolumeGeometry((20, 30, 40), (2.0, 0.5, 0.4))
    rng = np.random.default_rng(1)
    positions = rng.uniform(0, 30, (12, 3))
    parents = np.array([-1, 0, 1, 1, 3, 4, 0, 6, -1, 8, 9, 2])
    for radii in (rng.uniform(0, 3, 12), np.zeros(12)):
        skeleton = Skeleton(positions, radii, parents)
        assert swc_gaussian_count(skeleton, geometry) == init_from_swc(skeleton, geometry).num_gaussians
    roots = Skeleton(positions[:3], np.ones(3), np.array([-1, -1, -1]))
    assert swc_gaussian_count(roots, geometry) == init_from_swc(roots, geometry).num_gaussians == 3


def test_available_memory_is_a_positive_int():
    for device in ("cpu", "auto"):
        free = available_memory(device)
        assert isinstance(free, int) and free > 0


def test_density_control_sizes_training_for_the_budget():
    small = estimate_fit_memory(_sample_plan(max_gaussians=1000), "cpu")
    large = estimate_fit_memory(_sample_plan(max_gaussians=100_000), "cpu")
    off = estimate_fit_memory(_sample_plan(max_gaussians=100_000, densify=False), "cpu")
    assert small.total < large.total and off.total < small.total


# ------------------------------------------------------------------ render / eval


def test_render_check_refuses_huge_images_and_the_field_of_a_huge_grid():
    geometry = VolumeGeometry((40, 128, 128), (1.5, 0.5, 0.5))
    views = make_views(list(AXIS_VIEWS), geometry)
    assert check_render_resources(10_000, views, "cpu", geometry=geometry, available=LAPTOP).total < GIB
    huge = make_views(list(AXIS_VIEWS), geometry, (30000, 30000))
    with pytest.raises(ResourceError, match=r"--resolution to \d+ \d+"):
        check_render_resources(10_000, huge, "cpu", geometry=geometry, resolution=(30000, 30000), available=LAPTOP)
    grid = VolumeGeometry((4000, 4000, 4000))
    with pytest.raises(ResourceError, match="--mode"):
        check_render_resources(10, make_views(["xy"], grid, (64, 64)), "cpu", geometry=grid, mode="field",
                               available=WORKSTATION)  # fmt: skip
    # The same views without the field fit.
    check_render_resources(10, make_views(["xy"], grid, (64, 64)), "cpu", geometry=grid, available=WORKSTATION)


def test_cgroup_headroom_is_the_limit_minus_the_usage(tmp_path):
    (tmp_path / "memory.max").write_text(f"{2 * GIB}\n")
    (tmp_path / "memory.current").write_text(f"{GIB // 2}\n")
    assert cgroup_headroom(tmp_path) == GIB + GIB // 2
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_headroom(tmp_path) is None
    assert cgroup_headroom(tmp_path / "absent") is None


def test_cuda_checks_training_against_the_gpu_and_the_rest_against_the_host(monkeypatch):
    # No GPU is needed: the estimate only reads shapes, and the memory of each pool is patched.
    def available(device="cpu"):
        return WORKSTATION if torch.device(device).type == "cpu" else GIB

    monkeypatch.setattr(preflight, "available_memory", available)
    cuda = torch.device("cuda")
    plan = _sample_plan(max_gaussians=10_000_000)
    estimate = estimate_fit_memory(plan, cuda)
    on_gpu = {p.stage for p in estimate.parts if p.on_device}
    assert estimate.split and on_gpu == {"training"} and estimate.peak(True) > 4 * GIB
    with pytest.raises(ResourceError, match=r"cuda memory.*--max-gaussians"):
        check_fit_resources(plan, cuda)
    check_fit_resources(_sample_plan(max_gaussians=100_000), cuda)
