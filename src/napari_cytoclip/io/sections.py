"""Reading Nissl sections lazily: TIFF/OME-TIFF/SVS pyramids, PNG/JPEG, in-memory arrays."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_cytoclip.errors import SectionError

TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".ndpi", ".scn"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
MAX_PIL_PIXELS = 30_000 * 30_000  # a PNG/JPEG larger than this should be a pyramidal TIFF
PLAUSIBLE_PIXEL_UM = (0.05, 500.0)
MIN_PIXEL_UM = 0.01  # 10 nm: far below the resolution of any light microscope
SCREEN_DPI = (72.0, 96.0, 150.0, 300.0, 600.0)  # defaults of image software, not a microscope's pixel size
MAX_THUMBNAIL_DECODE_BYTES = 4 * 2 ** 30  # pixel data decoded for the overview beyond which the file must be
MIN_BYTES_PER_DECODED = 1 / 1000         # ... at least this compressed size per decoded byte (not a forged header)
PYRAMID_MEMORY_BYTES = 2 ** 30  # a flat image larger than this (decoded) gets its reading pyramid on disk (zarr)
PYRAMID_MIN_RESIZE = 4.0  # windows are cut from a built level at least this much finer than the model's pixels,
#   so the levels' box filters add little (1/32 of its variance) to the resize's antialiasing filter: 2.0 flipped
#   2.1% of the shipped model's labels on test plate 5, 4.0 flipped 0.5% (benchmarks/README.md, bench_flat.py)
PYRAMID_BLOCK = 256             # output rows and columns of one zarr chunk of a built level
PYRAMID_BLOCK_COLS = 16         # chunks per block written at once: source blocks of 512 x 8192 px


class PixelSizeWarning(UserWarning):
    """The pixel size is unknown or doubtful."""


@dataclass
class Section:
    """A section image as a list of pyramid levels, level 0 first.

    Each level is an array-like (numpy, dask or zarr) of shape ``(H, W)`` or ``(H, W, C)``
    with C in {3, 4}; slicing reads only what is asked for.
    """

    name: str
    levels: list[Any]
    pixel_size_um: float | None = None
    source: str | None = None
    _keep_open: list = field(default_factory=list, repr=False)
    _factors: list | None = field(default=None, repr=False)  # exact level downsamples of a built pyramid

    def __post_init__(self) -> None:
        if not self.levels:
            raise SectionError(self.source or self.name, "the image has no pixel data")
        base = self.levels[0]
        if base.ndim not in (2, 3) or (base.ndim == 3 and base.shape[2] not in (3, 4)):
            raise SectionError(self.source or self.name,
                               f"expected a 2-D grayscale or RGB(A) image, got shape {tuple(base.shape)}")
        if min(base.shape[:2]) < 1:
            raise SectionError(self.source or self.name, f"the image is empty (shape {tuple(base.shape)})")
        kind = np.dtype(base.dtype).kind
        if kind not in "uif":
            raise SectionError(self.source or self.name, f"unsupported pixel type {base.dtype}")
        if self.pixel_size_um is not None:
            self.pixel_size_um = check_pixel_size(self.pixel_size_um, self.source or self.name)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.levels[0].shape[:2])

    @property
    def is_rgb(self) -> bool:
        return self.levels[0].ndim == 3

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.levels[0].dtype)

    def downsample(self, level: int) -> float:
        """How many level-0 pixels one pixel of ``level`` spans (mean of both axes)."""
        if self._factors is not None:
            return float(self._factors[level])
        h0, w0 = self.shape
        h, w = self.levels[level].shape[:2]
        return float((h0 / h + w0 / w) / 2)

    def level_for(self, pixel_size_um: float) -> int:
        """The coarsest level whose pixels are no larger than ``pixel_size_um``."""
        best = 0
        for i in range(len(self.levels)):
            if self.require_pixel_size() * self.downsample(i) <= pixel_size_um * 1.0001:
                best = i
        return best

    def require_pixel_size(self) -> float:
        if self.pixel_size_um is None:
            raise SectionError(self.source or self.name,
                               "the pixel size is unknown: give it in micrometres per pixel "
                               "(--pixel-size in the CLI, 'Pixel size' in the widget)")
        return self.pixel_size_um

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels of ``level`` in ``[y0, y1) x [x0, x1)``; outside the image is filled with NaN-free edge zeros.

        Returns float32 ``(h, w)`` or ``(h, w, 3)`` in [0, 1] before polarity handling.
        """
        arr = self.levels[level]
        h, w = arr.shape[:2]
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        out_shape = (y1 - y0, x1 - x0) + ((3,) if self.is_rgb else ())
        out = np.full(out_shape, np.nan, dtype=np.float32)
        if cy1 > cy0 and cx1 > cx0:
            block = self._pixels(arr, np.s_[cy0:cy1, cx0:cx1])
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = self.normalise(block)
        return out

    def _pixels(self, arr: Any, index: Any) -> np.ndarray:
        """``arr[index]`` as numpy; a decoding error (damaged or truncated file) becomes a :class:`SectionError`."""
        try:
            return np.asarray(arr[index])
        except SectionError:
            raise
        except MemoryError:
            raise
        except Exception as exc:
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise SectionError(self.source or self.name, "the pixel data cannot be decoded; the file is damaged or "
                                                         f"truncated ({detail})") from None

    def normalise(self, block: np.ndarray) -> np.ndarray:
        """Raw pixels to float32 in [0, 1]; alpha dropped; NaN/inf replaced by the low end.

        Wide integers and float64 are offset in float64 first, so a large offset keeps the contrast.
        """
        if block.ndim == 3:
            block = block[..., :3]
        lo, hi = self.intensity_range
        wide = block.dtype.itemsize > 2 if block.dtype.kind in "iu" else block.dtype.itemsize > 4
        work = np.float64 if wide else np.float32
        out = ((block.astype(work) - lo) / max(hi - lo, 1e-12)).astype(np.float32, copy=False)
        np.clip(out, 0.0, 1.0, out=out)
        if block.dtype.kind == "f":
            out[~np.isfinite(block)] = 0.0
        return out

    @property
    def intensity_range(self) -> tuple[float, float]:
        """Values mapped to 0 and 1: the dtype's range for uint8, robust percentiles otherwise."""
        if not hasattr(self, "_range"):
            if self.dtype == np.uint8:
                self._range = (0.0, 255.0)
            else:
                thumb = self.thumbnail_raw().astype(np.float64)
                finite = thumb[np.isfinite(thumb)]
                if finite.size == 0:
                    raise SectionError(self.source or self.name, "every pixel is NaN or infinite")
                lo, hi = np.percentile(finite, [0.1, 99.9])
                if hi <= lo:
                    lo, hi = float(finite.min()), float(finite.max()) + 1.0
                self._range = (float(lo), float(hi))
        return self._range

    def thumbnail_level(self, max_side: int = 1024) -> int:
        """The finest level whose longer side is at most ``max_side`` (else the coarsest)."""
        for i, lev in enumerate(self.levels):
            if max(lev.shape[:2]) <= max_side:
                return i
        return len(self.levels) - 1

    def thumbnail_raw(self, max_side: int = 1024) -> np.ndarray:
        """A small raw-valued view of the section, strided down from the best level (kept: the tissue mask and the
        content hash share it).

        A lazily decoded level is decoded tile by tile, all of it; one larger than :data:`MAX_THUMBNAIL_DECODE_BYTES`
        from a file under :data:`MIN_BYTES_PER_DECODED` of that (a header claiming far more pixels than the file
        holds) is refused.
        """
        cached = self.__dict__.setdefault("_thumbnails", {})
        if max_side in cached:
            return cached[max_side]
        level = self.thumbnail_level(max_side)
        arr = self.levels[level]
        nbytes = float(np.prod([float(n) for n in arr.shape])) * np.dtype(arr.dtype).itemsize
        if not isinstance(arr, np.ndarray) and nbytes > MAX_THUMBNAIL_DECODE_BYTES and \
                self._file_bytes() < nbytes * MIN_BYTES_PER_DECODED:
            h, w = arr.shape[:2]
            raise SectionError(self.source or self.name,
                               f"its smallest pyramid level ({h} x {w} px) would decode {nbytes / 2 ** 30:,.1f} GiB "
                               f"from a {self._file_bytes() / 2 ** 20:,.1f} MB file to build an overview (over "
                               f"{MAX_THUMBNAIL_DECODE_BYTES // 2 ** 30} GiB at over {1 / MIN_BYTES_PER_DECODED:,.0f}x "
                               "compression); the file is damaged, or save it as a pyramidal TIFF")
        stride = max(1, int(np.ceil(max(arr.shape[:2]) / max_side)))
        cached[max_side] = self._pixels(arr, np.s_[::stride, ::stride])  # lazy levels: decoded tile by tile
        return cached[max_side]

    def _file_bytes(self) -> float:
        """Size of the source file (0 when there is none)."""
        try:
            return float(os.path.getsize(self.source)) if self.source else 0.0
        except OSError:
            return 0.0

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """``(gray float32 image in [0, 1], level-0 pixels per thumbnail pixel)``."""
        raw = self.thumbnail_raw(max_side)
        img = self.normalise(raw)
        if img.ndim == 3:
            img = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        factor = (self.shape[0] / img.shape[0] + self.shape[1] / img.shape[1]) / 2
        return img, float(factor)

    def content_hash(self) -> str:
        """A short hash of the pixels (a thumbnail for large images), shape and dtype."""
        if not hasattr(self, "_hash"):
            h = hashlib.sha256()
            h.update(repr((self.shape, str(self.dtype), self.is_rgb)).encode())
            base = self.levels[0]
            pixels = self._pixels(base, ...) if base.size <= 64_000_000 else self.thumbnail_raw()  # the mask's
            h.update(np.ascontiguousarray(pixels).tobytes())
            self._hash = h.hexdigest()[:16]
        return self._hash

    def pyramid_factors(self, coarsest_um: float) -> list[float]:
        """Level downsamples of :meth:`pyramid`: the file's levels where it has several, else 1, 2, 4, ...
        up to the coarsest whose pixels are no larger than ``coarsest_um /`` :data:`PYRAMID_MIN_RESIZE`."""
        if len(self.levels) > 1:
            return [self.downsample(i) for i in range(len(self.levels))]
        px, factors = self.require_pixel_size(), [1.0]
        while px * factors[-1] * 2 <= coarsest_um / PYRAMID_MIN_RESIZE * 1.0001 and min(self.shape) > factors[-1]:
            factors.append(factors[-1] * 2)
        return factors

    def pyramid(self, coarsest_um: float) -> "Section":
        """A view of this section for cutting windows down to ``coarsest_um`` per pixel.

        A section with pyramid levels is its own view. A flat image (JPEG, PNG, single-level TIFF,
        one array) gets successive 2x2 area-mean levels (:meth:`pyramid_factors`), built once and kept:
        in memory when the image decodes to at most :data:`PYRAMID_MEMORY_BYTES`, else as zarr arrays in a
        temporary folder (deleted with the view), built block by block, so the full-resolution image is
        never held in memory. Level 0 is this section's own array; pixels are normalised as this section's.
        """
        factors = self.pyramid_factors(coarsest_um)
        if len(self.levels) > 1 or len(factors) == 1:
            return self
        with _PYRAMID_LOCK:
            view = self.__dict__.get("_pyramid")
            if view is None or len(view.levels) < len(factors):
                view = self._build_pyramid(len(factors) - 1)
                self._pyramid = view
        return view

    def _build_pyramid(self, n: int) -> "Section":
        base = self.levels[0]
        ch = base.shape[2] if base.ndim == 3 else 1
        nbytes = float(np.prod([float(s) for s in base.shape[:2]])) * ch * self.dtype.itemsize
        folder = tempfile.mkdtemp(prefix="cytoclip-pyramid-") if nbytes > PYRAMID_MEMORY_BYTES else None
        levels = [base]
        try:
            for k in range(1, n + 1):
                levels.append(_halve(levels[-1], self, None if folder is None else Path(folder) / str(k)))
        except BaseException:
            if folder:
                shutil.rmtree(folder, True)
            raise
        view = Section(name=self.name, levels=levels, source=self.source, _factors=[2.0 ** k for k in range(n + 1)])
        view.pixel_size_um = self.pixel_size_um
        view._range = self.intensity_range
        view.pyramid_folder = folder
        if folder:
            weakref.finalize(view, shutil.rmtree, folder, True)
        return view

    def close(self) -> None:
        self.__dict__.pop("_pyramid", None)
        for handle in self._keep_open:
            try:
                handle.close()
            except Exception:  # pragma: no cover - closing is best effort
                pass
        self._keep_open.clear()


