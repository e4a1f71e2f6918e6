"""Bad inputs: a clear message naming the file or value, exit status 2, and no partial output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import napari_neurogs_mip.train as train_module
from cli_checks import assert_bad_input
from napari_neurogs_mip.cli import main
from napari_neurogs_mip.frames import VolumeGeometry
from napari_neurogs_mip.initial_model import init_from_volume
from napari_neurogs_mip.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from napari_neurogs_mip.sample import Imaging, procedural_skeleton, rasterize_skeleton
from napari_neurogs_mip.targets import targets_from_volume
from napari_neurogs_mip.train import FitConfig, StepEvent, Trainer, TrainingError

K = 6


def _good_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "means": torch.rand(K, 3, generator=generator) * 2 - 1,
        "log_scales": torch.full((K, 3), -2.5),
        "quaternions": torch.tensor([[1.0, 0.0, 0.0, 0.0]] * K),
        "log_amplitudes": torch.zeros(K),
    }


def _fit(volume_tif: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--target", str(volume_tif), "--out", str(out), "--iterations", "2", "--backend", "torch",
            "--device", "cpu", "--num_gaussians", "20", *extra]  # fmt: skip


# ------------------------------------------------------------------ checkpoints
def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, fragments its message must hold)."""
    cases = {}
    text = tmp_path / "notes.pt"
    text.write_text("hello: this is a YAML file, not a checkpoint\n" * 4)
    cases["not-a-torch-file"] = (text, ["notes.pt", "not a readable PyTorch checkpoint"])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    cases["random-bytes"] = (noise, ["noise.pt", "not a readable PyTorch checkpoint"])
    unknown = tmp_path / "unknown.pt"
    torch.save({"weights": torch.zeros(4, 3), "bias": torch.zeros(4), "epoch": 3}, unknown)
    cases["unknown-keys"] = (unknown, ["unknown.pt", "weights [4, 3]", "bias [4]", "epoch", "log_amplitudes",
                                       "log_intensities", "model_state_dict"])  # fmt: skip
    shapes = tmp_path / "shapes.pt"
    torch.save({**_good_tensors(), "log_scales": torch.zeros(K, 2)}, shapes)
    cases["wrong-shapes"] = (shapes, ["shapes.pt", "log_scales has shape (6, 2)", "(6, 3)"])
    nan = tmp_path / "nan.pt"
    tensors = _good_tensors()
    tensors["log_amplitudes"][2] = float("nan")
    torch.save({"model_state_dict": tensors}, nan)
    cases["nan"] = (nan, ["nan.pt", "log_amplitudes holds 1 NaN"])
    empty = tmp_path / "empty.pt"
    torch.save({name: tensor[:0] for name, tensor in _good_tensors().items()}, empty)
    cases["k0"] = (empty, ["empty.pt", "K = 0"])
    colour = tmp_path / "gs.pt"
    torch.save({"means": torch.zeros(K, 3), "quats": torch.zeros(K, 4), "log_scales": torch.zeros(K, 3),
                "logit_opacity": torch.zeros(K, 1), "features": torch.zeros(K, 3)}, colour)  # fmt: skip
    cases["3dgs"] = (colour, ["gs.pt", "3DGS-style", "not a MIP intensity model"])
    return cases


CHECKPOINT_CASES = ["not-a-torch-file", "random-bytes", "unknown-keys", "wrong-shapes", "nan", "k0", "3dgs"]


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_through_every_command(tmp_path, capsys, volume_tif, case):
    path, fragments = _bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out"
    assert_bad_input(capsys, [*_fit(volume_tif, out), "--checkpoint", str(path)], *fragments, unchanged=[out])
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    assert_bad_input(capsys, ["render", str(path), "--out", str(rendered / "mips.tif"), "--shape", "8", "16", "16",
                               "--backend", "torch", "--device", "cpu"], *fragments, unchanged=[rendered])  # fmt: skip
    assert_bad_input(capsys, ["info", str(path)], *fragments)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_truncated_real_checkpoint(shared_checkpoints, tmp_path, capsys, volume_tif):
    source = shared_checkpoints[0]
    data = source.read_bytes()
    cut = tmp_path / f"half_{source.name}"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_bad_input(capsys, [*_fit(volume_tif, out), "--checkpoint", str(cut)], cut.name, "truncated", unchanged=[out])
    assert_bad_input(capsys, ["info", str(cut)], cut.name)


