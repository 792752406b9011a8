"""Reliability catalogue, widgets: bad input gives a napari notification and the widget stays usable.

What tests/test_widgets.py already covers is not repeated (cancel and rerun of a prediction, closing
the layer or the viewer during a prediction, two images one after the other, the basic error
path). Added here: the bad-input catalogue with its notifications, two predictions running at the
same time on two layers, cancelling an export and a fine-tune, closing the viewer while a
fine-tune or an export runs, closing the regions layer during an export, and a stack layer (the
viewer's current plane is predicted). The images are small synthetic sections, so each run takes a
fraction of a second.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PX = 5.0


def tissue(h: int = 240, w: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 230, np.uint8)
    img[h // 5: h - h // 5, w // 5: w - w // 5] = rng.integers(20, 120, (h - 2 * (h // 5), w - 2 * (w // 5)))
    return img


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("models") / "tiny").path


_LOADED: dict = {}


@pytest.fixture
def shared_models(monkeypatch, tiny_dir):
    """Widgets loading the tiny model get one shared instance (its prompt embeddings computed once)."""
    import napari_cytoclip.models.model as model_mod

    real = model_mod.load_model

    def load(bundle=None, device="auto", precision="auto"):
        path = getattr(bundle, "path", bundle)
        if path is not None and Path(path) == tiny_dir:
            key = (str(tiny_dir), device)
            if key not in _LOADED:
                _LOADED[key] = real(bundle, device=device, precision="fp32")
            return _LOADED[key]
        return real(bundle, device=device, precision=precision)

    monkeypatch.setattr(model_mod, "load_model", load)


@pytest.fixture
def notes(monkeypatch):
    """Every napari notification the widgets show: ``[(level, text)]``."""
    import napari.utils.notifications as notifications

    seen: list[tuple[str, str]] = []
    for level in ("error", "warning", "info"):
        real = getattr(notifications, f"show_{level}")

        def record(message, *args, _level=level, _real=real, **kwargs):
            seen.append((_level, str(message)))
            return _real(message, *args, **kwargs)

        monkeypatch.setattr(notifications, f"show_{level}", record)
    return seen


@pytest.fixture
def viewer_model():
    """napari's viewer model without its Qt window: the widgets need only its layers and events, and a
    case then costs a fraction of a second instead of a window's creation and teardown."""
    from napari.components import ViewerModel

    return ViewerModel()


_QTBOT: list = []


@pytest.fixture(autouse=True)
def _remember_qtbot(qtbot):
    """Widgets of a window-less viewer are handed to qtbot, which closes them after the test."""
    _QTBOT.append(qtbot)
    yield
    _QTBOT.remove(qtbot)


def dock(viewer, widget, name: str) -> None:
    if hasattr(viewer, "window"):
        viewer.window.add_dock_widget(widget, name=name)
    else:
        _QTBOT[-1].addWidget(widget)


def predict_widget(viewer, model_dir, name="Predict regions"):
    from napari_cytoclip.widgets import PredictWidget

    widget = PredictWidget(viewer)
    dock(viewer, widget, name)
    widget.set_model_path(model_dir)
    widget.device.value = "cpu"
    return widget


def cytoclip_layers(viewer) -> list:
    return [layer for layer in viewer.layers if layer.name.startswith("cytoclip")]


