"""The model chooser's extras in *Predict regions*: a list of recent model bundles, and importing an
open_clip checkpoint (``.pt``/``.safetensors``) as a new bundle (issue 14).

The import itself is the Qt-free :func:`napari_cytoclip.models.import_checkpoint.import_checkpoint`, run in
a thread worker; the bundle is written next to the checkpoint, in a new folder (never over one).
:class:`ImportCheckpointDialog` only collects the values; :meth:`ModelChooser.import_checkpoint` takes
them directly (for scripts and tests).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, LineEdit, SpinBox
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QDialog, QDialogButtonBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, \
    QVBoxLayout, QWidget

from napari_cytoclip.models.import_checkpoint import CHECKPOINT_SUFFIXES, RecentModels
from napari_cytoclip.widgets.common import WorkerFailure, guarded, message_of, widget_alive

RECENT_PLACEHOLDER = "Recent models…"
MODES = ("rgb", "gray_scales")


def is_checkpoint(path: str | Path | None) -> bool:
    """True for an existing file with a checkpoint suffix (``.pt``, ``.safetensors``, …)."""
    return path is not None and str(path).strip() != "" and Path(path).is_file() \
        and Path(path).suffix.lower() in CHECKPOINT_SUFFIXES


def bundle_folder_for(checkpoint: str | Path) -> Path:
    """A new folder next to ``checkpoint`` for its bundle: ``<stem>-bundle``, else ``<stem>-bundle-2``, …"""
    checkpoint = Path(checkpoint)
    base = checkpoint.with_name(f"{checkpoint.stem}-bundle")
    candidate, n = base, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


class ImportCheckpointDialog(QDialog):
    """Asks what a checkpoint is: its architecture (open_clip name or model config JSON), regions CSV and
    tile size (µm; pixels and mode optional). :meth:`values` gives the keyword arguments of the import."""

    def __init__(self, checkpoint: str | Path, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Import a CLIP checkpoint")
        self.checkpoint = Path(checkpoint)
        self.arch = LineEdit(label="Architecture", value="",
                             tooltip="open_clip model name (e.g. ViT-B-32); or leave empty and give a config")
        self.config = FileEdit(label="Model config", mode="r", filter="*.json", nullable=True, value=None,
                               tooltip="open_clip model config JSON (instead of an architecture name)")
        self.regions = FileEdit(label="Regions CSV", mode="r", filter="*.csv", nullable=True, value=None,
                                tooltip="id,name (acronym, colour, description optional): the model's classes")
        self.tile_um = FloatSpinBox(label="Tile (µm)", min=0.0, max=1e6, step=10.0, value=0.0,
                                    tooltip="Micrometres one model input tile covers")
        self.tile_px = SpinBox(label="Tile (px)", min=0, max=4096, value=0,
                               tooltip="Pixels per tile side; 0: the architecture's image size")
        self.mode = ComboBox(label="Mode", choices=list(MODES), value="rgb",
                             tooltip="rgb: colour tiles; gray_scales: grey windows as channels")
        self.form = Container(widgets=[self.arch, self.config, self.regions, self.tile_um, self.tile_px, self.mode],
                              labels=True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel(f"Checkpoint: {self.checkpoint.name}"))
        layout.addWidget(self.form.native)
        layout.addWidget(buttons)

    def values(self) -> dict:
        """``{"arch", "config", "regions_csv", "tile_um", "tile_px", "mode"}`` (empty fields as None)."""
        arch = str(self.arch.value or "").strip() or None
        return {"arch": arch, "config": _file(self.config.value), "regions_csv": _file(self.regions.value),
                "tile_um": float(self.tile_um.value), "tile_px": int(self.tile_px.value) or None,
                "mode": str(self.mode.value)}


class ModelChooser(QWidget):
    """Recent bundles (a combo box) and an *Import checkpoint…* button, for a host that has
    ``set_model_path(path)``, ``status`` (a QLabel), ``_error(text)`` and ``_warn(text)``."""

    def __init__(self, host: Any, recent: RecentModels | None = None):
        super().__init__()
        self.host = host
        self.recent_models = recent if recent is not None else RecentModels()
        self._worker = None
        self.dialog: ImportCheckpointDialog | None = None  # the open import dialog, if any
        self.recent = QComboBox()
        self.recent.setToolTip("Model bundles used lately (newest first)")
        self.recent.activated.connect(self._on_recent_activated)  # user choices only, not refreshes
        self.import_button = QPushButton("Import checkpoint…")
        self.import_button.setToolTip("Make a model bundle from an open_clip checkpoint (.pt, .safetensors)")
        self.import_button.clicked.connect(self.ask_checkpoint)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.recent, 1)
        row.addWidget(self.import_button)
        self.refresh()

    # ------------------------------------------------------------------ recent models
    def refresh(self) -> None:
        """Fill the combo box from the recent-models file."""
        self.recent.blockSignals(True)
        try:
            self.recent.clear()
            self.recent.addItem(RECENT_PLACEHOLDER, None)
            for entry in self.recent_models.entries():
                self.recent.addItem(str(entry.get("name") or Path(entry["path"]).name), entry["path"])
                self.recent.setItemData(self.recent.count() - 1, entry["path"], Qt.ItemDataRole.ToolTipRole)
            self.recent.setCurrentIndex(0)
        finally:
            self.recent.blockSignals(False)

    def recent_paths(self) -> list[Path]:
        """The bundle folders listed in the combo box, newest first."""
        return [Path(self.recent.itemData(i)) for i in range(1, self.recent.count())]

    def remember(self, bundle_path: str | Path) -> None:
        """Put a bundle first in the recent models (a folder that does not load is not listed)."""
        try:
            self.recent_models.add(bundle_path)
        except Exception:  # noqa: BLE001 - the chooser shows the bundle's problem; the list just skips it
            return
        self.refresh()

    def _on_recent_activated(self, index: int) -> None:
        path = self.recent.itemData(index)
        if path:
            self.host.set_model_path(path)
            self.remember(path)

    # ------------------------------------------------------------------ importing a checkpoint
    @property
    def worker(self):
        """The running import worker, if any."""
        return self._worker

    def ask_checkpoint(self, *_: Any, checkpoint: str | Path | None = None) -> None:
        """Choose a checkpoint file (unless given), then open the dialog that asks what it is; its OK imports it."""
        if checkpoint is None:
            patterns = " ".join(f"*{s}" for s in CHECKPOINT_SUFFIXES)
            checkpoint, _ = QFileDialog.getOpenFileName(self, "Choose a CLIP checkpoint", "",
                                                        f"Checkpoints ({patterns});;All files (*)")
            if not checkpoint:
                return
        if self.dialog is not None:
            self.dialog.close()
        self.dialog = dialog = ImportCheckpointDialog(checkpoint, self)
        dialog.accepted.connect(lambda: self.import_checkpoint(checkpoint, **dialog.values()))
        dialog.finished.connect(self._on_dialog_closed)
        dialog.open()  # window-modal, not blocking: the viewer keeps drawing

    def _on_dialog_closed(self, *_: Any) -> None:
        self.dialog = None

    def import_checkpoint(self, checkpoint: str | Path, regions_csv: str | Path | None, tile_um: float, *,
                          arch: str | None = None, config: str | Path | None = None, tile_px: int | None = None,
                          mode: str = "rgb", on_done: Callable[[Path], None] | None = None):
        """Import ``checkpoint`` as a bundle in a new folder next to it, in a thread worker; when it is
        written, select it and list it in the recent models. Returns the worker (None: refused at once)."""
        from napari.qt.threading import create_worker

        from napari_cytoclip.models.import_checkpoint import import_checkpoint

        if self._worker is not None:
            self.host._warn("A checkpoint is being imported; wait for it to finish.")
            return None
        checkpoint = Path(checkpoint)
        problem = _missing(checkpoint, regions_csv, tile_um, arch, config)
        if problem:
            self.host._error(f"Cannot import {checkpoint.name}: {problem}")
            return None
        out = bundle_folder_for(checkpoint)
        kwargs = {"arch": arch, "config": config, "tile_px": tile_px, "mode": mode}
        worker = create_worker(guarded, import_checkpoint, checkpoint, out, regions_csv, float(tile_um),
                               _start_thread=False, _ignore_errors=True, **kwargs)
        worker.returned.connect(lambda result: self._on_imported(checkpoint, result, on_done))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.import_button.setEnabled(False)
        self.host.status.setText(f"Importing {checkpoint.name}…")
        worker.start()
        return worker

    def _on_imported(self, checkpoint: Path, result: Any, on_done: Callable[[Path], None] | None) -> None:
        if not widget_alive(self):
            return
        if isinstance(result, WorkerFailure):
            self.host._error(f"Import failed: {message_of(result.exc)}")
            return
        path = Path(result)
        self.host.set_model_path(path)
        self.remember(path)
        self.host.status.setText(f"Imported {checkpoint.name} as the model bundle {path}")
        if on_done is not None:
            on_done(path)

    def _on_finished(self, *_: Any) -> None:
        self._worker = None
        if widget_alive(self):
            self.import_button.setEnabled(True)


def _file(value: Any) -> Path | None:
    text = "" if value is None else str(value).strip()
    return None if text in ("", ".") else Path(text)


def _missing(checkpoint: Path, regions_csv: Any, tile_um: Any, arch: Any, config: Any) -> str | None:
    """What the dialog left out (checked before a worker starts); the import checks the rest."""
    if not checkpoint.is_file():
        return f"{checkpoint} is not a file"
    if (arch is None) == (config is None):
        return "give the architecture: an open_clip name or a model config JSON (one of them)"
    if regions_csv is None:
        return "choose the regions CSV (id,name) of the model's classes"
    try:
        ok = float(tile_um) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return "give the tile size in micrometres (how much tissue one model input covers)"
    return None
