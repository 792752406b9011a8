"""Reliability catalogue, inputs: bad section images and pixel sizes through the core and the CLI.

Every case of the catalogue goes through ``open_section`` + ``predict_section`` (the core) and through
``napari-cytoclip predict`` (the CLI). A refused input must raise a :class:`CytoclipError` whose one-line
message names the file; in the CLI it must exit with status 2, print exactly one
``napari-cytoclip: error: <file>: ...`` line and no traceback. An accepted input must give a sound
prediction. Known defects are ``xfail(strict=True)`` with the reason; the report next to this work
lists the suggested patches.

The second half holds the property-based tests of the TIFF reader on generated files (valid and
corrupted headers). The tiling and aggregation maths have their property tests in
tests/test_grid_tissue_windows.py and tests/test_aggregate_predict.py.
"""
from __future__ import annotations

import itertools
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from napari_cytoclip.outputs.naming import image_stem
import tifffile
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import tiny_bundle

from napari_cytoclip import cli
from napari_cytoclip.errors import CytoclipError, SectionError
from napari_cytoclip.io.sections import PLAUSIBLE_PIXEL_UM, PixelSizeWarning, Section, open_section

PX = 5.0  # micrometres per pixel of the synthetic sections: 100 x 120 px = 500 x 600 um, a 5 x 6 grid
MAX_READ_PX = 64_000_000  # a read larger than this would be a memory blow-up: fail instead of swapping


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("model") / "tiny").path


@pytest.fixture(scope="module")
def model(bundle_dir):
    from napari_cytoclip.models.model import load_model

    return load_model(bundle_dir, device="cpu", precision="fp32")


@pytest.fixture
def cli_model(monkeypatch, model):
    """The CLI gets the module's loaded model (its prompt embeddings already computed): the catalogue is about
    images and pixel sizes; loading models through the CLI is tested in test_reliability_models.py."""
    monkeypatch.setattr(cli, "_model", lambda args, path: model)
    return model


@pytest.fixture(autouse=True)
def memory_guard(monkeypatch):
    """Fail (instead of exhausting memory) when a window read would allocate an absurd region."""
    original = Section.read

    def guarded(self, level, y0, y1, x0, x1):
        if (y1 - y0) * (x1 - x0) > MAX_READ_PX:
            raise AssertionError(f"a window read of {(y1 - y0)} x {(x1 - x0)} px would exhaust memory")
        return original(self, level, y0, y1, x0, x1)

    monkeypatch.setattr(Section, "read", guarded)


