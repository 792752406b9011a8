"""Training results one can trust: validation by region, provenance of the model itself, resumable
time budgets and learning-rate schedules, a checkpoint folder that is train's own, and a reproduction
script whose defaults are the shipped recipe."""
from __future__ import annotations

import importlib.util
import itertools
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_bundle

import napari_cytoclip.teach.train as train_mod
from napari_cytoclip.models.bundle import BUNDLE_JSON, default_bundle_path, load_bundle
from napari_cytoclip.cli import main
from napari_cytoclip.errors import OutputError
from napari_cytoclip.teach.pairs import Pair, write_pairs
from napari_cytoclip.teach.train import CKPT_MARKER, TrainConfig, assemble, train
from napari_cytoclip.models.vocabularies import allen_mouse_regions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("tiny") / "tiny").path


def tile(region: int, rng: np.random.Generator) -> np.ndarray:
    """A 32 px tile whose colour tells its region apart (a tiny model learns it in a few steps)."""
    base = np.zeros((32, 32, 3), np.uint8)
    base[..., region % 3] = (40 + 60 * region) % 256
    return np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)


def pairs(folder: Path, regions: list[int], n: int = 6, seed: int = 0, records=None) -> Path:
    """A real pair folder: ``n`` tiles per region, in the order given."""
    rng = np.random.default_rng(seed)
    write_pairs(folder, [Pair(tile(r, rng), f"a tile of region {r}", {"region_id": r} if records is None else
                              records(r)) for r in regions for _ in range(n)])
    return folder


# -- 1. validation classes are matched by region, not by folder order ------------------------------

@pytest.mark.parametrize("train_order, val_order", [
    ([[1, 2, 3]], [[1, 2, 3]]),
    ([[1, 2, 3]], [[3], [2, 1]]),
    ([[3, 1], [2]], [[2, 3, 1]]),
    ([[5], [3, 1]], [[1], [9, 5]]),  # region 9 is in validation only
])
def test_classes_follow_regions_whatever_the_folder_order(tmp_path, train_order, val_order):
    regions = allen_mouse_regions()
    names = {r.id: r.name for r in regions}
    tr = [pairs(tmp_path / f"t{i}", ids, n=2, seed=i) for i, ids in enumerate(train_order)]
    va = [pairs(tmp_path / f"v{i}", ids, n=2, seed=10 + i) for i, ids in enumerate(val_order)]
    data = assemble(tr, regions, 32)
    val = assemble(va, regions, 32, like=data)
    trained = sorted({r for ids in train_order for r in ids})
    assert [r.id for r in data.regions] == trained  # bundle order, not first appearance
    assert [r.id for r in val.regions][:len(trained)] == trained  # validation indexes the same classes first
    want = [r for ids in val_order for r in ids for _ in range(2)]
    assert [val.regions[t].id for t in val.targets] == want
    assert all(val.regions[t].name == names[r] for t, r in zip(val.targets, want))


def test_pairs_match_by_region_name_when_the_id_is_foreign(tmp_path):
    regions = allen_mouse_regions()
    by_name = {r.name: r.id for r in regions}
    folder = pairs(tmp_path / "other_model", [3, 7], n=1,
                   records=lambda r: {"region_id": 900 + r, "region_name": regions[r - 1].name})
    data = assemble([folder], regions, 32)
    assert [r.id for r in data.regions] == [by_name[regions[2].name], by_name[regions[6].name]]


@pytest.mark.slow
def test_validation_scores_the_same_in_any_folder_order(tiny, tmp_path):
    tr = pairs(tmp_path / "train", [1, 2, 3])
    in_order = [pairs(tmp_path / "val_a", [1, 2, 3], seed=5)]
    shuffled = [pairs(tmp_path / "val_b1", [3], seed=6), pairs(tmp_path / "val_b2", [2, 1], seed=7)]
    cfg = TrainConfig(epochs=2, batch_size=12, steps_per_epoch=5, device="cpu", augment=False)
    a = train([tr], tmp_path / "a", tiny, cfg, val_folders=in_order).provenance["history"]
    b = train([tr], tmp_path / "b", tiny, cfg, val_folders=shuffled).provenance["history"]
    assert a[-1]["val_accuracy"] >= 0.9  # the model tells the regions apart, so a class mix-up would show
    for x, y in zip(a, b):
        assert (x["val_accuracy"], x["val_macro_f1"]) == (y["val_accuracy"], y["val_macro_f1"])


