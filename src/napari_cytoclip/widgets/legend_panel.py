"""The Predict widget's legend: region names and shares, click a region to paint with it."""
from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QGroupBox, QVBoxLayout

from napari_cytoclip.widgets.legend import RegionLegend
from napari_cytoclip.widgets.state import PredictionState, layer_alive

LEGEND_DEBOUNCE_MS = 300  # repaint strokes refresh the shares at most this often


class LegendPanel(QGroupBox):
    """The legend of ``host.current`` (a :class:`~napari_cytoclip.widgets.predict_widget.PredictWidget`);
    clicking a region makes it the paint label of the prediction's Labels layer (paint mode)."""

    def __init__(self, host: Any):
        super().__init__("Regions (click to paint)")
        self.host = host
        self.legend = RegionLegend()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.legend)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(LEGEND_DEBOUNCE_MS)
        self._timer.timeout.connect(self.refresh)
        self._painted_layer = None
        self.legend.region_clicked.connect(self.paint_with)

    def follow(self, state: PredictionState | None) -> None:
        """Show ``state``'s regions and refresh the shares after each paint stroke on its layer."""
        if self._painted_layer is not None:
            self._painted_layer.events.paint.disconnect(self._on_paint)
            self._painted_layer = None
        if state is not None and state.labels_layer is not None:
            self._painted_layer = state.labels_layer
            self._painted_layer.events.paint.connect(self._on_paint)  # a cue only: the payload is not read
        self.refresh()

    def _on_paint(self, *_: Any) -> None:
        self._timer.start()

    def refresh(self) -> None:
        state = self.host.current
        if state is None:
            self.legend.set_regions([])
            return
        labels = np.asarray(state.labels_layer.data) if state.complete and state.labels_layer is not None else None
        self.legend.set_regions(state.regions, labels, state.taught_counts(labels) if labels is not None else None)

    def paint_with(self, region_id: int) -> None:
        """Select ``region_id`` as the paint label of the current Labels layer and switch to painting."""
        state = self.host.current
        viewer = self.host.viewer
        layer = state.labels_layer if state is not None else None
        if not layer_alive(viewer, layer):
            self.host.warn("Run a prediction first: there is no region layer to paint in.")
            return
        layer.selected_label = int(region_id)
        viewer.layers.selection.active = layer
        if layer.editable:
            layer.mode = "paint"
        region = state.region(region_id)
        self.host.status.setText(f"Painting {region.name if region else region_id} (id {region_id}).")
