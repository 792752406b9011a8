"""Image-text pair folders: what corrections export and what training reads.

A pair folder holds ``tiles/<content hash>.png`` (model-input windows), ``pairs.csv`` with
``filepath,caption`` (open_clip's training CSV) and ``pairs.jsonl`` with one provenance record
per pair. Names are content hashes, so writing the same pair twice adds nothing.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from napari_cytoclip.errors import CytoclipError, OutputError
from napari_cytoclip.io.safe_files import atomic_write_bytes, inside, read_regular_bytes

if TYPE_CHECKING:
    from napari_cytoclip.models.bundle import InputSpec

PAIRS_CSV = "pairs.csv"
PAIRS_JSONL = "pairs.jsonl"
TILES_DIR = "tiles"


@dataclass
class Pair:
    """One window (uint8 ``(N, N, 3)``), its caption and provenance."""

    image: np.ndarray
    caption: str
    record: dict


def pair_name(image: np.ndarray, caption: str) -> str:
    h = hashlib.sha256(np.ascontiguousarray(image).tobytes())
    h.update(caption.encode("utf-8"))
    return h.hexdigest()[:20]


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def existing_names(folder: Path) -> set[str]:
    csv_path = folder / PAIRS_CSV
    if not os.path.lexists(csv_path):
        return set()
    text = read_regular_bytes(csv_path).decode("utf-8", errors="replace")
    return {Path(row.get("filepath") or "").stem for row in csv.DictReader(io.StringIO(text, newline=""))}


def write_pairs(folder: str | Path, pairs: Iterable[Pair], root: str | Path | None = None) -> tuple[int, int]:
    """Add pairs to a folder (created if needed); returns ``(added, already_there)``.

    Tiles are written atomically first, then ``pairs.jsonl`` and last ``pairs.csv`` are rewritten
    atomically with the new rows appended: an interrupted export leaves the earlier pairs intact,
    and every pair the CSV lists has its provenance. Nothing is written outside ``root`` (default:
    ``folder``), even where ``folder`` or its ``tiles`` is a symlink.
    """
    folder = Path(folder)
    root = folder if root is None else Path(root)
    tiles = folder / TILES_DIR
    inside(root, folder)
    inside(root, tiles)
    try:
        tiles.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(folder, f"cannot create the pair folder ({exc.strerror})") from None
    inside(root, tiles)
    known = existing_names(folder)
    rows, records, skipped = [], [], 0
    for pair in pairs:
        name = pair_name(pair.image, pair.caption)
        if name in known:
            skipped += 1
            continue
        rel = f"{TILES_DIR}/{name}.png"
        _write_tile(inside(root, folder / rel), encode_png(pair.image))
        known.add(name)
        rows.append((rel, pair.caption))
        records.append({"filepath": rel, "caption": pair.caption, **pair.record})
    if rows:
        # provenance first: a fault before the CSV is rewritten leaves the new pairs unlisted (a rerun adds them)
        _append_text(folder / PAIRS_JSONL, "".join(json.dumps(r, default=_jsonable) + "\n" for r in records))
        _append_text(folder / PAIRS_CSV, _csv_text(rows, header=not (folder / PAIRS_CSV).exists()))
    return len(rows), skipped


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _csv_text(rows, header: bool) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(["filepath", "caption"])
    w.writerows(rows)
    return buf.getvalue()


def _write_tile(path: Path, data: bytes) -> None:
    """A tile left by an interrupted export is reused; a different file of that name is never replaced."""
    if os.path.lexists(path):
        try:
            same = stat.S_ISREG(path.lstat().st_mode) and read_regular_bytes(path) == data
        except (OSError, CytoclipError):
            same = False
        if not same:
            raise OutputError(path, "exists and is not the tile an export wrote; refusing to replace it")
        return
    atomic_write_bytes(path, data)


def _append_text(path: Path, text: str) -> None:
    old = read_regular_bytes(path) if os.path.lexists(path) else b""
    atomic_write_bytes(path, old + text.encode("utf-8"))


def read_pairs(folder: str | Path) -> tuple[list[Path], list[str], list[dict]]:
    """Files, captions and provenance records (``{}`` where the JSONL has none) of a pair folder.

    Every file named (and the CSV and JSONL themselves) must be a regular file inside ``folder``
    after resolving symlinks; anything else is one error naming ``pairs.csv`` and the row.
    """
    folder = Path(folder)
    csv_path = folder / PAIRS_CSV
    if not os.path.lexists(csv_path):
        raise CytoclipError(folder, f"not a pair folder: {PAIRS_CSV} is missing")
    try:
        text = _read_inside(folder, csv_path).decode("utf-8")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"filepath", "caption"} <= set(reader.fieldnames):
            raise CytoclipError(csv_path, "needs the columns 'filepath' and 'caption'")
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CytoclipError(csv_path, f"malformed CSV ({exc})") from None
    records: dict[str, dict] = {}
    jsonl = folder / PAIRS_JSONL
    if os.path.lexists(jsonl):
        lines = _read_inside(folder, jsonl).decode("utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    raise CytoclipError(jsonl, f"line {i} is not JSON") from None
                if isinstance(rec, dict):
                    records[str(rec.get("filepath", ""))] = rec
    files, captions, recs, real_dirs = [], [], [], {}
    for i, row in enumerate(rows, 1):
        name = row.get("filepath") or ""
        files.append(_pair_file(folder, csv_path, i, name, real_dirs))
        captions.append(row["caption"] or "")
        recs.append(records.get(name, {}))
    return files, captions, recs


def _pair_file(folder: Path, csv_path: Path, row: int, name: str, real_dirs: dict[str, str]) -> Path:
    """The resolved file a pairs.csv row names: relative, inside ``folder`` and a regular file.

    ``real_dirs`` caches resolved parent folders, so a large pair folder resolves each folder once.
    """
    def bad(problem: str) -> CytoclipError:
        return CytoclipError(csv_path, f"row {row}: {name!r} {problem}")

    if not name or os.path.isabs(name) or "\0" in name:
        raise bad("is not a path relative to the pair folder" if name else "names no file")
    if "" not in real_dirs:
        real_dirs[""] = os.path.realpath(folder)
    root = real_dirs[""]
    parent, base = os.path.split(os.path.join(folder, name))
    if parent not in real_dirs:
        real_dirs[parent] = os.path.realpath(parent)
    path = os.path.join(real_dirs[parent], base)
    try:
        if base in ("", ".", "..") or stat.S_ISLNK(os.lstat(path).st_mode):
            path = os.path.realpath(path)
    except OSError:
        pass  # missing: reported below, once the path is known to be inside
    if path != root and not path.startswith(root.rstrip(os.sep) + os.sep):
        raise bad(f"points outside the pair folder {folder}")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise bad("is not a regular file (a FIFO, device or folder is never opened)")
    return Path(path)


def _read_inside(folder: Path, path: Path) -> bytes:
    root = folder.resolve()
    if root not in path.resolve().parents:
        raise CytoclipError(path, f"points outside the pair folder {folder}")
    return read_regular_bytes(path)


def load_pair_images(files: list[Path], size: int) -> np.ndarray:
    """All pair images as uint8 ``(n, size, size, 3)``; refuses images of another size."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def load(path: Path) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(read_regular_bytes(path))) as im:  # never blocks on a FIFO
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise CytoclipError(path, f"unreadable pair image ({exc})") from None
        if arr.shape[:2] != (size, size):
            raise CytoclipError(path, f"pair image is {arr.shape[1]}x{arr.shape[0]} px, the model takes {size}x{size}")
        return arr

    out = np.zeros((len(files), size, size, 3), np.uint8)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 2)) as pool:
        for i, arr in enumerate(pool.map(load, files, chunksize=256)):
            out[i] = arr
    return out


