"""Polarity detection and tissue masks from a low-resolution view of a section."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_cytoclip.io.sections import Section


def detect_polarity(section: Section) -> str:
    """``brightfield`` (dark stain on a light slide) or ``darkfield`` (bright cells on black).

    Decided by the image border, which is background on a section image.
    """
    gray, _ = section.thumbnail()
    return polarity_of(gray)


def polarity_of(gray: np.ndarray) -> str:
    return "brightfield" if float(np.median(_border(gray))) > 0.5 else "darkfield"


def stain_image(gray: np.ndarray, polarity: str) -> np.ndarray:
    """Stain density in [0, 1]: high where there is tissue, whatever the polarity."""
    return 1.0 - gray if polarity == "brightfield" else gray


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centers[int(np.argmax(between))])


@dataclass
class TissueMask:
    """A boolean mask on a thumbnail; ``factor`` level-0 pixels per mask pixel."""

    mask: np.ndarray
    factor: float
    polarity: str

    def fraction_in_cells(self, centers_px: np.ndarray, step_px: float, chunk: int = 65536) -> np.ndarray:
        """Tissue fraction in the square of side ``step_px`` around each level-0 centre, ``chunk``
        centres at a time: a million-cell grid needs no million-long temporaries."""
        integral = np.pad(self.mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        h, w = self.mask.shape
        half = step_px / 2 / self.factor
        out = np.empty(len(centers_px), np.float64)
        for i in range(0, len(centers_px), chunk):
            c = centers_px[i:i + chunk]
            cy, cx = (c[:, 0] + 0.5) / self.factor, (c[:, 1] + 0.5) / self.factor
            y0 = np.clip(np.floor(cy - half), 0, h).astype(int)
            y1 = np.clip(np.ceil(cy + half), 0, h).astype(int)
            x0 = np.clip(np.floor(cx - half), 0, w).astype(int)
            x1 = np.clip(np.ceil(cx + half), 0, w).astype(int)
            area = np.maximum((y1 - y0) * (x1 - x0), 1)
            out[i:i + chunk] = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
        return out


def tissue_mask(section: Section, polarity: str | None = None, max_side: int = 1024) -> TissueMask:
    """Stain density above the slide background, closed, holes filled, specks dropped.

    The threshold is the lower of Otsu's and "background + 5 robust sigmas", where the
    background is measured on the darker half of the image border: dim tissue (a darkfield brainstem next to a
    bright cerebellum) stays in the mask even when Otsu splits the tissue itself.
    """
    gray, factor = section.thumbnail(max_side)
    polarity = polarity or polarity_of(gray)
    stain = ndi.gaussian_filter(stain_image(gray, polarity), sigma=2)
    if float(stain.max() - stain.min()) < 0.02:  # a flat image has no tissue to find
        return TissueMask(np.zeros_like(stain, bool), factor, polarity)
    otsu = otsu_threshold(stain)
    bg, noise = _background(stain, gray, otsu)
    threshold = min(otsu, bg + max(0.02, 5 * noise))
    mask = stain > threshold
    mask = ndi.binary_opening(mask, iterations=1)
    mask = ndi.binary_closing(mask, iterations=3)
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1
        mask = np.isin(labels, keep)
    return TissueMask(mask, factor, polarity)


def _background(stain: np.ndarray, gray: np.ndarray, otsu: float) -> tuple[float, float]:
    """Slide background level and noise: from the image border without pure padding pixels,
    or, where the border is all padding, from the darker Otsu class. Tissue touching the border
    is brighter, so only the darker half of the candidates counts."""
    real = (gray > 0.005) & (gray < 0.995)
    cand = _border(stain)[_border(real)]
    if cand.size < 0.1 * _border(stain).size:
        cand = stain[real & (stain < otsu)]
    if cand.size == 0:
        return 0.0, 0.0
    low = cand[cand <= np.median(cand)]
    bg = float(np.median(low))
    return bg, 1.4826 * float(np.median(np.abs(low - bg)))


def _border(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    b = max(1, min(h, w) // 20)
    return np.concatenate([img[:b].ravel(), img[-b:].ravel(), img[:, :b].ravel(), img[:, -b:].ravel()])
