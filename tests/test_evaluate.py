"""Evaluation on real Allen test plates with a tiny random model: report structure and sanity."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers import allen_plate, allen_plates, tiny_bundle

from napari_cytoclip.errors import CytoclipError, OutputError
from napari_cytoclip.teach.evaluate import evaluate, evaluate_allen_split, pixel_confusion
from napari_cytoclip.inference.grid import TileGrid
from napari_cytoclip.outputs.prediction_folder import upsample_rows
from napari_cytoclip.models.vocabularies import ALLEN_PARAPHRASES

TEST_PLATES = (40, 45)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from napari_cytoclip.models.model import load_model

    return load_model(tiny_bundle(tmp_path_factory.mktemp("model") / "tiny"), device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def report(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    plates = [allen_plate(n) for n in TEST_PLATES]
    calls = []
    rep = evaluate(model, [p.image for p in plates], [p.labels for p in plates], out,
                   pixel_sizes=[p.um_per_px for p in plates], queries=ALLEN_PARAPHRASES,
                   progress=lambda d, t, name: calls.append((d, t, name)))
    return out, rep, calls, plates


def test_report_files_and_keys(report):
    out, rep, calls, plates = report
    assert {p.name for p in out.iterdir()} == {"report.json", "confusion.png", "f1_per_region.png",
                                               "written-by-napari-cytoclip.json"}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["macro_f1"] == pytest.approx(rep["macro_f1"])
    assert 0.0 <= rep["macro_f1"] <= 1.0 and 0.0 <= rep["accuracy"] <= 1.0
    assert rep["n_images"] == 2 and len(rep["images"]) == 2
    assert set(rep["class_ids"]) <= set(range(1, 15)) and len(rep["class_ids"]) >= 8
    for rid in rep["class_ids"]:
        entry = rep["per_region"][str(rid)]
        assert {"name", "precision", "recall", "f1", "support"} <= set(entry)
        assert 0.0 <= entry["f1"] <= 1.0
    assert np.mean([rep["per_region"][str(r)]["f1"] for r in rep["class_ids"]]) == pytest.approx(rep["macro_f1"])
    cm = np.array(rep["confusion"]["matrix"])
    assert cm.sum() == rep["pixels_scored"] == sum(i["pixels_scored"] for i in rep["images"])
    assert cm[0].sum() == 0 and cm[15].sum() == 0  # ignored truth labels are never scored
    assert np.trace(cm) / cm.sum() == pytest.approx(rep["accuracy"])
    assert Image.open(out / "confusion.png").size[0] > 100


def test_scored_pixels_are_the_labelled_brain(report):
    out, rep, calls, plates = report
    for item, plate in zip(rep["images"], plates):
        truth = plate.label_map()
        assert item["pixels_scored"] == int((~np.isin(truth, (0, 15))).sum())


def test_retrieval(report):
    out, rep, calls, plates = report
    ret = rep["retrieval"]
    assert ret["n_tiles"] > 1000
    assert ret["per_region"]
    for entry in ret["per_region"].values():
        for key in ("precision_at_10", "precision_at_50", "precision_at_100", "top_fraction_precision", "chance"):
            assert 0.0 <= entry[key] <= 1.0
    texts = {q["text"] for q in ret["queries"]}
    assert "motor and somatosensory territory" in texts and "vermis and paraflocculus" not in texts  # no CB here
    assert all(0.0 <= q["top_fraction_precision"] <= 1.0 for q in ret["queries"])


def test_progress_reaches_the_end(report):
    out, rep, calls, plates = report
    names = [c[2] for c in calls]
    assert set(names) == {p.image.name for p in plates}
    last = [c for c in calls if c[2] == plates[0].image.name][-1]
    assert last[0] == last[1] == rep["images"][0]["encoded_tiles"]


def test_refuses_to_overwrite_report(model, report):
    out, rep, calls, plates = report
    before = (out / "report.json").read_text()
    with pytest.raises(OutputError, match="report: already exists .use --overwrite"):
        evaluate(model, [plates[0].image], [plates[0].labels], out, pixel_sizes=[plates[0].um_per_px])
    assert (out / "report.json").read_text() == before


def test_allen_split_and_overwrite(model, tmp_path):
    allen_plates()  # skips without the real data
    out = tmp_path / "rep"
    rep = evaluate_allen_split(model, "test", out=out, plate_numbers=[40])
    assert rep["allen_split"] == "test" and rep["plates"] == [40]
    assert rep["images"][0]["pixel_size_um"] == pytest.approx(allen_plate(40).um_per_px)
    assert any(q["text"] == "motor and somatosensory territory" for q in rep["retrieval"]["queries"])
    rep2 = evaluate_allen_split(model, "test", out=out, plate_numbers=[40], overwrite=True, stride_um=200)
    assert rep2["stride_um"] == 200 and rep2["images"][0]["grid_shape"][0] < rep["images"][0]["grid_shape"][0]
    with pytest.raises(CytoclipError, match="no Allen plates"):
        evaluate_allen_split(model, "test", out=tmp_path / "x", plate_numbers=[41])


def test_input_errors(model, tmp_path):
    plate = allen_plate(40)
    with pytest.raises(ValueError, match="one label image per image"):
        evaluate(model, [plate.image], [], tmp_path / "r")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    with pytest.raises(CytoclipError, match="small.png.*10x10"):
        evaluate(model, [plate.image], [small], tmp_path / "r", pixel_sizes=[plate.um_per_px])
    odd = tmp_path / "odd.png"
    truth = plate.label_map().copy()
    truth[:5, :5] = 99
    Image.fromarray(truth).save(odd)
    with pytest.raises(CytoclipError, match=r"\[99\]"):
        evaluate(model, [plate.image], [odd], tmp_path / "r", pixel_sizes=[plate.um_per_px])
    with pytest.raises(CytoclipError, match="pixel size"):
        evaluate(model, [plate.image], [plate.labels], tmp_path / "r")  # the JPEG states none
    assert not (tmp_path / "r" / "report.json").exists()


def test_pixel_confusion_paints_cells_by_nearest_centre():
    grid = TileGrid.covering((95, 130), 5.0, 50.0)
    rng = np.random.default_rng(1)
    labels = rng.integers(1, 5, grid.shape).astype(np.uint16)
    truth = upsample_rows(labels, grid, 0, 95, 130).astype(np.uint8)
    # pixel (y, x) belongs to cell round((y - origin_y) / step)
    y, x = 37, 88
    r = int(np.floor((y - grid.origin[0]) / grid.step + 0.5))
    c = int(np.floor((x - grid.origin[1]) / grid.step + 0.5))
    assert truth[y, x] == labels[r, c]
    truth[:10] = 0  # ignored
    cm = pixel_confusion(truth, labels, grid, 6, ignore=(0,))
    assert cm.sum() == 85 * 130 and np.trace(cm) == cm.sum()
    shifted = np.roll(labels, 1, axis=1)
    cm2 = pixel_confusion(truth, shifted, grid, 6, ignore=(0,))
    assert np.trace(cm2) < cm2.sum()
