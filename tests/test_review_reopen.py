"""Review confirmation is the user's act; results folders reopen in napari; GUI tests skip without a display.

Real parts throughout: a tiny random open_clip bundle predicting (through the CLI and the Predict
widget) on a crop of the bundled Allen plate 41, napari viewers under pytest-xvfb, and a pytest
subprocess for the display check of ``tests/conftest.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PLUGIN = "napari-cytoclip"
PX = 7.17
CROP = (slice(300, 900), slice(300, 900))


# ------------------------------------------------------------------------------------ fixtures
def _crop() -> np.ndarray:
    from PIL import Image

    from napari_cytoclip.io.sample_data import SAMPLE_DIR

    with Image.open(SAMPLE_DIR / "plate_41.jpg") as im:
        return np.asarray(im.convert("L"))[CROP]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tiny model, a crop of plate 41 as TIFF and its prediction folder written by the CLI."""
    import tifffile

    from napari_cytoclip.cli import main

    root = tmp_path_factory.mktemp("reopen")
    tiny_bundle(root / "tiny")
    tifffile.imwrite(root / "crop.tif", _crop())
    rc = main(["predict", str(root / "crop.tif"), "--model", str(root / "tiny"), "--pixel-size", str(PX),
               "--out", str(root / "results"), "--device", "cpu", "--quiet"])
    assert rc == 0 and (root / "results" / "crop" / "prediction.json").is_file()
    return root


def _copy_folder(src: Path, dst: Path, **summary_changes) -> Path:
    shutil.copytree(src, dst)
    summary = json.loads((dst / "prediction.json").read_text())
    summary.update(summary_changes)
    (dst / "prediction.json").write_text(json.dumps(summary))
    return dst


# ------------------------------------------------------------------------------------ 9. review
def test_review_confirms_only_what_the_user_moved_on_from(make_napari_viewer, work, tmp_path):
    from napari_cytoclip.teach.export import export_corrections

    viewer = make_napari_viewer()
    image = viewer.add_image(_crop(), name="crop", scale=(PX, PX))
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Predict regions")
    widget.set_model_path(work / "tiny")
    widget.device.value = "cpu"
    widget.image.value = image
    state = widget.run_blocking()
    assert state is not None and state.complete, widget.status.text()
    labels, pred = state.labels_layer, state.prediction

    # showing a tile confirms nothing; moving on with Next confirms the tile that was shown
    first = widget.next_uncertain()
    assert first is not None and state.under_review == first
    assert not state.reviewed.any()
    assert export_corrections(state.section, pred, np.asarray(labels.data), tmp_path / "e0", state.bundle,
                              confirmed=state.reviewed).confirmed_cells == 0
    second = widget.next_uncertain()
    assert second != first and state.reviewed[first] and int(state.reviewed.sum()) == 1
    third = widget.skip_uncertain()  # Skip moves on without confirming
    assert third not in (first, second) and not state.reviewed[second] and int(state.reviewed.sum()) == 1
    assert "1 of" in widget.review_status.text()

    # confirm 150 more of the least confident tiles (the ones a new region most likely takes over)
    for _ in range(150):
        widget.next_uncertain()
    shown = state.under_review
    confirmed_before = state.reviewed.copy()
    assert int(confirmed_before.sum()) == 151 and not confirmed_before[shown]  # first + the 150 left

    # the user repaints two confirmed tiles: paint survives relabelling, so they keep their confirmation
    painted = [tuple(int(v) for v in cell) for cell in np.argwhere(confirmed_before)[:2]]
    for rc in painted:
        labels.data[rc] = 3
    labels.refresh()

    # Add region relabels: every cell whose label changed loses its confirmation, the others keep it.
    # (With this tiny random model a region described like the medulla takes over the medulla tiles.)
    _dock, query = viewer.window.add_plugin_dock_widget(PLUGIN, "Text query", tabify=True)
    query.prediction.value = labels
    before = np.asarray(labels.data).copy()
    medulla = next(r for r in state.regions if r.name == "Medulla")
    query.region_name.value = "Hindbrain"
    query.region_description.value = medulla.description
    assert query.add_region() is not None
    changed = np.asarray(labels.data) != before
    assert (changed & confirmed_before).any()  # the case under test happened
    assert all(state.reviewed[rc] and labels.data[rc] == 3 for rc in painted)
    assert not (state.reviewed & changed).any()
    np.testing.assert_array_equal(state.reviewed, confirmed_before & ~changed)
    assert "no longer confirmed" in query.add_status.text()
    if changed[shown]:  # the tile on screen changed: moving on must not confirm a label not seen
        assert state.under_review is None
    widget.next_uncertain()
    assert not (state.reviewed & changed & ~state.visited).any()

    # export writes as confirmed exactly the confirmed, unchanged tiles
    result = export_corrections(state.section, pred, np.asarray(labels.data), tmp_path / "e1", state.bundle,
                                confirmed=state.reviewed, regions=state.regions)
    edited = state.edited_mask(labels.data)
    assert result.confirmed_cells == int((state.reviewed & ~edited & (np.asarray(labels.data) > 0)).sum())

    # clearing the tile under review also drops it from the queue's "shown" set
    cell = state.under_review
    mask = np.zeros(state.grid.shape, bool)
    mask[cell] = True
    state.reviewed[cell] = True
    assert state.clear_confirmation(mask) == 1 and state.under_review is None
    assert not state.reviewed[cell] and not state.visited[cell]


