"""The Predict widget's teach panel: painted and confirmed cells refit a small learner that relabels the map.

*Update map* fits :func:`~napari_cytoclip.teach.teaching.fit_learner` on this section's painted and
confirmed cells (plus the teaching set of a taught model) on the cached pooled features, in a
napari thread worker, and relabels the whole section from the cache
(:func:`~napari_cytoclip.teach.teaching.decode_with_learner`); layers change only in the
``returned`` handler, on the main thread. Painted (and confirmed) cells are never overwritten. The
last update can be undone. *Update after each stroke* reacts to the Labels layer's paint event as a
cue only (its payload is never read): after a pause it compares the layer's data with the stored
copy and updates when the taught cells changed. *Save taught model* writes a taught bundle
(:func:`~napari_cytoclip.models.bundle.save_taught_bundle`) and offers it to Predict regions.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (QCheckBox, QColorDialog, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QGroupBox,
                            QHBoxLayout, QLineEdit, QPushButton, QVBoxLayout, QWidget)

from napari_cytoclip.widgets.common import (report_problem, WorkerFailure, guarded, message_of, status_label,
                                            widget_alive)
from napari_cytoclip.widgets.state import PredictionState, layer_alive

UPDATE_DEBOUNCE_MS = 600  # after the last paint stroke, *Update after each stroke* waits this long


@dataclass
class TeachResult:
    """What :func:`teach_section` fitted (and, with ``decode``, the relabelled map)."""

    learner: Any
    teaching_set: Any
    regions: list
    labels: np.ndarray | None
    confidence: np.ndarray | None
    fit_s: float
    taught_cells: int


def teach_section(state: PredictionState, current: np.ndarray, decode: bool = True) -> TeachResult:
    """Fit the learner on ``current``'s painted and confirmed cells (and a taught model's teaching set)
    and, with ``decode``, relabel the whole section from the cache. Qt-free: runs in a thread worker.

    Painted cells are those where ``current`` differs from ``state.predicted``; painted and confirmed
    cells keep their label and vote for it. Raises a CytoclipError when nothing is taught.
    """
    from napari_cytoclip.errors import BundleError, CytoclipError
    from napari_cytoclip.io.safe_files import now_iso
    from napari_cytoclip.inference.taught_decode import decode_with_learner, prediction_features
    from napari_cytoclip.teach.teaching import examples_from_section, fit_learner, load_teaching_set, taught_regions

    pred, model = state.prediction, state.model
    current = np.asarray(current)
    painted = state.edited_mask(current)
    if not state.taught_mask(current)[pred.cells[:, 0], pred.cells[:, 1]].any():
        raise CytoclipError(None, "nothing to learn from yet: paint some cells (or confirm them in the review "
                                  "queue), then update")
    source = pred.source or state.section.source or state.section.name
    new = examples_from_section(pred, current, state.regions, prediction_features(pred, model, state.section),
                                confirmed=state.reviewed, name=Path(str(source)).name,
                                section_hash=state.section.content_hash(),
                                model={"name": pred.model_name or state.bundle.name,
                                       "hash": pred.signature.get("model") or state.bundle.weights_hash()},
                                when=now_iso(), predicted=state.predicted)
    merged = load_teaching_set(state.bundle.path, BundleError).extend(new, state.bundle.path) \
        if getattr(state.bundle, "taught", False) else new
    regions = taught_regions(model.regions, merged.regions, [r.id for r in merged.regions])
    t0 = time.perf_counter()
    last = state.learner  # reuse its feature axes, so the projected features stay cached between updates
    basis = (last.basis_mean, last.basis) if last is not None and last.basis is not None else None
    learner = fit_learner(merged, model, regions, basis=basis)
    fit_s = time.perf_counter() - t0
    labels = conf = None
    if decode:
        labels, conf = decode_with_learner(pred, learner, model, section=state.section, cache=state.teach_cache,
                                           painted=painted | state.reviewed, current=current, regions=regions)
    return TeachResult(learner, merged, regions, labels, conf, fit_s, int(merged.taught().sum()))


def save_taught_model(state: PredictionState, current: np.ndarray, folder: str | Path):
    """Fit on the current corrections and write a taught bundle to the new ``folder`` (never overwritten)."""
    from napari_cytoclip.teach.teaching import taught_provenance
    from napari_cytoclip.errors import OutputError
    from napari_cytoclip.models.bundle import save_taught_bundle
    from napari_cytoclip.io.safe_files import now_iso

    folder = Path(folder)
    if os.path.lexists(folder):
        raise OutputError(folder, "already exists; choose a new folder for the taught model")
    res = teach_section(state, current, decode=False)
    prov = taught_provenance(state.bundle, res.teaching_set, res.regions, res.learner, res.fit_s, now_iso())
    return save_taught_bundle(state.bundle, res.regions, res.learner, res.teaching_set, folder, prov)


class TeachPanel(QGroupBox):
    """*Update map*, *Undo update*, *Update after each stroke*, *New region...* and *Save taught model*
    for the prediction it follows (:meth:`follow`). ``host``: the Predict widget (optional), which gets
    paint mode for a new region and the saved model as its next model."""

    def __init__(self, viewer: Any, state: PredictionState | None = None, host: Any = None):
        super().__init__("Teach (learn from your corrections)")
        self.viewer = viewer
        self.host = host
        self._state: PredictionState | None = None
        self._layer = None
        self._worker = None
        self._pending = False
        self._last_taught: np.ndarray | None = None
        self.last_bundle = None

        self.update_button = QPushButton("Update map")
        self.update_button.setToolTip("Refit the learner from every painted and confirmed cell and relabel the "
                                      "section from the cached features (painted cells are kept)")
        self.undo_button = QPushButton("Undo update")
        self.undo_button.setEnabled(False)
        self.auto = QCheckBox("Update after each stroke")
        self.new_region_button = QPushButton("New region…")
        self.new_region_button.setToolTip("Add a region to paint with: a name, a colour, optionally a description")
        self.save_button = QPushButton("Save taught model…")
        self.save_button.setToolTip("Write a model bundle with the learner and its teaching set; Predict regions "
                                    "then uses it")
        self.status = status_label("Paint or confirm cells, then Update map: the learner refits in about a second.")
        row = QWidget()
        buttons = QHBoxLayout(row)
        buttons.setContentsMargins(0, 0, 0, 0)
        buttons.addWidget(self.update_button)
        buttons.addWidget(self.undo_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.setSpacing(4)
        layout.addWidget(row)
        layout.addWidget(self.auto)
        layout.addWidget(self.save_button)
        layout.addWidget(self.status)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(UPDATE_DEBOUNCE_MS)
        self._timer.timeout.connect(self.update_if_changed)
        self.update_button.clicked.connect(lambda *_: self.update_map())
        self.undo_button.clicked.connect(lambda *_: self.undo())
        self.new_region_button.clicked.connect(lambda *_: self.new_region_dialog())
        self.save_button.clicked.connect(lambda *_: self.save_dialog())
        self.follow(state)

    # ------------------------------------------------------------------ following a prediction
    @property
    def state(self) -> PredictionState | None:
        return self._state

    @property
    def worker(self):
        return self._worker

    def follow(self, state: PredictionState | None) -> None:
        """Act on ``state``; its Labels layer's paint event (a cue only) drives *Update after each stroke*."""
        if self._layer is not None:
            try:
                self._layer.events.paint.disconnect(self._on_paint)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if state is not self._state:
            self.status.setText("Paint or confirm cells, then Update map: the learner refits in about a second.")
        self._state, self._layer, self._last_taught = state, None, None
        if state is not None and state.labels_layer is not None:
            self._layer = state.labels_layer
            self._layer.events.paint.connect(self._on_paint)
        self.undo_button.setEnabled(state is not None and state.undo_update is not None)

    def _on_paint(self, *_: Any) -> None:
        if self.auto.isChecked():
            self._timer.start()  # restarts: the update runs when painting pauses

    def _ready(self) -> PredictionState | None:
        state = self._state
        if state is None or not state.complete:
            self._warn("Run a prediction to the end first: the learner reads its cached features.")
            return None
        if not layer_alive(self.viewer, state.labels_layer):
            self._warn("The region layer of this prediction was closed.")
            return None
        if state.model is None:  # a restored prediction loads its model here, on first use
            self._warn("The model of this prediction is not loaded.")
            return None
        return state

    # ------------------------------------------------------------------ update and undo
    def update_if_changed(self) -> Any:
        """Update when the taught cells (painted or confirmed, with their labels) changed since the last update."""
        state = self._state
        if state is None or not state.complete or not layer_alive(self.viewer, state.labels_layer):
            return None
        if self._worker is not None:
            self._pending = True
            return None
        if np.array_equal(self._taught_now(state), self._last_taught if self._last_taught is not None else 0):
            return None
        return self.update_map()

    def _taught_now(self, state: PredictionState) -> np.ndarray:
        current = np.asarray(state.labels_layer.data)
        return np.where(state.taught_mask(current), current, 0)

    def update_map(self, blocking: bool = False) -> Any:
        """Refit the learner and relabel the section in a thread worker (``blocking``: here, returning the
        result). A click while an update runs queues one more update."""
        state = self._ready()
        if state is None:
            return None
        if self._worker is not None:
            self._pending = True
            return None
        current = np.asarray(state.labels_layer.data).copy()
        self._last_taught = np.where(state.taught_mask(current), current, 0)
        self.status.setText("Updating the map…")
        return self._start(teach_section, (state, current), partial(self._on_updated, state, time.perf_counter()),
                           blocking)

    def _on_updated(self, state: PredictionState, t0: float, result: Any) -> None:
        if not widget_alive(self):
            return
        if isinstance(result, WorkerFailure):
            self._error(f"Update failed: {message_of(result.exc)}")
            return
        from napari_cytoclip.widgets.layers import refresh_region_layers

        layer = state.labels_layer
        if not layer_alive(self.viewer, layer) or state.prediction is None:
            return
        pred = state.prediction
        now = np.asarray(layer.data).copy()  # strokes made while the learner ran are kept too
        painted = state.edited_mask(now)
        fixed = painted | state.reviewed
        after = np.where(fixed, now, result.labels).astype(now.dtype)
        state.undo_update = {"layer": now, "after": after, "predicted": state.predicted, "labels": pred.labels,
                             "confidence": pred.confidence, "learner": state.learner, "regions": list(pred.regions)}
        # painted cells keep the baseline they were painted over, so they stay painted (and exported as corrections)
        state.predicted = np.where(painted, state.predicted, result.labels).astype(np.uint16)
        pred.labels, pred.confidence = state.predicted.copy(), result.confidence
        pred.regions = list(state.regions)
        state.learner = result.learner
        changed = int((after != now).sum())
        layer.data = after
        refresh_region_layers(self.viewer, state)
        state.publish()
        state.changed.emit("taught")
        self.undo_button.setEnabled(True)
        sections = len(result.teaching_set.sources)
        self.status.setText(f"Map updated in {time.perf_counter() - t0:.1f} s (learner fitted in {result.fit_s:.2f} s "
                            f"on {result.taught_cells} taught cells of {sections} section(s)): {changed} cells "
                            f"relabelled, {int(painted.sum())} painted cells kept.")

    def undo(self) -> bool:
        """Restore the labels, confidence and learner from before the last update (strokes since are kept)."""
        from napari_cytoclip.widgets.layers import refresh_region_layers

        state = self._state
        saved = state.undo_update if state is not None else None
        if saved is None or not layer_alive(self.viewer, state.labels_layer):
            self._warn("There is no update to undo.")
            return False
        layer = state.labels_layer
        now = np.asarray(layer.data)
        restored = np.where(now != saved["after"], now, saved["layer"]).astype(now.dtype)
        state.predicted = saved["predicted"]
        state.prediction.labels, state.prediction.confidence = saved["labels"], saved["confidence"]
        state.learner = saved["learner"]
        state.undo_update = None
        self._last_taught = None
        layer.data = restored
        refresh_region_layers(self.viewer, state)
        state.publish()
        state.changed.emit("taught")
        self.undo_button.setEnabled(False)
        self.status.setText("The last update was undone.")
        return True

    # ------------------------------------------------------------------ regions
    def new_region(self, name: str, color: str | None = None, description: str = "") -> Any:
        """Add a region to paint with (see :meth:`PredictionState.add_region`); returns it (None after an error)."""
        from napari_cytoclip.widgets.layers import refresh_region_layers

        state = self._ready()
        if state is None:
            return None
        try:
            region = state.add_region(name, color, description)
        except ValueError as exc:
            self._error(f"Cannot add the region: {exc}")
            return None
        refresh_region_layers(self.viewer, state)
        if self.host is not None and hasattr(self.host, "paint_with"):
            self.host.paint_with(region.id)
        self.status.setText(f"Added '{region.name}' (id {region.id}): paint some of its cells, then Update map.")
        return region

    def new_region_dialog(self) -> Any:
        """Ask for a name, a colour and an optional description, then :meth:`new_region`."""
        dialog = NewRegionDialog(self, [r.color for r in (self._state.regions if self._state else [])])
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return None
        return self.new_region(*dialog.values())

    # ------------------------------------------------------------------ saving
    def save_taught_model(self, folder: str | Path, blocking: bool = False) -> Any:
        """Write the taught model to the new ``folder`` in a thread worker (``blocking``: here, returning it)."""
        state = self._ready()
        if state is None or self._worker is not None:
            return None
        current = np.asarray(state.labels_layer.data).copy()
        self.status.setText(f"Saving the taught model to {folder}…")
        return self._start(save_taught_model, (state, current, folder), partial(self._on_saved, state), blocking)

    def save_dialog(self) -> Any:
        path, _ = QFileDialog.getSaveFileName(self, "Save the taught model as a new folder")
        return self.save_taught_model(path) if path else None

    def _on_saved(self, state: PredictionState, bundle: Any) -> None:
        if not widget_alive(self):
            return
        if isinstance(bundle, WorkerFailure):
            self._error(f"Cannot save the taught model: {message_of(bundle.exc)}")
            return
        self.last_bundle = bundle
        state.taught_bundle = bundle.path
        state.publish()
        taught = bundle.provenance.get("taught", {})
        text = (f"Saved the taught model to {bundle.path} ({taught.get('cells', 0)} taught cells of "
                f"{len(taught.get('sections', []))} section(s)).")
        if self.host is not None and hasattr(self.host, "set_model_path"):
            self.host.set_model_path(bundle.path)
            text += " Predict regions now uses it: open another section and Run; teaching there adds to its set."
        self.status.setText(text)

    # ------------------------------------------------------------------ plumbing
    def _start(self, func: Callable, args: tuple, done: Callable, blocking: bool) -> Any:
        if blocking:
            result = guarded(func, *args)
            done(result)
            if self._pending:
                self._pending = False
            return result
        from napari.qt.threading import create_worker

        worker = create_worker(guarded, func, *args, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(done)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_busy(True)
        worker.start()
        return worker

    def _on_finished(self, *_: Any) -> None:
        self._worker = None
        if not widget_alive(self):
            return
        self._set_busy(False)
        if self._pending:
            self._pending = False
            self.update_if_changed()

    def _set_busy(self, busy: bool) -> None:
        for button in (self.update_button, self.save_button, self.new_region_button):
            button.setEnabled(not busy)
        self.undo_button.setEnabled(not busy and self._state is not None and self._state.undo_update is not None)

    def _warn(self, text: str) -> None:
        report_problem(self.status, text, error=False)

    def _error(self, text: str) -> None:
        report_problem(self.status, text)


class NewRegionDialog(QDialog):
    """Name, colour (a suggestion that differs from the others) and an optional description."""

    def __init__(self, parent: QWidget | None, colors: list[str]):
        from napari_cytoclip.models.vocabularies import auto_color

        super().__init__(parent)
        self.setWindowTitle("New region")
        self.name = QLineEdit()
        self.name.setPlaceholderText("e.g. Caudoputamen")
        self.description = QLineEdit()
        self.description.setPlaceholderText("optional: what it looks like in Nissl (its text prior)")
        self.color = auto_color(colors, len(colors))
        self.color_button = QPushButton()
        self._show_color()
        self.color_button.clicked.connect(self._pick_color)
        form = QFormLayout(self)
        form.addRow("Name", self.name)
        form.addRow("Colour", self.color_button)
        form.addRow("Description", self.description)
        box = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        box.accepted.connect(self.accept)
        box.rejected.connect(self.reject)
        form.addRow(box)

    def _show_color(self) -> None:
        self.color_button.setText(self.color)
        self.color_button.setStyleSheet(f"background-color: {self.color}")

    def _pick_color(self) -> None:
        picked = QColorDialog.getColor(QColor(self.color), self, "Region colour")
        if picked.isValid():
            self.color = picked.name()
            self._show_color()

    def values(self) -> tuple[str, str, str]:
        return self.name.text().strip(), self.color, self.description.text().strip()
