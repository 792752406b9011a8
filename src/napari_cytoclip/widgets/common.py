"""Small helpers shared by the widgets: layer choosers, pixel sizes, sections, messages."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from qtpy.QtWidgets import QGroupBox, QLabel, QSizePolicy, QVBoxLayout, QWidget

from napari_cytoclip.widgets.state import prediction_layers


class LayerChoices:
    """Keeps magicgui ComboBoxes of layers in sync with ``viewer.layers`` (adds, removals, renames)."""

    def __init__(self, viewer: Any, *combos: Any):
        self.viewer = viewer
        self.combos = list(combos)
        events = viewer.layers.events
        events.inserted.connect(self._on_inserted)
        events.removed.connect(self.refresh)
        events.reordered.connect(self.refresh)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)

    def _on_inserted(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def refresh(self, *_: Any) -> None:
        for combo in self.combos:
            try:
                combo.reset_choices()
            except RuntimeError:  # the Qt widget is gone (viewer closing)
                pass


def image_layer_choices(viewer: Any) -> Callable:
    def choices(_widget: Any = None) -> list:
        from napari.layers import Image

        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Image)
                and not layer.metadata.get("cytoclip")]
    return choices


def prediction_layer_choices(viewer: Any) -> Callable:
    def choices(_widget: Any = None) -> list:
        return [(layer.name, layer) for layer in prediction_layers(viewer)]
    return choices


def pixel_size_of(layer: Any) -> float | None:
    """Micrometres per pixel: the layer's scale when it is not 1, else ``metadata["pixel_size_um"]``."""
    scale = np.asarray(layer.scale[-2:], np.float64)
    if not np.allclose(scale, 1.0) and np.all(scale > 0):
        return float(scale.mean())
    value = layer.metadata.get("pixel_size_um") if isinstance(layer.metadata, dict) else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def layer_source(layer: Any) -> str | None:
    path = getattr(getattr(layer, "source", None), "path", None)
    return str(path) if path else (layer.metadata.get("source") if isinstance(layer.metadata, dict) else None)


def stack_shape(layer: Any) -> tuple[int, ...]:
    """Sizes of the layer's axes before its last two (y, x); ``()`` for a plain 2D image."""
    lead = int(layer.ndim) - 2
    if lead <= 0:
        return ()
    first = layer.data[0] if layer.multiscale else layer.data
    return tuple(int(n) for n in first.shape[:lead])


def current_plane(layer: Any, viewer: Any) -> tuple[int, ...]:
    """Index of the plane of a stack layer that the viewer shows now (its dims slider position).

    ``()`` for a 2D layer; indices are clipped to the stack, so a slider beyond it picks the nearest plane.
    """
    sizes = stack_shape(layer)
    if not sizes:
        return ()
    coords = np.asarray(layer.world_to_data(viewer.dims.point), np.float64)[:len(sizes)]
    return tuple(int(np.clip(np.round(c) if np.isfinite(c) else 0, 0, n - 1)) for c, n in zip(coords, sizes))


def plane_text(plane: tuple[int, ...]) -> str:
    """``"plane 3"`` or ``"plane (1, 3)"``; ``""`` for no plane."""
    if not plane:
        return ""
    return f"plane {plane[0]}" if len(plane) == 1 else f"plane {tuple(plane)}"


def section_for_layer(layer: Any, pixel_size_um: float, plane: tuple[int, ...] = ()):
    """A core Section over the layer's (possibly multiscale, possibly lazy) data.

    ``plane`` indexes the axes before (y, x) of a stack layer (see :func:`current_plane`); a stack
    without one is refused by the core.
    """
    from napari_cytoclip.io.sections import section_from_array

    levels = list(layer.data) if layer.multiscale else [layer.data]
    if plane:
        levels = [level[tuple(plane)] for level in levels]
    suffix = f" [{plane_text(plane)}]" if plane else ""
    section = section_from_array(levels if layer.multiscale else levels[0], pixel_size_um, name=layer.name + suffix)
    section.source = (layer_source(layer) or layer.name) + suffix
    return section


def widget_alive(widget: QWidget) -> bool:
    """False once Qt has deleted ``widget`` (the viewer was closed while a worker ran)."""
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True


def message_of(exc: BaseException) -> str:
    from napari_cytoclip.errors import CytoclipError

    if isinstance(exc, CytoclipError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def group(title: str, *widgets: QWidget) -> QGroupBox:
    box = QGroupBox(title)
    layout = QVBoxLayout(box)
    layout.setContentsMargins(6, 6, 6, 6)
    layout.setSpacing(4)
    for w in widgets:
        layout.addWidget(w)
    return box


def report_problem(label: QLabel, text: str, error: bool = True) -> None:
    """Show ``text`` in a widget's status ``label`` (with a warning sign) and as a napari notification."""
    from napari.utils.notifications import show_error, show_warning

    label.setText(f"⚠ {text}")
    (show_error if error else show_warning)(text)


def status_label(text: str = "") -> QLabel:
    """A word-wrapped label that keeps the height its text needs (never squeezed and clipped)."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    return label


def shipped_bundle_path() -> Path:
    from napari_cytoclip.models.bundle import default_bundle_path

    return default_bundle_path()


class WorkerFailure:
    """An exception raised in a thread worker, returned as a value.

    Workers return failures instead of raising them: napari 0.9's task-status hook on the
    ``errored`` signal takes the wrong number of arguments and raises in the Qt event loop.
    """

    def __init__(self, exc: BaseException):
        self.exc = exc


def guarded(func: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``func``; an exception comes back as a :class:`WorkerFailure`."""
    try:
        return func(*args, **kwargs)
    except Exception as exc:
        return WorkerFailure(exc)


def drive(gen: Any) -> Any:
    """Generator function for a thread worker: delegate to ``gen``; failures are returned."""
    try:
        return (yield from gen)
    except Exception as exc:
        return WorkerFailure(exc)
