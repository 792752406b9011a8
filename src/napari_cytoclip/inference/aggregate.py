"""From tile embeddings to region probabilities, and from overlapping windows to a label grid."""
from __future__ import annotations

import math

import numpy as np

from napari_cytoclip.inference.cputhreads import run_small

MAX_VOTE_SHIFTS = 81  # footprints wider than 9 x 9 cells vote by box sums (cost independent of their size)


def float32_blocks(embeddings, rows: int = 4096, read_rows: int = 16384):
    """``(start, block)`` pairs covering ``embeddings`` (float16/float32, numpy or zarr) as float32 torch blocks.

    torch converts float16 in one reused buffer (numpy's cast costs ~2.5 ns a value, and no full float32
    copy is made); zarr is read one 16k-row chunk at a time. Callers run it in the one-thread worker (``run_small``).
    """
    import torch

    n, dim = embeddings.shape
    buf = torch.empty((rows, dim), dtype=torch.float32)
    for j in range(0, n, read_rows):
        chunk = np.asarray(embeddings[j:j + read_rows])
        if chunk.dtype not in (np.float16, np.float32):
            chunk = chunk.astype(np.float32)
        chunk = np.ascontiguousarray(chunk)
        if not chunk.flags.writeable:  # a read-only memory map: torch wraps only writeable memory (one chunk copied)
            chunk = chunk.copy()
        chunk = torch.from_numpy(chunk)
        for i in range(0, len(chunk), rows):
            block = chunk[i:i + rows]
            out = buf[:len(block)]
            out.copy_(block)
            yield j + i, out


def region_probabilities(embeddings: np.ndarray, region_embeddings: np.ndarray, logit_scale: float) -> np.ndarray:
    """Softmax over regions of the scaled cosine similarity, ``(n, K)`` float32."""
    return run_small(_region_probabilities, embeddings, region_embeddings, logit_scale)


def _region_probabilities(embeddings, region_embeddings, logit_scale: float) -> np.ndarray:
    import torch

    regions = torch.from_numpy(np.asarray(region_embeddings, np.float32)).T.contiguous()
    out = np.empty((embeddings.shape[0], regions.shape[1]), np.float32)
    with torch.inference_mode():
        for i, block in float32_blocks(embeddings):
            out[i:i + len(block)] = torch.softmax(float(logit_scale) * (block @ regions), dim=1).numpy()
    return out


def footprint_radius(label_um: float, stride_um: float) -> int:
    """How many neighbouring cells (each way) a window's label covers.

    ``(label / stride - 1) / 2`` rounded to the nearest integer, ties down for every ratio (label/stride
    2, 4, 6 give 0, 1, 2), with a tolerance so that float noise does not break a tie.
    """
    return max(0, math.ceil((label_um / stride_um - 1) / 2 - 0.5 - 1e-9))


def vote(cells: np.ndarray, probs: np.ndarray, grid_shape: tuple[int, int], radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Average the probabilities of all windows covering each encoded cell.

    ``cells`` ``(n, 2)`` are the encoded cells; each window votes for the cells within
    ``radius`` of its own that are also encoded (background cells stay empty).
    Returns ``(index, confidence)``: the winning column of ``probs`` (-1 where empty) and its mean probability.
    """
    rows, cols = grid_shape
    k = probs.shape[1]
    index = np.full(grid_shape, -1, np.int32)
    confidence = np.zeros(grid_shape, np.float32)
    if len(cells) == 0:
        return index, confidence
    radius = max(0, min(int(radius), max(rows, cols) - 1))  # a wider footprint adds nothing more
    if (2 * radius + 1) ** 2 > MAX_VOTE_SHIFTS:
        return _vote_box(cells, probs, grid_shape, radius)
    acc = np.zeros((rows, cols, k), np.float32)
    cnt = np.zeros((rows, cols), np.float32)
    encoded = np.zeros(grid_shape, bool)
    encoded[cells[:, 0], cells[:, 1]] = True
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            r, c = cells[:, 0] + dy, cells[:, 1] + dx
            ok = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
            r, c, p = r[ok], c[ok], probs[ok]
            ok = encoded[r, c]
            acc[r[ok], c[ok]] += p[ok]  # cells are unique, so no index repeats in one shift
            cnt[r[ok], c[ok]] += 1.0
    has = cnt > 0
    mean = acc[has] / cnt[has, None]
    index[has] = mean.argmax(1)
    confidence[has] = mean.max(1)
    return index, confidence


def _box_sum(a: np.ndarray, radius: int) -> np.ndarray:
    """Sum of ``a`` (2-D) over the ``(2r+1)^2`` square around each cell (zeros outside), via an integral image."""
    rows, cols = a.shape
    integral = np.zeros((rows + 1, cols + 1), np.float64)
    np.cumsum(np.cumsum(a, 0, dtype=np.float64), 1, out=integral[1:, 1:])
    y0 = np.clip(np.arange(rows) - radius, 0, rows)
    y1 = np.clip(np.arange(rows) + radius + 1, 0, rows)
    x0 = np.clip(np.arange(cols) - radius, 0, cols)
    x1 = np.clip(np.arange(cols) + radius + 1, 0, cols)
    return (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])


def _vote_box(cells: np.ndarray, probs: np.ndarray, grid_shape: tuple[int, int],
              radius: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`vote` for wide footprints: per region, box sums over the grid (work independent of ``radius``)."""
    index = np.full(grid_shape, -1, np.int32)
    confidence = np.zeros(grid_shape, np.float32)
    encoded = np.zeros(grid_shape, bool)
    encoded[cells[:, 0], cells[:, 1]] = True
    cnt = _box_sum(encoded.astype(np.float64), radius)[encoded]
    best = np.full(len(cnt), -np.inf)
    arg = np.zeros(len(cnt), np.int32)
    plane = np.zeros(grid_shape, np.float32)
    for j in range(probs.shape[1]):
        plane[cells[:, 0], cells[:, 1]] = probs[:, j]
        mean = (_box_sum(plane, radius)[encoded] / cnt).astype(np.float32)
        better = mean > best
        best[better], arg[better] = mean[better], j
    index[encoded], confidence[encoded] = arg, best
    return index, confidence


def labels_from_index(index: np.ndarray, region_ids: list[int]) -> np.ndarray:
    """Map winning columns to region ids (uint16, 0 where empty)."""
    lut = np.asarray([0] + list(region_ids), np.uint16)
    return lut[index + 1]


def similarity_grid(cells: np.ndarray, embeddings: np.ndarray, text_embedding: np.ndarray,
                    grid_shape: tuple[int, int]) -> np.ndarray:
    """Cosine similarity of each encoded cell to one text embedding; NaN outside tissue."""
    out = np.full(grid_shape, np.nan, np.float32)
    if len(cells):
        out[cells[:, 0], cells[:, 1]] = dot_with(embeddings, text_embedding)
    return out


def dot_with(embeddings: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``embeddings @ vector`` as float32 (embeddings numpy or zarr, float16 or float32), block by block."""
    return run_small(_dot_with, embeddings, vector)


def _dot_with(embeddings, vector: np.ndarray) -> np.ndarray:
    import torch

    v = torch.from_numpy(np.asarray(vector, np.float32))
    out = np.empty(embeddings.shape[0], np.float32)
    with torch.inference_mode():
        for i, block in float32_blocks(embeddings):
            out[i:i + len(block)] = (block @ v).numpy()
    return out
