"""napari reader for section slides: TIFF, OME-TIFF and SVS, opened lazily as multiscale layers.

What it claims: files ending in ``.tif``, ``.tiff``, ``.svs``, ``.ome.tif`` or ``.ome.tiff`` that
hold one 2-D grayscale or RGB(A) image (pyramidal or not). The pixel size found in the file
(OME ``PhysicalSizeX``, SVS ``MPP``, ImageJ or TIFF resolution tags) becomes the layer ``scale``
in micrometres and ``metadata["pixel_size_um"]``.

What it leaves to other readers (returns None): stacks (several planes, z or time, multichannel
fluorescence), files that do not open as a TIFF, and anything else. Plain small TIFFs without a
pyramid are read too (one level); large ones without a pyramid (over ``PYRAMID_ABOVE`` pixels a
side) get lazy strided overview levels so napari can show them as multiscale without loading the
whole image.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".svs")
PYRAMID_ABOVE = 8192
OVERVIEW_SIDE = 2048
OVERVIEW_FACTOR = 4


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """The reader for ``path`` (or a list of paths) if every one is a 2-D section TIFF, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if not paths or not all(_claims(p) for p in paths):
        return None
    return read_sections


def _claims(path: str | Path) -> bool:
    from .errors import SectionError
    from .sections import open_section

    p = Path(path)
    if not p.name.lower().endswith(SUFFIXES) or not p.is_file():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            section = open_section(p)
    except SectionError:
        return False
    except Exception:  # a file other readers may understand
        return False
    section.close()
    return True


def read_sections(path: str | list[str]) -> list[tuple[Any, dict, str]]:
    """Layer data for each path: lazy pyramid levels, pixel size as scale (µm)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return [section_layer_data(p) for p in paths]


def section_layer_data(path: str | Path) -> tuple[Any, dict, str]:
    from .sections import PixelSizeWarning, open_section

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PixelSizeWarning)
        section = open_section(path)
    levels = list(section.levels)
    if len(levels) == 1 and max(levels[0].shape[:2]) > PYRAMID_ABOVE:
        levels = _with_overviews(levels[0])
    px = section.pixel_size_um
    metadata = {"pixel_size_um": px, "source": str(path), "pyramid_levels": len(section.levels),
                "pixel_size_known": px is not None}
    if caught:
        metadata["warnings"] = [str(w.message) for w in caught]
    kwargs: dict = {"name": section.name, "metadata": metadata, "rgb": section.is_rgb,
                    "multiscale": len(levels) > 1, "scale": (px, px) if px else (1.0, 1.0)}
    if section.dtype.kind == "u" and section.dtype.itemsize == 1:
        kwargs["contrast_limits"] = (0, 255)
    elif not section.is_rgb:
        lo, hi = section.intensity_range  # from a thumbnail: avoids napari reading the whole base level
        kwargs["contrast_limits"] = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    # the layer's arrays keep the open TIFF alive; section.close() would close it under them
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


def _with_overviews(base: Any) -> list:
    """Lazy strided overview levels for a large single-level image (read on demand)."""
    import dask.array as da

    arr = base if isinstance(base, da.Array) else da.from_array(base, chunks=(2048, 2048) + base.shape[2:])
    levels = [arr]
    while max(levels[-1].shape[:2]) > OVERVIEW_SIDE:
        levels.append(levels[-1][::OVERVIEW_FACTOR, ::OVERVIEW_FACTOR])
    return levels
