"""The tile-embedding cache: a prediction saved to a folder and read back without the model.

A cache folder holds ``prediction.json`` (grid, regions, signature, model name, timings...) and
``embeddings.npz`` (cells, label grid, confidence grid and, for up to ``LARGE_CELLS`` cells, the
float16 embeddings). Larger predictions keep their embeddings in ``embeddings.zarr`` (zarr v3,
``ZARR_CHUNK_ROWS`` rows per chunk), written chunk by chunk and opened lazily, so they stream
from disk instead of filling memory. The pooled image-tower features of the same forward pass (what
the teaching learner reads; ``Prediction.features``) go to ``features.npy`` (memory-mapped when read)
or, for large predictions, ``features.zarr``; they are never loaded whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from napari_cytoclip.models.bundle import ModelBundle, read_json, region_from_dict
from napari_cytoclip.models.model import NO_FEATURES, ModelIdentity
from napari_cytoclip.errors import CacheMismatch, CytoclipError, OutputError
from napari_cytoclip.inference.grid import TileGrid
from napari_cytoclip.io.safe_files import atomic_write_text, new_output_folder
from napari_cytoclip.inference.predict import Prediction, check_grid, check_signature, signature
from napari_cytoclip.io.sections import Section

CACHE_FORMAT = "napari-cytoclip-cache"
CACHE_VERSION = 1
CACHE_JSON = "prediction.json"
ARRAYS_NPZ = "embeddings.npz"
EMBEDDINGS_ZARR = "embeddings.zarr"
FEATURES_NPY = "features.npy"
FEATURES_ZARR = "features.zarr"
LARGE_CELLS = 200_000
ZARR_CHUNK_ROWS = 16384


class CacheError(CytoclipError):
    """A cache folder is missing, incomplete or malformed."""


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples become lists), the form a saved signature takes."""
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def expected_signature(section: Section, model: ModelIdentity | ModelBundle, grid: TileGrid) -> dict:
    """The signature a prediction of ``section`` on ``grid`` carries (no model load).

    With a :class:`ModelIdentity` (``CytoClip.identity``) the precision and feature kind must match too;
    with a bare bundle they are left open (``None``: a cache at any precision is accepted).
    """
    identity = model if isinstance(model, ModelIdentity) else ModelIdentity.of_bundle(model)
    return signature(section, identity, grid)


def is_cache(folder: Path) -> bool:
    """Whether ``folder`` holds a cache written by :func:`save_prediction`."""
    try:
        meta = read_json(Path(folder) / CACHE_JSON, CacheError)
    except CacheError:
        return False
    return isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT


def save_prediction(prediction: Prediction, folder: str | Path, *, large_cells: int = LARGE_CELLS) -> Path:
    """Write ``prediction`` to the cache ``folder`` atomically; an older cache there is replaced.

    A folder that exists but is not a cache is never touched.
    """
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and (is_cache(folder) or not any(folder.iterdir()))):
        raise OutputError(folder, "exists and is not an embedding cache; refusing to replace it")
    large = len(prediction.cells) > large_cells
    with new_output_folder(folder, overwrite=True) as tmp:
        _write_arrays(prediction, tmp, include_embeddings=not large)
        if large:
            _write_zarr(prediction.embeddings, tmp / EMBEDDINGS_ZARR)
        if prediction.features is not None:
            if large:
                _write_zarr(prediction.features, tmp / FEATURES_ZARR)
            else:
                _write_npy(prediction.features, tmp / FEATURES_NPY)
        atomic_write_text(tmp / CACHE_JSON, json.dumps(_metadata(prediction, large), indent=1, default=_default))
    return folder


def _metadata(p: Prediction, large: bool) -> dict:
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "storage": "zarr" if large else "npz",
        "n_cells": int(len(p.cells)), "embed_dim": int(p.embeddings.shape[1]) if p.embeddings.ndim == 2 else 0,
        "grid": p.grid.to_dict(), "regions": [r.to_dict() for r in p.regions],
        "signature": p.signature, "label_um": float(p.label_um), "logit_scale": float(p.logit_scale),
        "polarity": p.polarity, "source": p.source, "model_name": p.model_name,
        "timings": p.timings, "complete": bool(p.complete),
        "features": None if p.features is None else {"kind": p.feature_kind, "dim": int(p.features.shape[1]),
                                                     "storage": FEATURES_ZARR if large else FEATURES_NPY},
    }


def _write_arrays(p: Prediction, folder: Path, include_embeddings: bool) -> None:
    arrays = {"cells": np.asarray(p.cells, np.int32).reshape(-1, 2),
              "labels": np.asarray(p.labels, np.uint16), "confidence": np.asarray(p.confidence, np.float32)}
    if include_embeddings:
        arrays["embeddings"] = np.asarray(p.embeddings, np.float16)
    with open(folder / ARRAYS_NPZ, "wb") as f:
        np.savez(f, **arrays)


def _write_zarr(embeddings: Any, path: Path) -> None:
    """Copy ``embeddings`` (numpy or any sliceable array) into a chunked zarr v3 array, chunk by chunk."""
    import zarr

    n, dim = (int(s) for s in embeddings.shape)
    arr = zarr.create_array(store=str(path), shape=(n, dim), chunks=(min(ZARR_CHUNK_ROWS, max(n, 1)), dim),
                            dtype="float16", zarr_format=3, fill_value=0)
    for i in range(0, n, ZARR_CHUNK_ROWS):
        arr[i:i + ZARR_CHUNK_ROWS] = np.asarray(embeddings[i:i + ZARR_CHUNK_ROWS], np.float16)