def test_truncated_own_checkpoint(tmp_path, capsys):
    geometry = VolumeGeometry((8, 16, 16))
    model = init_from_volume(np.random.default_rng(0).random((8, 16, 16)), geometry, 50, 0.0, 1.0)
    data = save_checkpoint(tmp_path / "ours.pt", model).read_bytes()
    for fraction in (0.5, 0.9, 0.1):
        cut = tmp_path / f"cut{fraction}.pt"
        cut.write_bytes(data[: int(len(data) * fraction)])
        assert_bad_input(capsys, ["info", str(cut)], cut.name, "not a readable PyTorch checkpoint")


# ------------------------------------------------------------------ targets
def test_non_tiff_target(tmp_path, capsys):
    path = tmp_path / "stack.tif"
    path.write_text("this is not a TIFF")
    out = tmp_path / "out"
    assert_bad_input(capsys, _fit(path, out), "stack.tif", "not a readable TIFF", unchanged=[out])
    assert_bad_input(capsys, ["fit", "--target", str(tmp_path / "missing.tif"), "--out", str(out)], "missing.tif",
                      unchanged=[out])  # fmt: skip


def test_2d_tiff_where_3d_is_needed(tmp_path, capsys):
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((20, 20)).astype(np.float32))
    out = tmp_path / "out"
    assert_bad_input(capsys, _fit(path, out), "plane.tif", "2D", "3D", unchanged=[out])


def test_5d_hyperstack_without_axis_choice(tmp_path, capsys):
    path = tmp_path / "hyper.tif"
    data = np.random.default_rng(0).random((2, 6, 3, 20, 20)).astype(np.float32)
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TZCYX"})
    out = tmp_path / "out"
    assert_bad_input(capsys, _fit(path, out), "hyper.tif", "T=2", "C=3", "--time", unchanged=[out])
    assert_bad_input(capsys, _fit(path, out, "--time", "1"), "hyper.tif", "choose a channel", unchanged=[out])
    assert_bad_input(capsys, _fit(path, out, "--time", "1", "--channel", "3"), "hyper.tif", "index 3", unchanged=[out])


def test_constant_volume(tmp_path, capsys):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.full((8, 20, 20), 7.0, dtype=np.float32))
    out = tmp_path / "out"
    assert_bad_input(capsys, _fit(path, out), "constant", "low=7.0, high=7.0", unchanged=[out])


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--iterations", "0"], ["iterations", "got 0"]),
        (["--iterations", "-5"], ["iterations", "got -5"]),
        (["--lr", "0"], ["lr", "got 0.0"]),
        (["--lr", "-0.01"], ["lr", "got -0.01"]),
        (["--lr", "nan"], ["lr", "got nan"]),
        (["--resolution", "0", "16"], ["--resolution", "got 0"]),
        (["--resolution", "16", "-3"], ["--resolution", "got -3"]),
        (["--downsample", "0"], ["--downsample", "got 0"]),
        (["--downsample", "-2"], ["--downsample", "got -2"]),
        (["--downsample", "0.5"], ["downsampling factor", "got 0.5"]),
        (["--voxel-size", "1", "0", "1"], ["--voxel-size", "got 0"]),
        (["--num_views", "0"], ["--num_views", "got 0"]),
        (["--views", "xy,sideways"], ["sideways"]),
        (["--resolution", "8", "8"], ["smaller than the 11-pixel SSIM window"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None,
)
def test_bad_settings(tmp_path, capsys, volume_tif, flags, fragments):
    out = tmp_path / "out"
    args = _fit(volume_tif, out)
    if "--iterations" in flags:
        index = args.index("--iterations")
        del args[index : index + 2]
    assert_bad_input(capsys, [*args, *flags], *fragments, unchanged=[out])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, capsys, volume_tif):
    out = tmp_path / "out"
    args = [a if a != "cpu" else "cuda" for a in _fit(volume_tif, out)]
    assert_bad_input(capsys, args, "device 'cuda'", "not available", unchanged=[out])


