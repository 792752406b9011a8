"""Reliability catalogue, outputs: nothing a user has is lost or overwritten, whatever goes wrong.

* Output folders that exist, cannot be created or are not writable: refused with one clear error.
* Fault injection: a simulated disk that fills up (``OSError(ENOSPC)``) or a Ctrl-C, in the middle of
  each file a results folder or an export writes. No half-written file is ever left under a final
  name, earlier results and exports stay intact, and a rerun finishes the job cleanly.
* Exports never write outside the chosen folder: symlinks planted in it are not followed out, names
  made from user text are sanitised.
* GeoJSON and label images read back in: malformed, wrong size, unknown regions.
* Re-exporting is idempotent (content-addressed pairs); training resumes from its last checkpoint.
"""
from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import re
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import tiny_bundle

from napari_cytoclip import cli
from napari_cytoclip.errors import CytoclipError, OutputError
from napari_cytoclip.io.safe_files import MARKER

PX = 5.0


# ------------------------------------------------------------------------------------------ fixtures
def tissue(h: int = 200, w: int = 240, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 230, np.uint8)
    img[h // 5: h - h // 5, w // 5: w - w // 5] = rng.integers(20, 120, (h - 2 * (h // 5), w - 2 * (w // 5)))
    return img


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, a synthetic section (saved as a TIFF too) and its prediction."""
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section

    root = tmp_path_factory.mktemp("outputs")
    bundle_dir = tiny_bundle(root / "tiny").path
    model = load_model(bundle_dir, device="cpu", precision="fp32")
    image = root / "section.tif"
    tifffile.imwrite(image, tissue())
    section = open_section(image, pixel_size_um=PX)
    prediction = predict_section(section, model)
    assert len(prediction.cells) >= 30
    return {"bundle_dir": bundle_dir, "model": model, "bundle": model.bundle, "image": image,
            "section": section, "prediction": prediction}


def corrections(prediction, first: int, count: int, region: int = 3) -> np.ndarray:
    """The prediction's labels with ``count`` encoded cells (from ``first``) repainted."""
    edited = prediction.labels.copy()
    for r, c in prediction.cells[first:first + count]:
        edited[r, c] = region if prediction.labels[r, c] != region else region + 2
    return edited


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Temp files and folders (dot names) left anywhere under ``folder``."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob(".*")]


# ------------------------------------------------------------------------------------------ a disk that fills up
class Disk:
    """Files opened for writing under ``root`` share a byte budget; past it, a write fails.

    ``fault`` is ``"disk_full"`` (``OSError(ENOSPC)``, after writing what still fits, as a real full
    disk does) or ``"interrupt"`` (``KeyboardInterrupt``: Ctrl-C or a cancel in the middle of a write).
    ``log`` records ``(path, first byte, end)`` of every file written, in order.
    """

    def __init__(self, root: Path):
        self.root = str(root)
        self.budget: int | None = None
        self.fault = "disk_full"
        self.used = 0
        self.log: list[list] = []

    def arm(self, budget: int | None, fault: str = "disk_full") -> None:
        self.budget, self.fault, self.used, self.log = budget, fault, 0, []

    def watches(self, file, mode: str) -> bool:
        return (isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
                and os.path.abspath(os.fspath(file)).startswith(self.root))

    def write(self, entry: list, f, data) -> int:
        raw = data.encode() if isinstance(data, str) else bytes(memoryview(data).cast("B"))
        if self.budget is not None and self.used + len(raw) > self.budget:
            room = max(0, self.budget - self.used)
            if room:
                f.write(data[:room] if isinstance(data, str) else raw[:room])
            self.used += room
            entry[2] = self.used
            if self.fault == "interrupt":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), entry[0])
        self.used += len(raw)
        entry[2] = self.used
        return f.write(data)

    def phase(self, needle) -> tuple[int, int]:
        """Bytes ``[start, end)`` of the first logged file whose path matches ``needle``."""
        for path, start, end in self.log:
            if needle(path) and end > start:
                return start, end
        raise AssertionError(f"no write matched; written: {[p for p, _, _ in self.log]}")


