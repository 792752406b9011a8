"""Nothing a user has is lost (issue 16, "must never happen"): every refusal leaves every file as it was.

Each case builds a folder the way a careless or hostile user might, checksums every file (and
link) under the test folder, runs the CLI and expects exit status 2, one error line, and every
file unchanged, with nothing added. Covered: ``--overwrite`` of a folder napari-cytoclip did not
write, or wrote and someone changed; exports next to user files; report folders; pair files that
are FIFOs, devices, folders or lead outside their folder; a checkpoint folder training did not create.
Also: the results' file modes follow the umask, and ``predict`` says what it found.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers import tiny_bundle

from napari_cytoclip import cli
from napari_cytoclip.errors import Cancelled, CytoclipError, OutputError
from napari_cytoclip.io.safe_files import MARKER

PX = 20.0
STRIDE = 400.0
FAST = ["--device", "cpu", "--quiet", "--stride-um", str(STRIDE)]


def section_image(seed: int = 0, size: int = 600) -> np.ndarray:
    """A bright slide with a dark textured blob of tissue in the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 235, np.uint8)
    m = size // 5
    img[m:size - m, m:size - m] = rng.integers(20, 130, (size - 2 * m, size - 2 * m))
    return img


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model, a 600 x 600 px section (PNG) and a results folder and an export predict/export wrote."""
    root = tmp_path_factory.mktemp("nothing_lost")
    bundle = tiny_bundle(root / "tiny").path
    image = root / "small.png"
    Image.fromarray(section_image()).save(image)
    predict = ["predict", str(image), "--out", str(root / "results"), "--model", str(bundle),
               "--pixel-size", str(PX), *FAST]
    assert cli.main(predict) == 0
    results = root / "results" / "small"
    labels = tifffile.imread(results / "labels.tif")
    edited = labels.copy()
    cells = np.argwhere(labels > 0)[:4]
    for r, c in cells:
        edited[r, c] = 3 if labels[r, c] != 3 else 5
    tifffile.imwrite(root / "edited.tif", edited)
    assert cli.main(export_argv(root, root / "export", results)) == 0
    return {"root": root, "bundle": bundle, "image": image, "results": results, "edited": root / "edited.tif",
            "export": root / "export"}


def export_argv(root: Path, out: Path, prediction: Path) -> list[str]:
    return ["export-pairs", str(root / "small.png"), str(root / "edited.tif"), "--out", str(out),
            "--prediction", str(prediction), "--model", str(root / "tiny"), "--device", "cpu", "--quiet"]


# ------------------------------------------------------------------------------------------ checksums
def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's SHA-256, a link's target, ``dir`` or the kind of special file."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                out[rel] = "link -> " + os.readlink(path)
            elif stat.S_ISDIR(mode):
                out[rel] = "dir"
            elif stat.S_ISREG(mode):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = f"special {stat.S_IFMT(mode):o}"
    return out


def refused(capsys, argv: list[str], pattern: str, root: Path) -> str:
    """Run the CLI: exit 2, one error line matching ``pattern``, every entry under ``root`` unchanged."""
    before = snapshot(root)
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("napari-cytoclip: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    after = snapshot(root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    return lines[0]


def copy_results(base, where: Path) -> Path:
    shutil.copytree(base["results"], where, symlinks=True)
    return where


# ------------------------------------------------------------------------------------------ predict --overwrite
def input_inside_target(base, tmp: Path):
    """The issue's example: ``predict data/small/small.png --out data --overwrite``."""
    (tmp / "data" / "small").mkdir(parents=True)
    shutil.copy(base["image"], tmp / "data" / "small" / "small.png")
    (tmp / "data" / "small" / "notes.txt").write_text("my notes")
    return tmp / "data" / "small" / "small.png", tmp / "data", r"data/small: holds the input .*small\.png"


def user_folder_of_that_name(base, tmp: Path):
    (tmp / "out" / "small").mkdir(parents=True)
    (tmp / "out" / "small" / "thesis.docx").write_text("precious")
    return base["image"], tmp / "out", r"was not written by napari-cytoclip \(no [\w.-]+; it holds thesis\.docx\)"


def ours_plus_a_user_file(base, tmp: Path):
    target = copy_results(base, tmp / "out" / "small")
    (target / "notes.txt").write_text("my notes on this prediction")
    return base["image"], tmp / "out", r"holds notes\.txt, not written"


def ours_plus_a_user_folder(base, tmp: Path):
    target = copy_results(base, tmp / "out" / "small")
    (target / "figures").mkdir()
    (target / "figures" / "fig1.png").write_bytes(b"png")
    return base["image"], tmp / "out", r"holds figures/fig1\.png, not written"