# ------------------------------------------------------------------------------------ 11. reopen (core)
def test_reader_claims_folders_and_our_grid_tiffs(work):
    from napari_cytoclip.io.reader import napari_get_reader, read_prediction_folder, read_sections

    folder = work / "results" / "crop"
    assert napari_get_reader(str(folder)) is read_prediction_folder
    assert napari_get_reader(str(work)) is None  # a folder that is not a prediction
    data, kwargs, kind = read_sections(str(folder / "labels.tif"))[0]
    assert kind == "labels" and data.dtype == np.uint16
    summary = json.loads((folder / "prediction.json").read_text())
    g = summary["grid"]
    np.testing.assert_allclose(kwargs["scale"], [g["step"] * PX] * 2)
    np.testing.assert_allclose(kwargs["translate"], np.asarray(g["origin"]) * PX)
    assert list(kwargs["features"]["name"]) == [r["name"] for r in summary["regions"]]
    data, kwargs, kind = read_sections(str(folder / "confidence.tif"))[0]
    assert kind == "image" and data.dtype == np.float32 and kwargs["contrast_limits"] == (0.0, 1.0)
    data, kwargs, kind = read_sections(str(work / "crop.tif"))[0]  # a section TIFF stays a section
    assert kind == "image" and data.shape == _crop().shape
    code = ("import sys; from napari_cytoclip.io.reader import read_prediction_folder; "
            f"read_prediction_folder({str(folder)!r}); "
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6')))")
    qt = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert qt.returncode == 0 and qt.stdout.strip() == "[]", qt.stdout + qt.stderr  # the reader is Qt-free


@pytest.mark.parametrize("source, found", [
    ("abs", True),            # absolute path, as the CLI writes it
    ("../../crop.tif", True),  # relative to the results folder
    ("gone.tif", False),       # missing: reported, the regions still open
])
def test_reopen_resolves_or_reports_the_source(work, tmp_path, source, found):
    from napari_cytoclip.io.reader import read_prediction_folder

    src = str(work / "crop.tif") if source == "abs" else source
    folder = _copy_folder(work / "results" / "crop", work / "results" / f"copy_{tmp_path.name}", source=src)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layers = read_prediction_folder(str(folder))
        kinds = [kind for _, _, kind in layers]
        if found:
            assert kinds == ["image", "image", "labels"]
            assert layers[0][1]["scale"] == (PX, PX) and layers[0][0].shape == _crop().shape
            assert Path(layers[2][1]["metadata"]["cytoclip"]["source"]) == (work / "crop.tif").resolve()
        else:
            assert kinds == ["image", "labels"]  # confidence and regions, without the section
            text = " ".join(str(w.message) for w in caught)
            assert "gone.tif" in text and "missing" in text and str(folder / "gone.tif") in text
    finally:
        shutil.rmtree(folder)


def test_restore_refuses_a_cache_of_another_image(work, tmp_path):
    import tifffile
    from napari.layers import Labels

    from napari_cytoclip.io.reader import read_prediction_folder
    from napari_cytoclip.widgets.state import restore_state, state_of
    from napari_cytoclip.errors import CacheMismatch

    other = tmp_path / "other.tif"
    tifffile.imwrite(other, 255 - _crop())  # same size, other pixels
    folder = _copy_folder(work / "results" / "crop", tmp_path / "crop", source=str(other))
    data, kwargs, _ = read_prediction_folder(str(folder))[-1]
    layer = Labels(data, **kwargs)
    with pytest.raises(CacheMismatch):
        restore_state(layer)
    with pytest.warns(UserWarning, match="viewing only"):
        assert state_of(layer) is None
    assert "section" in layer.metadata["cytoclip"]["restore_error"]


def test_prediction_bundle_recorded_path_or_shipped_model(work):
    from napari_cytoclip.models.bundle import default_bundle_path, load_bundle
    from napari_cytoclip.errors import BundleError
    from napari_cytoclip.io.reader import prediction_bundle

    folder = work / "results" / "crop"
    summary = json.loads((folder / "prediction.json").read_text())
    assert Path(summary["model"]["path"]) == work / "tiny"  # recorded by predict
    assert prediction_bundle(summary, folder).path == work / "tiny"
    shipped = load_bundle(default_bundle_path())
    moved = {"model": {"name": shipped.name, "hash": shipped.weights_hash(), "path": str(work / "nowhere")}}
    assert prediction_bundle(moved, folder).path == shipped.path  # found by its weights hash
    with pytest.raises(BundleError, match="not found"):
        prediction_bundle({"model": {"name": "tiny", "hash": "0123456789abcdef", "path": None}}, folder)


# ------------------------------------------------------------------------------------ 11. reopen (napari)
def test_reopened_folder_continues_correcting_and_teaching(make_napari_viewer, qtbot, work, tmp_path):
    from napari.layers import Image, Labels

    from napari_cytoclip.inference.cache import load_prediction
    from napari_cytoclip.widgets.state import state_of

    folder = work / "results" / "crop"
    summary = json.loads((folder / "prediction.json").read_text())
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin=PLUGIN)
    image = viewer.layers["crop"]
    labels = viewer.layers["cytoclip regions (crop)"]
    conf = viewer.layers["cytoclip confidence (crop)"]
    assert isinstance(image, Image) and isinstance(labels, Labels) and isinstance(conf, Image)
    assert tuple(image.scale) == (PX, PX)

    # regions on the grid, with names and colours, placed on the section
    cached = load_prediction(folder / "cache")
    np.testing.assert_array_equal(labels.data, cached.labels)
    np.testing.assert_allclose(conf.data, cached.confidence)
    t = cached.grid.layer_transform(tuple(image.scale), tuple(image.translate))
    np.testing.assert_allclose(labels.scale, t["scale"])
    np.testing.assert_allclose(labels.translate, t["translate"])
    assert list(labels.features["name"]) == [r["name"] for r in summary["regions"]]
    for r in cached.regions[:3]:
        np.testing.assert_allclose(labels.colormap.map(np.array([r.id]))[0], r.rgba(), atol=1e-6)

    # the widgets find the prediction and its cache from the layer alone
    _dock, query = viewer.window.add_plugin_dock_widget(PLUGIN, "Text query")
    assert list(query.prediction.choices) == [labels]
    query.prediction.value = labels
    state = state_of(labels)
    assert state is not None and state.complete and state.cache == (folder / "cache").resolve()
    assert labels.metadata["cytoclip"]["cache"] == str((folder / "cache").resolve())
    assert state.layers["confidence"] is conf
    query.set_text("densely packed granule cells")
    qtbot.waitUntil(lambda: any(layer.name.startswith("query:") for layer in viewer.layers), timeout=20000)
    expected = cached.similarity(state.model.encode_texts(["densely packed granule cells"])[0])
    np.testing.assert_allclose(state.layers["query"].data[np.isfinite(expected)], expected[np.isfinite(expected)],
                               atol=1e-5)

    # review and correct in the Predict widget, then export training pairs (teaching goes on)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Predict regions", tabify=True)
    viewer.layers.selection.active = image
    viewer.layers.selection.active = labels
    assert widget.current is state
    widget.next_uncertain()
    widget.next_uncertain()
    assert int(state.reviewed.sum()) == 1
    cells = [tuple(c) for c in cached.cells[:5]]
    for rc in cells:
        labels.data[rc] = 3 if labels.data[rc] != 3 else 4
    labels.refresh()
    _dock, export = viewer.window.add_plugin_dock_widget(PLUGIN, "Export annotations", tabify=True)
    export.layer.value = labels
    export.folder.value = str(tmp_path / "export")
    result = export.export(blocking=True)
    assert result is not None, export.result.text()
    assert result.corrected_cells == 5 and result.pairs_added == 5 + result.confirmed_cells
    assert result.confirmed_cells == int((state.reviewed & ~state.edited_mask(labels.data)).sum())

    # the plugin's own labels.tif opened alone is a Labels layer on the grid, with region names
    viewer.open(str(folder / "labels.tif"), plugin=PLUGIN)
    alone = viewer.layers["labels"]
    assert isinstance(alone, Labels)
    np.testing.assert_allclose(alone.scale, labels.scale)
    np.testing.assert_allclose(alone.translate, labels.translate)
    assert "name" in alone.features