def wait_worker(qtbot, widget, timeout=30000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


# ------------------------------------------------------------------------------------------ bad input catalogue
def _copy_bundle(tiny_dir: Path, tmp: Path) -> Path:
    folder = tmp / "bundle"
    shutil.copytree(tiny_dir, folder)
    return folder


def _missing_model(viewer, widget, tiny_dir, tmp):
    widget.set_model_path(tmp / "no-such-model")
    return "model"


def _malformed_json(viewer, widget, tiny_dir, tmp):
    folder = _copy_bundle(tiny_dir, tmp)
    (folder / "cytoclip.json").write_text((folder / "cytoclip.json").read_text()[:100])
    widget.set_model_path(folder)
    return "model"


def _corrupt_weights(viewer, widget, tiny_dir, tmp):
    folder = _copy_bundle(tiny_dir, tmp)
    (folder / "weights.safetensors").write_bytes(b"\0" * 4096)
    widget.set_model_path(folder)
    return "model"


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_weights(viewer, widget, tiny_dir, tmp):
    import torch

    folder = _copy_bundle(tiny_dir, tmp)
    torch.save({"payload": Payload(tmp / "PWNED")}, folder / "weights.safetensors")
    widget.set_model_path(folder)
    return "model"


def _image(data, **kwargs):
    def setup(viewer, widget, tiny_dir, tmp):
        widget.image.value = viewer.add_image(data, name="bad", **kwargs)
        return "image"
    return setup


def _pixel_size(value):
    def setup(viewer, widget, tiny_dir, tmp):
        widget.pixel_size.value = value
        return "pixel"
    return setup


def _layer_scale(value):
    def setup(viewer, widget, tiny_dir, tmp):
        widget.image.value = viewer.add_image(tissue(), name="scaled", scale=(value, value))
        return "image"
    return setup


WIDGET_CASES = {
    # id: (setup, notification level, regex, xfail)
    "pixel_size_unknown": (_image(tissue()), "error", r"pixel size", None),
    "pixel_size_implausible": (_pixel_size(800.0), "warning", r"outside the usual", None),
    "pixel_size_beyond_the_spin_box": (_layer_scale(20000.0), "error", r"20000|absurd|pixel size", None),
    "model_folder_missing": (_missing_model, "error", r"not found", None),
    "model_json_malformed": (_malformed_json, "error", r"malformed JSON", None),
    "model_weights_corrupt": (_corrupt_weights, "error", r"cannot read the weights", None),
    "model_weights_pickled": (_pickled_weights, "error", r"cannot read the weights", None),
    "image_all_nan": (_image(np.full((240, 300), np.nan, np.float32), scale=(PX, PX)), "error", r"NaN", None),
    "image_bool": (_image(tissue() < 128, scale=(PX, PX)), "error", r"pixel type", None),
    "image_stack_of_5_planes": (_image(np.stack([tissue(seed=k) for k in range(5)]), scale=(1, PX, PX)), "none",
                                r"", None),
}


@pytest.mark.parametrize("case", [pytest.param(k, marks=[pytest.mark.xfail(strict=True, reason=v[3])] if v[3] else [])
                                  for k, v in WIDGET_CASES.items()])
@pytest.mark.filterwarnings("ignore::napari_cytoclip.io.sections.PixelSizeWarning")  # shown as a notification
def test_widget_bad_input_catalogue(case, viewer_model, qtbot, tiny_dir, tmp_path, notes, shared_models):
    """Each bad input: a notification naming the problem, no leftover layer, and the next good run works."""
    setup, level, pattern, _ = WIDGET_CASES[case]
    viewer = viewer_model
    good = viewer.add_image(tissue(120, 150), name="good", scale=(PX, PX))
    widget = predict_widget(viewer, tiny_dir)
    widget.image.value = good
    if case == "pixel_size_implausible":
        widget.stride.value = 60000.0  # 800 um pixels: a 3 x 4 grid of 60 mm cells
    with qtbot.capture_exceptions() as raised:  # choosing an input must never raise in the event loop
        kind = setup(viewer, widget, tiny_dir, tmp_path)
    assert not raised, [str(exc[1]) for exc in raised]
    if case == "pixel_size_beyond_the_spin_box":  # shown as it is, not clamped to the spin box's maximum
        assert widget.pixel_size.value == 20000.0
    notes.clear()
    state = widget.run_blocking()
    assert not (tmp_path / "PWNED").exists()
    if level == "none":  # the input is fine: the prediction must complete
        assert state is not None and state.complete, widget.status.text()
        return
    shown = [text for lvl, text in notes if lvl == level]
    assert shown and re.search(pattern, shown[0]), notes
    if level == "warning":  # a doubt, not a refusal: the run goes ahead
        assert state is not None and state.complete, widget.status.text()
        return
    assert state is None or state.status == "failed"
    assert widget.status.text().startswith("⚠")
    assert widget.run_button.enabled and not widget.cancel_button.enabled and widget.worker is None
    assert not cytoclip_layers(viewer)
    # fix what was wrong: the same widget predicts
    if kind == "model":
        widget.set_model_path(tiny_dir)
    widget.image.value = good
    widget.pixel_size.value = PX
    state = widget.run_blocking()
    assert state is not None and state.complete, widget.status.text()
    assert len(cytoclip_layers(viewer)) >= 1


# ------------------------------------------------------------------------------------------ two at once
def test_two_predictions_at_once_do_not_mix(viewer_model, qtbot, tiny_dir, notes, monkeypatch):
    """Two Predict widgets run at the same time on two images; each layer gets exactly its own result."""
    from napari_cytoclip.models.model import CytoClip, load_model
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import section_from_array
    from napari_cytoclip.widgets.state import state_of

    real = CytoClip.encode_windows

    def slowed(self, windows):
        time.sleep(0.08)
        return real(self, windows)

    monkeypatch.setattr(CytoClip, "encode_windows", slowed)
    monkeypatch.setattr("napari_cytoclip.widgets.predict_widget.BATCH_SIZE", 8)
    viewer = viewer_model
    data_a, data_b = tissue(), np.ascontiguousarray(tissue(200, 260, seed=1)[:, ::-1])
    image_a = viewer.add_image(data_a, name="A", scale=(PX, PX))
    image_b = viewer.add_image(data_b, name="B", scale=(4.0, 4.0), translate=(0.0, 3000.0))
    first, second = predict_widget(viewer, tiny_dir, "Predict 1"), predict_widget(viewer, tiny_dir, "Predict 2")
    first.image.value, second.image.value = image_a, image_b
    state_a, state_b = first.run(), second.run()
    assert state_a is not None and state_b is not None
    notes.clear()
    assert first.run() is None  # one run per widget at a time: refused with a warning, the run goes on
    assert any(level == "warning" and "already running" in text for level, text in notes), notes
    overlap = []
    qtbot.waitUntil(lambda: overlap.append(first.worker is not None and second.worker is not None
                                           and (state_a.done > 0 or state_b.done > 0)) or any(overlap)
                    or (first.worker is None and second.worker is None), timeout=30000)
    wait_worker(qtbot, first)
    wait_worker(qtbot, second)
    assert any(overlap), "the two runs did not overlap"
    assert state_a.complete and state_b.complete, (first.status.text(), second.status.text())

    model = load_model(tiny_dir, device="cpu", precision="fp32")
    for state, data, px, image in ((state_a, data_a, PX, image_a), (state_b, data_b, 4.0, image_b)):
        expected = predict_section(section_from_array(data, px), model, batch_size=8)
        layer = state.labels_layer
        assert layer.name == f"cytoclip regions ({image.name})" and state_of(layer) is state
        assert state.section.shape == data.shape and state.grid == expected.grid
        np.testing.assert_array_equal(state.prediction.labels, expected.labels)
        np.testing.assert_array_equal(layer.data, expected.labels)
        t = expected.grid.layer_transform(tuple(image.scale), tuple(image.translate))
        np.testing.assert_allclose(layer.scale, t["scale"])
        np.testing.assert_allclose(layer.translate, t["translate"])
    assert state_a.labels_layer is not state_b.labels_layer


# ------------------------------------------------------------------------------------------ export and fine-tune
@pytest.fixture
def slow_training(monkeypatch):
    """Each fine-tuning step takes at least 0.1 s, so a run can be caught in the middle."""
    import napari_cytoclip.teach.train as train_mod

    real = train_mod.augment

    def slowed(x, generator):
        time.sleep(0.1)
        return real(x, generator)

    monkeypatch.setattr(train_mod, "augment", slowed)


def predicted_and_exported(viewer, tiny_dir, out: Path, n_corrected: int = 20):
    """A completed prediction, some painted corrections, one export done; the Export widget."""
    from napari_cytoclip.widgets import ExportWidget

    image = viewer.add_image(tissue(), name="section", scale=(PX, PX))
    widget = predict_widget(viewer, tiny_dir)
    widget.image.value = image
    state = widget.run_blocking()
    assert state is not None and state.complete, widget.status.text()
    labels = state.labels_layer
    for r, c in state.prediction.cells[:n_corrected]:
        labels.data[r, c] = 13 if labels.data[r, c] != 13 else 1
    labels.refresh()
    export = ExportWidget(viewer)
    dock(viewer, export, "Export annotations")
    export.layer.value = labels
    export.folder.value = str(out)
    first = export.export(blocking=True)
    assert first is not None and first.pairs_added == n_corrected, export.result.text()
    return viewer, widget, export, state


def test_export_can_be_cancelled_and_rerun(viewer_model, qtbot, tiny_dir, tmp_path, monkeypatch, shared_models):
    from napari_cytoclip.teach.pairs import read_pairs

    out = tmp_path / "export"
    viewer, widget, export, state = predicted_and_exported(viewer_model, tiny_dir, out)
    before = sorted(read_pairs(out / "pairs")[0])
    labels = state.labels_layer
    for r, c in state.prediction.cells[20:60]:
        labels.data[r, c] = 12 if labels.data[r, c] != 12 else 2
    labels.refresh()
    import napari_cytoclip.teach.pairs as pairs_mod

    real = pairs_mod.encode_png
    monkeypatch.setattr(pairs_mod, "encode_png", lambda image: (time.sleep(0.05), real(image))[1])
    worker = export.export()
    assert worker is not None
    qtbot.waitUntil(lambda: len(list((out / "pairs" / "tiles").iterdir())) > len(before) + 2, timeout=20000)
    assert export.cancel_button.enabled
    export.cancel()
    wait_worker(qtbot, export)
    assert "cancel" in export.result.text().lower()
    assert sorted(read_pairs(out / "pairs")[0]) == before  # the earlier export, untouched
    again = export.export(blocking=True)
    assert again is not None and again.pairs_added + again.pairs_existing >= 40


def give_replay(export, folder: Path, regions, n: int = 8) -> None:
    """Write a small replay pair folder (32-px windows of regions 3 and 4) and choose it in the Export widget."""
    from napari_cytoclip.teach.export import caption_for
    from napari_cytoclip.teach.pairs import Pair, write_pairs

    rng = np.random.default_rng(0)
    by_id = {r.id: r for r in regions}
    write_pairs(folder, [Pair(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), caption_for(by_id[rid]),
                              {"corrected_label": rid, "region_name": by_id[rid].name})
                         for rid in (3, 4) for _ in range(n)])
    export.replay.value = str(folder)


