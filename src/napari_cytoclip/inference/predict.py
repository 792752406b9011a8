"""Sliding-window region prediction over a section, streamed batch by batch."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generator

import numpy as np

from napari_cytoclip.inference.aggregate import (footprint_radius, labels_from_index, region_probabilities,
                                                 similarity_grid, vote)
from napari_cytoclip.models.bundle import Region
from napari_cytoclip.errors import Cancelled, CacheMismatch, SectionError
from napari_cytoclip.inference.grid import TileGrid
from napari_cytoclip.inference.encode import RowWriter, encode_cells
from napari_cytoclip.models.bundle import ModelBundle
from napari_cytoclip.models.model import NO_FEATURES, CytoClip, ModelIdentity
from napari_cytoclip.io.sections import Section
from napari_cytoclip.io.tissue import TissueMask, tissue_mask
from napari_cytoclip.inference.windows import WindowReader

MIN_TISSUE_FRACTION = 0.25
MAX_PLAN_BYTES = 16 * 2 ** 30  # a run planning more memory than this is refused before any work
DECODE_ROWS = 16384  # embeddings turned into probabilities at a time (16 MB of float32 at 256-d)
PLAN_CELLS = 65536   # grid cells whose tissue fraction is measured at a time


@dataclass
class Prediction:
    """Everything a prediction produced: the grid, tile embeddings, labels and confidence."""

    grid: TileGrid
    cells: np.ndarray                 # (n, 2) int32 encoded cells (row, col)
    embeddings: Any                   # (n, D) float16, L2-normalised (numpy, or zarr for a large section)
    regions: list[Region]
    labels: np.ndarray                # (rows, cols) uint16 region ids, 0 = no tissue / not encoded
    confidence: np.ndarray            # (rows, cols) float32 mean probability of the winner
    signature: dict
    label_um: float
    logit_scale: float
    polarity: str
    source: str = ""
    model_name: str = ""
    timings: dict = field(default_factory=dict)
    complete: bool = True
    model_path: str = ""              # the bundle folder that made it (recorded in prediction.json)
    features: Any = None              # (n, F) float16 pooled image-tower features (numpy or zarr), or None
    feature_kind: str = NO_FEATURES   # what ``features`` holds (models.model.POOLED) or NO_FEATURES

    def decode(self, region_embeddings: np.ndarray, regions: list[Region] | None = None) -> "Prediction":
        """Labels and confidence for a (new) vocabulary, from the cached embeddings alone."""
        regions = self.regions if regions is None else regions
        labels, conf = decode_labels(self.cells, self.embeddings, region_embeddings, [r.id for r in regions],
                                     self.grid, self.label_um, self.logit_scale)
        self.regions, self.labels, self.confidence = list(regions), labels, conf
        return self

    def similarity(self, text_embedding: np.ndarray) -> np.ndarray:
        """Cosine similarity of each encoded cell to a text embedding (NaN elsewhere)."""
        return similarity_grid(self.cells, self.embeddings, text_embedding, self.grid.shape)

    def tile_counts(self) -> dict:
        return {"grid_cells": int(np.prod(self.grid.shape)), "encoded": int(len(self.cells)),
                "skipped_background": int(np.prod(self.grid.shape) - len(self.cells))}


@dataclass
class BatchResult:
    """One classified batch: its cells, best region id and probability, and progress."""

    cells: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    done: int
    total: int


def decode_labels(cells, embeddings, region_embeddings, region_ids, grid, label_um, logit_scale):
    """Voted labels and confidence from tile embeddings (numpy or zarr). Probabilities are computed
    :data:`DECODE_ROWS` rows at a time: no float32 copy of all the embeddings exists at once, and where
    each window labels only its own cell (footprint radius 0) no ``(n, regions)`` array either."""
    radius = footprint_radius(label_um, grid.stride_um)
    cells = np.asarray(cells)
    n = int(embeddings.shape[0])
    probs = None if radius == 0 else np.empty((n, len(region_embeddings)), np.float32)
    index = np.full(grid.shape, -1, np.int32)
    conf = np.zeros(grid.shape, np.float32)
    for i in range(0, n, DECODE_ROWS):
        p = region_probabilities(embeddings[i:i + DECODE_ROWS], region_embeddings, logit_scale)
        if probs is not None:
            probs[i:i + DECODE_ROWS] = p
        else:  # what vote() gives for radius 0: each cell's own probabilities
            rows, cols = cells[i:i + DECODE_ROWS, 0], cells[i:i + DECODE_ROWS, 1]
            index[rows, cols], conf[rows, cols] = p.argmax(1), p.max(1)
    if probs is not None:
        index, conf = vote(cells, probs, grid.shape, radius)
    return labels_from_index(index, region_ids), conf


class NoTissueWarning(UserWarning):
    """A section has no tissue on its grid: the result is empty."""


def _bundle(model: CytoClip | ModelBundle) -> ModelBundle:
    return model if isinstance(model, ModelBundle) else model.bundle


def plan_grid(section: Section, model: CytoClip | ModelBundle, stride_um: float | None = None,
              mask: TissueMask | None = None, batch_size: int = 64,
              polarity: str | None = None) -> tuple[TileGrid, np.ndarray, TissueMask]:
    """The grid for a section and the tissue cells on it (row-major order).

    ``stride_um`` None means the model's; any other value must be a positive number.
    Raises :class:`SectionError` for an image smaller than one grid cell (either side) and
    :class:`~napari_cytoclip.inference.grid.PlanTooLarge` before any work when the run would be absurd
    (see :func:`check_plan`); warns (:class:`NoTissueWarning`) when no cell holds tissue.
    """
    source = section.source or section.name
    stride = float(_bundle(model).stride_um if stride_um is None else stride_um)
    if not (math.isfinite(stride) and stride > 0):
        raise ValueError(f"the stride must be a positive number of micrometres, got {stride_um!r}")
    grid = TileGrid.covering(section.shape, section.require_pixel_size(), stride, source=source)
    if min(section.shape) < grid.step - 1e-6:
        h, w = section.shape
        raise SectionError(source,
                           f"the image ({h} x {w} px) is too small: each side must span at least one grid cell "
                           f"of {stride:g} um, i.e. {math.ceil(grid.step - 1e-9)} px at {grid.pixel_size_um:g} um/px")
    check_plan(section, model, grid, batch_size)
    mask = mask or tissue_mask(section, polarity)
    n_rows, n_cols = grid.shape
    keep = np.empty(grid.shape, bool)
    step = max(1, PLAN_CELLS // n_cols)
    for r in range(0, n_rows, step):  # blocks of grid rows: no temporaries the size of a million-cell grid
        rows = np.arange(r, min(n_rows, r + step))
        block = np.stack(np.meshgrid(rows, np.arange(n_cols), indexing="ij"), -1).reshape(-1, 2)
        keep[rows] = (mask.fraction_in_cells(grid.centers(block), grid.step) >= MIN_TISSUE_FRACTION
                      ).reshape(len(rows), n_cols)
    cells = np.argwhere(keep).astype(np.int32)
    if len(cells) == 0:
        warnings.warn(f"{source}: no tissue found on the {grid.shape[0]} x {grid.shape[1]} grid; the result is empty "
                      "(check the image and its polarity)", NoTissueWarning, stacklevel=2)
    return grid, cells, mask


def estimate_plan(section: Section, model: CytoClip | ModelBundle, grid: TileGrid, batch_size: int = 64,
                  cells: int | None = None) -> dict:
    """Cells, peak memory (bytes) and CPU time (s, at a nominal rate) of a run, before any work.

    ``cells``: tiles to encode (default: every grid cell, an upper bound). Memory counts the
    windows of one batch at every scale (the crops are cut from the pyramid level the reader
    uses, at full size even outside the image), the embeddings, probabilities and voting arrays.
    """
    from napari_cytoclip.inference.grid import NOMINAL_TILES_PER_S

    bundle = _bundle(model)
    n_grid = int(np.prod(grid.shape))
    n = n_grid if cells is None else int(cells)
    k = len(bundle.regions)
    dim = getattr(model, "_dim", None) or int((bundle.architecture.get("config") or {}).get("embed_dim", 1024))
    reader = WindowReader(section, bundle.input, bundle.input.polarity)
    read_ch = 3 if section.is_rgb else 1
    model_ch = 3 if bundle.input.mode == "rgb" else 1
    b = max(1, min(int(batch_size), n))
    windows = sum(4 * crop * crop * (read_ch + b * model_ch) for _, _, crop in reader.plans)
    voting = n_grid * (4 * k + 16)
    per_tile = n * (2 * dim + 4 * k)
    return {"cells": n_grid, "tiles": n, "bytes": int(windows + voting + per_tile), "window_bytes": int(windows),
            "seconds": n / NOMINAL_TILES_PER_S}


def check_plan(section: Section, model: CytoClip | ModelBundle, grid: TileGrid, batch_size: int = 64,
               max_bytes: int | None = None) -> dict:
    """Refuse (:class:`~napari_cytoclip.inference.grid.PlanTooLarge`, one line naming the section) a run whose
    estimated memory is over :data:`MAX_PLAN_BYTES`; returns the estimate."""
    from napari_cytoclip.inference.grid import PlanTooLarge, hours_text

    max_bytes = MAX_PLAN_BYTES if max_bytes is None else max_bytes
    est = estimate_plan(section, model, grid, batch_size)
    if est["bytes"] > max_bytes:
        gib = 2 ** 30
        hint = ("the windows of one batch alone take "
                f"{est['window_bytes'] / gib:,.1f} GiB (check the pixel size, use a smaller --batch-size or a "
                "pyramidal TIFF)") if est["window_bytes"] > max_bytes / 2 else "check the pixel size and the stride"
        raise PlanTooLarge(section.source or section.name,
                           f"the run would need about {est['bytes'] / gib:,.1f} GiB of memory for "
                           f"{est['cells']:,} grid cells ({hours_text(est['tiles'])} of work), over the limit of "
                           f"{max_bytes / gib:,.0f} GiB (MAX_PLAN_BYTES); {hint}")
    return est


def signature(section: Section, model: ModelIdentity, grid: TileGrid) -> dict:
    """What cached embeddings and features depend on, in JSON form (so saved and fresh signatures compare
    equal): the section's content, the model's weights, input, precision and feature kind, and the grid."""
    import json

    return json.loads(json.dumps({"section": section.content_hash(), "model": model.weights_hash,
                                  "grid": grid.to_dict(), "input": model.input, "precision": model.precision,
                                  "features": model.features}))


def predict_iter(section: Section, model: CytoClip, *, stride_um: float | None = None, batch_size: int = 64,
                 cells: np.ndarray | None = None, polarity: str | None = None,
                 ) -> Generator[BatchResult, None, Prediction]:
    """Classify a section batch by batch; yields :class:`BatchResult`, returns the :class:`Prediction`.

    Closing the generator early (cancel) stops reading and encoding at the next batch.
    """
    t0 = time.perf_counter()
    grid, tissue_cells, mask = plan_grid(section, model, stride_um, batch_size=batch_size, polarity=polarity)
    cells = tissue_cells if cells is None else np.asarray(cells, np.int32).reshape(-1, 2)
    t_plan = time.perf_counter() - t0
    region_emb = model.region_embeddings()
    region_ids = np.asarray([r.id for r in model.regions], np.uint16)
    embeddings = RowWriter(len(cells), model.embed_dim)  # streamed to a temporary store on large sections
    features: RowWriter | None = None
    t_encode = 0.0
    for batch in encode_cells(section, model, grid, cells, polarity=mask.polarity, batch_size=batch_size):
        t_encode += batch.encode_s
        e, done = batch.embeddings, batch.start + len(batch.embeddings)
        embeddings.write(batch.start, e)
        if batch.features is not None:
            if features is None and batch.start == 0:
                features = RowWriter(len(cells), batch.features.shape[1])
            if features is not None:
                features.write(batch.start, batch.features)
        probs = region_probabilities(e, region_emb, model.logit_scale)
        yield BatchResult(batch.cells, region_ids[probs.argmax(1)], probs.max(1), done, len(cells))
    region_ids = list(region_ids.tolist())
    emb = embeddings.finish()
    labels, conf = decode_labels(cells, emb, region_emb, region_ids, grid, model.bundle.label_um, model.logit_scale)
    total = time.perf_counter() - t0
    identity = model.identity
    kind = identity.features if features is not None else NO_FEATURES  # what is stored, not what could be
    prediction = Prediction(grid=grid, cells=cells, embeddings=emb, regions=list(model.regions), labels=labels,
                            confidence=conf, signature=signature(section, replace(identity, features=kind), grid),
                            label_um=model.bundle.label_um, logit_scale=model.logit_scale, polarity=mask.polarity,
                            source=section.source or section.name, model_name=model.bundle.name,
                            model_path=str(model.bundle.path or ""), feature_kind=kind,
                            features=None if features is None else features.finish(),
                            timings={"plan_s": t_plan, "encode_s": t_encode, "total_s": total,
                                     "tiles_per_s": len(cells) / total if total else 0.0})
    if getattr(model, "learner", None) is not None:  # a taught bundle: its learner decodes the labels
        from napari_cytoclip.inference.taught_decode import apply_learner

        apply_learner(prediction, model, section)
    return prediction


def predict_section(section: Section, model: CytoClip, *, stride_um: float | None = None, batch_size: int = 64,
                    progress: Callable[[int, int], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None) -> Prediction:
    """Run :func:`predict_iter` to the end with plain callbacks; raises :class:`Cancelled` on cancel."""
    gen = predict_iter(section, model, stride_um=stride_um, batch_size=batch_size)
    try:
        while True:
            res = next(gen)
            if progress:
                progress(res.done, res.total)
            if should_cancel and should_cancel():
                gen.close()
                raise Cancelled()
    except StopIteration as stop:
        return stop.value


def check_signature(prediction: Prediction, expected: dict, source: str = "") -> None:
    """Refuse cached embeddings made for another section, model, grid, precision or feature kind: the stored
    signature and the grid the prediction actually uses must both match ``expected``. ``precision`` and
    ``features`` are compared when ``expected`` names them (not None)."""
    for key in ("section", "model", "grid", "input", "precision", "features"):
        if key in ("precision", "features") and expected.get(key) is None:
            continue
        if prediction.signature.get(key) != expected.get(key):
            raise CacheMismatch(source, f"the cached embeddings belong to another {key}; predict again")
    check_grid(prediction.grid, expected.get("grid"), source)


def check_grid(grid: TileGrid, expected: dict | None, source: str = "") -> None:
    """Refuse a prediction whose grid (origin, step, shape, pixel size) is not ``expected`` (a
    :meth:`TileGrid.to_dict`): labels would be placed, and pairs cut, away from where they belong."""
    try:
        want = TileGrid.from_dict(expected)
        same = tuple(grid.shape) == tuple(want.shape) and np.allclose(
            [*grid.origin, grid.step, grid.pixel_size_um], [*want.origin, want.step, want.pixel_size_um],
            rtol=1e-9, atol=1e-6)
    except (KeyError, TypeError, ValueError):
        same = False
    if not same:
        raise CacheMismatch(source, f"the prediction's grid (origin {list(grid.origin)}, step {grid.step:g} px, "
                                    f"shape {list(grid.shape)}) is not the grid of this section and stride; "
                                    "it was edited or belongs to another image: predict again")
