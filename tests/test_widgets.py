"""The napari front end, driven headless (pytest-xvfb) on the real Allen plate 41 with a tiny random model.

The whole loop: sample data -> Predict (grid labels, features, legend, review, identify) -> paint a
correction -> Export -> Text query -> Add region -> Fine-tune; threaded runs, cancel, closing layers.
Screenshots go to ``$CYTOCLIP_SCREENSHOTS`` (or a temp folder).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PLUGIN = "napari-cytoclip"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_bundle(folder)
    return folder


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("CYTOCLIP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def slow_encoding(monkeypatch):
    """Make each batch take a little while so a threaded run can be caught mid-way.

    Returns a function that restores full speed.
    """
    from napari_cytoclip.models.model import CytoClip

    original = CytoClip.encode_windows
    delay = {"s": 0.03}

    def slowed(self, windows):
        time.sleep(delay["s"])
        return original(self, windows)

    monkeypatch.setattr(CytoClip, "encode_windows", slowed)
    monkeypatch.setattr("napari_cytoclip.widgets.predict_widget.BATCH_SIZE", 16)

    def full_speed():
        delay["s"] = 0.0
        monkeypatch.setattr("napari_cytoclip.widgets.predict_widget.BATCH_SIZE", 64)
    return full_speed


def open_plate(viewer):
    layers = viewer.open_sample(PLUGIN, "allen_plate_41")
    image = next(layer for layer in layers if layer.name.startswith("Allen Nissl plate"))
    return image, layers


def predict_widget(viewer, model_dir, tabify=False):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Predict regions", tabify=tabify)
    widget.set_model_path(model_dir)
    widget.device.value = "cpu"
    return widget


def predicted_viewer(make_napari_viewer, model_dir, show=False):
    viewer = make_napari_viewer(show=show)
    if show:
        viewer.window.resize(1500, 950)
    image, _ = open_plate(viewer)
    widget = predict_widget(viewer, model_dir)
    widget.image.value = image
    state = widget.run_blocking()
    assert state is not None and state.complete, widget.status.text()
    return viewer, image, widget, state


def screenshot(viewer, qtbot, path: Path) -> np.ndarray:
    qtbot.wait(200)
    img = viewer.screenshot(path=str(path), canvas_only=False, flash=False)
    assert path.is_file()
    return img


def wait_worker(qtbot, widget, timeout=20000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


# ------------------------------------------------------------------------------------ tests
def test_predict_review_identify_export_query(make_napari_viewer, qtbot, tiny_model_dir, shots, tmp_path):
    from napari.layers import Image, Labels

    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.widgets.layers import viewer_camera
    from napari_cytoclip.widgets.state import META_KEY, state_of

    viewer, image, widget, state = predicted_viewer(make_napari_viewer, tiny_model_dir, show=True)
    assert image.scale[-1] == pytest.approx(7.17)
    assert widget.pixel_size.value == pytest.approx(7.17)
    assert widget.stride.value == pytest.approx(100.0)  # the model's default stride

    # --- the Labels layer lives on the tile grid and overlays the image
    labels = state.labels_layer
    pred = state.prediction
    assert isinstance(labels, Labels) and labels.name == f"cytoclip regions ({image.name})"
    assert labels.data.shape == tuple(pred.grid.shape) == tuple(state.grid.shape)
    assert labels.data.size < image.data.size / 100  # never a full-resolution label array
    t = pred.grid.layer_transform(tuple(image.scale), tuple(image.translate))
    np.testing.assert_allclose(labels.scale, t["scale"])
    np.testing.assert_allclose(labels.translate, t["translate"])
    r, c = (int(v) for v in pred.cells[len(pred.cells) // 2])
    centre_px = pred.grid.centers(np.array([[r, c]]))[0]
    np.testing.assert_allclose(labels.data_to_world((r, c)), image.data_to_world(centre_px), atol=1e-6)
    np.testing.assert_array_equal(labels.data, pred.labels)
    meta = labels.metadata[META_KEY]
    assert meta["complete"] is True and meta["status"] == "complete" and state_of(labels) is state

    # --- hover: the features table names the region under the cursor
    feats = labels.features
    assert {"index", "name", "acronym", "mean confidence"} <= set(feats.columns)
    assert len(feats) == 14 and "Hippocampal formation" in set(feats["name"])
    region = state.region(int(labels.data[r, c]))
    status = labels.get_status(labels.data_to_world((r, c)), world=True)
    assert region.name in str(status)
    assert labels.colormap.map(np.array([region.id]))[0][3] == 1.0
    assert labels.colormap.map(np.array([0]))[0][3] == 0.0

    # --- confidence layer: grid-sized, same transform, 0..1
    conf = state.layers["confidence"]
    assert isinstance(conf, Image) and conf.data.shape == labels.data.shape
    np.testing.assert_allclose(conf.scale, labels.scale)
    assert tuple(conf.contrast_limits) == (0.0, 1.0)
    assert conf not in widget.image.choices  # not offered as an input image

    # --- legend: swatches + names, search filter, click to paint
    assert widget.legend.list.count() == 14
    widget.legend.search.setText("hippo")
    assert widget.legend.visible_ids() == [3]
    widget.legend.search.setText("")
    widget.legend.click_region(5)
    assert labels.selected_label == 5 and labels.mode == "paint"
    assert viewer.layers.selection.active is labels
    screenshot(viewer, qtbot, shots / "predict_widget.png")

    # --- review queue: least confident encoded cell first; moving on (Next) confirms the tile shown
    enc_conf = pred.confidence[pred.cells[:, 0], pred.cells[:, 1]]
    first = widget.next_uncertain()
    assert first == tuple(int(v) for v in pred.cells[np.argmin(enc_conf)])
    second = widget.next_uncertain()
    assert second != first and state.reviewed.sum() == 1 and state.reviewed[first]
    np.testing.assert_allclose(viewer_camera(viewer).center[-2:], labels.data_to_world(second), atol=1e-6)
    assert "review" in state.layers and viewer.layers.selection.active is labels

    # --- identify: top-5 regions for all tiles of the selected label
    labels.selected_label = int(labels.data[r, c])
    top = widget.identify_selection()
    assert len(top) == 5 and abs(sum(p for _, p, _ in top)) <= 1.0 + 1e-6
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    text = widget.identify_text.toPlainText()
    assert text.count("\n") == 5 and top[0][0].name in text
    model = state.model
    sel = labels.data[pred.cells[:, 0], pred.cells[:, 1]] == labels.selected_label
    mean = pred.embeddings[sel].astype(np.float32).mean(0)
    mean /= np.linalg.norm(mean)
    cos = model.region_embeddings(state.regions) @ mean
    assert top[0][0].id == state.regions[int(np.argmax(cos))].id
    screenshot(viewer, qtbot, shots / "predict_review_identify.png")

    # --- paint a correction: 6 cells to another region
    cells = pred.cells[:6]
    new_id = 12
    targets = [tuple(cell) for cell in cells if labels.data[tuple(cell)] != new_id]
    for rc in targets[1:]:
        labels.data[rc] = new_id
    labels.refresh()
    labels.brush_size = 1
    labels.paint(targets[0], new_id)  # as a brush stroke does: emits the paint event
    assert state.edited_mask(labels.data).sum() == len(targets)
    cerebellum = lambda: next(widget.legend.list.item(i).text() for i in range(widget.legend.list.count())  # noqa: E731
                              if widget.legend.list.item(i).text().startswith("Cerebellum"))
    qtbot.waitUntil(lambda: "%" in cerebellum(), timeout=2000)  # the legend's shares follow the paint

    # --- export (threaded, as a user would run it)
    _dock, export = viewer.window.add_plugin_dock_widget(PLUGIN, "Export annotations", tabify=True)
    export.layer.value = labels
    assert export.count_edits()[0] == len(targets)
    out = tmp_path / "export"
    export.folder.value = str(out)
    worker = export.export()
    assert worker is not None
    wait_worker(qtbot, export)
    result = export.last_result
    assert result is not None, export.result.text()
    reviewed_kept = int((state.reviewed & ~state.edited_mask(labels.data)).sum())
    assert result.corrected_cells == len(targets) and result.confirmed_cells == reviewed_kept
    assert result.pairs_added == len(targets) + reviewed_kept
    for name in ("labels.tif", "annotations.geojson", "regions.csv", "export.json", "pairs/pairs.csv"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert sum(rec["kind"] == "corrected" for rec in records) == len(targets)
    assert all(rec["corrected_label"] == new_id for rec in records if rec["kind"] == "corrected")
    assert "corrected" in export.result.text()
    again = export.export(blocking=True)  # exporting twice adds nothing, overwrites nothing
    assert again.pairs_added == 0 and again.pairs_existing == result.pairs_added
    screenshot(viewer, qtbot, shots / "export_widget.png")

    # --- text query: debounced, heatmap = prediction.similarity(encode_texts([text])[0])
    _dock, query = viewer.window.add_plugin_dock_widget(PLUGIN, "Text query", tabify=True)
    query.prediction.value = labels
    text = state.regions[2].texts()[0]
    query.set_text(text)
    assert query._timer.isActive() and not any(layer.name.startswith("query:") for layer in viewer.layers)
    qtbot.waitUntil(lambda: any(layer.name == f"query: {text}" for layer in viewer.layers), timeout=3000)
    heat = state.layers["query"]
    fresh = load_model(tiny_model_dir, device="cpu", precision="fp32")
    expected = pred.similarity(fresh.encode_texts([text])[0])
    finite = np.isfinite(expected)
    np.testing.assert_allclose(heat.data[finite], expected[finite], atol=1e-5)
    assert np.all(heat.data[~finite] < np.nanmin(expected))  # outside tissue: below the range (transparent)
    assert heat.data.shape == labels.data.shape and np.allclose(heat.scale, labels.scale)
    thr = query.applied_threshold
    assert thr == pytest.approx(np.percentile(expected[finite], 90), abs=1e-5)
    assert query.threshold.value == pytest.approx(thr, abs=2e-3)  # the slider shows it (rounded to its step)
    high = state.layers["highlight"]
    np.testing.assert_array_equal(high.data.astype(bool), finite & (expected >= thr))
    query.threshold.value = float(np.percentile(expected[finite], 50))
    np.testing.assert_array_equal(high.data.astype(bool), finite & (expected >= query.applied_threshold))
    assert query.applied_threshold == query.threshold.value
    best = query.best_cells()
    assert len(best) == 15 and expected[best[0]] == pytest.approx(np.nanmax(expected), abs=1e-5)
    query.matches.itemClicked.emit(query.matches.item(0))
    np.testing.assert_allclose(viewer_camera(viewer).center[-2:], labels.data_to_world(best[0]), atol=1e-6)
    query.set_text("densely packed granule cells")  # the same heatmap layer is reused and renamed
    qtbot.waitUntil(lambda: heat.name == "query: densely packed granule cells", timeout=3000)
    assert sum(layer.name.startswith("query:") for layer in viewer.layers) == 1
    viewer.reset_view()
    screenshot(viewer, qtbot, shots / "query_widget.png")

    # --- add a region: new id max+1, relabel from cached embeddings, painted cells kept
    query.region_name.value = "Claustrum"
    query.region_description.value = "a thin sheet of neurons between the insular cortex and the striatum"
    new = query.add_region()
    assert new is not None and new.id == 15 and new.acronym and new.color.startswith("#")
    assert [reg.id for reg in state.regions][-1] == 15 and len(state.regions) == 15
    expected_labels, _ = pred.labels, None
    for rc in targets:
        assert labels.data[rc] == new_id  # the user's paint survives relabelling
    untouched = ~state.edited_mask(labels.data)
    np.testing.assert_array_equal(labels.data[untouched], pred.labels[untouched])
    assert "Claustrum" in set(labels.features["name"]) and widget.legend.list.count() == 15
    assert labels.colormap.map(np.array([15]))[0][3] == 1.0
    assert labels.metadata[META_KEY]["regions"][-1]["name"] == "Claustrum"
    heat.visible = high.visible = False
    viewer.layers.selection.active = labels
    screenshot(viewer, qtbot, shots / "query_add_region.png")


def replay_pairs(folder: Path, regions, n: int = 8) -> Path:
    """A small replay pair folder (32-px windows, the tiny model's input) of regions 3 and 4."""
    from napari_cytoclip.teach.export import caption_for
    from napari_cytoclip.teach.pairs import Pair, write_pairs

    rng = np.random.default_rng(0)
    by_id = {r.id: r for r in regions}
    write_pairs(folder, [Pair(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), caption_for(by_id[rid]),
                              {"corrected_label": rid, "region_name": by_id[rid].name})
                         for rid in (3, 4) for _ in range(n)])
    return folder