def test_finetune_cancel_then_rerun_clean(make_napari_viewer, qtbot, tiny_dir, tmp_path, monkeypatch,
                                          shared_models, notes, slow_training):
    monkeypatch.setattr("napari_cytoclip.widgets.export_widget.MIN_STEPS_PER_EPOCH", 3)
    out = tmp_path / "export"
    viewer, widget, export, state = predicted_and_exported(make_napari_viewer(), tiny_dir, out)
    give_replay(export, tmp_path / "replay", state.bundle.regions)
    target = out / "models" / "tiny-cytoclip-finetuned-1"
    export.epochs.value = 3
    worker = export.finetune()
    assert worker is not None and export.cancel_button.enabled and not export.export_button.enabled
    qtbot.waitUntil(lambda: export.progress.value >= 1, timeout=30000)
    export.cancel()
    wait_worker(qtbot, export, timeout=60000)
    assert "cancelled" in export.train_status.text() and export.last_bundle is None
    assert not target.exists() and not target.with_name(target.name + ".ckpt").exists()
    assert widget.model_folder() == tiny_dir  # the Predict widget still uses the old model
    assert export.finetune_button.enabled and not export.cancel_button.enabled
    assert not [text for level, text in notes if level == "error"], notes
    # a new fine-tune starts clean: same folder name, nothing left over from the cancelled one
    export.epochs.value = 1
    monkeypatch.setattr("napari_cytoclip.widgets.export_widget.MIN_STEPS_PER_EPOCH", 40)  # enough to beat
    monkeypatch.setattr("napari_cytoclip.widgets.export_widget.FINETUNE_LR", 1e-3)  # the start model on the
    bundle = export.finetune(blocking=True)                                          # held-back corrections
    assert bundle is not None, export.train_status.text()
    assert bundle.path == target and (target / "weights.safetensors").is_file()
    assert [h["epoch"] for h in bundle.provenance["history"]] == [1]
    assert widget.model_folder() == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no candidate, no checkpoint


