"""Per-prediction session state, kept in the Labels layer's ``metadata["cytoclip"]``.

Every run of the Predict widget makes its own :class:`PredictionState`; nothing is global. The
Labels layer carries the state (``metadata["cytoclip"]["state"]``) next to plain summary values
(``complete``, ``status``, ``image``, ``model``...), so the Query and Export widgets find
everything from the layer alone, and two predictions on two images never share anything.

A results folder reopened by the reader (:func:`napari_cytoclip.io.reader.read_prediction_folder`)
gives a Labels layer whose ``metadata["cytoclip"]`` holds plain values only (the folder and its
embedding cache); :func:`state_of` restores its :class:`PredictionState` from them the first time
a widget asks, so correcting, querying and teaching continue where they stopped.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

META_KEY = "cytoclip"

RUNNING, COMPLETE, CANCELLED, FAILED = "running", "complete", "cancelled", "failed"


class PredictionState:
    """One prediction of one image, and what the user did with it since.

    ``predicted`` is the baseline the user's paint is compared with: a copy of the model's labels
    (tile-level while streaming, the voted labels once complete). ``reviewed`` marks the cells the
    user confirmed (exported as *confirmed*): a tile the review queue shows (``under_review``) is
    confirmed only when the user moves on from it with *Next*, and any relabelling of a cell clears
    its confirmation (:meth:`clear_confirmation`). ``visited`` marks the cells the queue has shown.
    ``layers`` maps roles (``labels``, ``confidence``, ``query``, ``highlight``, ``review``) to the
    napari layers of this prediction.
    """

    changed = Signal(str)  # "batch", "complete", "status", "regions", "reviewed", "taught"

    def __init__(self, *, image_name: str, section: Any, grid: Any, bundle: Any, model_key: tuple,
                 stride_um: float, image_scale: tuple, image_translate: tuple):
        self.image_name = image_name
        self.section = section
        self.grid = grid
        self.bundle = bundle            # the ModelBundle the run used (weights on disk)
        self._model = None              # the loaded CytoClip, once loaded
        self.load_model_on_use = False  # a restored prediction loads its model when first used
        self.model_key = model_key
        self.stride_um = float(stride_um)
        self.image_scale = tuple(image_scale)
        self.image_translate = tuple(image_translate)
        self.regions = list(bundle.regions)
        shape = tuple(grid.shape)
        self.predicted = np.zeros(shape, np.uint16)
        self.tile_confidence = np.full(shape, np.nan, np.float32)
        self.reviewed = np.zeros(shape, bool)   # confirmed by the user
        self.visited = np.zeros(shape, bool)    # shown by the review queue
        self.under_review: tuple[int, int] | None = None
        self.cache: Path | None = None          # the embedding cache folder, if any
        self.prediction_folder: Path | None = None  # the results folder it was reopened from, if any
        self.prediction = None          # napari_cytoclip.inference.predict.Prediction when complete
        self.status = RUNNING
        self.message = ""
        self.done = 0
        self.total = 0
        self.layers: dict[str, Any] = {}
        self.finetuned_bundle: Path | None = None
        # teaching (widgets/teach_panel.py): the learner of the last *Update map*, and what it replaced
        self.learner = None             # napari_cytoclip.teach.teaching.TaughtLearner, or None
        self.teach_cache: dict = {}     # projected features and text prior kept between updates (decode_with_learner)
        self.undo_update: dict | None = None
        self.taught_bundle: Path | None = None  # the last taught model saved from this prediction
        self._bundle_counts: dict[int, int] | None = None

    @property
    def model(self):
        """The loaded CytoClip (a restored prediction loads it here on first use)."""
        if self._model is None and self.load_model_on_use:
            from napari_cytoclip.models.model import load_model

            self.load_model_on_use = False
            self._model = load_model(self.bundle, device=str(self.model_key[1]), precision="auto")
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    # ------------------------------------------------------------------ review and confirmation
    def show_for_review(self, cell: tuple[int, int]) -> None:
        """The review queue shows ``cell``: visited, not yet confirmed."""
        self.visited[cell] = True
        self.under_review = (int(cell[0]), int(cell[1]))

    def confirm_shown(self) -> tuple[int, int] | None:
        """The user moves on from the tile under review: it counts as confirmed. Returns that cell."""
        cell, self.under_review = self.under_review, None
        if cell is not None:
            self.reviewed[cell] = True
        return cell

    def clear_confirmation(self, changed: np.ndarray) -> int:
        """Cells whose label a relabelling changed lose their confirmation and return to the queue.

        Returns how many confirmed cells were cleared.
        """
        changed = np.asarray(changed, bool)
        cleared = int((self.reviewed & changed).sum())
        self.reviewed &= ~changed
        self.visited &= ~changed
        if self.under_review is not None and changed[self.under_review]:
            self.under_review = None
        return cleared

    # ------------------------------------------------------------------ derived values
    @property
    def complete(self) -> bool:
        return self.status == COMPLETE and self.prediction is not None

    @property
    def labels_layer(self):
        return self.layers.get("labels")

    @property
    def transform(self) -> dict:
        """``scale`` and ``translate`` that put a grid-shaped layer on the image."""
        return self.grid.layer_transform(self.image_scale, self.image_translate)

    def edited_mask(self, current: np.ndarray) -> np.ndarray:
        """Cells the user painted: the layer's data differs from the stored prediction."""
        return np.asarray(current) != self.predicted

    def region(self, region_id: int):
        return next((r for r in self.regions if r.id == int(region_id)), None)

    # ------------------------------------------------------------------ vocabulary and teaching
    def add_region(self, name: str, color: str | None = None, description: str = ""):
        """Add a region (id = largest id + 1) to this prediction's vocabulary and return it.

        The one way regions are added (the legend's *New region...* and Text query's *Add region*):
        it gets a label to paint with and the learner treats it like any region (its description,
        when given, is its text prior). Emits ``changed("regions")``; relabelling is the caller's.
        Raises ValueError for an empty or repeated name or a bad colour.
        """
        from napari_cytoclip.errors import BundleError
        from napari_cytoclip.models.bundle import Region, parse_color, validate_regions
        from napari_cytoclip.models.vocabularies import acronym_of, auto_color

        name = str(name or "").strip()
        if not name:
            raise ValueError("give the new region a name")
        if any(r.name.strip().lower() == name.lower() for r in self.regions):
            raise ValueError(f"a region named '{name}' is already in the vocabulary")
        try:
            color = parse_color(color, name) if color else auto_color([r.color for r in self.regions],
                                                                     len(self.regions))
            new = Region(max([r.id for r in self.regions] + [0]) + 1, name, acronym_of(name), color,
                         str(description or "").strip())
            validate_regions([*self.regions, new], name)
        except BundleError as exc:
            raise ValueError(exc.problem) from None
        self.regions = [*self.regions, new]
        self.publish()
        self.changed.emit("regions")
        return new

    def taught_mask(self, current: np.ndarray) -> np.ndarray:
        """Cells the learner is taught from: painted (non-zero) or confirmed, on the current layer data."""
        current = np.asarray(current)
        return (self.edited_mask(current) | self.reviewed) & (current > 0)

    def taught_counts(self, current: np.ndarray) -> dict[int, int]:
        """Taught cells per region id: this section's painted and confirmed cells plus those of the
        taught model's teaching set (other sections; a set holding this section counts it once)."""
        current = np.asarray(current)
        ids, n = np.unique(current[self.taught_mask(current)], return_counts=True)
        counts = {int(i): int(k) for i, k in zip(ids, n)}
        for rid, k in self.bundle_taught_counts().items():
            counts[rid] = counts.get(rid, 0) + k
        return counts

    def bundle_taught_counts(self) -> dict[int, int]:
        """Taught cells per region in the model's own teaching set, other sections than this one."""
        if self._bundle_counts is None:
            self._bundle_counts = {}
            if getattr(self.bundle, "taught", False):
                from napari_cytoclip.teach.teaching import load_teaching_set

                try:
                    ts = load_teaching_set(self.bundle.path)
                    mine = {i for i, s in enumerate(ts.sources) if s.get("hash") == self.section.content_hash()}
                    keep = ts.taught() & ~np.isin(ts.source, list(mine))
                    ids, n = np.unique(ts.region[keep], return_counts=True)
                    self._bundle_counts = {int(i): int(k) for i, k in zip(ids, n)}
                except Exception:  # noqa: BLE001 - counts are a display; load errors surface when teaching
                    self._bundle_counts = {}
        return self._bundle_counts

    def summary(self) -> dict:
        """Plain values for ``layer.metadata["cytoclip"]`` (besides the state object)."""
        return {
            "complete": self.complete, "status": self.status, "image": self.image_name,
            "model": getattr(self.bundle, "name", ""),
            "model_path": str(self.bundle.path) if getattr(self.bundle, "path", None) else None,
            "stride_um": self.stride_um, "pixel_size_um": float(self.grid.pixel_size_um),
            "grid": self.grid.to_dict(), "tiles_done": int(self.done), "tiles_total": int(self.total),
            "reviewed_cells": int(self.reviewed.sum()), "confirmed_cells": int(self.reviewed.sum()),
            "cache": str(self.cache) if self.cache else None,
            "prediction_folder": str(self.prediction_folder) if self.prediction_folder else None,
            "regions": [r.to_dict() for r in self.regions],
            "finetuned_bundle": str(self.finetuned_bundle) if self.finetuned_bundle else None,
            "taught_bundle": str(self.taught_bundle) if self.taught_bundle else None,
        }

    def publish(self) -> None:
        """Write the summary into the Labels layer's metadata (in place)."""
        layer = self.labels_layer
        if layer is not None:
            layer.metadata[META_KEY] = {"state": self, **self.summary()}

    def set_status(self, status: str, message: str = "") -> None:
        self.status, self.message = status, message
        self.publish()
        self.changed.emit("status")