def _write_npy(rows: Any, path: Path) -> None:
    """``rows`` (numpy or zarr) as a float16 .npy file, written block by block."""
    n, dim = (int(v) for v in rows.shape)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for i in range(0, n, ZARR_CHUNK_ROWS):
        out[i:i + ZARR_CHUNK_ROWS] = np.asarray(rows[i:i + ZARR_CHUNK_ROWS], np.float16)
    out.flush()
    del out


def load_prediction(folder: str | Path, expected_signature: dict | None = None, *, lazy: bool = True) -> Prediction:
    """Read a cache folder; with ``expected_signature`` refuse one made for another section, model or grid.

    Large caches keep their embeddings on disk (a read-only zarr array) unless ``lazy`` is False.
    Raises :class:`CacheError` for a missing or broken cache and
    :class:`~napari_cytoclip.errors.CacheMismatch` for a cache of something else.
    """
    folder = Path(folder)
    meta = _read_metadata(folder)
    arrays = _read_arrays(folder, meta)
    try:
        prediction = Prediction(
            grid=TileGrid.from_dict(meta["grid"]), cells=arrays["cells"], embeddings=arrays["embeddings"],
            regions=[region_from_dict(r, folder / CACHE_JSON) for r in meta["regions"]],
            labels=arrays["labels"], confidence=arrays["confidence"], signature=meta["signature"],
            label_um=float(meta["label_um"]), logit_scale=float(meta["logit_scale"]), polarity=str(meta["polarity"]),
            source=str(meta.get("source", "")), model_name=str(meta.get("model_name", "")),
            timings=dict(meta.get("timings", {})), complete=bool(meta.get("complete", True)),
            features=_open_features(folder, meta.get("features")),
            feature_kind=str((meta.get("features") or {}).get("kind", NO_FEATURES)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(folder / CACHE_JSON, f"incomplete cache description ({exc!r})") from None
    _check_numbers(prediction, folder / CACHE_JSON)
    if isinstance(prediction.signature, dict) and "grid" in prediction.signature:
        try:  # the grid used must be the grid the signature names (an edited grid misplaces every label)
            check_grid(prediction.grid, prediction.signature["grid"], str(folder / CACHE_JSON))
        except CacheMismatch as exc:
            raise CacheError(folder / CACHE_JSON, f"{exc.problem} (the cache is damaged)") from None
    if not lazy and not isinstance(prediction.embeddings, np.ndarray):
        prediction.embeddings = np.asarray(prediction.embeddings[:], np.float16)
    _check_shapes(prediction, folder)
    if expected_signature is not None:
        check_signature(prediction, jsonable(expected_signature), str(folder))
    return prediction


def _read_metadata(folder: Path) -> dict:
    path = folder / CACHE_JSON
    if not folder.is_dir():
        raise CacheError(folder, "embedding cache folder not found")
    if not path.is_file():
        raise CacheError(folder, f"not an embedding cache: {CACHE_JSON} is missing")
    meta = read_json(path, CacheError)
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise CacheError(path, "not an embedding cache written by napari-cytoclip")
    if int(meta.get("version", 0)) > CACHE_VERSION:
        raise CacheError(path, f"cache version {meta.get('version')} is newer than this napari-cytoclip reads")
    return meta


def _read_arrays(folder: Path, meta: dict) -> dict:
    path = folder / ARRAYS_NPZ
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise CacheError(path, f"unreadable cache arrays ({exc})") from None
    missing = {"cells", "labels", "confidence"} - set(arrays)
    if missing:
        raise CacheError(path, f"missing arrays {sorted(missing)}")
    if meta.get("storage") == "zarr":
        arrays["embeddings"] = _open_zarr(folder / EMBEDDINGS_ZARR)
    elif "embeddings" not in arrays:
        raise CacheError(path, "missing the embeddings array")
    return arrays


def _open_features(folder: Path, info: Any) -> Any:
    """The cached pooled features, opened lazily (memory map or zarr), or None when the cache has none."""
    if not info:
        return None
    if not isinstance(info, dict) or info.get("storage") not in (FEATURES_NPY, FEATURES_ZARR):
        raise CacheError(folder / CACHE_JSON, f"unknown feature storage {info!r}")
    path = folder / info["storage"]
    if info["storage"] == FEATURES_ZARR:
        return _open_zarr(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CacheError(path, f"unreadable features ({exc})") from None


def _open_zarr(path: Path) -> Any:
    import zarr

    try:
        return zarr.open_array(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several kinds for a missing or broken store
        raise CacheError(path, f"unreadable embeddings ({type(exc).__name__}: {exc})") from None


def _check_numbers(p: Prediction, path: Path) -> None:
    g = p.grid
    try:
        ok = (isinstance(p.signature, dict) and len(g.origin) == 2 and len(g.shape) == 2
              and all(np.isfinite(v) for v in (*g.origin, g.step, g.pixel_size_um, p.label_um, p.logit_scale))
              and g.step > 0 and g.pixel_size_um > 0 and p.label_um > 0 and 0 < p.logit_scale <= 100
              and all(int(n) >= 1 for n in g.shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CacheError(path, "the grid, label size or logit scale is not a sane number: the cache is damaged")


def _check_shapes(p: Prediction, folder: Path) -> None:
    n = len(p.cells)
    if p.embeddings.shape[0] != n:
        raise CacheError(folder, f"{p.embeddings.shape[0]} embeddings for {n} cells: the cache is damaged")
    if p.features is not None and (len(p.features.shape) != 2 or p.features.shape[0] != n):
        raise CacheError(folder, f"features of shape {tuple(p.features.shape)} for {n} cells: the cache is damaged")
    if tuple(p.labels.shape) != tuple(p.grid.shape) or tuple(p.confidence.shape) != tuple(p.grid.shape):
        raise CacheError(folder, f"label grid {tuple(p.labels.shape)} does not match the grid {tuple(p.grid.shape)}")