def ours_with_an_edited_result(base, tmp: Path):
    target = copy_results(base, tmp / "out" / "small")
    labels = tifffile.imread(target / "labels.tif")
    tifffile.imwrite(target / "labels.tif", np.where(labels == 0, 0, 1).astype(np.uint16))  # hand-corrected
    return base["image"], tmp / "out", r"holds labels\.tif, not written by napari-cytoclip \(or changed since\)"


def ours_with_a_result_replaced_by_a_link(base, tmp: Path):
    target = copy_results(base, tmp / "out" / "small")
    (tmp / "mine.csv").write_text("my regions")
    (target / "regions.csv").unlink()
    (target / "regions.csv").symlink_to(tmp / "mine.csv")
    return base["image"], tmp / "out", r"holds regions\.csv"


def ours_with_a_user_file_in_the_cache(base, tmp: Path):
    target = copy_results(base, tmp / "out" / "small")
    (target / "cache" / "readme.txt").write_text("do not delete")
    return base["image"], tmp / "out", r"cache/readme\.txt"


def results_folder_without_marker(base, tmp: Path):
    """A folder that looks like results (e.g. from an older version, or made by hand) but has no marker."""
    target = copy_results(base, tmp / "out" / "small")
    (target / MARKER).unlink()
    return base["image"], tmp / "out", r"not written by napari-cytoclip"


def forged_marker_listing_nothing(base, tmp: Path):
    target = tmp / "out" / "small"
    target.mkdir(parents=True)
    (target / MARKER).write_text(json.dumps({"format": "napari-cytoclip-files", "kind": "prediction",
                                             "files": {}, "folders": []}))
    (target / "data.csv").write_text("1,2,3")
    return base["image"], tmp / "out", r"holds data\.csv"


def forged_marker_with_a_wrong_digest(base, tmp: Path):
    target = tmp / "out" / "small"
    target.mkdir(parents=True)
    (target / MARKER).write_text(json.dumps({"format": "napari-cytoclip-files", "kind": "prediction",
                                             "files": {"data.csv": ["0" * 64]}, "folders": []}))
    (target / "data.csv").write_text("1,2,3")
    return base["image"], tmp / "out", r"holds data\.csv"


def marker_that_is_not_json(base, tmp: Path):
    target = copy_results(base, tmp / "out" / "small")
    (target / MARKER).write_text("[" * 100_000)  # deeply nested: must not reach the user as a RecursionError
    return base["image"], tmp / "out", r"not written by napari-cytoclip"


def target_is_a_link_to_a_user_folder(base, tmp: Path):
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "thesis.docx").write_text("precious")
    (tmp / "out").mkdir()
    (tmp / "out" / "small").symlink_to(tmp / "elsewhere", target_is_directory=True)
    return base["image"], tmp / "out", r"symbolic link"


def target_is_a_link_to_our_results(base, tmp: Path):
    copy_results(base, tmp / "real")
    (tmp / "out").mkdir()
    (tmp / "out" / "small").symlink_to(tmp / "real", target_is_directory=True)
    return base["image"], tmp / "out", r"symbolic link"


def target_is_a_file(base, tmp: Path):
    (tmp / "out").mkdir()
    (tmp / "out" / "small").write_text("a file named like the results folder")
    return base["image"], tmp / "out", r"not a folder"


def export_folder_in_the_way(base, tmp: Path):
    shutil.copytree(base["export"], tmp / "out" / "small", symlinks=True)
    return base["image"], tmp / "out", r"not written by napari-cytoclip"


OVERWRITE_CASES: dict[str, Callable] = {f.__name__: f for f in (
    input_inside_target, user_folder_of_that_name, ours_plus_a_user_file, ours_plus_a_user_folder,
    ours_with_an_edited_result, ours_with_a_result_replaced_by_a_link, ours_with_a_user_file_in_the_cache,
    results_folder_without_marker, forged_marker_listing_nothing, forged_marker_with_a_wrong_digest,
    marker_that_is_not_json, target_is_a_link_to_a_user_folder, target_is_a_link_to_our_results,
    target_is_a_file, export_folder_in_the_way)}


@pytest.mark.parametrize("case", list(OVERWRITE_CASES))
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "plain"])
def test_predict_never_replaces_what_it_did_not_write(base, tmp_path, capsys, case, overwrite):
    image, out, pattern = OVERWRITE_CASES[case](base, tmp_path)
    argv = ["predict", str(image), "--out", str(out), "--model", str(base["bundle"]), "--pixel-size", str(PX), *FAST]
    refused(capsys, argv + (["--overwrite"] if overwrite else []), pattern, tmp_path)