def state_of(layer: Any) -> PredictionState | None:
    """The prediction state a layer carries, if it is a cytoclip Labels layer.

    A Labels layer reopened from a results folder is restored here on first use (once: a failure is
    warned about and kept in ``metadata["cytoclip"]["restore_error"]``).
    """
    meta = getattr(layer, "metadata", None)
    if not isinstance(meta, dict):
        return None
    entry = meta.get(META_KEY)
    state = entry.get("state") if isinstance(entry, dict) else None
    if state is None and isinstance(entry, dict) and entry.get("prediction_folder") and entry.get("role") == "labels" \
            and not entry.get("restore_error"):
        from napari_cytoclip.errors import CytoclipError

        try:
            state = restore_state(layer)
        except CytoclipError as exc:
            entry["restore_error"] = str(exc)
            warnings.warn(f"the prediction in '{getattr(layer, 'name', '')}' opens for viewing only: {exc}",
                          stacklevel=2)
            return None
    return state if isinstance(state, PredictionState) else None


def restore_state(layer: Any) -> PredictionState:
    """The :class:`PredictionState` of a Labels layer reopened from a results folder (see the reader).

    Reads the embedding cache, opens the section and finds the model that made the prediction (its
    weights are loaded when first used); refuses a cache made for another image, model or grid.
    Raises a CytoclipError naming the file and the problem.
    """
    from napari_cytoclip.inference.cache import expected_signature, jsonable, load_prediction
    from napari_cytoclip.inference.predict import check_signature
    from napari_cytoclip.io.reader import read_summary, prediction_bundle, resolve_source
    from napari_cytoclip.io.sections import open_section

    entry = layer.metadata[META_KEY]
    folder = Path(entry["prediction_folder"])
    summary = read_summary(folder)
    source = resolve_source(folder, str(summary.get("source") or ""))
    bundle = prediction_bundle(summary, folder)
    cache = Path(entry["cache"])
    prediction = load_prediction(cache)
    grid = prediction.grid
    section = open_section(source, pixel_size_um=grid.pixel_size_um, notes=[])  # the prediction's pixel size
    check_signature(prediction, jsonable(expected_signature(section, bundle, grid)), str(cache))
    scale = np.asarray(layer.scale[-2:], np.float64) / grid.step
    translate = np.asarray(layer.translate[-2:], np.float64) - np.asarray(grid.origin) * scale
    state = PredictionState(image_name=str(entry.get("image") or section.name), section=section, grid=grid,
                            bundle=bundle, model_key=(str(bundle.path), "auto"), stride_um=grid.stride_um,
                            image_scale=tuple(scale), image_translate=tuple(translate))
    state.regions = list(prediction.regions)
    state.predicted = np.asarray(prediction.labels, np.uint16).copy()
    state.tile_confidence = np.asarray(prediction.confidence, np.float32)
    prediction.complete = True
    state.prediction = prediction
    state.done = state.total = len(prediction.cells)
    state.status = COMPLETE
    state.cache, state.prediction_folder = cache, folder
    state.load_model_on_use = True
    state.layers = {"labels": layer}
    state.publish()
    return state


def prediction_layers(viewer: Any) -> list:
    """Labels layers in ``viewer`` that carry a cytoclip prediction (reopened ones restored and linked)."""
    from napari.layers import Labels

    found = [layer for layer in viewer.layers if isinstance(layer, Labels) and state_of(layer) is not None]
    for layer in found:
        state = state_of(layer)
        if state.prediction_folder is not None and "confidence" not in state.layers:
            for other in viewer.layers:  # the confidence layer the reader opened beside it
                entry = other.metadata.get(META_KEY) if isinstance(other.metadata, dict) else None
                if isinstance(entry, dict) and entry.get("role") == "confidence" and \
                        Path(str(entry.get("prediction_folder", ""))).resolve() == state.prediction_folder.resolve():
                    state.layers["confidence"] = other
    return found


def layer_alive(viewer: Any, layer: Any) -> bool:
    return layer is not None and any(existing is layer for existing in viewer.layers)
