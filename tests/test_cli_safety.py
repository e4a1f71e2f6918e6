"""Nothing lost, nothing silently ignored: output protection, conflicting flags, strict configs, resume semantics."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import tifffile
import torch

import napari_neurogs_mip.train as train_module
from cli_checks import assert_bad_input, snapshot
from napari_neurogs_mip.cli import main
from napari_neurogs_mip.io.checkpoint import load_checkpoint
from napari_neurogs_mip.io.run_folder import claim_run_folder
from napari_neurogs_mip.prepare import FitInputs, prepare_fit
from napari_neurogs_mip.train import FINAL_NAME, FitConfig, SaveError, Trainer

TINY = ["--iterations", "2", "--backend", "torch", "--device", "cpu", "--num_gaussians", "20", "--no-densify"]


@pytest.fixture
def finished_run(tmp_path: Path, volume_tif: Path, capsys) -> Path:
    """A finished fit's folder (a checkpoint at step 1 and the final model at step 2)."""
    out = tmp_path / "run"
    assert main(["fit", "--target", str(volume_tif), "--out", str(out), "--save-every", "1", *TINY]) == 0
    capsys.readouterr()
    return out


# ------------------------------------------------------------------------------------------------ render --out
def test_render_never_overwrites_its_own_checkpoint(finished_run, capsys):
    model = finished_run / FINAL_NAME
    assert_bad_input(capsys, ["render", str(model), "--out", str(model)], "--out", "would replace the checkpoint",
                     unchanged=[model])  # fmt: skip
    link = finished_run / "link.tif"
    link.symlink_to(model)
    assert_bad_input(capsys, ["render", str(model), "--out", str(link), "--overwrite"], "would replace the checkpoint",
                     unchanged=[model])  # fmt: skip


def test_render_refuses_existing_files_unless_overwrite(finished_run, volume_tif, tmp_path, capsys):
    model, existing = finished_run / FINAL_NAME, tmp_path / "mips_xy.tif"
    existing.write_bytes(b"precious")
    out = str(tmp_path / "mips.tif")  # writes mips_xy.tif, mips_xz.tif, mips_yz.tif
    assert_bad_input(capsys, ["render", str(model), "--out", out], "mips_xy.tif", "exist", "--overwrite",
                     unchanged=[tmp_path])  # fmt: skip
    assert_bad_input(capsys, ["render", str(model), "--out", str(volume_tif), "--target", str(volume_tif),
                              "--overwrite"], "--target", unchanged=[tmp_path])  # fmt: skip
    assert main(["render", str(model), "--out", out, "--overwrite", "--backend", "torch"]) == 0
    assert tifffile.imread(existing).ndim == 2


# -------------------------------------------------------------------------------------------------- fit --out
def test_fit_refuses_a_folder_of_another_run_and_overwrite_leaves_no_mix(finished_run, volume_tif, capsys):
    argv = ["fit", "--target", str(volume_tif), "--out", str(finished_run), *TINY]
    assert_bad_input(capsys, argv, f"--out {finished_run}", "another run", "--overwrite", unchanged=[finished_run])
    assert main([*argv, "--overwrite"]) == 0
    # The earlier run's checkpoint is gone with it: the folder holds one run only.
    assert sorted(p.name for p in finished_run.iterdir() if p.suffix == ".pt") == [FINAL_NAME]


def test_fit_resumes_in_its_own_folder(finished_run, volume_tif, capsys):
    checkpoint = finished_run / "checkpoint_iter1.pt"
    argv = ["fit", "--target", str(volume_tif), "--out", str(finished_run), "--checkpoint", str(checkpoint)]
    assert main([*argv, *TINY[2:], "--iterations", "4"]) == 0
    assert "resuming the run" in capsys.readouterr().out
    assert load_checkpoint(finished_run / FINAL_NAME).iteration == 4


def test_a_locked_folder_refuses_a_second_fit_at_once(tmp_path, volume_tif, capsys, monkeypatch):
    out = tmp_path / "busy"
    monkeypatch.setattr("napari_neurogs_mip.prepare.prepare_fit", lambda *a: pytest.fail("targets were built"))
    with claim_run_folder(out):
        assert_bad_input(capsys, ["fit", "--target", str(volume_tif), "--out", str(out), *TINY], "in use",
                         f"process {os.getpid()}", unchanged=[out])  # fmt: skip
    assert not out.exists()  # the folder made for the lock is removed with it when nothing was written


def test_stale_temporary_files_are_removed_by_the_next_run(finished_run, volume_tif, capsys):
    stale = finished_run / f".{FINAL_NAME}.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    argv = ["fit", "--target", str(volume_tif), "--out", str(finished_run), "--overwrite", *TINY]
    assert main(argv) == 0
    assert "removed 1 temporary file" in capsys.readouterr().out
    assert not stale.exists()