# ------------------------------------------------------------------------------------------ images
def tissue(h: int = 100, w: int = 120, seed: int = 0) -> np.ndarray:
    """A bright slide with a dark, textured block of 'tissue' in the middle (uint8)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 230, np.uint8)
    y0, y1, x0, x1 = h // 5, h - h // 5, w // 5, w - w // 5
    img[y0:y1, x0:x1] = rng.integers(20, 120, (y1 - y0, x1 - x0))
    return img


def rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[..., None], 3, axis=2)


def write_tiff(name: str, data: np.ndarray, **kwargs) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tifffile: "writing zero-size array"
            tifffile.imwrite(path, data, **kwargs)
        return path
    return build


def write_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data)
        return path
    return build


def write_pil(name: str, data: np.ndarray, mode: str | None = None, **save) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        from PIL import Image

        im = Image.fromarray(data)
        if mode:
            im = im.convert(mode)
        path = tmp / name
        im.save(path, **save)
        return path
    return build


def truncated(build: Callable[[Path], Path], keep: float | int) -> Callable[[Path], Path]:
    """The file ``build`` writes, cut after ``keep`` bytes (or that fraction of it)."""
    def wrapped(tmp: Path) -> Path:
        path = build(tmp)
        data = path.read_bytes()
        n = keep if isinstance(keep, int) else int(len(data) * keep)
        path.write_bytes(data[:n])
        return path
    return wrapped


def corrupt_tiles(build: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """The TIFF ``build`` writes, with the bytes of every tile/strip overwritten by garbage (same size)."""
    def wrapped(tmp: Path) -> Path:
        path = build(tmp)
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            spans = list(zip(page.dataoffsets, page.databytecounts))
        data = bytearray(path.read_bytes())
        rng = np.random.default_rng(1)
        for offset, count in spans:
            data[offset:offset + count] = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
        return path
    return wrapped


def huge_header_tiff(tmp: Path) -> Path:
    """A 16 x 16 TIFF whose header claims 100000 x 100000 pixels (512 bytes on disk)."""
    path = tmp / "huge.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(100_000)
        tif.pages[0].tags["ImageLength"].overwrite(100_000)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` gray pixels but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def gif_frames(tmp: Path) -> Path:
    from PIL import Image

    frames = [Image.fromarray(tissue(64, 64, seed=k)) for k in range(3)]
    path = tmp / "frames.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def folder_named_tif(tmp: Path) -> Path:
    path = tmp / "folder.tif"
    path.mkdir()
    return path


def with_nan(fraction: float, value: float = np.nan) -> np.ndarray:
    img = tissue().astype(np.float32)
    img[np.random.default_rng(2).random(img.shape) < fraction] = value
    return img


def palette_reversed_tiff(tmp: Path) -> Path:
    """A palette TIFF whose colour map runs from white (index 0) to black (index 255)."""
    cmap = np.repeat((np.arange(255, -1, -1, dtype=np.uint16) * 257)[None], 3, axis=0)
    path = tmp / "palette.tif"
    tifffile.imwrite(path, 255 - tissue(), photometric="palette", colormap=cmap)
    return path


STACK = {"photometric": "minisblack"}


def stack(*lead: int) -> np.ndarray:
    planes = [tissue(64, 64, seed=k) for k in range(int(np.prod(lead)))]
    return np.stack(planes).reshape(*lead, 64, 64)


# ------------------------------------------------------------------------------------------ the catalogue
@dataclass(frozen=True)
class ImageCase:
    id: str
    build: Callable[[Path], Path]
    refuse: str | None = None       # regex the one-line error must match; None: the image is accepted
    plane: int | None = None
    tissue: bool = True             # accepted images with tissue must give encoded cells
    check: Callable | None = None   # extra check on an accepted (section, prediction)
    xfail: str | None = None        # known defect in the core
    cli: bool = True                # also run through the CLI (which has no plane option)
    cli_xfail: str | None = "same"  # known defect in the CLI ("same": as xfail)
    patches: tuple = ()             # (module, attribute, value) set for the case


def check_palette_colours(section, prediction) -> None:
    """Palette pixels are shown through their colour map: index 255 is black, not white."""
    gray, _ = section.thumbnail()
    expected = tissue().astype(np.float32) / 255  # the colours the reversed map gives back
    assert np.allclose(gray, expected, atol=2 / 255), "palette indices were read as intensities"


def check_no_nan_windows(section, prediction) -> None:
    assert np.isfinite(prediction.confidence).all()
    assert len(prediction.cells) > 0


IMAGE_CASES = [
    # not an image at all
    ImageCase("text_as_tif", write_bytes("notes.tif", b"hello, this is not an image\n"), r"not a readable TIFF"),
    ImageCase("text_as_png", write_bytes("notes.png", b"hello, this is not an image\n"), r"not a readable image"),
    ImageCase("html_as_jpg", write_bytes("page.jpg", b"<html><body>404</body></html>"), r"not a readable image"),
    ImageCase("unknown_suffix", write_bytes("notes.txt", b"hello"), r"unsupported file type"),
    ImageCase("folder_named_tif", folder_named_tif, r"folder"),
    ImageCase("missing_file", lambda tmp: tmp / "missing.tif", r"no such file", cli=False),  # CLI: test_cli
    # zero-size, truncated or corrupt files
    ImageCase("zero_bytes_tif", write_bytes("empty.tif", b""), r"empty"),
    ImageCase("zero_bytes_png", write_bytes("empty.png", b""), r"empty"),
    ImageCase("tiff_header_only", truncated(write_tiff("head.tif", tissue()), 6), r"TIFF"),
    ImageCase("tiff_truncated_strip", truncated(write_tiff("strip.tif", tissue()), 0.5), r"TIFF|decod|damaged|corrupt"),
    ImageCase("tiff_truncated_zlib_tiles",
              truncated(write_tiff("tiles.tif", tissue(160, 160), tile=(32, 32), compression="zlib"), 0.5),
              r"TIFF|decod|damaged|corrupt"),
    ImageCase("tiff_corrupt_zlib_tiles",
              corrupt_tiles(write_tiff("garbled.tif", tissue(160, 160), tile=(32, 32), compression="zlib")),
              r"TIFF|decod|damaged|corrupt"),
    ImageCase("jpeg_truncated", truncated(write_pil("cut.jpg", tissue(), quality=90), 0.5), r"truncated|readable"),
    ImageCase("jpeg_header_only", truncated(write_pil("head.jpg", tissue()), 20), r"readable|truncated"),
    # degenerate sizes
    ImageCase("empty_dimension", write_tiff("flat.tif", np.zeros((0, 16), np.uint8)), r"empty"),
    ImageCase("one_by_one", write_tiff("dot.tif", np.zeros((1, 1), np.uint8)), r"small|tile|at least"),
    ImageCase("smaller_than_one_tile", write_tiff("speck.tif", tissue(10, 10)), r"small|tile|at least"),
    ImageCase("one_row", write_tiff("row.tif", tissue(1, 200)), r"small|tile|at least"),
    ImageCase("huge_tiff_header", huge_header_tiff, r"cannot be decoded|too large|larger"),
    ImageCase("huge_png_header", write_bytes("bomb.png", png_header(100_000, 100_000)), r"larger than"),
    ImageCase("png_over_pixel_limit", write_pil("big.png", tissue(40, 40)), r"larger than",
              patches=(("napari_cytoclip.io.sections", "MAX_PIL_PIXELS", 1000),)),
    # stacks: refused with a hint, or the chosen plane
    ImageCase("stack_4d", write_tiff("tz.tif", stack(2, 3), metadata={"axes": "TZYX"}, **STACK),
              r"stack of 6 planes"),
    ImageCase("stack_4d_plane", write_tiff("tz.tif", stack(2, 3), metadata={"axes": "TZYX"}, **STACK), plane=4,
              cli=False),
    ImageCase("stack_5d", write_tiff("tzc.tif", stack(2, 2, 3), metadata={"axes": "TZCYX"}, **STACK),
              r"stack of 12 planes"),
    ImageCase("stack_5d_plane", write_tiff("tzc.tif", stack(2, 2, 3), metadata={"axes": "TZCYX"}, **STACK), plane=7,
              cli=False),
    ImageCase("stack_3_planes", write_tiff("z3.tif", stack(3), **STACK), r"stack of 3 planes"),
    ImageCase("stack_4_planes", write_tiff("z4.tif", stack(4), **STACK), r"stack of 4 planes"),
    ImageCase("stack_plane_out_of_range", write_tiff("tz.tif", stack(2, 3), metadata={"axes": "TZYX"}, **STACK),
              r"plane 6 is out of range", plane=6, cli=False),
    ImageCase("gif_frames", gif_frames, r"3 frames"),
    ImageCase("gif_frame_1", gif_frames, plane=1, cli=False),
    ImageCase("gif_frame_out_of_range", gif_frames, r"frame|plane", plane=9, cli=False),
    # pixel types and layouts that must work
    ImageCase("float32_unit_range", write_tiff("f32.tif", tissue().astype(np.float32) / 255)),
    ImageCase("float64_huge_values", write_tiff("f64.tif", tissue().astype(np.float64) * 1e30)),
    ImageCase("uint16", write_tiff("u16.tif", tissue().astype(np.uint16) * 257)),
    ImageCase("uint16_png", write_pil("u16.png", tissue().astype(np.uint16) * 257)),
    ImageCase("int16_negative", write_tiff("i16.tif", tissue().astype(np.int16) - 128)),
    ImageCase("int64_large_offset", write_tiff("i64.tif", tissue().astype(np.int64) + 2**40)),
    ImageCase("rgb_tiff", write_tiff("rgb.tif", rgb(tissue()), photometric="rgb")),
    ImageCase("rgb_planar_tiff", write_tiff("planar.tif", np.moveaxis(rgb(tissue()), 2, 0), photometric="rgb",
                                            planarconfig="separate")),
    ImageCase("rgba_tiff", write_tiff("rgba.tif", np.dstack([rgb(tissue()), np.full((100, 120), 255, np.uint8)]),
                                      photometric="rgb", extrasamples=["unassalpha"])),
    ImageCase("rgba_png_transparent", write_pil("rgba.png", np.dstack([rgb(tissue()),
                                                                      (tissue() < 200).astype(np.uint8) * 255]))),
    ImageCase("gray_alpha_png", write_pil("la.png", tissue(), mode="LA")),
    ImageCase("palette_png", write_pil("pal.png", rgb(tissue()), mode="P")),
    ImageCase("palette_tiff", palette_reversed_tiff, check=check_palette_colours),
    ImageCase("jpeg_gray", write_pil("gray.jpg", tissue(), quality=95)),
    ImageCase("nan_pixels", write_tiff("nan.tif", with_nan(0.1)), check=check_no_nan_windows),
    ImageCase("inf_pixels", write_tiff("inf.tif", with_nan(0.1, np.inf)), check=check_no_nan_windows),
    ImageCase("minus_inf_pixels", write_tiff("ninf.tif", with_nan(0.1, -np.inf)), check=check_no_nan_windows),
    # pixel types that cannot be a section
    ImageCase("all_nan", write_tiff("allnan.tif", np.full((100, 120), np.nan, np.float32)), r"NaN"),
    ImageCase("bilevel_bool", write_tiff("mask.tif", tissue() < 200), r"pixel type"),
    ImageCase("complex", write_tiff("complex.tif", tissue().astype(np.complex64)), r"pixel type"),
]


def _params(cases, which: str = "core"):
    out = []
    for case in cases:
        if which == "cli" and not case.cli:
            continue
        reason = case.xfail if which == "core" else (case.xfail if case.cli_xfail == "same" else case.cli_xfail)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def _apply(case: ImageCase, monkeypatch) -> None:
    for module, name, value in case.patches:
        monkeypatch.setattr(f"{module}.{name}", value)


def run_core(path: Path, model, pixel_size=PX, plane=None):
    """open_section + predict_section, as the library's users call them; the section is closed after."""
    from napari_cytoclip.inference.predict import predict_section

    from PIL.Image import DecompressionBombWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PixelSizeWarning)
        warnings.simplefilter("ignore", DecompressionBombWarning)
        section = open_section(path, pixel_size_um=pixel_size, plane=plane)
    try:
        return section, predict_section(section, model)
    except BaseException:
        section.close()
        raise


