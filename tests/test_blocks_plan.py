"""The block plan (cores, halos, ownership), the survey that skips empty blocks, and the cluster settings."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.distributed")
pytest.importorskip("zarr")

from napari_neurogs_mip.blocks.engine import ClusterSpec, parse_memory, run_tasks, slurm_cluster
from napari_neurogs_mip.blocks.plan import (
    ForegroundRule,
    as_zyx,
    default_block,
    foreground_blocks,
    halo_voxels,
    in_cells,
    plan_blocks,
)
from napari_neurogs_mip.blocks.survey import CELL_RANK, cell_voxels, run_survey, survey_regions
from napari_neurogs_mip.initial_model import find_foreground
from napari_neurogs_mip.io.lazy import open_volume, write_ome_zarr
from napari_neurogs_mip.sample import procedural_skeleton, synthesize


def test_cores_tile_the_volume_once_and_regions_add_the_halo() -> None:
    shape, block, halo = (10, 37, 64), (4, 16, 64), (1, 3, 3)
    blocks = plan_blocks(shape, block, halo)
    cover = np.zeros(shape, dtype=int)
    for b in blocks:
        (z0, z1), (y0, y1), (x0, x1) = b.core
        cover[z0:z1, y0:y1, x0:x1] += 1
        assert all(e - s <= n for (s, e), n in zip(b.core, block))
        for (start, stop), (low, high), h, n in zip(b.core, b.region, halo, shape):
            assert (low, high) == (max(0, start - h), min(n, stop + h))
    assert (cover == 1).all()
    # Near-equal cores (37 = 12 + 12 + 13), not 16 + 16 + 5.
    assert sorted({b.core[1][1] - b.core[1][0] for b in blocks}) == [12, 13]
    assert len({b.name for b in blocks}) == len(blocks) == 3 * 3 * 1
    with pytest.raises(ValueError, match="--block"):
        as_zyx((1, 2), "--block")


def test_every_position_has_exactly_one_owner() -> None:
    shape = (9, 20, 31)
    blocks = plan_blocks(shape, (4, 7, 10), (2, 2, 2))
    rng = np.random.default_rng(0)
    # Voxel coordinates (x, y, z), including the half voxel beyond the outer centres and the faces between cores.
    points = rng.uniform(-0.6, 1.0, (2000, 3)) * (np.array(shape[::-1]) - 0.5)
    points[:50] = np.round(points[:50]) - 0.5
    owners = np.sum([b.owns(points, shape) for b in blocks], axis=0)
    assert (owners == 1).all()


def test_positions_fall_in_the_cells_of_their_voxels() -> None:
    cells = np.zeros((2, 3, 3), bool)
    # Cells of 6 x 8 x 8 voxels from cell (1, 0, 1): [1, 2, 0] is the cell of voxels z 12-17, y 16-23, x 8-15.
    cells[1, 2, 0] = True
    # A position belongs to the voxel whose centre is nearest: 11.6 is voxel 12, 11.4 voxel 11.
    positions = np.array([[11.6, 16, 8], [17.4, 23.4, 15.4], [11.4, 16, 8], [17.6, 20, 10], [0, 0, 0]], float)
    assert in_cells(positions, cells, (1, 0, 1), (6, 8, 8)).tolist() == [True, True, False, False, False]


def test_halo_and_cells_are_physical_distances_per_axis() -> None:
    assert halo_voxels(16, (1.5, 0.5, 0.5)) == (6, 16, 16)
    assert halo_voxels(0, (1.0, 1.0, 1.0)) == (0, 0, 0)
    assert cell_voxels(8, (1.5, 0.5, 0.5)) == (3, 8, 8)
    with pytest.raises(ValueError, match="--halo"):
        halo_voxels(-1, (1.0, 1.0, 1.0))


def test_default_block_shrinks_to_fit_the_worker_memory() -> None:
    def estimate(edge: int) -> float:
        return 1e9 + edge**3 * 100.0

    assert default_block(None, estimate) == 256
    assert default_block(int(4e9), estimate) >= 256
    assert default_block(int(1.5e9), estimate) < 256
    assert default_block(int(1e8), estimate) == 64  # nothing fits: the smallest


@pytest.fixture(scope="module")
def half_neuron(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A neuron in the left half of a 20 x 64 x 128 volume, Poisson noise only in the right half."""
    shape = (20, 64, 64)
    neuron = synthesize(procedural_skeleton(shape, seed=3), shape, seed=3).noisy
    noise = (np.random.default_rng(4).poisson(0.07 * 400, shape) / 400).astype(np.float32)
    volume = np.concatenate([neuron, noise], axis=2)
    path = tmp_path_factory.mktemp("survey") / "half.ome.zarr"
    with write_ome_zarr(path, volume.shape, "float32", (8, 32, 32), (1.5, 0.5, 0.5)) as array:
        array[:] = volume
    return path, volume


