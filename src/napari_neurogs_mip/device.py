"""Choosing the torch device (``auto | cuda | mps | cpu``, never silently) and torch's CPU threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, then restore; ``None`` changes nothing.

    The cpu backend runs its kernels on its own thread pool; PyTorch's OpenMP
    threads, left spinning after each small op of the loss, take the cores those
    kernels need (measured: a training step 1.4x slower at S1).  Switching costs
    microseconds, so it is done per step and the previous setting returns between
    steps.  The setting is process-wide: torch work on other threads during the
    block (e.g. the viewer voxelising a model) runs single-threaded too.
    """
    if count is None or count == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