class _Writer:
    """A file opened for writing, whose writes go through the :class:`Disk`."""

    def __init__(self, f, disk: Disk, path: str):
        self._f, self._disk = f, disk
        self._entry = [path, disk.used, disk.used]
        disk.log.append(self._entry)

    def write(self, data):
        return self._disk.write(self._entry, self._f, data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def fileno(self):  # numpy's tofile() then falls back to write(): every byte is counted
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False

    def __iter__(self):
        return iter(self._f)


@pytest.fixture
def disk(monkeypatch, tmp_path):
    d = Disk(tmp_path)
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _Writer(f, d, os.path.abspath(os.fspath(file))) if d.watches(file, mode) else f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    return d


def matcher(name: str, inside_cache: bool | None = None):
    """Matches the temp file of ``name`` (``.<name>.<random>``) or ``name`` itself."""
    def match(path: str) -> bool:
        base = os.path.basename(path)
        if not (base == name or base.startswith(f".{name}.")):
            return False
        if inside_cache is None:
            return True
        return ("/.cache." in path) == inside_cache
    return match


# ------------------------------------------------------------------------------------------ output folders
def test_output_folder_catalogue(env, tmp_path, monkeypatch):
    """Results folders: existing (kept), a file in the way, a parent that is a file, no permission."""
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder

    section, pred = env["section"], env["prediction"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("precious")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    cases = {
        "exists": (existing, r"already exists.*--overwrite"),
        "a_file_is_in_the_way": (blocker, r"already exists"),
        "parent_is_a_file": (blocker / "results", r"not writable|cannot"),
    }
    for name, (target, pattern) in cases.items():
        with pytest.raises(OutputError) as info:
            write_prediction_folder(pred, section, target)
        text = str(info.value)
        assert re.search(pattern, text) and "\n" not in text, (name, text)
        assert str(target) in text or str(target.parent) in text, (name, text)
    assert (existing / "notes.txt").read_text() == "precious" and blocker.read_text() == "a file, not a folder"

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", denied)
    with pytest.raises(OutputError, match="not writable") as info:
        write_prediction_folder(pred, section, tmp_path / "locked" / "res")
    assert "Permission denied" in str(info.value)
    assert not hidden(tmp_path)


def test_export_folder_catalogue(env, tmp_path):
    from napari_cytoclip.teach.export import export_corrections

    section, pred, bundle = env["section"], env["prediction"], env["bundle"]
    edited = corrections(pred, 0, 4)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "annotations.geojson").write_text("someone else's")
    for target, named, pattern in ((blocker, blocker, r"not a folder"),
                                   (blocker / "export", blocker, r"cannot create|not a directory"),
                                   (foreign, foreign, r"not written by an export")):
        with pytest.raises(OutputError) as info:
            export_corrections(section, pred, edited, target, bundle)
        text = str(info.value)
        assert re.search(pattern, text, re.I) and str(named) in text and "\n" not in text, text
    assert blocker.read_text() == "a file" and (foreign / "annotations.geojson").read_text() == "someone else's"


def test_cli_output_under_a_file(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_model", lambda args, path: env["model"])
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    rc = cli.main(["predict", str(env["image"]), "--out", str(blocker / "results"), "--pixel-size", str(PX),
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(blocker) in err and blocker.read_text() == "a file"


# ------------------------------------------------------------------------------------------ fault injection
RESULT_PHASES = {
    "labels.tif": matcher("labels.tif"),
    "confidence.tif": matcher("confidence.tif"),
    "regions.csv": matcher("regions.csv"),
    "annotations.geojson": matcher("annotations.geojson"),
    "cache/embeddings.npz": matcher("embeddings.npz"),
    "cache/prediction.json": matcher("prediction.json", inside_cache=True),
    "labels_fullres.tif": matcher("labels_fullres.tif"),
    "prediction.json": matcher("prediction.json", inside_cache=False),
}


@pytest.mark.parametrize("fault", ["disk_full", "interrupt"])
@pytest.mark.parametrize("phase", list(RESULT_PHASES))
def test_results_folder_fault_midway(env, tmp_path, disk, phase, fault):
    """A fault in the middle of any file of a new results folder: no folder at all, no temp left."""
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder

    section, pred = env["section"], env["prediction"]
    disk.arm(None)
    write_prediction_folder(pred, section, tmp_path / "dry", full_resolution=True)
    start, end = disk.phase(RESULT_PHASES[phase])
    disk.arm(start + (end - start) // 2, fault)
    target = tmp_path / "res"
    with pytest.raises((CytoclipError, KeyboardInterrupt)) as info:
        write_prediction_folder(pred, section, target, full_resolution=True)
    if fault == "disk_full":
        assert isinstance(info.value, OutputError) and "No space left on device" in str(info.value)
    assert not target.exists()
    assert not hidden(tmp_path)


@pytest.mark.parametrize("phase", list(RESULT_PHASES))
def test_results_folder_overwrite_keeps_old_results_on_fault(env, tmp_path, disk, phase):
    """--overwrite with the disk filling up: the earlier results stay exactly as they were."""
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder

    section, pred = env["section"], env["prediction"]
    target = tmp_path / "res"
    disk.arm(None)
    write_prediction_folder(pred, section, target, full_resolution=True)
    before = snapshot(target)
    start, end = disk.phase(RESULT_PHASES[phase])
    disk.arm(start + (end - start) // 2)
    with pytest.raises(OutputError, match="No space left on device"):
        write_prediction_folder(pred, section, target, overwrite=True, full_resolution=True)
    assert snapshot(target) == before
    assert not hidden(tmp_path)


def test_disk_full_message_names_the_results_folder(env, tmp_path, disk):
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder

    disk.arm(1000)
    target = tmp_path / "res"
    with pytest.raises(OutputError) as info:
        write_prediction_folder(env["prediction"], env["section"], target)
    assert str(info.value).startswith(f"{target}:") or str(info.value).startswith(f"{target}/labels.tif:")


EXPORT_PHASES = {
    "tile_png": lambda p: "/tiles/" in p and p.endswith(".png"),
    "pairs.csv": matcher("pairs.csv"),
    "pairs.jsonl": matcher("pairs.jsonl"),
    "labels.tif": matcher("labels.tif"),
    "annotations.geojson": matcher("annotations.geojson"),
    "regions.csv": matcher("regions.csv"),
    "labels_fullres.tif": matcher("labels_fullres.tif"),
    "export.json": matcher("export.json"),
}
def valid_version(path: Path, grid_shape) -> None:
    """``path`` holds a complete file of its kind (old or new, but whole)."""
    if path.suffix == ".tif":
        arr = tifffile.imread(path)
        assert arr.ndim == 2 and arr.dtype == np.uint16
    elif path.suffix in (".json", ".geojson"):
        json.loads(path.read_text())
    elif path.suffix == ".jsonl":
        [json.loads(line) for line in path.read_text().splitlines()]
    elif path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(path.read_text())))
        assert rows and len({len(r) for r in rows}) == 1
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()


def check_pairs_consistent(folder: Path) -> None:
    from napari_cytoclip.teach.pairs import read_pairs

    files, captions, records = read_pairs(folder)
    assert len(files) == len(set(files)), "a pair is listed twice"
    assert all(f.is_file() for f in files)
    missing = [str(f) for f, rec in zip(files, records) if not rec]
    assert not missing, f"pairs without provenance: {missing}"


@pytest.mark.parametrize("fault", ["disk_full", "interrupt"])
@pytest.mark.parametrize("phase", list(EXPORT_PHASES))
def test_export_fault_midway_keeps_earlier_export(env, tmp_path, disk, phase, fault):
    """A second export fails in the middle of one of its files: the first stays intact, a rerun finishes."""
    from napari_cytoclip.teach.export import export_corrections
    from napari_cytoclip.teach.pairs import read_pairs

    section, pred, bundle = env["section"], env["prediction"], env["bundle"]
    out = tmp_path / "export"
    disk.arm(None)
    first = export_corrections(section, pred, corrections(pred, 0, 6), out, bundle, full_resolution=True)
    before = snapshot(out)
    old_pairs = {f.name for f in read_pairs(out / "pairs")[0]}
    edited = corrections(pred, 0, 12, region=7)
    shutil.copytree(out, tmp_path / "dry")  # a dry run on an identical copy tells where each file's bytes go
    disk.arm(None)
    export_corrections(section, pred, edited, tmp_path / "dry", bundle, full_resolution=True)
    start, end = disk.phase(EXPORT_PHASES[phase])
    disk.arm(start + (end - start) // 2, fault)
    with pytest.raises((CytoclipError, KeyboardInterrupt)):
        export_corrections(section, pred, edited, out, bundle, full_resolution=True)
    disk.arm(None)
    # every earlier file is still there, each whole (the earlier version or a complete new one)
    for rel, data in before.items():
        path = out / rel
        assert path.is_file(), f"{rel} was lost"
        if path.read_bytes() != data:
            assert rel in ("labels.tif", "annotations.geojson", "regions.csv", "labels_fullres.tif",
                           "pairs/pairs.csv", "pairs/pairs.jsonl", MARKER), f"{rel} was changed"
            valid_version(path, pred.grid.shape)
    assert old_pairs <= {f.name for f in read_pairs(out / "pairs")[0]}
    assert not hidden(out)
    # a rerun finishes the export: every pair once, with its provenance
    again = export_corrections(section, pred, edited, out, bundle, full_resolution=True)
    assert first.pairs_added == 6 and again.pairs_added + again.pairs_existing == 12
    files = read_pairs(out / "pairs")[0]
    assert len(files) == len(old_pairs) + 12
    check_pairs_consistent(out / "pairs")
    np.testing.assert_array_equal(tifffile.imread(out / "labels.tif"), edited)


def test_atomic_write_keeps_the_old_file_on_disk_full(tmp_path, disk):
    from napari_cytoclip.io.safe_files import atomic_write_bytes

    path = tmp_path / "notes.bin"
    path.write_bytes(b"old content")
    disk.arm(3)
    with pytest.raises(OutputError, match=f"{re.escape(str(path))}: could not be written .No space left"):
        atomic_write_bytes(path, b"new content that does not fit")
    assert path.read_bytes() == b"old content" and not hidden(tmp_path)


def test_save_bundle_disk_full(env, tmp_path, monkeypatch):
    """A model bundle that cannot be written completely is not written at all, and the error names it."""
    import safetensors.torch

    from napari_cytoclip.models.bundle import save_bundle
    from napari_cytoclip.models.model import read_state_dict

    real = safetensors.torch.save_file

    def half_then_full(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    target = tmp_path / "new-model"
    state = read_state_dict(env["bundle"].weights_path)
    try:
        save_bundle(env["bundle"], state, target)
    except Exception as exc:
        error = exc
    else:
        error = None
    assert not target.exists() and not hidden(tmp_path)  # holds today: nothing half-written
    assert isinstance(error, CytoclipError) and str(target) in str(error), repr(error)


def test_cli_interrupt_mid_predict_keeps_finished_results(env, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the second of two images is predicted: the first results stay, no half folder."""
    from napari_cytoclip.models.model import CytoClip

    second = tmp_path / "second.tif"
    tifffile.imwrite(second, tissue(seed=1))
    calls = {"n": 0}
    real = CytoClip.encode_windows

    def interrupt_on_second_image(self, windows):
        calls["n"] += 1
        if calls["n"] == 2:  # the first image takes one batch (fewer than 64 tissue tiles)
            raise KeyboardInterrupt
        return real(self, windows)

    monkeypatch.setattr(CytoClip, "encode_windows", interrupt_on_second_image)
    monkeypatch.setattr(cli, "_model", lambda args, path: env["model"])
    out = tmp_path / "results"
    rc = cli.main(["predict", str(env["image"]), str(second), "--out", str(out), "--pixel-size", str(PX),
                   "--quiet", "--batch-size", "64"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert (out / "section" / "prediction.json").is_file()
    assert not (out / "second").exists() and not hidden(out)


# ------------------------------------------------------------------------------------------ symlinks and names
def export_once(env, out: Path, first: int = 0):
    from napari_cytoclip.teach.export import export_corrections

    return export_corrections(env["section"], env["prediction"], corrections(env["prediction"], first, 3), out,
                              env["bundle"])


def plant_link(rel: str):
    """An earlier export of ours (its marker lists its files) in which ``rel`` was replaced by a symlink out."""
    def plant(env, out: Path, outside: Path) -> None:
        export_once(env, out)
        target = out / rel
        if target.is_dir():
            shutil.rmtree(target)
            target.symlink_to(outside, target_is_directory=True)
        else:
            target.unlink()
            (outside / "victim.txt").write_text("precious")
            target.symlink_to(outside / "victim.txt")
    return plant


# each is refused: a symlinked folder by the inside-the-folder check, a symlinked file because the
# marker lists only the regular file an export wrote there
SYMLINK_CASES = {case: plant_link(rel) for case, rel in {
    "pairs_folder_links_out": "pairs", "tiles_folder_links_out": "pairs/tiles", "labels_tif_links_out": "labels.tif",
    "geojson_links_out": "annotations.geojson", "export_json_links_out": "export.json",
    "pairs_csv_links_out": "pairs/pairs.csv"}.items()}


@pytest.mark.parametrize("case", list(SYMLINK_CASES))
def test_exports_never_write_outside_their_folder(env, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "export"
    SYMLINK_CASES[case](env, out, outside)
    before = snapshot(outside)
    with pytest.raises(OutputError, match="outside|not written by an export"):
        export_once(env, out, first=3)  # new pairs: tiles, pairs.csv and the annotations are all written
    assert snapshot(outside) == before, "something was written outside the export folder"


def test_results_overwrite_does_not_follow_a_symlinked_folder(env, tmp_path):
    """--overwrite where the results folder is a symlink: refused, the linked folder's content is kept."""
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "thesis.docx").write_text("precious")
    link = tmp_path / "out" / "section"
    link.parent.mkdir()
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match="symbolic link"):
        write_prediction_folder(env["prediction"], env["section"], link, overwrite=True)
    assert (elsewhere / "thesis.docx").read_text() == "precious" and link.is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["thesis.docx"]


def test_pair_rows_cannot_point_outside(tmp_path):
    from napari_cytoclip.teach.pairs import read_pairs

    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "pairs.csv").write_text("filepath,caption\n../../etc/passwd,a tile\n")
    with pytest.raises(CytoclipError, match="outside"):
        read_pairs(folder)


@pytest.mark.parametrize("name", ["../../escape", "/absolute/model", "a/b/../../../c"])
def test_finetuned_model_folder_stays_inside(name, tmp_path):
    from napari_cytoclip.widgets.export_widget import next_model_folder

    out = tmp_path / "export"
    folder = next_model_folder(out, name)
    assert folder.resolve().parent == (out / "models").resolve()
    assert os.sep not in folder.name and "/" not in folder.name and "\\" not in folder.name


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=120)
       | st.text(alphabet=string.punctuation + "./\\ \t\n\0", max_size=20))
def test_safe_name_is_a_plain_file_name(text):
    from napari_cytoclip.io.safe_files import inside, safe_name

    name = safe_name(text)
    assert name and len(name) <= 60
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and not name.startswith(".") and name not in (".", "..")
    root = Path("/tmp/cytoclip-root")
    assert inside(root, root / name).parent == root.resolve()


# ------------------------------------------------------------------------------------------ reading back
REGIONS = [{"id": 1, "name": "Isocortex", "acronym": "CTX"}, {"id": 2, "name": "Striatum", "acronym": "STR"}]
SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [3, 0], [3, 3], [0, 3], [0, 0]]]}