def test_a_symlink_loop_as_out_is_refused_before_any_work(tmp_path, volume_tif, capsys, monkeypatch):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    monkeypatch.setattr("napari_neurogs_mip.prepare.prepare_fit", lambda *a: pytest.fail("targets were built"))
    assert_bad_input(capsys, ["fit", "--target", str(volume_tif), "--out", str(loop / "run"), *TINY], "loop")


# ------------------------------------------------------------------------------------- conflicting or empty flags
@pytest.mark.parametrize(
    ("extra", "culprits"),
    [
        (["--sample"], ["--sample and --target"]),
        (["--target-mips", "{tif}"], ["--target and --target-mips"]),
        (["--views", ""], ["--views is empty"]),
        (["--views", " , "], ["--views is empty"]),
        (["--eval-views", ","], ["--eval-views is empty"]),
        (["--extra-iterations", "3"], ["--iterations", "--extra-iterations"]),
        (["--seed", "-1"], ["--seed", "-1"]),
        (["--voxel-size", "1e-300", "1", "1"], ["--voxel-size", "1e-300"]),
        (["--channel", "-1"], ["--channel", "-1"]),
    ],
    ids=[
        "sample+target",
        "target+mips",
        "empty-views",
        "blank-views",
        "empty-eval-views",
        "iterations+extra",
        "negative-seed",
        "tiny-voxel",
        "negative-channel",
    ],
)
def test_conflicting_or_empty_flags(tmp_path, volume_tif, capsys, extra, culprits):
    out = tmp_path / "run"
    extra = [e.replace("{tif}", str(volume_tif)) for e in extra]
    assert_bad_input(capsys, ["fit", "--target", str(volume_tif), "--out", str(out), *TINY, *extra], *culprits,
                     unchanged=[out])  # fmt: skip


def test_selection_flags_need_a_target_and_extra_iterations_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert_bad_input(capsys, ["fit", "--sample", "--time", "0", "--out", str(out)], "--time", "--target",
                     unchanged=[out])  # fmt: skip
    assert_bad_input(capsys, ["fit", "--sample", "--extra-iterations", "5", "--out", str(out)], "--extra-iterations",
                     "--checkpoint", unchanged=[out])  # fmt: skip


def test_both_spellings_of_every_flag(tmp_path, volume_tif, capsys):
    out = tmp_path / "run"
    argv = ["fit", "--target", str(volume_tif), "--out", str(out), "--num-gaussians", "20", "--save_every", "1",
            "--iterations", "1", "--backend", "torch", "--device", "cpu", "--lambda-ssim", "0", "--no-densify"]  # fmt: skip
    assert main(argv) == 0
    checkpoint = load_checkpoint(out / FINAL_NAME)
    assert checkpoint.model.num_gaussians == 20 and checkpoint.metadata["config"]["lambda_ssim"] == 0


def test_help_shows_defaults_and_one_spelling(capsys):
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: 1000)" in text and "(default: 500)" in text and "(default: 0.1)" in text
    assert "--num_gaussians" in text and "--num-gaussians" not in text


# ------------------------------------------------------------------------------------------------- YAML config
@pytest.mark.parametrize(
    ("text", "culprits"),
    [
        ('sample: "false"\n', ["sample", "true or false", "'false'"]),
        ("iterations: 1.5\n", ["iterations", "1.5"]),
        ("resolution: [20, 20, 20]\n", ["resolution", "2 values"]),
        ("views: [xy, sideways]\n", ["views", "sideways"]),
        ("mode: fast\n", ["mode", "fast"]),
        ("num_gaussians:\n", ["num_gaussians", "no value"]),
        ("iterations: [1, 2\n", ["not valid YAML", "line"]),
        ("model: !!python/object:os.system {}\n", ["not valid YAML"]),
        ("- just\n- a list\n", ["mapping"]),
        ("learning_rate: 0.1\n", ["unknown setting", "learning_rate"]),
    ],
    ids=[
        "string-bool",
        "float-int",
        "resolution-3",
        "bad-view",
        "bad-choice",
        "empty",
        "malformed",
        "python-tag",
        "list",
        "unknown",
    ],
)
def test_bad_config_files(tmp_path, capsys, text, culprits):
    config, out = tmp_path / "settings.yaml", tmp_path / "run"
    config.write_text(text)
    assert_bad_input(capsys, ["fit", "--sample", "--config", str(config), "--out", str(out)], str(config), *culprits,
                     unchanged=[out])  # fmt: skip


def test_binary_config_file(tmp_path, capsys):
    config, out = tmp_path / "settings.yaml", tmp_path / "run"
    config.write_bytes(bytes(range(256)) * 8)
    assert_bad_input(capsys, ["fit", "--sample", "--config", str(config), "--out", str(out)], str(config),
                     unchanged=[out])  # fmt: skip


