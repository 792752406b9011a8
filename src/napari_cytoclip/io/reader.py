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

It also reopens its own results: a prediction folder (``DIR/<image>/`` with ``prediction.json``, as
``napari-cytoclip predict`` writes it) opens as the section, the confidence and the regions as a
Labels layer with names, colours and the grid's scale and offset, whose ``metadata["cytoclip"]``
points at the folder and its embedding cache (the widgets restore the prediction from it, see
:func:`napari_cytoclip.widgets.state.state_of`); a grid TIFF of ours opened alone (``labels.tif``,
``confidence.tif``: JSON placement in ImageDescription) opens on the grid, labels as a Labels layer.
Everything here is Qt-free and returns layer data tuples only.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from napari_cytoclip.errors import CytoclipError

SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".svs")
PYRAMID_ABOVE = 8192
OVERVIEW_SIDE = 2048
OVERVIEW_FACTOR = 4


META_KEY = "cytoclip"  # the layer metadata key the widgets read (widgets.state.META_KEY)
PREDICTION_JSON = "prediction.json"
TRANSPARENT = np.zeros(4, np.float32)
LOAD_BELOW = 1 << 26  # grid TIFFs up to this many pixels are read into memory (editable); larger ones stay lazy


class PredictionFolderError(CytoclipError):
    """A results folder cannot be reopened (missing or malformed files)."""


def napari_get_reader(path: str | list[str]) -> Callable | None:
    """The reader for ``path`` (or a list of paths): a prediction folder, our grid TIFFs, or 2-D section TIFFs."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if len(paths) == 1 and is_prediction_folder(paths[0]):
        return read_prediction_folder
    if not paths or not all(_grid_tiff(p) is not None or _claims(p) for p in paths):
        return None
    return read_sections


def is_prediction_folder(path: str | Path) -> bool:
    """Whether ``path`` is a results folder written by ``napari-cytoclip predict``."""
    p = Path(path)
    return p.is_dir() and (p / PREDICTION_JSON).is_file()


def _grid_tiff(path: str | Path) -> dict | None:
    """The placement JSON of a grid TIFF written by napari-cytoclip, or None for any other file."""
    p = Path(path)
    if not p.name.lower().endswith((".tif", ".tiff")) or not p.is_file():
        return None
    try:
        from napari_cytoclip.outputs.prediction_folder import read_grid_metadata

        meta = read_grid_metadata(p)
    except Exception:  # not a TIFF tifffile reads: other readers may
        return None
    ours = str(meta.get("software", "")).startswith("napari-cytoclip")
    try:
        ok = ours and len(meta["origin"]) == 2 and float(meta["step"]) > 0 and float(meta["pixel_size_um"]) > 0
    except (KeyError, TypeError, ValueError):
        return None
    return meta if ok else None


def _claims(path: str | Path) -> bool:
    from napari_cytoclip.errors import SectionError
    from napari_cytoclip.io.sections import open_section

    p = Path(path)
    if not p.name.lower().endswith(SUFFIXES) or not p.is_file():
        return False
    try:
        section = open_section(p, notes=[])
    except SectionError:
        return False
    except Exception:  # a file other readers may understand
        return False
    section.close()
    return True


def read_sections(path: str | list[str]) -> list[tuple[Any, dict, str]]:
    """Layer data for each path: lazy pyramid levels, pixel size as scale (µm)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out = []
    for p in paths:
        meta = _grid_tiff(p)
        out.append(section_layer_data(p) if meta is None else grid_tiff_layer_data(p, meta))
    return out


def section_layer_data(path: str | Path) -> tuple[Any, dict, str]:
    from napari_cytoclip.io.sections import open_section

    notes: list[str] = []
    section = open_section(path, notes=notes)
    levels = list(section.levels)
    if len(levels) == 1 and max(levels[0].shape[:2]) > PYRAMID_ABOVE:
        levels = _with_overviews(levels[0])
    px = section.pixel_size_um
    metadata = {"pixel_size_um": px, "source": str(path), "pyramid_levels": len(section.levels),
                "pixel_size_known": px is not None}
    if notes:
        metadata["warnings"] = notes
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


# ---------------------------------------------------------------------------------------------
# colours and hover tables of region layers (also used by the widgets)

def region_colormap(regions: Sequence[Any]) -> dict:
    """A direct colormap as a plain mapping (napari's Labels turns it into a ``DirectLabelColormap``):
    every region its own colour, background and unknown ids transparent."""
    colors: dict = {None: TRANSPARENT, 0: TRANSPARENT}
    colors.update({int(r.id): np.asarray(r.rgba(), np.float32) for r in regions})
    return colors


