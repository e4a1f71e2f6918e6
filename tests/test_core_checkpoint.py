"""Checkpoints: the real research files, a raw NeuRoGS v7 file, our own round trip and resume."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_neurogs_mip.frames import Frame, VolumeGeometry
from napari_neurogs_mip.initial_model import init_from_volume
from napari_neurogs_mip.io.checkpoint import load_checkpoint, save_checkpoint
from napari_neurogs_mip.model import GaussianModel
from napari_neurogs_mip.prepare import FitInputs, prepare_fit
from napari_neurogs_mip.render import render_mip
from napari_neurogs_mip.sample import Imaging, procedural_skeleton, rasterize_skeleton
from napari_neurogs_mip.targets import targets_from_volume
from napari_neurogs_mip.train import FINAL_NAME, FinishedEvent, FitConfig, Trainer
from napari_neurogs_mip.views import make_views

# What docs/checkpoints.md says about each real file: family, frame, K, volume, iteration, amplitude key.
DOCUMENTED = {
    "e2e_checkpoint_iter500.pt": ("end-to-end", Frame.UNIT, 10000, None, 500, "log_amplitudes"),
    "splat_wmse_v2_ep100.pt": ("splat", Frame.NEUROGS, 13479, None, 100, "log_intensities"),
    "pipeline_final_model.pt": ("splat", Frame.NEUROGS, 10037, (100, 647, 813), 3000, "log_intensities"),
}
SMALL = VolumeGeometry((24, 32, 32), (2.0, 1.0, 1.0))


def _raw(path):
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data.get("model_state_dict", data)


def _small_volume(geometry: VolumeGeometry) -> np.ndarray:
    shape = geometry.shape_zyx
    return rasterize_skeleton(procedural_skeleton(shape, 1), shape, Imaging(photons=0.0), seed=1)


def test_the_documented_files_are_all_there(shared_checkpoints):
    assert sorted(p.name for p in shared_checkpoints) == sorted(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_real_checkpoint_loads_as_documented(shared_dir, name):
    path = shared_dir / "data" / "checkpoints" / name
    family, frame, k, volume, iteration, amplitude_key = DOCUMENTED[name]
    checkpoint = load_checkpoint(path)
    model = checkpoint.model
    assert (checkpoint.family, model.frame, model.num_gaussians, checkpoint.iteration) == (family, frame, k, iteration)
    assert checkpoint.optimizer_state is None and checkpoint.fit_model is None  # foreign files cannot resume
    raw = _raw(path)
    torch.testing.assert_close(model.means, raw["means"].float(), rtol=0, atol=0)
    torch.testing.assert_close(model.quaternions, raw["quaternions"].float(), rtol=0, atol=0)
    activation = torch.sigmoid if amplitude_key == "log_intensities" else torch.exp
    torch.testing.assert_close(model.amplitudes(), activation(raw[amplitude_key].float()), rtol=1e-5, atol=1e-7)
    if volume is None:
        assert "assumed" in checkpoint.geometry_source
    else:
        assert model.geometry.shape_zyx == volume and "vol_shape" in checkpoint.geometry_source
    # A target's geometry wins over anything the file says.
    mapped = load_checkpoint(path, SMALL)
    assert mapped.model.geometry == SMALL and mapped.geometry_source == "target volume"


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_real_checkpoint_renders_fits_saves_and_reloads(shared_dir, tmp_path, name):
    path = shared_dir / "data" / "checkpoints" / name
    physical = load_checkpoint(path, SMALL).model.to_frame(Frame.PHYSICAL)
    views = make_views(["xy", "xz", "yz"], SMALL, 2)
    with torch.no_grad():
        images = render_mip(physical, views, mode="soft", backend="torch")
    for view, image in zip(views, images):
        assert image.shape == view.shape == ((12, 16) if view.name != "xy" else (16, 16))
        assert bool(torch.isfinite(image).all()) and float(image.min()) >= 0
        assert 0 < float(image.max()) <= float(physical.amplitudes().max()) + 1e-6

    volume = _small_volume(SMALL)
    prepared = prepare_fit(FitInputs(volume=volume, voxel_size=SMALL.spacing_zyx, checkpoint=str(path), resolution=2))
    assert prepared.model.frame is DOCUMENTED[name][1]
    out = tmp_path / "out"
    trainer = Trainer(prepared.model, prepared.targets, FitConfig(iterations=3, device="cpu", backend="torch",
                                                                  out=str(out)))  # fmt: skip
    before = {n: t.detach().clone() for n, t in trainer.model.tensors().items()}
    events = list(trainer.run())
    finished = events[-1]
    assert isinstance(finished, FinishedEvent) and finished.iteration == 3 and not finished.stopped
    assert finished.path == out / FINAL_NAME
    assert sorted(p.name for p in out.iterdir()) == [FINAL_NAME]
    assert any(not torch.equal(before[n], t) for n, t in trainer.model.tensors().items()), "the fit changed nothing"

    reloaded = load_checkpoint(finished.path)
    assert reloaded.family == "napari-neurogs-mip" and reloaded.iteration == 3
    assert reloaded.model.frame is DOCUMENTED[name][1]  # stored in the frame it came in
    assert reloaded.model.geometry == SMALL
    current = trainer.current_model()
    for n, tensor in reloaded.model.tensors().items():
        assert torch.equal(tensor, current.tensors()[n]), n
    for n, tensor in reloaded.fit_model.tensors().items():
        assert torch.equal(tensor, trainer.model.tensors()[n].detach()), n
    assert len(reloaded.metadata["loss_history"]) == 3
    assert [v["name"] for v in reloaded.metadata["views"]] == ["xy", "xz", "yz", "az45_el35", "az135_el-35"]
    # Readable by the research tools: plain torch.load, the 4 NeuRoGS names under model_state_dict.
    plain = torch.load(finished.path, weights_only=True)
    assert set(plain["model_state_dict"]) == {"means", "log_scales", "quaternions", "log_amplitudes"}
    # Saving what was loaded gives the same tensors again.
    again = load_checkpoint(save_checkpoint(tmp_path / "again.pt", reloaded.model))
    for n, tensor in again.model.tensors().items():
        assert torch.equal(tensor, reloaded.model.tensors()[n]), n


def test_raw_neurogs_v7_file_maps_onto_the_target_volume(tmp_path):
    geometry = VolumeGeometry((6, 21, 11), (2.0, 1.0, 0.5))  # Z, Y, X
    z, y, x = (n - 1 for n in geometry.shape_zyx)
    means = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.2, -0.4, 0.6]])
    raw = {
        "means": means,
        "log_scales": torch.log(torch.tensor([[0.2, 0.1, 0.4]] * 3)),  # neurogs units: >= 1 voxel on every axis
        "quaternions": torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.7, 0.0, 0.0, 0.0], [1.3, 0.0, 0.0, 0.0]]),
        "log_amplitudes": torch.log(torch.tensor([0.5, 0.7, 0.9])),
    }
    path = tmp_path / "gmf_refined_best.pt"
    torch.save(raw, path)
    checkpoint = load_checkpoint(path, geometry)
    assert checkpoint.family == "neurogs-v7" and checkpoint.model.frame is Frame.NEUROGS
    voxel = checkpoint.model.to_frame(Frame.VOXEL).means
    expected = torch.tensor([[0.0, 0.0, 0.0], [x, y, z], [0.6 * x, 0.3 * y, 0.8 * z]])
    torch.testing.assert_close(voxel, expected, rtol=0, atol=1e-5)
    assert expected[2].tolist() == [6.0, 6.0, 4.0]
    # Scales are per axis too: 0.2 neurogs units in x is 0.1 * (X - 1) voxels.
    voxel_sigmas = torch.sqrt(torch.diagonal(checkpoint.model.to_frame(Frame.VOXEL).covariances(), dim1=1, dim2=2))
    torch.testing.assert_close(voxel_sigmas[0], torch.tensor([0.1 * x, 0.05 * y, 0.2 * z]), rtol=1e-5, atol=0)

    physical = checkpoint.model.to_frame(Frame.PHYSICAL)
    (xy,) = render_mip(physical, make_views(["xy"], geometry), mode="max", eps=0.0, backend="torch")
    assert xy.shape == (21, 11)
    assert float(xy[0, 0]) == pytest.approx(0.5, abs=1e-6)  # (-1, -1, -1) -> voxel (0, 0, 0)
    assert float(xy[y, x]) == pytest.approx(0.7, abs=1e-6)  # (1, 1, 1) -> voxel (X-1, Y-1, Z-1)
    third = GaussianModel(*(t[2:] for t in physical.tensors().values()), frame=Frame.PHYSICAL)
    (image,) = render_mip(third, make_views(["xy"], geometry), mode="max", eps=0.0, backend="torch")
    row, col = np.unravel_index(int(image.argmax()), tuple(image.shape))
    assert (row, col) == (6, 6) and float(image.max()) == pytest.approx(0.9, abs=1e-6)


def test_resumed_fit_continues_exactly(tmp_path):
    geometry = VolumeGeometry((12, 32, 32), (2.0, 1.0, 1.0))
    volume = _small_volume(geometry)
    targets = targets_from_volume(volume, geometry, ["xy", "xz", "yz"])
    model = init_from_volume(volume, geometry, 150, targets.low, targets.high).to_frame("neurogs", geometry)
    config = FitConfig(iterations=10, lr=1e-2, device="cpu", backend="torch", out=str(tmp_path), schedule="cosine")
    uninterrupted = Trainer(model, targets, config)
    for _ in range(4):
        uninterrupted.step()
    uninterrupted.save(tmp_path / "mid.pt")
    for _ in range(2):
        uninterrupted.step()

    checkpoint = load_checkpoint(tmp_path / "mid.pt")
    assert checkpoint.iteration == 4 and checkpoint.optimizer_state is not None
    resumed = Trainer(checkpoint.model, targets, config, checkpoint=checkpoint)
    assert resumed.iteration == 4 and len(resumed.loss_history) == 4
    for _ in range(2):
        resumed.step()
    for name, tensor in uninterrupted.model.tensors().items():
        difference = float((tensor - resumed.model.tensors()[name]).detach().abs().max())
        assert difference <= 1e-6, f"{name} differs by {difference} after resuming"
    assert resumed.loss_history == pytest.approx(uninterrupted.loss_history, abs=1e-7)
    # Without the optimiser state (a fresh start from the same parameters) the steps differ.
    fresh = Trainer(checkpoint.model, targets, config)
    fresh.step()
    fresh.step()
    assert float((fresh.model.means - uninterrupted.model.means).detach().abs().max()) > 1e-4


def _adam_state(model: GaussianModel) -> dict:
    """A fresh Adam state as the trainer saves it: one group per parameter, in the model's order."""
    groups = [{"params": [t.clone().requires_grad_()], "name": n} for n, t in model.tensors().items()]
    return torch.optim.Adam(groups).state_dict()


