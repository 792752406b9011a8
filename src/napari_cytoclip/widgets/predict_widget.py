"""The Predict regions widget: choose the inputs, run the model over an image (run, cancel, progress).

The panels below the run controls live in their own modules: the legend and paint mode
(:mod:`.legend_panel`), the review queue (:mod:`.review_panel`) and the identify box
(:mod:`.identify_panel`); the run's work itself is :func:`.predict_steps.prediction_steps`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Generator

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QHBoxLayout, QVBoxLayout, QWidget

from napari_cytoclip.widgets.common import (report_problem, LayerChoices, WorkerFailure, current_plane, drive,
                                            image_layer_choices, message_of, pixel_size_of, plane_text,
                                            section_for_layer, shipped_bundle_path, stack_shape, status_label,
                                            widget_alive)
from napari_cytoclip.widgets.identify_panel import IdentifyPanel
from napari_cytoclip.widgets.layers import (apply_batch, create_labels_layer, drop_views, finish_layers,
                                            image_transform, labels_colormap, redraw_labels, regions_key,
                                            show_confidence)
from napari_cytoclip.widgets.legend_panel import LegendPanel
from napari_cytoclip.models.import_checkpoint import RecentModels
from napari_cytoclip.widgets.model_chooser import ModelChooser, is_checkpoint
from napari_cytoclip.widgets.predict_steps import prediction_steps
from napari_cytoclip.widgets.review_panel import ReviewPanel
from napari_cytoclip.widgets.teach_panel import TeachPanel
from napari_cytoclip.widgets.state import (CANCELLED, COMPLETE, FAILED, RUNNING, PredictionState, layer_alive,
                                           prediction_layers, state_of)

DEVICES = ["auto", "cpu", "cuda", "mps"]
BATCH_SIZE = 64
REDRAW_MS = 200  # while streaming, the Labels layer is redrawn at most this often (a redraw costs 30-70 ms here)
PIXEL_SIZE_MAX = 1e9  # µm; far above what check_pixel_size accepts, so an absurd layer scale is shown, then refused


class PredictWidget(QWidget):
    """Predict brain regions on an image layer, stream them into a grid Labels layer, review and identify.

    The model chooser also lists recent bundles (``recent_models``: a :class:`RecentModels`, default the
    user's config file) and imports an open_clip checkpoint as a bundle (:meth:`import_checkpoint`).

    State: loaded models are cached on the widget (``_models``, keyed by bundle folder and device), and so
    are the Labels colormaps of their regions (``_colormaps``);
    each run has its own :class:`PredictionState`, stored in its Labels layer's
    ``metadata["cytoclip"]``. The legend, review queue and identify box act on the prediction of
    the active cytoclip Labels layer (or the latest run).

    UI responsiveness: the model loads, and the section is planned, in a thread of the run's own (at a
    lower CPU priority, ``WORKER_NICE``); batches write into the layer's data in place and redraw
    it at most every ``REDRAW_MS``; the end of a run is split over event-loop turns.
    """

    def __init__(self, napari_viewer: Any, recent_models: RecentModels | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self._models: dict[tuple, Any] = {}
        self._colormaps: dict[tuple, Any] = {}  # napari colormaps by regions_key, their uint16 lookup built
        self._setting_model = False  # set_model_path at work: a choice of the code, not of the user
        self._model_value: Any = None  # the model field's last accepted value
        self._worker = None
        self._running: PredictionState | None = None
        self._state: PredictionState | None = None
        self._model_for_info: str | None = None

        self.image = ComboBox(label="Image", choices=image_layer_choices(napari_viewer),
                              tooltip="The Nissl section to classify")
        self.model_path = FileEdit(label="Model", mode="d", nullable=True, value=None,
                                   tooltip="A model bundle folder (or an open_clip checkpoint file to import); "
                                           "leave empty for the shipped model")
        self.model_info = Label(value="")
        self.device = ComboBox(label="Device", choices=DEVICES, value="auto")
        self.stride = FloatSpinBox(label="Stride (µm)", min=1.0, max=100000.0, step=10.0, value=100.0,
                                   tooltip="Grid step: one label per stride x stride square (default: the model's)")
        self.pixel_size = FloatSpinBox(label="Pixel size (µm)", min=0.0, max=PIXEL_SIZE_MAX, step=0.001, value=0.0,
                                       tooltip="Micrometres per image pixel (from the layer scale or metadata)")
        self.plane = Label(label="Plane", value="",
                           tooltip="A stack is predicted one plane at a time: the plane the viewer shows "
                                   "(move the viewer's slider to choose another)")
        self.cache = FileEdit(label="Cache", mode="d", nullable=True, value=None,
                              tooltip="Optional folder for the tile embeddings: a rerun on the same image, "
                                      "model and stride loads them instead of predicting again")
        self.form = Container(widgets=[self.image, self.plane, self.model_path, self.model_info, self.device,
                                       self.stride, self.pixel_size, self.cache], labels=True)
        self.model_path.line_edit.native.setPlaceholderText("shipped model")
        # recent bundles and "Import checkpoint…", right below the model's info line
        self.model_chooser = ModelChooser(self, recent_models)
        self.form.native.layout().insertWidget(self.form.index(self.model_info) + 1, self.model_chooser)
        self.cache.line_edit.native.setPlaceholderText("optional: keeps tile embeddings for reruns")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="")
        self.status = status_label("Choose an image and press Run.")

        self.legend_panel = LegendPanel(self)
        self.review_panel = ReviewPanel(self)
        self.identify_panel = IdentifyPanel(self)
        self.teach_panel = TeachPanel(napari_viewer, host=self)
        self.legend_panel.layout().addWidget(self.teach_panel.new_region_button)
        self.legend = self.legend_panel.legend  # the panels' parts, as attributes of the widget
        self.review_button, self.skip_button = self.review_panel.review_button, self.review_panel.skip_button
        self.review_status = self.review_panel.review_status
        self.identify_button = self.identify_panel.identify_button
        self.identify_text = self.identify_panel.identify_text

        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button.native)
        buttons.addWidget(self.cancel_button.native)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.form.native)
        layout.addLayout(buttons)
        layout.addWidget(self.progress.native)
        layout.addWidget(self.status)
        layout.addWidget(self.legend_panel)
        layout.addWidget(self.teach_panel)
        layout.addWidget(self.review_panel)
        layout.addWidget(self.identify_panel)
        layout.addStretch(1)

        # Main-thread work of a threaded run is kept in small steps: batches write into the layer's
        # data at once but redraw it at most every REDRAW_MS; the end of a run is split into steps
        # run one per event-loop turn (``_deferred``), and the worker counts as running until they are done.
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(REDRAW_MS)
        self._redraw_timer.timeout.connect(self._redraw)
        self._redraw_state: PredictionState | None = None
        self._deferred: list = []
        self._finish_pending: PredictionState | None = None
        self._step_timer = QTimer(self)
        self._step_timer.setSingleShot(True)
        self._step_timer.setInterval(0)
        self._step_timer.timeout.connect(self._run_deferred_step)

        self._choices = LayerChoices(napari_viewer, self.image)
        self.image.changed.connect(self._on_image_changed)
        self.model_path.changed.connect(self._on_model_path_changed)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        napari_viewer.layers.events.removed.connect(self._on_layer_removed)
        napari_viewer.layers.selection.events.active.connect(self._on_active_layer)
        napari_viewer.dims.events.current_step.connect(self._refresh_plane)
        self._refresh_model_info()
        self._on_image_changed()
        self._preload = self._start_preload()

    def _start_preload(self):
        """A warm start: the first time a widget opens in a process, import the model's libraries and load the
        chosen model in a thread worker while the user sets up the run. Their imports hold the GIL in pieces
        of up to a few hundred ms; during a prediction they would stall the viewer. None when nothing to do."""
        import sys

        from napari.qt.threading import create_worker

        from napari_cytoclip.models.model import LIBRARIES

        if all(name in sys.modules for name in LIBRARIES):
            return None
        try:
            bundle = self.bundle()
        except Exception:  # no usable model chosen yet: the libraries alone
            bundle = None
        device = str(self.device.value)
        worker = create_worker(_warm_start, bundle, device, _start_thread=False, _ignore_errors=True)
        if bundle is not None:
            worker.returned.connect(partial(self._on_warm, (str(bundle.path), device), regions_key(bundle.regions)))
        worker.finished.connect(partial(setattr, self, "_preload", None))
        worker.start()
        return worker

    def _on_warm(self, key: tuple, regions: tuple, warmed: Any) -> None:
        if isinstance(warmed, tuple):  # (model, colormap); None when no bundle was chosen
            model, colormap = warmed
            self._models.setdefault(key, model)
            self._colormaps.setdefault(regions, colormap)

    # ------------------------------------------------------------------ model and inputs
    def model_folder(self) -> Path | None:
        """The chosen bundle folder, or None for the shipped model."""
        return _folder_value(self.model_path.value)

    def cache_folder(self) -> Path | None:
        """The embedding cache folder, or None for no cache."""
        return _folder_value(self.cache.value)

    def set_model_path(self, path: str | Path | None) -> None:
        """Use the bundle in ``path`` (None: the shipped model) for the next run."""
        self._setting_model = True
        try:
            self.model_path.value = None if path is None else str(path)
        finally:
            self._setting_model = False
        self._model_value = self.model_path.value
        self._refresh_model_info()

    def import_checkpoint(self, checkpoint: str | Path, regions_csv: str | Path | None, tile_um: float, **kwargs):
        """Import an open_clip checkpoint as a new bundle next to it (thread worker), then select it and
        list it in the recent models; the values the import dialog asks for. Returns the worker."""
        return self.model_chooser.import_checkpoint(checkpoint, regions_csv, tile_um, **kwargs)

    def _on_model_path_changed(self, value: Any = None) -> None:
        """A checkpoint file typed or chosen: ask what it is and import it; a bundle the user chose: remember it."""
        if not self._setting_model and is_checkpoint(_folder_value(self.model_path.value)):
            checkpoint = _folder_value(self.model_path.value)
            self.set_model_path(_folder_value(self._model_value))  # until the import is done
            QTimer.singleShot(0, lambda: self.model_chooser.ask_checkpoint(checkpoint=checkpoint))
            return
        self._model_value = self.model_path.value
        self._refresh_model_info()
        folder = self.model_folder()
        if not self._setting_model and folder is not None and folder.is_dir():
            self.model_chooser.remember(folder)

    def bundle(self):
        """The chosen model's description (reads cytoclip.json only; raises BundleError)."""
        from napari_cytoclip.models.bundle import BUNDLE_WEIGHTS, load_bundle
        from napari_cytoclip.errors import BundleError

        folder = self.model_folder()
        if folder is None:
            folder = shipped_bundle_path()
            if not (folder / BUNDLE_WEIGHTS).is_file():
                raise BundleError(folder, "the shipped model is not installed; choose a model bundle folder")
        return load_bundle(folder)

    def _refresh_model_info(self, *_: Any) -> None:
        key = str(self.model_folder())
        try:
            bundle = self.bundle()
        except Exception as exc:  # shown in the widget, not raised: the user may fix it
            self.model_info.value = f"⚠ {message_of(exc)}"
            self.model_info.tooltip = message_of(exc)
            return
        scales = "/".join(f"{s:g}" for s in bundle.input.scales_um)
        self.model_info.value = f"{bundle.name}: {len(bundle.regions)} regions, {scales} µm context"
        self.model_info.tooltip = bundle.description or str(bundle.path)
        if key != self._model_for_info:
            self.stride.value = float(bundle.stride_um)
            self._model_for_info = key

    def _on_image_changed(self, *_: Any) -> None:
        layer = self.image.value
        if layer is not None:
            px = pixel_size_of(layer) or 0.0
            if px > PIXEL_SIZE_MAX:  # never clamp silently: leave it unknown and say why
                self._warn(f"'{layer.name}' has a pixel size of {px:g} µm, beyond any histology section; "
                           "set the pixel size in micrometres per pixel")
                px = 0.0
            self.pixel_size.value = px
        self._refresh_plane()

    def _refresh_plane(self, *_: Any) -> None:
        """Show which plane of a stack layer a run will predict (the viewer's current slice)."""
        if not self._alive():
            return
        layer = self.image.value
        sizes = stack_shape(layer) if layer is not None else ()
        self.plane.visible = bool(sizes)
        if sizes:
            plane = current_plane(layer, self.viewer)
            total = "×".join(str(n) for n in sizes)
            self.plane.value = f"{plane_text(plane)} of {total} (the viewer's current slice)"

    # ------------------------------------------------------------------ running
    def _prepare(self) -> tuple[PredictionState, Generator] | None:
        """Check the inputs, create the state and the (empty) Labels layer; None after an error."""
        from napari_cytoclip.inference.grid import TileGrid
        from napari_cytoclip.io.sections import check_pixel_size

        try:
            layer = self.image.value
            if layer is None:
                raise ValueError("choose an image layer to classify")
            px = float(self.pixel_size.value)
            if not px > 0:
                raise ValueError(f"set the pixel size of '{layer.name}' in micrometres per pixel")
            notes: list[str] = []
            check_pixel_size(px, layer.name, notes)
            for note in notes:
                self._warn(note)
            bundle = self.bundle()
            stride = float(self.stride.value) or float(bundle.stride_um)
            plane = current_plane(layer, self.viewer)
            section = section_for_layer(layer, px, plane)
            grid = TileGrid.covering(section.shape, px, stride)
        except Exception as exc:
            self._error(f"Cannot predict: {message_of(exc)}")
            return None
        scale, translate = image_transform(layer)
        device = str(self.device.value)
        key = (str(bundle.path), device)
        image_name = f"{layer.name} [{plane_text(plane)}]" if plane else layer.name
        state = PredictionState(image_name=image_name, section=section, grid=grid, bundle=bundle, model_key=key,
                                stride_um=stride, image_scale=scale, image_translate=translate)
        state.model = self._models.get(key)
        state.cache = self.cache_folder()
        name = f"cytoclip regions ({image_name})"
        regions = regions_key(state.regions)
        layer = create_labels_layer(self.viewer, state, name, reuse=self._reusable_layer(name),
                                    colormap=self._colormaps.get(regions))
        self._colormaps.setdefault(regions, layer.colormap)  # its lookup is built now: reused by later layers
        self._set_current(state)
        return state, prediction_steps(state, device, BATCH_SIZE, self.cache_folder())

    def _reusable_layer(self, name: str):
        """An earlier result layer of the same name that holds no corrections (a rerun starts clean in it)."""
        for layer in prediction_layers(self.viewer):
            old = state_of(layer)
            if layer.name == name and old is not None and old.status != RUNNING:
                if old.status != COMPLETE or not old.edited_mask(layer.data).any():
                    return layer
        return None

    def run(self, *_: Any) -> PredictionState | None:
        """Start a prediction in a thread worker; returns its state (None if the inputs are wrong)."""
        from napari.qt.threading import create_worker

        if self._worker is not None:
            self._warn("A prediction is already running; cancel it first.")
            return None
        prepared = self._prepare()
        if prepared is None:
            return None
        state, steps = prepared
        worker = create_worker(drive, steps, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(partial(self._on_yielded, state))
        worker.returned.connect(partial(self._on_returned, state))
        worker.aborted.connect(partial(self._on_aborted, state))
        worker.finished.connect(partial(self._on_finished, state, steps))
        self._worker, self._running = worker, state
        self._set_running(True)
        worker.start()
        return state

    def run_blocking(self) -> PredictionState | None:
        """The same prediction, run to the end in the calling (main) thread: for scripts and tests."""
        prepared = self._prepare()
        if prepared is None:
            return None
        state, steps = prepared
        self._running = state
        self._set_running(True)
        try:
            while True:
                self._on_yielded(state, next(steps))
        except StopIteration as stop:
            self._on_returned(state, stop.value, deferred=False)
        except Exception as exc:
            self._on_errored(state, exc)
        finally:
            self._on_finished(state, steps)
        return state

    @property
    def worker(self):
        """The running thread worker, if any."""
        return self._worker

    def cancel(self, *_: Any) -> None:
        """Stop the running prediction at the next batch; the layer keeps what was done."""
        if self._worker is not None:
            self.status.setText("Cancelling…")
            self._worker.quit()

    def _set_running(self, running: bool) -> None:
        self.run_button.enabled = not running
        self.cancel_button.enabled = running
        if running:
            self.progress.max, self.progress.value = 1, 0
            self.status.setText("Loading the model…")

    # ------------------------------------------------------------------ worker handlers (main thread)
    def _alive(self) -> bool:
        return widget_alive(self)

    def _on_yielded(self, state: PredictionState, item: Any) -> None:
        if not self._alive():  # the viewer closed under a running worker: stop it quietly
            if self._worker is not None:
                self._worker.quit()
            state.status = CANCELLED
            return
        if isinstance(item, tuple) and item and item[0] == "model":
            self._models[state.model_key] = item[1]
            state.model = item[1]
            self.status.setText("Classifying tiles…")
            return
        if isinstance(item, tuple) and item and item[0] in ("cached", "saved"):
            state.message = f"embeddings {'loaded from' if item[0] == 'cached' else 'saved to'} {item[1]}"
            return
        if state.status != RUNNING:
            return
        if not layer_alive(self.viewer, state.labels_layer):
            state.set_status(CANCELLED, "the Labels layer was closed")
            drop_views(self.viewer, state)
            if self._worker is not None and self._running is state:
                self._worker.quit()
            return
        threaded = self._worker is not None and self._running is state
        apply_batch(state, item.cells, item.labels, item.confidence, refresh=not threaded)
        if threaded:
            self._redraw_state = state
            if not self._redraw_timer.isActive():
                self._redraw_timer.start()
        state.done, state.total = int(item.done), int(item.total)
        if self._running is state:
            self.progress.max = max(state.total, 1)
            self.progress.value = state.done
            self.status.setText(f"{state.done} / {state.total} tissue tiles classified")
        state.changed.emit("batch")

    def _redraw(self) -> None:
        state, self._redraw_state = self._redraw_state, None
        if state is not None and state.status == RUNNING and self._alive():
            redraw_labels(self.viewer, state)

    def _on_returned(self, state: PredictionState, prediction: Any, deferred: bool = True) -> None:
        """The end of a run: final labels at once; with ``deferred``, the confidence layer and the legend
        follow in later event-loop turns (adding a layer costs napari 100-200 ms here)."""
        if not self._alive():
            return
        if isinstance(prediction, WorkerFailure):
            self._on_errored(state, prediction.exc)
            return
        if state.status != RUNNING or prediction is None:
            return
        if state.model is None:
            state.model = self._models.get(state.model_key)
        self._redraw_timer.stop()
        self._redraw_state = None
        prediction.complete = True
        state.prediction = prediction
        state.done = state.total = len(prediction.cells)
        alive = layer_alive(self.viewer, state.labels_layer)
        state.status = COMPLETE if alive else CANCELLED
        if not alive:
            drop_views(self.viewer, state)
        self._finish_labels(state)  # at once (cheap): the layer and the state agree as soon as it is complete
        steps = [partial(self._finish_confidence, state), partial(self._finish_views, state)]
        if not deferred:
            for step in steps:
                step()
            return
        self._deferred.extend(steps)
        self._step_timer.start()

    def _finish_labels(self, state: PredictionState) -> None:
        if state.status == COMPLETE and layer_alive(self.viewer, state.labels_layer):
            finish_layers(self.viewer, state, confidence=False)
        state.publish()

    def _finish_confidence(self, state: PredictionState) -> None:
        if state.status == COMPLETE:
            show_confidence(self.viewer, state)

    def _finish_views(self, state: PredictionState) -> None:
        if state.status != COMPLETE:
            return
        state.changed.emit("complete")
        if self._state is state:
            self._refresh_legend()
        if self._running is state:
            self.progress.max = self.progress.value = max(state.total, 1)
            rate = state.prediction.timings.get("tiles_per_s", 0.0)
            how = "embeddings from the cache" if state.message.startswith("embeddings loaded") \
                else f"{rate:.0f} tiles/s"
            self.status.setText(f"Done: {state.total} tiles on a {state.grid.shape[0]}×{state.grid.shape[1]} grid "
                                f"of {state.stride_um:g} µm ({how}). Hover to see region names; "
                                "paint to correct.")

    def _run_deferred_step(self) -> None:
        """Run one deferred end-of-run step; after the last, finish the run if the worker has ended."""
        if not self._alive():
            return
        if self._deferred:
            step = self._deferred.pop(0)
            try:
                step()
            finally:
                if self._deferred:
                    self._step_timer.start()
                elif self._finish_pending is not None:
                    state, self._finish_pending = self._finish_pending, None
                    self._end_run(state)
        elif self._finish_pending is not None:
            state, self._finish_pending = self._finish_pending, None
            self._end_run(state)

    def _on_errored(self, state: PredictionState, exc: BaseException) -> None:
        state.set_status(FAILED, message_of(exc))
        drop_views(self.viewer, state)
        layer = state.labels_layer
        if state.done == 0 and layer_alive(self.viewer, layer):
            self.viewer.layers.remove(layer)  # nothing in it: do not leave an empty result behind
        elif layer is not None:
            if layer_alive(self.viewer, layer):
                redraw_labels(self.viewer, state, full=True)  # batches since the last throttled redraw
            layer.editable = True
        self._error(f"Prediction failed: {message_of(exc)}")

    def _on_aborted(self, state: PredictionState) -> None:
        if self._alive():
            self._mark_cancelled(state)
        else:
            state.status = CANCELLED

    def _mark_cancelled(self, state: PredictionState) -> None:
        if state.status == RUNNING:
            state.set_status(CANCELLED, f"cancelled after {state.done} of {state.total} tiles")
        drop_views(self.viewer, state)
        layer = state.labels_layer
        if layer is not None:
            if layer_alive(self.viewer, layer):
                redraw_labels(self.viewer, state, full=True)  # batches since the last throttled redraw
            layer.editable = True
        if self._running is state:
            self.status.setText(f"Cancelled after {state.done} of {state.total} tiles: the layer shows the "
                                "tiles done so far (marked incomplete; run again to finish).")

    def _on_finished(self, state: PredictionState, steps: Generator) -> None:
        try:
            steps.close()  # stops the reader thread of a quit generator now, not at garbage collection
        except ValueError:  # still executing in the worker (cannot happen after finished)
            pass
        if not self._alive():  # the widget was deleted while the worker ran
            state.status = CANCELLED if state.status == RUNNING else state.status
            self._worker, self._running = None, None
            return
        if self._deferred:  # end-of-run steps still queued: the run ends after the last one
            self._finish_pending = state
            return
        self._end_run(state)

    def _end_run(self, state: PredictionState) -> None:
        self._redraw_timer.stop()
        self._redraw_state = None
        if state.status == RUNNING:  # quit between the last batch and the return
            self._mark_cancelled(state)
        if self._running is state:
            self._worker, self._running = None, None
            self._set_running(False)

    def _on_layer_removed(self, event: Any) -> None:
        layer = getattr(event, "value", None)
        running = self._running
        if running is not None and layer is running.labels_layer and self._worker is not None:
            self._worker.quit()
        if self._state is not None and layer is self._state.labels_layer:
            self._set_current(None)

    def _on_active_layer(self, event: Any) -> None:
        state = state_of(getattr(event, "value", None))
        if state is not None and state is not self._state:
            self._set_current(state)

    # ------------------------------------------------------------------ current prediction
    @property
    def current(self) -> PredictionState | None:
        """The prediction the legend, review queue and identify box act on."""
        return self._state

    def _set_current(self, state: PredictionState | None) -> None:
        if self._state is not None:
            self._state.changed.disconnect(self._on_state_changed)
        self._state = state
        if state is not None:
            state.changed.connect(self._on_state_changed)
        self.legend_panel.follow(state)
        self.teach_panel.follow(state)
        self.review_panel.refresh()

    def _on_state_changed(self, what: str) -> None:
        if what in ("regions", "complete", "taught", "reviewed"):
            self._refresh_legend()
        if what in ("reviewed", "complete", "regions"):
            self.review_panel.refresh()

    def _refresh_legend(self) -> None:
        self.legend_panel.refresh()

    def model_for(self, state: PredictionState) -> Any:
        """The loaded model of ``state`` (None if it was never loaded)."""
        return state.model or self._models.get(state.model_key)

    def complete_state(self) -> PredictionState | None:
        """The current prediction when it ran to the end and its layer is open; else warns and returns None."""
        state = self._state
        if state is None or not state.complete:
            self._warn("Run a prediction to the end first (a cancelled run has no tile embeddings).")
            return None
        if not layer_alive(self.viewer, state.labels_layer):
            self._warn("The region layer of this prediction was closed.")
            return None
        return state

    # ------------------------------------------------------------------ the panels' actions
    def paint_with(self, region_id: int) -> None:
        """Select ``region_id`` as the paint label of the current Labels layer and switch to painting."""
        self.legend_panel.paint_with(region_id)

    def next_uncertain(self, *_: Any) -> tuple[int, int] | None:
        """Confirm the tile shown and show the least confident unseen one (see :class:`ReviewPanel`)."""
        return self.review_panel.next_uncertain()

    def skip_uncertain(self, *_: Any) -> tuple[int, int] | None:
        """Show the next least confident tile, leaving the one shown unconfirmed."""
        return self.review_panel.skip_uncertain()

    def identify_selection(self, *_: Any) -> list[tuple[Any, float, float]] | None:
        """Top regions for the selected shape's tiles, or else for all tiles of the selected label."""
        return self.identify_panel.identify_selection()

    # ------------------------------------------------------------------ messages
    def _error(self, text: str) -> None:
        report_problem(self.status, text)

    def _warn(self, text: str) -> None:
        report_problem(self.status, text, error=False)

    warn = _warn


def _folder_value(value: Any) -> Path | None:
    """A FileEdit's folder, or None when it is empty."""
    text = "" if value is None else str(value).strip()
    return None if text in ("", ".") else Path(text)


def _warm_start(bundle: Any, device: str) -> tuple[Any, Any] | None:
    """The libraries, then ``bundle``'s model on ``device`` and its regions' Labels colormap (None without a
    bundle); runs in a thread worker."""
    from napari_cytoclip.models.model import load_model, preload_libraries

    preload_libraries()
    if bundle is None:
        return None
    return load_model(bundle, device=device, precision="auto"), labels_colormap(bundle.regions)
