"""Embedding cache, prediction results folders and correction exports on a real Allen plate."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from helpers import cropped_plate_section, tiny_bundle

from napari_cytoclip.inference import cache as cache_mod
from napari_cytoclip.inference.cache import expected_signature, load_prediction, save_prediction
from napari_cytoclip.errors import CacheMismatch, CytoclipError, OutputError
from napari_cytoclip.teach.export import export_corrections, labels_on_grid, read_label_grid
from napari_cytoclip.inference.grid import TileGrid
from napari_cytoclip.outputs.prediction_folder import read_grid_metadata, upsample_rows, write_prediction_folder
from napari_cytoclip.teach.pairs import read_pairs

PLATE = 41  # a training plate
BOX = (250, 700, 250, 800)  # crop (y0, y1, x0, x1) of the plate, for speed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.inference.predict import predict_section

    bundle = tiny_bundle(tmp_path_factory.mktemp("model") / "tiny")
    model = load_model(bundle, device="cpu", precision="fp32")
    section, truth = cropped_plate_section(PLATE, BOX)
    prediction = predict_section(section, model)
    return bundle, model, section, truth, prediction


def test_cache_round_trip_small(setup, tmp_path):
    bundle, model, section, _, pred = setup
    folder = save_prediction(pred, tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["embeddings.npz", "prediction.json",
                                                        "written-by-napari-cytoclip.json"]
    back = load_prediction(folder, expected_signature(section, bundle, pred.grid))
    assert back.grid == pred.grid
    assert np.array_equal(back.cells, pred.cells) and back.embeddings.dtype == np.float16
    assert np.array_equal(back.embeddings, pred.embeddings)
    assert np.array_equal(back.labels, pred.labels) and np.allclose(back.confidence, pred.confidence)
    assert [r.id for r in back.regions] == [r.id for r in pred.regions]
    assert (back.label_um, back.polarity, back.model_name) == (pred.label_um, pred.polarity, pred.model_name)
    assert back.logit_scale == pytest.approx(pred.logit_scale)
    # decoding from the cache alone reproduces the labels
    back.decode(model.region_embeddings())
    assert np.array_equal(back.labels, pred.labels)


def test_cache_large_uses_zarr(setup, tmp_path, monkeypatch):
    bundle, _, section, _, pred = setup
    monkeypatch.setattr(cache_mod, "ZARR_CHUNK_ROWS", 100)
    folder = save_prediction(pred, tmp_path / "cache", large_cells=50)
    assert (folder / "embeddings.zarr").is_dir()
    back = load_prediction(folder)
    assert not isinstance(back.embeddings, np.ndarray)  # streamed from disk
    assert np.array_equal(np.asarray(back.embeddings[:]), pred.embeddings)
    assert np.array_equal(back.embeddings[np.array([3, 1])], pred.embeddings[[3, 1]])
    eager = load_prediction(folder, lazy=False)
    assert isinstance(eager.embeddings, np.ndarray)
    # re-saving a lazily loaded large prediction streams it again
    again = save_prediction(back, tmp_path / "cache2", large_cells=50)
    assert np.array_equal(load_prediction(again, lazy=False).embeddings, pred.embeddings)


def test_cache_signature_mismatch(setup, tmp_path):
    bundle, _, section, _, pred = setup
    folder = save_prediction(pred, tmp_path / "cache")
    good = expected_signature(section, bundle, pred.grid)
    for key, value in [("section", "0" * 16), ("model", "deadbeef"),
                       ("grid", TileGrid.covering(section.shape, 7.17, 50.0).to_dict()),
                       ("input", {**good["input"], "size": 64})]:
        with pytest.raises(CacheMismatch, match=key):
            load_prediction(folder, {**good, key: value})


def test_cache_refuses_foreign_folder_and_reports_broken(setup, tmp_path):
    _, _, _, _, pred = setup
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(OutputError):
        save_prediction(pred, foreign)
    assert (foreign / "notes.txt").read_text() == "precious"
    with pytest.raises(CytoclipError, match="prediction.json is missing"):
        load_prediction(foreign)
    folder = save_prediction(pred, tmp_path / "cache")
    (folder / "embeddings.npz").write_bytes(b"garbage")
    with pytest.raises(CytoclipError, match="embeddings.npz"):
        load_prediction(folder)


def test_write_prediction_folder(setup, tmp_path):
    _, _, section, _, pred = setup
    out = write_prediction_folder(pred, section, tmp_path / "res", full_resolution=True)
    names = {p.name for p in out.iterdir()}
    assert names == {"labels.tif", "confidence.tif", "prediction.json", "regions.csv", "annotations.geojson",
                     "cache", "labels_fullres.tif", "written-by-napari-cytoclip.json"}
    labels = tifffile.imread(out / "labels.tif")
    assert labels.dtype == np.uint16 and np.array_equal(labels, pred.labels)
    conf = tifffile.imread(out / "confidence.tif")
    assert conf.dtype == np.float32 and conf.shape == pred.grid.shape
    meta = read_grid_metadata(out / "labels.tif")
    assert meta["step"] == pytest.approx(pred.grid.step) and meta["origin"] == pytest.approx(list(pred.grid.origin))
    with tifffile.TiffFile(out / "labels.tif") as tif:
        num, den = tif.pages[0].tags["XResolution"].value
        assert 1e4 / (num / den) == pytest.approx(pred.grid.stride_um, rel=1e-4)  # um per grid cell
    full = tifffile.imread(out / "labels_fullres.tif")
    assert full.shape == section.shape
    assert np.array_equal(full, upsample_rows(pred.labels, pred.grid, 0, section.shape[0], section.shape[1]))
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["grid"]["step"] == pytest.approx(pred.grid.step)
    assert summary["tile_counts"]["encoded"] == len(pred.cells)
    assert summary["model"]["hash"] == pred.signature["model"] and len(summary["regions"]) == 14
    with open(out / "regions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == list(range(1, 15)) and rows[0]["color"].startswith("#")
    assert load_prediction(out / "cache").labels.shape == pred.grid.shape


def test_geojson_one_feature_per_region(setup, tmp_path):
    _, _, section, _, pred = setup
    out = write_prediction_folder(pred, section, tmp_path / "res")
    data = json.loads((out / "annotations.geojson").read_text())
    feats = data["features"] if isinstance(data, dict) else data
    present = sorted(int(v) for v in np.unique(pred.labels) if v)
    assert len(feats) == len(present)
    names = {r.id: r.name for r in pred.regions}
    found = json.dumps(feats)
    for rid in present:
        assert names[rid] in found
    # polygons are (x, y) image pixel coordinates: within the section, give or take half a cell
    coords = np.array([pt for f in feats for ring in _rings(f["geometry"]) for pt in ring])
    m = pred.grid.step / 2 + 1
    assert coords[:, 0].min() >= -m and coords[:, 0].max() <= section.shape[1] + m
    assert coords[:, 1].min() >= -m and coords[:, 1].max() <= section.shape[0] + m
    assert coords[:, 0].max() - coords[:, 0].min() > section.shape[1] / 2


def _rings(geometry):
    if geometry["type"] == "Polygon":
        return geometry["coordinates"]
    return [ring for poly in geometry["coordinates"] for ring in poly]


def test_write_prediction_folder_refuses_overwrite(setup, tmp_path):
    _, _, section, _, pred = setup
    out = write_prediction_folder(pred, section, tmp_path / "res")
    with pytest.raises(OutputError, match="already exists"):
        write_prediction_folder(pred, section, out)
    (out / "labels.tif").write_bytes(b"user edit")
    with pytest.raises(OutputError, match="labels.tif, not written by napari-cytoclip"):  # never replaced (issue 16)
        write_prediction_folder(pred, section, out, overwrite=True)
    assert (out / "labels.tif").read_bytes() == b"user edit"
    (out / "labels.tif").unlink()
    write_prediction_folder(pred, section, out, overwrite=True)
    assert np.array_equal(tifffile.imread(out / "labels.tif"), pred.labels)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def _painted(pred):
    edited = pred.labels.copy()
    cells = pred.cells[:12]
    for k, (r, c) in enumerate(cells):
        edited[r, c] = 3 if pred.labels[r, c] != 3 else 5  # always a change
    return edited, cells


def test_export_corrections(setup, tmp_path):
    bundle, _, section, _, pred = setup
    edited, cells = _painted(pred)
    confirmed = np.zeros(pred.grid.shape, bool)
    confirmed[tuple(pred.cells[20:25].T)] = True
    out = tmp_path / "export"
    res = export_corrections(section, pred, edited, out, bundle, confirmed=confirmed, full_resolution=True)
    assert (res.corrected_cells, res.confirmed_cells, res.pairs_added, res.pairs_existing) == (12, 5, 17, 0)
    files, captions, records = read_pairs(out / "pairs")
    assert len(files) == 17 and all(f.is_file() for f in files)
    assert (out / "pairs" / "pairs.csv").is_file() and (out / "pairs" / "pairs.jsonl").is_file()
    from PIL import Image

    assert np.asarray(Image.open(files[0])).shape == (32, 32, 3)
    rec = next(r for r in records if r["kind"] == "corrected")
    assert rec["corrected_label"] == rec["region_id"] == edited[rec["row"], rec["col"]]
    assert rec["predicted_label"] == pred.labels[rec["row"], rec["col"]]
    assert rec["center_px"] == pytest.approx(list(pred.grid.centers(np.array([[rec["row"], rec["col"]]]))[0]))
    assert rec["center_um"][0] == pytest.approx(rec["center_px"][0] * 7.17)
    for key in ("source", "pixel_size_um", "region_name", "model_name", "model_hash", "time", "input"):
        assert key in rec
    names = {3: "Hippocampal formation", 5: "Striatum"}
    for cap, r in zip(captions, records):
        if r["kind"] == "corrected":
            assert names[r["region_id"]] in cap
    assert np.array_equal(read_label_grid(out / "labels.tif", pred.grid.shape), edited)
    assert tifffile.imread(out / "labels_fullres.tif").shape == section.shape
    assert json.loads((out / "annotations.geojson").read_text())
    assert (out / "regions.csv").is_file()
    # exporting again adds nothing new, one more correction adds one pair
    again = export_corrections(section, pred, edited, out, bundle, confirmed=confirmed)
    assert (again.pairs_added, again.pairs_existing) == (0, 17)
    r, c = pred.cells[30]
    edited[r, c] = 12 if pred.labels[r, c] != 12 else 2
    third = export_corrections(section, pred, edited, out, bundle, confirmed=confirmed)
    assert (third.pairs_added, third.pairs_existing) == (1, 17)
    assert len(read_pairs(out / "pairs")[0]) == 18
    assert np.array_equal(read_label_grid(out / "labels.tif", pred.grid.shape), edited)
    assert len(json.loads((out / "export.json").read_text())["exports"]) == 3


def test_export_errors(setup, tmp_path):
    bundle, _, section, _, pred = setup
    edited, _ = _painted(pred)
    bad = edited.copy()
    bad[tuple(pred.cells[0])] = 99
    with pytest.raises(CytoclipError, match=r"\[99\].*vocabulary"):
        export_corrections(section, pred, bad, tmp_path / "e", bundle)
    with pytest.raises(CytoclipError, match="shape"):
        export_corrections(section, pred, edited[:-1], tmp_path / "e", bundle)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "labels.tif").write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="not written by an export"):
        export_corrections(section, pred, edited, foreign, bundle)
    assert (foreign / "labels.tif").read_bytes() == b"someone else's"


def test_read_label_grid_errors(setup, tmp_path):
    _, _, section, _, pred = setup
    (tmp_path / "x.tif").write_text("not a tiff")
    with pytest.raises(CytoclipError, match="x.tif.*not a readable TIFF"):
        read_label_grid(tmp_path / "x.tif", pred.grid.shape)
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((3, 4), np.uint16))
    with pytest.raises(CytoclipError, match=r"shape \(3, 4\)"):
        read_label_grid(tmp_path / "small.tif", pred.grid.shape)
    tifffile.imwrite(tmp_path / "float.tif", np.zeros(pred.grid.shape, np.float32))
    with pytest.raises(CytoclipError, match="integers"):
        read_label_grid(tmp_path / "float.tif", pred.grid.shape)
    with pytest.raises(CytoclipError, match="not found"):
        read_label_grid(tmp_path / "missing.tif", pred.grid.shape)
    # a full-resolution label image is reduced to the grid at cell centres
    full = upsample_rows(pred.labels, pred.grid, 0, section.shape[0], section.shape[1])
    tifffile.imwrite(tmp_path / "full.tif", full)
    assert np.array_equal(labels_on_grid(tmp_path / "full.tif", pred.grid, section.shape), pred.labels)


def test_fullres_labels_stream_in_bounded_memory(tmp_path):
    import tracemalloc

    from napari_cytoclip.outputs.prediction_folder import write_fullres_labels

    shape = (4000, 5000)  # 40 MB as one uint16 array
    grid = TileGrid.covering(shape, 2.0, 100.0)
    labels = np.random.default_rng(0).integers(0, 15, grid.shape).astype(np.uint16)
    tracemalloc.start()
    write_fullres_labels(tmp_path / "full.tif", labels, grid, shape)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 15e6
    with tifffile.TiffFile(tmp_path / "full.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.shape == shape
        assert np.array_equal(page.asarray()[1000:1100], upsample_rows(labels, grid, 1000, 1100, shape[1]))