def feature(geometry=SQUARE, **props):
    return {"type": "Feature", "geometry": geometry, "properties": props}


GEOJSON_CASES = {
    "missing_file": (None, r"not found"),
    "a_folder": ("<folder>", r"folder|not a file|directory"),
    "empty_file": (b"", r"not valid JSON"),
    "not_utf8": (b"\xff\xfe\x00\x01", r"not valid JSON"),
    "truncated": (json.dumps({"type": "FeatureCollection", "features": [feature(name="Isocortex")]})[:40],
                  r"not valid JSON"),
    "top_level_array": ([feature(name="Isocortex")], r"must be an object"),
    "top_level_null": ("null", r"must be an object"),
    "features_not_a_list": ({"type": "FeatureCollection", "features": {"a": 1}}, r"FeatureCollection"),
    "feature_not_an_object": ({"type": "FeatureCollection", "features": [7]}, r"not an object"),
    "geometry_missing": (feature(None, name="Isocortex"), r"Polygon"),
    "geometry_point": (feature({"type": "Point", "coordinates": [1, 1]}, name="Isocortex"), r"Polygon"),
    "coordinates_null": (feature({"type": "MultiPolygon", "coordinates": None}, name="Isocortex"), r"malformed"),
    "coordinates_text": (feature({"type": "Polygon", "coordinates": [[["a", "b"], [1, 2], [3, 4]]]},
                                 name="Isocortex"), r"malformed"),
    "coordinates_nan": (feature({"type": "Polygon", "coordinates": [[[float("nan"), 0], [1, 2], [3, 4]]]},
                                name="Isocortex"), r"malformed"),
    "ring_of_two_points": (feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}, name="Isocortex"),
                           r"malformed"),
    "unknown_classification": (feature(classification={"name": "Claustrum"}), r"Claustrum"),
    "unknown_plain_name": (feature(name="Claustrum"), r"Claustrum"),
    "region_id_not_a_number": (feature(region_id="cortex"), r"region|cortex"),
    "properties_not_an_object": ({"type": "Feature", "geometry": SQUARE, "properties": [1, 2]}, r"propert"),
    "feature_outside_the_grid": (feature({"type": "Polygon", "coordinates": [[[500, 500], [520, 500], [520, 520],
                                                                              [500, 520], [500, 500]]]},
                                         name="Isocortex"), r"outside"),
}
GEOJSON_OK = {
    "classification_object": (feature(classification={"name": "striatum", "color": [1, 2, 3]}), 2),
    "acronym": (feature(name="CTX"), 1),
    "region_id_only": (feature(region_id=2), 2),
    "classification_string": (feature(classification="Striatum"), 2),
}


