"""Cutting model-input windows out of a section, at one or several physical scales.

Every window is cut from the pyramid level nearest its target resolution, at integer pixel
offsets that depend only on its centre, then resized with antialiasing: the result for a
window never depends on which other windows were read with it. A flat image (JPEG, PNG,
single-level TIFF) is read through :meth:`Section.pyramid`, 2x2 area-mean levels built once per
section on the first read, so a 5.12 mm window is not cut and resized from full resolution.

A reader keeps, per scale, the last band of its level that it read (the full level width where that
fits in :data:`BAND_BYTES`, plus :data:`BAND_ROWS` rows below what a batch needs): grid cells
are visited row by row, so the next batches' windows mostly lie in it, and a tiled (JPEG) level
is decoded about once instead of once per batch. The pixels are the same either way.
"""
from __future__ import annotations

import numpy as np

from napari_cytoclip.models.bundle import InputSpec
from napari_cytoclip.io import sections as _sections
from napari_cytoclip.io.sections import Section

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
BAND_BYTES = 32 * 2 ** 20  # largest band read and kept per scale (float32, before the gray conversion)
BAND_ROWS = 256            # rows read beyond a batch's need, at the level's resolution


class WindowReader:
    """Reads uint8 ``(n, size, size, 3)`` model inputs centred on level-0 pixel positions."""

    def __init__(self, section: Section, spec: InputSpec, polarity: str, pyramid: bool = True):
        """``pyramid=False`` reads a flat image at full resolution only (the slow reference path)."""
        self.spec = spec
        self.invert = polarity != spec.polarity
        self.background = 1.0 if spec.polarity == "brightfield" else 0.0
        px = section.require_pixel_size()
        self._base, self._coarsest = section, max(spec.scales_um) / spec.size
        self._view = None if pyramid else section
        factors = (section.pyramid_factors(self._coarsest) if pyramid
                   else [section.downsample(i) for i in range(len(section.levels))])
        # a built level (flat image) is used only where the window is still reduced PYRAMID_MIN_RESIZE-fold
        margin = _sections.PYRAMID_MIN_RESIZE if pyramid and len(section.levels) == 1 else 1.0
        self.plans = []
        for scale_um in spec.scales_um:
            target = scale_um / spec.size
            level = max([i for i, f in enumerate(factors) if px * f <= target * 1.0001 / (margin if i else 1.0)],
                        default=0)
            ds = factors[level]
            crop = max(1, int(round(scale_um / (px * ds))))
            self.plans.append((level, ds, crop))
        self._bands: dict[int, tuple[int, int, np.ndarray]] = {}  # scale -> (y0, x0, model-space pixels)

    @property
    def section(self) -> Section:
        """The section windows are cut from: its pyramid view, built on first use (not at construction, so
        planning a run costs nothing)."""
        if self._view is None:
            self._view = self._base.pyramid(self._coarsest)
        return self._view

    def read(self, centers_px: np.ndarray) -> np.ndarray:
        """Windows for level-0 ``(y, x)`` centres, in the model's polarity and channel layout."""
        centers_px = np.asarray(centers_px, dtype=np.float64).reshape(-1, 2)
        n, size = len(centers_px), self.spec.size
        if n == 0:
            return np.zeros((0, size, size, 3), np.uint8)
        planes = [self._scale_windows(centers_px, k, *plan) for k, plan in enumerate(self.plans)]
        if self.spec.mode == "rgb":
            out = planes[0]
        elif len(planes) == 1:
            out = np.repeat(planes[0][..., None], 3, axis=-1)
        else:
            out = np.stack(planes, axis=-1)
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)

    def _scale_windows(self, centers_px: np.ndarray, scale: int, level: int, ds: float, crop: int) -> np.ndarray:
        corners = np.rint((centers_px + 0.5) / ds - 0.5 - crop / 2).astype(np.int64)
        y0, x0 = corners.min(0)
        y1, x1 = corners.max(0) + crop
        region = self._region(scale, level, int(y0), int(y1), int(x0), int(x1))
        rgb = region.ndim == 3
        view = np.lib.stride_tricks.sliding_window_view(region, (crop, crop), axis=(0, 1))
        crops = view[corners[:, 0] - y0, corners[:, 1] - x0]  # (n, [3,] crop, crop)
        return resize_batch(crops, self.spec.size, channels_first=rgb)

    def _region(self, scale: int, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Model-space pixels of ``level`` in ``[y0, y1) x [x0, x1)``, from the kept band when it holds them."""
        band = self._bands.get(scale)
        if band is not None:
            by0, bx0, data = band
            if by0 <= y0 and y1 <= by0 + data.shape[0] and bx0 <= x0 and x1 <= bx0 + data.shape[1]:
                return data[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
        h, w = self.section.levels[level].shape[:2]
        by1 = max(y1, min(h, y1 + BAND_ROWS))
        row_bytes = (by1 - y0) * (3 if self.section.is_rgb else 1) * 4
        width = BAND_BYTES // row_bytes
        if width < x1 - x0:  # too large to keep: read just what is needed
            return self._to_model_space(self.section.read(level, y0, y1, x0, x1))
        if width >= max(x1, w) - min(x0, 0):
            bx0, bx1 = min(x0, 0), max(x1, w)
        else:  # as wide as allowed, centred on what is needed
            bx0 = x0 - (width - (x1 - x0)) // 2
            bx1 = bx0 + width
        data = self._to_model_space(self.section.read(level, y0, by1, bx0, bx1))
        self._bands[scale] = (y0, bx0, data)
        return data[:y1 - y0, x0 - bx0:x1 - bx0]

    def _to_model_space(self, region: np.ndarray) -> np.ndarray:
        """Gray (or RGB for rgb models), model polarity, background where the image ends."""
        if self.spec.mode != "rgb" and region.ndim == 3:
            region = region @ LUMA
        if self.spec.mode == "rgb" and region.ndim == 2:
            region = np.repeat(region[..., None], 3, axis=-1)
        if self.invert:
            region = 1.0 - region
        region[np.isnan(region)] = self.background
        return region


def resize_batch(crops: np.ndarray, size: int, channels_first: bool = False) -> np.ndarray:
    """Antialiased bilinear resize of ``(n, [C,] h, w)`` float crops to ``(n, size, size[, C])``."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
    if not channels_first:
        x = x[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = x.numpy()
    return out[:, 0] if not channels_first else out.transpose(0, 2, 3, 1)