def test_predict_overwrite_replaces_its_own_results(base, tmp_path, capsys):
    """The other side: an untouched results folder (and an empty folder) are replaced, with a fresh marker."""
    target = copy_results(base, tmp_path / "out" / "small")
    (tmp_path / "empty" / "small").mkdir(parents=True)
    common = ["--model", str(base["bundle"]), "--pixel-size", str(PX), *FAST]
    assert cli.main(["predict", str(base["image"]), "--out", str(tmp_path / "out"), *common, "--overwrite"]) == 0
    assert cli.main(["predict", str(base["image"]), "--out", str(tmp_path / "empty"), *common, "--overwrite"]) == 0
    capsys.readouterr()
    from napari_cytoclip.io.safe_files import foreign_entries

    for folder in (target, tmp_path / "empty" / "small"):
        assert (folder / "prediction.json").is_file() and foreign_entries(folder) == []
    assert not [p for p in tmp_path.rglob(".*")]  # no temp or old folder left


# ------------------------------------------------------------------------------------------ export-pairs
def export_json_beside_user_files(base, tmp: Path) -> Path:
    """The issue's example: a file named export.json made the folder 'ours'."""
    out = tmp / "exp"
    out.mkdir()
    (out / "export.json").write_text(json.dumps({"format": "napari-cytoclip-export", "exports": []}))
    (out / "labels.tif").write_bytes(b"my own label image")
    (out / "regions.csv").write_text("my,own,regions")
    return out


def user_regions_csv(base, tmp: Path) -> Path:
    out = tmp / "exp"
    out.mkdir()
    (out / "regions.csv").write_text("my,own,regions")
    return out


def user_pairs_folder(base, tmp: Path) -> Path:
    out = tmp / "exp"
    (out / "pairs").mkdir(parents=True)
    (out / "pairs" / "pairs.csv").write_text("filepath,caption\n")
    return out


def our_export_with_a_replaced_labels_tif(base, tmp: Path) -> Path:
    out = shutil.copytree(base["export"], tmp / "exp", symlinks=True)
    (out / "labels.tif").write_bytes(b"the user's own labels, saved over ours")
    return out


def our_export_with_an_edited_pairs_csv(base, tmp: Path) -> Path:
    out = shutil.copytree(base["export"], tmp / "exp", symlinks=True)
    with open(out / "pairs" / "pairs.csv", "a") as f:
        f.write("tiles/mine.png,a caption I added\n")
    return out


def our_export_with_a_geojson_link(base, tmp: Path) -> Path:
    out = shutil.copytree(base["export"], tmp / "exp", symlinks=True)
    (tmp / "qupath.geojson").write_text("{}")
    (out / "annotations.geojson").unlink()
    (out / "annotations.geojson").symlink_to(tmp / "qupath.geojson")
    return out


def our_export_without_marker(base, tmp: Path) -> Path:
    out = shutil.copytree(base["export"], tmp / "exp", symlinks=True)
    (out / MARKER).unlink()
    return out


def a_results_folder(base, tmp: Path) -> Path:
    return copy_results(base, tmp / "exp")


EXPORT_CASES = {f.__name__: f for f in (
    export_json_beside_user_files, user_regions_csv, user_pairs_folder, our_export_with_a_replaced_labels_tif,
    our_export_with_an_edited_pairs_csv, our_export_with_a_geojson_link, our_export_without_marker,
    a_results_folder)}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_never_replaces_a_user_file(base, tmp_path, capsys, case):
    out = EXPORT_CASES[case](base, tmp_path)
    refused(capsys, export_argv(base["root"], out, base["results"]),
            r"not written by an export|not an export folder", tmp_path)


def test_export_again_into_its_own_folder(base, tmp_path, capsys):
    out = shutil.copytree(base["export"], tmp_path / "exp", symlinks=True)
    (out / "my_notes.txt").write_text("kept")  # other files beside an export are fine: they are never touched
    assert cli.main(export_argv(base["root"], out, base["results"])) == 0
    assert "0 pairs added" in capsys.readouterr().out
    assert (out / "my_notes.txt").read_text() == "kept"


def test_a_tile_of_another_content_is_never_replaced(tmp_path):
    from napari_cytoclip.teach.pairs import Pair, pair_name, write_pairs

    img = np.full((8, 8, 3), 7, np.uint8)
    tile = tmp_path / "pairs" / "tiles" / f"{pair_name(img, 'x')}.png"
    tile.parent.mkdir(parents=True)
    tile.write_bytes(b"not that tile")
    with pytest.raises(OutputError, match="not the tile"):
        write_pairs(tmp_path / "pairs", [Pair(img, "x", {})])
    assert tile.read_bytes() == b"not that tile"


