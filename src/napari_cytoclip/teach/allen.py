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
    return Path(__file__).resolve().parents[4] / "shared" / "data"


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


# ---------------------------------------------------------------------------------------------
# Fine CCF labels on the plates, and sub-regions of any division by ancestry in the structure tree

CCF_DIR = "allen_ccf_mouse_nissl_100um"
ANNOTATION_25UM = "annotation_ccf2017_25um.nrrd"
STRUCTURE_TREE = "structure_tree_safe_2017.csv"


def read_nrrd(path: str | Path) -> np.ndarray:
    """A raw or gzip-encoded NRRD volume (pynrrd's default Fortran order) as a C-ordered array."""
    import gzip

    raw = Path(path).read_bytes()
    end = raw.index(b"\n\n")
    fields = {}
    for line in raw[:end].decode("latin-1").splitlines()[1:]:
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip()] = value.lstrip("=").strip()
    body = raw[end + 2:]
    if fields.get("encoding") in ("gzip", "gz"):
        body = gzip.decompress(body)
    elif fields.get("encoding") != "raw":
        raise ValueError(f"{path}: unsupported NRRD encoding {fields.get('encoding')!r}")
    types = {"uint8": "u1", "uint16": "u2", "uint32": "u4", "int16": "i2", "int32": "i4", "float": "f4"}
    dtype = np.dtype(("<" if fields.get("endian", "little") == "little" else ">") + types[fields["type"]])
    sizes = [int(s) for s in fields["sizes"].split()]
    return np.frombuffer(body, dtype).reshape(sizes[::-1]).transpose()


@dataclass(frozen=True)
class StructureTree:
    """The Allen mouse ontology: acronym, name, parent and ancestor path (root first) per structure id."""

    acronym: dict
    name: dict
    path: dict

    def id_of(self, acronym: str) -> int:
        for sid, acr in self.acronym.items():
            if acr == acronym:
                return sid
        raise KeyError(f"no structure with acronym {acronym!r}")

    def children(self, sid: int) -> list[int]:
        return [k for k, p in self.path.items() if len(p) >= 2 and p[-2] == sid]

    def lut(self, targets: list[int], ids: np.ndarray) -> np.ndarray:
        """For each of ``ids``, 1 + the index of its first ancestor-or-self in ``targets`` (0: none).

        ``targets`` are tried deepest first, so nested targets (a division and one of its parts) resolve
        to the most specific one.
        """
        order = sorted(range(len(targets)), key=lambda i: -len(self.path.get(targets[i], ())))
        out = np.zeros(len(ids), np.int32)
        for j, sid in enumerate(np.asarray(ids).tolist()):
            anc = set(self.path.get(int(sid), ()))
            for i in order:
                if targets[i] in anc:
                    out[j] = i + 1
                    break
        return out


def structure_tree(data_dir: str | Path | None = None) -> StructureTree:
    path = Path(data_dir or default_data_dir()) / CCF_DIR / STRUCTURE_TREE
    acr, name, anc = {}, {}, {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            sid = int(r["id"])
            acr[sid], name[sid] = r["acronym"], r["name"]
            anc[sid] = tuple(int(s) for s in r["structure_id_path"].strip("/").split("/") if s)
    return StructureTree(acr, name, anc)


_ANNOTATION: dict = {}


def _annotation_25um(data_dir: Path) -> np.ndarray:
    """The 25 um CCF annotation volume (uint32 structure ids; read once per process, about 300 MB)."""
    key = str(data_dir)
    if key not in _ANNOTATION:
        _ANNOTATION.clear()
        _ANNOTATION[key] = read_nrrd(data_dir / CCF_DIR / ANNOTATION_25UM)
    return _ANNOTATION[key]


def plate_affine(plate_number: int, data_dir: str | Path | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """``(ccf_ap_index_100um, A, t)`` of a plate: ``q = A @ x + t`` maps CCF 100 um (DV, LR) to plate (row, col)."""
    root = Path(data_dir or default_data_dir()) / "allen_ara_coronal_nissl_plates"
    with open(root / "plates_index.csv", newline="") as f:
        for r in csv.DictReader(f):
            if int(r["plate"]) == plate_number:
                a = np.array([[float(r["A00"]), float(r["A01"])], [float(r["A10"]), float(r["A11"])]])
                return int(r["ccf_ap_index_100um"]), a, np.array([float(r["t0"]), float(r["t1"])])
    raise KeyError(f"plate {plate_number} is not in {root / 'plates_index.csv'}")


def fine_labels(plate_number: int, data_dir: str | Path | None = None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """CCFv3 2017 structure ids (uint32, 0 = outside the atlas) on the plate's pixel grid.

    Slice ``4 * ccf_ap_index_100um + 2`` of the 25 um annotation, warped with the inverse of the
    plate's affine, nearest neighbour: ``x25 = 4 * A^-1 @ (q - t) + 1.5``. Not masked to the tissue.
    """
    data_dir = Path(data_dir or default_data_dir())
    ap, a, t = plate_affine(plate_number, data_dir)
    if shape is None:
        from PIL import Image

        with Image.open(data_dir / "allen_ara_coronal_nissl_plates" / "labels_coarse" / f"{plate_number}.png") as im:
            shape = (im.height, im.width)
    sl = _annotation_25um(data_dir)[4 * ap + 2]
    q = np.stack(np.indices(shape).reshape(2, -1)).astype(np.float64)
    x25 = 4.0 * np.linalg.solve(a, q - t[:, None]) + 1.5
    r, c = np.rint(x25).astype(np.int64)
    ok = (r >= 0) & (r < sl.shape[0]) & (c >= 0) & (c < sl.shape[1])
    out = np.zeros(r.shape, np.uint32)
    out[ok] = sl[r[ok], c[ok]]
    return out.reshape(shape)


def subregion_labels(fine: np.ndarray, acronyms: list[str], tree: StructureTree) -> np.ndarray:
    """Pixels of ``fine`` (structure ids) as 1 + index into ``acronyms`` of their ancestor (0: none)."""
    targets = [tree.id_of(a) for a in acronyms]
    ids, inv = np.unique(fine, return_inverse=True)
    return tree.lut(targets, ids)[inv].reshape(fine.shape)


def sub_regions(division: str, tree: StructureTree, depth: int = 1) -> list[str]:
    """Acronyms of the structures ``depth`` levels below ``division`` in the ontology (a default split)."""
    level = [tree.id_of(division)]
    for _ in range(depth):
        level = [c for s in level for c in tree.children(s)] or level
    return [tree.acronym[s] for s in level]
