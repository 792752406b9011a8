"""Corrections to training data: edited label grids become image-text pairs and annotations.

An export folder accumulates: ``pairs/`` (a pair folder, content addressed, so exporting twice
adds only new pairs), and the latest ``labels.tif``, ``annotations.geojson``, ``regions.csv``
(and optionally ``labels_fullres.tif``), each rewritten atomically; ``export.json`` logs every
export. The folder's marker (:data:`io_utils.MARKER`) lists the files exports wrote with their
digests: a file is replaced only while it is listed and unchanged, so a user's file is never overwritten.
With the cells' image features (``prediction.features`` or ``features=``) an export also adds the
section's taught cells to the folder's teaching set (``teaching.safetensors`` + ``teaching.json``,
:mod:`napari_cytoclip.teach.teaching`), which ``napari-cytoclip teach`` fits a learner on; exporting
the same section again replaces its examples.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from napari_cytoclip.models.bundle import TEACHING_JSON, TEACHING_SAFETENSORS, ModelBundle, Region, write_regions_csv
from napari_cytoclip.inference.cache import jsonable
from napari_cytoclip.errors import CacheMismatch, Cancelled, CytoclipError, OutputError
from napari_cytoclip.inference.grid import TileGrid
from napari_cytoclip.io.safe_files import now_iso, atomic_write_text, owned, read_marker, read_regular_bytes, recording
from napari_cytoclip.outputs.prediction_folder import (GEOJSON, LABELS_FULLRES_TIF, LABELS_TIF, REGIONS_CSV,
                                                       write_fullres_labels, write_geojson_labels, write_grid_tiff)
from napari_cytoclip.teach.pairs import (PAIRS_CSV, PAIRS_JSONL, Pair, check_folder_geometry, geometry_record,
                                         write_pairs)
from napari_cytoclip.models.bundle import InputSpec
from napari_cytoclip.inference.predict import Prediction
from napari_cytoclip.io.sections import Section
from napari_cytoclip.models.model import POOLED, feature_kind

PAIRS_DIR = "pairs"
EXPORT_JSON = "export.json"
EXPORT_FORMAT = "napari-cytoclip-export"
READ_BATCH = 256
EXPORT_KIND = "export"
# the files an export replaces: each only while the folder's marker lists it, unchanged
EXPORT_FILES = (LABELS_TIF, GEOJSON, REGIONS_CSV, LABELS_FULLRES_TIF, EXPORT_JSON,
                f"{PAIRS_DIR}/{PAIRS_CSV}", f"{PAIRS_DIR}/{PAIRS_JSONL}", TEACHING_SAFETENSORS, TEACHING_JSON)


@dataclass
class ExportResult:
    """What one export wrote."""

    folder: Path
    pairs_added: int
    pairs_existing: int
    corrected_cells: int
    confirmed_cells: int
    files: dict[str, Path] = field(default_factory=dict)
    taught_cells: int = 0             # cells added to the folder's teaching set (0: no features given)


def export_corrections(section: Section, prediction: Prediction, edited_labels: np.ndarray, out_dir: str | Path,
                       bundle: ModelBundle, *, confirmed: np.ndarray | None = None,
                       regions: list[Region] | None = None, full_resolution: bool = False,
                       stop: threading.Event | None = None, features: np.ndarray | None = None,
                       feature_rows: np.ndarray | None = None, geometry: InputSpec | None = None,
                       labels_source: str | Path | None = None) -> ExportResult:
    """Turn corrected (and confirmed) grid cells into training pairs and write the edited annotations.

    ``edited_labels`` has the grid's shape; corrected cells are those where it differs from the
    prediction and is non-zero; ``confirmed`` optionally marks reviewed cells (kept where labelled).
    Setting ``stop`` while the pairs are written raises ``Cancelled``: the pair list and the
    annotations keep their earlier content (tiles already written stay, unlisted, and are reused).
    ``features``: pooled image features of ``prediction.cells`` (default ``prediction.features``; or
    only of the rows ``feature_rows``, which include every corrected and confirmed encoded cell): with
    them the cells join the folder's teaching set, which must come from the same model.
    ``geometry``: the tiles to cut (:func:`teach.pairs.export_geometry`, e.g. 224 px RGB for another
    model) instead of the model's inputs; a pair folder holds one geometry.
    ``labels_source``: the file (or layer) the edited labels came from, named by errors about them
    (default: the section).
    """
    out_dir = Path(out_dir)
    grid = prediction.grid
    source = prediction.source or section.source or section.name
    labels_source = source if labels_source is None else str(labels_source)
    edited = _check_edited(edited_labels, grid, labels_source)
    regions = list(regions if regions is not None else prediction.regions)
    by_id = _check_vocabulary(edited, regions, labels_source)
    _check_section(section, prediction, source)
    corrected = (edited != np.asarray(prediction.labels)) & (edited > 0)
    reviewed = _check_confirmed(confirmed, grid, source) & (edited > 0) & ~corrected
    _check_export_folder(out_dir)

    cells = np.argwhere(corrected | reviewed).astype(np.int64)
    base = _base_record(section, prediction, bundle, source)
    check_folder_geometry(out_dir / PAIRS_DIR, geometry or bundle.input)
    if geometry is not None:  # tiles for another model: record what they are
        base["input"] = geometry_record(geometry)
    kind = "pooled"
    if features is None:
        features = getattr(prediction, "features", None)
    if features is None and feature_kind(bundle) != POOLED:  # no pooled features: teach on the joint embedding
        features, feature_rows, kind = prediction.embeddings, None, "joint"
    taught = None
    if features is not None:
        taught = _teaching_examples(out_dir, section, prediction, edited, regions, features, feature_rows,
                                    reviewed, base, source, kind)
    with recording(out_dir, EXPORT_KIND, EXPORT_FILES):
        tiles_of = bundle if geometry is None else replace(bundle, input=geometry)
        added, existing = write_pairs(out_dir / PAIRS_DIR, _pairs(section, prediction, tiles_of, edited, cells,
                                                                  corrected, by_id, base, stop), root=out_dir)
        files = _write_annotations(out_dir, section, grid, edited, regions, source, prediction, full_resolution)
        files["pairs"] = out_dir / PAIRS_DIR
        result = ExportResult(out_dir, added, existing, int(corrected.sum()), int(reviewed.sum()), files)
        if taught is not None:
            files["teaching"] = out_dir / TEACHING_JSON
            result.taught_cells = len(taught[0])
        _log_export(out_dir, result, source, base["time"])
        if taught is not None:  # last: an export that fails before here leaves the teaching set as it was
            taught[1].save(out_dir)
    return result


def _teaching_examples(out_dir: Path, section: Section, prediction: Prediction, edited: np.ndarray,
                       regions: list[Region], features, feature_rows, confirmed: np.ndarray, base: dict, source: str,
                       kind: str):
    """This section's teaching set, and the folder's with it (checked before anything is written)."""
    from napari_cytoclip.teach.teaching import examples_from_section, has_teaching_set, load_teaching_set

    new = examples_from_section(prediction, edited, regions, features, confirmed=confirmed,
                                name=Path(source).name, section_hash=section.content_hash(),
                                model={"name": base["model_name"], "hash": base["model_hash"]}, when=base["time"],
                                feature_rows=feature_rows, feature_kind=kind)
    if not has_teaching_set(out_dir):
        return new, new
    old = load_teaching_set(out_dir)
    if old.model.get("hash") != new.model["hash"]:
        raise CacheMismatch(out_dir, f"holds teaching examples of model {old.model.get('name')} "
                                     f"({old.model.get('hash')}), this prediction is by {new.model['name']} "
                                     f"({new.model['hash']}); export into another folder")
    return new, old.extend(new, out_dir)


def _check_edited(edited_labels: np.ndarray, grid: TileGrid, source: str) -> np.ndarray:
    edited = np.asarray(edited_labels)
    if tuple(edited.shape) != tuple(grid.shape):
        raise CytoclipError(source, f"the edited labels have shape {tuple(edited.shape)}, "
                                    f"the prediction grid is {tuple(grid.shape)}")
    return _as_label_ids(edited, source)


def _as_label_ids(arr: np.ndarray, source) -> np.ndarray:
    """Integer labels in 0..65535 as uint16, or a clear error."""
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "ui":
        raise CytoclipError(source, f"labels must be integers, got {arr.dtype} values")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise CytoclipError(source, f"label ids must lie in 0..65535, found {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.uint16, copy=False)


def _check_vocabulary(edited: np.ndarray, regions: list[Region], source: str) -> dict[int, Region]:
    by_id = {r.id: r for r in regions}
    unknown = sorted(int(i) for i in np.unique(edited) if i and int(i) not in by_id)
    if unknown:
        raise CytoclipError(source, f"label ids {unknown} are not in the region vocabulary "
                                    f"(known ids: {sorted(by_id)}); add these regions before exporting")
    return by_id


def _check_confirmed(confirmed: np.ndarray | None, grid: TileGrid, source: str) -> np.ndarray:
    if confirmed is None:
        return np.zeros(grid.shape, bool)
    mask = np.asarray(confirmed)
    if tuple(mask.shape) != tuple(grid.shape):
        raise CytoclipError(source, f"the confirmed mask has shape {tuple(mask.shape)}, the grid is {tuple(grid.shape)}")
    return mask.astype(bool)


def _check_section(section: Section, prediction: Prediction, source: str) -> None:
    px = section.require_pixel_size()
    if abs(px - prediction.grid.pixel_size_um) > 1e-6 * max(px, 1.0):
        raise CacheMismatch(source, f"the section's pixel size ({px} um) differs from the prediction's "
                                    f"({prediction.grid.pixel_size_um} um)")
    expected = prediction.signature.get("section")
    if expected and expected != section.content_hash():
        raise CacheMismatch(source, "the prediction was made for another image; predict this image again")


def _check_export_folder(out_dir: Path) -> None:
    """Refuse a folder where the export would replace a file that no earlier export wrote, unchanged."""
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise OutputError(out_dir, "exists and is not a folder")
    if not out_dir.is_dir():
        return
    marker = read_marker(out_dir)
    if marker is not None and marker["kind"] != EXPORT_KIND:
        raise OutputError(out_dir, f"is a napari-cytoclip {marker['kind']} folder, not an export folder; "
                                   "choose another folder")
    if marker is None:  # not an export folder: none of the names an export writes may be there
        names = [n for n in EXPORT_FILES if "/" not in n] + [f"{PAIRS_DIR}/"]
        foreign = [n for n in names if os.path.lexists(out_dir / n.rstrip("/"))]
    else:
        foreign = [n for n in EXPORT_FILES if os.path.lexists(out_dir / n) and not owned(out_dir, n, EXPORT_KIND)]
    if foreign:
        raise OutputError(out_dir, f"holds {', '.join(foreign)} not written by an export of napari-cytoclip "
                                   "(or changed since); an export never replaces them: choose another folder")


def _base_record(section: Section, prediction: Prediction, bundle: ModelBundle, source: str) -> dict:
    return {"source": source, "pixel_size_um": float(prediction.grid.pixel_size_um),
            "model_name": prediction.model_name or bundle.name,
            "model_hash": prediction.signature.get("model") or bundle.weights_hash(),
            "time": now_iso(), "input": jsonable(bundle.to_json()["input"])}


def caption_for(region: Region) -> str:
    """The caption a corrected window gets: the region's first training caption."""
    from napari_cytoclip.models.vocabularies import training_captions

    return training_captions(region)[0]


