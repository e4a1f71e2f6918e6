"""One source for settings: FitConfig's descriptions drive its checks and the CLI flags; core modules load no Qt."""

from __future__ import annotations

import pytest

from gui_free import gui_modules_loaded
from napari_neurogs_mip.cli import CONFIG_FLAGS_LEFT_OUT, build_parser, main
from napari_neurogs_mip.settings import settings_of
from napari_neurogs_mip.train import FitConfig


def _fit_actions() -> dict[str, object]:
    _, commands = build_parser()
    return {a.dest: a for a in commands["fit"]._actions}


def test_every_setting_has_a_flag_with_its_help_range_and_default():
    actions = _fit_actions()
    for item in settings_of(FitConfig):
        if item.name in CONFIG_FLAGS_LEFT_OUT:
            continue
        action = actions[item.name]
        assert item.setting.flag_name(item.name) in action.option_strings, item.name
        assert action.help.startswith(item.setting.help), item.name
        assert action.default is None  # FitConfig's default applies when the flag is not given
        if item.setting.choices:
            assert tuple(action.choices) == item.setting.choices


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--lr", "0", "> 0"),
        ("--densify-every", "0", ">= 1"),
        ("--mode", "fast", "must be one of"),
        ("--iterations", "1.5", "invalid int"),
        ("--beta", "nan", "finite"),
    ],
)
def test_a_bad_value_names_its_flag_and_range(capsys, flag, value, expected):
    assert main(["fit", "--sample", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and expected in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [({"lr": -1.0}, "lr must be > 0"), ({"densify": "yes"}, "densify must be true or false"),
     ({"seed": -1}, "seed must be"), ({"max_gaussians": 0}, "max_gaussians must be >= 1"),
     ({"schedule": "linear"}, "schedule must be one of"), ({"iterations": True}, "iterations must be an integer")],
)  # fmt: skip
def test_fit_config_checks_come_from_the_descriptions(settings, fragment):
    with pytest.raises(ValueError, match=fragment):
        FitConfig(**settings)


def test_core_training_and_cli_modules_load_no_qt_or_napari():
    code = (
        "import napari_neurogs_mip.cli, napari_neurogs_mip.train, napari_neurogs_mip.prepare\n"
        "import napari_neurogs_mip.render, napari_neurogs_mip.densify, napari_neurogs_mip.io.checkpoint\n"
        "from napari_neurogs_mip.cli import build_parser; build_parser()"
    )
    assert gui_modules_loaded(code) == []