def test_identify_shape_and_finetune(make_napari_viewer, qtbot, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("napari_cytoclip.widgets.export_widget.MIN_STEPS_PER_EPOCH", 10)  # a short fine-tune
    monkeypatch.setattr("napari_cytoclip.widgets.export_widget.FINETUNE_LR", 1e-3)  # that learns the tiny model
    viewer, image, widget, state = predicted_viewer(make_napari_viewer, tiny_model_dir)
    labels, pred = state.labels_layer, state.prediction

    # identify the tiles inside a drawn rectangle (world coordinates, µm)
    r0, c0 = (int(v) for v in pred.cells[len(pred.cells) // 2])
    lo, hi = labels.data_to_world((r0 - 2.4, c0 - 2.4)), labels.data_to_world((r0 + 2.4, c0 + 2.4))
    shapes = viewer.add_shapes([[lo, [lo[0], hi[1]], hi, [hi[0], lo[1]]]], shape_type="rectangle", name="ROI")
    shapes.selected_data = {0}
    viewer.layers.selection.active = shapes
    top = widget.identify_selection()
    assert top is not None and len(top) == 5
    assert widget.identify_text.toPlainText().startswith(f"{int(np.sum(state.predicted[r0 - 2:r0 + 3, c0 - 2:c0 + 3] > 0))} tiles of the selected shape")

    # export a few corrections, then fine-tune and hand the new model to the Predict widget
    for rc in map(tuple, pred.cells[:20]):
        labels.data[rc] = 13 if labels.data[rc] != 13 else 1
    labels.refresh()
    _dock, export = viewer.window.add_plugin_dock_widget(PLUGIN, "Export annotations")
    export.layer.value = labels
    export.folder.value = str(tmp_path / "out")
    assert export.export(blocking=True).pairs_added == 20
    export.epochs.value = 5
    # without replay pairs it refuses, pointing at the fast learner, and writes nothing
    assert export.finetune(blocking=True) is None
    assert "Save taught model" in export.result.text() and not (tmp_path / "out" / "models").exists()
    export.replay.value = str(replay_pairs(tmp_path / "replay" / "plate_1", state.bundle.regions).parent)
    bundle = export.finetune(blocking=True)
    assert bundle is not None, export.train_status.text()
    outcome = export.last_outcome  # the corrections are where the start model was wrong: it scores ~0 on them
    assert outcome.shipped and outcome.candidate.macro_f1 > outcome.start.macro_f1 and outcome.n_held >= 2
    assert str(outcome.start) in export.train_status.text() and str(outcome.candidate) in export.train_status.text()
    assert bundle.provenance["held_back_check"]["n_held_back"] == outcome.n_held
    assert bundle.provenance["replay"] == ["plate_1"]
    assert bundle.path.parent == tmp_path / "out" / "models" and (bundle.path / "weights.safetensors").is_file()
    assert sorted(p.name for p in bundle.path.parent.iterdir()) == [bundle.path.name]
    assert widget.model_folder() == bundle.path
    assert labels.metadata["cytoclip"]["finetuned_bundle"] == str(bundle.path)
    rerun = widget.run_blocking()  # the fine-tuned model predicts into a new layer (the old one has edits)
    assert rerun.complete and rerun.bundle.path == bundle.path and rerun.labels_layer is not labels


def test_threaded_run_cancel_and_rerun(make_napari_viewer, qtbot, tiny_model_dir, slow_encoding):
    from napari_cytoclip.widgets.state import META_KEY

    viewer = make_napari_viewer()
    image, _ = open_plate(viewer)
    widget = predict_widget(viewer, tiny_model_dir)
    state = widget.run()
    labels = state.labels_layer
    assert labels.data.shape == tuple(state.grid.shape) and not labels.data.any()  # created at the start
    assert not widget.run_button.enabled and widget.cancel_button.enabled
    qtbot.waitUntil(lambda: state.done >= 32, timeout=20000)
    widget.cancel()
    wait_worker(qtbot, widget)
    assert state.status == "cancelled" and not state.complete and state.prediction is None
    assert 0 < state.done < state.total
    meta = labels.metadata[META_KEY]
    assert meta["complete"] is False and meta["status"] == "cancelled"
    np.testing.assert_array_equal(labels.data, state.predicted)  # consistent: what was classified, nothing else
    assert 0 < int((labels.data > 0).sum()) <= state.done
    assert widget.run_button.enabled and labels.editable
    assert "Cancelled" in widget.status.text()

    # the incomplete layer cannot be exported or queried
    _dock, export = viewer.window.add_plugin_dock_widget(PLUGIN, "Export annotations")
    export.layer.value = labels
    export.folder.value = str(Path(viewer.layers[0].metadata["source"]).parent / "never")
    assert export.export(blocking=True) is None and "cancelled" in export.result.text()

    # a new run starts clean in the same layer, with a fresh state, threaded to the end
    slow_encoding()
    new_state = widget.run()
    assert new_state is not state and new_state.labels_layer is labels and not labels.data.any()
    wait_worker(qtbot, widget, timeout=60000)
    assert new_state.complete and labels.metadata[META_KEY]["complete"] is True
    np.testing.assert_array_equal(labels.data, new_state.prediction.labels)
    assert state.status == "cancelled"  # the old state is untouched


def test_rerun_follows_a_moved_image(make_napari_viewer, tiny_model_dir):
    """A rerun into the same layer places it on the image's current transform (set only where it changed)."""
    viewer = make_napari_viewer()
    image, _ = open_plate(viewer)
    widget = predict_widget(viewer, tiny_model_dir)
    first = widget.run_blocking()
    labels = first.labels_layer
    assert first.complete
    same = widget.run_blocking()  # unchanged image: same place
    assert same.labels_layer is labels
    np.testing.assert_allclose(labels.translate, first.transform["translate"])
    image.translate = (100.0, -50.0)
    moved = widget.run_blocking()
    assert moved.complete and moved.labels_layer is labels
    np.testing.assert_allclose(labels.translate, moved.transform["translate"])
    np.testing.assert_allclose(np.asarray(moved.transform["translate"]) - np.asarray(first.transform["translate"]),
                               (100.0, -50.0))
    np.testing.assert_allclose(labels.scale, moved.transform["scale"])


def test_labels_colormap_is_built_once_per_regions(make_napari_viewer, tiny_model_dir):
    """The warm start builds the regions' colormap (with napari's uint16 lookup) off the main thread; a later
    result layer of the same regions reuses it, and it colours every region as the bundle says."""
    from napari_cytoclip.models.bundle import load_bundle
    from napari_cytoclip.widgets.layers import regions_key
    from napari_cytoclip.widgets.predict_widget import _warm_start

    bundle = load_bundle(tiny_model_dir)
    model, colormap = _warm_start(bundle, "cpu")
    assert model.bundle.path == bundle.path
    ids = np.array([r.id for r in bundle.regions], np.uint16)
    np.testing.assert_allclose(colormap.map(ids), [r.rgba() for r in bundle.regions], atol=1e-6)
    np.testing.assert_allclose(colormap.map(np.array([0], np.uint16))[0, 3], 0.0)  # background transparent

    viewer = make_napari_viewer()
    open_plate(viewer)
    widget = predict_widget(viewer, tiny_model_dir)
    widget._on_warm((str(bundle.path), "cpu"), regions_key(bundle.regions), (model, colormap))
    first = widget.run_blocking()
    assert first.complete and first.labels_layer.colormap is colormap
    old = int(first.labels_layer.data[0, 0])
    first.labels_layer.data[0, 0] = next(r.id for r in first.regions if r.id != old)  # an edit: a new layer next
    second = widget.run_blocking()
    assert second.labels_layer is not first.labels_layer and second.labels_layer.colormap is colormap


def test_closing_the_layer_while_running(make_napari_viewer, qtbot, tiny_model_dir, slow_encoding):
    viewer = make_napari_viewer()
    open_plate(viewer)
    widget = predict_widget(viewer, tiny_model_dir)
    state = widget.run()
    qtbot.waitUntil(lambda: state.done > 0, timeout=20000)
    viewer.layers.remove(state.labels_layer)
    wait_worker(qtbot, widget)
    assert state.status == "cancelled" and state.prediction is None
    assert not any(layer.name.startswith("cytoclip") for layer in viewer.layers)
    assert widget.current is None and widget.run_button.enabled
    assert widget.next_uncertain() is None  # nothing to review, no crash


def test_two_images_do_not_mix(make_napari_viewer, tiny_model_dir):
    from napari_cytoclip.widgets.state import state_of

    viewer = make_napari_viewer()
    image, _ = open_plate(viewer)
    crop = viewer.add_image(np.asarray(image.data)[100:700, 200:900], name="crop", scale=(3.0, 3.0),
                            translate=(5000.0, 0.0))
    widget = predict_widget(viewer, tiny_model_dir)
    widget.image.value = image
    first = widget.run_blocking()
    widget.image.value = crop
    assert widget.pixel_size.value == pytest.approx(3.0)
    second = widget.run_blocking()
    assert first is not second and first.complete and second.complete
    a, b = first.labels_layer, second.labels_layer
    assert a is not b and state_of(a) is first and state_of(b) is second
    assert a.data.shape != b.data.shape
    assert first.section.shape == (953, 1024) and second.section.shape == (600, 700)
    assert second.grid.pixel_size_um == 3.0 and np.allclose(b.translate[0], 5000.0 + 3.0 * second.grid.origin[0])
    np.testing.assert_array_equal(a.data, first.prediction.labels)
    np.testing.assert_array_equal(b.data, second.prediction.labels)
    # the legend follows the active prediction layer
    viewer.layers.selection.active = a
    assert widget.current is first


def test_errors_leave_widget_usable(make_napari_viewer, tiny_model_dir, tmp_path):
    viewer = make_napari_viewer()
    widget = predict_widget(viewer, tiny_model_dir)
    assert widget.run_blocking() is None and widget.status.text().startswith("⚠")  # no image
    image = viewer.add_image(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8), name="raw")
    widget.image.value = image
    assert widget.pixel_size.value == 0.0  # scale 1 and no metadata: unknown
    assert widget.run_blocking() is None and "pixel size" in widget.status.text()
    widget.pixel_size.value = 5.0
    widget.set_model_path(tmp_path / "no-such-model")
    assert widget.model_info.value.startswith("⚠")
    assert widget.run_blocking() is None and "not found" in widget.status.text()
    assert not [layer for layer in viewer.layers if layer.name.startswith("cytoclip")]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cytoclip.json").write_text((tiny_model_dir / "cytoclip.json").read_text())
    (broken / "weights.safetensors").write_bytes(b"not weights")
    widget.set_model_path(broken)
    failed = widget.run_blocking()
    assert failed.status == "failed" and "failed" in widget.status.text().lower()
    assert not [layer for layer in viewer.layers if layer.name.startswith("cytoclip")]  # empty layer removed
    widget.set_model_path(tiny_model_dir)
    state = widget.run_blocking()
    assert state is not None and state.complete and widget.run_button.enabled
    widget._set_current(None)
    assert widget.identify_selection() is None and widget.next_uncertain() is None


def test_shipped_model_finds_prompted_regions(make_napari_viewer, qtbot, shots):
    """With the shipped model, an exact region prompt lights up that region of plate 41."""
    from napari_cytoclip.models.bundle import default_bundle_path
    from napari_cytoclip.io.sample_data import SAMPLE_DIR

    if not (default_bundle_path() / "weights.safetensors").is_file():
        pytest.skip("the shipped model is not installed yet")
    from PIL import Image as PILImage

    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1500, 950)
    image, _ = open_plate(viewer)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Predict regions")
    widget.set_model_path(None)
    widget.image.value = image
    widget.stride.value = 200.0  # a quarter of the tiles: keeps the test short on 2 cores
    t0 = time.perf_counter()
    state = widget.run_blocking()
    print(f"shipped model run: {time.perf_counter() - t0:.1f} s", state.prediction.timings)
    assert state is not None and state.complete, widget.status.text()
    pred = state.prediction
    atlas = np.asarray(PILImage.open(SAMPLE_DIR / "plate_41_labels.png"))
    centres = np.rint(pred.grid.centers(pred.cells)).astype(int)
    truth = atlas[np.clip(centres[:, 0], 0, atlas.shape[0] - 1), np.clip(centres[:, 1], 0, atlas.shape[1] - 1)]
    predicted = pred.labels[pred.cells[:, 0], pred.cells[:, 1]]
    known = (truth > 0) & (truth < 15)
    accuracy = float(np.mean(predicted[known] == truth[known]))
    print(f"shipped model on plate 41: tile accuracy vs atlas {accuracy:.2f}")
    assert accuracy >= 0.5
    screenshot(viewer, qtbot, shots / "shipped_predict.png")
    _dock, query = viewer.window.add_plugin_dock_widget(PLUGIN, "Text query", tabify=True)
    query.prediction.value = state.labels_layer
    truth_grid = np.zeros(pred.grid.shape, np.int64)
    truth_grid[pred.cells[:, 0], pred.cells[:, 1]] = truth
    for rid in (1, 5):  # Isocortex and Striatum: large on plate 41
        region = state.region(rid)
        query.set_text(region.texts()[0])
        sim = query.update_query()
        top = np.argsort(-np.where(np.isfinite(sim), sim, -np.inf).ravel())[:30]
        share = float(np.mean(truth_grid.ravel()[top] == rid))
        print(f"query {region.texts()[0]!r}: {share:.2f} of the 30 best tiles in {region.name}")
        assert share >= 0.6, region.name
    screenshot(viewer, qtbot, shots / "shipped_query.png")


def test_predict_on_a_lazy_pyramid_file(make_napari_viewer, tiny_model_dir, tmp_path):
    """A multiscale (dask) layer from the reader: pixel size from its scale, labels over it."""
    import tifffile

    from napari_cytoclip.io.sample_data import SAMPLE_DIR
    from PIL import Image as PILImage

    base = np.asarray(PILImage.open(SAMPLE_DIR / "plate_41.jpg").convert("L"))
    path = tmp_path / "plate41.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(base, subifds=2, tile=(128, 128),
                  metadata={"axes": "YX", "PhysicalSizeX": 7.17, "PhysicalSizeY": 7.17})
        for k in (1, 2):
            tif.write(base[:: 2 ** k, :: 2 ** k], subfiletype=1, tile=(128, 128))
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin=PLUGIN)
    assert layer.multiscale
    widget = predict_widget(viewer, tiny_model_dir)
    widget.image.value = layer
    assert widget.pixel_size.value == pytest.approx(7.17)
    widget.stride.value = 200.0
    state = widget.run_blocking()
    assert state.complete and len(state.section.levels) == 3
    labels = state.labels_layer
    t = state.grid.layer_transform(tuple(layer.scale), tuple(layer.translate))
    np.testing.assert_allclose(labels.scale, t["scale"])
    assert labels.data.shape == (35, 37)


