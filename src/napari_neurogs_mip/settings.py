"""One description per setting (help, unit, range, choices, group), from which checks, CLI flags and widget
controls are all built.

A dataclass field made with :func:`setting` carries a :class:`Setting` in its
metadata; :func:`check_settings` validates an instance against its fields'
types and ranges with messages that name the setting, and :func:`settings_of`
lists them for the front-ends (``cli.py`` builds flags, the napari widget
builds controls).  No torch, no Qt: importable anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """How one setting is described and checked.

    Attributes
    ----------
    help
        One line for ``--help`` and tooltips (what it does, not its default).
    minimum, maximum
        Inclusive bounds of a number (``None``: unbounded).
    positive
        The number must be ``> 0`` (for rates and sizes, where 0 is meaningless).
    choices
        The allowed strings.
    group
        Where front-ends put it: ``optimisation``, ``targets``, ``loss``, ``render``, ``density`` or ``run``.
    flag
        The CLI flag when it is not ``--name-with-hyphens`` (the seed design's ``--lambda_mse``).
    unit
        Shown after values (``steps``, ``px^2``).
    """

    help: str
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    choices: tuple[str, ...] | None = None
    group: str = "optimisation"
    flag: str | None = None
    unit: str = ""

    def flag_name(self, name: str) -> str:
        """The CLI flag of the setting called ``name``."""
        return self.flag or "--" + name.replace("_", "-")

    def describe_range(self) -> str:
        """The allowed values in words (for messages)."""
        if self.choices:
            return f"one of {list(self.choices)}"
        low = "> 0" if self.positive else (f">= {self.minimum:g}" if self.minimum is not None else "")
        high = f"<= {self.maximum:g}" if self.maximum is not None else ""
        return " and ".join(part for part in (low, high) if part) or "any value"


def setting(default: Any, help: str, **options: Any) -> Any:
    """A dataclass field with ``default`` described by ``Setting(help, **options)``."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **options)})


@dataclass(frozen=True)
class SettingField:
    """A described field of a settings dataclass: its name, base type, whether ``None`` is allowed, default."""

    name: str
    kind: type
    optional: bool
    default: Any
    setting: Setting


def settings_of(cls: type) -> list[SettingField]:
    """The described fields of dataclass ``cls``, in their order."""
    hints = typing.get_type_hints(cls)
    described = []
    for item in dataclasses.fields(cls):
        if "setting" not in item.metadata:
            continue
        kind, optional = _base_type(hints[item.name])
        described.append(SettingField(item.name, kind, optional, item.default, item.metadata["setting"]))
    return described


def _base_type(hint: Any) -> tuple[type, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def check_value(item: SettingField, value: Any) -> None:
    """Raise ``ValueError`` naming ``item`` when ``value`` is not of its type or outside its range."""
    if value is None:
        if not item.optional:
            raise ValueError(f"{item.name} must be set ({item.setting.describe_range()})")
        return
    expected = item.setting.describe_range()
    if item.kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{item.name} must be true or false, got {value!r}")
        return
    if item.kind is str:
        if not isinstance(value, str) or (item.setting.choices and value not in item.setting.choices):
            raise ValueError(f"{item.name} must be {expected}, got {value!r}")
        return
    numeric = (int,) if item.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
        what = "an integer" if item.kind is int else "a finite number"
        raise ValueError(f"{item.name} must be {what} ({expected}), got {value!r}")
    s = item.setting
    if (
        (s.positive and value <= 0)
        or (s.minimum is not None and value < s.minimum)
        or (s.maximum is not None and value > s.maximum)
    ):
        raise ValueError(f"{item.name} must be {expected}, got {value!r}")


def check_settings(instance: Any) -> None:
    """:func:`check_value` for every described field of ``instance``."""
    for item in settings_of(type(instance)):
        check_value(item, getattr(instance, item.name))