@pytest.mark.parametrize("case", list(GEOJSON_CASES))
def test_geojson_readback_catalogue(case, tmp_path):
    from napari_cytoclip.outputs.geojson import geojson_to_labels

    content, pattern = GEOJSON_CASES[case]
    path = tmp_path / f"{case}.geojson"
    if content == "<folder>":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_text(json.dumps(content))
    with pytest.raises(Exception) as info:
        geojson_to_labels(path, (4, 4), REGIONS)
    assert isinstance(info.value, CytoclipError), f"{type(info.value).__name__}: {info.value}"
    assert str(path) in str(info.value) and re.search(pattern, str(info.value), re.I), str(info.value)


@pytest.mark.parametrize("case", list(GEOJSON_OK))
def test_geojson_readback_accepts(case, tmp_path):
    from napari_cytoclip.outputs.geojson import geojson_to_labels

    doc, rid = GEOJSON_OK[case]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [doc]}))
    labels = geojson_to_labels(path, (4, 4), REGIONS)
    assert labels[1, 1] == rid and labels[3, 3] == 0


def label_file(name: str, data=None, raw: bytes | None = None, palette: bool = False):
    def make(tmp: Path) -> Path:
        from PIL import Image

        path = tmp / name
        if raw is not None:
            path.write_bytes(raw)
        elif data is None:  # nothing: the file is missing
            pass
        elif name.endswith((".tif", ".tiff")):
            tifffile.imwrite(path, data)
        elif palette:  # indices 0 and 1 with colours, as painting programs save label maps
            im = Image.frombytes("P", data.shape[::-1], np.ascontiguousarray(data, np.uint8).tobytes())
            im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (3 * 254))
            im.save(path)
        elif data is not None:
            Image.fromarray(data).save(path)
        return path
    return make


