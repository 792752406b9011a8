"""Reading sections: TIFF flavours and their pixel sizes, PNG/JPEG modes, dtypes, stacks, laziness,
pixel-size validation, clear errors for files that are not images, and polarity on real Nissl data."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_cytoclip.teach.allen import default_data_dir
from napari_cytoclip.errors import SectionError
from napari_cytoclip.io.sections import PixelSizeWarning, Section, open_section, section_from_array
from napari_cytoclip.io.tissue import detect_polarity

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = default_data_dir()
PLATES = DATA / "allen_ara_coronal_nissl_plates"
MD787 = DATA / "mitra_md787_mouse_nissl_series" / "sections"
needs_data = pytest.mark.skipif(not PLATES.is_dir() or not MD787.is_dir(),
                                reason=f"the real data in {DATA} (shared/data beside the clone) is not there")



def rng_image(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def quiet_open(path, **kw) -> Section:
    """open_section with the 'no pixel size' warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PixelSizeWarning)
        return open_section(path, **kw)


def as_uint8(section: Section, level: int = 0) -> np.ndarray:
    h, w = section.levels[level].shape[:2]
    return np.rint(section.read(level, 0, h, 0, w) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ TIFF
def test_plain_tiff_reads_pixels_exactly(tmp_path):
    img = rng_image((70, 90))
    tifffile.imwrite(tmp_path / "plain.tif", img)
    s = quiet_open(tmp_path / "plain.tif")
    assert s.shape == (70, 90) and not s.is_rgb and s.dtype == np.uint8 and s.name == "plain"
    assert np.array_equal(np.asarray(s.levels[0]), img)
    assert np.array_equal(as_uint8(s), img)


def test_plain_tiff_without_pixel_size_warns(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", rng_image((20, 20)))
    with pytest.warns(PixelSizeWarning, match="pixel size"):
        s = open_section(tmp_path / "plain.tif")
    assert s.pixel_size_um is None
    with pytest.raises(SectionError, match="pixel size is unknown"):
        s.require_pixel_size()


def write_pyramid(path: Path, img: np.ndarray, levels: int = 3, **kw) -> list[np.ndarray]:
    """A tiled, JPEG-compressed pyramidal BigTIFF with reduced levels as SubIFDs."""
    pyramid = [img[:: 2 ** i, :: 2 ** i] for i in range(levels)]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(pyramid[0], subifds=levels - 1, tile=(128, 128), compression="jpeg", **kw)
        for lev in pyramid[1:]:
            tw.write(lev, subfiletype=1, tile=(128, 128), compression="jpeg")
    return pyramid


def test_pyramidal_bigtiff_subifds_jpeg(tmp_path):
    img = rng_image((600, 520))
    img[100:300, 100:400] = 40  # flat blocks survive JPEG almost unchanged
    write_pyramid(tmp_path / "pyr.tif", img, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    s = open_section(tmp_path / "pyr.tif")
    assert [lev.shape for lev in s.levels] == [(600, 520), (300, 260), (150, 130)]
    assert s.pixel_size_um == pytest.approx(0.5)
    assert s.downsample(1) == pytest.approx(2.0) and s.downsample(2) == pytest.approx(4.0)
    assert s.level_for(0.5) == 0 and s.level_for(1.0) == 1 and s.level_for(3.0) == 2
    block = s.read(0, 150, 250, 150, 350)
    assert np.abs(block * 255 - 40).max() <= 3  # JPEG, nearly lossless on a flat block


def test_levels_are_lazy_dask_arrays_read_tile_by_tile(tmp_path):
    """Opening reads no pixels; reading a window decodes only its tiles (the others are corrupt here)."""
    import dask.array as da

    img = rng_image((1024, 1024))
    path = tmp_path / "lazy.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="zlib",
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    raw = bytearray(path.read_bytes())
    for offset, count in spans[1:]:  # destroy every tile but the first
        raw[offset:offset + count] = b"\0" * count
    path.write_bytes(bytes(raw))

    s = open_section(path)
    assert isinstance(s.levels[0], da.Array), type(s.levels[0])
    assert s.levels[0].chunksize == (256, 256)
    assert s.pixel_size_um == pytest.approx(1.0)
    window = s.read(0, 10, 200, 20, 250)  # inside tile (0, 0)
    assert np.array_equal(np.rint(window * 255).astype(np.uint8), img[10:200, 20:250])
    s.close()


def test_damaged_tiff_pixels_raise_section_error(tmp_path):
    img = rng_image((512, 512))
    path = tmp_path / "damaged.tif"
    tifffile.imwrite(path, img, tile=(128, 128), compression="zlib")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated: tiles past the cut are gone
    with pytest.raises(SectionError, match="damaged.tif"):
        s = quiet_open(path, pixel_size_um=1.0)
        s.read(0, 0, 512, 0, 512)


@pytest.mark.parametrize("unit, value", [("µm", 0.25), ("nm", 250.0), ("mm", 0.00025)])
def test_ome_tiff_physical_size(tmp_path, unit, value):
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, rng_image((40, 50)), metadata={
        "axes": "YX", "PhysicalSizeX": value, "PhysicalSizeXUnit": unit,
        "PhysicalSizeY": value, "PhysicalSizeYUnit": unit})
    s = open_section(path)
    assert s.pixel_size_um == pytest.approx(0.25)
    assert s.name == "slide"  # both suffixes dropped


def test_pyramidal_ome_tiff(tmp_path):
    path = tmp_path / "pyr.ome.tif"
    img = rng_image((300, 400))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, subifds=1, tile=(128, 128), compression="jpeg",
                 metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tw.write(img[::2, ::2], subfiletype=1, tile=(128, 128), compression="jpeg")
    s = open_section(path)
    assert [lev.shape for lev in s.levels] == [(300, 400), (150, 200)]
    assert s.pixel_size_um == pytest.approx(0.5)


@pytest.mark.parametrize("unit, per_unit, expected_um", [
    ("CENTIMETER", 1e4 / 2.0, 2.0),   # 5000 px per cm
    ("INCH", 25400 / 4.0, 4.0),       # 6350 px per inch
])
def test_tiff_resolution_unit(tmp_path, unit, per_unit, expected_um):
    tifffile.imwrite(tmp_path / "res.tif", rng_image((30, 30)), resolution=(per_unit, per_unit), resolutionunit=unit)
    assert open_section(tmp_path / "res.tif").pixel_size_um == pytest.approx(expected_um)


def test_imagej_micron_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "ij.tif", rng_image((30, 30)), imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"unit": "micron"})
    assert open_section(tmp_path / "ij.tif").pixel_size_um == pytest.approx(0.325)


