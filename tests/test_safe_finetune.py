"""Safe fine-tuning (teach/safe_finetune.py): replay required, held-back check, ship only when better.

Real training of the tiny test model on small real pair folders; nothing is mocked.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_bundle

from napari_cytoclip.errors import Cancelled, CytoclipError
from napari_cytoclip.teach.pairs import Pair, read_pairs, write_pairs
from napari_cytoclip.teach.safe_finetune import (HeldOutScore, held_out_score, replay_pair_folders, safe_finetune,
                                                 split_pairs, strictly_better)
from napari_cytoclip.teach.train import TrainConfig

CONFIG = TrainConfig(epochs=6, batch_size=16, lr=1e-3, warmup_steps=1, device="cpu", augment=False, seed=0)


def _pairs(folder: Path, regions, counts: dict[int, int], level: dict[int, int], seed: int = 0) -> Path:
    """A pair folder: ``counts[rid]`` 32-px windows of region ``rid`` around grey ``level[rid]``."""
    from napari_cytoclip.teach.export import caption_for

    rng = np.random.default_rng(seed)
    by_id = {r.id: r for r in regions}
    out = []
    for rid, n in counts.items():
        for _ in range(n):
            img = np.clip(level[rid] + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            out.append(Pair(img, caption_for(by_id[rid]),
                            {"corrected_label": rid, "region_id": rid, "region_name": by_id[rid].name}))
    write_pairs(folder, out)
    return folder


def _run(gen, stop_after: int | None = None, stop: threading.Event | None = None):
    """Drive a safe_finetune generator to its result; set ``stop`` after ``stop_after`` progress items."""
    n = 0
    try:
        while True:
            next(gen)
            n += 1
            if stop_after is not None and n == stop_after:
                stop.set()
    except StopIteration as done:
        return done.value


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny start model, corrections of two regions (dark vs bright windows) and replay pairs of two others."""
    root = tmp_path_factory.mktemp("safe_ft")
    start = tiny_bundle(root / "start")
    level = {1: 30, 2: 225, 3: 90, 4: 160}
    pairs = _pairs(root / "export" / "pairs", start.regions, {1: 10, 2: 10}, level)
    replay = root / "replay"
    _pairs(replay / "plate_a", start.regions, {3: 12, 4: 12}, level, seed=1)
    _pairs(replay / "plate_b", start.regions, {1: 6, 2: 6}, level, seed=2)
    return {"root": root, "start": start, "pairs": pairs, "replay": replay}


@pytest.fixture(scope="module")
def shipped(world):
    target = world["root"] / "export" / "models" / "tiny-finetuned-1"
    return _run(safe_finetune(world["pairs"], [world["replay"]], target, world["start"], CONFIG,
                              min_steps_per_epoch=10))


@pytest.mark.parametrize("counts, held", [
    ({"a": 1}, {"a": 0}),                       # one pair: never held back
    ({"a": 2, "b": 1}, {"a": 1, "b": 0}),
    ({"a": 5, "b": 10, "c": 3}, {"a": 1, "b": 2, "c": 1}),
    ({"a": 12}, {"a": 2}),
])
def test_split_holds_back_a_fifth_of_each_caption(tmp_path, counts, held):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    write_pairs(src, [Pair(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), cap, {"k": i})
                      for cap, n in counts.items() for i in range(n)])
    images, captions, records, n_train = split_pairs(src, tmp_path / "train", 8)
    assert {c: captions.count(c) for c in counts} == held
    files, train_caps, train_recs = read_pairs(tmp_path / "train")
    assert n_train == len(files) == sum(counts.values()) - sum(held.values())
    assert {c: train_caps.count(c) for c in counts} == {c: counts[c] - held[c] for c in counts}
    assert images.shape == (len(captions), 8, 8, 3) and all("k" in r for r in records + train_recs)
    held_keys = {(c, r["k"]) for c, r in zip(captions, records)}
    assert not held_keys & {(c, r["k"]) for c, r in zip(train_caps, train_recs)}  # disjoint


