"""Contrastive training and fine-tuning from pair folders, with a locked text tower.

Each class (a region id from the pairs' provenance, else a distinct caption) is represented by
the mean of its projected text embeddings (region prompts plus the captions seen for it), exactly
as prediction builds region embeddings. Images are pulled towards their class and pushed from
the others (CLIP's image-to-text loss without duplicate-caption negatives). The text trunk is
frozen, so its pooled features are computed once and cached; the image tower, both projections
and the temperature train. Checkpoints after every epoch make a killed run resume.

Fine-tuning on a few hundred corrected pairs alone makes a model forget what it knew; replay
folders (pairs of the data the start model learnt from) are mixed into every batch to prevent it.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from napari_cytoclip.models.bundle import ModelBundle, Region, load_bundle, save_bundle, validate_regions
from napari_cytoclip.errors import CytoclipError, OutputError
from napari_cytoclip.io.safe_files import atomic_write_text, atomic_write_with
from napari_cytoclip.models.model import (TEXT_TRUNK_PREFIX, build_open_clip, load_weights_into, pick_device,
                                          read_state_dict)
from napari_cytoclip.teach.pairs import load_pair_images, read_pairs


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: min(100, 10 % of all steps), so short fine-tunes warm up briefly
    seed: int = 0
    device: str = "auto"
    balance_power: float = 0.75     # sample classes with weight count**-power
    steps_per_epoch: int | None = None
    text_features: str | None = None  # cache file of pooled text-trunk features
    augment: bool = True
    label_smoothing: float = 0.1
    time_budget_s: float | None = None  # fit the number of epochs to this many seconds after epoch 1
    replay_ratio: float = 1.0        # replay pairs drawn per new pair in each batch (with replay folders)


@dataclass
class TrainData:
    images: np.ndarray               # uint8 (n, N, N, 3)
    targets: np.ndarray              # int64 class index per image
    regions: list[Region]            # one per class, in class order
    class_texts: list[list[str]]     # texts whose mean embedding represents each class
    sources: list[str] = field(default_factory=list)          # new pair folders, as recorded
    replay: np.ndarray | None = None  # bool per image: from a replay folder
    replay_sources: list[str] = field(default_factory=list)   # replay pair folders, as recorded
    class_keys: list[tuple] = field(default_factory=list)     # ("id", region id) or ("caption", text) per class
    folders: list[dict] = field(default_factory=list)         # per folder: label, pair count, content hash


def _class_key(caption: str, record: dict, by_id: dict, by_name: dict) -> tuple:
    """A pair's class: its region by id (else by name) in the bundle's vocabulary, else its caption."""
    rid = record.get("corrected_label", record.get("region_id"))
    try:
        if rid is not None and int(rid) in by_id:
            return ("id", int(rid))
    except (TypeError, ValueError):
        pass
    name = record.get("region_name")
    if isinstance(name, str) and name in by_name:
        return ("id", by_name[name])
    return ("caption", caption)


def assemble(folders: list[str | Path], regions: list[Region], size: int,
             replay_folders: list[str | Path] | None = None, like: TrainData | None = None) -> TrainData:
    """Pairs from folders (then replay folders), mapped to classes by region, never by folder order.

    Classes are the bundle's regions that occur (in the bundle's order), then new captions (in order
    of appearance). With ``like`` (the training data), its classes come first in its order, so that
    validation targets index the classes the model is trained on; classes it lacks are appended.
    """
    by_id = {r.id: r for r in regions}
    by_name = {r.name: r.id for r in regions}
    files, captions, records, replay, counts = [], [], [], [], []
    replay_folders = list(replay_folders or [])
    for i, folder in enumerate(list(folders) + replay_folders):
        f, c, r = read_pairs(folder)
        files += f
        captions += c
        records += r
        counts.append(len(f))
        replay += [i >= len(folders)] * len(f)
    if not any(not r for r in replay):
        raise CytoclipError(", ".join(map(str, folders)), "no training pairs found")
    keys = [_class_key(c, r, by_id, by_name) for c, r in zip(captions, records)]
    order = [r.id for r in regions]
    seen = dict.fromkeys(keys)
    class_keys = list(like.class_keys) if like is not None else []
    class_keys += sorted((k for k in seen if k[0] == "id" and k not in class_keys), key=lambda k: order.index(k[1]))
    class_keys += [k for k in seen if k[0] == "caption" and k not in class_keys]
    known = {k: r for k, r in zip(like.class_keys, like.regions)} if like is not None else {}
    next_id = max([r.id for r in regions] + [r.id for r in known.values()] + [0]) + 1
    classes: list[Region] = []
    for key in class_keys:
        if key in known:
            classes.append(known[key])
        elif key[0] == "id":
            classes.append(by_id[key[1]])
        else:
            classes.append(Region(next_id, key[1][:60], "", "#808080", key[1], (key[1],)))
            next_id += 1
    index = {k: i for i, k in enumerate(class_keys)}
    targets = np.asarray([index[k] for k in keys], np.int64)
    extra_captions: dict[int, list[str]] = {}
    for cap, k in zip(captions, targets.tolist()):
        extra_captions.setdefault(k, [])
        if cap not in extra_captions[k]:
            extra_captions[k].append(cap)
    texts = [list(dict.fromkeys(classes[k].texts() + extra_captions.get(k, []))) for k in range(len(classes))]
    images = load_pair_images(files, size)
    info, start = [], 0
    for i, (folder, n) in enumerate(zip(list(folders) + replay_folders, counts)):
        h = hashlib.sha256(json.dumps([captions[start:start + n], [list(k) for k in keys[start:start + n]]]).encode())
        h.update(images[start:start + n].tobytes())
        info.append({"folder": _folder_label(folder), "n_pairs": n, "sha256": h.hexdigest()[:16],
                     **({"replay": True} if i >= len(folders) else {})})
        start += n
    return TrainData(images, targets, classes, texts, [_folder_label(f) for f in folders],
                     np.asarray(replay, bool), [_folder_label(f) for f in replay_folders], class_keys, info)


def _folder_label(folder: str | Path) -> str:
    """A pair folder as recorded in a bundle: its name (with its parent's when it is just ``pairs``)."""
    folder = Path(folder)
    return f"{folder.parent.name}/{folder.name}" if folder.name == "pairs" and folder.parent.name else folder.name


def sample_order(data: TrainData, steps: int, batch_size: int, replay_ratio: float, power: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Image indices for ``steps`` batches: class-balanced within new and replay pairs, mixed per batch.

    Each batch holds ``round(batch_size / (1 + replay_ratio))`` new pairs (at least one) and replay
    pairs for the rest; without replay pairs every draw is a new pair.
    """
    replay = data.replay if data.replay is not None else np.zeros(len(data.targets), bool)
    new_idx, old_idx = np.flatnonzero(~replay), np.flatnonzero(replay)
    n_new = _new_per_batch(data, batch_size, replay_ratio)

    def draw(pool: np.ndarray, k: int) -> np.ndarray:
        counts = np.bincount(data.targets[pool], minlength=len(data.regions)).astype(np.float64)
        w = counts[data.targets[pool]] ** -power
        return rng.choice(pool, size=(steps, k), p=w / w.sum())

    parts = [draw(new_idx, n_new)]
    if n_new < batch_size:
        parts.append(draw(old_idx, batch_size - n_new))
    return np.concatenate(parts, axis=1).reshape(-1)


def _new_per_batch(data: TrainData, batch_size: int, replay_ratio: float) -> int:
    """How many new (not replay) pairs each batch holds."""
    if data.replay is None or not data.replay.any() or replay_ratio <= 0:
        return batch_size
    return min(batch_size, max(1, int(round(batch_size / (1.0 + replay_ratio)))))


def pooled_text_features(model, tokenizer, texts: list[str], cache: Path | None, batch: int = 64,
                         allow_compute: bool = True) -> dict:
    """Frozen text-trunk features for ``texts`` (before the trainable projection), cached on disk."""
    import torch

    known: dict = {}
    if cache is not None and cache.is_file():
        known = _load_checkpoint(cache, "text feature cache")
    todo = [t for t in dict.fromkeys(texts) if t not in known]
    if todo and not allow_compute:
        raise CytoclipError(cache, f"{len(todo)} texts lack cached features and the text tower weights are absent")
    if todo:
        text = getattr(model, "text", None)
        model.eval()
        with torch.inference_mode():
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                tok = tokenizer(chunk)
                if hasattr(text, "pooler"):  # Hugging Face tower
                    mask = (tok != text.config.pad_token_id).long()
                    out = text.transformer(input_ids=tok, attention_mask=mask)
                    feats = text.pooler(out, mask)
                else:  # open_clip's own text transformer, frozen end to end
                    feats = model.encode_text(tok)
                for t, f in zip(chunk, feats.float()):
                    known[t] = f.clone()
        if cache is not None:
            atomic_write_with(cache, lambda tmp: torch.save(known, tmp))
    return {t: known[t] for t in texts}


def _text_projection(model):
    """The trainable text projection of a Hugging Face tower; native towers stay frozen whole."""
    text = getattr(model, "text", None)
    return text.proj if hasattr(text, "pooler") and hasattr(text, "proj") else (lambda x: x)


def augment(x, generator):
    """Random dihedral transform, brightness/contrast/gamma, blur and noise on float [0,1] NCHW."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    k = int(torch.randint(0, 4, (1,), generator=generator).item())
    x = torch.rot90(x, k, dims=(2, 3))
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    rnd = lambda lo, hi: (lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=generator)).to(x.device)
    x = x.clamp(1e-4, 1).pow(rnd(0.7, 1.4))
    x = (x - 0.5) * rnd(0.7, 1.3) + 0.5 + rnd(-0.1, 0.1)
    blur = (torch.rand(n, generator=generator) < 0.2).view(-1, 1, 1, 1).to(x.device)
    x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
    x = x + 0.02 * torch.randn_like(x)
    return x.clamp(0, 1)


def _normalise(x, mean, std):
    return (x - mean) / std


CKPT_MARKER = "cytoclip-train.json"   # written by train into its checkpoint folder: the folder is train's own
CKPT_FILES = ("last.pt", "best.pt", "text_features.pt", "last.pt.tmp", "best.pt.tmp", CKPT_MARKER)
_clock = time.perf_counter  # epoch timing (the time budget); one call at the start and one at the end of an epoch


def train(pair_folders: list[str | Path], out: str | Path, init: str | Path | ModelBundle,
          config: TrainConfig | None = None, val_folders: list[str | Path] | None = None,
          progress: Callable[[dict], None] | None = None, init_state: dict | None = None,
          replay_folders: list[str | Path] | None = None) -> ModelBundle:
    """Train or fine-tune ``init`` on pair folders; write a new bundle to ``out``.

    ``replay_folders`` (pairs the init model learnt from) are mixed into every batch,
    ``config.replay_ratio`` replay pairs per new pair, so that fine-tuning does not forget;
    an epoch is one pass over the new pairs. ``init_state`` replaces the init bundle's weights
    (e.g. an ImageNet image tower for a new model). A checkpoint folder ``<out>.ckpt`` (marked as
    train's own by ``cytoclip-train.json``; the latest epoch, plus the best one when validating) is
    kept until the bundle is written; rerunning resumes from it, with the same time budget and
    learning-rate schedule. A ``<out>.ckpt`` without the marker is refused, never used or deleted.
    """
    import torch

    config = replace(config or TrainConfig())
    out = Path(out)
    if out.exists():
        raise CytoclipError(out, "already exists; choose a new folder for the trained model")
    ckpt_dir = out.with_name(out.name + ".ckpt")
    _claim_checkpoint_folder(ckpt_dir, create=False)
    bundle = init if isinstance(init, ModelBundle) else load_bundle(init)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    model, tokenizer = build_open_clip(bundle, load_text_weights=_text_weights_available(bundle))
    state = init_state if init_state is not None else read_state_dict(bundle.weights_path)
    if init_state is None:
        load_weights_into(model, state, bundle.weights_path, text_from_package=bundle.text_tower is not None)
    else:
        model.load_state_dict(state, strict=False)
    if config.replay_ratio < 0:
        raise ValueError(f"the replay ratio must be at least 0, got {config.replay_ratio}")
    data = assemble(pair_folders, bundle.regions, bundle.input.size, replay_folders)
    val = assemble(val_folders, bundle.regions, bundle.input.size, like=data) if val_folders else None
    all_texts = sorted({t for texts in data.class_texts for t in texts})
    _claim_checkpoint_folder(ckpt_dir, create=True)
    cache = Path(config.text_features) if config.text_features else ckpt_dir / "text_features.pt"
    missing_ok = _text_weights_available(bundle)
    feats = pooled_text_features(model, tokenizer, all_texts, cache, allow_compute=missing_ok)
    text_feats = [torch.stack([feats[t] for t in texts]).to(device) for texts in data.class_texts]

    for p in model.parameters():
        p.requires_grad = False
    trainable = list(model.visual.parameters()) + [model.logit_scale]
    proj = _text_projection(model)
    if isinstance(proj, torch.nn.Module):
        trainable += list(proj.parameters())
    for p in trainable:
        p.requires_grad = True
    model.to(device)
    model.visual.train()
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.ndim > 1], "weight_decay": config.weight_decay},
                             {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}], lr=config.lr)
    n_new = int((~data.replay).sum())
    per_batch = _new_per_batch(data, config.batch_size, config.replay_ratio)
    steps_per_epoch = config.steps_per_epoch or max(1, n_new // per_batch)
    run = _resume(ckpt_dir, model, opt, steps_per_epoch)
    # a time budget fixes the number of epochs once, after the first epoch; a resumed run keeps that number
    epochs = run["fitted_epochs"] if config.time_budget_s and run.get("fitted_epochs") else config.epochs
    total_steps = steps_per_epoch * epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else warmup_for(steps_per_epoch * config.epochs)
    images = torch.from_numpy(data.images).to(device)
    mean = torch.tensor(bundle.input.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.input.std, device=device).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(config.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    best, history = run["best"], run["history"]
    epoch, global_step, elapsed = run["epoch"], run["global_step"], run["elapsed_s"]
    while epoch < epochs:
        order = sample_order(data, steps_per_epoch, config.batch_size, config.replay_ratio, config.balance_power,
                             np.random.default_rng(config.seed + epoch))
        t0, losses = _clock(), []
        for step in range(steps_per_epoch):
            lr = config.lr * min(1.0, (global_step + 1) / max(1, warmup)) * \
                0.5 * (1 + math.cos(math.pi * global_step / max(1, total_steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.from_numpy(order[step * config.batch_size:(step + 1) * config.batch_size]).to(device)
            x = images[idx].permute(0, 3, 1, 2).float().div_(255)
            if config.augment:
                x = augment(x, gen)
            x = _normalise(x, mean, std).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(data.targets[order[step * config.batch_size:(step + 1) * config.batch_size]]).to(device)
            with amp:
                img = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            cls = _class_embeddings(proj, text_feats)
            logits = model.logit_scale.exp().clamp(max=100) * img @ cls.T
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            global_step += 1
            losses.append(float(loss.item()))
            if progress and (step % 20 == 0 or step == steps_per_epoch - 1):
                progress({"epoch": epoch, "step": step, "steps": steps_per_epoch, "epochs": epochs,
                          "global_step": global_step, "lr": lr, "loss": float(np.mean(losses[-20:]))})
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": _clock() - t0}
        elapsed += metrics["seconds"]
        if val is not None:
            metrics.update(_validate(model, proj, text_feats, val, mean, std, device))
        history.append(metrics)
        if config.time_budget_s and epoch == 0:
            fit = max(1, int(config.time_budget_s // max(metrics["seconds"], 1e-6)))
            if fit < epochs:
                epochs, run["fitted_epochs"] = fit, fit
                total_steps = steps_per_epoch * fit
        if progress:
            progress({"epoch_done": metrics})
        is_best = val is None or not best or metrics.get("val_macro_f1", 0) >= best.get("val_macro_f1", -1)
        if is_best:
            best = {**metrics, "history": history}
        epoch += 1
        _checkpoint(ckpt_dir, model, opt, {"epoch": epoch, "best": best, "history": history,
                                           "global_step": global_step, "elapsed_s": elapsed,
                                           "steps_per_epoch": steps_per_epoch,
                                           "fitted_epochs": run.get("fitted_epochs")}, is_best and val is not None)
    summary = {"steps_per_epoch": steps_per_epoch, "warmup_steps": warmup, "new_per_batch": per_batch,
               "epochs_run": epoch, "steps": global_step, "total_steps": total_steps, "train_seconds": elapsed}
    return _write_bundle(out, bundle, model, data, val, ckpt_dir, config, best, history, device, summary,
                         init_state is not None)


def _claim_checkpoint_folder(folder: Path, create: bool) -> None:
    """Refuse a checkpoint folder that train did not make; with ``create``, make it with its marker."""
    if folder.is_symlink() or (folder.exists() and not (folder / CKPT_MARKER).is_file()):
        raise OutputError(folder, f"exists but is not a napari-cytoclip training checkpoint (no {CKPT_MARKER}); "
                                  "move it away or choose another --out")
    if create and not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(folder, f"cannot create the checkpoint folder ({exc.strerror or exc})") from None
        atomic_write_text(folder / CKPT_MARKER, json.dumps({"napari_cytoclip": "training checkpoint",
                                                            "model": folder.name[:-len(".ckpt")]}) + "\n")


def _remove_checkpoint_folder(folder: Path) -> None:
    """Delete train's own files from its checkpoint folder, and the folder only when nothing else is left."""
    if folder.is_symlink() or not (folder / CKPT_MARKER).is_file():
        return
    for path in (folder / name for name in CKPT_FILES):
        if path.is_file() or path.is_symlink():
            path.unlink()
    try:
        folder.rmdir()
    except OSError:  # the user put something there: it stays, in its folder
        pass


def warmup_for(total_steps: int) -> int:
    """Default warmup: 100 steps, but no more than a tenth of a short run (at least one)."""
    return max(1, min(100, total_steps // 10))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _class_embeddings(proj, text_feats):
    import torch

    embs = []
    for f in text_feats:
        e = torch.nn.functional.normalize(proj(f).float(), dim=-1).mean(0)
        embs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.stack(embs)


def _validate(model, proj, text_feats, val: TrainData, mean, std, device) -> dict:
    """Accuracy and macro-F1 over the validation regions; ``val`` indexes the training classes first
    (see ``assemble(like=...)``), and its pairs of regions the model is not trained on count as errors."""
    import torch

    model.visual.eval()
    preds = []
    with torch.no_grad():
        cls = _class_embeddings(proj, text_feats)
        for i in range(0, len(val.targets), 1024):
            x = torch.from_numpy(val.images[i:i + 1024]).to(device).permute(0, 3, 1, 2).float().div_(255)
            x = _normalise(x, mean, std).contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
            with ctx:
                img = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            preds.append((img @ cls.T).argmax(1).cpu().numpy())
    model.visual.train()
    pred = np.concatenate(preds)
    truth = val.targets
    f1s = []
    for k in np.unique(truth):
        tp = np.sum((pred == k) & (truth == k))
        prec = tp / max(np.sum(pred == k), 1)
        rec = tp / max(np.sum(truth == k), 1)
        f1s.append(0 if tp == 0 else 2 * prec * rec / (prec + rec))
    return {"val_accuracy": float(np.mean(pred == truth)), "val_macro_f1": float(np.mean(f1s))}


def _own_state(model) -> dict:
    """The weights a checkpoint needs: all but the frozen text trunk (it comes from the init bundle)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(TEXT_TRUNK_PREFIX)}


def _checkpoint(folder: Path, model, opt, state: dict, save_best: bool) -> None:
    """Overwrite ``last.pt`` (and ``best.pt`` when ``save_best``): at most two checkpoints on disk.

    ``state`` holds the epoch count, best epoch, history, global step, elapsed seconds and the
    time-budget fit, so that a resumed run continues the same schedule and budget.
    """
    import torch

    torch.save({"model": _own_state(model), "opt": opt.state_dict(), **state}, folder / "last.pt.tmp")
    (folder / "last.pt.tmp").replace(folder / "last.pt")
    if save_best:
        torch.save(_own_state(model), folder / "best.pt.tmp")
        (folder / "best.pt.tmp").replace(folder / "best.pt")


def _load_checkpoint(path: Path, what: str) -> dict:
    """``torch.load`` of tensors only; anything else is a CytoclipError naming the file."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = "it holds Python objects, not only tensors (refused to unpickle)" \
            if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__ else f"{type(exc).__name__}"
        raise CytoclipError(path, f"cannot read this {what}: {kind}; delete it to start again") from None
    if not isinstance(data, dict):
        raise CytoclipError(path, f"cannot read this {what}: not a dictionary; delete it to start again")
    return data


def _resume(folder: Path, model, opt, steps_per_epoch: int) -> dict:
    """Load ``last.pt`` into model and optimiser; returns where the run stands (a fresh start without one)."""
    last = folder / "last.pt"
    if not last.is_file():
        return {"epoch": 0, "global_step": 0, "elapsed_s": 0.0, "best": {}, "history": [], "fitted_epochs": None}
    ck = _load_checkpoint(last, "training checkpoint")
    try:
        missing, unexpected = model.load_state_dict(ck["model"], strict=False)
        if unexpected or any(not k.startswith(TEXT_TRUNK_PREFIX) for k in missing):
            raise ValueError(f"{len(missing)} missing and {len(unexpected)} unexpected weights")
        if int(ck.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
            raise ValueError(f"it has {ck['steps_per_epoch']} steps per epoch, this run {steps_per_epoch}")
        opt.load_state_dict(ck["opt"])
        epoch, history = int(ck["epoch"]), list(ck.get("history", []))
        return {"epoch": epoch, "global_step": int(ck.get("global_step", epoch * steps_per_epoch)),
                "elapsed_s": float(ck.get("elapsed_s", sum(h.get("seconds", 0.0) for h in history))),
                "best": {**ck.get("best", {}), "history": history}, "history": history,
                "fitted_epochs": int(ck["fitted_epochs"]) if ck.get("fitted_epochs") else None}
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CytoclipError(last, f"this checkpoint does not fit the model being trained ({str(exc)[:200]}); "
                            "delete it to start again") from None


def _text_weights_available(bundle: ModelBundle) -> bool:
    from napari_cytoclip.models.bundle import resolve_text_tower

    folder = resolve_text_tower(bundle.text_tower, bundle.path)
    return folder is None or any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))


def _write_bundle(out: Path, bundle: ModelBundle, model, data: TrainData, val: TrainData | None, ckpt_dir: Path,
                  config: TrainConfig, best: dict, history: list, device, run: dict, new_weights: bool) -> ModelBundle:
    state = {k: v for k, v in model.state_dict().items()}
    best_file = ckpt_dir / "best.pt"
    if best_file.is_file():
        state.update(_load_checkpoint(best_file, "best-epoch checkpoint"))
    if bundle.text_tower is not None:
        state = {k: v for k, v in state.items() if not k.startswith(TEXT_TRUNK_PREFIX)}
    regions = _merge_regions(bundle.regions, data.regions)
    validate_regions(regions, out)
    new = ModelBundle(**{k: getattr(bundle, k) for k in bundle.__dataclass_fields__})
    new.regions, new.path, new.weights_path = regions, None, None
    new.name = out.name
    new.provenance = training_provenance(bundle, data, val, config, best, history, device, run, new_weights)
    saved = save_bundle(new, state, out)
    _remove_checkpoint_folder(ckpt_dir)
    return saved


def training_provenance(parent: ModelBundle, data: TrainData, val: TrainData | None, config: TrainConfig,
                        best: dict, history: list, device, run: dict, new_weights: bool = False) -> dict:
    """What a trained bundle records about itself, all from this run; the init bundle's own record is
    kept apart under ``parent`` (its claims, such as test metrics, are not this model's)."""
    import open_clip
    import torch

    from napari_cytoclip import __version__

    cfg = asdict(config)
    if cfg.get("text_features"):
        cfg["text_features"] = Path(cfg["text_features"]).name
    weights = "new" if new_weights or not parent.weights_path else parent.weights_hash()
    n_replay = int(data.replay.sum()) if data.replay is not None else 0
    hardware = {"device": str(device), "machine": platform.machine(), "processor": platform.processor() or None,
                "torch_threads": torch.get_num_threads()}
    if getattr(device, "type", "") == "cuda":
        hardware.update(gpu=torch.cuda.get_device_name(device), autocast="bfloat16")
    selection = {"by": "highest val_macro_f1 (the later epoch on ties)", "on": [f["folder"] for f in val.folders],
                 "n_val_pairs": int(len(val.targets))} if val is not None else {"by": "last epoch (no validation)"}
    prov = {
        "produced_by": "napari_cytoclip.teach.train", "trained_from": parent.name, "init_weights": weights,
        "pairs": data.sources, "n_pairs": int(len(data.targets)) - n_replay,
        **({"replay": data.replay_sources, "n_replay_pairs": n_replay} if n_replay else {}),
        "data": [f for f in data.folders] + ([{**f, "validation": True} for f in val.folders] if val else []),
        "config": {**cfg, **{k: run[k] for k in ("steps_per_epoch", "warmup_steps", "new_per_batch")}},
        "epochs_run": run["epochs_run"], "steps": run["steps"], "total_steps": run["total_steps"],
        "selected_epoch": best.get("epoch"), "selection": selection, "history": history,
        "device": str(device), "hardware": hardware,
        "software": {"napari_cytoclip": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "time": {"finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "train_seconds": round(float(run["train_seconds"]), 3)},
        "parent": {"name": parent.name, "weights": weights, "provenance": parent.provenance},
    }
    return json.loads(json.dumps(prov, default=_plain))


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def _merge_regions(old: list[Region], trained: list[Region]) -> list[Region]:
    ids = {r.id for r in old}
    return list(old) + [r for r in trained if r.id not in ids]


def history_json(bundle: ModelBundle) -> str:
    return json.dumps(bundle.provenance.get("history", []), indent=1)