def features_table(regions: Sequence[Any], labels: np.ndarray | None = None,
                   confidence: np.ndarray | None = None):
    """One row per region (``index`` = label id): name, acronym and the model's mean confidence.

    Shown by napari when hovering over a label (no counts: they would go stale as the user paints).
    """
    import pandas as pd

    labels = None if labels is None else np.asarray(labels)
    rows = []
    for r in regions:
        inside = (labels == r.id) if labels is not None else None
        ok = confidence is not None and inside is not None and bool(inside.any())
        conf = float(np.nanmean(confidence[inside])) if ok else float("nan")
        rows.append({"index": int(r.id), "name": r.name, "acronym": r.acronym, "mean confidence": round(conf, 3)})
    return pd.DataFrame(rows, columns=["index", "name", "acronym", "mean confidence"])


# ---------------------------------------------------------------------------------------------
# our own results: grid TIFFs and prediction folders

def grid_transform(meta: dict, image_scale: Sequence[float] | None = None,
                   image_translate: Sequence[float] = (0.0, 0.0)) -> dict:
    """``scale`` and ``translate`` of a grid-shaped layer: origin and step (image pixels) times the pixel size."""
    px = float(meta["pixel_size_um"])
    sy, sx = (px, px) if image_scale is None else (float(image_scale[0]), float(image_scale[1]))
    oy, ox = (float(v) for v in meta["origin"])
    step = float(meta["step"])
    return {"scale": (step * sy, step * sx),
            "translate": (float(image_translate[0]) + oy * sy, float(image_translate[1]) + ox * sx)}


