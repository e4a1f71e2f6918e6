"""What the Fit MIP widget writes about a fit: the progress line, the finish table and the notifications.

napari's notification toast shows the first line of a message, elided to its
width (about 45 characters); the rest appears when the toast is expanded.  So
every message here leads with a short first line that is complete on its own,
and puts the details on the following lines.  Nothing here imports Qt or napari.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..train import FinishedEvent, StepEvent

TOAST_LINE = 45
"""Characters of a message's first line that napari's toast shows before eliding it."""
_COLUMNS = (
    # (header, metrics key, format)
    ("PSNR", "psnr", ".2f"),
    ("fg PSNR", "fg_psnr", ".2f"),
    ("recall", "recall", ".3f"),
    ("SSIM", "ssim", ".4f"),
)


def mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


def number(value: float, fmt: str, unit: str = "") -> str:
    """``value`` formatted, or a dash for NaN."""
    return "–" if math.isnan(value) else f"{value:{fmt}}{unit}"


def duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(float(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(step: StepEvent, gaussians: str, state: str = "") -> str:
    """``iteration 12/300 (paused) · 2,000 Gaussians · 40.1 it/s · loss 0.0123 · elapsed 0:01 · remaining 0:07``
    (``state``, when given, follows the iteration)."""
    remaining = (step.total - step.iteration) / step.its_per_second if step.its_per_second > 0 else math.inf
    return (
        f"iteration {step.iteration}/{step.total}{f' ({state})' if state else ''} · {gaussians} · "
        f"{step.its_per_second:.1f} it/s · loss {step.terms['loss']:.4g} · "
        f"elapsed {duration(step.elapsed)} · remaining {duration(remaining)}"
    )


def groups(event: FinishedEvent) -> list[tuple[str, list[str]]]:
    """``[("trained", names), ("held-out", names)]``, leaving out an empty group."""
    held = set(event.held_out)
    found = [
        ("trained", [v for v in event.metrics if v not in held]),
        ("held-out", [v for v in event.metrics if v in held]),
    ]
    return [(group, names) for group, names in found if names]


def _group_mean(event: FinishedEvent, names: list[str], key: str) -> float:
    return mean([float(event.metrics[n].get(key, math.nan)) for n in names])


def summary_html(event: FinishedEvent) -> str:
    """The finish table: a row of scores per view (held-out views marked), then the mean of each group."""
    found = groups(event)
    marked = len(found) > 1 or bool(event.held_out)

    def row(name: str, group: str, values: list[float], bold: bool = False) -> str:
        cell = "<td style='font-weight:bold'" if bold else "<td"
        texts = [f"{cell}>{c}</td>" for c in [name, *([group] if marked else [])]]
        texts += [f"{cell} align='right'>{number(v, fmt)}</td>" for v, (_, _, fmt) in zip(values, _COLUMNS)]
        return f"<tr>{''.join(texts)}</tr>"

    header = "".join(
        [
            "<th align='left'>view</th>",
            *(["<th align='left'>set</th>"] if marked else []),
            *(f"<th align='right'>{title}</th>" for title, _, _ in _COLUMNS),
        ]
    )
    rows = [
        row(name, group, [float(event.metrics[name].get(key, math.nan)) for _, key, _ in _COLUMNS])
        for group, names in found
        for name in names
    ]
    if sum(len(names) for _, names in found) > 1:
        for group, names in found:
            rows.append(row("mean", group, [_group_mean(event, names, key) for _, key, _ in _COLUMNS], bold=True))
    how = "stopped" if event.stopped else "finished"
    return (
        f"<b>{how} at iteration {event.iteration}</b> · {event.num_gaussians:,} Gaussians"
        f"<table cellspacing='0' cellpadding='3'><tr>{header}</tr>{''.join(rows)}</table>"
        "PSNRs in dB; fg: over the target's foreground; recall: share of the foreground rendered at half its "
        "brightness or more"
    )


def finished_message(event: FinishedEvent) -> str:
    """The finish notification: ``Fit MIP finished: PSNR 36.0 dB`` (the trained views' mean), then the details.

    ``Fit MIP finished: PSNR 36.0 dB`` /
    ``PSNR 36.0 dB, held-out 33.3 dB; fg PSNR 30.8 dB, held-out 27.6 dB; recall 0.96, held-out 0.87`` /
    ``(means over the views; iteration 40, 600 Gaussians)``
    """
    found = groups(event)
    how = "stopped" if event.stopped else "finished"
    trained = dict(found).get("trained") or found[0][1]
    first = f"Fit MIP {how}: PSNR {number(_group_mean(event, trained, 'psnr'), '.1f', ' dB')}"
    parts = []
    for title, key, fmt, unit in (("PSNR", "psnr", ".1f", " dB"), ("fg PSNR", "fg_psnr", ".1f", " dB"),
                                  ("recall", "recall", ".2f", "")):  # fmt: skip
        values = [(group, number(_group_mean(event, names, key), fmt, unit)) for group, names in found]
        parts.append(f"{title} " + ", ".join(v if group == "trained" else f"{group} {v}" for group, v in values))
    means = "means over the views; " if len(event.metrics) > 1 else ""
    return f"{first}\n{'; '.join(parts)}\n({means}iteration {event.iteration}, {event.num_gaussians:,} Gaussians)"


def exported_message(files: Sequence[Path], iteration: int) -> str:
    """The export notification: how many files first, then their names and folder."""
    folder = files[0].parent if files else Path()
    names = ", ".join(p.name for p in files)
    return (
        f"Fit MIP: exported {len(files)} MIP TIFFs\n"
        f"one calibrated ImageJ TIFF per view (um), iteration {iteration}: {names} in {folder}"
    )


def failed_message(stage: str, error: BaseException, advice: str = "") -> str:
    """The failure notification: ``Fit MIP failed while <stage>`` (a short stage), then the error itself."""
    return f"Fit MIP failed while {stage}\n{type(error).__name__}: {error}{advice}"


def refused_message(error: BaseException) -> str:
    """The notification for settings that cannot start a fit: the reason (a ``ValueError``'s one line)."""
    return f"Fit MIP cannot start\n{error}"