# ------------------------------------------------------------------------------------------ evaluate
def report_over_user_files(base, tmp: Path):
    (tmp / "rep").mkdir()
    (tmp / "rep" / "report.json").write_text('{"mine": true}')
    return tmp / "rep", r"not written by napari-cytoclip .*holds report\.json"


def report_into_the_image_folder(base, tmp: Path):
    return tmp / "in", r"holds the input"


EVAL_CASES = {f.__name__: f for f in (report_over_user_files, report_into_the_image_folder)}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_evaluate_never_replaces_what_it_did_not_write(base, tmp_path, capsys, case):
    (tmp_path / "in").mkdir()
    image = shutil.copy(base["image"], tmp_path / "in" / "small.png")
    labels = tmp_path / "in" / "truth.png"
    Image.fromarray(np.zeros((600, 600), np.uint8)).save(labels)
    out, pattern = EVAL_CASES[case](base, tmp_path)
    refused(capsys, ["evaluate", "--model", str(base["bundle"]), "--images", str(image), "--labels", str(labels),
                     "--out", str(out), "--pixel-size", str(PX), "--device", "cpu", "--quiet", "--overwrite"],
            pattern, tmp_path)


# ------------------------------------------------------------------------------------------ pairs read by train
def pair_folder(base, tmp: Path) -> Path:
    """A copy of the export's pair folder (real tiles, pairs.csv, pairs.jsonl)."""
    return shutil.copytree(base["export"] / "pairs", tmp / "pairs")


def with_row(name: str, make: Callable[[Path, Path], None] | None = None):
    def build(base, tmp: Path) -> tuple[Path, str]:
        folder = pair_folder(base, tmp)
        if make is not None:
            make(folder, tmp)
        with open(folder / "pairs.csv", "a") as f:
            f.write(f"{name},a Nissl tile\n")
        return folder, re.escape(str(folder / "pairs.csv")) + r": row \d+: "
    return build


def fifo(folder: Path, tmp: Path) -> None:
    os.mkfifo(folder / "tiles" / "fifo.png")


def link_out(folder: Path, tmp: Path) -> None:
    (tmp / "secret.png").write_bytes(b"outside")
    (folder / "tiles" / "link.png").symlink_to(tmp / "secret.png")


def link_to_fifo(folder: Path, tmp: Path) -> None:
    os.mkfifo(folder / "tiles" / "fifo.png")
    (folder / "tiles" / "alias.png").symlink_to("fifo.png")


def outside_file(folder: Path, tmp: Path) -> None:
    (tmp / "outside.png").write_bytes(b"outside")


def csv_links_out(base, tmp: Path) -> tuple[Path, str]:
    folder = pair_folder(base, tmp)
    shutil.move(folder / "pairs.csv", tmp / "elsewhere.csv")
    (folder / "pairs.csv").symlink_to(tmp / "elsewhere.csv")
    return folder, r"pairs\.csv: points outside"


def csv_is_a_fifo(base, tmp: Path) -> tuple[Path, str]:
    folder = pair_folder(base, tmp)
    (folder / "pairs.csv").unlink()
    os.mkfifo(folder / "pairs.csv")
    return folder, r"pairs\.csv: is not a regular file"


PAIR_CASES = {
    "fifo": with_row("tiles/fifo.png", fifo),
    "symlink_to_a_fifo": with_row("tiles/alias.png", link_to_fifo),
    "device": with_row("/dev/zero"),
    "absolute_path": with_row("/etc/hostname"),
    "dot_dot": with_row("../outside.png", outside_file),
    "deep_dot_dot": with_row("tiles/../../outside.png", outside_file),
    "symlink_out": with_row("tiles/link.png", link_out),
    "a_folder": with_row("tiles"),
    "the_folder_itself": with_row("."),
    "empty_name": with_row('""'),
    "missing_file": with_row("tiles/nope.png"),
    "csv_links_out": csv_links_out,
    "csv_is_a_fifo": csv_is_a_fifo,
}