def assert_one_line_error(exc: BaseException, path: Path, pattern: str) -> None:
    text = str(exc)
    assert isinstance(exc, CytoclipError), f"{type(exc).__name__}: {text}"
    assert "\n" not in text, text
    assert str(path) in text, f"the message does not name the file: {text}"
    assert re.search(pattern, text, re.I), text


@pytest.mark.parametrize("case", _params(IMAGE_CASES))
def test_image_catalogue_core(case, model, tmp_path, monkeypatch):
    _apply(case, monkeypatch)
    path = case.build(tmp_path)
    if case.refuse:
        with pytest.raises(Exception) as info:
            run_core(path, model, plane=case.plane)
        assert_one_line_error(info.value, path, case.refuse)
        return
    section, prediction = run_core(path, model, plane=case.plane)
    try:
        assert section.source == str(path)
        grid = prediction.grid
        assert grid.shape == (max(1, math.ceil(section.shape[0] / grid.step)),
                              max(1, math.ceil(section.shape[1] / grid.step)))
        ids = {0} | {r.id for r in prediction.regions}
        assert prediction.labels.dtype == np.uint16 and set(np.unique(prediction.labels)) <= ids
        assert np.isfinite(prediction.confidence).all()
        assert ((prediction.confidence >= 0) & (prediction.confidence <= 1 + 1e-6)).all()
        if case.tissue:
            assert len(prediction.cells) > 0, "no tissue found"
        if case.check:
            case.check(section, prediction)
    finally:
        section.close()


