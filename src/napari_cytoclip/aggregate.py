"""From tile embeddings to region probabilities, and from overlapping windows to a label grid."""
from __future__ import annotations

import math

import numpy as np


def region_probabilities(embeddings: np.ndarray, region_embeddings: np.ndarray, logit_scale: float) -> np.ndarray:
    """Softmax over regions of the scaled cosine similarity, ``(n, K)`` float32."""
    logits = logit_scale * (np.asarray(embeddings, np.float32) @ region_embeddings.T.astype(np.float32))
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return p


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


def labels_from_index(index: np.ndarray, region_ids: list[int]) -> np.ndarray:
    """Map winning columns to region ids (uint16, 0 where empty)."""
    lut = np.asarray([0] + list(region_ids), np.uint16)
    return lut[index + 1]


def similarity_grid(cells: np.ndarray, embeddings: np.ndarray, text_embedding: np.ndarray,
                    grid_shape: tuple[int, int]) -> np.ndarray:
    """Cosine similarity of each encoded cell to one text embedding; NaN outside tissue."""
    out = np.full(grid_shape, np.nan, np.float32)
    if len(cells):
        out[cells[:, 0], cells[:, 1]] = np.asarray(embeddings, np.float32) @ text_embedding.astype(np.float32)
    return out