def test_config_values_users_naturally_write(tmp_path, volume_tif, capsys):
    config, out = tmp_path / "settings.yaml", tmp_path / "run"
    config.write_text("resolution: 16\nviews: [xy, xz]\nnum_gaussians: 20\ndensify: false\nlambda_ssim: 0\n")
    argv = ["fit", "--target", str(volume_tif), "--config", str(config), "--out", str(out), "--iterations", "1",
            "--backend", "torch", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    views = load_checkpoint(out / FINAL_NAME).metadata["views"]
    assert [(v["name"], v["height"], v["width"]) for v in views] == [("xy", 16, 16), ("xz", 16, 16)]


# ------------------------------------------------------------------------------------------------------ resume
def test_resume_applies_a_new_learning_rate_and_says_so(finished_run, volume_tif, tmp_path, capsys):
    checkpoint = finished_run / FINAL_NAME
    out = tmp_path / "more"
    argv = ["fit", "--target", str(volume_tif), "--checkpoint", str(checkpoint), "--out", str(out), *TINY[2:],
            "--extra-iterations", "2", "--lr", "0.004", "--schedule", "none"]  # fmt: skip
    assert main(argv) == 0
    assert "lr 0.001 -> 0.004" in capsys.readouterr().out
    resumed = load_checkpoint(out / FINAL_NAME)
    assert resumed.iteration == 4 and resumed.metadata["config"]["lr"] == 0.004
    means = next(g for g in resumed.optimizer_state["param_groups"] if g["name"] == "means")
    longest = resumed.model.geometry.longest_side
    assert means["lr"] == pytest.approx(0.004 * longest)


def test_a_resume_that_would_run_nothing_is_refused(finished_run, volume_tif, tmp_path, capsys):
    checkpoint = finished_run / FINAL_NAME
    out = tmp_path / "more"
    argv = ["fit", "--target", str(volume_tif), "--checkpoint", str(checkpoint), "--out", str(out), *TINY]
    assert_bad_input(capsys, argv, str(checkpoint), "iteration 2", "--iterations", "--extra-iterations",
                     unchanged=[out, checkpoint])  # fmt: skip


def test_an_optimiser_state_of_another_model_is_refused_before_a_step(finished_run, volume_tif):
    checkpoint = load_checkpoint(finished_run / FINAL_NAME)
    inputs = FitInputs(target=str(volume_tif), checkpoint=str(finished_run / FINAL_NAME))
    prepared = prepare_fit(inputs)
    state = prepared.checkpoint.optimizer_state
    first = state["param_groups"][0]["params"][0]
    state["state"][first]["exp_avg"] = torch.zeros(7, 3)
    config = FitConfig(iterations=5, backend="torch", device="cpu")
    with pytest.raises(ValueError, match=r"optimizer_state_dict\.state\[\d+\]\.exp_avg is .* shape \[7, 3\]; expected"):
        Trainer(prepared.model, prepared.targets, config, checkpoint=prepared.checkpoint)
    assert checkpoint.iteration == 2


# --------------------------------------------------------------------------------------------------- disk full
def test_a_failed_save_names_the_file_and_the_intact_checkpoint(tmp_path, volume_tif, capsys, monkeypatch):
    real = train_module.save_checkpoint

    def fill_the_disk(path, *args, **kwargs):
        if Path(path).name != "checkpoint_iter1.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", fill_the_disk)
    out = tmp_path / "run"
    argv = ["fit", "--target", str(volume_tif), "--out", str(out), "--save-every", "1", *TINY]
    before = snapshot(volume_tif)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"no space left on device writing {out / 'checkpoint_iter2.pt'}" in err
    assert f"the previous checkpoint {out / 'checkpoint_iter1.pt'} is intact" in err
    assert "Traceback" not in err and snapshot(volume_tif) == before
    assert load_checkpoint(out / "checkpoint_iter1.pt").iteration == 1


def test_save_error_without_an_earlier_checkpoint(tmp_path, volume_tif, monkeypatch):
    prepared = prepare_fit(FitInputs(target=str(volume_tif), num_gaussians=20))
    trainer = Trainer(prepared.model, prepared.targets, FitConfig(iterations=2, backend="torch", device="cpu"))
    monkeypatch.setattr(train_module, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(SaveError, match=r"RuntimeError: boom writing .*x\.pt; no checkpoint was kept"):
        trainer.save(tmp_path / "x.pt")


def test_a_checkpoint_alone_is_not_a_target_unless_self_reconstruction_is_asked(finished_run, volume_tif, capsys):
    model, out = finished_run / FINAL_NAME, finished_run.parent / "again"
    assert_bad_input(capsys, ["fit", "--checkpoint", str(model), "--out", str(out)], "--self-reconstruct",
                     "a start, not a target", unchanged=[out, model])  # fmt: skip
    assert_bad_input(capsys, ["fit", "--target", str(volume_tif), "--checkpoint", str(model), "--self-reconstruct",
                              "--out", str(out)], "--self-reconstruct", "no target", unchanged=[out])  # fmt: skip
    assert_bad_input(capsys, ["fit", "--target", str(volume_tif), "--checkpoint", str(model), "--swc",
                              str(volume_tif), "--out", str(out)], "--checkpoint and --swc", unchanged=[out])  # fmt: skip
