"""Model-input windows sliced out of images resampled once per scale, instead of resized one by one.

Neighbouring windows overlap (a 5.12 mm window on a 100 um grid shares 98 % of its pixels with the
next one), so resizing every window on its own repeats the same filtering for each tile. A
:class:`ResampledReader` resamples the section once per scale to that scale's model resolution
(the crop of :class:`~napari_cytoclip.inference.windows.WindowReader` over ``size`` pixels, with the same
antialiased triangle filter its resize uses) and then cuts each window as a plain ``size x size`` slice.
Windows start at the level pixel WindowReader's crops start at, which falls between model pixels: that
position is kept to ``1 / phases`` of a model pixel (at most a quarter of a level pixel off), and each
phase a grid needs gets its own resampled image. Unlike a resize of each crop, the filter at a window's
edge also sees the pixels just outside it, as it does inside. ``benchmarks/bench_flat.py agree`` compares
the labels with those of WindowReader's full-resolution windows on the Allen test plates.

The resampled images cover the rows of the windows being read (at most :data:`IMAGE_BYTES` of uint8
per scale at a time), so memory stays bounded on a whole slide; cells visited row by row rebuild
them rarely.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_cytoclip.inference.windows import WindowReader
from napari_cytoclip.io.sections import Section
from napari_cytoclip.models.bundle import InputSpec

IMAGE_BYTES = 16 * 2 ** 20   # resampled uint8 pixels kept per scale (all its phases)
STRIP_BYTES = 4 * 2 ** 20    # float32 source pixels read at a time while resampling (its temporaries: ~10x)
MAX_PHASES = 8               # per axis
PHASES_PER_RATIO = 2         # phases per level pixel a model pixel spans (capped at MAX_PHASES)


def triangle_taps(first: int, count: int, offset: float, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights ``(count, taps)`` of an antialiased linear resample.

    Output pixel ``i`` (``first <= i < first + count``) is centred at ``(i + offset + 0.5) * ratio`` in
    source pixel edge coordinates; the triangle filter spans ``max(ratio, 1)`` source pixels on each side
    (as ``torch.nn.functional.interpolate(..., antialias=True)``); weights sum to one.
    """
    half = max(ratio, 1.0)
    centre = (np.arange(first, first + count, dtype=np.float64) + offset + 0.5) * ratio
    start = np.floor(centre - half - 0.5).astype(np.int64) + 1
    taps = int(math.ceil(2 * half)) + 1
    index = start[:, None] + np.arange(taps)[None, :]
    weight = np.clip(1.0 - np.abs(index + 0.5 - centre[:, None]) / half, 0.0, None)
    weight /= weight.sum(1, keepdims=True)
    return index, weight.astype(np.float32)


def taps_matrix(index: np.ndarray, weight: np.ndarray, first: int, length: int) -> Any:
    """The sparse ``(outputs, length)`` matrix of :func:`triangle_taps` over source indices ``first ...``."""
    from scipy import sparse

    n, taps = index.shape
    rows = np.repeat(np.arange(n), taps)
    return sparse.csr_matrix((weight.ravel(), (rows, (index - first).ravel())), shape=(n, length))


def _within(rows: Any, cols: Any, box: tuple[int, int, int, int], size: int) -> Any:
    """Whether ``size x size`` windows starting at model pixels ``(rows, cols)`` lie inside
    ``box = (row0, row1, col0, col1)`` (arrays or scalars)."""
    row0, row1, col0, col1 = box
    return (rows >= row0) & (rows + size <= row1) & (cols >= col0) & (cols + size <= col1)


class _ScaleImages:
    """The resampled images of one scale: one per (row phase, column phase), over target rows
    ``[row0, row1)`` and columns ``[col0, col1)`` (absolute model-pixel indices)."""

    def __init__(self, row0: int, row1: int, col0: int, col1: int, images: dict, size: int):
        self.row0, self.row1, self.col0, self.col1, self.images = row0, row1, col0, col1, images
        self._views = {p: np.lib.stride_tricks.sliding_window_view(im, (size, size), axis=(0, 1))
                       for p, im in images.items()}

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(row0, row1, col0, col1)``: the model pixels these images cover."""
        return self.row0, self.row1, self.col0, self.col1

    def windows(self, phase: tuple[int, int]) -> np.ndarray:
        """Every ``size x size`` window of one phase's image, indexed by its first row and column (a view)."""
        return self._views[phase]