# ------------------------------------------------------------------------------------------ the CLI
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refusing an option value
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_refused(rc: int, err: str, path: Path, pattern: str | None = None) -> None:
    assert "Traceback" not in err, err
    assert rc == 2, f"exit status {rc}: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("napari-cytoclip: error: ")]
    assert len(errors) == 1, err
    assert all(line.startswith("napari-cytoclip: ") for line in lines), err  # warnings and the error, no more
    assert str(path) in errors[0], f"the error does not name the file: {errors[0]}"
    if pattern:
        assert re.search(pattern, errors[0], re.I), errors[0]


def cli_predict(capsys, path, bundle_dir, out, *extra):
    return run_cli(capsys, "predict", path, "--out", out, "--model", bundle_dir, "--device", "cpu", "--quiet",
                   "--precision", "fp32", *extra)


@pytest.mark.parametrize("case", _params(IMAGE_CASES, "cli"))
def test_image_catalogue_cli(case, bundle_dir, tmp_path, capsys, monkeypatch, cli_model):
    _apply(case, monkeypatch)
    path = case.build(tmp_path)
    rc, out, err = cli_predict(capsys, path, bundle_dir, tmp_path / "results", "--pixel-size", PX)
    if case.refuse:
        assert_cli_refused(rc, err, path, case.refuse)
        assert not (tmp_path / "results" / image_stem(path)).exists()
        return
    assert rc == 0, err
    assert "Traceback" not in err
    folder = tmp_path / "results" / image_stem(path)
    assert out.strip() == str(folder)
    assert (folder / "prediction.json").is_file() and (folder / "labels.tif").is_file()


