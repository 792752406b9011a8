"""Per-prediction session state, kept in the Labels layer's ``metadata["cytoclip"]``.

Every run of the Predict widget makes its own :class:`PredictionState`; nothing is global. The
Labels layer carries the state (``metadata["cytoclip"]["state"]``) next to plain summary values
(``complete``, ``status``, ``image``, ``model``...), so the Query and Export widgets find
everything from the layer alone, and two predictions on two images never share anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from psygnal import Signal

META_KEY = "cytoclip"

RUNNING, COMPLETE, CANCELLED, FAILED = "running", "complete", "cancelled", "failed"


class PredictionState:
    """One prediction of one image, and what the user did with it since.

    ``predicted`` is the baseline the user's paint is compared with: a copy of the model's labels
    (tile-level while streaming, the voted labels once complete). ``reviewed`` marks the cells
    the review queue showed (exported as *confirmed*). ``layers`` maps roles (``labels``,
    ``confidence``, ``query``, ``highlight``, ``review``) to the napari layers of this prediction.
    """

    changed = Signal(str)  # "batch", "complete", "status", "regions", "reviewed"

    def __init__(self, *, image_name: str, section: Any, grid: Any, bundle: Any, model_key: tuple,
                 stride_um: float, image_scale: tuple, image_translate: tuple):
        self.image_name = image_name
        self.section = section
        self.grid = grid
        self.bundle = bundle            # the ModelBundle the run used (weights on disk)
        self.model = None               # the loaded CytoClip, once loaded
        self.model_key = model_key
        self.stride_um = float(stride_um)
        self.image_scale = tuple(image_scale)
        self.image_translate = tuple(image_translate)
        self.regions = list(bundle.regions)
        shape = tuple(grid.shape)
        self.predicted = np.zeros(shape, np.uint16)
        self.tile_confidence = np.full(shape, np.nan, np.float32)
        self.reviewed = np.zeros(shape, bool)
        self.prediction = None          # napari_cytoclip.predict.Prediction when complete
        self.status = RUNNING
        self.message = ""
        self.done = 0
        self.total = 0
        self.layers: dict[str, Any] = {}
        self.finetuned_bundle: Path | None = None

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

    def summary(self) -> dict:
        """Plain values for ``layer.metadata["cytoclip"]`` (besides the state object)."""
        return {
            "complete": self.complete, "status": self.status, "image": self.image_name,
            "model": getattr(self.bundle, "name", ""),
            "model_path": str(self.bundle.path) if getattr(self.bundle, "path", None) else None,
            "stride_um": self.stride_um, "pixel_size_um": float(self.grid.pixel_size_um),
            "grid": self.grid.to_dict(), "tiles_done": int(self.done), "tiles_total": int(self.total),
            "reviewed_cells": int(self.reviewed.sum()),
            "regions": [r.to_dict() for r in self.regions],
            "finetuned_bundle": str(self.finetuned_bundle) if self.finetuned_bundle else None,
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
    """The prediction state a layer carries, if it is a cytoclip Labels layer."""
    meta = getattr(layer, "metadata", None)
    if not isinstance(meta, dict):
        return None
    entry = meta.get(META_KEY)
    state = entry.get("state") if isinstance(entry, dict) else None
    return state if isinstance(state, PredictionState) else None


def prediction_layers(viewer: Any) -> list:
    """Labels layers in ``viewer`` that carry a cytoclip prediction."""
    from napari.layers import Labels

    return [layer for layer in viewer.layers if isinstance(layer, Labels) and state_of(layer) is not None]


def layer_alive(viewer: Any, layer: Any) -> bool:
    return layer is not None and any(existing is layer for existing in viewer.layers)
