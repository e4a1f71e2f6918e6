"""Fit 3D Gaussian models to maximum-intensity projections of fluorescence volumes."""

__version__ = "0.1.0"
