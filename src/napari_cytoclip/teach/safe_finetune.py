"""Safe deep fine-tuning: with replay, checked on held-back corrections, shipped only when better.

:func:`safe_finetune` holds back about a fifth of the exported pairs of every caption, trains a
candidate bundle on the rest with replay pairs mixed into every batch (``train.train``), scores the
start model and the candidate on the held-back pairs (accuracy and macro-F1 against each pair's
corrected region) and moves the candidate into place only when its macro-F1 is strictly higher;
otherwise the candidate's files are deleted. Without replay pairs it refuses: fine-tuning on
corrections alone makes a model forget what it knew. Qt-free; the Export widget runs it in a worker.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import tempfile
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from napari_cytoclip.errors import Cancelled, CytoclipError
from napari_cytoclip.models.bundle import ModelBundle, load_bundle
from napari_cytoclip.teach.pairs import PAIRS_CSV, Pair, load_pair_images, read_pairs, write_pairs

HOLD_OUT = 0.2          # share of each caption's pairs held back to check the candidate
CANDIDATE_SUFFIX = ".candidate"
BUNDLE_FILES = ("cytoclip.json", "weights.safetensors")  # what train writes into a bundle folder
CHECKPOINT_FILES = ("last.pt", "best.pt", "text_features.pt", "last.pt.tmp", "best.pt.tmp", "cytoclip-train.json")
NO_REPLAY = ("fine-tuning on the corrections alone makes the model forget the regions you did not correct, so it "
             "needs replay pairs (pair folders of what the model learnt from, e.g. earlier exports); without them, "
             "use 'Save taught model' in the teach panel of 'Predict regions' (the fast learner) instead")


@dataclass
class HeldOutScore:
    """How a model labels the held-back pairs."""

    accuracy: float
    macro_f1: float
    n: int

    def __str__(self) -> str:
        return f"macro-F1 {self.macro_f1:.3f}, accuracy {self.accuracy:.3f}"


@dataclass
class FinetuneOutcome:
    """What :func:`safe_finetune` did: ``bundle`` is the new model when it was shipped, else None."""

    shipped: bool
    start: HeldOutScore
    candidate: HeldOutScore
    n_train: int
    n_held: int
    target: Path
    bundle: ModelBundle | None = None

    def summary(self) -> str:
        verdict = "better: kept" if self.shipped else "not better: discarded, the model in use is unchanged"
        return (f"On {self.n_held} held-back corrections the start model scores {self.start}, the fine-tuned one "
                f"{self.candidate} ({verdict}).")


# ---------------------------------------------------------------------------------------------
# replay folders and the held-back split

def replay_pair_folders(folder: str | Path) -> list[Path]:
    """The pair folders in ``folder``: itself when it holds ``pairs.csv``, else its sub-folders that do
    (e.g. an export folder's ``pairs/``, or ``replay/plate_*``); none is a CytoclipError."""
    folder = Path(folder)
    if (folder / PAIRS_CSV).is_file():
        return [folder]
    found = sorted(p for p in folder.iterdir() if (p / PAIRS_CSV).is_file()) if folder.is_dir() else []
    if not found:
        raise CytoclipError(folder, f"holds no pair folders (a folder with {PAIRS_CSV}, or sub-folders with one)")
    return found


def split_pairs(folder: str | Path, train_dir: str | Path, size: int, fraction: float = HOLD_OUT,
                seed: int = 0) -> tuple[np.ndarray, list[str], list[dict], int]:
    """Write all but ``fraction`` of each caption's pairs to the pair folder ``train_dir``; return the
    held-back pairs (images, captions, records) and the number written. A caption with one pair is
    never held back (its region would be missing from training)."""
    files, captions, records = read_pairs(folder)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(files), bool)
    for caption in dict.fromkeys(captions):
        idx = np.flatnonzero(np.asarray(captions) == caption)
        if len(idx) >= 2:
            held[rng.permutation(idx)[:max(1, int(round(fraction * len(idx))))]] = True
    images = load_pair_images(files, size)
    keep = np.flatnonzero(~held)
    write_pairs(train_dir, (Pair(images[i], captions[i], records[i]) for i in keep))
    take = np.flatnonzero(held)
    return images[take], [captions[i] for i in take], [records[i] for i in take], len(keep)


# ---------------------------------------------------------------------------------------------
# scoring