_PYRAMID_LOCK = threading.Lock()


def _halve(src: Any, section: Section, folder: Path | None) -> Any:
    """The 2x2 area mean of ``src`` (its last row / column repeated where a side is odd), in its dtype:
    numpy, or a zarr array in ``folder``; computed in blocks of 2 x :data:`PYRAMID_BLOCK` source rows."""
    h, w = (int(s) for s in src.shape[:2])
    shape = ((h + 1) // 2, (w + 1) // 2) + tuple(int(s) for s in src.shape[2:])
    dtype = np.dtype(src.dtype)
    if folder is None:
        out = np.empty(shape, dtype)
    else:
        import zarr

        out = zarr.create_array(store=str(folder), shape=shape, dtype=dtype.name, zarr_format=3, fill_value=0,
                                chunks=(PYRAMID_BLOCK, PYRAMID_BLOCK) + shape[2:])
    step_y, step_x = PYRAMID_BLOCK, PYRAMID_BLOCK * PYRAMID_BLOCK_COLS
    for y in range(0, shape[0], step_y):
        for x in range(0, shape[1], step_x):
            block = section._pixels(src, np.s_[2 * y:min(h, 2 * (y + step_y)), 2 * x:min(w, 2 * (x + step_x))])
            out[y:y + step_y, x:x + step_x] = _mean2x2(block)
    return out


def _mean2x2(block: np.ndarray) -> np.ndarray:
    """2x2 area mean, the last row / column repeated where a side is odd; integers rounded, dtype kept."""
    if block.shape[0] % 2:
        block = np.concatenate([block, block[-1:]], 0)
    if block.shape[1] % 2:
        block = np.concatenate([block, block[:, -1:]], 1)
    parts = (block[0::2, 0::2], block[1::2, 0::2], block[0::2, 1::2], block[1::2, 1::2])
    if block.dtype in (np.uint8, np.uint16):  # exact integer sums, rounded half up
        wide = np.uint16 if block.dtype == np.uint8 else np.uint32
        total = parts[0].astype(wide) + parts[1] + parts[2] + parts[3] + 2
        return (total >> 2).astype(block.dtype)
    work = np.float64 if block.dtype.itemsize > 4 or block.dtype.kind in "iu" else np.float32
    mean = (parts[0].astype(work) + parts[1] + parts[2] + parts[3]) * 0.25
    if block.dtype.kind in "iu":
        info = np.iinfo(block.dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(block.dtype)


def _note(text: str, notes: list[str] | None, stacklevel: int) -> None:
    """A pixel-size warning: appended to ``notes`` when the caller shows them itself, else issued."""
    if notes is None:
        warnings.warn(text, PixelSizeWarning, stacklevel=stacklevel + 1)
    else:
        notes.append(text)


def check_pixel_size(value: float, source: str | None, notes: list[str] | None = None) -> float:
    """Refuse impossible pixel sizes and warn on implausible ones (into ``notes`` if given)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SectionError(source, f"pixel size must be a number of micrometres, got {value!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise SectionError(source, f"pixel size must be a positive number of micrometres, got {value}")
    lo, hi = PLAUSIBLE_PIXEL_UM
    if value > 1e4:
        raise SectionError(source, f"pixel size {value} um is absurd for a histology section (over 1 cm per pixel)")
    if value < MIN_PIXEL_UM:
        raise SectionError(source, f"pixel size {value} um is impossibly small for a light microscope "
                                   f"(under {MIN_PIXEL_UM} um per pixel)")
    if not lo <= value <= hi:
        _note(f"{source}: pixel size {value} um is outside the usual {lo}-{hi} um range; check it", notes, 3)
    return value


def section_from_array(data: Any, pixel_size_um: float | None, name: str = "image") -> Section:
    """A section from an in-memory or lazy array, or a list of them (a multiscale napari layer)."""
    levels = list(data) if isinstance(data, (list, tuple)) else [data]
    levels = [_squeeze_to_yx(np.asarray(a) if isinstance(a, (list, tuple)) else a, name) for a in levels]
    return Section(name=name, levels=levels, pixel_size_um=pixel_size_um, source=None)


def _squeeze_to_yx(arr: Any, source: str, plane: int | None = None) -> Any:
    """An array without stated axes (a napari layer) to ``(Y, X)`` or ``(Y, X, S)``, guessing from its shape.

    Leading axes of length 1 are dropped (not the single row of a ``(1, W, 3)`` RGB image), a
    ``(3|4, H, W)`` array is taken for planar RGB(A), and ``plane`` picks a plane of a remaining stack.
    """
    while arr.shape[0] == 1 and (arr.ndim > 3 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4))):
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[2] not in (3, 4) and arr.shape[0] in (3, 4):
        arr = arr.transpose(1, 2, 0)  # planar RGB
    extra = arr.ndim - (3 if arr.ndim >= 3 and arr.shape[-1] in (3, 4) else 2)
    return _pick_plane(arr, max(extra, 0), source, plane)


def _pick_plane(arr: Any, n_lead: int, source: str, plane: int | None) -> Any:
    """Plane ``plane`` (row-major over the ``n_lead`` leading axes) of a stack; refuse a stack without one."""
    if n_lead == 0:
        if plane not in (None, 0):
            raise SectionError(source, f"plane {plane} is out of range: the image has a single plane")
        return arr
    lead = tuple(int(n) for n in arr.shape[:n_lead])
    n = int(np.prod(lead))
    if plane is None:
        raise SectionError(source, f"the image is a stack of {n} planes "
                                   f"(shape {tuple(int(s) for s in arr.shape)}); choose one with --plane / plane=")
    if not 0 <= plane < n:
        raise SectionError(source, f"plane {plane} is out of range: the stack has {n} planes")
    return arr[tuple(int(i) for i in np.unravel_index(plane, lead))]


def open_section(path: str | Path, pixel_size_um: float | None = None, plane: int | None = None,
                 notes: list[str] | None = None) -> Section:
    """Open a section file lazily. ``pixel_size_um`` overrides what the file says (even a wrong value there).

    Pixel-size warnings (none stated, implausible) are issued as :class:`PixelSizeWarning`, or appended to
    ``notes`` when given: a GUI shows them itself without touching the process's warning filters.
    """
    path = Path(path)
    if not path.exists():
        raise SectionError(path, "no such file")
    if path.is_dir():
        raise SectionError(path, "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise SectionError(path, "the file is empty (0 bytes)")
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        section, stated = _open_tiff(path, plane)
    elif suffix in PIL_SUFFIXES:
        section, stated = _open_pil(path, plane)
    else:
        raise SectionError(path, f"unsupported file type '{suffix}' (use TIFF, OME-TIFF, SVS, PNG or JPEG)")
    try:
        if pixel_size_um is not None:
            section.pixel_size_um = check_pixel_size(pixel_size_um, str(path), notes)
        elif stated is not None:
            try:
                section.pixel_size_um = check_pixel_size(stated, str(path), notes)
            except SectionError as exc:
                raise SectionError(path, f"{exc.problem}, as the file states it; give the right pixel size "
                                         "(--pixel-size / pixel_size_um=)") from None
        else:
            _note(f"{path}: the file does not state its pixel size (screen resolutions such as 72 dpi are ignored); "
                  "give it in micrometres (--pixel-size) or tiles will have the wrong physical size", notes, 2)
    except BaseException:
        section.close()
        raise
    return section


PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


def _pil_image(path: Path) -> Any:
    """The file opened by PIL (header only). PNG and JPEG, where whole-section images over PIL's own
    decompression-bomb limit (about 89 Mpx) are common, open through their PIL plugin classes, which have
    no such limit: :data:`MAX_PIL_PIXELS` is checked instead. PIL's module-wide limit is never changed
    (other code in the process, napari's included, relies on it). Other formats keep PIL's limit."""
    from PIL import Image, JpegImagePlugin, PngImagePlugin

    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PNG_MAGIC):
        return PngImagePlugin.PngImageFile(str(path))
    if head.startswith(JPEG_MAGIC):
        return JpegImagePlugin.jpeg_factory(str(path))  # a multi-picture (MPO) file keeps its frames
    return Image.open(path)


def _open_pil(path: Path, plane: int | None) -> tuple[Section, float | None]:
    """The section (without pixel size) and the pixel size the file states, if any."""
    from PIL import Image

    try:
        with _pil_image(path) as im:
            if im.width * im.height > MAX_PIL_PIXELS:
                raise SectionError(path, f"the image is larger than {MAX_PIL_PIXELS} pixels "
                                         f"({im.width} x {im.height}); convert it to a pyramidal TIFF")
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1 and plane is None:
                raise SectionError(path, f"the image has {n_frames} frames; choose one with --plane")
            if plane is not None and not 0 <= plane < n_frames:
                raise SectionError(path, f"frame {plane} is out of range: the image has {n_frames} "
                                         f"frame{'s' if n_frames > 1 else ''} (--plane counts from 0)")
            if plane:
                im.seek(plane)
            if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "1"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
                if im.mode == "RGBA" and im.getextrema()[3][0] == 255:
                    im = im.convert("RGB")
            data = np.asarray(im)
            dpi = im.info.get("dpi")
    except SectionError:
        raise
    except Image.DecompressionBombError:
        raise SectionError(path, "the image is larger than PIL's decompression-bomb limit for this format; "
                                 "convert it to a pyramidal TIFF") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise SectionError(path, f"not a readable image ({exc})") from None
    if data.ndim == 3 and data.shape[2] == 2:
        data = data[..., 0]
    pixel_um = None
    if dpi and path.suffix.lower() == ".png" and dpi[0]:
        pixel_um = _dpi_pixel_um(float(dpi[0]))
    return Section(name=path.stem, levels=[data], source=str(path)), pixel_um


def _open_tiff(path: Path, plane: int | None) -> tuple[Section, float | None]:
    """The section (without pixel size) and the pixel size the file states, if any."""
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises many kinds on corrupt headers
        raise SectionError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    try:
        if not tif.series:
            raise SectionError(path, "the TIFF holds no image series")
        series = tif.series[0]
        lut = _palette_lut(getattr(series, "keyframe", None) or tif.pages[0])
        levels = []
        for lev in series.levels:
            store = lev.aszarr()
            arr = zarr.open(store, mode="r")
            if not hasattr(arr, "shape"):  # a group: take its first array
                arr = arr[sorted(arr.array_keys())[0]]
            arr = _squeeze_axes(arr, lev.axes, path, plane)
            levels.append(arr if lut is None else _apply_lut(arr, lut))
        if np.prod(levels[0].shape[:2]) > 0 and levels[0].shape[0] * levels[0].shape[1] > 10 * path.stat().st_size * 1000:
            # a header claiming far more pixels than the file could hold
            _probe_first_tile(levels[-1], path)
        try:
            pixel_um = _tiff_pixel_size(tif, series)
        except Exception:  # a malformed resolution tag: refused later unless the user gives the pixel size
            pixel_um = float("nan")
        section = Section(name=_stem(path), levels=levels, source=str(path), _keep_open=[tif])
    except SectionError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise SectionError(path, f"cannot read the TIFF ({type(exc).__name__}: {exc})") from None
    return section, pixel_um


def _palette_lut(page: Any) -> np.ndarray | None:
    """The colour map of a palette page as a uint8 lookup table: ``(n,)`` if it is gray, else ``(n, 3)``."""
    if int(getattr(page, "photometric", -1)) != 3 or getattr(page, "colormap", None) is None:
        return None
    cmap = np.asarray(page.colormap)
    if cmap.ndim != 2 or cmap.shape[0] != 3:
        return None
    if cmap.max() > 255:  # TIFF colour maps are 16-bit
        cmap = cmap >> 8
    lut = np.ascontiguousarray(cmap.T.astype(np.uint8))
    return lut[:, 0].copy() if (lut == lut[:, :1]).all() else lut


def _apply_lut(arr: Any, lut: np.ndarray) -> Any:
    """Colour indices to colours, lazily."""
    if arr.ndim != 2 or np.dtype(arr.dtype).kind not in "ui":
        return arr
    top = len(lut) - 1

    def look_up(block):
        return lut[np.clip(block, 0, top)]

    if lut.ndim == 1:
        return arr.map_blocks(look_up, dtype=np.uint8)
    return arr.map_blocks(look_up, dtype=np.uint8, new_axis=2, chunks=(*arr.chunks, (lut.shape[1],)))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _probe_first_tile(arr: Any, path: Path) -> None:
    try:
        np.asarray(arr[:1, :1])
    except Exception as exc:
        raise SectionError(path, f"the pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None


def _squeeze_axes(arr: Any, axes: str, path: Path, plane: int | None) -> Any:
    """Bring a zarr array with tifffile ``axes`` to ``(Y, X)`` or ``(Y, X, S)``.

    The axes the file states decide the layout: samples (``S``) go last, other axes of length 1 are
    dropped and any others make a stack, of which ``plane`` picks one (row-major). Only without
    samples, a lone ``C`` axis of length 3 or 4 is taken for colour (RGB stored as OME channels).
    """
    import dask.array as da

    arr = da.from_zarr(arr)
    source = str(path)
    axes = axes.upper()
    if len(axes) != arr.ndim or axes.count("Y") != 1 or axes.count("X") != 1 or axes.count("S") > 1:
        return _squeeze_to_yx(arr, source, plane)  # axes not understood: guess from the shape
    lead = [i for i, a in enumerate(axes) if a not in "YXS"]
    samples = [i for i, a in enumerate(axes) if a == "S"]
    arr = arr.transpose(lead + [axes.index("Y"), axes.index("X")] + samples)
    lead_shape = arr.shape[:len(lead)]
    lead_axes = "".join(axes[i] for i, n in zip(lead, lead_shape) if n != 1)
    arr = arr[tuple(0 if n == 1 else slice(None) for n in lead_shape)]
    if samples:
        n = arr.shape[-1]
        if n in (1, 2):  # gray, or gray + alpha
            arr = arr[..., 0]
        elif n > 4:  # colour + extra samples
            arr = arr[..., :3]
    elif lead_axes == "C" and arr.shape[0] in (3, 4):
        return da.moveaxis(arr, 0, -1)
    return _pick_plane(arr, len(lead_axes), source, plane)


_SVS_MPP = re.compile(r"MPP\s*=\s*([0-9.eE+-]+)")


def _tiff_pixel_size(tif: Any, series: Any) -> float | None:
    """Micrometres per pixel from OME, SVS, ImageJ or TIFF resolution tags, if any."""
    if tif.is_ome and tif.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        if m:
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit.group(1) if unit else "µm", 1.0)
            return float(m.group(1)) * factor
    page = series.pages[0] if hasattr(series, "pages") else tif.pages[0]
    desc = getattr(page, "description", "") or ""
    m = _SVS_MPP.search(desc)
    if m:
        return float(m.group(1))
    if tif.is_imagej and tif.imagej_metadata:
        unit = str(tif.imagej_metadata.get("unit", "")).lower()
        tag = page.tags.get("XResolution")
        if tag and unit in ("micron", "um", "µm", "\\u00b5m"):
            num, den = tag.value
            if num:
                return den / num
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and unit in (2, 3):
            per_inch = num / den * (2.54 if unit == 3 else 1.0)
            return _dpi_pixel_um(per_inch)
    return None


def _dpi_pixel_um(dpi: float) -> float | None:
    """Micrometres per pixel from dots per inch; None for a screen resolution (:data:`SCREEN_DPI`),
    which image software writes by default and says nothing about the microscope."""
    if any(abs(dpi - d) <= 0.5 for d in SCREEN_DPI):
        return None
    return 25400.0 / dpi


def open_sections(paths: Sequence[str | Path], pixel_size_um: float | None = None) -> list[Section]:
    return [open_section(p, pixel_size_um) for p in paths]
