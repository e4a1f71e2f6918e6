"""Fit the built-in sample neuron from Python and save the result.

Run: ``python examples/fit_sample.py [OUT_FOLDER]``
"""

from __future__ import annotations

import sys

from napari_neurogs_mip.prepare import FitInputs, prepare_fit
from napari_neurogs_mip.train import FinishedEvent, FitConfig, StepEvent, Trainer


def main(out: str) -> None:
    """Fit 2,000 Gaussians to the sample's three axis MIPs for 300 steps."""
    prepared = prepare_fit(FitInputs(sample=True, num_gaussians=2000))
    trainer = Trainer(prepared.model, prepared.targets, FitConfig(iterations=300, out=out))
    print(trainer.describe())
    for event in trainer.run():
        if isinstance(event, StepEvent) and event.iteration % 50 == 0:
            print(f"step {event.iteration}: loss {event.terms['loss']:.5f} ({event.its_per_second:.1f} it/s)")
        elif isinstance(event, FinishedEvent):
            for view, metrics in event.metrics.items():
                print(f"{view}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")
            print(f"saved {event.path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/sample")
