"""Issue 13 command line: export-pairs with new regions, teach, predict with the taught bundle (real plates)."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tifffile

from helpers import allen_plate
from napari_cytoclip.teach import allen
from napari_cytoclip.cli import main

PLATES = allen.default_data_dir() / "allen_ara_coronal_nissl_plates"
pytestmark = pytest.mark.skipif(not PLATES.is_dir(), reason=f"the real Allen plates ({PLATES}) are not there")
TEACH, CHECK = 68, 71          # training plates holding the hippocampal formation (HPF = 3)
STRIDE = ["--stride-um", "200"]
NEW = 20


def _image(folder, n):
    from PIL import Image

    plate = allen_plate(n)
    with Image.open(plate.image) as im:
        path = folder / f"plate{n}.tif"
        tifffile.imwrite(path, np.asarray(im.convert("L")))
    return path, plate.label_map(), plate.um_per_px


def _truth_on_grid(grid, labels):
    c = np.rint(grid.centers()).astype(int)
    return labels[np.clip(c[:, 0], 0, labels.shape[0] - 1), np.clip(c[:, 1], 0, labels.shape[1] - 1)].reshape(grid.shape)


def _regions_csv(path, regions, extra=True, header=("id", "name", "acronym", "colour")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in regions:
            w.writerow([r.id, r.name, r.acronym, r.color][:len(header)])
        if extra:
            w.writerow([NEW, "Hippocampus (taught)", "HIPt", "#ff00ff"][:len(header)])
    return path


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """Plate 68 predicted, its HPF cells painted as a new region 20, exported and taught."""
    from napari_cytoclip.inference.cache import load_prediction
    from napari_cytoclip.outputs.prediction_folder import CACHE_DIR

    root = tmp_path_factory.mktemp("teach")
    image, labels, px = _image(root, TEACH)
    assert main(["predict", str(image), "--pixel-size", str(px), "--out", str(root / "pred"), "--quiet", *STRIDE]) == 0
    pred = load_prediction(root / "pred" / image.stem / CACHE_DIR)
    truth = _truth_on_grid(pred.grid, labels)
    edited = pred.labels.copy()
    edited[(truth == 3) & (edited > 0)] = NEW
    tifffile.imwrite(root / "edited.tif", edited)
    regions = _regions_csv(root / "regions.csv", pred.regions)
    export = ["export-pairs", str(image), str(root / "edited.tif"), "--prediction", str(root / "pred" / image.stem),
              "--out", str(root / "export"), "--regions", str(regions)]
    assert main(export) == 0
    assert main(["teach", str(root / "export"), "--out", str(root / "taught")]) == 0
    return {"root": root, "image": image, "px": px, "pred": pred, "edited": edited, "regions": regions,
            "export": export, "painted": int((edited == NEW).sum())}


def test_taught_bundle_finds_the_new_region_on_another_plate(taught, tmp_path):
    from napari_cytoclip.inference.cache import load_prediction
    from napari_cytoclip.outputs.prediction_folder import CACHE_DIR

    image, labels, px = _image(tmp_path, CHECK)
    assert main(["predict", str(image), "--model", str(taught["root"] / "taught"), "--pixel-size", str(px),
                 "--full-resolution", "--out", str(tmp_path / "out"), "--quiet", *STRIDE]) == 0
    folder = tmp_path / "out" / image.stem
    pred = load_prediction(folder / CACHE_DIR)
    truth = _truth_on_grid(pred.grid, labels)
    new, hpf = pred.labels == NEW, (truth == 3) & (pred.labels > 0)
    assert new.sum() > 0.5 * hpf.sum()
    # the new region lies mostly on the hippocampal formation (0.65 measured with the validation-chosen learner)
    assert (new & hpf).sum() / new.sum() > 0.6
    assert (new & hpf).sum() / hpf.sum() > 0.7              # and covers most of it
    rest = (pred.labels > 0) & (truth > 0) & (truth != 3) & (truth != 15)
    assert (pred.labels[rest] == truth[rest]).mean() > 0.8  # untaught known regions keep their labels
    rows = {r["id"]: r for r in csv.DictReader(open(folder / "regions.csv"))}
    assert rows[str(NEW)]["name"] == "Hippocampus (taught)" and rows[str(NEW)]["acronym"] == "HIPt"
    full = tifffile.imread(folder / "labels_fullres.tif")
    assert NEW in np.unique(full)


def test_provenance_and_teaching_set(taught):
    from napari_cytoclip.models.bundle import load_bundle
    from napari_cytoclip.teach.teaching import load_teaching_set

    bundle = load_bundle(taught["root"] / "taught")
    assert bundle.taught and bundle.region(NEW).name == "Hippocampus (taught)"
    assert [r.id for r in bundle.regions] == list(range(1, 15)) + [NEW]
    prov = bundle.provenance
    assert prov["taught"]["regions"][str(NEW)]["cells"] == taught["painted"]
    assert prov["taught"]["regions"][str(NEW)]["painted"] == taught["painted"] and prov["taught"]["regions"][str(NEW)]["new"]
    assert set(prov["taught"]["regions"]) == {str(NEW)}     # nothing else was painted or confirmed
    (section,) = prov["taught"]["sections"]
    assert section["name"] == taught["image"].name and section["hash"] == taught["pred"].signature["section"]
    assert prov["taught"]["when"] and prov["parent"]["name"] == "cytoclip-allen-mouse"
    assert prov["parent"]["hash"] == taught["pred"].signature["model"] and prov["parent"]["taught"] is False
    ts = load_teaching_set(taught["root"] / "taught")
    assert ts.counts() == {NEW: taught["painted"]}
    assert not list((taught["root"] / "taught").glob("*.pkl"))


def test_teach_extends_a_taught_bundle_with_reviewed_section(taught, tmp_path):
    """--reviewed confirms every unchanged cell; --init a taught bundle keeps its teaching set."""
    from napari_cytoclip.models.bundle import load_bundle

    root = taught["root"]
    shutil.copytree(root / "export", tmp_path / "export")
    export = [a if a != str(root / "export") else str(tmp_path / "export2") for a in taught["export"]]
    assert main(export + ["--reviewed"]) == 0
    assert main(["teach", str(tmp_path / "export2"), "--init", str(root / "taught"), "--out", str(tmp_path / "t2"),
                 "--quiet"]) == 0
    prov = load_bundle(tmp_path / "t2").provenance
    counts = {int(k): v["cells"] for k, v in prov["taught"]["regions"].items()}
    assert counts[NEW] == taught["painted"] and len(counts) > 3 and prov["parent"]["taught"] is True
    # the same section again replaces its examples instead of counting them twice
    assert len(prov["taught"]["sections"]) == 1


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("napari-cytoclip: error: ")
    return err[0]


def test_export_refuses_unknown_ids_and_bad_regions_csv(taught, tmp_path, capsys):
    from napari_cytoclip.models.bundle import load_bundle, default_bundle_path

    base = taught["export"][:]
    out = str(tmp_path / "x")
    base[base.index("--out") + 1] = out
    edited = taught["edited"].copy()
    edited[edited == 1] = 99
    tifffile.imwrite(tmp_path / "bad.tif", edited)
    cases = [  # (argv change, words the one line must hold)
        (lambda a: a[:2] + [str(tmp_path / "bad.tif")] + a[3:], ["bad.tif", "[99]"]),
        (lambda a: a[:a.index("--regions")], [taught["root"].name, "edited.tif", f"[{NEW}]"]),
        (lambda a: a[:a.index("--regions") + 1] + [str(_regions_csv(tmp_path / "noname.csv", load_bundle(
            default_bundle_path()).regions, header=("id",)))], ["noname.csv", "'name'"]),
    ]
    for change, words in cases:
        line = _one_line_error(capsys, change(base))
        assert all(w in line for w in words), line
        assert not (tmp_path / "x").exists()


def test_teach_refuses_another_base_model_and_corrupt_learner(taught, tmp_path, capsys):
    from helpers import tiny_bundle

    tiny = tiny_bundle(tmp_path / "tiny")
    line = _one_line_error(capsys, ["teach", str(taught["root"] / "export"), "--init", str(tiny.path),
                                    "--out", str(tmp_path / "t")])
    assert "export" in line and "tiny-cytoclip" in line and not (tmp_path / "t").exists()
    line = _one_line_error(capsys, ["teach", str(tmp_path), "--out", str(tmp_path / "t")])
    assert "teaching" in line
    broken = tmp_path / "broken"
    shutil.copytree(taught["root"] / "taught", broken)
    data = (broken / "learner.safetensors").read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"not a learner" * 10)):
        (broken / "learner.safetensors").write_bytes(content)
        line = _one_line_error(capsys, ["teach", str(taught["root"] / "export"), "--init", str(broken),
                                        "--out", str(tmp_path / "t")])
        assert "learner.safetensors" in line, name
    (broken / "learner.safetensors").unlink()
    line = _one_line_error(capsys, ["teach", str(taught["root"] / "export"), "--init", str(broken),
                                    "--out", str(tmp_path / "t")])
    assert "learner.safetensors missing" in line


def test_learner_file_validation(taught, tmp_path):
    """Shapes, class ids among the regions and finite numbers are checked when a bundle loads."""
    from safetensors.numpy import load_file, save_file

    from napari_cytoclip.errors import BundleError
    from napari_cytoclip.models.bundle import load_bundle

    src = taught["root"] / "taught"
    state = load_file(str(src / "learner.safetensors"))
    bad = {"nan": {**state, "W": np.full_like(state["W"], np.nan)},
           "unknown class": {**state, "classes": state["classes"] + 1000},
           "shape": {**state, "b": state["b"][:-1]}}
    for name, s in bad.items():
        folder = tmp_path / name.replace(" ", "_")
        shutil.copytree(src, folder)
        save_file(s, str(folder / "learner.safetensors"))
        with pytest.raises(BundleError, match="learner"):
            load_bundle(folder)
    meta = json.loads((src / "cytoclip.json").read_text())
    assert meta["provenance"]["taught"]["features"] == "pooled"


def test_decode_never_overwrites_painted_cells(taught):
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.inference.taught_decode import decode_with_learner

    model = load_model(taught["root"] / "taught", device="cpu")
    pred = taught["pred"]
    labels, conf = decode_with_learner(pred, model.learner, model)
    assert (labels[taught["edited"] == NEW] == NEW).mean() > 0.8   # it learnt its own section
    current = labels.copy()
    painted = np.zeros(labels.shape, bool)
    painted[(labels == NEW)] = True
    current[painted] = 7                                            # the user painted these cells thalamus
    again, conf2 = decode_with_learner(pred, model.learner, model, painted=painted, current=current)
    assert (again[painted] == 7).all() and (conf2[painted] == 1).all()
    assert (again[~painted & (labels > 0)] > 0).all()


class _RowBlocksOnly:
    """A lazy feature array that only gives row blocks (like a zarr array): reading it whole fails."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.shape, self.dtype, self.reads = rows, rows.shape, rows.dtype, []

    def __getitem__(self, key):
        block = self.rows[key]
        self.reads.append(len(block))
        return block

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole feature array was read at once")


