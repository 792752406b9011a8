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

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .bundle import ModelBundle, Region, load_bundle, save_bundle, validate_regions
from .errors import CytoclipError
from .model import TEXT_TRUNK_PREFIX, build_open_clip, load_weights_into, pick_device, read_state_dict
from .pairs import load_pair_images, read_pairs


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
    num_threads: int | None = None
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


def assemble(folders: list[str | Path], regions: list[Region], size: int,
             replay_folders: list[str | Path] | None = None) -> TrainData:
    """Pairs from folders (then replay folders), mapped to classes: known region ids first, then new captions."""
    by_id = {r.id: r for r in regions}
    files, captions, records, replay = [], [], [], []
    replay_folders = list(replay_folders or [])
    for i, folder in enumerate(list(folders) + replay_folders):
        f, c, r = read_pairs(folder)
        files += f
        captions += c
        records += r
        replay += [i >= len(folders)] * len(f)
    if not any(not r for r in replay):
        raise CytoclipError(", ".join(map(str, folders)), "no training pairs found")
    classes: list[Region] = []
    index: dict = {}
    extra_captions: dict[int, list[str]] = {}
    next_id = max([r.id for r in regions] + [0]) + 1
    targets = []
    for cap, rec in zip(captions, records):
        rid = rec.get("corrected_label", rec.get("region_id"))
        key = ("id", int(rid)) if rid is not None and int(rid) in by_id else ("caption", cap)
        if key not in index:
            if key[0] == "id":
                region = by_id[key[1]]
            else:
                region = Region(next_id, cap[:60], "", "#808080", cap, (cap,))
                next_id += 1
            index[key] = len(classes)
            classes.append(region)
        k = index[key]
        targets.append(k)
        extra_captions.setdefault(k, [])
        if cap not in extra_captions[k]:
            extra_captions[k].append(cap)
    texts = [list(dict.fromkeys(classes[k].texts() + extra_captions.get(k, []))) for k in range(len(classes))]
    images = load_pair_images(files, size)
    return TrainData(images, np.asarray(targets, np.int64), classes, texts, [_folder_label(f) for f in folders],
                     np.asarray(replay, bool), [_folder_label(f) for f in replay_folders])


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
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(known, cache)
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