@pytest.mark.parametrize("truth, pred, acc, f1", [
    ([1, 1, 2, 2], [1, 1, 2, 2], 1.0, 1.0),
    ([1, 1, 2, 2], [1, 1, 1, 1], 0.5, (2 / 3 + 0) / 2),
    ([1, 2, -1], [1, 2, 3], 2 / 3, 2 / 3),      # a region the model cannot name counts as wrong
    ([5, 5], [6, 6], 0.0, 0.0),
])
def test_held_out_score(truth, pred, acc, f1):
    s = held_out_score(np.array(truth), np.array(pred))
    assert s.accuracy == pytest.approx(acc) and s.macro_f1 == pytest.approx(f1) and s.n == len(truth)


@pytest.mark.parametrize("cand, start, better", [(0.8, 0.7, True), (0.7, 0.7, False), (0.6, 0.7, False)])
def test_only_strictly_better_ships(cand, start, better):
    assert strictly_better(HeldOutScore(0.5, cand, 4), HeldOutScore(0.5, start, 4)) is better


def test_replay_folders(world, tmp_path):
    assert replay_pair_folders(world["replay"]) == [world["replay"] / "plate_a", world["replay"] / "plate_b"]
    assert replay_pair_folders(world["replay"] / "plate_a") == [world["replay"] / "plate_a"]
    with pytest.raises(CytoclipError, match="holds no pair folders"):
        replay_pair_folders(tmp_path)


@pytest.mark.parametrize("replay", [[], None])
def test_refuses_without_replay(world, tmp_path, replay):
    target = tmp_path / "models" / "m"
    with pytest.raises(CytoclipError, match="Save taught model"):
        _run(safe_finetune(world["pairs"], replay, target, world["start"], CONFIG))
    assert not (tmp_path / "models").exists()


def test_refuses_the_corrections_as_their_own_replay(world, tmp_path):
    with pytest.raises(CytoclipError, match="also among the replay"):
        _run(safe_finetune(world["pairs"], [world["pairs"].parent], tmp_path / "m", world["start"], CONFIG))


def test_better_model_is_shipped_with_its_check(world, shipped):
    target = world["root"] / "export" / "models" / "tiny-finetuned-1"
    assert shipped.shipped and shipped.bundle is not None and shipped.bundle.path == target
    assert shipped.candidate.macro_f1 > shipped.start.macro_f1, shipped.summary()
    assert shipped.n_held == 4 and shipped.n_train == 16
    check = shipped.bundle.provenance["held_back_check"]
    assert check["n_held_back"] == 4 and check["finetuned"]["macro_f1"] == shipped.candidate.macro_f1
    assert shipped.bundle.name == target.name and shipped.bundle.provenance["n_pairs"] == 16
    assert shipped.bundle.provenance["n_replay_pairs"] == 36
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no candidate, no checkpoint


def test_a_model_that_is_not_better_is_discarded(world, shipped, tmp_path):
    """From the shipped model (already perfect on these pairs) a second fine-tune cannot beat it: discarded."""
    assert shipped.candidate.macro_f1 == 1.0  # precondition: nothing can be strictly better
    target = tmp_path / "models" / "again-1"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.txt").write_text("the user's")
    outcome = _run(safe_finetune(world["pairs"], [world["replay"]], target, shipped.bundle,
                                 TrainConfig(**{**CONFIG.__dict__, "epochs": 1})))
    assert not outcome.shipped and outcome.bundle is None
    assert outcome.start.macro_f1 == 1.0 and "not better" in outcome.summary()
    assert f"{outcome.start}" in outcome.summary() and f"{outcome.candidate}" in outcome.summary()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["mine.txt"]


def test_cancel_leaves_nothing(world, tmp_path):
    target = tmp_path / "models" / "cancelled-1"
    stop = threading.Event()
    with pytest.raises(Cancelled):
        _run(safe_finetune(world["pairs"], [world["replay"]], target, world["start"], CONFIG, stop),
             stop_after=2, stop=stop)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_too_few_pairs_to_hold_back(world, tmp_path):
    one_each = _pairs(tmp_path / "few" / "pairs", world["start"].regions, {1: 1, 2: 1}, {1: 30, 2: 225})
    with pytest.raises(CytoclipError, match="too few pairs"):
        _run(safe_finetune(one_each, [world["replay"]], tmp_path / "models" / "m", world["start"], CONFIG))
    assert not (tmp_path / "models").exists()
