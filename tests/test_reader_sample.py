"""The npe2 manifest, the sample plate and the lazy TIFF/OME-TIFF/SVS reader."""
from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

PLUGIN = "napari-cytoclip"
SHARED_PLATES = Path("/work/shared/data/allen_ara_coronal_nissl_plates")


def plate_image() -> np.ndarray:
    from PIL import Image

    from napari_cytoclip.io.sample_data import SAMPLE_DIR

    with Image.open(SAMPLE_DIR / "plate_41.jpg") as im:
        return np.asarray(im.convert("L"))


def write_pyramid(path: Path, base: np.ndarray, pixel_um: float, levels: int = 3) -> None:
    import tifffile

    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(base, subifds=levels - 1, tile=(128, 128), metadata={
            "axes": "YX" if base.ndim == 2 else "YXS", "PhysicalSizeX": pixel_um, "PhysicalSizeY": pixel_um,
            "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
        for k in range(1, levels):
            tif.write(base[:: 2 ** k, :: 2 ** k], subfiletype=1, tile=(128, 128))


# ----------------------------------------------------------------------------------- manifest
def test_manifest_contributions():
    from npe2 import PluginManifest

    import napari_cytoclip

    mf = PluginManifest.from_distribution(PLUGIN)
    mf.validate_imports()
    widgets = {w.display_name: w.command for w in mf.contributions.widgets}
    assert set(widgets) == {"Predict regions", "Text query", "Export annotations"}
    menus = mf.contributions.menus
    assert [m.command for m in menus["napari/layers/segment"]] == [widgets["Predict regions"]]
    assert [m.command for m in menus["napari/layers/annotate"]] == [widgets["Export annotations"]]
    samples = {s.key: s.display_name for s in mf.contributions.sample_data}
    assert samples == {"allen_plate_41": "Allen Nissl plate 41 (mouse, coronal)"}
    patterns = mf.contributions.readers[0].filename_patterns
    assert {"*.tif", "*.tiff", "*.svs", "*.ome.tif"} <= set(patterns)
    # one manifest: the packaged file is the repository's top-level napari.yaml
    packaged = Path(napari_cytoclip.__file__).parent / "napari.yaml"
    top = Path(napari_cytoclip.__file__).parents[2] / "napari.yaml"
    if top.is_file():
        assert packaged.read_bytes() == top.read_bytes()


def test_widgets_listed_in_napari_menus():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    names = {c.display_name for c in pm.iter_widgets() if c.plugin_name == PLUGIN}
    assert names == {"Predict regions", "Text query", "Export annotations"}


# ----------------------------------------------------------------------------------- sample
def test_sample_plate_41_is_whole_training_plate():
    from napari_cytoclip.teach.allen import split_of
    from napari_cytoclip.io.sample_data import SAMPLE_DIR, allen_plate_41, plate_41_info

    info = plate_41_info()
    assert info["plate"] == 41 and 41 % 5 != 0 and split_of(41) == "train"
    for key, file in (("image_sha256", "plate_41.jpg"), ("labels_sha256", "plate_41_labels.png")):
        assert hashlib.sha256((SAMPLE_DIR / file).read_bytes()).hexdigest() == info[key]
    (image, ikw, itype), (labels, lkw, ltype) = allen_plate_41()
    assert (itype, ltype) == ("image", "labels")
    assert image.shape == labels.shape == (953, 1024) and image.dtype == np.uint8  # the whole plate
    assert ikw["scale"] == lkw["scale"] == (7.17, 7.17) and ikw["metadata"]["pixel_size_um"] == 7.17
    assert lkw["name"] == "atlas labels (plate 41)"
    assert set(np.unique(labels)) <= set(range(16)) and (labels == 1).any()
    feats = lkw["features"]
    assert list(feats.columns) == ["index", "name", "acronym"] and "Isocortex" in set(feats["name"])
    assert lkw["colormap"][0][3] == 0 and lkw["colormap"][None][3] == 0  # background and unknown transparent
    if SHARED_PLATES.is_dir():  # the pixel size is the index's est_um_per_px for plate 41
        with open(SHARED_PLATES / "plates_index.csv", newline="") as f:
            row = next(r for r in csv.DictReader(f) if r["plate"] == "41")
        assert float(row["est_um_per_px"]) == info["pixel_size_um"] and row["sha256"] == info["image_sha256"]


def test_open_sample_in_viewer(make_napari_viewer, qtbot, tmp_path_factory):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1300, 900)
    layers = viewer.open_sample(PLUGIN, "allen_plate_41")
    assert [layer.name for layer in layers] == ["Allen Nissl plate 41", "atlas labels (plate 41)"]
    image, atlas = layers
    assert tuple(image.scale) == (7.17, 7.17) and tuple(atlas.scale) == (7.17, 7.17)
    ys, xs = np.nonzero(atlas.data == 5)  # striatum
    world = atlas.data_to_world((ys[len(ys) // 2], xs[len(xs) // 2]))
    assert "Striatum" in str(atlas.get_status(world, world=True))
    shots = Path(os.environ.get("CYTOCLIP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    qtbot.wait(200)
    viewer.screenshot(path=str(shots / "sample_plate_41.png"), canvas_only=False, flash=False)


# ----------------------------------------------------------------------------------- reader
def test_reader_opens_pyramid_lazily(tmp_path, make_napari_viewer):
    import dask.array as da

    from napari_cytoclip.io.reader import napari_get_reader

    path = tmp_path / "plate41.ome.tif"
    write_pyramid(path, plate_image(), 7.17)
    reader = napari_get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image" and kwargs["multiscale"] and len(data) == 3
    assert [tuple(level.shape) for level in data] == [(953, 1024), (477, 512), (239, 256)]
    assert all(isinstance(level, da.Array) for level in data)  # nothing read yet
    assert kwargs["scale"] == (7.17, 7.17) and kwargs["metadata"]["pixel_size_um"] == pytest.approx(7.17)
    assert kwargs["name"] == "plate41" and not kwargs["rgb"]
    np.testing.assert_array_equal(np.asarray(data[0][100:110, 200:210]), plate_image()[100:110, 200:210])

    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin=PLUGIN)
    assert layer.multiscale and tuple(layer.scale) == (7.17, 7.17)


def test_reader_plain_rgb_and_svs(tmp_path):
    import tifffile

    from napari_cytoclip.io.reader import napari_get_reader

    plain = tmp_path / "small.tif"
    tifffile.imwrite(plain, plate_image()[:200, :300])
    [(data, kwargs, _)] = napari_get_reader(str(plain))(str(plain))
    assert not kwargs["multiscale"] and data.shape == (200, 300)
    assert kwargs["scale"] == (1.0, 1.0) and kwargs["metadata"]["pixel_size_um"] is None
    assert kwargs["metadata"]["warnings"]  # the missing pixel size is reported

    rgb = tmp_path / "rgb.tiff"
    tifffile.imwrite(rgb, np.repeat(plate_image()[:100, :120, None], 3, axis=2), photometric="rgb",
                     resolution=(20000.0, 20000.0), resolutionunit=3)  # 20000 px/cm = 0.5 um/px
    [(data, kwargs, _)] = napari_get_reader(str(rgb))(str(rgb))
    assert kwargs["rgb"] and data.shape == (100, 120, 3) and kwargs["scale"] == pytest.approx((0.5, 0.5))

    svs = tmp_path / "slide.svs"
    tifffile.imwrite(svs, plate_image()[:256, :256], description="Aperio Image Library v12\n256x256 |MPP = 0.499|AppMag = 20")
    reader = napari_get_reader(str(svs))
    assert reader is not None
    [(data, kwargs, _)] = reader(str(svs))
    assert kwargs["scale"] == (0.499, 0.499)

    both = napari_get_reader([str(plain), str(svs)])
    assert both is not None and len(both([str(plain), str(svs)])) == 2


def test_reader_declines_what_it_should_not_claim(tmp_path):
    import tifffile
    from PIL import Image

    from napari_cytoclip.io.reader import napari_get_reader

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((5, 64, 64), np.uint16), metadata={"axes": "ZYX"})
    png = tmp_path / "plate.png"
    Image.fromarray(plate_image()).save(png)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 this is not a tiff")
    for path in (stack, png, broken, tmp_path / "missing.tif", tmp_path):
        assert napari_get_reader(str(path)) is None, path
    assert napari_get_reader([str(png), str(stack)]) is None
    assert napari_get_reader([]) is None


def test_reader_adds_overviews_to_large_flat_images(tmp_path, monkeypatch):
    import tifffile

    from napari_cytoclip.io import reader

    monkeypatch.setattr(reader, "PYRAMID_ABOVE", 512)
    monkeypatch.setattr(reader, "OVERVIEW_SIDE", 128)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, plate_image(), tile=(256, 256))
    [(data, kwargs, _)] = reader.napari_get_reader(str(flat))(str(flat))
    assert kwargs["multiscale"] and [lvl.shape for lvl in data] == [(953, 1024), (239, 256), (60, 64)]
    np.testing.assert_array_equal(np.asarray(data[1]), plate_image()[::4, ::4])


def test_sample_json_is_small_and_documented():
    from napari_cytoclip.io.sample_data import SAMPLE_DIR

    files = {p.name: p.stat().st_size for p in SAMPLE_DIR.iterdir()}
    assert set(files) == {"plate_41.jpg", "plate_41_labels.png", "plate_41.json"}
    assert sum(files.values()) < 1_500_000
    info = json.loads((SAMPLE_DIR / "plate_41.json").read_text())
    assert "Allen Institute" in info["provenance"] and info["license"]
