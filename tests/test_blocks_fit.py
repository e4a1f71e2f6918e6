"""Block-wise fits on a dask LocalCluster: restart after a kill, the merged checkpoint in every tool, the CLI.

The volume is two synthetic neurons side by side (16 x 64 x 128 voxels), cut into
8 blocks of 16 x 32 x 32 with a halo of 6 voxels, 20 steps per block.  Most runs use
two workers as threads of the test process (``processes=False``): the tests are
about what is written, skipped and merged, and worker processes would spend most
of the test's time importing torch; one test runs real worker processes, and the
benchmark (``benchmarks/bench_blocks.py``) checks their memory limit on a volume
larger than it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dask.distributed")
pytest.importorskip("zarr")

from napari_neurogs_mip import cli
from napari_neurogs_mip.blocks import BlockFitError, ClusterSpec, fit_blocks
from napari_neurogs_mip.blocks.command import add_fit_blocks_parser, run_fit_blocks
from napari_neurogs_mip.blocks.merge import block_models
from napari_neurogs_mip.blocks.mips import render_view
from napari_neurogs_mip.frames import Frame, VolumeGeometry
from napari_neurogs_mip.io.checkpoint import load_checkpoint
from napari_neurogs_mip.io.lazy import write_ome_zarr
from napari_neurogs_mip.io.run_folder import RunFolderError
from napari_neurogs_mip.io.tiff import write_volume
from napari_neurogs_mip.prepare import FitInputs, prepare_fit
from napari_neurogs_mip.render import Renderer
from napari_neurogs_mip.sample import procedural_skeleton, synthesize
from napari_neurogs_mip.train import FitConfig, StepEvent, Trainer
from napari_neurogs_mip.views import make_views

SPACING = (1.5, 0.5, 0.5)
SETTINGS = {"block": (16, 32, 32), "halo": 6, "view_specs": ["xy", "xz", "yz"]}
THREADS = ClusterSpec(workers=2, processes=False)


def config() -> FitConfig:
    return FitConfig(iterations=20, densify_every=10, device="cpu")


class PreemptedError(Exception):
    """Stands for the job being killed."""


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | np.ndarray]:
    folder = tmp_path_factory.mktemp("blocks")
    shape = (16, 64, 64)
    neurons = [synthesize(procedural_skeleton(shape, seed=s), shape, seed=s).noisy for s in (1, 2)]
    data = np.concatenate(neurons, axis=2)
    zarr_path = folder / "volume.ome.zarr"
    with write_ome_zarr(zarr_path, data.shape, "float32", (16, 32, 32), SPACING) as array:
        array[:] = data
    return {"data": data, "zarr": zarr_path, "tiff": write_volume(folder / "volume.tif", data, SPACING), "dir": folder}


@pytest.fixture(scope="module")
def clean(volume: dict) -> Path:
    """An uninterrupted run: the reference every other run must reproduce."""
    result = fit_blocks(volume["zarr"], volume["dir"] / "clean", **SETTINGS, config=config(), cluster=THREADS,
                        log=lambda line: None)  # fmt: skip
    assert len(result.fitted) == 8 and not result.empty and not result.done_before
    return result.checkpoint


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.tensors()


def _assert_same_model(path: Path, reference: Path) -> None:
    for name, tensor in _tensors(path).items():
        assert torch.equal(tensor, _tensors(reference)[name]), name


def test_a_killed_run_run_again_skips_finished_blocks_and_equals_a_clean_run(
    volume: dict, clean: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"

    def kill_after_three(record: dict, done: int, total: int) -> None:
        if done == 3:
            raise PreemptedError

    with pytest.raises(PreemptedError):
        fit_blocks(volume["zarr"], out, **SETTINGS, config=config(), cluster=THREADS, on_block=kill_after_three,
                   log=lambda line: None)  # fmt: skip
    finished = sorted(p.stem for p in (out / "blocks").glob("*.json"))
    # The three reported, and any that were already running when the job died (they finished and wrote).
    assert 3 <= len(finished) < 8
    assert not (out / "neurogs_renderer_optimized.pt").exists()
    again = fit_blocks(volume["zarr"], out, **SETTINGS, config=config(), cluster=THREADS, log=lambda line: None)
    assert again.done_before == finished
    assert sorted(again.fitted) == sorted(set(b.name for b in again.blocks) - set(finished))
    _assert_same_model(again.checkpoint, clean)
    # Once more: nothing left to fit, the same model.
    third = fit_blocks(volume["zarr"], out, **SETTINGS, config=config(), cluster=THREADS, log=lambda line: None)
    assert third.fitted == [] and len(third.done_before) == 8
    _assert_same_model(third.checkpoint, clean)


def test_a_run_with_other_settings_in_the_same_folder_is_refused(volume: dict, clean: Path) -> None:
    with pytest.raises(RunFolderError, match=r"--out .*clean holds a block run with other settings \(block"):
        fit_blocks(volume["zarr"], clean.parent, **{**SETTINGS, "block": 24}, config=config(), cluster=THREADS,
                   log=lambda line: None)  # fmt: skip


def test_merged_checkpoint_is_the_whole_volume_in_every_tool(
    volume: dict, clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from napari_neurogs_mip._napari._reader import get_reader

    checkpoint = load_checkpoint(clean)
    geometry = VolumeGeometry(volume["data"].shape, SPACING)
    assert checkpoint.model.geometry == geometry and checkpoint.model.frame is Frame.NEUROGS
    assert checkpoint.metadata["blocks"]["fitted"] == 8
    assert [v["name"] for v in checkpoint.metadata["views"]] == ["xy", "xz", "yz"]
    assert cli.main(["info", str(clean)]) == 0
    assert f"{checkpoint.model.num_gaussians} Gaussians" in capsys.readouterr().out
    assert cli.main(["render", str(clean), "--out", str(tmp_path / "mips")]) == 0
    assert sorted(p.name for p in (tmp_path / "mips").iterdir()) == ["xy.tif", "xz.tif", "yz.tif"]
    reader = get_reader(str(clean))
    assert reader is not None
    points = reader(str(clean))[0]
    assert points[2] == "points" and len(points[0]) == checkpoint.model.num_gaussians
    # A normal fit takes it as its start, on the whole volume.
    prepared = prepare_fit(FitInputs(target=str(volume["tiff"]), checkpoint=str(clean), view_specs=["xy", "xz", "yz"]))
    assert prepared.model.num_gaussians == checkpoint.model.num_gaussians
    trainer = Trainer(prepared.model, prepared.targets, FitConfig(iterations=2, device="cpu"), prepared.checkpoint)
    steps = [e for e in trainer.run() if isinstance(e, StepEvent)]
    assert [e.iteration for e in steps] == [1, 2] and np.isfinite(steps[-1].terms["loss"])


def test_hard_mip_of_the_merged_model_is_the_max_of_the_blocks_mips(volume: dict, clean: Path) -> None:
    geometry = VolumeGeometry(volume["data"].shape, SPACING)
    views = make_views(["xy", "xz", "yz", "30:20"], geometry)
    renderer = Renderer.create("cpu", "cpu", "max")
    merged = load_checkpoint(clean).model.to_frame(Frame.PHYSICAL)
    parts = block_models(clean.parent / "blocks", {p.stem: json.loads(p.read_text())
                                                   for p in (clean.parent / "blocks").glob("*.json")})  # fmt: skip
    assert sum(m.num_gaussians for m in parts.values()) == merged.num_gaussians
    for view in views:
        union = np.maximum.reduce([render_view(m, view, renderer) for m in parts.values()])
        np.testing.assert_allclose(render_view(merged, view, renderer, tile=48), union, atol=2e-5)


def test_large_views_are_rendered_in_tiles_and_written_as_ome_zarr(
    volume: dict, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zarr

    from napari_neurogs_mip.blocks import mips

    geometry = VolumeGeometry(volume["data"].shape, SPACING)
    views = make_views(["xy", "xz", "30:20"], geometry)
    renderer = Renderer.create("cpu", "cpu", "soft")
    model = load_checkpoint(clean).model.to_frame(Frame.PHYSICAL)
    whole = {v.name: render_view(model, v, renderer) for v in views}
    for view in views:  # the soft MIP of a tile is that of the whole view (float32 sums in another order)
        np.testing.assert_allclose(render_view(model, view, renderer, tile=40), whole[view.name], atol=1e-5)
    monkeypatch.setattr(mips, "LARGE_MIP_PIXELS", 3000)  # xy (8192 pixels) and the orbit view are "large"
    written = mips.write_model_mips(model, views, tmp_path, renderer)
    assert sorted(p.name for p in written) == ["az30_el20.ome.zarr", "xy.ome.zarr", "xz.tif"]
    group = zarr.open_group(str(tmp_path / "xy.ome.zarr"), mode="r")
    multiscale = group.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["y", "x"]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]
    np.testing.assert_allclose(group["0"][:], whole["xy"], atol=1e-6)


def test_merged_mips_are_written_and_score_like_the_blocks(volume: dict, clean: Path) -> None:
    import tifffile

    from napari_neurogs_mip.blocks.merge import pooled_psnr
    from napari_neurogs_mip.metrics import score

    run = clean.parent
    records = [json.loads(p.read_text()) for p in (run / "blocks").glob("*.json")]
    from napari_neurogs_mip.denoise import denoise_along_structures

    saved = load_checkpoint(clean).metadata
    metadata = saved["normalization"]
    # The targets are those a fit of the whole volume has: the MIPs of the volume denoised along its structures
    # (the survey denoises each chunk with a margin, so they are exact).
    denoised = denoise_along_structures(volume["data"], saved["config"]["denoise"])
    for name, axis in (("xy", 0), ("xz", 1), ("yz", 2)):
        target = tifffile.imread(run / "target_mips" / f"{name}.tif")
        np.testing.assert_array_equal(target, denoised.max(axis))
        low, high = metadata["view_lows"][name], metadata["high"]
        normalised = np.clip((target - low) / (high - low), 0, 1)
        merged = score(tifffile.imread(run / "mips" / f"{name}.tif"), normalised)["psnr"]
        # The blocks' own fits (halo included) against their own targets, pooled; the seams must not cost more.
        assert merged > pooled_psnr(records, name) - 1.5, name


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurogs-mip")
    add_fit_blocks_parser(parser.add_subparsers(dest="command"), cli._HelpFormatter)
    return parser


def test_command_line_fits_a_tiff_and_names_bad_flags(
    volume: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    common = ["fit-blocks", "--target", str(volume["tiff"]), "--out", str(out), "--block", "16", "64", "64",
              "--halo", "4", "--views", "xy,xz,yz", "--iterations", "5", "--device", "cpu"]  # fmt: skip
    args = _parser().parse_args([*common, "--workers", "2", "--no-processes"])
    assert run_fit_blocks(args) == 0
    printed = capsys.readouterr()
    assert "2 blocks fitted now" in printed.out and (out / "neurogs_renderer_optimized.pt").is_file()
    assert "plan: 1 x 1 x 2 cores" in printed.out
    bad = {
        "--resolution": [*common, "--resolution", "8", "8", "--no-processes"],
        "--memory-limit": [*common, "--memory-limit", "1GB", "--no-processes"],
        "--workers and --memory-limit": [*common, "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"],
        f"--out {out}": [*common, "--iterations", "6", "--no-processes"],
        "--block takes one value or three": [*common, "--block", "8", "8", "--no-processes"],
    }
    for flag, argv in bad.items():
        assert run_fit_blocks(_parser().parse_args(argv)) == 2, flag
        assert flag in capsys.readouterr().err, flag


def test_a_failing_block_is_named_and_the_others_are_kept(
    volume: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_neurogs_mip.initial_model as init

    original = init.init_from_volume
    calls = []

    def fail_once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return original(*args, **kwargs)

    monkeypatch.setattr(init, "init_from_volume", fail_once)
    out = tmp_path / "failing"
    settings = {**SETTINGS, "block": (16, 64, 32)}
    with pytest.raises(BlockFitError, match=r"1 of 4 blocks failed \(block_z000_y000_x00\d: RuntimeError: disk on"):
        fit_blocks(volume["zarr"], out, **settings, config=FitConfig(iterations=3), cluster=THREADS,
                   log=lambda line: None)  # fmt: skip
    assert len(list((out / "blocks").glob("*.json"))) == 3
    again = fit_blocks(volume["zarr"], out, **settings, config=FitConfig(iterations=3), cluster=THREADS,
                       log=lambda line: None)  # fmt: skip
    assert len(again.fitted) == 1 and len(again.done_before) == 3


def test_worker_processes_fit_blocks_within_their_memory_limit(volume: dict, tmp_path: Path) -> None:
    limit = 1 << 31
    result = fit_blocks(
        volume["zarr"], tmp_path / "processes", **{**SETTINGS, "block": (16, 64, 64)}, config=FitConfig(iterations=3),
        cluster=ClusterSpec(workers=1, memory_limit=limit), log=lambda line: None,
    )  # fmt: skip
    records = result.records.values()
    assert len(records) == 2 and all(r["pid"] != os.getpid() for r in records)
    assert all(0 < r["peak_rss"] < limit for r in records)
