"""The command line end to end: fit, render, info, YAML config, self-reconstruction."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile
import torch

from napari_neurogs_mip.cli import main
from napari_neurogs_mip.frames import Frame, VolumeGeometry
from napari_neurogs_mip.io.checkpoint import load_checkpoint, save_checkpoint
from napari_neurogs_mip.io.tiff import read_mips, write_volume
from napari_neurogs_mip.losses import psnr
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.prepare import FitInputs, prepare_fit
from napari_neurogs_mip.render import render_mip
from napari_neurogs_mip.render.field import field_mips, voxelize
from napari_neurogs_mip.train import FINAL_NAME
from napari_neurogs_mip.views import make_views

# view, set, PSNR, foreground PSNR, recall, SSIM (the table of ``metrics.format_table``)
PSNR_ROW = re.compile(
    r"^(xy|xz|yz)\s+trained\s+(-?[\d.]+|inf)\s+(-?[\d.]+|inf|nan)\s+([\d.]+|nan)\s+(-?[\d.]+|nan)\s", re.MULTILINE
)


def _small_model(geometry: VolumeGeometry) -> GaussianModel:
    """A few Gaussians in the NeuRoGS frame of ``geometry``."""
    means = torch.tensor([[-0.5, -0.4, -0.2], [0.3, 0.5, 0.1], [0.6, -0.6, 0.5], [0.0, 0.1, -0.6]])
    return GaussianModel(
        means=means,
        log_scales=torch.log(torch.tensor([[0.15, 0.1, 0.3]] * 4)),
        quaternions=torch.tensor([[1.0, 0.2, 0.0, 0.1]] * 4),
        log_amplitudes=torch.log(torch.tensor([0.9, 0.6, 0.7, 0.8])),
        frame=Frame.NEUROGS,
        geometry=geometry,
    )


def test_fit_sample(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(
        ["fit", "--sample", "--iterations", "20", "--out", str(out), "--backend", "torch", "--downsample", "2",
         "--views", "xy,xz,yz"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == [FINAL_NAME]
    assert re.search(r"device cpu, renderer backend torch \(requested torch\)", captured.out)
    rows = PSNR_ROW.findall(captured.out)
    assert [r[0] for r in rows] == ["xy", "xz", "yz"], captured.out
    assert all(header in captured.out for header in ("PSNR", "fg PSNR", "recall", "SSIM"))
    for _, value, _, recall, similarity in rows:
        assert 15.0 < float(value) < 80.0 and 0.0 < float(similarity) <= 1.0 and 0.0 <= float(recall) <= 1.0
    checkpoint = load_checkpoint(out / FINAL_NAME)
    assert checkpoint.family == "napari-neurogs-mip" and checkpoint.iteration == 20
    assert checkpoint.model.frame is Frame.NEUROGS
    # The foreground sets the count (no --num_gaussians); the CLI says how many it placed.
    placed = re.search(r"model: (\d+) Gaussians spread over the foreground", captured.out)
    assert placed and checkpoint.model.num_gaussians == int(placed.group(1)) > 500
    assert checkpoint.model.geometry == VolumeGeometry((40, 128, 128), (1.5, 0.5, 0.5))
    assert [(v["name"], v["height"], v["width"]) for v in checkpoint.metadata["views"]] == [
        ("xy", 64, 64), ("xz", 20, 64), ("yz", 20, 64)
    ]  # fmt: skip
    history = checkpoint.metadata["loss_history"]
    assert len(history) == 20 and history[-1] < history[0]
    # The printed PSNRs are those of the saved model against the sample's targets.
    targets = prepare_fit(FitInputs(sample=True, resolution=2.0, view_specs=["xy", "xz", "yz"])).targets
    with torch.no_grad():
        images = render_mip(checkpoint.model.to_frame(Frame.PHYSICAL), targets.views, backend="torch")
    for (name, value, *_), image, target in zip(rows, images, targets.tensors("cpu")):
        assert psnr(image, target) == pytest.approx(float(value), abs=0.02), name


def test_render_writes_one_calibrated_imagej_tiff_per_view(tmp_path, capsys):
    geometry = VolumeGeometry((16, 24, 20), (2.0, 0.5, 0.25))
    path = save_checkpoint(tmp_path / "model.pt", _small_model(geometry))
    out = tmp_path / "mips"
    status = main(["render", str(path), "--out", str(out), "--views", "xy,xz,yz,30:15", "--mode", "soft",
                   "--backend", "torch", "--device", "cpu", "--downsample", "2"])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "renderer backend torch" in captured.out and "wrote 4 MIPs" in captured.out
    views = make_views(["xy", "xz", "yz", "30:15"], geometry, 2)
    expected = render_mip(_small_model(geometry).to_frame(Frame.PHYSICAL), views, mode="soft", backend="torch")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{v.name}.tif" for v in views)
    for view, image in zip(views, expected):
        file = out / f"{view.name}.tif"
        # What Fiji reads: an ImageJ file in micrometres, with the pixel size in the resolution tags.
        with tifffile.TiffFile(file) as tif:
            assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
            assert json.loads(tif.imagej_metadata["Info"])["view"] == view.name
            page = tif.pages[0]
            x_num, x_den = page.tags["XResolution"].value
            y_num, y_den = page.tags["YResolution"].value
            assert x_num / x_den == pytest.approx(1 / view.du, rel=1e-6)
            assert y_num / y_den == pytest.approx(1 / view.dv, rel=1e-6)
        # tifffile.imread reads the whole view.
        np.testing.assert_allclose(tifffile.imread(file), image.detach().numpy(), atol=1e-6)
    assert views[0].du == pytest.approx(0.5) and views[1].dv == pytest.approx(4.0)  # 2x the voxel spacing

    # Default mode is the field; it renders axis views only and says so.
    field_out = tmp_path / "field.tif"
    assert main(["render", str(path), "--out", str(field_out), "--backend", "torch", "--device", "cpu"]) == 0
    written = read_mips(field_out)  # field_xy.tif, field_xz.tif, field_yz.tif
    assert [image.shape for image in written.values()] == [(24, 20), (16, 20), (16, 24)]
    field = field_mips(_small_model(geometry).to_frame(Frame.PHYSICAL), make_views(["xy", "xz", "yz"], geometry))
    for image, reference in zip(written.values(), field):
        np.testing.assert_allclose(image, reference.numpy(), atol=1e-6)
    capsys.readouterr()
    assert (
        main(["render", str(path), "--out", str(tmp_path / "bad.tif"), "--views", "xy,30:15", "--backend", "torch"])
        == 2
    )
    assert "axis views only" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*.tif"))


def test_info_on_checkpoint_and_tiff(tmp_path, capsys):
    geometry = VolumeGeometry((16, 24, 20), (2.0, 0.5, 0.25))
    path = save_checkpoint(tmp_path / "model.pt", _small_model(geometry), iteration=7, extra={"seed": 5})
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "napari-neurogs-mip checkpoint, 4 Gaussians, neurogs frame" in text
    assert "(16, 24, 20)" in text and "(2.0, 0.5, 0.25)" in text
    assert "iteration: 7" in text and "seed: 5" in text
    assert re.search(r"amplitudes: min 0\.6, max 0\.9", text)

    volume = np.zeros((5, 6, 7), dtype=np.float32)
    volume[2, 3, 4] = 3.5
    tif = write_volume(tmp_path / "stack.tif", volume, (2.5, 0.5, 0.25))
    assert main(["info", str(tif)]) == 0
    text = capsys.readouterr().out
    assert "volume (Z, Y, X) (5, 6, 7)" in text and "range [0, 3.5]" in text
    assert "(2.5, 0.5, 0.25) (ImageJ)" in text


def test_info_on_real_checkpoint(shared_checkpoints, capsys):
    for path in shared_checkpoints:
        assert main(["info", str(path)]) == 0
        text = capsys.readouterr().out
        assert re.search(r"(end-to-end|splat) checkpoint, \d+ Gaussians, (unit|neurogs) frame", text), text


def test_yaml_config_sets_defaults_and_flags_win(tmp_path, capsys):
    config = tmp_path / "settings.yaml"
    config.write_text(
        "iterations: 7\nlr: 0.005\nlambda_ssim: 0.2\ndownsample: 3\nnum_gaussians: 60\n"
        "backend: torch\ndevice: cpu\nsave-every: 2\nseed: 3\n"
    )
    out = tmp_path / "run"
    status = main(["fit", "--sample", "--config", str(config), "--iterations", "3", "--seed", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    checkpoint = load_checkpoint(out / FINAL_NAME)
    settings = checkpoint.metadata["config"]
    assert settings["iterations"] == 3 and settings["seed"] == 4  # flags win
    assert settings["lr"] == 0.005 and settings["lambda_ssim"] == 0.2 and settings["save_every"] == 2  # from YAML
    assert settings["backend"] == "torch" and settings["device"] == "cpu"
    assert checkpoint.model.num_gaussians == 60 and checkpoint.iteration == 3
    # The default views of a volume: the three axis views and two oblique ones.
    assert [(v["height"], v["width"]) for v in checkpoint.metadata["views"]] == [
        (43, 43), (13, 43), (13, 43), (66, 60), (66, 60)
    ]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_iter2.pt", FINAL_NAME]

    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: 3\nlearning_rate: 0.1\n")
    assert main(["fit", "--sample", "--config", str(bad), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "learning_rate" in err and "lr" in err
    assert not (tmp_path / "bad").exists()


def test_self_reconstruction_targets_are_exact_field_mips(shared_dir):
    path = shared_dir / "data" / "checkpoints" / "splat_wmse_v2_ep100.pt"
    prepared = prepare_fit(FitInputs(checkpoint=str(path), resolution=8, self_reconstruct=True))
    checkpoint = load_checkpoint(path)
    assert prepared.targets.geometry == checkpoint.model.geometry
    volume = voxelize(checkpoint.model.to_frame(Frame.PHYSICAL)).numpy()  # 128^3: the grid the file is assumed on
    # Normalised by the field's peak (at least 1), the same for every view.
    high = max(1.0, float(volume.max()))
    assert (prepared.targets.low, prepared.targets.high) == (0.0, pytest.approx(high, rel=1e-6))
    for image, axis in zip(prepared.targets.images, (0, 1, 2)):
        assert image.shape == (16, 16)
        blocks = volume.max(axis=axis).reshape(16, 8, 16, 8).mean(axis=(1, 3))  # 8 x 8 area averages
        np.testing.assert_allclose(image, blocks / high, atol=1e-6)


def test_fit_self_reconstruction_of_real_checkpoint(shared_dir, tmp_path, capsys):
    path = shared_dir / "data" / "checkpoints" / "pipeline_final_model.pt"
    out = tmp_path / "run"
    argv = ["fit", "--checkpoint", str(path), "--iterations", "3", "--downsample", "8", "--backend", "torch",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    # A checkpoint alone is a start, not a target: self-reconstruction only when asked for.
    assert main(argv) == 2
    assert "--self-reconstruct" in capsys.readouterr().err and not out.exists()
    status = main([*argv, "--self-reconstruct"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "self-reconstruction" in captured.out and "(100, 647, 813)" in captured.out
    assert [r[0] for r in PSNR_ROW.findall(captured.out)] == ["xy", "xz", "yz"]
    result = load_checkpoint(out / FINAL_NAME)
    original = load_checkpoint(path)
    assert result.iteration == 3 and result.model.frame is Frame.NEUROGS
    assert result.model.num_gaussians == original.model.num_gaussians == 10037
    assert result.model.geometry.shape_zyx == (100, 647, 813)
    assert [(v["height"], v["width"]) for v in result.metadata["views"]] == [(81, 102), (12, 102), (12, 81)]
    # Three small steps from the original parameters for the Gaussians inside the volume; the file's
    # Gaussians outside it (1685 of them) are clamped into the box, half a voxel beyond the outer voxels.
    half_voxel = 1.0 / (torch.tensor((813, 647, 100)) - 1)
    inside = (original.model.means.abs() <= 1).all(dim=1)
    assert int((~inside).sum()) == 1685
    moved = (result.model.means - original.model.means)[inside].abs().max()
    assert 0 < float(moved) < 0.05
    assert bool((result.model.means.abs() <= 1 + half_voxel + 1e-5).all())


def test_yaml_resolution_gives_way_to_flags(tmp_path, capsys):
    config = tmp_path / "settings.yaml"
    config.write_text("resolution: [20, 20]\nviews: xy,xz\nnum_gaussians: 40\nbackend: torch\ndevice: cpu\n")
    out = tmp_path / "run"
    argv = ["fit", "--sample", "--config", str(config), "--iterations", "1", "--out", str(out)]
    assert main([*argv, "--downsample", "3", "--num_views", "1"]) == 0, capsys.readouterr().err
    views = load_checkpoint(out / FINAL_NAME).metadata["views"]
    assert [(v["name"], v["height"], v["width"]) for v in views] == [("xy", 43, 43)]
    # Without the flags, the file's settings hold.
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    views = load_checkpoint(out / FINAL_NAME).metadata["views"]
    assert [(v["name"], v["height"], v["width"]) for v in views] == [("xy", 20, 20), ("xz", 20, 20)]


def test_fit_without_ssim_on_views_smaller_than_its_window(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["fit", "--sample", "--iterations", "2", "--resolution", "8", "8", "--lambda_ssim", "0",
                   "--num_gaussians", "40", "--backend", "torch", "--device", "cpu", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    rows = re.findall(r"^(xy|xz|yz)\s+trained\s+([\d.]+)\s+\S+\s+\S+\s+nan\s", captured.out, re.MULTILINE)
    assert [r[0] for r in rows] == ["xy", "xz", "yz"], captured.out
    assert load_checkpoint(out / FINAL_NAME).iteration == 2


def test_info_and_render_take_a_channel_of_a_hyperstack(tmp_path, capsys):
    data = np.random.default_rng(0).random((2, 6, 3, 12, 14)).astype(np.float32)  # T, Z, C, Y, X
    stack = tmp_path / "hyper.tif"
    tifffile.imwrite(stack, data, imagej=True, resolution=(4.0, 2.0), metadata={"axes": "TZCYX", "spacing": 3.0})
    # Without --channel, info describes every channel (at the first time point, and says so).
    assert main(["info", str(stack)]) == 0
    text = capsys.readouterr().out
    assert "3 channels (0-based" in text and "time point 0 of 2" in text
    for channel in range(3):
        values = data[0, :, channel]
        assert (
            f"channel {channel}: volume (Z, Y, X) (6, 12, 14), range [{values.min():.4g}, {values.max():.4g}]" in text
        )
    assert main(["info", str(stack), "--channel", "2", "--time", "1"]) == 0
    text = capsys.readouterr().out
    assert "axes TZCYX, volume (Z, Y, X) (6, 12, 14)" in text and "(3.0, 0.5, 0.25) (ImageJ)" in text

    geometry = VolumeGeometry((16, 24, 20), (2.0, 0.5, 0.25))
    model = save_checkpoint(tmp_path / "model.pt", _small_model(geometry))
    out = tmp_path / "mips.tif"
    argv = ["render", str(model), "--out", str(out), "--target", str(stack), "--backend", "torch", "--device", "cpu"]
    assert main([*argv, "--channel", "0", "--time", "0"]) == 0, capsys.readouterr().err
    # The model mapped onto the hyperstack's volume: mips_xy.tif, mips_xz.tif, mips_yz.tif.
    assert [image.shape for image in read_mips(out).values()] == [(12, 14), (6, 14), (6, 12)]
    with tifffile.TiffFile(tmp_path / "mips_xz.tif") as tif:
        x_num, x_den = tif.pages[0].tags["XResolution"].value
        y_num, y_den = tif.pages[0].tags["YResolution"].value
        assert (x_num / x_den, y_num / y_den) == (pytest.approx(4.0), pytest.approx(1 / 3.0))


def test_fit_a_single_xy_mip_with_the_volume_shape(tmp_path, capsys):
    """One 2D MIP says nothing about Z: the shape comes from --volume-shape, or else from the checkpoint."""
    from napari_neurogs_mip.io.tiff import write_mips

    geometry = VolumeGeometry((16, 24, 20), (2.0, 0.5, 0.25))
    model = _small_model(geometry)
    start = save_checkpoint(tmp_path / "start.pt", model)
    (xy,) = field_mips(model.to_frame(Frame.PHYSICAL), make_views(["xy"], geometry))
    (mips,) = write_mips(tmp_path / "xy.tif", {"xy": xy.numpy()}, {"xy": (0.5, 0.25)})
    common = ["fit", "--target-mips", str(mips), "--views", "xy", "--iterations", "3", "--backend", "torch"]

    assert main([*common, "--out", str(tmp_path / "none"), "--swc", str(tmp_path / "absent.swc")]) == 2
    assert "cannot tell the volume's z size" in capsys.readouterr().err

    status = main([*common, "--volume-shape", "16", "24", "20", "--voxel-size", "2", "0.5", "0.25",
                   "--checkpoint", str(start), "--out", str(tmp_path / "given")])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "volume shape (16, 24, 20) given" in captured.out
    assert load_checkpoint(tmp_path / "given" / FINAL_NAME).model.geometry == geometry

    status = main([*common, "--checkpoint", str(start), "--out", str(tmp_path / "from_checkpoint")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert f"volume shape (16, 24, 20) from {start}" in captured.out
    assert load_checkpoint(tmp_path / "from_checkpoint" / FINAL_NAME).model.geometry == geometry


def test_fit_sample_uses_the_cpu_backend_by_default_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = main(["fit", "--sample", "--iterations", "2", "--downsample", "2", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "device cpu" in captured.out and "renderer backend cpu (requested auto)" in captured.out


def test_axis_mips_that_show_every_axis_set_the_shape_over_a_checkpoints(tmp_path):
    rng = np.random.default_rng(4)
    start = save_checkpoint(tmp_path / "start.pt", _small_model(VolumeGeometry((16, 24, 20), (2.0, 0.5, 0.25))))
    mips = {"xy": rng.random((40, 50)), "xz": rng.random((30, 50)), "yz": rng.random((30, 40))}
    prepared = prepare_fit(FitInputs(mips=mips, view_specs=list(mips), checkpoint=str(start)))
    assert prepared.targets.geometry.shape_zyx == (30, 40, 50)
    assert prepared.model.geometry.shape_zyx == (30, 40, 50)