@pytest.mark.parametrize("where", ["before_the_command", "after_the_command"])
def test_cli_debug_shows_the_traceback(where, bundle_dir, tmp_path, cli_model):
    """--debug (either side of the command) lets the exception through, for a traceback."""
    path = write_bytes("notes.tif", b"not an image")(tmp_path)
    args = ["predict", str(path), "--out", str(tmp_path / "results"), "--pixel-size", str(PX), "--quiet"]
    args = ["--debug", *args] if where == "before_the_command" else [*args, "--debug"]
    with pytest.raises(SectionError, match="not a readable TIFF"):
        cli.main(args)


def test_cli_plane_option_picks_a_plane(bundle_dir, tmp_path, capsys, cli_model):
    path = write_tiff("tz.tif", stack(2, 3), metadata={"axes": "TZYX"}, **STACK)(tmp_path)
    rc, _, err = cli_predict(capsys, path, bundle_dir, tmp_path / "results", "--pixel-size", PX, "--plane", 4)
    assert rc == 0, err
    assert (tmp_path / "results" / "tz" / "prediction.json").is_file()


def test_one_row_rgb_keeps_its_shape(tmp_path):
    path = write_tiff("row.tif", rgb(tissue(1, 200)), photometric="rgb")(tmp_path)
    try:
        section = open_section(path, pixel_size_um=PX)
    except SectionError as exc:  # refusing it (too small) is fine too
        assert str(path) in str(exc)
        return
    assert section.shape == (1, 200) and section.is_rgb


@pytest.mark.parametrize("kind", ["planar_rgb_four_wide", "stack_of_planar_rgb", "gray_stack_four_wide"])
def test_reader_uses_file_axes(kind, tmp_path):
    """The axes the TIFF states decide the layout, not the lengths of the axes."""
    if kind == "gray_stack_four_wide":  # two 10 x 4 planes: a stack, not a 2 x 10 RGBA image
        path = write_tiff("stack.tif", stack(2)[:, :10, :4].copy(), **STACK)(tmp_path)
        with pytest.raises(SectionError, match="stack of 2 planes"):
            open_section(path, pixel_size_um=PX)
        return
    planes, width = (1, 4) if kind == "planar_rgb_four_wide" else (2, 40)
    data = np.stack([rgb(tissue(50, width, seed=k)) for k in range(planes)])
    arr = np.moveaxis(data, -1, -3)
    path = write_tiff("planar.tif", arr[0] if planes == 1 else arr, photometric="rgb",
                      planarconfig="separate")(tmp_path)
    section = open_section(path, pixel_size_um=PX, plane=None if planes == 1 else planes - 1)
    assert tuple(section.levels[0].shape) == (50, width, 3)
    np.testing.assert_array_equal(np.asarray(section.levels[0]), data[-1])


# ------------------------------------------------------------------------------------------ pixel sizes
def ome_tiff(pixel_um) -> Callable[[Path], Path]:
    return write_tiff("ome.ome.tif", tissue(), metadata={"axes": "YX", "PhysicalSizeX": pixel_um,
                                                          "PhysicalSizeY": pixel_um})


