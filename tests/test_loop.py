"""The correction loop in miniature, through the command line: predict, correct, export, fine-tune, reload.

A crop of a real training plate, a tiny random model, the atlas labels as the "corrections"
(as in ``benchmarks/loop.py``), a few steps of ``train --init --replay`` (replay pairs from another
training plate); the new bundle must load with ``model.load_model`` and predict again.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from helpers import allen_plate, allen_plates, tiny_bundle

from napari_cytoclip.models.bundle import BUNDLE_JSON, BUNDLE_WEIGHTS, load_bundle
from napari_cytoclip.cli import main
from napari_cytoclip.models.model import load_model, read_state_dict
from napari_cytoclip.teach.pairs import read_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loop  # noqa: E402  (benchmarks/loop.py)

PLATE = 44                  # a training plate (qc ok)
BOX = (0, 700, 100, 900)    # y0, y1, x0, x1: 5.2 x 5.9 mm of striatum, cortex, pallidum and tracts
STRIDE = "200"


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    plate = allen_plate(PLATE)
    y0, y1, x0, x1 = BOX
    with Image.open(plate.image) as im:
        image = np.asarray(im.convert("L"))[y0:y1, x0:x1]
    truth = loop.corrected_labels(plate.label_map()[y0:y1, x0:x1])
    Image.fromarray(np.ascontiguousarray(image)).save(root / "section.png")
    tifffile.imwrite(root / "corrected.tif", truth)
    return root, plate.um_per_px, truth


@pytest.mark.slow
def test_tiny_loop_end_to_end(crop, capsys):
    root, px, truth = crop
    tiny = tiny_bundle(root / "tiny").path
    image = root / "section.png"

    # 1. predict
    _cli(capsys, "predict", image, "--out", root / "pred", "--model", tiny, "--pixel-size", px,
         "--stride-um", STRIDE, "--device", "cpu", "--quiet")
    pred = root / "pred" / "section"
    grid_labels = tifffile.imread(pred / "labels.tif")

    # 2. the anatomist's corrections, exported through the CLI (full-resolution labels -> grid)
    out = _cli(capsys, "export-pairs", image, root / "corrected.tif", "--prediction", pred, "--model", tiny,
               "--out", root / "export", "--device", "cpu", "--quiet")
    pairs = root / "export" / "pairs"
    files, captions, records = read_pairs(pairs)
    with open(pairs / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    jsonl = [json.loads(line) for line in (pairs / "pairs.jsonl").read_text().splitlines() if line.strip()]
    tiles = sorted((pairs / "tiles").glob("*.png"))
    assert 50 < len(rows) == len(jsonl) == len(tiles) == len(files)
    assert f"{len(rows)} pairs added" in out
    assert {Path(r["filepath"]).name for r in rows} == {t.name for t in tiles}
    with Image.open(tiles[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    edited = tifffile.imread(root / "export" / "labels.tif")
    assert edited.shape == grid_labels.shape
    for rec in records:  # every pair is a corrected cell, labelled with the atlas label at its centre
        assert rec["kind"] == "corrected" and rec["corrected_label"] != rec["predicted_label"]
        y, x = np.rint(rec["center_px"]).astype(int)
        assert rec["corrected_label"] == truth[y, x] == edited[rec["row"], rec["col"]]
        assert rec["corrected_label"] not in (0, 15)
    log = json.loads((root / "export" / "export.json").read_text())["exports"]
    assert log[-1]["corrected_cells"] == len(rows) and log[-1]["confirmed_cells"] == 0

    # 3. fine-tune the start model on the exported pairs, with replay of (a sample of) its training data
    from napari_cytoclip.teach import allen

    start = load_bundle(tiny)
    replay = allen.build_pair_folders(root / "replay", "train", start.input, start.regions, start.label_um, 800.0,
                                      plate_numbers=[36])
    n_replay = len(read_pairs(replay[0])[0])
    _cli(capsys, "train", pairs, "--init", tiny, "--out", root / "tuned", "--replay", *replay, "--epochs", "2",
         "--batch-size", "32", "--steps-per-epoch", "2", "--device", "cpu", "--quiet")
    tuned = root / "tuned"
    assert (tuned / BUNDLE_JSON).is_file() and (tuned / BUNDLE_WEIGHTS).is_file()
    assert not (root / "tuned.ckpt").exists()
    bundle = load_bundle(tuned)
    assert bundle.provenance["n_pairs"] == len(rows) and bundle.provenance["trained_from"] == "tiny-cytoclip"
    assert bundle.provenance["pairs"] == ["export/pairs"] and bundle.provenance["replay"] == ["plate_036"]
    assert bundle.provenance["n_replay_pairs"] == n_replay > 20
    assert bundle.provenance["config"]["new_per_batch"] == 16 and len(bundle.provenance["history"]) == 2
    assert str(root) not in (tuned / BUNDLE_JSON).read_text()
    assert [r.id for r in bundle.regions] == [r.id for r in load_bundle(tiny).regions]
    before, after = read_state_dict(Path(tiny) / BUNDLE_WEIGHTS), read_state_dict(tuned / BUNDLE_WEIGHTS)
    assert any(not np.array_equal(before[k].numpy(), after[k].numpy()) for k in after if k.startswith("visual."))

    # 4. the new bundle loads and predicts again on the same grid
    model = load_model(tuned, device="cpu")
    assert model.bundle.name == "tuned" and model.region_embeddings().shape[0] == len(bundle.regions)
    _cli(capsys, "predict", image, "--out", root / "pred2", "--model", tuned, "--pixel-size", px,
         "--stride-um", STRIDE, "--device", "cpu", "--quiet")
    again = tifffile.imread(root / "pred2" / "section" / "labels.tif")
    assert again.shape == grid_labels.shape
    summary = json.loads((root / "pred2" / "section" / "prediction.json").read_text())
    assert summary["tile_counts"]["encoded"] > 0
    assert set(np.unique(again)) <= {0} | {r.id for r in bundle.regions}


def test_corrected_labels_leave_root_only_unlabelled():
    atlas = np.array([[0, 1, 15], [14, 15, 3]], np.uint8)
    out = loop.corrected_labels(atlas)
    assert out.dtype == np.uint16 and out.tolist() == [[0, 1, 0], [14, 0, 3]]
    assert atlas[0, 2] == 15  # the input is not modified


def test_plate_choice_never_uses_test_or_validation():
    plates = allen_plates()
    start = loop.weak_subset(plates, 8)
    assert start and all(p.split == "train" for p in start)
    chosen = loop.pick_corrected_plates(plates, {p.number for p in start}, 10, seed=0)
    assert len(chosen) == 10 and len({p.number for p in chosen}) == 10
    assert all(p.split == "train" and p.qc == "ok" and p.number % 5 and p.number % 10 != 3 for p in chosen)
    assert not {p.number for p in chosen} & {p.number for p in start}
    assert [p.number for p in loop.pick_corrected_plates(plates, {p.number for p in start}, 3, seed=0)] == \
        [p.number for p in chosen[:3]]  # nested: the 3 plates are the first 3 of the 10
    test = loop.pick_test_plates(plates, None)
    assert len(test) == 26 and all(p.number % 5 == 0 for p in test)
    assert [p.number for p in loop.pick_test_plates(plates, 3)] == [5, 65, 130]


def test_stain_resembles_md787():
    plate = allen_plate(41)
    with Image.open(plate.image) as im:
        gray = np.asarray(im.convert("L"))[::4, ::4]
    labels = plate.label_map()[::4, ::4]
    rgb = loop.stain_plate(gray, labels, np.random.default_rng(0))
    assert rgb.shape == gray.shape + (3,) and rgb.dtype == np.uint8
    tissue, background = rgb[labels > 0].mean(0), rgb[labels == 0].mean(0)
    assert np.all(background > 225) and np.all(tissue < background)
    assert tissue[2] > tissue[0] + 25  # blue-violet, as MD787
    assert np.abs(tissue - loop.MD787_TISSUE).max() < 40


def test_epochs_for_a_step_budget():
    assert loop.epochs_for(100, 60, 64) == 60   # one step per epoch
    assert loop.epochs_for(640, 60, 64) == 6
    assert loop.epochs_for(64_000, 60, 64) == 1  # never less than one epoch


def test_schedule_for_gives_the_step_budget():
    assert loop.schedule_for(361, 60, 32) == (5, 12)     # 11 steps a pass over the corrections -> 5 x 12
    assert loop.schedule_for(3864, 60, 32) == (1, 60)    # more corrections than the budget: one partial epoch
    assert loop.schedule_for(6923, 60, 64) == (1, 60)
    for n in (10, 361, 1397, 3864):
        epochs, per_epoch = loop.schedule_for(n, 60, 32)
        assert abs(epochs * per_epoch - 60) <= epochs // 2 + 1


def test_validation_plates_are_disjoint_from_test_and_training_choices():
    plates = allen_plates()
    val = loop.pick_eval_plates(plates, "val", None)
    test = loop.pick_eval_plates(plates, "test", None)
    assert val and all(p.number % 10 == 3 for p in val)
    assert not {p.number for p in val} & {p.number for p in test}
    start = loop.weak_subset(plates, 8)
    chosen = loop.pick_corrected_plates(plates, {p.number for p in start}, 10, seed=0)
    assert not {p.number for p in val} & ({p.number for p in start} | {p.number for p in chosen})
    assert len(loop.pick_eval_plates(plates, "val", 3)) == 3


@pytest.mark.parametrize("specs, expected", [
    (["lr=1e-4,3e-4,1e-3"], [{"lr": 1e-4}, {"lr": 3e-4}, {"lr": 1e-3}]),
    (["lr=1e-4,1e-3", "steps=100,200"], [{"lr": 1e-4, "steps": 100}, {"lr": 1e-4, "steps": 200},
                                         {"lr": 1e-3, "steps": 100}, {"lr": 1e-3, "steps": 200}]),
    (["replay-ratio=0.5,1"], [{"replay_ratio": 0.5}, {"replay_ratio": 1.0}]),
])
def test_sweep_grid(specs, expected):
    assert loop.parse_sweep(specs) == expected


@pytest.mark.parametrize("spec", ["weak_lr=1,2", "lr", "lr=", "seed=0,1"])
def test_sweep_refuses_other_choices(spec):
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        loop.parse_sweep([spec])


def test_pick_best_takes_the_best_mean_validation_score():
    cands = [{"config": {"lr": 1e-4}, "mean_macro_f1": 0.5}, {"config": {"lr": 3e-4}, "mean_macro_f1": 0.7},
             {"config": {"lr": 1e-3}, "mean_macro_f1": 0.7}]
    assert loop.pick_best(cands)["config"] == {"lr": 3e-4}  # a tie keeps the first


def test_test_split_refuses_before_a_validation_sweep(tmp_path):
    allen_plates()  # skips without the real data
    tiny = tiny_bundle(tmp_path / "tiny").path
    args = loop.parse_args(["--split", "test", "--work", str(tmp_path / "work"), "--start-model", str(tiny),
                            "--ks", "1"])
    with pytest.raises(SystemExit, match="run `--split val`"):
        loop.Loop(args).main()
    assert "reports" not in {p.name for p in (tmp_path / "work").iterdir()}  # nothing was scored on test


def _score(f1):
    return {"macro_f1": f1, "accuracy": f1 + 0.1, "per_region": {"Pons": f1, "Isocortex": f1 + 0.05}}


def test_generated_text_comes_from_the_results_alone():
    base = {"config": {"seed": 0, "predict_stride_um": 200.0, "batch_size": 64, "eval_stride_um": 200.0},
            "corrected_order": [41]}
    empty = loop.section_lines(base, ["cmd"])
    assert "Validation sweep: not run to the end" in "\n".join(empty)
    assert "Test table: not run to the end" in "\n".join(empty)
    assert "0." not in "\n".join(loop.summary_bullets(base))  # no figure without a run
    cfg_a, cfg_b = {"lr": 1e-4, "steps": 200, "replay_ratio": 1.0}, {"lr": 1e-3, "steps": 200, "replay_ratio": 1.0}
    results = {**base,
               "val": {"split": "val", "plates": [3, 13], "ks": [1], "machine": "cpu, 2 cores, load average 1.0",
                       "machine_at_end": "m", "data": "/d", "started": "t0", "finished": "t1", "swept": ["lr"],
                       "scores": {"start": _score(0.5)}, "chosen": cfg_b,
                       "candidates": [{"config": cfg_a, "scores": {"1": _score(0.511)}, "mean_macro_f1": 0.511},
                                      {"config": cfg_b, "scores": {"1": _score(0.522)}, "mean_macro_f1": 0.522}]},
               "test": {"split": "test", "plates": [5, 10], "ks": [1], "machine": "cpu, 2 cores, load average 3.0",
                        "machine_at_end": "m", "data": "/d", "started": "t2", "finished": "t3", "chosen": cfg_b,
                        "scores": {"start": _score(0.6), "replay/1": _score(0.633)}},
               "fine_tune": {f"replay/1@{loop.config_tag(cfg_b)}": {"plates": [41], "pairs": 231, "steps": 200,
                                                                   "seconds": 90.0, "load_average_after": 2.5}}}
    text = "\n".join(loop.section_lines(results, ["cmd"]))
    assert "| 0.001 | 200 | 1 | 0.522 | 0.522 | yes |" in text and "| 0.0001 | 200 | 1 | 0.511 | 0.511 |  |" in text
    assert "| 1 | 41 | 231 | 200 | 90 | 2.5 | 0.633 | 0.733 | - |" in text
    assert "load average 3.0" in text and "plate number % 10 == 3" in text
    bullets = "\n".join(loop.summary_bullets(results))
    assert "K = 1: 0.633 (+0.033)" in bullets and "lr 0.001" in bullets
