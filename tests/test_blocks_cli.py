"""``neurogs-mip fit-blocks --config FILE``: the same YAML settings as ``fit --config``, read by the same code.

A procedural neuron of 16 x 48 x 48 voxels as a TIFF, one block, 3 steps, on a
worker thread of the test process: a run takes a couple of seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("dask.distributed")
pytest.importorskip("zarr")

from cli_checks import assert_bad_input
from napari_neurogs_mip.cli import main
from napari_neurogs_mip.io.tiff import write_volume
from napari_neurogs_mip.sample import procedural_skeleton, synthesize

SHAPE = (16, 48, 48)


@pytest.fixture(scope="module")
def neuron_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = synthesize(procedural_skeleton(SHAPE, seed=3), SHAPE, seed=3).noisy
    return write_volume(tmp_path_factory.mktemp("blocks_cli") / "neuron.tif", data, (1.5, 0.5, 0.5))


def test_config_settings_apply_and_command_line_flags_win(
    neuron_tif: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    config = tmp_path / "blocks.yaml"
    config.write_text(
        f"target: {neuron_tif}\nout: {out}\nblock: 48\nhalo: 2\nviews: [xy, xz]\niterations: 7\nlr: 0.004\n"
        "densify: false\nprocesses: false\nworkers: 1\ndevice: cpu\n"
    )
    assert main(["fit-blocks", "--config", str(config), "--iterations", "3"]) == 0, capsys.readouterr().err
    assert "1 blocks fitted now" in capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert plan["block"] == [48, 48, 48] and plan["views"] == ["xy", "xz"] and plan["halo"] == [1, 2, 2]
    # The file's settings apply; the command line's --iterations replaces the file's.
    assert plan["config"]["iterations"] == 3 and plan["config"]["lr"] == 0.004 and plan["config"]["densify"] is False


@pytest.mark.parametrize(
    ("text", "culprits"),
    [
        ("learning_rate: 0.1\n", ["unknown setting", "learning_rate"]),
        ("halo: -1\n", ["halo", "-1"]),
        ("block: [16, x]\n", ["block", "'x'"]),
        ("processes: no way\n", ["processes", "true or false"]),
        ("memory_limit: lots\n", ["memory_limit", "lots"]),
        ("iterations: [1, 2\n", ["not valid YAML", "line"]),
    ],
    ids=["unknown", "negative-halo", "block-text", "string-bool", "memory", "malformed"],
)
def test_bad_config_files_name_the_file_and_the_key(
    neuron_tif: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, culprits: list[str]
) -> None:
    config, out = tmp_path / "blocks.yaml", tmp_path / "run"
    config.write_text(text)
    argv = ["fit-blocks", "--target", str(neuron_tif), "--out", str(out), "--config", str(config)]
    assert_bad_input(capsys, argv, str(config), *culprits, unchanged=[out])


def test_target_and_out_come_from_the_command_line_or_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "blocks.yaml"
    config.write_text("halo: 2\n")
    assert_bad_input(capsys, ["fit-blocks", "--config", str(config), "--out", str(tmp_path / "run")], "--target",
                     "--config", unchanged=[tmp_path / "run"])  # fmt: skip
