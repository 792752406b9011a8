"""The Predict widget's review queue: walk the least confident tiles, confirming or skipping each."""
from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import PushButton
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QVBoxLayout, QWidget

from napari_cytoclip.widgets.common import status_label
from napari_cytoclip.widgets.layers import focus_cell, review_marker
from napari_cytoclip.widgets.review import advance_review


class ReviewPanel(QGroupBox):
    """*Next uncertain tile* confirms the tile shown and moves on; *Skip* moves on without confirming.

    Acts on ``host.complete_state()`` (the current prediction, run to the end, layer open).
    """

    def __init__(self, host: Any):
        super().__init__("Review queue")
        self.host = host
        self.review_button = PushButton(text="Next uncertain tile",
                                        tooltip="Confirm the tile shown (as it is now) and go to the next one")
        self.skip_button = PushButton(text="Skip", tooltip="Go to the next tile without confirming this one")
        self.review_status = status_label("Visits the least confident tiles. Next confirms the tile shown "
                                          "(repaint it first if wrong); Skip leaves it unconfirmed.")
        buttons = QWidget()
        row = QHBoxLayout(buttons)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.review_button.native)
        row.addWidget(self.skip_button.native)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(4)
        layout.addWidget(buttons)
        layout.addWidget(self.review_status)
        self.review_button.changed.connect(self.next_uncertain)
        self.skip_button.changed.connect(self.skip_uncertain)

    def refresh(self) -> None:
        state = self.host.current
        if state is None or not state.complete:
            return
        n = int(state.reviewed.sum())
        if n or state.visited.any():
            self.review_status.setText(f"{n} of {len(state.prediction.cells)} tiles confirmed.")

    def next_uncertain(self, *_: Any) -> tuple[int, int] | None:
        """Confirm the tile shown (moving on is the user's confirmation) and show the least confident unseen one."""
        return self._advance(confirm=True)

    def skip_uncertain(self, *_: Any) -> tuple[int, int] | None:
        """Show the next least confident tile, leaving the one shown unconfirmed."""
        return self._advance(confirm=False)

    def _advance(self, confirm: bool) -> tuple[int, int] | None:
        state = self.host.complete_state()
        if state is None:
            return None
        pred = state.prediction
        _left, cell = advance_review(state, confirm)
        state.publish()
        state.changed.emit("reviewed")
        n = int(state.reviewed.sum())
        if cell is None:
            self.review_status.setText(f"Every tile has been shown ({n} confirmed).")
            return None
        r, c = cell
        viewer = self.host.viewer
        focus_cell(viewer, state, (r, c))
        review_marker(viewer, state, (r, c))
        label = int(np.asarray(state.labels_layer.data)[r, c])
        region = state.region(label)
        self.review_status.setText(
            f"Tile ({r}, {c}): {region.name if region else 'no region'}, {pred.confidence[r, c]:.0%} confident "
            f"({n} of {len(pred.cells)} confirmed). Repaint it if wrong; Next confirms it, Skip does not.")
        return r, c