def test_svs_like_description_mpp(tmp_path):
    rgb = rng_image((256, 384, 3))
    desc = ("Aperio Image Library v12.0.15\n384x256 [0,0 384x256] (128x128) JPEG/RGB Q=70"
            "|AppMag = 20|MPP = 0.5|Filename = test")
    tifffile.imwrite(tmp_path / "slide.svs", rgb, tile=(128, 128), compression="jpeg", photometric="rgb",
                     description=desc)
    s = open_section(tmp_path / "slide.svs")
    assert s.pixel_size_um == pytest.approx(0.5)
    assert s.shape == (256, 384) and s.is_rgb


def test_pixel_size_override_beats_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "res.tif", rng_image((30, 30)), resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    assert open_section(tmp_path / "res.tif", pixel_size_um=3.5).pixel_size_um == 3.5


# ----------------------------------------------------------------------------------------- dtypes
def test_uint16_tiff_uses_robust_range(tmp_path):
    img = (rng_image((80, 80)).astype(np.uint16) * 100 + 1000)
    tifffile.imwrite(tmp_path / "u16.tif", img)
    s = quiet_open(tmp_path / "u16.tif")
    assert s.dtype == np.uint16
    out = s.read(0, 0, 80, 0, 80)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    # order is kept
    assert np.corrcoef(out.ravel(), img.ravel())[0, 1] > 0.99


def test_float_tiff_with_nan_gives_finite_low_values(tmp_path):
    img = rng_image((60, 60), np.float32) * 50.0 - 10.0
    img[5:15, 5:15] = np.nan
    img[20, 20] = np.inf
    tifffile.imwrite(tmp_path / "f.tif", img)
    s = quiet_open(tmp_path / "f.tif")
    out = s.read(0, 0, 60, 0, 60)
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out[5:15, 5:15] == 0.0).all() and out[20, 20] == 0.0


def test_all_nan_image_is_refused():
    s = section_from_array(np.full((20, 20), np.nan, np.float32), 1.0)
    with pytest.raises(SectionError, match="NaN"):
        s.read(0, 0, 5, 0, 5)


