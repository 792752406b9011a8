"""The Export annotations widget: corrections to training pairs and annotations; optional fine-tuning."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, ProgressBar, PushButton, SpinBox
from qtpy.QtWidgets import QHBoxLayout, QVBoxLayout, QWidget

from napari_cytoclip.widgets.common import (report_problem, LayerChoices, WorkerFailure, drive, group, guarded,
                                            message_of, prediction_layer_choices, status_label, widget_alive)
from napari_cytoclip.teach.safe_finetune import candidate_folder
from napari_cytoclip.widgets.state import PredictionState, state_of

FINETUNE_BATCH = 32
FINETUNE_LR = 1e-4
MIN_STEPS_PER_EPOCH = 10


def next_model_folder(out_dir: Path, name: str) -> Path:
    """``<out>/models/<name>-finetuned-<k>`` for the first free k (never overwrites); ``name`` is sanitised."""
    from napari_cytoclip.io.safe_files import safe_name

    k = 1
    while True:
        folder = out_dir / "models" / f"{safe_name(name)}-finetuned-{k}"
        taken = (folder, folder.with_name(folder.name + ".ckpt"), candidate_folder(folder),
                 candidate_folder(folder).with_name(candidate_folder(folder).name + ".ckpt"))
        if not any(os.path.lexists(p) for p in taken):
            return folder
        k += 1


class ExportWidget(QWidget):
    """Export the painted corrections and reviewed tiles of a prediction; fine-tune on them.

    Corrections are found by comparing the layer's data with the prediction's labels that the
    Predict widget stored (the paint event is not parsed). Nothing is ever overwritten: pairs
    are content-addressed and ``export.export_corrections`` refuses foreign folders.
    """

    def __init__(self, napari_viewer: Any):
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._stop: threading.Event | None = None  # set to stop the running export or fine-tune
        self._job: str | None = None  # "export" or "finetune" while one runs
        self.last_result = None
        self.last_bundle = None
        self.last_outcome = None  # the last fine-tune's FinetuneOutcome (scores, kept or discarded)

        self.layer = ComboBox(label="Regions layer", choices=prediction_layer_choices(napari_viewer),
                              tooltip="A Labels layer made by 'Predict regions'")
        self.folder = FileEdit(label="Output folder", mode="d", nullable=True, value=None,
                               tooltip="Exports accumulate here: pairs/, labels.tif, annotations.geojson, regions.csv")
        self.form = Container(widgets=[self.layer, self.folder], labels=True)
        self.folder.line_edit.native.setPlaceholderText("a new or earlier export folder")
        self.edits = status_label("")
        self.export_button = PushButton(text="Export corrections")
        self.result = status_label("")
        self.epochs = SpinBox(label="Epochs", min=1, max=500, value=5)
        self.replay = FileEdit(label="Replay pairs", mode="d", nullable=True, value=None,
                               tooltip="Pairs of what the model learnt from (a pair folder, or a folder of them, "
                                       "e.g. an earlier export or replay/): mixed into every batch so that "
                                       "fine-tuning does not forget")
        self.replay.line_edit.native.setPlaceholderText("required: pairs the model learnt from")
        self.train_form = Container(widgets=[self.replay, self.epochs], labels=True)
        self.finetune_button = PushButton(text="Fine-tune model")
        self.finetune_button.tooltip = ("Train a copy of the model on 80% of the exported pairs with replay; Predict "
                                        "uses it only if it beats the current model on the other 20%")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="")
        self.train_status = status_label("Fine-tuning writes a new model bundle under <output folder>/models/ when it "
                                         "beats the current one on held-back corrections.")

        train_buttons = QWidget()
        row = QHBoxLayout(train_buttons)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.finetune_button.native)
        row.addWidget(self.cancel_button.native)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.form.native)
        layout.addWidget(self.edits)
        layout.addWidget(self.export_button.native)
        layout.addWidget(self.result)
        layout.addWidget(group("Fine-tune on the exported pairs", self.train_form.native, train_buttons,
                               self.progress.native, self.train_status))
        layout.addStretch(1)

        self._choices = LayerChoices(napari_viewer, self.layer)
        self._watched = None
        self.layer.changed.connect(self._on_layer_changed)
        self.export_button.changed.connect(self.export)
        self.finetune_button.changed.connect(self.finetune)
        self.cancel_button.changed.connect(self.cancel)
        self._on_layer_changed()

    # ------------------------------------------------------------------ inputs
    @property
    def state(self) -> PredictionState | None:
        layer = self.layer.value
        return state_of(layer) if layer is not None else None

    def output_folder(self) -> Path | None:
        value = str(self.folder.value or "").strip()
        return None if value in ("", ".") else Path(value)

    def replay_folder(self) -> Path | None:
        value = str(self.replay.value or "").strip()
        return None if value in ("", ".") else Path(value)

    def _on_layer_changed(self, *_: Any) -> None:
        if self._watched is not None:
            try:
                self._watched.events.paint.disconnect(self.count_edits)
            except Exception:
                pass
        layer = self.layer.value
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self.count_edits)  # only a cue to recount; the payload is not read
        self.count_edits()

    def count_edits(self, *_: Any) -> tuple[int, int]:
        """(corrected, reviewed-and-unchanged) tiles of the chosen prediction, also shown in the widget."""
        state, layer = self.state, self.layer.value
        if state is None or not state.complete:
            self.edits.setText("Choose a completed prediction." if state is None or state.status != "running"
                               else "The prediction is still running.")
            return 0, 0
        data = np.asarray(layer.data)
        corrected = state.edited_mask(data) & (data > 0)
        confirmed = state.reviewed & ~corrected & (data > 0)
        self.edits.setText(f"{int(corrected.sum())} tiles repainted, {int(confirmed.sum())} reviewed and kept.")
        return int(corrected.sum()), int(confirmed.sum())

    def _ready(self) -> tuple[PredictionState, Any, Path] | None:
        state, layer, out = self.state, self.layer.value, self.output_folder()
        if state is None:
            self._error("Choose a regions layer made by 'Predict regions'.")
            return None
        if not state.complete:
            self._error(f"The prediction of '{state.image_name}' is {state.status}: run it to the end before exporting.")
            return None
        if out is None:
            self._error("Choose an output folder.")
            return None
        return state, layer, out

    # ------------------------------------------------------------------ export
    def export(self, *_: Any, blocking: bool = False):
        """Export in a thread worker (``blocking=True``: in this thread, returning the ExportResult)."""
        from napari.qt.threading import create_worker

        from napari_cytoclip.teach.export import export_corrections

        ready = self._ready()
        if ready is None or self._worker is not None:
            return None
        state, layer, out = ready
        self._stop, self._job = threading.Event(), "export"
        args = (state.section, state.prediction, np.asarray(layer.data).copy(), out, state.bundle)
        kwargs = {"confirmed": state.reviewed.copy(), "regions": list(state.regions), "stop": self._stop}
        self.result.setText("Exporting…")
        if blocking:
            try:
                result = export_corrections(*args, **kwargs)
            except Exception as exc:
                result = WorkerFailure(exc)
            finally:
                self._stop, self._job = None, None
            self._on_exported(result)
            return None if isinstance(result, WorkerFailure) else result
        worker = create_worker(guarded, export_corrections, *args, _start_thread=False, _ignore_errors=True,
                               **kwargs)
        worker.returned.connect(self._on_exported)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_busy(True)
        worker.start()
        return worker

    def _on_exported(self, result: Any) -> None:
        from napari.utils.notifications import show_info

        from napari_cytoclip.errors import Cancelled

        if not self._alive():  # the viewer closed while the export ran
            return
        if isinstance(result, WorkerFailure):
            if isinstance(result.exc, Cancelled):
                self.result.setText("Export cancelled: the pair list and annotations were left as they were.")
                return
            self._error(f"Export failed: {message_of(result.exc)}")
            return
        self.last_result = result
        text = (f"Exported to {result.folder}: {result.corrected_cells} corrected and {result.confirmed_cells} "
                f"confirmed tiles; {result.pairs_added} new training pairs ({result.pairs_existing} already there).")
        self.result.setText(text)
        show_info(text)
        self.count_edits()

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, *_: Any, blocking: bool = False):
        """Fine-tune the prediction's model on ``<output>/pairs`` with replay (teach/safe_finetune.py).

        The new model is offered to Predict only when it beats the start model on held-back pairs;
        ``blocking=True`` returns the new bundle (None when refused, discarded or failed).
        """
        from napari.qt.threading import create_worker

        from napari_cytoclip.teach.export import PAIRS_DIR
        from napari_cytoclip.teach.safe_finetune import NO_REPLAY, safe_finetune
        from napari_cytoclip.teach.train import TrainConfig

        ready = self._ready()
        if ready is None or self._worker is not None:
            return None
        state, _layer, out = ready
        pairs = out / PAIRS_DIR
        n_pairs = _count_pairs(pairs)
        if n_pairs == 0:
            self._error("Export some corrections first: there are no training pairs in " f"{pairs}.")
            return None
        replay = self.replay_folder()
        if replay is None:
            self._error(f"Choose 'Replay pairs' to fine-tune: {NO_REPLAY}.")
            self.train_status.setText("⚠ Fine-tuning needs replay pairs; or use 'Save taught model' in "
                                      "'Predict regions' (the fast learner).")
            return None
        init = state.bundle if list(state.regions) == list(state.bundle.regions) else \
            state.bundle.with_regions(state.regions)
        config = TrainConfig(epochs=int(self.epochs.value), batch_size=FINETUNE_BATCH, lr=FINETUNE_LR,
                             warmup_steps=1, device=str(state.model_key[1]))
        target = next_model_folder(out, state.bundle.name)
        self._stop, self._job = threading.Event(), "finetune"
        gen = safe_finetune(pairs, [replay], target, init, config, self._stop, min_steps_per_epoch=MIN_STEPS_PER_EPOCH)
        self.progress.max, self.progress.value = config.epochs * MIN_STEPS_PER_EPOCH, 0
        self.train_status.setText(f"Fine-tuning on {n_pairs} pairs (a fifth held back to check it) → {target}")
        if blocking:
            try:
                while True:
                    self._on_train_progress(next(gen))
            except StopIteration as stop:
                self._on_trained(state, stop.value)
                return stop.value.bundle
            except Exception as exc:
                self._on_train_error(exc)
                return None
            finally:
                self._stop, self._job = None, None
        worker = create_worker(drive, gen, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_train_progress)
        worker.returned.connect(lambda outcome: self._on_trained(state, outcome))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_busy(True)
        worker.start()
        return worker

    def _on_train_progress(self, info: dict) -> None:
        if not self._alive():
            return
        if "phase" in info:
            if info["phase"] == "scoring":
                self.train_status.setText(f"Scoring both models on {info['n_held']} held-back corrections…")
            else:
                self.train_status.setText("Holding back a fifth of the pairs to check the new model…")
            return
        if "epoch_done" in info:
            m = info["epoch_done"]
            self.train_status.setText(f"Epoch {m['epoch']}/{int(self.epochs.value)} done, loss {m['loss']:.3f}")
            return
        self.progress.max = info["epochs"] * info["steps"]
        self.progress.value = min(self.progress.max, info["epoch"] * info["steps"] + info["step"] + 1)
        self.train_status.setText(f"Epoch {info['epoch'] + 1}/{info['epochs']}, "
                                  f"step {info['step'] + 1}/{info['steps']}, loss {info['loss']:.3f}")

    def _on_trained(self, state: PredictionState, outcome: Any) -> None:
        from napari.utils.notifications import show_info

        if not self._alive():
            return
        if isinstance(outcome, WorkerFailure):
            self._on_train_error(outcome.exc)
            return
        self.last_outcome = outcome
        self.progress.value = self.progress.max
        if not outcome.shipped:
            text = outcome.summary() + " Export more corrections or use 'Save taught model' in 'Predict regions'."
            self.train_status.setText(text)
            show_info(text)
            return
        bundle = outcome.bundle
        self.last_bundle = bundle
        state.finetuned_bundle = bundle.path
        state.publish()
        loaded = self._hand_to_predict_widgets(bundle.path)
        text = f"{outcome.summary()} New model: {bundle.path}." + (
            " The Predict widget now uses it: press Run to predict with it." if loaded
            else " Choose it as the model in 'Predict regions'.")
        self.train_status.setText(text)
        show_info(text)

    def _hand_to_predict_widgets(self, path: Path) -> int:
        """Point every Predict widget docked in this viewer at the new bundle (public dock API only)."""
        from napari_cytoclip.widgets.predict_widget import PredictWidget

        try:
            docked = list(self.viewer.window.dock_widgets.values())
        except Exception:  # a viewer without a window
            return 0
        widgets = [w for w in docked if isinstance(w, PredictWidget)]
        for w in widgets:
            w.set_model_path(path)
        return len(widgets)

    def _on_train_error(self, exc: BaseException) -> None:
        from napari_cytoclip.errors import Cancelled

        if isinstance(exc, Cancelled):
            self.train_status.setText("Fine-tuning cancelled; no model was written.")
            return
        self._error(f"Fine-tuning failed: {message_of(exc)}")
        self.train_status.setText(f"⚠ Fine-tuning failed: {message_of(exc)}")

    def cancel(self, *_: Any) -> None:
        """Stop the running export (at the next pair) or fine-tune (at the next training step)."""
        if self._stop is None:
            return
        self._stop.set()
        if self._job == "export":
            self.result.setText("Cancelling the export…")
        else:
            self.train_status.setText("Cancelling at the next training step…")

    # ------------------------------------------------------------------ plumbing
    def _on_finished(self, *_: Any) -> None:
        self._worker, self._stop, self._job = None, None, None
        if self._alive():
            self._set_busy(False)

    def _alive(self) -> bool:
        return widget_alive(self)

    def _set_busy(self, busy: bool) -> None:
        self.export_button.enabled = not busy
        self.finetune_button.enabled = not busy
        self.cancel_button.enabled = busy and self._stop is not None

    @property
    def worker(self):
        return self._worker

    def _error(self, text: str) -> None:
        report_problem(self.result, text)


def _count_pairs(folder: Path) -> int:
    csv_path = folder / "pairs.csv"
    if not csv_path.is_file():
        return 0
    with open(csv_path, encoding="utf-8") as f:
        return max(0, sum(1 for line in f if line.strip()) - 1)
