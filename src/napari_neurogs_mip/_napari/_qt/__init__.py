"""Qt widgets of the plugin: panels that each return their part of the core's inputs, the live layers, the
*Fit MIP* dock widget that composes them around a :class:`.._session.FitSession`, and the *Fit blocks* widget
around a :class:`.._block_session.BlockSession`.

Everything that imports Qt lives here (and in :mod:`.._loss_plot`, :mod:`.._threads`, :mod:`.._field_widget`);
the session, the fit events and the layer rules beside this package do not.
"""