def dpi_tiff(dpi: float) -> Callable[[Path], Path]:
    return write_tiff("dpi.tif", tissue(), resolution=(dpi, dpi), resolutionunit="INCH")


@dataclass(frozen=True)
class PixelCase:
    id: str
    value: object                        # what the user gives (None: nothing)
    expect: str                          # "refuse", "warn", "ok", "unknown" (refused when predicting)
    pattern: str = ""
    build: Callable[[Path], Path] = write_tiff("plain.tif", tissue())
    file_value: float | None = None      # the pixel size the section ends with, if not ``value``
    xfail: str | None = None
    cli_xfail: str | None = "same"
    cli_extra: tuple = ()


PIXEL_CASES = [
    PixelCase("missing", None, "unknown", r"pixel size is unknown"),
    PixelCase("zero", 0.0, "refuse", r"positive"),
    PixelCase("negative", -1.0, "refuse", r"positive"),
    PixelCase("nan", float("nan"), "refuse", r"positive"),
    PixelCase("inf", float("inf"), "refuse", r"positive"),
    PixelCase("minus_inf", float("-inf"), "refuse", r"positive"),
    PixelCase("not_a_number", "abc", "refuse", r"number"),
    PixelCase("one_metre", 1e6, "refuse", r"absurd"),
    PixelCase("one_centimetre_and_a_bit", 1.5e4, "refuse", r"absurd"),
    PixelCase("one_nanometre", 1e-3, "refuse", r"absurd|small|impossible"),
    PixelCase("implausibly_large", 600.0, "warn", r"outside the usual", cli_extra=("--stride-um", 12000)),
    PixelCase("implausibly_small", 0.03, "warn", r"outside the usual", cli_xfail="not run: see one_nanometre"),
    PixelCase("typical", 0.5, "ok", cli_extra=("--stride-um", 10)),
    PixelCase("file_states_it", None, "ok", build=ome_tiff(7.17), file_value=7.17),
    PixelCase("user_overrides_file", 5.0, "ok", build=ome_tiff(7.17)),
    PixelCase("file_states_one_dpi", None, "refuse", r"absurd", build=dpi_tiff(1.0)),
    PixelCase("user_overrides_one_dpi_file", 5.0, "ok", build=dpi_tiff(1.0)),
    PixelCase("user_overrides_zero_in_file", 5.0, "ok", build=ome_tiff(0.0)),
]