def train(pair_folders: list[str | Path], out: str | Path, init: str | Path | ModelBundle,
          config: TrainConfig | None = None, val_folders: list[str | Path] | None = None,
          progress: Callable[[dict], None] | None = None, init_state: dict | None = None,
          replay_folders: list[str | Path] | None = None) -> ModelBundle:
    """Train or fine-tune ``init`` on pair folders; write a new bundle to ``out``.

    ``replay_folders`` (pairs the init model learnt from) are mixed into every batch,
    ``config.replay_ratio`` replay pairs per new pair, so that fine-tuning does not forget;
    an epoch is one pass over the new pairs. ``init_state`` replaces the init bundle's weights
    (e.g. an ImageNet image tower for a new model). A checkpoint folder ``<out>.ckpt`` (the latest
    epoch, plus the best one when validating) is kept until the bundle is written; rerunning resumes from it.
    """
    import torch

    config = config or TrainConfig()
    out = Path(out)
    if out.exists():
        raise CytoclipError(out, "already exists; choose a new folder for the trained model")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
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
    val = assemble(val_folders, data.regions, bundle.input.size) if val_folders else None
    all_texts = sorted({t for texts in data.class_texts for t in texts})
    cache = Path(config.text_features) if config.text_features else out.with_name(out.name + ".ckpt") / "text_features.pt"
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
    total_steps = steps_per_epoch * config.epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else warmup_for(total_steps)
    ckpt_dir = out.with_name(out.name + ".ckpt")
    start_epoch, best = _resume(ckpt_dir, model, opt)
    images = torch.from_numpy(data.images).to(device)
    mean = torch.tensor(bundle.input.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(bundle.input.std, device=device).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(config.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    history = best.get("history", []) if best else []
    epoch = start_epoch
    while epoch < config.epochs:
        order = sample_order(data, steps_per_epoch, config.batch_size, config.replay_ratio, config.balance_power,
                             np.random.default_rng(config.seed + epoch))
        t0, losses = time.perf_counter(), []
        for step in range(steps_per_epoch):
            global_step = epoch * steps_per_epoch + step
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
            losses.append(float(loss.item()))
            if progress and (step % 20 == 0 or step == steps_per_epoch - 1):
                progress({"epoch": epoch, "step": step, "steps": steps_per_epoch, "loss": float(np.mean(losses[-20:]))})
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0}
        if val is not None:
            metrics.update(_validate(model, proj, text_feats, val, mean, std, device))
        history.append(metrics)
        if config.time_budget_s and epoch == start_epoch == 0:
            fit = max(1, int(config.time_budget_s // max(metrics["seconds"], 1e-6)))
            if fit < config.epochs:
                config.epochs = fit
                total_steps = steps_per_epoch * fit
        if progress:
            progress({"epoch_done": metrics})
        is_best = val is None or not best or metrics.get("val_macro_f1", 0) >= best.get("val_macro_f1", -1)
        if is_best:
            best = {**metrics, "history": history}
        _checkpoint(ckpt_dir, model, opt, epoch + 1, best, history, is_best and val is not None)
        epoch += 1
    run = {"steps_per_epoch": steps_per_epoch, "warmup_steps": warmup, "new_per_batch": per_batch}
    return _write_bundle(out, bundle, model, data, ckpt_dir, config, best, history, device, run)


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


def _checkpoint(folder: Path, model, opt, epoch: int, best: dict, history: list, save_best: bool) -> None:
    """Overwrite ``last.pt`` (and ``best.pt`` when ``save_best``): at most two checkpoints on disk."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "last.pt.tmp"
    torch.save({"model": _own_state(model), "opt": opt.state_dict(), "epoch": epoch,
                "best": best, "history": history}, tmp)
    tmp.replace(folder / "last.pt")
    if save_best:
        tmp = folder / "best.pt.tmp"
        torch.save(_own_state(model), tmp)
        tmp.replace(folder / "best.pt")


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


def _resume(folder: Path, model, opt) -> tuple[int, dict]:
    last = folder / "last.pt"
    if not last.is_file():
        return 0, {}
    ck = _load_checkpoint(last, "training checkpoint")
    try:
        missing, unexpected = model.load_state_dict(ck["model"], strict=False)
        if unexpected or any(not k.startswith(TEXT_TRUNK_PREFIX) for k in missing):
            raise ValueError(f"{len(missing)} missing and {len(unexpected)} unexpected weights")
        opt.load_state_dict(ck["opt"])
        return int(ck["epoch"]), {**ck.get("best", {}), "history": ck.get("history", [])}
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CytoclipError(last, f"this checkpoint does not fit the model being trained ({str(exc)[:200]}); "
                            "delete it to start again") from None


def _text_weights_available(bundle: ModelBundle) -> bool:
    from .bundle import resolve_text_tower

    folder = resolve_text_tower(bundle.text_tower, bundle.path)
    return folder is None or any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin"))


def _write_bundle(out: Path, bundle: ModelBundle, model, data: TrainData, ckpt_dir: Path, config: TrainConfig,
                  best: dict, history: list, device, run: dict) -> ModelBundle:
    import shutil

    import torch

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
    n_replay = int(data.replay.sum()) if data.replay is not None else 0
    cfg = asdict(config)
    if cfg.get("text_features"):
        cfg["text_features"] = Path(cfg["text_features"]).name
    new.provenance = {**bundle.provenance, "trained_from": bundle.name, "init_weights": bundle.weights_hash()
                      if bundle.weights_path else "new", "pairs": data.sources,
                      "n_pairs": int(len(data.targets)) - n_replay, "replay": data.replay_sources,
                      "n_replay_pairs": n_replay, "config": {**cfg, **run}, "selected_epoch": best.get("epoch"),
                      "history": history, "device": str(device)}
    if not n_replay:
        del new.provenance["replay"], new.provenance["n_replay_pairs"]
    saved = save_bundle(new, state, out)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return saved


def _merge_regions(old: list[Region], trained: list[Region]) -> list[Region]:
    ids = {r.id for r in old}
    return list(old) + [r for r in trained if r.id not in ids]


def history_json(bundle: ModelBundle) -> str:
    return json.dumps(bundle.provenance.get("history", []), indent=1)
