"""A large real-texture test slide: the Allen Nissl plates mosaicked into a pyramidal JPEG BigTIFF.

    python benchmarks/make_slide.py [--out /tmp/cytoclip-bench/slide40k.tif] [--size 40960] [--crop 10240]

Every plate is resampled to one common pixel size (``--pixel-um``, 2.5 um/px: the plates' 4.2-9.5
um/px upsampled 1.7-3.8x, so each section keeps its true physical size, 4-10 mm) and placed in a
``--cell`` px square of a square mosaic (10 x 10 plates at the default 40,960 px), cycling through
the 131 usable plates. Dark-field like the plates: black slide, bright cells. Written as RGB,
tiled 512 px, JPEG (quality 85), BigTIFF, with SubIFD pyramid levels /2 ... /64 and resolution tags,
so ``napari_cytoclip.io.sections.open_section`` reads the pixel size back. Tiles come from a generator
that keeps one row of resized plates in memory (a few hundred MB at most), whatever the slide size.

``--crop N`` also writes the top-left N x N px of the same mosaic as its own pyramidal file
(``<out stem>_crop<N>.tif``), for comparing peak memory. Existing files are reused unless
``--force``. Never commit these files (hundreds of MB).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

TILE = 512
LEVELS = 6  # /2 ... /64


def default_out() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / "cytoclip-bench" / "slide40k.tif"


def _plates():
    from napari_cytoclip.teach import allen

    return sorted(allen.plates(), key=lambda p: p.number)


class Mosaic:
    """Renders the mosaic at any power-of-two downsample, one row of plates at a time."""

    def __init__(self, size: int, pixel_um: float, cell: int, cols: int = 10):
        self.size, self.pixel_um, self.cell, self.cols = size, pixel_um, cell, cols
        self.plates = _plates()
        self.n = int(np.ceil(size / cell))  # rows and columns rendered
        self._row_key = None
        self._row: list[tuple[int, int, np.ndarray]] = []

    def plate_at(self, r: int, c: int):
        return self.plates[(r * self.cols + c) % len(self.plates)]  # a crop shows the same plates

    def _row_images(self, r: int, ds: int) -> list[tuple[int, int, np.ndarray]]:
        """``(y0, x0, image)`` of the plates of mosaic row ``r`` at downsample ``ds``."""
        from PIL import Image

        if self._row_key != (r, ds):
            self._row, self._row_key = [], (r, ds)
            for c in range(self.n):
                plate = self.plate_at(r, c)
                with Image.open(plate.image) as im:
                    im = im.convert("L")
                    scale = plate.um_per_px / self.pixel_um / ds
                    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
                    img = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR if ds == 1 else
                                               Image.Resampling.BOX))
                cell = self.cell / ds
                y0 = int(round(r * cell + (cell - h) / 2))
                x0 = int(round(c * cell + (cell - w) / 2))
                self._row.append((y0, x0, img))
        return self._row

    def region(self, ds: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Gray uint8 pixels ``[y0, y1) x [x0, x1)`` of the mosaic at downsample ``ds``."""
        out = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cell = self.cell / ds
        for r in range(int(y0 // cell), min(self.n, int((y1 - 1) // cell) + 1)):
            for py, px, img in self._row_images(r, ds):
                h, w = img.shape
                ya, yb, xa, xb = max(y0, py), min(y1, py + h), max(x0, px), min(x1, px + w)
                if ya < yb and xa < xb:
                    out[ya - y0:yb - y0, xa - x0:xb - x0] = img[ya - py:yb - py, xa - px:xb - px]
        return out


def _tiles(mosaic: Mosaic, ds: int, height: int, width: int):
    for ty in range(0, height, TILE):
        band = mosaic.region(ds, ty, min(ty + TILE, height), 0, width)
        for tx in range(0, width, TILE):
            tile = np.zeros((TILE, TILE, 3), np.uint8)
            part = band[:, tx:tx + TILE]
            tile[:part.shape[0], :part.shape[1]] = part[..., None]
            yield tile


def write_slide(path: Path, size: int, pixel_um: float = 2.5, cell: int = 4096, levels: int = LEVELS,
                quality: int = 85) -> Path:
    """Write the mosaic's top-left ``size`` x ``size`` px as a pyramidal JPEG BigTIFF at ``path``."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    per_cm = 1e4 / pixel_um
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for k in range(levels + 1):
            ds = 2 ** k
            h = w = int(np.ceil(size / ds))
            mosaic = Mosaic(size, pixel_um, cell)
            kw = dict(subifds=levels) if k == 0 else dict(subfiletype=1)
            tif.write(_tiles(mosaic, ds, h, w), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                      photometric="rgb", compression="jpeg", compressionargs={"level": quality}, resolution=(per_cm / ds, per_cm / ds),
                      resolutionunit="CENTIMETER", metadata=None, **kw)
    os.replace(tmp, path)
    return path


def ensure_slides(out: Path | None = None, size: int = 40960, crop: int | None = 10240, force: bool = False,
                  pixel_um: float = 2.5) -> tuple[Path, Path | None]:
    """The slide (and its crop), written if missing."""
    out = Path(out or default_out())
    paths = [(out, size)]
    crop_path = out.with_name(f"{out.stem}_crop{crop}.tif") if crop else None
    if crop_path:
        paths.append((crop_path, crop))
    for path, n in paths:
        if path.is_file() and not force:
            continue
        t = time.perf_counter()
        write_slide(path, n, pixel_um=pixel_um)
        print(f"wrote {path} ({n} x {n} px, {path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s",
              flush=True)
    return out, crop_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=default_out())
    ap.add_argument("--size", type=int, default=40960, help="side in pixels (default 40960)")
    ap.add_argument("--crop", type=int, default=10240, help="also write the top-left crop of this side (0: none)")
    ap.add_argument("--pixel-um", type=float, default=2.5)
    ap.add_argument("--force", action="store_true", help="rewrite existing files")
    args = ap.parse_args(argv)
    slide, crop = ensure_slides(args.out, args.size, args.crop or None, args.force, args.pixel_um)
    from napari_cytoclip.io.sections import open_section

    for path in (slide, crop):
        if path is None:
            continue
        s = open_section(path)
        print(f"{path}: {s.shape[1]} x {s.shape[0]} px, {s.pixel_size_um:g} um/px, "
              f"{len(s.levels)} levels {[tuple(lv.shape[:2]) for lv in s.levels]}, {path.stat().st_size / 1e6:.0f} MB")
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