def test_decode_reads_lazy_cached_features_block_by_block(taught, monkeypatch):
    """Update map on a whole slide: cached (zarr) features and joint embeddings are read a block at a time,
    never whole, and give the same labels as in memory."""
    from dataclasses import replace

    from napari_cytoclip.inference.taught_decode import decode_with_learner
    from napari_cytoclip.models import taught as taught_learner
    from napari_cytoclip.models.model import load_model

    model = load_model(taught["root"] / "taught", device="cpu")
    pred = taught["pred"]
    assert model.learner.basis is not None and isinstance(pred.features, np.ndarray)
    labels, conf = decode_with_learner(pred, model.learner, model)
    lazy, joint = _RowBlocksOnly(pred.features), _RowBlocksOnly(pred.embeddings)
    monkeypatch.setattr(taught_learner, "PROJECT_ROWS", 100)  # small blocks, so that there are several
    again, conf2 = decode_with_learner(replace(pred, features=lazy, embeddings=joint), model.learner, model)
    assert len(lazy.reads) > 1 and max(lazy.reads) <= 100 and sum(lazy.reads) == len(pred.cells)
    assert sum(joint.reads) == len(pred.cells)  # the text prior reads the joint embeddings in blocks too
    np.testing.assert_array_equal(again, labels)
    np.testing.assert_allclose(conf2, conf, atol=1e-6)