def test_finetune_that_is_not_better_is_discarded(make_napari_viewer, qtbot, tiny_dir, tmp_path, monkeypatch,
                                                  shared_models, notes):
    """A candidate no better than the start model on held-back corrections is deleted; Predict keeps its model."""
    monkeypatch.setattr("napari_cytoclip.widgets.export_widget.MIN_STEPS_PER_EPOCH", 2)
    monkeypatch.setattr("napari_cytoclip.widgets.export_widget.FINETUNE_LR", 1e-12)  # the candidate = the start
    out = tmp_path / "export"
    viewer, widget, export, state = predicted_and_exported(make_napari_viewer(), tiny_dir, out)
    (out / "models").mkdir()
    (out / "models" / "notes.txt").write_text("the user's")
    export.epochs.value = 1
    assert export.finetune(blocking=True) is None  # no replay pairs: refused
    assert "Save taught model" in export.train_status.text() and export.last_outcome is None
    give_replay(export, tmp_path / "replay", state.bundle.regions)
    worker = export.finetune()
    assert worker is not None
    wait_worker(qtbot, export, timeout=60000)
    outcome = export.last_outcome
    assert outcome is not None and not outcome.shipped and export.last_bundle is None, export.train_status.text()
    assert outcome.candidate.macro_f1 <= outcome.start.macro_f1
    text = export.train_status.text()
    assert "not better" in text and str(outcome.start) in text and str(outcome.candidate) in text
    assert sorted(p.name for p in (out / "models").iterdir()) == ["notes.txt"]  # only the user's file is left
    assert widget.model_folder() == tiny_dir and state.finetuned_bundle is None
    assert export.finetune_button.enabled and not export.cancel_button.enabled


