"""*Predict regions*' model chooser takes an open_clip checkpoint too (issue 14 item 2): the import dialog's
values, the import in a thread worker into a new folder next to the checkpoint, the bundle selected and listed
in the recent models (a temporary recent-models file, never the user's)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_import_model import train_style_checkpoint, write_config  # noqa: E402

from napari_cytoclip.models.import_checkpoint import RecentModels  # noqa: E402

REGIONS = "id,name,acronym,color\n1,Isocortex,CTX,#ff0000\n2,Striatum,STR,#00ff00\n3,Thalamus,TH,#0000ff\n"


@pytest.fixture()
def checkpoint(tmp_path):
    ckpt = tmp_path / "ckpts" / "epoch_1.pt"
    ckpt.parent.mkdir()
    train_style_checkpoint(ckpt)
    regions = tmp_path / "regions.csv"
    regions.write_text(REGIONS)
    return ckpt, write_config(tmp_path / "cfg"), regions


def _widget(make_napari_viewer, tmp_path):
    from napari_cytoclip.widgets import PredictWidget

    recent = RecentModels(tmp_path / "config" / "recent.json")
    return PredictWidget(make_napari_viewer(), recent_models=recent), recent


def test_import_checkpoint_selects_and_remembers_the_bundle(make_napari_viewer, qtbot, tmp_path, checkpoint):
    from napari_cytoclip.models.bundle import load_bundle

    ckpt, config, regions = checkpoint
    widget, recent = _widget(make_napari_viewer, tmp_path)
    assert widget.model_chooser.recent_paths() == [] and widget.model_folder() is None
    taken = ckpt.parent / "epoch_1-bundle"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")  # a folder of that name exists: a new one is made beside it

    worker = widget.import_checkpoint(ckpt, regions, 320.0, config=config, mode="rgb")
    assert worker is not None
    qtbot.waitUntil(lambda: widget.model_chooser.worker is None, timeout=120000)

    out = ckpt.parent / "epoch_1-bundle-2"
    assert widget.model_folder() == out, widget.status.text()
    bundle = load_bundle(out)
    assert bundle.input.size == 32 and bundle.input.scales_um == (320.0,) and len(bundle.regions) == 3
    assert bundle.provenance["imported"]["source_file"] == "epoch_1.pt"
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]  # never written over
    assert widget.model_chooser.recent_paths() == [out.resolve()]
    assert recent.paths() == [out.resolve()]  # persisted in the given file
    assert "epoch_1" in widget.model_info.value and "3 regions" in widget.model_info.value

    # a later widget lists it; choosing it from the list selects it
    widget2, _ = _widget(make_napari_viewer, tmp_path)
    assert widget2.model_chooser.recent_paths() == [out.resolve()]
    widget2.model_chooser._on_recent_activated(1)
    assert widget2.model_folder() == out.resolve()


def test_import_failure_is_shown_and_selects_nothing(make_napari_viewer, qtbot, tmp_path, checkpoint):
    ckpt, config, regions = checkpoint
    widget, recent = _widget(make_napari_viewer, tmp_path)
    before = widget.model_folder()
    # refused before any worker: values the dialog left out
    for kwargs, words in [({"config": config, "regions_csv": None}, "regions CSV"),
                          ({"config": None, "regions_csv": regions}, "architecture"),
                          ({"config": config, "arch": "ViT-B-32", "regions_csv": regions}, "architecture")]:
        regions_csv = kwargs.pop("regions_csv")
        assert widget.import_checkpoint(ckpt, regions_csv, 320.0, **kwargs) is None
        assert words in widget.status.text() and ckpt.name in widget.status.text()
    # refused by the import (in the worker): the wrong architecture
    worker = widget.import_checkpoint(ckpt, regions, 320.0, arch="RN50")
    assert worker is not None
    qtbot.waitUntil(lambda: widget.model_chooser.worker is None, timeout=120000)
    assert "Import failed" in widget.status.text() and "epoch_1.pt" in widget.status.text()
    assert widget.model_folder() == before and recent.paths() == []
    assert not (ckpt.parent / "epoch_1-bundle").exists()


def test_import_dialog_values(make_napari_viewer, tmp_path, checkpoint):
    """The dialog's fields become the import's keyword arguments (the dialog is never shown)."""
    from napari_cytoclip.widgets.model_chooser import ImportCheckpointDialog, bundle_folder_for, is_checkpoint

    ckpt, config, regions = checkpoint
    make_napari_viewer()  # a Qt application
    dialog = ImportCheckpointDialog(ckpt)
    dialog.arch.value = " ViT-B-32 "
    dialog.regions.value = str(regions)
    dialog.tile_um.value = 224.0
    dialog.mode.value = "gray_scales"
    assert dialog.values() == {"arch": "ViT-B-32", "config": None, "regions_csv": regions, "tile_um": 224.0,
                               "tile_px": None, "mode": "gray_scales"}
    dialog.arch.value = ""
    dialog.config.value = str(config)
    dialog.tile_px.value = 64
    values = dialog.values()
    assert values["arch"] is None and values["config"] == config and values["tile_px"] == 64
    assert is_checkpoint(ckpt) and not is_checkpoint(regions) and not is_checkpoint(ckpt.parent)
    assert bundle_folder_for(ckpt) == ckpt.parent / "epoch_1-bundle"


def test_choosing_a_checkpoint_file_opens_the_import_dialog(make_napari_viewer, qtbot, tmp_path, checkpoint):
    """The user puts a .pt file in the Model field: the field keeps the earlier model, the import dialog opens;
    OK imports and selects the bundle. A bundle folder the user chooses joins the recent models."""
    from helpers import tiny_bundle

    ckpt, config, regions = checkpoint
    widget, recent = _widget(make_napari_viewer, tmp_path)
    other = tiny_bundle(tmp_path / "other").path
    widget.model_path.value = str(other)  # as the user's browse or typing does
    assert widget.model_folder() == other and recent.paths() == [other.resolve()]

    widget.model_path.value = str(ckpt)
    assert widget.model_folder() == other  # a checkpoint is no bundle: the field keeps the last model
    qtbot.waitUntil(lambda: widget.model_chooser.dialog is not None and widget.model_chooser.dialog.isVisible(),
                    timeout=5000)
    dialog = widget.model_chooser.dialog
    assert dialog.checkpoint == ckpt
    dialog.config.value = str(config)
    dialog.regions.value = str(regions)
    dialog.tile_um.value = 320.0
    dialog.accept()
    assert widget.model_chooser.dialog is None
    qtbot.waitUntil(lambda: widget.model_chooser.worker is None, timeout=120000)
    out = ckpt.parent / "epoch_1-bundle"
    assert widget.model_folder() == out, widget.status.text()
    assert widget.model_chooser.recent_paths() == [out.resolve(), other.resolve()]