class FifoGuard:
    """Opens every FIFO under ``root`` for writing after ``delay`` s, so a reader that blocked on one wakes
    up (and the test fails) instead of hanging the test run."""

    def __init__(self, root: Path, delay: float = 20.0):
        self.root, self.delay, self.done = root, delay, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        if self.done.wait(self.delay):
            return
        while not self.done.is_set():
            for path in self.root.rglob("*"):
                if path.is_fifo():
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                    except OSError:
                        continue
                    os.write(fd, b"a blocked reader woke up")
                    os.close(fd)
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_train_reads_only_regular_files_inside_the_pair_folder(base, tmp_path, capsys, case):
    folder, pattern = PAIR_CASES[case](base, tmp_path)
    argv = ["train", str(folder), "--out", str(tmp_path / "model"), "--init", str(base["bundle"]), "--epochs", "1",
            "--device", "cpu", "--quiet"]
    with FifoGuard(tmp_path):
        line = refused(capsys, argv, pattern, tmp_path)
    assert "woke up" not in line


def test_pair_folder_reading_accepts_a_clean_folder(base, tmp_path):
    from napari_cytoclip.teach.pairs import load_pair_images, read_pairs

    folder = pair_folder(base, tmp_path)
    files, captions, records = read_pairs(folder)
    assert files and all(f.is_file() and folder.resolve() in f.parents for f in files)
    assert all(records) and load_pair_images(files, 32).shape == (len(files), 32, 32, 3)


# ------------------------------------------------------------------------------------------ fine-tune checkpoint
def test_cancelled_finetune_keeps_a_checkpoint_folder_it_did_not_create(base, tmp_path):
    """Cancel removes only what the run created: a pre-existing ``<out>.ckpt`` of the user's stays."""
    from napari_cytoclip.teach.train import TrainConfig
    from napari_cytoclip.teach.safe_finetune import remove_checkpoint, training_steps

    pairs = pair_folder(base, tmp_path)
    out = tmp_path / "model"
    ckpt = tmp_path / "model.ckpt"
    ckpt.mkdir()
    (ckpt / "results.xlsx").write_bytes(b"precious")
    stop = threading.Event()
    stop.set()  # cancelled at the first progress report
    gen = training_steps(pairs, out, base["bundle"], TrainConfig(epochs=1, batch_size=4, device="cpu"), stop)
    with pytest.raises((Cancelled, CytoclipError)):
        list(gen)
    assert (ckpt / "results.xlsx").read_bytes() == b"precious"

    fresh = tmp_path / "fresh.ckpt"  # a folder the run created: training's files go, anything else stays
    fresh.mkdir()
    for name in ("last.pt", "best.pt", "text_features.pt"):
        (fresh / name).write_bytes(b"x")
    remove_checkpoint(fresh)
    assert not fresh.exists()
    fresh.mkdir()
    (fresh / "last.pt").write_bytes(b"x")
    (fresh / "mine.txt").write_text("kept")
    remove_checkpoint(fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["mine.txt"]


# ------------------------------------------------------------------------------------------ modes and summary
def modes(folder: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_results_follow_the_umask(base, tmp_path, capsys, umask):
    old = os.umask(umask)  # the test sets it (and restores it); the code only reads it
    try:
        assert cli.main(["predict", str(base["image"]), "--out", str(tmp_path / "out"), "--model",
                         str(base["bundle"]), "--pixel-size", str(PX), *FAST]) == 0
        assert cli.main(export_argv(base["root"], tmp_path / "exp", base["results"])) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    for folder in (tmp_path / "out", tmp_path / "exp"):
        assert modes(folder) == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}, folder


def test_predict_says_what_it_found(base, tmp_path, capsys):
    target = tmp_path / "res" / "small"
    assert cli.main(["predict", str(base["image"]), "--out", str(tmp_path / "res"), "--model", str(base["bundle"]),
                     "--pixel-size", str(PX), "--device", "cpu", "--stride-um", str(STRIDE)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((target / "prediction.json").read_text())
    labels = tifffile.imread(target / "labels.tif")
    assert out[0] == str(target)
    tiles = summary["tile_counts"]
    assert f"{tiles['encoded']} tiles with tissue of {tiles['grid_cells']} grid cells" in out[1]
    assert re.search(r"predicted in \d+\.\d s", out[1])
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    top = {r["id"]: r["name"] for r in summary["regions"]}[int(ids[np.argmax(counts)])]
    share = round(100 * counts.max() / counts.sum())
    assert out[2].startswith(f"  {len(ids)} regions: {top} {share}%"), out[2]
    assert out[3].strip() == f"open it in napari: napari --plugin napari-cytoclip {target}"
    # --quiet: only the folder, for scripts
    assert cli.main(["predict", str(base["image"]), "--out", str(tmp_path / "q"), "--model", str(base["bundle"]),
                     "--pixel-size", str(PX), *FAST]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "q" / "small")
