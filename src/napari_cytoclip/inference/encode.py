"""The one batch / prefetch / encode loop behind local and distributed prediction.

:func:`encode_cells` reads the windows of a list of grid cells batch by batch (reading prefetched in a
background thread, so it overlaps with encoding) and encodes them; from the same forward pass it also
returns the image tower's pooled features (:data:`~napari_cytoclip.models.model.POOLED`) when the model
has them. Windows come from :class:`~napari_cytoclip.inference.resampled.ResampledReader` (each scale
resampled once, not every window on its own). :class:`RowWriter` streams embeddings and features into
the bounded-memory arrays of :func:`row_store`.
"""
from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from napari_cytoclip.inference.grid import TileGrid
from napari_cytoclip.inference.resampled import ResampledReader
from napari_cytoclip.inference.windows import WindowReader
from napari_cytoclip.io.sections import Section

MEMORY_ROWS_BYTES = 64 * 2 ** 20  # rows (embeddings, features) larger than this stream to a temporary zarr store
STORE_CHUNK_ROWS = 4096  # 10 MB of float16 at 1280-d


@dataclass
class EncodedBatch:
    """One encoded batch: its first row in the cell list, cells, embeddings and pooled features."""

    start: int
    cells: np.ndarray                 # (b, 2) int32
    embeddings: np.ndarray            # (b, D) float32, L2-normalised
    features: np.ndarray | None       # (b, F) float16, or None for models without a trunk/head split
    encode_s: float


def prefetch(reader: WindowReader, grid: TileGrid, batches: list[np.ndarray], depth: int = 2) -> Iterator:
    """``(cells, windows)`` per batch, read in a background thread so reading overlaps with encoding."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for b in batches:
                if stop.is_set():
                    return
                q.put((b, reader.read(grid.centers(b))))
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
        q.put(None)

    thread = threading.Thread(target=work, daemon=True, name="cytoclip-reader")
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def encode_cells(section: Section, model: Any, grid: TileGrid, cells: np.ndarray, *, polarity: str,
                 batch_size: int = 64, features: bool = True) -> Iterator[EncodedBatch]:
    """Encode the windows of ``cells`` (``(n, 2)`` grid rows/cols) batch by batch, in order.

    Batches start at multiples of ``batch_size`` from the first cell, so a chunk of cells that starts
    on a batch boundary is encoded in exactly the batches a whole run uses. Closing the iterator
    stops reading at the next batch.
    """
    cells = np.asarray(cells, np.int32).reshape(-1, 2)
    reader = ResampledReader(section, model.input, polarity, grid.centers(cells))
    batches = [cells[i:i + batch_size] for i in range(0, len(cells), batch_size)]
    capture = model.capturing_features() if features and hasattr(model, "capturing_features") else None
    start = 0
    for batch_cells, windows in prefetch(reader, grid, batches):
        t0 = time.perf_counter()
        if capture is not None:
            with capture:
                emb = model.encode_windows(windows)
                feats = capture.take(len(emb))
        else:
            emb, feats = model.encode_windows(windows), None
        yield EncodedBatch(start, batch_cells, emb, feats, time.perf_counter() - t0)
        start += len(emb)


def row_store(rows: int, dim: int, dtype: Any = np.float16, max_bytes: int | None = None) -> Any:
    """A zero-filled ``(rows, dim)`` array to stream rows into: numpy when it fits in ``max_bytes`` (default
    :data:`MEMORY_ROWS_BYTES`), else a zarr array in a temporary folder that is deleted with the array."""
    max_bytes = MEMORY_ROWS_BYTES if max_bytes is None else max_bytes
    if rows * dim * np.dtype(dtype).itemsize <= max_bytes:
        return np.zeros((rows, dim), dtype)
    import zarr

    folder = tempfile.mkdtemp(prefix="cytoclip-rows-")
    arr = zarr.create_array(store=folder, shape=(rows, dim), chunks=(min(STORE_CHUNK_ROWS, max(rows, 1)), dim),
                            dtype=np.dtype(dtype).name, zarr_format=3, fill_value=0)
    weakref.finalize(arr, shutil.rmtree, folder, True)
    return arr


class RowWriter:
    """Rows written in order into a :func:`row_store` array; zarr stores get whole chunks only (no chunk is
    read back and rewritten for every batch)."""

    def __init__(self, rows: int, dim: int, dtype: Any = np.float16, max_bytes: int | None = None):
        self.array = row_store(rows, dim, dtype, max_bytes)
        self._direct = isinstance(self.array, np.ndarray)
        self._buf = None if self._direct else np.zeros((STORE_CHUNK_ROWS, dim), dtype)
        self._buf_start = 0
        self._n = 0

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` at row ``start`` (every call continues where the last one ended)."""
        if self._direct:
            self.array[start:start + len(rows)] = rows
            return
        assert start == self._buf_start + self._n, "rows must be written in order"
        rows = np.asarray(rows, self._buf.dtype)
        while len(rows):
            take = min(len(rows), len(self._buf) - self._n)
            self._buf[self._n:self._n + take] = rows[:take]
            self._n += take
            rows = rows[take:]
            if self._n == len(self._buf):
                self.flush()

    def flush(self) -> None:
        if not self._direct and self._n:
            self.array[self._buf_start:self._buf_start + self._n] = self._buf[:self._n]
            self._buf_start += self._n
            self._n = 0

    def finish(self) -> Any:
        """The array, with every row written."""
        self.flush()
        return self.array