def test_closing_the_viewer_while_running(make_napari_viewer, qtbot, tiny_model_dir, slow_encoding):
    viewer = make_napari_viewer()
    open_plate(viewer)
    widget = predict_widget(viewer, tiny_model_dir)
    state = widget.run()
    worker = widget.worker
    qtbot.waitUntil(lambda: state.done > 0, timeout=20000)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=20000)
    qtbot.wait(50)
    assert state.status == "cancelled" and state.prediction is None
    del worker, widget


def test_embedding_cache_skips_recomputation(make_napari_viewer, tiny_model_dir, tmp_path, monkeypatch):
    from napari_cytoclip.models.model import CytoClip

    viewer = make_napari_viewer()
    image, _ = open_plate(viewer)
    widget = predict_widget(viewer, tiny_model_dir)
    widget.cache.value = str(tmp_path / "cache")
    widget.stride.value = 200.0
    first = widget.run_blocking()
    assert first.complete and (tmp_path / "cache" / "prediction.json").is_file()

    def no_encoding(self, windows):
        raise AssertionError("the cached embeddings should have been used")

    monkeypatch.setattr(CytoClip, "encode_windows", no_encoding)
    again = widget.run_blocking()
    assert again.complete and again is not first, widget.status.text()
    assert "from the cache" in widget.status.text()
    np.testing.assert_array_equal(again.labels_layer.data, first.prediction.labels)
    np.testing.assert_array_equal(again.prediction.embeddings, first.prediction.embeddings)
    widget.stride.value = 300.0  # another grid: the cache does not match, so it predicts (and fails here)
    failed = widget.run_blocking()
    assert failed.status == "failed" and "cached embeddings should have been used" in widget.status.text()
