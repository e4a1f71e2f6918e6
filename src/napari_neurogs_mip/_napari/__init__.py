"""napari front-end: readers, writers, sample data, the fit sessions and the *Fit MIP* and *Fit blocks* widgets.

Everything napari-specific lives here; the computation is in the core package.
Without Qt (tested without a viewer):

* :mod:`._session` holds a fit (state enum, trainer, latest step and images,
  psygnal events); :mod:`._fit_events` is the generator a worker runs;
  :mod:`._block_session` holds a block-wise fit (progress over blocks, the
  merged MIPs so far);
* :mod:`._layers` converts between napari layers and core objects (the only
  place where the core's (x, y, z) order meets napari's (z, y, x));
* domain rules beside it: :mod:`._axes` (which axis of a layer is which, the
  volume picked from it, world-to-index), :mod:`._target_rules` (which layers
  are targets, starts, sets of MIPs), :mod:`._layout` (where live layers and
  their labels go, the camera), :mod:`._throttle` (the refresh rate),
  :mod:`._summary` (what the widget and its notifications say);
* :mod:`._reader`, :mod:`._tiff_reader`, :mod:`._writer`, :mod:`._sample_data`
  are the npe2 contributions named in ``napari.yaml``;
* :mod:`._responsiveness` measures main-thread stalls for a benchmark.

With Qt: :mod:`._qt` (the panels, the live layers, the throttled refresh and
the dock widgets that compose them), :mod:`._loss_plot`, :mod:`._threads` (a
private thread pool and the session's runner), :mod:`._field_widget`.  Nothing here is imported by the
core, and napari and Qt are imported lazily, so readers and writers stay light.
"""