# -- 2. provenance describes the model it sits in; the parent's record stays apart ---------------------

@pytest.mark.slow
def test_provenance_is_this_models_and_keeps_the_parent_apart(tiny, tmp_path):
    import open_clip
    import torch

    import napari_cytoclip

    parent = tmp_path / "parent"
    meta = json.loads((tiny / BUNDLE_JSON).read_text())
    claims = {"test_metrics": {"macro_f1": 0.84}, "trained_on": "one NVIDIA H100", "selected_epoch": 7,
              "selection": {"val_macro_f1_100um": {"a": 0.857}}, "split": {"test": "plate % 5 == 0"}}
    meta["provenance"] = claims
    parent.mkdir()
    (parent / BUNDLE_JSON).write_text(json.dumps(meta))
    (parent / "weights.safetensors").write_bytes((tiny / "weights.safetensors").read_bytes())
    parent_bundle = load_bundle(parent)

    new = pairs(tmp_path / "corr" / "pairs", [3, 4])
    same = pairs(tmp_path / "corr_copy", [3, 4])  # same content in another folder: same hash
    replay = pairs(tmp_path / "plate_001", [1, 2, 3, 4], seed=1)
    val = pairs(tmp_path / "plate_003", [1, 3, 4], seed=2)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    out = tmp_path / "tuned"
    rc = main(["train", str(new), str(same), "--init", str(parent), "--out", str(out), "--replay", str(replay),
               "--val", str(val), "--epochs", "3", "--batch-size", "8", "--steps-per-epoch", "2",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    prov = load_bundle(out).provenance

    assert not (set(claims) - {"selected_epoch", "selection"}) & set(prov)  # no inherited claims at top level
    assert prov["parent"] == {"name": "tiny-cytoclip", "weights": parent_bundle.weights_hash(), "provenance": claims}
    assert prov["trained_from"] == "tiny-cytoclip" and prov["init_weights"] == parent_bundle.weights_hash()
    data = {d["folder"]: d for d in prov["data"]}
    assert list(data) == ["corr/pairs", "corr_copy", "plate_001", "plate_003"]
    assert [d["n_pairs"] for d in data.values()] == [12, 12, 24, 18]
    assert data["corr/pairs"]["sha256"] == data["corr_copy"]["sha256"] != data["plate_001"]["sha256"]
    assert data["plate_001"].get("replay") and data["plate_003"].get("validation")
    assert prov["n_pairs"] == 24 and prov["n_replay_pairs"] == 24
    assert prov["config"]["epochs"] == 3 and prov["config"]["batch_size"] == 8 and prov["config"]["lr"] == 1e-3
    assert prov["epochs_run"] == 3 and prov["steps"] == 6 == prov["total_steps"]
    assert prov["selection"]["on"] == ["plate_003"] and "val_macro_f1" in prov["selection"]["by"]
    assert prov["selection"]["n_val_pairs"] == 18
    assert prov["selected_epoch"] == max(prov["history"], key=lambda h: (h["val_macro_f1"], h["epoch"]))["epoch"]
    assert prov["device"] == "cpu" and prov["hardware"]["device"] == "cpu" and prov["hardware"]["torch_threads"] >= 1
    assert prov["software"]["torch"] == torch.__version__ and prov["software"]["open_clip"] == open_clip.__version__
    assert prov["software"]["napari_cytoclip"] == napari_cytoclip.__version__
    finished = datetime.fromisoformat(prov["time"]["finished_utc"])
    assert before <= finished <= datetime.now(timezone.utc) and prov["time"]["train_seconds"] >= 0
    assert str(tmp_path) not in (out / BUNDLE_JSON).read_text()

    # fine-tuning the fine-tuned model nests the records: each level describes its own model
    rc = main(["train", str(new), "--init", str(out), "--out", str(tmp_path / "again"), "--epochs", "1",
               "--batch-size", "4", "--steps-per-epoch", "1", "--device", "cpu", "--quiet"])
    again = load_bundle(tmp_path / "again").provenance
    assert rc == 0 and again["parent"]["provenance"] == prov and again["parent"]["name"] == "tuned"
    assert again["selection"] == {"by": "last epoch (no validation)"} and again["selected_epoch"] == 1


# -- 3. a resumed run keeps its time budget and learning-rate schedule -----------------------------------

@pytest.mark.slow
def test_resumed_budgeted_run_follows_the_uninterrupted_schedule(tiny, tmp_path, monkeypatch):
    folder = pairs(tmp_path / "pairs", [1, 2, 3], n=2)
    # every epoch takes 10 s on this clock: a 35 s budget fits 3 of the 6 epochs asked for
    config = TrainConfig(epochs=6, batch_size=4, steps_per_epoch=2, device="cpu", augment=False, time_budget_s=35)

    def run(out: Path, stop_at_epoch: int | None = None) -> tuple[list, object]:
        clock = itertools.count(0.0, 10.0)
        monkeypatch.setattr(train_mod, "_clock", lambda: next(clock))
        seen: list[dict] = []

        def progress(info: dict) -> None:
            seen.append(info)
            if stop_at_epoch is not None and info.get("epoch") == stop_at_epoch:
                raise KeyboardInterrupt

        try:
            return seen, train([folder], out, tiny, config, progress=progress)
        except KeyboardInterrupt:
            return seen, None

    def lrs(seen: list[dict]) -> list[tuple]:
        done = max((i for i, s in enumerate(seen) if "epoch_done" in s), default=-1)  # drop an unfinished epoch
        return [(s["global_step"], s["lr"]) for s in seen[:done + 1] if "lr" in s]

    straight, model = run(tmp_path / "straight")
    assert model.provenance["epochs_run"] == 3 and model.provenance["steps"] == 6
    assert model.provenance["time"]["train_seconds"] == 30.0

    first, none = run(tmp_path / "resumed", stop_at_epoch=1)
    assert none is None and (tmp_path / "resumed.ckpt" / "last.pt").is_file()
    second, resumed = run(tmp_path / "resumed")
    assert lrs(first) + lrs(second) == lrs(straight)
    assert [s["global_step"] for s in second if "lr" in s][0] == 3  # resumed at step 3, not from the start
    assert resumed.provenance["epochs_run"] == 3 and resumed.provenance["steps"] == 6
    assert resumed.provenance["time"]["train_seconds"] == 30.0  # 10 s before the stop, 20 s after
    assert [h["epoch"] for h in resumed.provenance["history"]] == [1, 2, 3]
    assert len(straight) and all(s["epochs"] == 3 for s in second if "lr" in s)


# -- 5. (issue 16) train never uses or deletes a <out>.ckpt it did not make -------------------------------

def _user_folder(ckpt: Path) -> None:
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("my notes")


def _user_empty(ckpt: Path) -> None:
    ckpt.mkdir()


def _user_file(ckpt: Path) -> None:
    ckpt.write_text("a file of mine")


def _user_with_our_names(ckpt: Path) -> None:
    ckpt.mkdir()
    (ckpt / "last.pt").write_text("not a checkpoint")
    (ckpt / "text_features.pt").write_text("mine")


def _symlink_to_marked(ckpt: Path) -> None:
    real = ckpt.with_name("elsewhere")
    real.mkdir()
    (real / CKPT_MARKER).write_text("{}")
    (real / "keep.txt").write_text("keep")
    ckpt.symlink_to(real, target_is_directory=True)


@pytest.mark.parametrize("make", [_user_folder, _user_empty, _user_file, _user_with_our_names, _symlink_to_marked])
def test_train_refuses_a_checkpoint_folder_it_did_not_make(tiny, tmp_path, make, capsys):
    folder = pairs(tmp_path / "pairs", [1, 2], n=2)
    out = tmp_path / "model"
    ckpt = tmp_path / "model.ckpt"
    make(ckpt)
    snapshot = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None)
                      for p in tmp_path.rglob("*") if "pairs" not in p.parts)
    with pytest.raises(OutputError, match="not a napari-cytoclip training checkpoint"):
        train([folder], out, tiny, TrainConfig(epochs=1, batch_size=4, steps_per_epoch=1, device="cpu"))
    rc = main(["train", str(folder), "--init", str(tiny), "--out", str(out), "--epochs", "1", "--batch-size", "4",
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.ckpt" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert snapshot == sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None)
                              for p in tmp_path.rglob("*") if "pairs" not in p.parts)


@pytest.mark.slow
def test_train_removes_only_its_own_checkpoint_files(tiny, tmp_path):
    folder = pairs(tmp_path / "pairs", [1, 2], n=2)
    config = TrainConfig(epochs=2, batch_size=4, steps_per_epoch=1, device="cpu", augment=False)
    def stop_in_epoch_2(info: dict) -> None:
        if info.get("epoch") == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train([folder], tmp_path / "model", tiny, config, progress=stop_in_epoch_2)
    ckpt = tmp_path / "model.ckpt"
    assert json.loads((ckpt / CKPT_MARKER).read_text())["model"] == "model"
    (ckpt / "my_notes.txt").write_text("written into the checkpoint folder by the user")
    train([folder], tmp_path / "model", tiny, config)
    assert sorted(p.name for p in ckpt.iterdir()) == ["my_notes.txt"]  # the user's file and its folder stay

    train([folder], tmp_path / "clean", tiny, config)
    assert not (tmp_path / "clean.ckpt").exists() and (tmp_path / "clean" / BUNDLE_JSON).is_file()


# -- 4. the reproduction script's defaults are the shipped recipe -----------------------------------------

def _script():
    path = ROOT / "scripts" / "reproduce_default_model.py"
    spec = importlib.util.spec_from_file_location("reproduce_default_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduction_defaults_are_the_shipped_recipe(tmp_path, capsys):
    script = _script()
    shipped = json.loads((default_bundle_path() / BUNDLE_JSON).read_text())
    prov = shipped["provenance"]
    script.main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--device", "cpu", "--dry-run"])
    report = json.loads(capsys.readouterr().out)
    plan = report["plan"]
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()  # a dry run writes nothing
    assert plan["init"]["scales_um"] == shipped["input"]["scales_um"]
    assert plan["init"]["size"] == shipped["input"]["size"]
    assert plan["init"]["label_um"] == shipped["label_um"] and plan["init"]["stride_um"] == shipped["stride_um"]
    assert plan["init"]["weights"] == prov["init_weights"]  # the same untrained start model, bit for bit
    assert plan["pairs"]["pair_stride_um"] == 120.0 and plan["pairs"]["jpeg_quality"] == 90
    # every config value matches the shipped run's, except the few whose difference the plan explains
    fields = {d["field"]: d for d in report["differences"]}
    for key, value in prov["config"].items():
        if key == "num_threads" and value is None:  # the trainer no longer has it: null meant "unchanged"
            continue
        if plan["config"][key] != value:
            assert fields[f"config.{key}"]["why"], key
    assert {k for k in fields if k.startswith("config.")} <= {"config.time_budget_s", "config.device",
                                                              "config.text_features"}
    assert plan["config"]["epochs"] == prov["selected_epoch"] + 1 == len(prov["history"]) == 8
    # what cannot match is said: hardware, JPEG re-encoding, the epoch selection metric
    assert {"hardware", "plates", "selection"} <= set(fields)
    assert "H100" in fields["hardware"]["shipped"] and "JPEG" in fields["plates"]["shipped"]
    assert "init.weights" not in fields and not any(k.startswith("init.") for k in fields)


@pytest.mark.parametrize("args, field", [
    (["--scales-um", "320,640,1280"], "init.scales_um"),
    (["--lr", "1e-3"], "config.lr"),
    (["--epochs", "12"], "config.epochs"),
    (["--batch-size", "256"], "config.batch_size"),
    (["--jpeg-quality", "0"], "plates"),
])
def test_reproduction_plan_names_each_departure(tmp_path, args, field):
    script = _script()
    plan = script.plan(script.build_parser().parse_args(["--work", str(tmp_path), "--out", str(tmp_path), *args]))
    fields = {d["field"]: d for d in script.differences(plan, script.shipped_recipe(), "cuda")}
    assert field in fields and fields[field]["shipped"] != fields[field]["here"]


PLATES = Path(__file__).resolve().parents[2] / "shared" / "data" / "allen_ara_coronal_nissl_plates"


@pytest.mark.skipif(not PLATES.is_dir(), reason=f"the real Allen plates ({PLATES}) are not there")
def test_reproduction_reads_jpeg_reencodes_of_training_plates_only(tmp_path):
    from PIL import Image

    from napari_cytoclip.teach import allen

    data = _script().reencoded_plates(str(PLATES.parent), tmp_path / "q90", 90)
    plates = {p.number: p for p in allen.plates(data)}
    originals = {p.number: p for p in allen.plates(PLATES.parent)}
    assert plates.keys() == originals.keys()
    for n, plate in plates.items():
        assert plate.image.exists() == (n % 5 != 0)  # test plates are never copied
    plate = plates[41]
    assert plate.image.read_bytes() != originals[41].image.read_bytes()
    with Image.open(plate.image) as a, Image.open(originals[41].image) as b:
        assert a.format == "JPEG" and a.size == b.size and a.mode == b.mode
    assert np.array_equal(plate.label_map(), originals[41].label_map())
