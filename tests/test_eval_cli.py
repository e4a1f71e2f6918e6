"""``neurogs-mip eval`` prints the same table as the fit's own final table; held-out views are never trained on."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile

from napari_neurogs_mip.cli import main
from napari_neurogs_mip.io.checkpoint import load_checkpoint
from napari_neurogs_mip.render import DEFAULT_BETA
from napari_neurogs_mip.sample import SAMPLE_SPACING, sample_volume
from napari_neurogs_mip.train import FINAL_NAME

# view, set, PSNR, fg PSNR, recall, SSIM
ROW = re.compile(r"^(\S+)\s+(trained|held-out)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s", re.MULTILINE)


@pytest.fixture
def sample_tif(tmp_path):
    volume, _ = sample_volume(0)
    path = tmp_path / "sample.tif"
    z, y, x = SAMPLE_SPACING
    tifffile.imwrite(
        path, (volume * 1000).astype(np.uint16), imagej=True, resolution=(1 / x, 1 / y),
        metadata={"spacing": z, "unit": "um", "axes": "ZYX"},
    )  # fmt: skip
    return path


def _rows(text: str) -> dict[str, tuple[str, ...]]:
    return {name: rest for name, *rest in ROW.findall(text) if name != "mean"}


def test_eval_agrees_with_the_fits_final_table(tmp_path, capsys, sample_tif):
    out = tmp_path / "run"
    fit = ["fit", "--target", str(sample_tif), "--downsample", "3", "--iterations", "30", "--densify-every", "10",
           "--eval-views", "30:20,120:-15", "--backend", "torch", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(fit) == 0, capsys.readouterr().err
    fitted = _rows(capsys.readouterr().out)
    assert [fitted[n][0] for n in ("az30_el20", "az120_el-15")] == ["held-out", "held-out"]
    assert fitted["xy"][0] == "trained" and len(fitted) == 7  # five default views and two held out
    checkpoint = load_checkpoint(out / FINAL_NAME)
    assert [v["name"] for v in checkpoint.metadata["eval_views"]] == ["az30_el20", "az120_el-15"]
    assert all(v["name"] not in ("az30_el20", "az120_el-15") for v in checkpoint.metadata["views"])

    assert main(["eval", str(out / FINAL_NAME), "--target", str(sample_tif), "--backend", "torch"]) == 0
    evaluated = _rows(capsys.readouterr().out)
    assert evaluated.keys() == fitted.keys()
    for name, values in fitted.items():
        assert evaluated[name][0] == values[0], name
        for a, b in zip(evaluated[name][1:], values[1:]):
            assert float(a) == pytest.approx(float(b), abs=0.011), (name, evaluated[name], values)


def test_eval_takes_other_views_and_rejects_a_missing_target(tmp_path, capsys, sample_tif):
    out = tmp_path / "run"
    fit = ["fit", "--target", str(sample_tif), "--downsample", "3", "--iterations", "3", "--views", "xy,xz,yz",
           "--backend", "torch", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(fit) == 0, capsys.readouterr().err
    capsys.readouterr()
    # render defaults to what the fit optimised (soft at its beta), not the field MIP.
    assert main(["render", str(out / FINAL_NAME), "--out", str(tmp_path / "mips.tif"), "--backend", "torch"]) == 0
    assert f"render mode soft, beta {DEFAULT_BETA:g} (the checkpoint)" in capsys.readouterr().out
    argv = ["eval", str(out / FINAL_NAME), "--target", str(sample_tif), "--downsample", "3", "--eval-views", "45:10"]
    assert main([*argv, "--backend", "torch"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["az45_el10"][0] == "held-out" and rows["xy"][0] == "trained"
    assert main(["eval", str(out / FINAL_NAME), "--target", str(tmp_path / "missing.tif")]) == 2
    assert "missing.tif" in capsys.readouterr().err