def test_read_outside_the_image_is_nan_padded():
    img = rng_image((10, 12))
    s = section_from_array(img, 1.0)
    out = s.read(0, -3, 5, 8, 15)
    assert out.shape == (8, 7)
    assert np.isnan(out[:3]).all() and np.isnan(out[:, 4:]).all()
    assert np.array_equal(np.rint(out[3:, :4] * 255).astype(np.uint8), img[:5, 8:12])


def test_planar_rgb_tiff(tmp_path):
    rgb = rng_image((50, 70, 3))
    tifffile.imwrite(tmp_path / "planar.tif", rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    s = quiet_open(tmp_path / "planar.tif")
    assert s.is_rgb and s.shape == (50, 70)
    assert np.array_equal(np.asarray(s.levels[0]), rgb)


def test_planar_rgb_array():
    rgb = rng_image((40, 30, 3))
    s = section_from_array(rgb.transpose(2, 0, 1), 1.0)
    assert s.is_rgb and np.array_equal(np.asarray(s.levels[0]), rgb)


def test_4d_imagej_hyperstack_needs_a_plane(tmp_path):
    stack = rng_image((2, 3, 40, 50))
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(SectionError, match=r"stack\.tif.*stack of 6 planes"):
        quiet_open(tmp_path / "stack.tif")
    s = quiet_open(tmp_path / "stack.tif", plane=4)
    assert np.array_equal(np.asarray(s.levels[0]), stack[1, 1])
    with pytest.raises(SectionError, match=r"stack\.tif.*out of range"):
        quiet_open(tmp_path / "stack.tif", plane=6)


def test_4d_plain_tiff_stack_needs_a_plane(tmp_path):
    stack = rng_image((2, 3, 40, 50))
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")  # tifffile axes 'QQYX'
    with pytest.raises(SectionError, match=r"stack\.tif.*stack of 6 planes"):
        quiet_open(tmp_path / "stack.tif")
    s = quiet_open(tmp_path / "stack.tif", plane=4)
    assert np.array_equal(np.asarray(s.levels[0]), stack[1, 1])


def test_4d_array_needs_a_plane():
    with pytest.raises(SectionError, match="stack of 6 planes"):
        section_from_array(np.zeros((2, 3, 10, 10), np.uint8), 1.0, name="my_layer")


# -------------------------------------------------------------------------------------- PNG / JPEG
def test_png_gray(tmp_path):
    img = rng_image((33, 47))
    Image.fromarray(img).save(tmp_path / "g.png")
    s = quiet_open(tmp_path / "g.png")
    assert not s.is_rgb and np.array_equal(as_uint8(s), img)


def test_png_rgb(tmp_path):
    rgb = rng_image((33, 47, 3))
    Image.fromarray(rgb).save(tmp_path / "c.png")
    s = quiet_open(tmp_path / "c.png")
    assert s.is_rgb and np.array_equal(as_uint8(s), rgb)


def test_png_rgba_drops_alpha(tmp_path):
    rgb = rng_image((20, 25, 3))
    rgba = np.dstack([rgb, np.full((20, 25), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    s = quiet_open(tmp_path / "a.png")
    assert s.is_rgb and s.read(0, 0, 20, 0, 25).shape == (20, 25, 3)
    assert np.array_equal(as_uint8(s), rgb)


def test_png_palette_becomes_its_colours(tmp_path):
    palette_img = Image.new("P", (20, 10))
    palette_img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (253 * 3))
    idx = np.zeros((10, 20), np.uint8)
    idx[:, 10:] = 1
    idx[5:, :] = 2
    palette_img.putdata(idx.ravel().tolist())
    palette_img.save(tmp_path / "p.png")
    s = quiet_open(tmp_path / "p.png")
    assert s.is_rgb
    out = as_uint8(s)
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 15]) == (255, 0, 0) and tuple(out[8, 3]) == (0, 0, 255)


def test_png_16_bit(tmp_path):
    img = (rng_image((30, 30)).astype(np.uint16) * 200)
    Image.fromarray(img).save(tmp_path / "g16.png")
    s = quiet_open(tmp_path / "g16.png")
    assert s.dtype == np.uint16 and not s.is_rgb
    out = s.read(0, 0, 30, 0, 30)
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert np.corrcoef(out.ravel(), img.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg(tmp_path, mode):
    shape = (40, 60) if mode == "L" else (40, 60, 3)
    img = np.full(shape, 90, np.uint8)
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=95)
    s = quiet_open(tmp_path / "x.jpg")
    assert s.is_rgb == (mode == "RGB")
    assert np.abs(as_uint8(s).astype(int) - 90).max() <= 2


def test_png_dpi_gives_pixel_size(tmp_path):
    Image.fromarray(rng_image((10, 10))).save(tmp_path / "dpi.png", dpi=(2540, 2540))
    assert open_section(tmp_path / "dpi.png").pixel_size_um == pytest.approx(10.0)


# ----------------------------------------------------------------------------- pixel size validation
@pytest.mark.parametrize("bad, message", [
    (0, "positive"), (-2.0, "positive"), (float("nan"), "positive"), (float("inf"), "positive"),
    (5e5, "absurd"), ("abc", "number"),
])
def test_bad_pixel_size_is_refused(tmp_path, bad, message):
    Image.fromarray(rng_image((10, 10))).save(tmp_path / "g.png")
    with pytest.raises(SectionError, match=rf"g\.png.*{message}"):
        open_section(tmp_path / "g.png", pixel_size_um=bad)
    with pytest.raises(SectionError, match=message):
        section_from_array(rng_image((10, 10)), bad)


def test_implausible_pixel_size_warns():
    with pytest.warns(PixelSizeWarning, match="outside the usual"):
        s = section_from_array(rng_image((10, 10)), 1000.0)
    assert s.pixel_size_um == 1000.0


# -------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("suffix", [".tif", ".png", ".jpg"])
def test_not_an_image(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("this is a shopping list, not a section\n" * 5)
    with pytest.raises(SectionError, match=rf"notes\{suffix}.*(not a readable|TIFF)"):
        open_section(path, pixel_size_um=1.0)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_png_jpeg(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(rng_image((200, 200, 3))).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SectionError, match=rf"cut\{suffix}.*(truncated|readable)"):
        open_section(path, pixel_size_um=1.0)


def test_tiff_cut_inside_its_header(tmp_path):
    path = tmp_path / "head.tif"
    tifffile.imwrite(path, rng_image((50, 50)))
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(SectionError, match=r"head\.tif.*TIFF"):
        open_section(path, pixel_size_um=1.0)


@pytest.mark.parametrize("suffix", [".tif", ".png", ".jpg"])
def test_zero_size_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(SectionError, match=rf"empty\{suffix}.*empty"):
        open_section(path, pixel_size_um=1.0)


def test_folder_is_refused(tmp_path):
    folder = tmp_path / "section.tif"
    folder.mkdir()
    with pytest.raises(SectionError, match=r"section\.tif.*folder"):
        open_section(folder)


def test_missing_file(tmp_path):
    with pytest.raises(SectionError, match=r"nothere\.tif.*no such file"):
        open_section(tmp_path / "nothere.tif")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "section.czi"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(SectionError, match=r"section\.czi.*unsupported"):
        open_section(path)


def test_error_carries_source_and_problem(tmp_path):
    with pytest.raises(SectionError) as info:
        open_section(tmp_path / "nothere.png")
    assert info.value.source == str(tmp_path / "nothere.png")
    assert info.value.problem == "no such file"


# ------------------------------------------------------------------------------- real data polarity
@needs_data
@pytest.mark.parametrize("plate", [1, 41, 70, 100, 131])
def test_allen_plates_are_darkfield(plate):
    s = open_section(PLATES / "plates" / f"{plate}.jpg", pixel_size_um=7.0)
    assert not s.is_rgb and s.dtype == np.uint8
    assert detect_polarity(s) == "darkfield"


@needs_data
def test_md787_sections_are_brightfield_rgb():
    files = sorted(MD787.glob("*.png"))
    assert len(files) == 68
    for path in files[::20]:  # four sections spread over the series
        s = open_section(path, pixel_size_um=44.16)
        assert s.is_rgb and s.dtype == np.uint8
        assert detect_polarity(s) == "brightfield", path.name


@needs_data
def test_inverted_plate_is_brightfield():
    with Image.open(PLATES / "plates" / "41.jpg") as im:
        img = np.asarray(im.convert("L"))
    assert detect_polarity(section_from_array(img, 7.17)) == "darkfield"
    assert detect_polarity(section_from_array(255 - img, 7.17)) == "brightfield"