def _read_tiff(path: Path) -> Any:
    """A grid TIFF's pixels: in memory when small, else a lazy zarr array."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if int(np.prod(page.shape)) <= LOAD_BELOW:
            return tif.asarray()
    return zarr.open(tifffile.imread(path, aszarr=True), mode="r")


def grid_tiff_layer_data(path: str | Path, meta: dict | None = None) -> tuple[Any, dict, str]:
    """A grid TIFF of ours on the section's coordinates: integer data as Labels, float data as an image.

    Beside a ``prediction.json`` (a results folder), labels get the region names and colours.
    """
    path = Path(path)
    meta = meta if meta is not None else _grid_tiff(path)
    if meta is None:
        raise PredictionFolderError(path, "not a grid TIFF written by napari-cytoclip")
    data = _read_tiff(path)
    t = grid_transform(meta)
    kwargs: dict = {"name": path.stem, "scale": t["scale"], "translate": t["translate"],
                    "metadata": {"pixel_size_um": float(meta["pixel_size_um"]), "source": str(path),
                                 "grid": {k: meta[k] for k in ("origin", "step") if k in meta}}}
    if np.dtype(data.dtype).kind in "ui":
        summary_path = path.parent / PREDICTION_JSON
        if summary_path.is_file():
            try:
                regions = _regions(read_summary(path.parent), summary_path)
            except CytoclipError as exc:
                warnings.warn(f"{exc}; the labels open without region names", stacklevel=2)
            else:
                kwargs.update(colormap=region_colormap(regions), features=features_table(regions))
        kwargs["opacity"] = 0.55
        return data, kwargs, "labels"
    kwargs["colormap"] = "magma"
    if path.stem == "confidence":
        kwargs["contrast_limits"] = (0.0, 1.0)
    return data, kwargs, "image"


def read_summary(folder: Path) -> dict:
    path = folder / PREDICTION_JSON
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PredictionFolderError(path, f"cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise PredictionFolderError(path, f"malformed JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise PredictionFolderError(path, "is not a prediction summary (expected a JSON object)")
    return summary


def _regions(summary: dict, source: Path) -> list:
    from napari_cytoclip.models.bundle import region_from_dict

    regions = summary.get("regions")
    if not isinstance(regions, list) or not regions:
        raise PredictionFolderError(source, "lists no regions")
    return [region_from_dict(r, source) for r in regions]


def resolve_source(folder: str | Path, source: str) -> Path:
    """The section image a prediction was made from: ``source`` as an absolute path, else relative to the
    results folder, else relative to the working directory; raises SectionError naming the paths tried."""
    from napari_cytoclip.errors import SectionError

    folder = Path(folder)
    if not source:
        raise SectionError(folder / PREDICTION_JSON, "names no source image")
    given = Path(source)
    tried = [given] if given.is_absolute() else [folder / given, given]
    for candidate in tried:
        if candidate.is_file():
            return candidate.resolve()
    where = " or ".join(str(p) for p in tried)
    raise SectionError(folder / PREDICTION_JSON,
                       f"the section image '{source}' is missing (looked for {where}); move it back or edit "
                       "\"source\" in prediction.json to reopen the prediction with its image")


def prediction_bundle(summary: dict, folder: str | Path) -> Any:
    """The model bundle that made a prediction: the folder recorded in ``prediction.json`` or the shipped
    model, whichever has the recorded weights hash; raises BundleError when neither does."""
    from napari_cytoclip.models.bundle import default_bundle_path, load_bundle
    from napari_cytoclip.errors import BundleError

    model = summary.get("model") if isinstance(summary.get("model"), dict) else {}
    want, name = model.get("hash"), model.get("name") or "?"
    recorded = model.get("path")
    candidates = []
    if recorded:
        candidates += [Path(recorded)] if Path(recorded).is_absolute() else [Path(folder) / recorded, Path(recorded)]
    candidates.append(default_bundle_path())
    for candidate in candidates:
        if not candidate.is_dir():
            continue
        try:
            bundle = load_bundle(candidate)
        except CytoclipError:
            continue
        if not want or bundle.weights_hash() == want:
            return bundle
    looked = ", ".join(str(c) for c in candidates)
    raise BundleError(Path(folder) / PREDICTION_JSON,
                      f"the model '{name}' (weights hash {want}) that made this prediction was not found "
                      f"(looked in {looked}); queries, export and fine-tuning need it")


def read_prediction_folder(path: str | list[str]) -> list[tuple[Any, dict, str]]:
    """Reopen a results folder: the section (if found), the confidence and the regions as a Labels layer.

    The Labels layer's ``metadata["cytoclip"]`` holds plain values only: the folder, the cache folder
    and the summary; the widgets restore the prediction's state from them when they first see it.
    A missing section image is reported (a warning) and the regions open without it.
    """
    folder = Path(path if isinstance(path, (str, Path)) else path[0])
    summary = read_summary(folder)
    summary_path = folder / PREDICTION_JSON
    files = summary.get("files") if isinstance(summary.get("files"), dict) else {}
    labels_path = folder / str(files.get("labels", "labels.tif"))
    meta = _grid_tiff(labels_path)
    if meta is None:
        raise PredictionFolderError(labels_path, "missing, or not a label grid written by napari-cytoclip")
    regions = _regions(summary, summary_path)
    layers: list[tuple[Any, dict, str]] = []
    image_name = Path(str(summary.get("source") or folder.name)).name
    missing = None
    try:
        source = resolve_source(folder, str(summary.get("source") or ""))
    except CytoclipError as exc:
        source, missing = None, str(exc)
        warnings.warn(missing, stacklevel=2)
    px = float(meta["pixel_size_um"])
    if source is not None:
        data, kwargs, kind = section_layer_data(source)
        kwargs["scale"] = (px, px)  # the pixel size the prediction used (a JPEG states none)
        kwargs["metadata"].update(pixel_size_um=px, pixel_size_known=True)
        kwargs["metadata"].pop("warnings", None)  # "the file states no pixel size": the prediction does
        image_name = kwargs["name"]
        layers.append((data, kwargs, kind))
    t = grid_transform(meta)
    labels = _read_tiff(labels_path)
    conf_path = folder / str(files.get("confidence", "confidence.tif"))
    confidence = np.asarray(_read_tiff(conf_path), np.float32) if _grid_tiff(conf_path) is not None else None
    if confidence is not None:
        layers.append((confidence, {"name": f"cytoclip confidence ({image_name})", "scale": t["scale"],
                                    "translate": t["translate"], "colormap": "magma", "contrast_limits": (0.0, 1.0),
                                    "opacity": 0.7, "visible": False,
                                    "metadata": {META_KEY: {"role": "confidence", "image": image_name,
                                                            "prediction_folder": str(folder)}}}, "image"))
    entry = {"role": "labels", "prediction_folder": str(folder.resolve()),
             "cache": str((folder / str(files.get("cache", "cache"))).resolve()),
             "source": str(source) if source is not None else None, "image_missing": missing,
             "complete": bool(summary.get("complete", True)), "status": "complete", "image": image_name,
             "model": (summary.get("model") or {}).get("name", ""),
             "model_path": (summary.get("model") or {}).get("path"),
             "stride_um": float(meta.get("stride_um") or float(meta["step"]) * px), "pixel_size_um": px,
             "grid": summary.get("grid"), "regions": [r.to_dict() for r in regions]}
    layers.append((np.asarray(labels), {"name": f"cytoclip regions ({image_name})", "scale": t["scale"],
                                        "translate": t["translate"], "opacity": 0.55,
                                        "colormap": region_colormap(regions),
                                        "features": features_table(regions, labels, confidence),
                                        "metadata": {META_KEY: entry}}, "labels"))
    return layers
