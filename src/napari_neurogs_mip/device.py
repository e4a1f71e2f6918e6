"""Choosing the torch device: ``auto | cuda | mps | cpu``, never silently."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cuda", "mps", "cpu")


def available_devices() -> list[str]:
    """Device names usable on this machine, best first (``auto`` included)."""
    found = ["auto"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def resolve_device(name: str) -> tuple[torch.device, str]:
    """The device for ``name`` and a sentence saying what was chosen and why.

    Raises
    ------
    ValueError
        Unknown name, or an explicit ``cuda``/``mps`` that this machine does not have.
    """
    name = str(name).lower()
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(DEVICES)}")
    usable = available_devices()
    if name == "auto":
        chosen = usable[1]
        note = "auto: no CUDA or MPS device found, using the CPU" if chosen == "cpu" else f"auto: using {chosen}"
        return torch.device(chosen), note
    if name not in usable:
        detail = (
            "this torch build has no CUDA support"
            if name == "cuda" and not torch.backends.cuda.is_built()
            else ("no usable device was found")
        )
        raise ValueError(
            f"device {name!r} was requested but is not available ({detail}); available: {', '.join(usable)}"
        )
    return torch.device(name), f"using {name} as requested"