def test_closing_the_viewer_while_finetuning(make_napari_viewer, qtbot, tiny_dir, tmp_path, monkeypatch,
                                             shared_models, slow_training):
    """The viewer closes under a running fine-tune: nothing raises in the Qt event loop, nothing is left half-done."""
    import threading

    from napari_cytoclip.models.bundle import load_bundle

    monkeypatch.setattr("napari_cytoclip.widgets.export_widget.MIN_STEPS_PER_EPOCH", 3)
    out = tmp_path / "export"
    viewer, widget, export, state = predicted_and_exported(make_napari_viewer(), tiny_dir, out, n_corrected=8)
    give_replay(export, tmp_path / "replay", state.bundle.regions)
    export.epochs.value = 2
    worker = export.finetune()
    qtbot.waitUntil(lambda: export.progress.value >= 1, timeout=30000)
    viewer.close()
    qtbot.waitUntil(lambda: not worker.is_running, timeout=60000)
    qtbot.wait(100)  # let queued signals (returned, finished) reach the deleted widgets
    # the training thread itself runs on to the end (see the report); once it ends, what it left is whole
    qtbot.waitUntil(lambda: not any(t.name == "cytoclip-finetune" for t in threading.enumerate()), timeout=60000)
    left = sorted(p.name for p in (out / "models").iterdir())
    assert not [name for name in left if name.startswith(".") or name.endswith(".ckpt")], left
    for name in left:
        load_bundle(out / "models" / name)


def _slow_export(monkeypatch, delay: float = 0.05) -> None:
    """Each exported tile takes at least ``delay`` s, so an export can be caught in the middle."""
    import napari_cytoclip.teach.pairs as pairs_mod

    real = pairs_mod.encode_png
    monkeypatch.setattr(pairs_mod, "encode_png", lambda image: (time.sleep(delay), real(image))[1])


def _repaint(state, cells, label: int, other: int) -> None:
    labels = state.labels_layer
    for r, c in cells:
        labels.data[r, c] = label if labels.data[r, c] != label else other
    labels.refresh()


def _pair_folder_whole(folder: Path) -> int:
    """Every listed pair's tile exists and is listed once; returns how many pairs there are."""
    from napari_cytoclip.teach.pairs import read_pairs

    files, captions, records = read_pairs(folder)
    assert all(f.is_file() for f in files) and len(set(files)) == len(files)
    assert len(records) == len(files) and all(r.get("filepath") for r in records)
    assert not [p.name for p in folder.rglob("*") if p.name.startswith(".")]  # no temp file left
    return len(files)