def _pairs(section: Section, prediction: Prediction, bundle: ModelBundle, edited: np.ndarray, cells: np.ndarray,
           corrected: np.ndarray, by_id: dict[int, Region], base: dict,
           stop: threading.Event | None = None) -> Iterator[Pair]:
    """Pairs for ``cells``, windows read a batch at a time so memory stays bounded."""
    from napari_cytoclip.inference.windows import WindowReader

    reader = WindowReader(section, bundle.input, prediction.polarity)
    px = float(prediction.grid.pixel_size_um)
    predicted = np.asarray(prediction.labels)
    for i in range(0, len(cells), READ_BATCH):
        batch = cells[i:i + READ_BATCH]
        centers = prediction.grid.centers(batch)
        for (r, c), center, window in zip(batch, centers, reader.read(centers)):
            if stop is not None and stop.is_set():
                raise Cancelled()
            label = int(edited[r, c])
            region = by_id[label]
            record = {**base, "row": int(r), "col": int(c),
                      "center_px": [float(center[0]), float(center[1])],
                      "center_um": [float(center[0] * px), float(center[1] * px)],
                      "predicted_label": int(predicted[r, c]), "corrected_label": label,
                      "region_id": label, "region_name": region.name,
                      "kind": "corrected" if corrected[r, c] else "confirmed"}
            yield Pair(window, caption_for(region), record)