def _pixel_params(which: str):
    out = []
    for case in PIXEL_CASES:
        reason = case.xfail if which == "core" or case.cli_xfail == "same" else case.cli_xfail
        if which == "cli" and reason and reason.startswith("not run"):
            continue
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _pixel_params("core"))
def test_pixel_size_catalogue_core(case, model, tmp_path):
    from napari_cytoclip.inference.predict import predict_section

    path = case.build(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case.expect == "refuse":
            with pytest.raises(Exception) as info:
                open_section(path, pixel_size_um=case.value)
            assert_one_line_error(info.value, path, case.pattern)
            return
        section = open_section(path, pixel_size_um=case.value)
    try:
        doubts = [str(w.message) for w in caught if issubclass(w.category, PixelSizeWarning)]
        if case.expect == "unknown":
            assert section.pixel_size_um is None
            assert doubts and str(path) in doubts[0] and "pixel size" in doubts[0]
            with pytest.raises(SectionError) as info:  # never a silently wrong grid
                predict_section(section, model)
            assert_one_line_error(info.value, path, case.pattern)
        elif case.expect == "warn":
            assert section.pixel_size_um == case.value
            assert doubts and str(path) in doubts[0] and re.search(case.pattern, doubts[0])
        else:
            assert not doubts, doubts
            assert section.pixel_size_um == pytest.approx(case.file_value or case.value)
    finally:
        section.close()


@pytest.mark.parametrize("case", _pixel_params("cli"))
def test_pixel_size_catalogue_cli(case, bundle_dir, tmp_path, capsys, cli_model):
    path = case.build(tmp_path)
    extra = () if case.value is None else (f"--pixel-size={case.value}",)  # '=' lets argparse take '-inf'
    rc, out, err = cli_predict(capsys, path, bundle_dir, tmp_path / "results", *extra, *case.cli_extra)
    assert "Traceback" not in err, err
    if case.id == "not_a_number":  # argparse refuses it: usage and one error line, status 2
        assert rc == 2 and "invalid float value: 'abc'" in err
        return
    if case.expect in ("refuse", "unknown"):
        assert_cli_refused(rc, err, path, case.pattern)
        assert not (tmp_path / "results" / image_stem(path)).exists()
        return
    assert rc == 0, err
    if case.expect == "warn":
        warning = [line for line in err.splitlines() if line.startswith("napari-cytoclip: warning: ")]
        assert warning and str(path) in warning[0] and "pixel size" in warning[0]


# ------------------------------------------------------------------------------------------ reader properties
DTYPES = ["uint8", "uint16", "int16", "int32", "uint32", "float32", "float64"]


@st.composite
def tiff_specs(draw):
    kind = draw(st.sampled_from(["gray", "rgb", "rgba"]))
    compression = draw(st.sampled_from([None, "zlib", "jpeg"]))
    dtype = "uint8" if compression == "jpeg" else draw(st.sampled_from(DTYPES))
    # stacks of 3 or 4 gray planes, one-row images and planar RGB 3 or 4 pixels wide included: the axes the
    # file states decide the layout (tifffile itself squeezes a stack of one-pixel-wide planes into one page)
    planes = draw(st.integers(1, 4))
    planar = "contig" if kind == "gray" else draw(st.sampled_from(["contig", "separate"]))
    w = draw(st.integers(1 if planes == 1 else 2, 40))
    return {
        "kind": kind, "compression": compression, "dtype": dtype,
        "h": draw(st.integers(1, 40)), "w": w,
        "planes": planes, "plane": draw(st.none() | st.integers(0, planes - 1)),
        "tiled": draw(st.booleans()),
        "planar": planar,
        "pixels_per_cm": draw(st.none() | st.floats(0.5, 1e8)),
        "nan": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
    }


def spec_data(spec) -> np.ndarray:
    rng = np.random.default_rng(spec["seed"])
    samples = {"gray": (), "rgb": (3,), "rgba": (4,)}[spec["kind"]]
    shape = (spec["planes"], spec["h"], spec["w"]) + samples
    dtype = np.dtype(spec["dtype"])
    if dtype.kind == "f":
        data = rng.normal(100, 50, shape).astype(dtype)
        if spec["nan"]:
            data[rng.random(shape) < 0.2] = np.nan
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return data


def write_spec(path: Path, spec, data: np.ndarray) -> bool:
    """Write ``data`` as ``spec`` says; False if tifffile or the codec refuses the combination."""
    kind = spec["kind"]
    arr = data if spec["planes"] > 1 else data[0]
    if spec["planar"] == "separate":
        arr = np.moveaxis(arr, -1, -3)
    kwargs = {"photometric": "minisblack" if kind == "gray" else "rgb", "compression": spec["compression"]}
    if kind != "gray":
        kwargs["planarconfig"] = spec["planar"]
    if kind == "rgba":
        kwargs["extrasamples"] = ["unassalpha"]
    if spec["tiled"]:
        kwargs["tile"] = (16, 16)
    if spec["pixels_per_cm"]:
        kwargs.update(resolution=(spec["pixels_per_cm"], spec["pixels_per_cm"]), resolutionunit="CENTIMETER")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tifffile.imwrite(path, arr, **kwargs)
    except Exception:
        return False
    return True


_counter = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=tiff_specs())
def test_reader_on_generated_tiffs(spec, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "generated_tiffs"
    folder.mkdir(exist_ok=True)
    path = folder / f"gen{next(_counter)}.tif"
    data = spec_data(spec)
    assume(write_spec(path, spec, data))
    stacked = spec["planes"] > 1
    plane = spec["plane"] if stacked else None
    samples = {"gray": (), "rgb": (3,), "rgba": (4,)}[spec["kind"]]
    expected = (spec["h"], spec["w"]) + samples
    stated = spec["pixels_per_cm"]
    stated_um = 1e4 / stated if stated else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            section = open_section(path, pixel_size_um=None if stated else PX, plane=plane)
        except SectionError as exc:  # refusing is fine: with a clear message naming the file
            assert str(path) in str(exc) and "\n" not in str(exc)
            # ...but a plain valid image must open, unless it is a stack or states a doubtful pixel size
            lo, hi = PLAUSIBLE_PIXEL_UM
            doubtful = stated_um is not None and not lo <= stated_um <= hi and "pixel size" in str(exc)
            assert (stacked and plane is None and "stack" in str(exc)) or doubtful, exc
            return
    try:
        assert tuple(section.levels[0].shape) == expected
        if stated_um is not None:
            assert section.pixel_size_um == pytest.approx(stated_um, rel=1e-5)
        if spec["compression"] != "jpeg":
            want = data[plane or 0]
            np.testing.assert_array_equal(np.asarray(section.levels[0]), want)
        try:
            block = section.read(0, 0, spec["h"], 0, spec["w"])
        except SectionError as exc:  # only for an image without a finite pixel
            assert "NaN" in str(exc) and not np.isfinite(data[plane or 0]).any()
            return
        assert block.shape == (spec["h"], spec["w"]) + ((3,) if samples else ())
        assert np.isfinite(block).all() and block.min() >= 0 and block.max() <= 1
    finally:
        section.close()


def _base_tiffs(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    img = tissue(64, 80)
    variants = [("strip.tif", img, {}), ("tiled.tif", img, {"tile": (32, 32), "compression": "zlib"}),
                ("rgb_jpeg.tif", rgb(img), {"photometric": "rgb", "compression": "jpeg"}),
                ("ome.ome.tif", img, {"metadata": {"axes": "YX", "PhysicalSizeX": 2.0}})]
    paths = []
    for name, arr, kwargs in variants:
        path = folder / name
        if not path.exists():
            tifffile.imwrite(path, arr, **kwargs)
        paths.append(path)
    return paths


@settings(max_examples=60, deadline=None, derandomize=True)
@given(base=st.integers(0, 3),
       edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(8, 6000))
def test_reader_on_corrupted_tiff_headers(base, edits, cut, tmp_path_factory):
    """Random bytes in the header and IFDs (and a random cut): open_section opens or refuses cleanly."""
    folder = tmp_path_factory.getbasetemp() / "corrupted_tiffs"
    source = _base_tiffs(folder)[base]
    data = bytearray(source.read_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[:cut]
    path = folder / f"bad{next(_counter)}{''.join(source.suffixes)}"
    path.write_bytes(bytes(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            section = open_section(path, pixel_size_um=PX)
    except SectionError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    try:
        assert section.shape[0] >= 1 and section.shape[1] >= 1
        assert section.pixel_size_um == PX
    finally:
        section.close()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_large_png_and_jpeg_open_without_changing_pils_limit(tmp_path, monkeypatch, suffix):
    """Whole-section PNG/JPEG exports are often over PIL's decompression-bomb limit: they open (up to
    MAX_PIL_PIXELS), and PIL's module-wide limit, which the rest of the process relies on, is never changed."""
    from PIL import Image

    path = tmp_path / f"section{suffix}"
    Image.fromarray(np.full((100, 200, 3), 200, np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the image is 20x PIL's limit
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    section = open_section(path, pixel_size_um=PX)
    assert section.shape == (100, 200) and Image.MAX_IMAGE_PIXELS == 1000
    section.close()


def test_other_formats_over_pils_limit_are_refused_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "section.bmp"
    Image.fromarray(np.full((100, 200, 3), 200, np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(CytoclipError) as info:
        open_section(path, pixel_size_um=PX)
    assert_one_line_error(info.value, path, r"decompression-bomb limit")


def test_a_multi_picture_jpeg_keeps_its_frames(tmp_path):
    """An MPO file (a JPEG holding several pictures) is a stack: a frame is chosen with ``plane``."""
    from PIL import Image

    first, second = np.full((100, 200, 3), 200, np.uint8), np.full((100, 200, 3), 60, np.uint8)
    path = tmp_path / "stereo.jpg"
    Image.fromarray(first).save(path, format="MPO", save_all=True, append_images=[Image.fromarray(second)])
    with pytest.raises(CytoclipError) as info:
        open_section(path, pixel_size_um=PX)
    assert_one_line_error(info.value, path, r"2 frames.*--plane")
    section = open_section(path, pixel_size_um=PX, plane=1)
    assert section.shape == (100, 200) and abs(float(np.asarray(section.levels[0]).mean()) - 60) < 5
    section.close()