def test_unwritable_out(tmp_path, capsys, volume_tif):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file where a folder should be")
    out = blocker / "run"
    assert_bad_input(capsys, _fit(volume_tif, out), str(out), "a_file", "not a writable folder")
    assert blocker.read_text() == "a regular file where a folder should be"
    volume = np.zeros((4, 8, 8))
    volume[2, 2:6, 1:7] = 8.0
    model = init_from_volume(volume, VolumeGeometry((4, 8, 8)), 5, 0.0, 8.0)
    checkpoint = save_checkpoint(tmp_path / "ok.pt", model)
    assert_bad_input(capsys, ["render", str(checkpoint), "--out", str(blocker / "mips.tif"), "--backend", "torch",
                               "--device", "cpu"], "a_file")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "ok.pt", "volume.tif"]


# ------------------------------------------------------------------ NaN while fitting
def test_nan_during_training_raises_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    geometry = VolumeGeometry((12, 32, 32), (2.0, 1.0, 1.0))
    volume = rasterize_skeleton(procedural_skeleton(geometry.shape_zyx, 2), geometry.shape_zyx, Imaging(photons=0.0))
    targets = targets_from_volume(volume, geometry, ["xy", "xz", "yz"])
    model = init_from_volume(volume, geometry, 100, targets.low, targets.high).to_frame("neurogs", geometry)
    out = tmp_path / "out"
    trainer = Trainer(model, targets, FitConfig(iterations=10, save_every=2, device="cpu", backend="torch",
                                                out=str(out)))  # fmt: skip
    real_loss = train_module.mip_loss

    def nan_loss(rendered, target_images, weights):
        # A target pixel turned NaN, as a broken input stack would give.
        broken = [target_images[0].clone(), *target_images[1:]]
        broken[0][3, 5] = float("nan")
        return real_loss(rendered, broken, weights)

    good = None
    with pytest.raises(TrainingError, match="iteration 4") as raised:
        for event in trainer.run():
            if isinstance(event, StepEvent) and event.iteration == 3:
                good = {n: t.detach().clone() for n, t in trainer.model.tensors().items()}
                monkeypatch.setattr(train_module, "mip_loss", nan_loss)
    assert "left at iteration 3" in str(raised.value)
    assert trainer.iteration == 3
    for name, tensor in trainer.model.tensors().items():
        assert torch.equal(tensor.detach(), good[name]), f"{name} changed by the failed step"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_iter2.pt"]
    last = load_checkpoint(out / "checkpoint_iter2.pt")
    assert last.iteration == 2 and last.model.num_gaussians == 100
    assert all(bool(torch.isfinite(t).all()) for t in last.model.tensors().values())
    # The trainer can still save its last good state.
    saved = load_checkpoint(trainer.save(out / "after.pt"))
    assert saved.iteration == 3
    for name, tensor in saved.fit_model.tensors().items():
        assert torch.equal(tensor, good[name])


def test_nan_during_a_cli_fit_exits_1_without_a_final_file(tmp_path, capsys, monkeypatch, volume_tif):
    real_loss = train_module.mip_loss

    def nan_loss(rendered, target_images, weights):
        total, terms = real_loss(rendered, target_images, weights)
        return total * float("nan"), {**terms, "loss": float("nan")}

    monkeypatch.setattr(train_module, "mip_loss", nan_loss)
    out = tmp_path / "out"
    assert main(_fit(volume_tif, out)) == 1
    err = capsys.readouterr().err
    assert "NaN/Inf at iteration 1" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
