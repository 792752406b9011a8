"""The Allen Reference Atlas Nissl plates: index, split, labels and training pairs.

Split (fixed): plates whose number is a multiple of 5 are the test set and are never used for
training or tuning; plates with number % 10 == 3 are validation; the rest train. Plate 132
(registration ``fail``) is never used.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_cytoclip.models.bundle import InputSpec, Region
from napari_cytoclip.io.sections import Section, open_section
from napari_cytoclip.io.tissue import tissue_mask
from napari_cytoclip.inference.grid import TileGrid

IGNORED_LABELS = (0, 15)


def default_data_dir() -> Path:
    """``$CYTOCLIP_DATA`` or the project's ``../shared/data``."""
    env = os.environ.get("CYTOCLIP_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class Plate:
    number: int
    image: Path
    labels: Path
    um_per_px: float
    qc: str

    @property
    def split(self) -> str:
        return split_of(self.number)

    def section(self) -> Section:
        return open_section(self.image, pixel_size_um=self.um_per_px)

    def label_map(self) -> np.ndarray:
        from PIL import Image

        with Image.open(self.labels) as im:
            return np.asarray(im)


def split_of(number: int) -> str:
    if number % 5 == 0:
        return "test"
    if number % 10 == 3:
        return "val"
    return "train"


def plates(data_dir: str | Path | None = None, split: str | None = None) -> list[Plate]:
    """The usable plates (not ``fail``), optionally of one split."""
    root = Path(data_dir or default_data_dir()) / "allen_ara_coronal_nissl_plates"
    with open(root / "plates_index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = [Plate(int(r["plate"]), root / r["file"], root / r["label_file"], float(r["est_um_per_px"]), r["qc"])
           for r in rows if r["qc"] != "fail"]
    return [p for p in out if split is None or p.split == split]


def majority_labels(label_map: np.ndarray, centers: np.ndarray, half: float, samples: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Most common label in the square of half-side ``half`` px around each centre, and its share."""
    offs = np.linspace(-half, half, samples)
    dy, dx = np.meshgrid(offs, offs, indexing="ij")
    ys = np.clip(np.rint(centers[:, :1] + dy.ravel()), 0, label_map.shape[0] - 1).astype(int)
    xs = np.clip(np.rint(centers[:, 1:] + dx.ravel()), 0, label_map.shape[1] - 1).astype(int)
    vals = label_map[ys, xs]
    counts = np.stack([(vals == k).sum(1) for k in range(int(label_map.max()) + 1)], 1)
    best = counts.argmax(1)
    return best.astype(np.int32), counts.max(1) / vals.shape[1]


def plate_windows(plate: Plate, spec: InputSpec, label_um: float, stride_um: float, rng: np.random.Generator,
                  jitter: bool = True, min_purity: float = 0.6):
    """Windows on a jittered grid over the plate's tissue with their majority labels."""
    from napari_cytoclip.inference.windows import WindowReader

    section = plate.section()
    mask = tissue_mask(section)
    grid = TileGrid.covering(section.shape, section.pixel_size_um, stride_um)
    centers = grid.centers()
    if jitter:
        centers = centers + rng.uniform(-grid.step / 2, grid.step / 2, centers.shape)
    inside = mask.fraction_in_cells(centers, grid.step) >= 0.5
    centers = centers[inside]
    labels, purity = majority_labels(plate.label_map(), centers, label_um / section.pixel_size_um / 2)
    keep = (purity >= min_purity) & ~np.isin(labels, IGNORED_LABELS)
    centers, labels = centers[keep], labels[keep]
    reader = WindowReader(section, spec, mask.polarity)
    images = np.concatenate([reader.read(centers[i:i + 512]) for i in range(0, len(centers), 512)]) \
        if len(centers) else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    return images, labels, centers


def build_pair_folders(root: str | Path, split: str, spec: InputSpec, regions: list[Region], label_um: float,
                       stride_um: float, data_dir: str | Path | None = None, seed: int = 0,
                       plate_numbers: list[int] | None = None, workers: int = 1) -> list[Path]:
    """One pair folder per plate of ``split`` under ``root`` (``plate_<n>``); returns the folders."""
    from concurrent.futures import ProcessPoolExecutor

    if split == "test":
        raise ValueError("the test plates are never turned into training pairs")
    todo = [p for p in plates(data_dir, split) if plate_numbers is None or p.number in plate_numbers]
    jobs = [(Path(root) / f"plate_{p.number:03d}", p, spec, regions, label_um, stride_um, seed) for p in todo]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_plate_pairs, jobs))
    else:
        for job in jobs:
            _plate_pairs(job)
    return [j[0] for j in jobs]


def _plate_pairs(job) -> int:
    from napari_cytoclip.teach.pairs import Pair, write_pairs
    from napari_cytoclip.models.vocabularies import training_captions

    folder, plate, spec, regions, label_um, stride_um, seed = job
    if (folder / "pairs.csv").exists():
        return 0
    by_id = {r.id: r for r in regions}
    rng = np.random.default_rng([seed, plate.number])
    images, labels, centers = plate_windows(plate, spec, label_um, stride_um, rng)
    pairs = []
    for img, lab, c in zip(images, labels, centers):
        region = by_id[int(lab)]
        caps = training_captions(region)
        pairs.append(Pair(img, caps[int(rng.integers(len(caps)))], {
            "region_id": int(lab), "region_name": region.name, "source": plate.image.name,
            "plate": plate.number, "center_px": [float(c[0]), float(c[1])],
            "pixel_size_um": plate.um_per_px, "split": plate.split}))
    return write_pairs(folder, pairs)[0]