def _write_annotations(out_dir: Path, section: Section, grid: TileGrid, edited: np.ndarray, regions: list[Region],
                       source: str, prediction: Prediction, full_resolution: bool) -> dict[str, Path]:
    files = {
        "labels": write_grid_tiff(out_dir / LABELS_TIF, edited, grid, source=source, model=prediction.model_name,
                                  edited=True),
        "geojson": write_geojson_labels(out_dir / GEOJSON, edited, grid, regions,
                                        properties={"source": source, "edited": True}),
    }
    write_regions_csv(regions, out_dir / REGIONS_CSV)
    files["regions"] = out_dir / REGIONS_CSV
    if full_resolution:
        files["labels_fullres"] = write_fullres_labels(out_dir / LABELS_FULLRES_TIF, edited, grid, section.shape)
    return files


def _log_export(out_dir: Path, result: ExportResult, source: str, time: str) -> None:
    path = out_dir / EXPORT_JSON
    try:
        log = json.loads(read_regular_bytes(path)) if os.path.lexists(path) else {}
    except (ValueError, RecursionError):
        log = {}
    exports = log.get("exports", []) if isinstance(log, dict) else []
    exports.append({"time": time, "source": source, "pairs_added": result.pairs_added,
                    "pairs_existing": result.pairs_existing, "corrected_cells": result.corrected_cells,
                    "confirmed_cells": result.confirmed_cells})
    atomic_write_text(path, json.dumps({"format": EXPORT_FORMAT, "exports": exports}, indent=1))


