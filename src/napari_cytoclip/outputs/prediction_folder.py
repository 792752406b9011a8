"""Prediction results folders: label and confidence TIFFs, JSON summary, regions, GeoJSON, cache.

A results folder is built in a temp folder beside its destination and moved into place when
complete, so a half-written folder never appears and an existing one is kept unless
``overwrite``. TIFFs on the tile grid carry the grid step as resolution tags and
``{"origin": [y, x], "step": s, ...}`` (image pixels) as JSON in ImageDescription; the
full-resolution label TIFF is written tile by tile, so memory stays bounded for big sections.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Iterator

import numpy as np

from napari_cytoclip import __version__
from napari_cytoclip.models.bundle import Region, write_regions_csv
from napari_cytoclip.inference.grid import TileGrid
from napari_cytoclip.io.safe_files import atomic_path, atomic_write_text, new_output_folder, now_iso
from napari_cytoclip.inference.predict import Prediction
from napari_cytoclip.io.sections import Section

LABELS_TIF = "labels.tif"
CONFIDENCE_TIF = "confidence.tif"
LABELS_FULLRES_TIF = "labels_fullres.tif"
PREDICTION_JSON = "prediction.json"
REGIONS_CSV = "regions.csv"
GEOJSON = "annotations.geojson"
CACHE_DIR = "cache"
FULLRES_TILE = 512
RESULTS_KIND = "prediction"
SUMMARY_REGIONS = 5


def grid_metadata(grid: TileGrid, **extra) -> dict:
    """What a grid-shaped TIFF says about its placement on the section (image pixels)."""
    return {"origin": [float(v) for v in grid.origin], "step": float(grid.step), "stride_um": grid.stride_um,
            "pixel_size_um": grid.pixel_size_um, "software": f"napari-cytoclip {__version__}", **extra}


def write_grid_tiff(path: Path, data: np.ndarray, grid: TileGrid, **extra) -> Path:
    """A grid-shaped array as TIFF: resolution = one cell per ``stride_um``, placement as JSON."""
    import tifffile

    per_cm = 1e4 / grid.stride_um
    with atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(data), resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                         metadata=grid_metadata(grid, **extra), compression="zlib")
    return Path(path)


def cell_index(coords: np.ndarray, origin: float, step: float, n: int) -> np.ndarray:
    """The grid cell (along one axis) that each pixel coordinate falls in: nearest cell centre."""
    return np.clip(np.floor((np.asarray(coords, np.float64) - origin) / step + 0.5), 0, n - 1).astype(np.intp)


def upsample_rows(labels: np.ndarray, grid: TileGrid, y0: int, y1: int, width: int) -> np.ndarray:
    """Rows ``[y0, y1)`` of the grid ``labels`` painted on the section's pixel grid (nearest neighbour)."""
    rows = cell_index(np.arange(y0, y1), grid.origin[0], grid.step, grid.shape[0])
    cols = cell_index(np.arange(width), grid.origin[1], grid.step, grid.shape[1])
    return labels[rows[:, None], cols[None, :]]


