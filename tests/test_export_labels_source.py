"""An unknown label id in ``export-pairs`` names the LABELS file, not the image (issue 16 item 9): label ids no
vocabulary knows, in a grid labels.tif, in a full-resolution label image, beside a --regions table that misses
them, and through the Python API (``export_corrections(labels_source=...)``)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from helpers import allen_plate, tiny_bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from napari_cytoclip.cli import main  # noqa: E402
from napari_cytoclip.errors import CytoclipError  # noqa: E402

PLATE = 41  # a training plate (not test: % 5 != 0; not validation: % 10 != 3)
UNKNOWN = 999


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels_source")
    model = tiny_bundle(root / "tiny").path
    plate = allen_plate(PLATE)
    rc = main(["predict", str(plate.image), "--out", str(root / "pred"), "--model", str(model), "--pixel-size",
               str(plate.um_per_px), "--device", "cpu", "--stride-um", "400", "--quiet"])
    assert rc == 0
    return root, model, plate, root / "pred" / str(PLATE)


def _grid_labels(root, predicted):
    labels = tifffile.imread(predicted / "labels.tif")
    rows, cols = np.nonzero(labels)
    labels[rows[:3], cols[:3]] = UNKNOWN
    path = root / "case" / "corrected_grid.tif"
    tifffile.imwrite(path, labels)
    return path, []


def _fullres_labels(root, predicted):
    from PIL import Image

    plate = allen_plate(PLATE)
    with Image.open(plate.image) as im:
        shape = (im.height, im.width)
    path = root / "case" / "painted_fullres.tif"
    tifffile.imwrite(path, np.full(shape, UNKNOWN, np.uint16))
    return path, []


def _regions_missing_it(root, predicted):
    path, _ = _grid_labels(root, predicted)
    table = root / "case" / "names.csv"
    labels = tifffile.imread(path)
    table.write_text("id,name\n" + "".join(f"{int(i)},Region {int(i)}\n" for i in np.unique(labels)
                                           if i and i != UNKNOWN))
    return path, ["--regions", table]


CASES = {"grid-labels": _grid_labels, "fullres-labels": _fullres_labels, "regions-table-misses-id": _regions_missing_it}


@pytest.mark.parametrize("case", CASES)
def test_unknown_label_id_names_the_labels_file(case, env, tmp_path, capsys):
    root, model, plate, predicted = env
    (root / "case").mkdir(exist_ok=True)
    labels, extra = CASES[case](root, predicted)
    rc = main(["export-pairs", str(plate.image), str(labels), "--out", str(tmp_path / "e"), "--prediction",
               str(predicted), "--model", str(model), *[str(a) for a in extra]])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("napari-cytoclip: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert f"error: {labels}:" in line and str(UNKNOWN) in line, line
    assert str(plate.image) not in line, line  # the labels' problem, not the image's
    assert not (tmp_path / "e").exists()


def test_export_corrections_names_labels_source(env, tmp_path):
    """The API names the labels' source (a file or a layer) for label problems; the section without one."""
    from napari_cytoclip.inference.cache import load_prediction
    from napari_cytoclip.io.sections import open_section
    from napari_cytoclip.models.bundle import load_bundle
    from napari_cytoclip.outputs.prediction_folder import CACHE_DIR
    from napari_cytoclip.teach.export import export_corrections

    root, model, plate, predicted = env
    folder = predicted / CACHE_DIR if (predicted / CACHE_DIR).is_dir() else predicted
    prediction = load_prediction(folder)
    section = open_section(plate.image, pixel_size_um=plate.um_per_px)
    try:
        edited = np.asarray(prediction.labels).copy()
        edited[tuple(np.asarray(prediction.cells)[0])] = UNKNOWN
        cases = [(edited, "my_labels.tif", rf"^my_labels\.tif: label ids \[{UNKNOWN}\]"),
                 (edited[:-1], "layer 'corrected'", r"^layer 'corrected': the edited labels have shape"),
                 (edited, None, rf"{plate.image.name}: label ids \[{UNKNOWN}\]")]
        for labels, source, pattern in cases:
            with pytest.raises(CytoclipError, match=pattern):
                export_corrections(section, prediction, labels, tmp_path / "e", load_bundle(model),
                                   labels_source=source)
    finally:
        section.close()
    assert not (tmp_path / "e").exists()