# ---------------------------------------------------------------------------------------------
# tile geometry: pairs for any model, not only the current model's inputs

def export_geometry(base: "InputSpec", tile_px: int | None = None, tile_um: float | None = None,
                    mode: str | None = None, scales_um: Sequence[float] | None = None) -> "InputSpec":
    """The windows an export cuts: ``base`` (the current model's input) with the given fields replaced.

    ``tile_um`` sets the one window of an ``rgb`` tile (or, for ``gray_scales`` without ``scales_um``,
    its single scale); e.g. ``tile_px=224, tile_um=224, mode="rgb"``: native colour tiles at 1 um/px.
    """
    from dataclasses import replace

    from napari_cytoclip.errors import BundleError
    from napari_cytoclip.models.bundle import check_input

    if tile_px is None and tile_um is None and mode is None and not scales_um:
        return base
    mode = mode or base.mode
    if scales_um:
        scales = tuple(float(s) for s in scales_um)
    elif tile_um is not None:
        scales = (float(tile_um),)
    elif mode == "rgb" and len(base.scales_um) != 1:
        raise BundleError(None, f"an 'rgb' tile is one window: give its size with --tile-um "
                                f"(the model's windows are {list(base.scales_um)} um)")
    else:
        scales = base.scales_um
    spec = replace(base, size=int(tile_px or base.size), scales_um=scales, mode=mode)
    check_input(spec, "tile geometry")
    return spec


def geometry_record(spec: "InputSpec") -> dict:
    """The geometry a pair's provenance records (what the tile is, not how a model normalises it)."""
    return {"size": int(spec.size), "scales_um": [float(s) for s in spec.scales_um], "mode": spec.mode,
            "polarity": spec.polarity}


def check_folder_geometry(folder: str | Path, spec: "InputSpec") -> None:
    """Refuse adding tiles of another size or kind to a pair folder (one training CSV, one geometry)."""
    path = Path(folder) / PAIRS_JSONL
    if not path.is_file():
        return
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline(1 << 20) or b"{}")
    except (OSError, ValueError, RecursionError):
        return
    old = first.get("input") if isinstance(first, dict) else None
    if not isinstance(old, dict):
        return
    new = geometry_record(spec)
    try:
        same = (int(old.get("size", -1)) == new["size"] and old.get("mode") == new["mode"]
                and [float(s) for s in old.get("scales_um", [])] == new["scales_um"])
    except (TypeError, ValueError):
        return
    if not same:
        raise OutputError(folder, f"holds {old.get('size')} px {old.get('mode')} tiles of {old.get('scales_um')} um; "
                                  f"these are {new['size']} px {new['mode']} of {new['scales_um']} um: "
                                  "export to another folder (one pair folder, one tile geometry)")
