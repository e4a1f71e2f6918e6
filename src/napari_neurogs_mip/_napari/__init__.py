"""napari front-end: reader, writers, sample data and the *Fit MIP* dock widget.

Everything napari-specific lives here; the computation is in the core package.
Modules:

* :mod:`._layers` converts between napari layers and core objects (the only
  place where the core's (x, y, z) order meets napari's (z, y, x));
* :mod:`._reader`, :mod:`._writer`, :mod:`._sample_data` are the npe2
  contributions named in ``napari.yaml``;
* :mod:`._fit_worker` runs a fit as a generator for a napari thread worker;
* :mod:`._fit_widget` is the dock widget, :mod:`._loss_plot` its loss curve;
* :mod:`._field_widget` voxelises a Gaussian layer into an Image layer on request.

Nothing here is imported by the core, and this package imports napari lazily
(only the widget modules need Qt), so the reader and writers stay light.
"""
