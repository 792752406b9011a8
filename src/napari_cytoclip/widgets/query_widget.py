"""The Text query widget: type a description, see where the section matches it; add regions."""
from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSlider, LineEdit, PushButton
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QListWidget, QListWidgetItem, QVBoxLayout, QWidget

from napari_cytoclip.widgets.common import (report_problem, LayerChoices, group, message_of, prediction_layer_choices,
                                            status_label)
from napari_cytoclip.widgets.layers import focus_cell, highlight_mask, query_layers, refresh_region_layers
from napari_cytoclip.widgets.state import PredictionState, layer_alive, state_of

DEBOUNCE_MS = 150
DEFAULT_PERCENTILE = 90.0
TOP_CELLS = 15
CELL_ROLE = Qt.ItemDataRole.UserRole


class QueryWidget(QWidget):
    """Similarity of every tile to a free-text description, from the cached tile embeddings.

    Only the text is encoded (the model's text tower); tile images are never re-encoded. Each
    edit restarts a 150 ms timer owned by the widget; the query runs when typing pauses.
    """

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self._similarity: np.ndarray | None = None
        self._text = ""
        self._state: PredictionState | None = None
        self.applied_threshold: float | None = None  # exact value in use (the slider rounds to its step)

        self.prediction = ComboBox(label="Regions layer", choices=prediction_layer_choices(napari_viewer),
                                   tooltip="A Labels layer made by 'Predict regions'")
        self.query = LineEdit(label="Query", tooltip="Free text; the heatmap follows as you type")
        self.query.native.setPlaceholderText("e.g. densely packed granule cells")
        self.query.native.setClearButtonEnabled(True)
        self.threshold = FloatSlider(label="Threshold", min=0.0, max=1.0, step=0.001, value=0.5, readout=False,
                                     tooltip="Tiles at or above this similarity are highlighted (magenta)")
        self.form = Container(widgets=[self.prediction, self.query, self.threshold], labels=True)
        self.summary = status_label("Type a description; the heatmap follows as you type.")
        self.matches = QListWidget()
        self.matches.setToolTip("Best-matching tiles: click to go there")
        self.matches.setMinimumHeight(100)
        self.matches.setMaximumHeight(200)

        self.region_name = LineEdit(label="Name", tooltip="Name of the new region, e.g. 'Claustrum'")
        self.region_description = LineEdit(label="Description",
                                           tooltip="What it looks like in Nissl, used to build its prompts")
        self.add_button = PushButton(text="Add region and relabel")
        self.add_form = Container(widgets=[self.region_name, self.region_description, self.add_button], labels=True)
        self.add_status = status_label("")

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.update_query)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.form.native)
        layout.addWidget(self.summary)
        layout.addWidget(group("Best-matching tiles", self.matches))
        layout.addWidget(group("Add a region to the vocabulary", self.add_form.native, self.add_status))
        layout.addStretch(1)

        self._choices = LayerChoices(napari_viewer, self.prediction)
        self.query.changed.connect(self._schedule)
        self.threshold.changed.connect(self._apply_threshold)
        self.prediction.changed.connect(self._on_prediction_changed)
        self.matches.itemClicked.connect(self._go_to_match)
        self.add_button.changed.connect(self.add_region)
        self._on_prediction_changed()

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> PredictionState | None:
        layer = self.prediction.value
        return state_of(layer) if layer is not None else None

    def _on_prediction_changed(self, *_: Any) -> None:
        self._similarity = None
        if str(self.query.value).strip():
            self._schedule()

    def _ready_state(self) -> PredictionState | None:
        state = self.state
        if state is None:
            self.summary.setText("Run 'Predict regions' first: queries use its tile embeddings.")
            return None
        if not state.complete or state.model is None:
            self.summary.setText("This prediction is incomplete (cancelled or running): run it to the end.")
            return None
        return state

    # ------------------------------------------------------------------ querying
    def set_text(self, text: str) -> None:
        """Type ``text`` into the query box (the query follows after the debounce delay)."""
        self.query.value = text

    def _schedule(self, *_: Any) -> None:
        self._timer.start()  # restarts: only a pause in typing runs the query

    def update_query(self) -> np.ndarray | None:
        """Encode the text and show its similarity heatmap, highlight and best tiles."""
        text = str(self.query.value).strip()
        state = self._ready_state()
        if not text or state is None:
            return None
        try:
            embedding = state.model.encode_texts([text])[0]
            similarity = state.prediction.similarity(embedding)
        except Exception as exc:
            self._error(f"Query failed: {message_of(exc)}")
            return None
        self._similarity, self._text, self._state = similarity, text, state
        finite = similarity[np.isfinite(similarity)]
        if finite.size == 0:
            self.summary.setText("No tissue tiles to compare with.")
            return similarity
        lo, hi = float(finite.min()), float(finite.max())
        threshold = float(np.percentile(finite, DEFAULT_PERCENTILE))
        with self.threshold.changed.blocked():
            self.threshold.min, self.threshold.max = lo, max(hi, lo + 1e-6)
            self.threshold.step = max((hi - lo) / 500, 1e-6)
            self.threshold.value = threshold
        self.applied_threshold = threshold
        query_layers(self.viewer, state, text, similarity, threshold)
        self._fill_matches(state, similarity)
        self._summarise(similarity, threshold)
        return similarity

    def _apply_threshold(self, value: float) -> None:
        state = self._state
        if self._similarity is None or state is None:
            return
        self.applied_threshold = float(value)
        high = state.layers.get("highlight")
        if layer_alive(self.viewer, high):
            high.data = highlight_mask(self._similarity, float(value))
        self._summarise(self._similarity, float(value))

    def _summarise(self, similarity: np.ndarray, threshold: float) -> None:
        finite = np.isfinite(similarity)
        n = int(highlight_mask(similarity, threshold).sum())
        total = int(finite.sum())
        self.summary.setText(f"'{self._text}': cosine {np.nanmin(similarity):.3f} … {np.nanmax(similarity):.3f}. "
                             f"{n} of {total} tiles ({100 * n / max(total, 1):.0f}%) at or above {threshold:.3f}.")

    def _fill_matches(self, state: PredictionState, similarity: np.ndarray) -> None:
        self.matches.clear()
        flat = np.where(np.isfinite(similarity), similarity, -np.inf).ravel()
        order = np.argsort(-flat)[:TOP_CELLS]
        labels = np.asarray(state.labels_layer.data) if state.labels_layer is not None else state.predicted
        for k in order:
            if not np.isfinite(flat[k]):
                break
            r, c = np.unravel_index(int(k), similarity.shape)
            region = state.region(int(labels[r, c]))
            item = QListWidgetItem(f"{flat[k]:.3f}   {region.name if region else 'no region'}   tile ({r}, {c})")
            item.setData(CELL_ROLE, (int(r), int(c)))
            self.matches.addItem(item)

    def best_cells(self) -> list[tuple[int, int]]:
        return [tuple(self.matches.item(i).data(CELL_ROLE)) for i in range(self.matches.count())]

    def _go_to_match(self, item: QListWidgetItem) -> None:
        state = self._state
        if state is not None:
            focus_cell(self.viewer, state, item.data(CELL_ROLE))

    # ------------------------------------------------------------------ vocabulary
    def add_region(self, *_: Any):
        """Add a region (new id = max + 1) and relabel every tile from the cached embeddings.

        Cells the user has painted keep their paint; all others take the new decoding, and those
        whose label changed lose their review confirmation (the user has not seen the new label).
        """
        state = self._ready_state()
        name = str(self.region_name.value or "").strip()
        description = str(self.region_description.value or "").strip()
        if state is None:
            self._error("Run a prediction to the end before adding regions.")
            return None
        if not name:
            self._error("Give the new region a name.")
            return None
        if any(r.name.lower() == name.lower() for r in state.regions):
            self._error(f"A region named '{name}' is already in the vocabulary.")
            return None
        try:
            new = state.add_region(name, None, description)  # the one way regions are added (as New region...)
            regions = list(state.regions)
            layer = state.labels_layer
            current = np.asarray(layer.data).copy()
            edited = state.edited_mask(current)
            state.prediction.decode(state.model.region_embeddings(regions), regions)
        except Exception as exc:
            self._error(f"Cannot add the region: {message_of(exc)}")
            return None
        state.regions = list(regions)
        state.predicted = np.asarray(state.prediction.labels, np.uint16).copy()
        relabelled = np.where(edited, current, state.predicted).astype(current.dtype)
        cleared = state.clear_confirmation(relabelled != current)
        layer.data = relabelled
        refresh_region_layers(self.viewer, state)
        state.publish()
        state.changed.emit("regions")
        n = int((state.predicted == new.id).sum())
        self.add_status.setText(f"Added '{new.name}' (id {new.id}): {n} tiles now carry it"
                                + (f"; {int(edited.sum())} painted tiles kept" if edited.any() else "")
                                + (f"; {cleared} relabelled tiles are no longer confirmed." if cleared else "."))
        self.region_name.value = ""
        self.region_description.value = ""
        return new

    def _error(self, text: str) -> None:
        report_problem(self.summary, text)