def test_survey_gives_exact_mips_and_the_find_foreground_smoothing(half_neuron: tuple[Path, np.ndarray]) -> None:
    from scipy.ndimage import gaussian_filter

    path, volume = half_neuron
    source = open_volume(path)
    cell = (3, 8, 8)
    regions = survey_regions(source.shape_zyx, (7, 32, 32), cell)  # odd storage chunks: whole cells anyway
    assert all(r[0].start % 3 == 0 and r[1].start % 8 == 0 for r in regions)
    survey = run_survey(source, cell, functools.partial(run_tasks, None), lambda done, total: None)
    np.testing.assert_array_equal(survey.mips["xy"], volume.max(0))
    np.testing.assert_array_equal(survey.mips["xz"], volume.max(1))
    np.testing.assert_array_equal(survey.mips["yz"], volume.max(2))
    # The smoothing of find_foreground on the whole volume, though each chunk was blurred alone.
    smoothed = find_foreground(volume, 1.0).smoothed
    padded = np.full((21, 64, 128), -np.inf, np.float32)
    padded[2:18, 2:62, 2:126] = smoothed[2:18, 2:62, 2:126]  # the two outer voxels of each face left out
    cells = padded.reshape(7, 3, 8, 8, 16, 8).transpose(0, 2, 4, 1, 3, 5).reshape(7, 8, 16, -1)
    fourth = np.sort(cells, axis=-1)[..., -CELL_RANK]
    np.testing.assert_allclose(survey.cell_top, fourth, rtol=1e-6)
    np.testing.assert_allclose(survey.cell_sample, smoothed[1::3, 4::8, 4::8], rtol=1e-6)
    np.testing.assert_allclose(gaussian_filter(volume, 1.0, mode="nearest"), smoothed, rtol=1e-6)


def test_foreground_rule_is_find_foregrounds_and_skips_the_empty_half(half_neuron: tuple[Path, np.ndarray]) -> None:
    path, volume = half_neuron
    found = find_foreground(volume, 1.0)
    rule = ForegroundRule.from_cells(found.smoothed, 1.0)
    assert (rule.background, rule.noise, rule.level) == pytest.approx((found.background, found.noise, found.level))
    source = open_volume(path)
    survey = run_survey(source, (3, 8, 8), functools.partial(run_tasks, None), lambda done, total: None)
    cells = survey.cell_top > ForegroundRule.from_cells(survey.cell_sample, 1.0).level
    blocks = plan_blocks(source.shape_zyx, (20, 32, 32), (0, 4, 4))
    keep = {b.index: n > 0 for b, n in zip(blocks, foreground_blocks(blocks, cells, (3, 8, 8)))}
    assert not any(keep[(0, y, x)] for y in (0, 1) for x in (2, 3))  # noise only: skipped
    assert sum(keep[(0, y, x)] for y in (0, 1) for x in (0, 1)) >= 3  # the neuron's blocks are fitted


def test_cluster_settings_name_the_flags() -> None:
    with pytest.raises(ValueError, match=r"--scheduler .*--workers and --memory-limit"):
        ClusterSpec(scheduler="tcp://localhost:8786", workers=2)
    with pytest.raises(ValueError, match=r"--memory-limit .*--no-processes"):
        ClusterSpec(memory_limit="2GB", processes=False)
    with pytest.raises(ValueError, match="--memory-limit 'lots'"):
        parse_memory("lots")
    assert parse_memory("2GB") == 2_000_000_000


def test_local_tasks_collect_failures_and_run_the_rest() -> None:
    results: list[int] = []

    def task(value: int) -> int:
        if value == 2:
            raise ValueError("block 2 failed")
        return value

    failed = run_tasks(None, task, [(v,) for v in range(4)], results.append, keep_going=True)
    assert results == [0, 1, 3] and list(failed) == [2]
    with pytest.raises(ValueError, match="block 2"):
        run_tasks(None, task, [(v,) for v in range(4)], results.append)


def test_slurm_recipe_builds_the_job_script() -> None:
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (pip install dask-jobqueue)")
    cluster = slurm_cluster("16GB", cpus=8, gpus=1, queue="gpu", walltime="04:00:00", account="lab")
    try:
        script = cluster.job_script()
        for line in ("#SBATCH -p gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=15G", "#SBATCH -t 04:00:00",
                     "#SBATCH -A lab", "#SBATCH --gres=gpu:1"):  # fmt: skip
            assert line in script, script
        assert "--nthreads 1" in script and "--memory-limit 14.90GiB" in script
        assert cluster.adapt(minimum=0, maximum=4) is not None  # scales by jobs as blocks wait
    finally:
        cluster.close()


def test_denoised_survey_targets_are_exact_across_chunks(
    half_neuron: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from napari_neurogs_mip.blocks import survey as survey_module
    from napari_neurogs_mip.blocks.survey import Survey
    from napari_neurogs_mip.denoise import denoise_along_structures

    path, volume = half_neuron
    source = open_volume(path)
    monkeypatch.setattr(survey_module, "SURVEY_VOXELS", 1)  # one task per storage chunk: the lines cross chunks
    assert len(survey_regions(source.shape_zyx, source.chunks_zyx, (3, 8, 8))) > 4
    survey = run_survey(source, (3, 8, 8), functools.partial(run_tasks, None), lambda done, total: None, 1.0)
    denoised = denoise_along_structures(volume, 1.0)
    for axis, name in enumerate(("xy", "xz", "yz")):
        np.testing.assert_array_equal(survey.targets[name], denoised.max(axis))
        np.testing.assert_array_equal(survey.mips[name], volume.max(axis))
    key = {"volume": "half"}
    loaded = Survey.load(survey.save(tmp_path / "survey.npz", key), key)
    assert loaded is not None and loaded.denoise == 1.0
    np.testing.assert_array_equal(loaded.targets["yz"], denoised.max(2))