def true_ids(captions: Sequence[str], records: Sequence[dict], regions: Sequence[Any]) -> np.ndarray:
    """Each pair's region id among ``regions`` (corrected label, else region name, else a region made from its
    caption by training); -1 where the model has no such region (it always counts as wrong)."""
    from napari_cytoclip.teach.train import _class_key

    by_id = {r.id: r for r in regions}
    by_name = {r.name: r.id for r in regions}
    out = []
    for caption, record in zip(captions, records):
        kind, value = _class_key(caption, record, by_id, by_name)
        if kind == "id":
            out.append(value)
        else:
            out.append(next((r.id for r in regions if r.name == caption[:60] and caption in r.texts()), -1))
    return np.asarray(out, np.int64)


def score(model: Any, images: np.ndarray, captions: Sequence[str], records: Sequence[dict],
          batch: int = 64) -> HeldOutScore:
    """Accuracy and macro-F1 (over the regions among the pairs) of ``model`` (a loaded CytoClip) on windows,
    decoded as Predict decodes single cells: by a taught model's learner, else by the region texts."""
    regions = list(model.regions)
    truth = true_ids(captions, records, regions)
    pred = predicted_ids(model, images, batch)
    return held_out_score(truth, pred)


def predicted_ids(model: Any, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The region id ``model`` gives each uint8 window (no neighbour voting: pairs are single cells)."""
    learner = getattr(model, "learner", None)
    if learner is None:
        text = model.region_embeddings(model.regions)
        emb = np.concatenate([model.encode_windows(images[i:i + batch]) for i in range(0, len(images), batch)]) \
            if len(images) else np.zeros((0, text.shape[1]), np.float32)
        return np.asarray([r.id for r in model.regions], np.int64)[(emb @ text.T).argmax(1)] if len(emb) else \
            np.zeros(0, np.int64)
    from napari_cytoclip.teach.features import tower_features
    from napari_cytoclip.inference.taught_decode import class_prior
    from napari_cytoclip.models.taught import FEATURE_KIND, JOINT

    if learner.feature_kind not in (JOINT, FEATURE_KIND):
        raise CytoclipError(model.bundle.path, f"its learner uses '{learner.feature_kind}' features, which the "
                                               "held-back check cannot compute; fine-tune its base model instead")
    joint, feats = [], []
    for i in range(0, len(images), batch):
        if learner.feature_kind == JOINT:
            joint.append(model.encode_windows(images[i:i + batch]))
            feats.append(joint[-1])
        else:
            j, f = tower_features(model, images[i:i + batch])
            joint.append(j)
            feats.append(f)
    if not joint:
        return np.zeros(0, np.int64)
    joint_a = np.concatenate(joint)
    probs = learner.predict_proba(np.concatenate(feats), class_prior(learner, model.regions, model, joint_a))
    return np.asarray(learner.classes, np.int64)[probs.argmax(1)]


def held_out_score(truth: np.ndarray, pred: np.ndarray) -> HeldOutScore:
    """Accuracy and macro-F1 over the true classes (a class the model cannot name scores F1 0)."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    f1s = []
    for k in np.unique(truth):
        tp = int(np.sum((pred == k) & (truth == k)))
        precision, recall = tp / max(int(np.sum(pred == k)), 1), tp / max(int(np.sum(truth == k)), 1)
        f1s.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    return HeldOutScore(float(np.mean(pred == truth)) if len(truth) else 0.0,
                        float(np.mean(f1s)) if f1s else 0.0, int(len(truth)))


def strictly_better(candidate: HeldOutScore, start: HeldOutScore, tol: float = 1e-6) -> bool:
    """The shipping rule: a higher macro-F1 on the held-back pairs (a tie is not better)."""
    return candidate.macro_f1 > start.macro_f1 + tol


# ---------------------------------------------------------------------------------------------
# training in a helper thread, and cleaning up only our own files

def training_steps(pairs: Path | Sequence[Path], out: Path, init: Any, config: Any, stop: threading.Event,
                   replay_folders: Sequence[Path] | None = None) -> Generator:
    """Run ``train.train`` in a helper thread; yield its progress dicts; return the new bundle.

    Setting ``stop`` makes the next progress call raise ``Cancelled`` inside training, and the
    checkpoint folder is removed if this run created it (only training's own files in it).
    """
    from napari_cytoclip.teach.train import train

    folders = [Path(pairs)] if isinstance(pairs, (str, Path)) else [Path(p) for p in pairs]
    updates: queue.Queue = queue.Queue()
    result: dict = {}

    def progress(info: dict) -> None:
        if stop.is_set():
            raise Cancelled()
        updates.put(info)

    def work() -> None:
        try:
            result["bundle"] = train(folders, out, init=init, config=config, progress=progress,
                                     replay_folders=list(replay_folders or []))
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc
        finally:
            updates.put(None)

    ckpt = out.with_name(out.name + ".ckpt")
    ours = not os.path.lexists(ckpt)  # only a checkpoint folder this run creates may be removed
    thread = threading.Thread(target=work, daemon=True, name="cytoclip-finetune")
    thread.start()
    while (item := updates.get()) is not None:
        yield item
    thread.join()
    if "error" in result:
        if isinstance(result["error"], Cancelled) and ours:
            remove_checkpoint(ckpt)
        raise result["error"]
    return result["bundle"]


def _remove_files(folder: Path, names: Sequence[str]) -> None:
    """Delete the named regular files in ``folder``, then the folder if nothing else is left in it."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for name in names:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # fails, keeping it, when anything else is in it


def remove_checkpoint(ckpt: Path) -> None:
    """Delete the files training writes into ``ckpt``, then the folder if nothing else is left in it."""
    _remove_files(ckpt, CHECKPOINT_FILES)


def candidate_folder(target: Path) -> Path:
    return target.with_name(target.name + CANDIDATE_SUFFIX)


# ---------------------------------------------------------------------------------------------
# the whole run

def safe_finetune(pairs: str | Path, replay_folders: Sequence[str | Path], target: str | Path,
                  init: ModelBundle, config: Any, stop: threading.Event | None = None, *,
                  fraction: float = HOLD_OUT, min_steps_per_epoch: int = 1, seed: int = 0) -> Generator:
    """Generator: fine-tune ``init`` on ``pairs`` with replay, check, ship into ``target`` only if better.

    Yields ``train`` progress dicts (plus ``{"phase": ...}`` between stages); returns a
    :class:`FinetuneOutcome`. ``config.steps_per_epoch`` None: ``ceil(training pairs / batch)``, at
    least ``min_steps_per_epoch``. Raises :class:`CytoclipError` without replay folders or when no pair
    can be held back, ``Cancelled`` when ``stop`` is set (the candidate and its checkpoint are removed).
    """
    from napari_cytoclip.io.safe_files import atomic_write_text
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.teach.train import _folder_label

    pairs, target = Path(pairs), Path(target)
    stop = stop or threading.Event()
    if not replay_folders:
        raise CytoclipError(pairs, NO_REPLAY)
    replay = [f for folder in replay_folders for f in replay_pair_folders(folder)]
    if any(f.resolve() == pairs.resolve() for f in replay):
        raise CytoclipError(pairs, "is also among the replay folders; choose pairs of what the model learnt from")
    candidate = candidate_folder(target)
    for path in (target, candidate):
        if os.path.lexists(path):
            raise CytoclipError(path, "already exists; choose a new folder for the fine-tuned model")
    with tempfile.TemporaryDirectory(prefix="cytoclip-finetune-") as work:
        yield {"phase": "split"}
        train_dir = Path(work) / _folder_label(pairs)  # recorded in the bundle as the export folder's pairs
        images, captions, records, n_train = split_pairs(pairs, train_dir, init.input.size, fraction, seed)
        if not len(images):
            raise CytoclipError(pairs, "too few pairs to check a fine-tuned model: export at least two corrected "
                                       "cells of a region, so that one can be held back")
        if config.steps_per_epoch is None:
            config = replace(config, steps_per_epoch=max(min_steps_per_epoch, math.ceil(n_train / config.batch_size)))
        try:
            trained = yield from training_steps(train_dir, candidate, init, config, stop, replay)
            if stop.is_set():
                raise Cancelled()
            yield {"phase": "scoring", "n_held": len(images)}
            start = score(load_model(init, device=config.device), images, captions, records)
            if stop.is_set():
                raise Cancelled()
            new = score(load_model(trained, device=config.device), images, captions, records)
            shipped = strictly_better(new, start)
            outcome = FinetuneOutcome(shipped, start, new, n_train, len(images), target)
            if not shipped:
                return outcome
            meta = json.loads((candidate / "cytoclip.json").read_text(encoding="utf-8"))
            meta["name"] = target.name
            meta.setdefault("provenance", {})["held_back_check"] = {
                "rule": "kept only with a strictly higher macro-F1 than the start model on held-back corrections",
                "fraction": fraction, "seed": seed, "n_held_back": len(images), "n_train_pairs": n_train,
                "start": asdict(start), "finetuned": asdict(new)}
            atomic_write_text(candidate / "cytoclip.json", json.dumps(meta, indent=1))
            if os.path.lexists(target):
                raise CytoclipError(target, "appeared while fine-tuning; the new model was not moved there")
            os.replace(candidate, target)
            outcome.bundle = load_bundle(target)
            return outcome
        finally:
            _remove_files(candidate, BUNDLE_FILES)  # a rejected, cancelled or failed candidate