# ------------------------------------------------------------------------------------ 13. no display
TINY_SUITE = '''
import os
import pytest

def test_plain():
    assert "DISPLAY" not in os.environ  # pytest-xvfb started no display

def test_viewer(make_napari_viewer):
    make_napari_viewer()

def test_qt(qtbot):
    pass

@pytest.mark.gui
def test_marked():
    pass
'''


XCB_SONAMES = ["libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxkbcommon-x11.so.0", "libxcb-cursor.so.0"]


@pytest.mark.parametrize("how", ["fake", "path_without_xvfb"])
def test_gui_tests_skip_with_one_line_without_a_display(tmp_path, how):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_tiny.py").write_text(TINY_SUITE)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "CYTOCLIP_FAKE_NO_DISPLAY")}
    if how == "fake":
        env["CYTOCLIP_FAKE_NO_DISPLAY"] = "1"
        pieces = ["Xvfb", *XCB_SONAMES]
    else:
        env["PATH"] = str(Path(sys.executable).parent)  # the venv's bin: no Xvfb there
        if shutil.which("Xvfb", path=env["PATH"]):
            pytest.skip("Xvfb is in the venv's bin")
        pieces = ["Xvfb"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "test_tiny.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Fatal Python error" not in out
    assert "1 passed, 3 skipped" in out, out
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and skipped[0].startswith("SKIPPED [3]"), out
    assert all(piece in skipped[0] for piece in pieces) and "apt-get install" in skipped[0], skipped[0]