def truncated_label_tiff(tmp: Path) -> Path:
    path = label_file("cut.tif", np.ones(GRID, np.uint16))(tmp)
    path.write_bytes(path.read_bytes()[:100])
    return path


def label_folder(tmp: Path) -> Path:
    path = tmp / "dir.tif"
    path.mkdir()
    return path


GRID = (10, 12)
LABEL_CASES = {
    "missing": (label_file("missing.tif"), r"not found"),
    "a_folder": (label_folder, r"not a file"),
    "empty_file": (label_file("empty.tif", raw=b""), r"not a readable TIFF"),
    "truncated_tiff": (truncated_label_tiff, r"not a readable TIFF"),
    "jpeg": (label_file("labels.jpg", raw=b"\xff\xd8\xff"), r"TIFF or PNG"),
    "no_suffix": (label_file("labels", raw=b"II*\0"), r"TIFF or PNG"),
    "rgb_png": (label_file("rgb.png", np.zeros(GRID + (3,), np.uint8)), r"single-channel"),
    "stack_3d": (label_file("stack.tif", np.zeros((2,) + GRID, np.uint16)), r"2-D"),
    "negative_ids": (label_file("neg.tif", np.full(GRID, -1, np.int16)), r"0\.\.65535"),
    "ids_too_large": (label_file("big.tif", np.full(GRID, 70000, np.uint32)), r"0\.\.65535"),
    "float_values": (label_file("f.tif", np.ones(GRID, np.float32)), r"integers"),
    "wrong_size": (label_file("small.tif", np.ones((3, 4), np.uint16)), r"shape \(3, 4\)"),
}
LABEL_OK = {
    "uint16_tiff": label_file("ok.tif", np.ones(GRID, np.uint16)),
    "bool_tiff": label_file("ok.tif", np.ones(GRID, bool)),
    "uint8_png": label_file("ok.png", np.ones(GRID, np.uint8)),
    "uint16_png": label_file("ok.png", np.ones(GRID, np.uint16)),
    "palette_png": label_file("ok.png", np.ones(GRID, np.uint8), palette=True),
    "singleton_axes": label_file("ok.tif", np.ones((1, 1) + GRID, np.uint16)),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_label_image_readback_catalogue(case, tmp_path):
    from napari_cytoclip.teach.export import read_label_grid

    make, pattern = LABEL_CASES[case]
    path = make(tmp_path)
    with pytest.raises(CytoclipError) as info:
        read_label_grid(path, GRID)
    assert str(path) in str(info.value) and re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.parametrize("case", list(LABEL_OK))
def test_label_image_readback_accepts(case, tmp_path):
    from napari_cytoclip.teach.export import read_label_grid

    labels = read_label_grid(LABEL_OK[case](tmp_path), GRID)
    assert labels.shape == GRID and labels.dtype == np.uint16 and (labels == 1).all()


def test_cli_export_refuses_bad_labels(env, tmp_path, capsys, monkeypatch):
    """export-pairs with unknown region ids and a label image of the wrong size: one line, nothing written."""
    monkeypatch.setattr(cli, "_model", lambda args, path: env["model"])
    ids = np.zeros(env["prediction"].grid.shape, np.uint16)
    ids[2, 2] = 999
    tifffile.imwrite(tmp_path / "unknown.tif", ids)
    tifffile.imwrite(tmp_path / "wrong.tif", np.ones((7, 9), np.uint16))
    for name, pattern in (("unknown.tif", r"\[999\].*vocabulary"), ("wrong.tif", r"\(7, 9\)")):
        rc = cli.main(["export-pairs", str(env["image"]), str(tmp_path / name), "--out", str(tmp_path / "e"),
                       "--model", str(env["bundle_dir"]), "--pixel-size", str(PX), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and re.search(pattern, err), err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1
        assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------------ idempotence
def geojson_without_ids(path: Path) -> dict:
    doc = json.loads(path.read_text())
    for f in doc["features"]:
        f.pop("id", None)
    return doc


def without_times(value):
    """A JSON value with every "time" key dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k != "time"}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def test_reexport_is_idempotent(env, tmp_path):
    """The same corrections exported twice, or into a fresh folder, give the very same pairs and annotations."""
    from napari_cytoclip.teach.export import export_corrections

    section, pred, bundle = env["section"], env["prediction"], env["bundle"]
    edited = corrections(pred, 0, 8)
    out = tmp_path / "export"
    first = export_corrections(section, pred, edited, out, bundle)
    before = snapshot(out)
    again = export_corrections(section, pred, edited, out, bundle)
    assert (again.pairs_added, again.pairs_existing) == (0, first.pairs_added)
    after = snapshot(out)
    changed = {k for k in before if before[k] != after[k]}
    assert set(after) == set(before)  # no new file at all
    # teaching.json records when each section was last exported (to the second): only that time may differ
    assert changed <= {"export.json", "annotations.geojson", "labels.tif", "teaching.json", MARKER}
    if "teaching.json" in before:
        assert without_times(json.loads(after["teaching.json"])) == without_times(json.loads(before["teaching.json"]))
    (tmp_path / "before.geojson").write_bytes(before["annotations.geojson"])
    assert geojson_without_ids(out / "annotations.geojson") == geojson_without_ids(tmp_path / "before.geojson")
    np.testing.assert_array_equal(tifffile.imread(out / "labels.tif"), edited)
    assert len(json.loads((out / "export.json").read_text())["exports"]) == 2
    fresh = tmp_path / "fresh"
    export_corrections(section, pred, edited, fresh, bundle)
    assert sorted(p.name for p in (fresh / "pairs" / "tiles").iterdir()) == \
        sorted(p.name for p in (out / "pairs" / "tiles").iterdir())
    assert (fresh / "pairs" / "pairs.csv").read_bytes() == (out / "pairs" / "pairs.csv").read_bytes()
    assert geojson_without_ids(fresh / "annotations.geojson") == geojson_without_ids(out / "annotations.geojson")


# ------------------------------------------------------------------------------------------ training resumes
def training_pairs(folder: Path) -> Path:
    from napari_cytoclip.teach.pairs import Pair, write_pairs

    rng = np.random.default_rng(0)
    pairs = []
    for k in range(16):
        rid = k % 4 + 1
        img = np.clip(rng.normal(60 * rid, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        pairs.append(Pair(img, f"a Nissl tile of region {rid}", {"region_id": rid, "corrected_label": rid}))
    write_pairs(folder, pairs)
    return folder


def test_training_resumes_after_a_kill(env, tmp_path):
    """Killed during epoch 2: no bundle, the epoch-1 checkpoint; the same call resumes at epoch 2 and ends
    with exactly the weights of a run that was never interrupted."""
    from safetensors.torch import load_file

    from napari_cytoclip.teach.train import TrainConfig, train

    pairs = training_pairs(tmp_path / "pairs")

    def config():
        return TrainConfig(epochs=2, batch_size=4, steps_per_epoch=1, warmup_steps=1, device="cpu", augment=False,
                           lr=1e-3)

    seen: list[dict] = []

    def killer(info: dict) -> None:
        seen.append(info)
        if info.get("epoch") == 1 and "step" in info:  # epoch 2 has begun: epoch 1 is checkpointed
            raise KeyboardInterrupt

    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        train([pairs], out, env["bundle_dir"], config(), progress=killer)
    ckpt = tmp_path / "model.ckpt"
    assert not out.exists() and (ckpt / "last.pt").is_file()
    assert [i["epoch_done"]["epoch"] for i in seen if "epoch_done" in i] == [1]

    resumed: list[dict] = []
    bundle = train([pairs], out, env["bundle_dir"], config(), progress=resumed.append)
    steps = [i for i in resumed if "step" in i]
    assert steps[0]["epoch"] == 1 and steps[0]["step"] == 0, "did not resume at epoch 2"
    assert [i["epoch_done"]["epoch"] for i in resumed if "epoch_done" in i] == [2]
    assert [h["epoch"] for h in bundle.provenance["history"]] == [1, 2]
    assert not ckpt.exists() and (out / "weights.safetensors").is_file()

    straight = train([pairs], tmp_path / "straight", env["bundle_dir"], config())
    a, b = load_file(str(out / "weights.safetensors")), load_file(str(straight.path / "weights.safetensors"))
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(a[key].float().numpy(), b[key].float().numpy(), atol=1e-6, err_msg=key)


def test_training_never_overwrites_a_model(env, tmp_path, capsys):
    from napari_cytoclip.teach.train import TrainConfig, train

    out = tmp_path / "model"
    out.mkdir()
    (out / "cytoclip.json").write_text("{}")
    with pytest.raises(CytoclipError, match="already exists"):
        train([training_pairs(tmp_path / "pairs")], out, env["bundle_dir"], TrainConfig(epochs=1, device="cpu"))
    rc = cli.main(["train", str(tmp_path / "pairs"), "--out", str(out), "--init", str(env["bundle_dir"]), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and "Traceback" not in err
    assert (out / "cytoclip.json").read_text() == "{}"
