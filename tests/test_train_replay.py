"""Fine-tuning with replay: batch mixing, warmup default, small checkpoints and portable provenance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_bundle

from napari_cytoclip.models.bundle import BUNDLE_JSON, load_bundle
from napari_cytoclip.cli import main
from napari_cytoclip.models.model import TEXT_TRUNK_PREFIX
from napari_cytoclip.teach.pairs import Pair, write_pairs
from napari_cytoclip.teach.train import TrainConfig, TrainData, sample_order, train, warmup_for


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("tiny") / "tiny").path


def pairs(folder: Path, region_ids: list[int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    write_pairs(folder, [Pair(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), f"a tile of region {r}",
                              {"region_id": r}) for r in region_ids])
    return folder


def data(targets: list[int], replay: list[bool]) -> TrainData:
    t = np.asarray(targets, np.int64)
    return TrainData(np.zeros((len(t), 1, 1, 3), np.uint8), t, [None] * (t.max() + 1), [],
                     replay=np.asarray(replay, bool))


def test_replay_fills_its_share_of_every_batch():
    d = data([0] * 3 + [1] * 2 + [2] * 50 + [3] * 50, [False] * 5 + [True] * 100)
    order = sample_order(d, steps=40, batch_size=8, replay_ratio=1.0, power=1.0, rng=np.random.default_rng(0))
    batches = order.reshape(40, 8)
    assert np.all(~d.replay[batches[:, :4]]) and np.all(d.replay[batches[:, 4:]])
    # class-balanced within the new pairs: region 1 (2 pairs) is drawn about as often as region 0 (3 pairs)
    new = d.targets[batches[:, :4]].ravel()
    assert 0.35 < np.mean(new == 1) < 0.65
    three = sample_order(d, 10, 8, 3.0, 1.0, np.random.default_rng(0)).reshape(10, 8)
    assert d.replay[three].sum(1).tolist() == [6] * 10  # 1 new : 3 replay, rounded to 2 + 6
    for ratio in (0.0,):
        assert not d.replay[sample_order(d, 10, 8, ratio, 1.0, np.random.default_rng(0))].any()
    plain = data([0, 1, 1, 2], [False] * 4)
    assert len(sample_order(plain, 5, 4, 1.0, 0.75, np.random.default_rng(0))) == 20


def test_warmup_scales_down_for_short_runs():
    assert warmup_for(60) == 6 and warmup_for(5000) == 100 and warmup_for(3) == 1 and warmup_for(1000) == 100


@pytest.mark.slow
def test_cli_fine_tune_with_replay(tiny, tmp_path, capsys):
    new = pairs(tmp_path / "exports" / "plate_041" / "pairs", [3, 4] * 6, seed=1)
    replay = [pairs(tmp_path / "start" / f"plate_{n:03d}", list(range(1, 9)) * 3, seed=n) for n in (1, 12)]
    out = tmp_path / "tuned"
    rc = main(["train", str(new), "--init", str(tiny), "--out", str(out), "--replay", *map(str, replay),
               "--epochs", "2", "--batch-size", "8", "--steps-per-epoch", "2", "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    prov = load_bundle(out).provenance
    assert prov["pairs"] == ["plate_041/pairs"] and prov["replay"] == ["plate_001", "plate_012"]
    assert prov["n_pairs"] == 12 and prov["n_replay_pairs"] == 48
    assert prov["config"]["steps_per_epoch"] == 2 and prov["config"]["new_per_batch"] == 4
    assert prov["config"]["warmup_steps"] == 1 and len(prov["history"]) == 2
    assert str(tmp_path) not in (out / BUNDLE_JSON).read_text()  # no temp paths in the bundle
    assert not (tmp_path / "tuned.ckpt").exists()

    rc = main(["train", str(new), "--init", str(tiny), "--out", str(tmp_path / "bad"), "--replay", str(replay[0]),
               "--replay-ratio", "-1", "--quiet"])
    assert rc == 2 and "--replay-ratio" in capsys.readouterr().err
    rc = main(["train", str(new), "--init", str(tiny), "--out", str(tmp_path / "bad"), "--replay",
               str(tmp_path / "missing"), "--epochs", "1", "--device", "cpu", "--quiet"])
    assert rc == 2 and "missing" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_interrupted_run_keeps_one_small_checkpoint_and_resumes(tiny, tmp_path):
    import torch

    folder = pairs(tmp_path / "pairs", [1, 2, 3] * 4)
    out = tmp_path / "model"
    config = TrainConfig(epochs=3, batch_size=4, steps_per_epoch=1, device="cpu", augment=False)

    def stop_in_epoch_3(info: dict) -> None:
        if info.get("epoch") == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train([folder], out, tiny, config, progress=stop_in_epoch_3)
    ckpt = tmp_path / "model.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["cytoclip-train.json", "last.pt", "text_features.pt"]  # no best.pt without --val
    saved = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and not any(k.startswith(TEXT_TRUNK_PREFIX) for k in saved["model"])
    assert any(k.startswith("visual.") for k in saved["model"])

    bundle = train([folder], out, tiny, TrainConfig(epochs=3, batch_size=4, steps_per_epoch=1, device="cpu",
                                                     augment=False))
    history = bundle.provenance["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and not ckpt.exists()
    assert json.loads((out / BUNDLE_JSON).read_text())["provenance"]["n_pairs"] == 12