class ResampledReader(WindowReader):
    """Reads the same uint8 ``(n, size, size, 3)`` windows as :class:`WindowReader`, each cut from images
    resampled once per scale.

    ``centers_px``: every level-0 centre this reader will be asked for, in reading order (it decides
    which phases to build and how far each resampled image reaches); reading others still works.
    """

    def __init__(self, section: Section, spec: InputSpec, polarity: str, centers_px: np.ndarray | None = None):
        super().__init__(section, spec, polarity)
        # level pixels per model pixel of each scale's plan, and the phases that keep rounding finer than it
        self._ratio = [crop / spec.size for (_, _, crop) in self.plans]
        self._phases = [max(1, min(MAX_PHASES, PHASES_PER_RATIO * math.ceil(r - 1e-9))) for r in self._ratio]
        self._built: dict[int, _ScaleImages] = {}
        self._extent: dict[int, tuple[tuple[int, int, int, int], set]] = {}  # scale -> (box, phases) announced
        if centers_px is not None and len(centers_px):
            for k in range(len(self.plans)):
                ry, py, rx, px = self._positions(np.asarray(centers_px, np.float64).reshape(-1, 2), k)
                box = (int(ry.min()), int(ry.max()) + self.spec.size, int(rx.min()), int(rx.max()) + self.spec.size)
                self._extent[k] = (box, set(zip(py.tolist(), px.tolist())))

    # ------------------------------------------------------------------ window positions
    def _positions(self, centers_px: np.ndarray, scale: int) -> tuple[np.ndarray, ...]:
        """Per centre: first model row, row phase, first model column, column phase of its window."""
        _, ds, crop = self.plans[scale]
        # the level pixel WindowReader's crop starts at, in model pixels
        start = np.rint((centers_px + 0.5) / ds - 0.5 - crop / 2) / self._ratio[scale]
        q = self._phases[scale]
        first, phase = np.divmod(np.rint(start * q).astype(np.int64), q)
        return first[:, 0], phase[:, 0], first[:, 1], phase[:, 1]

    # ------------------------------------------------------------------ reading
    def read(self, centers_px: np.ndarray) -> np.ndarray:
        """Windows for level-0 ``(y, x)`` centres, in the model's polarity and channel layout (a channel-planar
        array seen as ``(n, size, size, 3)``)."""
        centers_px = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2)
        n, size = len(centers_px), self.spec.size
        planes = np.empty((3, n, size, size), np.uint8)
        if n:
            if self.spec.mode == "rgb":
                self._scale_windows_into(planes, centers_px, 0)
            else:
                for k in range(len(self.plans)):
                    self._scale_windows_into(planes[k], centers_px, k)
                planes[len(self.plans):] = planes[:1]  # one scale: the same plane three times
        return planes.transpose(1, 2, 3, 0)

    def _scale_windows_into(self, out: np.ndarray, centers_px: np.ndarray, scale: int) -> None:
        """Write the windows of one scale into ``out``: ``(n, size, size)``, or ``(3, n, size, size)`` for colour."""
        size, q = self.spec.size, self._phases[scale]
        ry, py, rx, px = self._positions(centers_px, scale)
        code = py * q + px
        todo = np.ones(len(ry), bool)
        while todo.any():
            pending = np.flatnonzero(todo)
            top = pending[np.argmin(ry[pending])]
            built = self._images_for(scale, (ry[top], py[top], rx[top], px[top]), ry[pending], rx[pending])
            inside = todo & _within(ry, rx, built.box, size)
            have = np.zeros(q * q, bool)
            have[[a * q + b for a, b in built.images]] = True
            inside &= have[code]
            for c in np.unique(code[inside]):
                sel = np.flatnonzero(inside & (code == c))
                windows = built.windows((int(c) // q, int(c) % q))[ry[sel] - built.row0, rx[sel] - built.col0]
                if windows.ndim == 4:  # colour: (k, 3, size, size) into (3, n, size, size)
                    out[:, sel] = windows.transpose(1, 0, 2, 3)
                else:
                    out[sel] = windows
            todo &= ~inside

    def _images_for(self, scale: int, window: tuple, rows: np.ndarray, cols: np.ndarray) -> _ScaleImages:
        """Resampled images holding ``window`` (first row, row phase, first column, column phase), built if
        needed, as far down as memory allows (``rows``, ``cols``: the pending windows' first rows and columns)."""
        size = self.spec.size
        r0, a, c0, b = (int(v) for v in window)
        built = self._built.get(scale)
        if built is not None and (a, b) in built.images and _within(r0, c0, built.box, size):
            return built
        planned = self._extent.get(scale)
        phases = set(planned[1]) if planned else set()
        phases.add((a, b))
        if planned and _within(r0, c0, planned[0], size):
            row_end, col0, col1 = planned[0][1], planned[0][2], planned[0][3]
        else:  # a window outside the announced centres: just what the pending windows need
            col0, col1 = int(cols.min()), int(cols.max()) + size
            row_end = int(rows.max()) + size
        ch = 3 if self.spec.mode == "rgb" else 1
        rows_fit = IMAGE_BYTES // max(1, (col1 - col0) * ch * len(phases))
        row1 = min(row_end, r0 + max(rows_fit, 2 * size))  # at least a window's height of progress per build
        self._built[scale] = None  # free the previous images before building the next ones
        built = self._build(scale, r0, row1, col0, col1, phases)
        self._built[scale] = built
        return built

    def _build(self, scale: int, row0: int, row1: int, col0: int, col1: int, phases: set) -> _ScaleImages:
        """Resample the plan's level onto model pixels ``[row0, row1) x [col0, col1)`` for each phase."""
        level, _, _ = self.plans[scale]
        ratio, q = self._ratio[scale], self._phases[scale]
        col_phases = sorted({p[1] for p in phases})
        col_taps = [triangle_taps(col0, col1 - col0, b / q, ratio) for b in col_phases]
        x0 = int(min(t[0].min() for t in col_taps))
        x1 = int(max(t[0].max() for t in col_taps)) + 1
        from scipy import sparse

        # every column phase in one matrix: (source columns, phases x model columns)
        columns = sparse.hstack([taps_matrix(i, w, x0, x1 - x0).T for i, w in col_taps], format="csr")
        rgb = self.spec.mode == "rgb"
        width = col1 - col0
        block = max(1, int(STRIP_BYTES // max(1, (x1 - x0) * 4 * (3 if self.section.is_rgb else 1) * ratio)))
        block = max(1, min(block, row1 - row0))
        images = {p: np.empty((row1 - row0, width) + ((3,) if rgb else ()), np.uint8) for p in phases}
        row_phases = sorted({p[0] for p in phases})
        for r in range(row0, row1, block):  # each strip of source rows is read once, for every row phase
            n = min(block, row1 - r)
            taps = {a: triangle_taps(r, n, a / q, ratio) for a in row_phases}
            y0 = int(min(t[0].min() for t in taps.values()))
            y1 = int(max(t[0].max() for t in taps.values())) + 1
            strip = self._to_model_space(self.section.read(level, y0, y1, x0, x1))
            planes = [strip] if strip.ndim == 2 else [strip[..., c] for c in range(3)]
            for a, (index, weight) in taps.items():
                rows = taps_matrix(index, weight, y0, y1 - y0)
                done = [np.asarray((columns.T @ (rows @ plane).T).T) for plane in planes]  # (n, phases * width)
                done = done[0] if len(done) == 1 else np.stack(done, -1)
                pixels = np.clip(np.rint(done * 255.0), 0, 255).astype(np.uint8)
                for k, b in enumerate(col_phases):
                    if (a, b) in images:
                        images[(a, b)][r - row0:r - row0 + n] = pixels[:, k * width:(k + 1) * width]
        return _ScaleImages(row0, row1, col0, col1, images, self.spec.size)