def test_own_checkpoint_on_another_volume_restarts_from_the_mapped_model(tmp_path):
    fitted_on = VolumeGeometry((10, 20, 20), (1.0, 1.0, 1.0))
    other = VolumeGeometry((10, 20, 20), (2.0, 0.5, 0.5))
    model = GaussianModel(
        torch.tensor([[0.0, 0.5, -0.5], [0.4, -0.2, 0.3]]), torch.full((2, 3), -2.0),
        torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2), torch.zeros(2), frame=Frame.NEUROGS, geometry=fitted_on,
    )  # fmt: skip
    path = save_checkpoint(tmp_path / "ours.pt", model, fit_model=model.to_frame(Frame.PHYSICAL),
                           optimizer_state=_adam_state(model.to_frame(Frame.PHYSICAL)), iteration=5)  # fmt: skip
    same = load_checkpoint(path, fitted_on)
    assert same.fit_model is not None and same.optimizer_state is not None
    torch.testing.assert_close(same.fit_model.means, model.to_frame(Frame.PHYSICAL).means)
    # On another volume the stored physical parameters are stale: the NeuRoGS-frame model is mapped instead.
    moved = load_checkpoint(path, other)
    assert moved.fit_model is None and moved.optimizer_state is None
    expected = torch.tensor([[4.75, 7.125, 4.5], [6.65, 3.8, 11.7]])  # voxel (x, y, z) * spacing (x, y, z)
    torch.testing.assert_close(moved.model.to_frame(Frame.PHYSICAL).means, expected)


def test_saving_is_atomic_and_files_get_ordinary_permissions(tmp_path, monkeypatch):
    geometry = VolumeGeometry((6, 10, 10))
    model = GaussianModel(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.zeros(1),
                          frame=Frame.VOXEL, geometry=geometry)  # fmt: skip
    path = save_checkpoint(tmp_path / "model.pt", model)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not private to the writer (mkstemp's 0600)
    before = path.read_bytes()

    def failing_save(payload, target):
        Path(target).write_bytes(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    moved = model.to_frame(Frame.VOXEL)
    moved.means += 3
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, moved)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