def _fullres_tiles(labels: np.ndarray, grid: TileGrid, shape: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    height, width = shape
    for y0 in range(0, height, tile):
        block = upsample_rows(labels, grid, y0, min(y0 + tile, height), width)
        for x0 in range(0, width, tile):
            out = np.zeros((tile, tile), labels.dtype)
            part = block[:, x0:x0 + tile]
            out[:part.shape[0], :part.shape[1]] = part
            yield out


def write_fullres_labels(path: Path, labels: np.ndarray, grid: TileGrid, image_shape: tuple[int, int],
                         tile: int = FULLRES_TILE) -> Path:
    """Grid labels upsampled to the section's own pixel grid, as a tiled TIFF streamed tile by tile."""
    import tifffile

    labels = np.asarray(labels, np.uint16)
    per_cm = 1e4 / grid.pixel_size_um
    meta = {"origin": [0.0, 0.0], "step": 1.0, "pixel_size_um": grid.pixel_size_um,
            "software": f"napari-cytoclip {__version__}"}
    with atomic_path(path, suffix=".tif") as tmp:
        tifffile.imwrite(tmp, _fullres_tiles(labels, grid, image_shape, tile), shape=tuple(image_shape),
                         dtype=np.uint16, tile=(tile, tile), compression="zlib", resolution=(per_cm, per_cm),
                         resolutionunit="CENTIMETER", metadata=meta,
                         bigtiff=2 * image_shape[0] * image_shape[1] > 2**31)  # offsets past 4 GB
    return Path(path)


def regions_as_dicts(regions: list[Region]) -> list[dict]:
    """The fields the GeoJSON writer and JSON summaries use."""
    return [{"id": r.id, "name": r.name, "acronym": r.acronym, "color": r.color} for r in regions]


def write_geojson_labels(path: Path, labels: np.ndarray, grid: TileGrid, regions: list[Region],
                         properties: dict | None = None) -> Path:
    """QuPath-style GeoJSON of the label grid, polygons in image pixel coordinates."""
    from napari_cytoclip.outputs.geojson import labels_to_geojson, write_geojson

    data = labels_to_geojson(np.asarray(labels), regions_as_dicts(regions), origin=tuple(grid.origin),
                             step=float(grid.step), properties=properties)
    write_geojson(data, path)
    return Path(path)


def prediction_summary(prediction: Prediction, section: Section) -> dict:
    """The contents of ``prediction.json``: placement, model, regions, counts and timings."""
    grid = prediction.grid
    spec = prediction.signature.get("input", {})
    return {
        "software": f"napari-cytoclip {__version__}", "created": now_iso(),
        "source": prediction.source or section.source or section.name,
        "image_shape": list(section.shape), "section_hash": prediction.signature.get("section"),
        "pixel_size_um": grid.pixel_size_um,
        "grid": {"origin": [float(v) for v in grid.origin], "step": float(grid.step), "shape": list(grid.shape),
                 "units": "image pixels (level 0); cell (r, c) is centred at origin + (r, c) * step"},
        "stride_um": grid.stride_um, "label_um": prediction.label_um,
        "tile": {"size_px": spec.get("size"), "scales_um": spec.get("scales_um"), "mode": spec.get("mode"),
                 "polarity": spec.get("polarity")},
        "polarity": prediction.polarity,
        "model": {"name": prediction.model_name, "hash": prediction.signature.get("model"),
                  "path": prediction.model_path or None},
        "logit_scale": prediction.logit_scale, "complete": prediction.complete,
        "regions": [r.to_dict() for r in prediction.regions],
        "tile_counts": prediction.tile_counts(), "timings": prediction.timings,
        "files": {"labels": LABELS_TIF, "confidence": CONFIDENCE_TIF, "regions": REGIONS_CSV,
                  "geojson": GEOJSON, "cache": CACHE_DIR},
    }


def write_prediction_folder(prediction: Prediction, section: Section, out_dir: str | Path, *,
                            overwrite: bool = False, full_resolution: bool = False) -> Path:
    """Write every result of ``prediction`` into ``out_dir`` (created complete, or not at all)."""
    from napari_cytoclip.inference.cache import save_prediction

    out_dir = Path(out_dir)
    grid = prediction.grid
    summary = prediction_summary(prediction, section)
    with new_output_folder(out_dir, overwrite=overwrite, kind=RESULTS_KIND) as tmp:
        write_grid_tiff(tmp / LABELS_TIF, np.asarray(prediction.labels, np.uint16), grid)
        write_grid_tiff(tmp / CONFIDENCE_TIF, np.asarray(prediction.confidence, np.float32), grid)
        write_regions_csv(prediction.regions, tmp / REGIONS_CSV)
        write_geojson_labels(tmp / GEOJSON, prediction.labels, grid, prediction.regions,
                             properties={"source": summary["source"], "model": prediction.model_name})
        save_prediction(prediction, tmp / CACHE_DIR)
        if full_resolution:
            write_fullres_labels(tmp / LABELS_FULLRES_TIF, prediction.labels, grid, section.shape)
            summary["files"]["labels_fullres"] = LABELS_FULLRES_TIF
        atomic_write_text(tmp / PREDICTION_JSON, json.dumps(summary, indent=1, default=str))
    return out_dir


def results_summary(folder: str | Path, seconds: float | None = None) -> str:
    """What a results folder found, for people: tiles, top regions and their shares, time, how to open it."""
    import tifffile

    folder = Path(folder)
    summary = json.loads((folder / PREDICTION_JSON).read_text(encoding="utf-8"))
    labels = np.asarray(tifffile.imread(folder / LABELS_TIF))
    names = {int(r["id"]): r.get("name") or str(r["id"]) for r in summary.get("regions", [])}
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    total = int(counts.sum())
    shares = [f"{names.get(int(ids[i]), str(int(ids[i])))} {100 * counts[i] / total:.0f}%"
              for i in order[:SUMMARY_REGIONS]]
    if len(order) > SUMMARY_REGIONS:
        shares.append(f"{len(order) - SUMMARY_REGIONS} more")
    tiles = summary.get("tile_counts", {})
    if seconds is None:
        seconds = summary.get("timings", {}).get("total_s")
    took = f", predicted in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
    grid = summary.get("grid", {}).get("shape", list(labels.shape))
    lines = [f"  {tiles.get('encoded', total)} tiles with tissue of {tiles.get('grid_cells', labels.size)} grid "
             f"cells ({grid[0]} x {grid[1]}, every {summary.get('stride_um', 0):g} um){took}",
             f"  {len(ids)} regions: " + (", ".join(shares) if shares else "none (no tissue found)"),
             f"  open it in napari: napari --plugin napari-cytoclip {shlex.quote(str(folder))}"]
    return "\n".join(lines)


def read_grid_metadata(path: str | Path) -> dict:
    """The JSON placement written into a grid TIFF's ImageDescription (``{}`` if there is none)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        desc = tif.pages[0].description or ""
    try:
        meta = json.loads(desc)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
