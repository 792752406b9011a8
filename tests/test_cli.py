"""The napari-cytoclip command line, end to end on a real Allen plate with a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from helpers import allen_plate, tiny_bundle

from napari_cytoclip.cli import main
from napari_cytoclip.teach.pairs import read_pairs

PLATE = 41
FILES = {"labels.tif", "confidence.tif", "prediction.json", "regions.csv", "annotations.geojson", "cache",
         "labels_fullres.tif", "written-by-napari-cytoclip.json"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bundle = tiny_bundle(root / "tiny")
    plate = allen_plate(PLATE)
    return root, bundle.path, plate


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _predict(capsys, env, out, *extra):
    root, model, plate = env
    return _run(capsys, "predict", plate.image, "--out", out, "--model", model, "--pixel-size", plate.um_per_px,
                "--device", "cpu", "--quiet", *extra)


@pytest.fixture(scope="module")
def predicted(env, tmp_path_factory):
    root, model, plate = env
    out = root / "pred"
    rc = main(["predict", str(plate.image), "--out", str(out), "--model", str(model), "--pixel-size",
               str(plate.um_per_px), "--device", "cpu", "--full-resolution", "--batch-size", "128", "--quiet"])
    assert rc == 0
    return out / str(PLATE)


def test_predict_writes_everything(predicted):
    assert {p.name for p in predicted.iterdir()} == FILES
    summary = json.loads((predicted / "prediction.json").read_text())
    assert summary["pixel_size_um"] == pytest.approx(allen_plate(PLATE).um_per_px)
    assert summary["stride_um"] == pytest.approx(100.0) and summary["tile"]["size_px"] == 32
    assert summary["tile_counts"]["encoded"] > 1000
    assert tifffile.imread(predicted / "labels_fullres.tif").shape == (953, 1024)


def test_predict_again_refuses_with_one_line(env, predicted, capsys):
    rc, out, err = _predict(capsys, env, predicted.parent)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-cytoclip: error: ")
    assert str(predicted) in lines[0] and "already exists" in lines[0] and "--overwrite" in lines[0]
    assert "Traceback" not in err


def test_predict_overwrite_replaces(env, predicted, capsys):
    (predicted / "stale.txt").write_text("old")  # a file it did not write: never deleted (issue 16)
    rc, out, err = _predict(capsys, env, predicted.parent, "--overwrite")
    assert rc == 2 and "stale.txt" in err and (predicted / "stale.txt").read_text() == "old"
    (predicted / "stale.txt").unlink()
    rc, out, err = _predict(capsys, env, predicted.parent, "--overwrite", "--full-resolution", "--batch-size", "256")
    assert rc == 0, err
    assert out.strip() == str(predicted)
    assert {p.name for p in predicted.iterdir()} == FILES
    assert not [p for p in predicted.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_predict_bad_image_path(env, tmp_path, capsys):
    root, model, _ = env
    missing = tmp_path / "nope.tif"
    rc, out, err = _run(capsys, "predict", missing, "--out", tmp_path / "o", "--model", model, "--quiet")
    assert rc == 2
    assert err.strip() == f"napari-cytoclip: error: {missing}: no such file"
    assert not (tmp_path / "o").exists()


def test_predict_errors_are_one_line(env, tmp_path, capsys):
    root, model, plate = env
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    rc, _, err = _run(capsys, "predict", tmp_path / "broken.tif", "--out", tmp_path / "o", "--model", model,
                      "--pixel-size", "7", "--quiet")
    assert rc == 2 and "broken.tif" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, "predict", plate.image, "--out", tmp_path / "o", "--model", tmp_path / "nomodel")
    assert rc == 2 and "nomodel" in err and "not found" in err
    # the JPEG states no pixel size: the user is told to give one
    rc, _, err = _run(capsys, "predict", plate.image, "--out", tmp_path / "o", "--model", model, "--quiet")
    assert rc == 2 and "pixel size" in err and "error:" in err.splitlines()[-1]


def test_export_pairs_with_prediction_then_train(env, predicted, tmp_path, capsys):
    root, model, plate = env
    labels = tifffile.imread(predicted / "labels.tif")
    edited = labels.copy()
    rows, cols = np.nonzero(labels)
    edited[rows[:10], cols[:10]] = np.where(labels[rows[:10], cols[:10]] == 3, 5, 3)
    corrected = tmp_path / "corrected.tif"
    tifffile.imwrite(corrected, edited)
    out = tmp_path / "export"
    rc, stdout, err = _run(capsys, "export-pairs", plate.image, corrected, "--out", out, "--prediction", predicted,
                           "--model", model)
    assert rc == 0, err
    assert "10 pairs added" in stdout
    files, captions, records = read_pairs(out / "pairs")
    assert len(files) == 10 and {r["region_id"] for r in records} <= {3, 5}
    assert {p.name for p in out.iterdir()} >= {"pairs", "labels.tif", "annotations.geojson", "regions.csv"}
    rc, stdout, err = _run(capsys, "export-pairs", plate.image, corrected, "--out", out, "--prediction", predicted,
                           "--model", model)
    assert rc == 0 and "0 pairs added, 10 already there" in stdout
    # a full-resolution label image (the image's size) is reduced to the grid
    full = tifffile.imread(predicted / "labels_fullres.tif")
    full[full == 1] = 12
    tifffile.imwrite(tmp_path / "full.tif", full)
    rc, stdout, err = _run(capsys, "export-pairs", plate.image, tmp_path / "full.tif", "--out", tmp_path / "e2",
                           "--prediction", predicted, "--model", model)
    assert rc == 0, err
    assert int((labels == 1).sum()) == len(read_pairs(tmp_path / "e2" / "pairs")[0])
    # the corrections train a model
    rc, stdout, err = _run(capsys, "train", out / "pairs", "--out", tmp_path / "tuned", "--init", model,
                           "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--quiet")
    assert rc == 0, err
    assert (tmp_path / "tuned" / "cytoclip.json").is_file()


def test_export_pairs_refuses_mismatched_prediction(env, predicted, tmp_path, capsys):
    root, model, plate = env
    rc, _, err = _run(capsys, "export-pairs", plate.image, predicted / "labels.tif", "--out", tmp_path / "e",
                      "--prediction", predicted, "--model", model, "--pixel-size", "9.0")
    assert rc == 2 and "grid" in err and str(predicted) in err
    other = allen_plate(42)
    rc, _, err = _run(capsys, "export-pairs", other.image, predicted / "labels.tif", "--out", tmp_path / "e",
                      "--prediction", predicted, "--model", model)
    assert rc == 2 and "error:" in err
    rc, _, err = _run(capsys, "export-pairs", plate.image, plate.labels, "--out", tmp_path / "e",
                      "--prediction", predicted, "--model", model)
    assert rc == 2 and "[15]" in err and "vocabulary" in err  # 'root-only' is no region of the model


def test_export_pairs_predicts_without_prediction(env, tmp_path, capsys):
    root, model, plate = env
    rc, _, err = _run(capsys, "export-pairs", plate.image, tmp_path / "missing.tif", "--out", tmp_path / "e",
                      "--model", model, "--pixel-size", plate.um_per_px, "--device", "cpu", "--quiet")
    assert rc == 2 and "missing.tif" in err and "not found" in err


def test_evaluate_cli(env, tmp_path, capsys):
    root, model, plate = env
    rc, stdout, err = _run(capsys, "evaluate", "--model", model, "--images", plate.image, "--labels", plate.labels,
                           "--pixel-size", plate.um_per_px, "--out", tmp_path / "rep", "--device", "cpu", "--quiet")
    assert rc == 0, err
    assert 0.0 <= json.loads(stdout)["macro_f1"] <= 1.0
    assert (tmp_path / "rep" / "report.json").is_file()
    rc, _, err = _run(capsys, "evaluate", "--model", model, "--images", plate.image, "--labels", plate.labels,
                      "--pixel-size", plate.um_per_px, "--out", tmp_path / "rep", "--device", "cpu", "--quiet")
    assert rc == 2 and str(tmp_path / "rep") in err and "already exists" in err
    rc, _, err = _run(capsys, "evaluate", "--model", model, "--out", tmp_path / "rep2")
    assert rc == 2 and "--allen-split" in err