def test_closing_the_regions_layer_during_an_export(viewer_model, qtbot, tiny_dir, tmp_path, monkeypatch,
                                                    shared_models, notes):
    """The export works on a copy of the layer: it finishes; the widget then has no layer to export."""
    out = tmp_path / "export"
    viewer, widget, export, state = predicted_and_exported(viewer_model, tiny_dir, out)
    before = _pair_folder_whole(out / "pairs")
    _repaint(state, state.prediction.cells[20:40], 12, 2)
    _slow_export(monkeypatch)
    with qtbot.capture_exceptions() as raised:
        worker = export.export()
        assert worker is not None and export.cancel_button.enabled and not export.export_button.enabled
        qtbot.waitUntil(lambda: len(list((out / "pairs" / "tiles").iterdir())) > before + 2, timeout=20000)
        viewer.layers.remove(state.labels_layer)
        wait_worker(qtbot, export)
    assert not raised, [str(exc[1]) for exc in raised]
    assert export.result.text().startswith("Exported") and _pair_folder_whole(out / "pairs") == before + 20
    assert export.layer.value is None and export.export_button.enabled and not export.cancel_button.enabled
    notes.clear()
    assert export.export(blocking=True) is None
    assert any(level == "error" and "regions layer" in text for level, text in notes), notes


def test_closing_the_viewer_during_an_export(make_napari_viewer, qtbot, tiny_dir, tmp_path, monkeypatch,
                                            shared_models):
    """The viewer closes under a running export: nothing raises in the event loop; the pair folder stays whole."""
    out = tmp_path / "export"
    viewer, widget, export, state = predicted_and_exported(make_napari_viewer(), tiny_dir, out)
    before = _pair_folder_whole(out / "pairs")
    _repaint(state, state.prediction.cells[20:50], 12, 2)
    _slow_export(monkeypatch)
    with qtbot.capture_exceptions() as raised:
        worker = export.export()
        qtbot.waitUntil(lambda: len(list((out / "pairs" / "tiles").iterdir())) > before + 2, timeout=20000)
        viewer.close()
        qtbot.waitUntil(lambda: not worker.is_running, timeout=30000)
        qtbot.wait(100)  # let queued signals (returned, finished) reach the deleted widgets
    assert not raised, [str(exc[1]) for exc in raised]
    assert _pair_folder_whole(out / "pairs") in (before, before + 30)  # all of the export or none of it


def test_stack_layer_predicts_the_plane_the_viewer_shows(viewer_model, qtbot, tiny_dir, shared_models, notes):
    """A stack is predicted one plane at a time: the viewer's current slice; another slice, another layer."""
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import section_from_array

    viewer = viewer_model
    planes = [tissue(seed=k) for k in range(3)]
    planes[2] = np.ascontiguousarray(planes[2][::-1, ::-1])
    stack = viewer.add_image(np.stack(planes), name="stack", scale=(1.0, PX, PX))
    widget = predict_widget(viewer, tiny_dir)
    widget.image.value = stack
    viewer.dims.set_current_step(0, 0)
    assert not widget.plane.native.isHidden() and widget.plane.value.startswith("plane 0 of 3"), widget.plane.value
    viewer.dims.set_current_step(0, 2)
    assert widget.plane.value.startswith("plane 2 of 3"), widget.plane.value
    assert widget.pixel_size.value == PX

    model = load_model(tiny_dir, device="cpu", precision="fp32")
    results = {}
    for k in (2, 0):
        viewer.dims.set_current_step(0, k)
        state = widget.run_blocking()
        assert state is not None and state.complete, widget.status.text()
        expected = predict_section(section_from_array(planes[k], PX), model)
        np.testing.assert_array_equal(state.labels_layer.data, expected.labels)
        assert state.labels_layer.name == f"cytoclip regions (stack [plane {k}])"
        assert state.section.source.endswith(f"[plane {k}]")
        np.testing.assert_array_equal(np.asarray(state.section.levels[0]), planes[k])  # that plane's pixels
        results[k] = state
    assert results[0].labels_layer is not results[2].labels_layer and len(cytoclip_layers(viewer)) == 4
    assert not [text for level, text in notes if level in ("error", "warning")], notes
    # a plain 2D image has no plane to choose
    widget.image.value = viewer.add_image(tissue(), name="flat", scale=(PX, PX))
    assert widget.plane.native.isHidden()
