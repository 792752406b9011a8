"""The Export annotations widget: corrections to training pairs and annotations; optional fine-tuning."""
from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from pathlib import Path
from typing import Any, Generator

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, ProgressBar, PushButton, SpinBox
from qtpy.QtWidgets import QHBoxLayout, QVBoxLayout, QWidget

from napari_cytoclip.widgets.common import (LayerChoices, WorkerFailure, drive, group, guarded, message_of, prediction_layer_choices,
                     status_label, widget_alive)
from napari_cytoclip.widgets.state import PredictionState, state_of

FINETUNE_BATCH = 32
FINETUNE_LR = 1e-4
MIN_STEPS_PER_EPOCH = 10


def training_steps(pairs: Path, out: Path, init: Any, config: Any, stop: threading.Event) -> Generator:
    """Run ``train.train`` in a helper thread; yield its progress dicts; return the new bundle.

    Setting ``stop`` makes the next progress call raise ``Cancelled`` inside training, and the
    checkpoint folder is removed if this run created it (only training's own files in it).
    """
    from napari_cytoclip.errors import Cancelled
    from napari_cytoclip.teach.train import train

    updates: queue.Queue = queue.Queue()
    result: dict = {}

    def progress(info: dict) -> None:
        if stop.is_set():
            raise Cancelled()
        updates.put(info)

    def work() -> None:
        try:
            result["bundle"] = train([pairs], out, init=init, config=config, progress=progress)
        except BaseException as exc:  # handed to the worker thread below
            result["error"] = exc
        finally:
            updates.put(None)

    ckpt = out.with_name(out.name + ".ckpt")
    ours = not os.path.lexists(ckpt)  # only a checkpoint folder this run creates may be removed
    thread = threading.Thread(target=work, daemon=True, name="cytoclip-finetune")
    thread.start()
    while (item := updates.get()) is not None:
        yield item
    thread.join()
    if "error" in result:
        if isinstance(result["error"], Cancelled) and ours:
            remove_checkpoint(ckpt)
        raise result["error"]
    return result["bundle"]


CHECKPOINT_FILES = ("last.pt", "best.pt", "text_features.pt", "last.pt.tmp", "best.pt.tmp", "cytoclip-train.json")


def remove_checkpoint(ckpt: Path) -> None:
    """Delete the files training writes into ``ckpt``, then the folder if nothing else is left in it."""
    if ckpt.is_symlink() or not ckpt.is_dir():
        return
    for name in CHECKPOINT_FILES:
        path = ckpt / name
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        ckpt.rmdir()  # fails, keeping it, when anything else is in it


def next_model_folder(out_dir: Path, name: str) -> Path:
    """``<out>/models/<name>-finetuned-<k>`` for the first free k (never overwrites); ``name`` is sanitised."""
    from napari_cytoclip.io.safe_files import safe_name

    k = 1
    while True:
        folder = out_dir / "models" / f"{safe_name(name)}-finetuned-{k}"
        if not folder.exists() and not folder.with_name(folder.name + ".ckpt").exists():
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
        self.train_form = Container(widgets=[self.epochs], labels=True)
        self.finetune_button = PushButton(text="Fine-tune model")
        self.finetune_button.tooltip = "Train a copy of the model on the exported pairs; Predict then uses it"
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="")
        self.train_status = status_label("Fine-tuning writes a new model bundle under <output folder>/models/.")

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
        """Fine-tune the prediction's model on ``<output>/pairs``; the Predict widget then uses the new model."""
        from napari.qt.threading import create_worker

        from napari_cytoclip.teach.export import PAIRS_DIR
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
        init = state.bundle if list(state.regions) == list(state.bundle.regions) else \
            state.bundle.with_regions(state.regions)
        steps = max(MIN_STEPS_PER_EPOCH, math.ceil(n_pairs / FINETUNE_BATCH))
        config = TrainConfig(epochs=int(self.epochs.value), batch_size=FINETUNE_BATCH, lr=FINETUNE_LR,
                             warmup_steps=1, steps_per_epoch=steps, device=str(state.model_key[1]))
        target = next_model_folder(out, state.bundle.name)
        self._stop, self._job = threading.Event(), "finetune"
        gen = training_steps(pairs, target, init, config, self._stop)
        self.progress.max, self.progress.value = config.epochs * steps, 0
        self.train_status.setText(f"Fine-tuning on {n_pairs} pairs → {target}")
        if blocking:
            try:
                while True:
                    self._on_train_progress(next(gen))
            except StopIteration as stop:
                self._on_trained(state, stop.value)
                return stop.value
            except Exception as exc:
                self._on_train_error(exc)
                return None
            finally:
                self._stop, self._job = None, None
        worker = create_worker(drive, gen, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_train_progress)
        worker.returned.connect(lambda bundle: self._on_trained(state, bundle))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_busy(True)
        worker.start()
        return worker

    def _on_train_progress(self, info: dict) -> None:
        if "epoch_done" in info:
            m = info["epoch_done"]
            self.train_status.setText(f"Epoch {m['epoch']}/{int(self.epochs.value)} done, loss {m['loss']:.3f}")
            return
        self.progress.value = min(self.progress.max, info["epoch"] * info["steps"] + info["step"] + 1)
        self.train_status.setText(f"Epoch {info['epoch'] + 1}/{int(self.epochs.value)}, "
                                  f"step {info['step'] + 1}/{info['steps']}, loss {info['loss']:.3f}")

    def _on_trained(self, state: PredictionState, bundle: Any) -> None:
        from napari.utils.notifications import show_info

        if isinstance(bundle, WorkerFailure):
            self._on_train_error(bundle.exc)
            return
        self.last_bundle = bundle
        self.progress.value = self.progress.max
        state.finetuned_bundle = bundle.path
        state.publish()
        loaded = self._hand_to_predict_widgets(bundle.path)
        text = f"New model: {bundle.path}." + (" The Predict widget now uses it: press Run to predict with it."
                                              if loaded else " Choose it as the model in 'Predict regions'.")
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
        from napari.utils.notifications import show_error

        self.result.setText(f"⚠ {text}")
        show_error(text)


def _count_pairs(folder: Path) -> int:
    csv_path = folder / "pairs.csv"
    if not csv_path.is_file():
        return 0
    with open(csv_path, encoding="utf-8") as f:
        return max(0, sum(1 for line in f if line.strip()) - 1)