# ---------------------------------------------------------------------------------------------
# reading label images back

def read_label_image(path: str | Path) -> np.ndarray:
    """A 2-D integer label image from a TIFF or PNG, as uint16, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CytoclipError(path, "label image not found" if not path.exists() else "is not a file")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        arr = _read_tiff(path)
    elif suffix == ".png":
        arr = _read_png(path)
    else:
        raise CytoclipError(path, f"label images must be TIFF or PNG, not '{suffix or 'no extension'}'")
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise CytoclipError(path, f"a label image must be 2-D, got shape {tuple(arr.shape)}")
    return _as_label_ids(arr, path)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        return np.asarray(tifffile.imread(path))
    except Exception as exc:  # tifffile raises many kinds on a bad file
        raise CytoclipError(path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "I", "I;16", "P", "1"):
                raise CytoclipError(path, f"a label PNG must be single-channel, got mode {im.mode}")
            return np.asarray(im)
    except CytoclipError:
        raise
    except (OSError, ValueError) as exc:
        raise CytoclipError(path, f"not a readable PNG ({exc})") from None


def read_label_grid(path: str | Path, expected_shape: tuple[int, int]) -> np.ndarray:
    """A labels.tif on the prediction grid, refused unless it has ``expected_shape`` and integer ids."""
    labels = read_label_image(path)
    if tuple(labels.shape) != tuple(expected_shape):
        raise CytoclipError(path, f"the labels have shape {tuple(labels.shape)}, "
                                  f"the prediction grid is {tuple(expected_shape)}")
    return labels


def labels_on_grid(labels: str | Path | np.ndarray, grid: TileGrid, image_shape: tuple[int, int],
                   source: str | Path | None = None) -> np.ndarray:
    """Labels for each grid cell from a grid-shaped labels.tif or a full-resolution label image.

    ``labels`` is a path or an already read label image; a full-resolution image (the section's
    size) is reduced by taking the label at each cell centre.
    """
    if not isinstance(labels, np.ndarray):
        source, labels = labels, read_label_image(labels)
    if tuple(labels.shape) == tuple(grid.shape):
        return labels
    if tuple(labels.shape) == tuple(image_shape):
        centers = np.rint(grid.centers()).astype(np.intp)
        ys = np.clip(centers[:, 0], 0, image_shape[0] - 1)
        xs = np.clip(centers[:, 1], 0, image_shape[1] - 1)
        return labels[ys, xs].reshape(grid.shape)
    raise CytoclipError(source, f"the labels have shape {tuple(labels.shape)}: expected the prediction grid "
                                f"{tuple(grid.shape)} or the image size {tuple(image_shape)}")
