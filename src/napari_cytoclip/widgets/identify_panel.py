"""The Predict widget's identify box: the most likely regions for a selected label or shape."""
from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import PushButton
from qtpy.QtWidgets import QGroupBox, QPlainTextEdit, QVBoxLayout

from napari_cytoclip.widgets.review import describe_top, identify_cells, shapes_to_grid
from napari_cytoclip.widgets.state import PredictionState, layer_alive

TOP_K = 5


class IdentifyPanel(QGroupBox):
    """*Identify selection*: top regions for the selected shape's tiles, or else for the selected label's."""

    def __init__(self, host: Any):
        super().__init__("Identify selection")
        self.host = host
        self.identify_button = PushButton(text="Identify selection")
        self.identify_text = QPlainTextEdit()
        self.identify_text.setReadOnly(True)
        self.identify_text.setPlaceholderText("Select a label (or draw and select a shape) and press "
                                              "Identify: the 5 most likely regions for those tiles.")
        self.identify_text.setMaximumHeight(110)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(4)
        layout.addWidget(self.identify_button.native)
        layout.addWidget(self.identify_text)
        self.identify_button.changed.connect(self.identify_selection)

    def identify_selection(self, *_: Any) -> list[tuple[Any, float, float]] | None:
        """Top regions for the selected shape's tiles, or else for all tiles of the selected label."""
        state = self.host.complete_state()
        if state is None:
            return None
        try:
            mask, what = self._selection_mask(state)
        except ValueError as exc:
            self.host.warn(str(exc))
            self.identify_text.setPlainText(str(exc))
            return None
        n, top = identify_cells(state, self.host.model_for(state), mask, TOP_K)
        if n == 0:
            self.identify_text.setPlainText(f"No classified tissue tiles in {what}.")
            return None
        self.identify_text.setPlainText(describe_top(n, what, top))
        return top

    def _selection_mask(self, state: PredictionState) -> tuple[np.ndarray, str]:
        from napari.layers import Shapes

        viewer = self.host.viewer
        active = viewer.layers.selection.active
        if isinstance(active, Shapes) and active.selected_data:
            mask = shapes_to_grid(active, sorted(active.selected_data), state)
            return mask, f"the selected shape{'s' if len(active.selected_data) > 1 else ''}"
        layer = state.labels_layer
        if not layer_alive(viewer, layer):
            raise ValueError("The region layer was closed.")
        label = int(layer.selected_label)
        region = state.region(label)
        mask = np.asarray(layer.data) == label
        if not mask.any():
            raise ValueError(f"No tile carries the selected label {label}; pick a label (or select a shape).")
        return mask, f"label {label}" + (f" ({region.name})" if region else "")
