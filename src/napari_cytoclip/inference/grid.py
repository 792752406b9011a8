"""Tile grids defined in micrometres and mapped to image pixels."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from napari_cytoclip.errors import SectionError

MAX_GRID_CELLS = 4_000_000  # 2000 x 2000 cells: 100 um cells over 20 x 20 cm, 10 um cells over 2 x 2 cm
NOMINAL_TILES_PER_S = 150.0  # the shipped model on a laptop CPU; only used to say how long a refused plan would take


class PlanTooLarge(SectionError):
    """A run would plan more work or memory than any sane section needs (a wrong pixel size or stride)."""


def hours_text(tiles: float) -> str:
    """``about N h`` (or min) for ``tiles`` at :data:`NOMINAL_TILES_PER_S`."""
    seconds = tiles / NOMINAL_TILES_PER_S
    return f"about {seconds / 3600:,.0f} h" if seconds >= 5400 else f"about {max(seconds / 60, 1):,.0f} min"


@dataclass(frozen=True)
class TileGrid:
    """A regular grid of cells over a section, in level-0 pixel coordinates.

    Cell ``(r, c)`` is centred at ``origin + (r, c) * step`` (pixels, ``(y, x)``);
    its square covers ``step`` pixels, so the grid paints the section without gaps.
    """

    origin: tuple[float, float]
    step: float
    shape: tuple[int, int]
    pixel_size_um: float

    @classmethod
    def covering(cls, image_shape: tuple[int, int], pixel_size_um: float, stride_um: float,
                 source: str | None = None, max_cells: int = MAX_GRID_CELLS) -> "TileGrid":
        """The grid of ``stride_um`` cells centred on an image of ``image_shape`` pixels.

        Raises :class:`PlanTooLarge` (naming ``source``) for more than ``max_cells`` cells.
        """
        if not (pixel_size_um > 0 and np.isfinite(pixel_size_um)):
            raise ValueError(f"pixel size must be a positive number of micrometres, got {pixel_size_um}")
        if not (stride_um > 0 and np.isfinite(stride_um)):
            raise ValueError(f"stride must be a positive number of micrometres, got {stride_um}")
        step = stride_um / pixel_size_um
        h, w = image_shape
        rows, cols = (max(1, int(np.ceil(n / step - 1e-9))) for n in (h, w))  # 5 / (1 / 49) is 245.00000000000003
        if rows * cols > max_cells:
            raise PlanTooLarge(source, f"a {stride_um:g} um grid on {h} x {w} px at {pixel_size_um:g} um/px has "
                                       f"{rows * cols:,} cells ({rows:,} x {cols:,}), over the limit of "
                                       f"{max_cells:,} (MAX_GRID_CELLS; {hours_text(rows * cols)} of work); "
                                       "check the pixel size and the stride")
        # centre the grid on the image so both borders lose the same margin
        oy = (h - rows * step) / 2 + step / 2 - 0.5
        ox = (w - cols * step) / 2 + step / 2 - 0.5
        return cls((float(oy), float(ox)), float(step), (rows, cols), float(pixel_size_um))

    @property
    def stride_um(self) -> float:
        return self.step * self.pixel_size_um

    def centers(self, cells: np.ndarray | None = None) -> np.ndarray:
        """Pixel centres ``(n, 2)`` of ``cells`` (``(n, 2)`` row/col), or of every cell."""
        if cells is None:
            rr, cc = np.indices(self.shape)
            cells = np.stack([rr.ravel(), cc.ravel()], 1)
        return np.asarray(self.origin) + np.asarray(cells, dtype=np.float64) * self.step

    def layer_transform(self, image_scale: tuple[float, float] = (1.0, 1.0),
                        image_translate: tuple[float, float] = (0.0, 0.0)) -> dict:
        """``scale`` and ``translate`` that overlay a grid-shaped layer on its image layer."""
        scale = tuple(float(self.step * s) for s in image_scale)
        translate = tuple(float(t + o * s) for t, o, s in zip(image_translate, self.origin, image_scale))
        return {"scale": scale, "translate": translate}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stride_um"] = self.stride_um
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TileGrid":
        return cls(tuple(d["origin"]), float(d["step"]), tuple(d["shape"]), float(d["pixel_size_um"]))
