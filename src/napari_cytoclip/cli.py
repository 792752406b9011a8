"""The ``napari-cytoclip`` command: predict, export corrections, teach, train, evaluate and import models
without napari.

Errors a user can fix print one line, ``napari-cytoclip: error: <file>: <problem>``, and exit
with status 2 (a traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from napari_cytoclip.errors import Cancelled, CytoclipError, OutputError
from napari_cytoclip.outputs.naming import progress_bar, results_targets

PROG = "napari-cytoclip"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="CytoCLIP brain-region prediction for Nissl sections.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_teach(sub)
    _add_import_model(sub)
    return parser


def _add_common(p: argparse.ArgumentParser, model_help: str = "model bundle folder (default: the shipped model)"):
    p.add_argument("--model", type=Path, default=None, metavar="BUNDLE", help=model_help)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars (predict: print only the results folders)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict regions on section images")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    p.add_argument("--sample", action="store_true",
                   help="predict on the bundled sample (Allen Nissl plate 41, 7.17 um/px)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="results go to DIR/<image name>/")
    _add_common(p)
    p.add_argument("--pixel-size", type=float, default=None, metavar="UM", help="micrometres per pixel")
    p.add_argument("--plane", type=int, default=None, metavar="N",
                   help="for a stack (TIFF planes, GIF frames): predict on plane N, counted from 0 in row-major order")
    p.add_argument("--stride-um", type=float, default=None, metavar="UM", help="grid step (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
    p.add_argument("--full-resolution", action="store_true", help="also write labels on the image's pixel grid")
    p.add_argument("--overwrite", action="store_true", help="replace existing results folders")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS|local:N", help="run on a dask cluster")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on CPUs with native bf16 for convolutional towers, else fp32")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model on pair folders")
    p.add_argument("pairs", nargs="+", type=Path, metavar="PAIRS")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="new model bundle folder")
    p.add_argument("--init", type=Path, default=None, metavar="BUNDLE", help="start model (default: the shipped one)")
    p.add_argument("--epochs", type=int, default=10, metavar="N")
    p.add_argument("--batch-size", type=int, default=256, metavar="N")
    p.add_argument("--lr", type=float, default=1e-3, metavar="F")
    p.add_argument("--val", type=Path, nargs="+", default=None, metavar="PAIRS")
    p.add_argument("--replay", type=Path, nargs="+", default=None, metavar="PAIRS",
                   help="pair folders of the data the --init model learnt from, mixed into every batch so that "
                        "fine-tuning on a few corrections does not make it forget the rest")
    p.add_argument("--replay-ratio", type=float, default=1.0, metavar="R",
                   help="replay pairs drawn per new pair (default 1: half of every batch)")
    p.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                   help="optimiser steps per epoch (default: one pass over the new pairs)")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="learning-rate warmup (default: 100, or a tenth of all steps when fewer)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--time-budget-s", type=float, default=None, metavar="S")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model against label images")
    _add_common(p)
    p.add_argument("--images", type=Path, nargs="+", default=None, metavar="IMAGE")
    p.add_argument("--labels", type=Path, nargs="+", default=None, metavar="LABELS")
    p.add_argument("--allen-split", default=None, choices=["train", "val", "test"])
    p.add_argument("--data-dir", type=Path, default=None, help="Allen data folder (default: $CYTOCLIP_DATA, else ../shared/data beside the clone)")
    p.add_argument("--out", type=Path, required=True, metavar="REPORT", help="report folder")
    p.add_argument("--pixel-size", type=float, nargs="+", default=None, metavar="UM",
                   help="one value for all images or one per image")
    p.add_argument("--stride-um", type=float, default=None, metavar="UM")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")


def _add_export(sub) -> None:
    p = sub.add_parser("export-pairs", help="turn corrected labels into training pairs")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("labels", type=Path, metavar="LABELS",
                   help="corrected labels.tif on the prediction grid, or a label image of the image's size")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--prediction", type=Path, default=None, metavar="DIR", help="an earlier predict results folder")
    _add_common(p)
    p.add_argument("--pixel-size", type=float, default=None, metavar="UM")
    p.add_argument("--stride-um", type=float, default=None, metavar="UM")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
    p.add_argument("--full-resolution", action="store_true")
    p.add_argument("--regions", type=Path, default=None, metavar="REGIONS.csv",
                   help="names of the ids in LABELS (columns id, name; acronym, colour, description optional); "
                        "needed for ids the model does not know (new regions)")
    p.add_argument("--reviewed", action="store_true",
                   help="the whole section was checked: its unchanged cells count as confirmed")
    g = p.add_argument_group("tile geometry", "cut the tiles for another model (default: the current model's inputs)")
    g.add_argument("--tile-px", type=int, default=None, metavar="PX", help="tile side in pixels (e.g. 224)")
    g.add_argument("--tile-um", type=float, default=None, metavar="UM",
                   help="micrometres the tile covers (e.g. 224 at 1 um/px)")
    g.add_argument("--mode", default=None, choices=["rgb", "gray_scales"],
                   help="rgb: the section's own colours; gray_scales: grey windows of --scales-um as channels")
    g.add_argument("--scales-um", type=float, nargs="+", default=None, metavar="UM",
                   help="gray_scales: 1 or 3 window sizes")


def _add_import_model(sub) -> None:
    p = sub.add_parser("import-model", help="make a model bundle from an open_clip checkpoint (bring your own CytoCLIP)")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="what open_clip_train writes (epoch_N.pt) or a bare state dict (.pt, .safetensors)")
    arch = p.add_mutually_exclusive_group(required=True)
    arch.add_argument("--arch", default=None, metavar="NAME", help="open_clip architecture name (e.g. ViT-B-32, RN50)")
    arch.add_argument("--config", type=Path, default=None, metavar="MODEL_CONFIG.json",
                      help="open_clip model config (embed_dim, vision_cfg, text_cfg) or open_clip_config.json")
    p.add_argument("--regions", type=Path, required=True, metavar="REGIONS.csv",
                   help="columns id, name (acronym, color, description, prompts optional), as predict's regions.csv")
    p.add_argument("--tile-um", type=float, required=True, metavar="UM",
                   help="micrometres a tile covers (with --scales-um: the square each prediction labels)")
    p.add_argument("--tile-px", type=int, default=None, metavar="PX",
                   help="tile side in pixels (default: the architecture's image size)")
    p.add_argument("--mode", default="rgb", choices=["rgb", "gray_scales"])
    p.add_argument("--scales-um", type=float, nargs="+", default=None, metavar="UM",
                   help="gray_scales: 1 or 3 window sizes stacked as channels")
    p.add_argument("--polarity", default="brightfield", choices=["brightfield", "darkfield"])
    p.add_argument("--stride-um", type=float, default=None, metavar="UM", help="default grid step (default: --tile-um)")
    p.add_argument("--name", default=None, help="model name (default: the checkpoint's file name)")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE", help="new model bundle folder")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _add_teach(sub) -> None:
    p = sub.add_parser("teach", help="fit the live learner on exported corrections (seconds on CPU)")
    p.add_argument("folders", nargs="+", type=Path, metavar="FOLDER", help="export-pairs folders")
    p.add_argument("--init", type=Path, default=None, metavar="BUNDLE",
                   help="base model (default: the shipped one); a taught bundle's teaching set is extended")
    p.add_argument("--out", type=Path, required=True, metavar="NEW_BUNDLE", help="new taught model bundle folder")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="print only the new bundle folder")


# ---------------------------------------------------------------------------------------------



def _model(args, path: Path | None):
    from napari_cytoclip.models.model import load_model

    _quiet_libraries(args)
    return load_model(path, device=args.device, precision=getattr(args, "precision", "auto"))


def _predict_one(section, model, args, desc: str):
    """Run prediction with a tqdm bar fed by :func:`predict.predict_iter`."""
    from napari_cytoclip.inference.predict import predict_iter

    gen = predict_iter(section, model, stride_um=args.stride_um, batch_size=args.batch_size)
    bar = None
    try:
        while True:
            res = next(gen)
            if bar is None:
                bar = progress_bar(res.total, desc, args.quiet)
            bar.update(res.done - bar.n)
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()  # stops the reader thread on an error or Ctrl-C
        if bar is not None:
            bar.close()


def cmd_predict(args) -> int:
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder
    from napari_cytoclip.io.sections import open_section

    _check_batch(args.batch_size)
    if args.sample:
        from napari_cytoclip.io.sample_data import SAMPLE_DIR, plate_41_info

        info = plate_41_info()
        args.images = [*args.images, SAMPLE_DIR / info["image"]]
        args.pixel_size = float(info["pixel_size_um"]) if args.pixel_size is None else args.pixel_size
    if not args.images:
        raise ValueError("give at least one IMAGE (or --sample)")
    if args.plane is not None and args.plane < 0:
        raise ValueError(f"--plane must be at least 0, got {args.plane}")
    targets = results_targets(args.images, args.out, args.overwrite)
    if args.scheduler:
        if args.model is not None and _bundle(args.model).taught:
            raise CytoclipError(args.model, "a taught model does not run with --scheduler yet; predict without it")
        if args.plane is not None:
            raise ValueError("--plane cannot be combined with --scheduler")
        return _predict_distributed(args)
    model = _model(args, args.model)
    for image, target in zip(args.images, targets):
        section = open_section(image, pixel_size_um=args.pixel_size, plane=args.plane)
        try:
            section.require_pixel_size()
            prediction = _predict_one(section, model, args, image.name)
            write_prediction_folder(prediction, section, target, overwrite=args.overwrite,
                                    full_resolution=args.full_resolution)
        finally:
            section.close()
        _print_result(target, args.quiet)
    return 0


def _print_result(target: Path, quiet: bool) -> None:
    """The results folder, then (unless ``quiet``) what was found and how to open it."""
    from napari_cytoclip.outputs.prediction_folder import results_summary

    print(target, flush=True)
    if not quiet:
        try:
            print(results_summary(target), flush=True)
        except Exception:  # noqa: BLE001 - the results are written; only the summary could not be read back
            pass


def _check_batch(n: int) -> None:
    if n < 1:
        raise ValueError(f"--batch-size must be at least 1, got {n}")




def _predict_distributed(args) -> int:
    try:
        from napari_cytoclip.inference.distributed import predict_many
    except ImportError as exc:
        raise CytoclipError(None, f"--scheduler needs napari_cytoclip.inference.distributed, which is not available ({exc})") \
            from None
    targets = predict_many(args.images, args.out, model=args.model, scheduler=args.scheduler,
                           pixel_size_um=args.pixel_size, stride_um=args.stride_um, batch_size=args.batch_size,
                           device=args.device, precision=args.precision, full_resolution=args.full_resolution,
                           overwrite=args.overwrite)
    for target in targets:
        _print_result(target, args.quiet)
    return 0


def cmd_train(args) -> int:
    from napari_cytoclip.teach.train import TrainConfig, train

    if args.out.exists():
        raise OutputError(args.out, "already exists; choose a new folder for the trained model")
    bundle = _bundle(args.init)
    for name in ("epochs", "batch_size", "steps_per_epoch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be at least 0, got {args.warmup_steps}")
    if args.replay_ratio < 0:
        raise ValueError(f"--replay-ratio must be at least 0, got {args.replay_ratio}")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=args.device, time_budget_s=args.time_budget_s, replay_ratio=args.replay_ratio,
                         steps_per_epoch=args.steps_per_epoch, warmup_steps=args.warmup_steps)
    bar = progress_bar(None, "train", args.quiet, unit="step")
    _quiet_libraries(args)

    def progress(info: dict) -> None:
        if "epoch_done" in info:
            m = info["epoch_done"]
            bar.write(f"epoch {m['epoch']}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()
                                                          if k != "epoch" and isinstance(v, (int, float))))
            return
        if bar.total != info["steps"] or info["step"] + 1 < bar.n:
            bar.reset(total=info["steps"])
        bar.set_description(f"epoch {info['epoch'] + 1}/{info.get('epochs', config.epochs)}")
        bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
        bar.update(info["step"] + 1 - bar.n)

    try:
        result = train(args.pairs, args.out, bundle, config, val_folders=args.val, progress=progress,
                       replay_folders=args.replay)
    finally:
        bar.close()
    print(result.path, flush=True)
    return 0


def cmd_evaluate(args) -> int:
    import json

    from napari_cytoclip.teach.evaluate import evaluate, evaluate_allen_split

    if (args.images is None) == (args.allen_split is None):
        raise ValueError("give either --images with --labels, or --allen-split")
    model = _model(args, args.model)
    kwargs = dict(stride_um=args.stride_um, overwrite=args.overwrite, batch_size=args.batch_size,
                  progress=None if args.quiet else _ImageProgress())
    if args.allen_split:
        report = evaluate_allen_split(model, args.allen_split, data_dir=args.data_dir, out=args.out, **kwargs)
    else:
        if not args.labels or len(args.labels) != len(args.images):
            raise ValueError(f"--labels needs one label image per image ({len(args.images)})")
        sizes = _pixel_sizes(args.pixel_size, len(args.images))
        report = evaluate(model, args.images, args.labels, args.out, pixel_sizes=sizes, **kwargs)
    print(json.dumps({k: report[k] for k in ("macro_f1", "accuracy") if k in report}), flush=True)
    return 0


class _ImageProgress:
    """``progress(done, total, name)`` callback that draws a tqdm bar per image."""

    def __init__(self):
        self.bar = None
        self.name = None

    def __call__(self, done: int, total: int, name: str = "") -> None:
        if self.bar is None or name != self.name:
            if self.bar is not None:
                self.bar.close()
            self.bar, self.name = progress_bar(total, name, False), name
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


def _pixel_sizes(values: list[float] | None, n: int) -> list[float] | None:
    if values is None:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"--pixel-size takes one value or one per image ({n}), got {len(values)}")
    return values


def cmd_export(args) -> int:
    from napari_cytoclip.teach.export import export_corrections, labels_on_grid, read_label_image

    _check_batch(args.batch_size)
    labels = read_label_image(args.labels)  # fail early, before any prediction
    table = _regions_table(args, labels)
    prediction, section, bundle = _prediction_for_export(args)
    try:
        edited = labels_on_grid(labels, prediction.grid, section.shape, source=args.labels)
        regions = _export_regions(args, edited, prediction.regions, table)
        confirmed = np.ones(edited.shape, bool) if args.reviewed else None
        features, rows = _export_features(args, prediction, section, edited, confirmed)
        result = export_corrections(section, prediction, edited, args.out, bundle, confirmed=confirmed,
                                    regions=regions, full_resolution=args.full_resolution, features=features,
                                    feature_rows=rows, geometry=_export_geometry(args, bundle),
                                    labels_source=args.labels)
    finally:
        section.close()
    print(f"{result.folder}: {result.pairs_added} pairs added, {result.pairs_existing} already there "
          f"({result.corrected_cells} corrected, {result.confirmed_cells} confirmed cells; "
          f"{result.taught_cells} teaching examples)", flush=True)
    return 0


def _regions_table(args, labels):
    """The regions of --regions (checked to name every id of LABELS), or None."""
    from napari_cytoclip.models.bundle import load_regions_csv

    if args.regions is None:
        return None
    table = load_regions_csv(args.regions)
    unknown = sorted(set(int(i) for i in np.unique(labels) if i) - {r.id for r in table})
    if unknown:
        raise CytoclipError(args.labels, f"label ids {unknown} are not named in {args.regions}; add a row "
                                         "(id, name) for each")
    return table


def _export_regions(args, edited, predicted, table):
    """The prediction's regions, renamed and extended by the --regions table; every id of LABELS named."""
    by_id = {r.id: r for r in predicted}
    by_id.update({r.id: r for r in table or []})
    unknown = sorted(set(int(i) for i in np.unique(edited) if i) - set(by_id))
    if unknown:
        raise CytoclipError(args.labels, f"label ids {unknown} are not in the model's region vocabulary; name them with "
                                         "--regions REGIONS.csv (columns id, name; acronym, colour, description)")
    return sorted(by_id.values(), key=lambda r: r.id)


def _export_features(args, prediction, section, edited, confirmed):
    """Image features for the teaching examples: the cached ones, else those of the taught cells (and a
    sample of the others, for standardising) read and encoded again."""
    from napari_cytoclip.inference.taught_decode import prediction_features
    from napari_cytoclip.teach.teaching import stats_rows

    if getattr(prediction, "features", None) is not None:
        return None, None
    cells = np.asarray(prediction.cells)
    marked = (edited != np.asarray(prediction.labels)) & (edited > 0)
    if confirmed is not None:
        marked |= confirmed & (edited > 0)
    taught = np.flatnonzero(marked[cells[:, 0], cells[:, 1]]) if len(cells) else np.zeros(0, np.int64)
    rows = stats_rows(len(cells), taught)
    model = getattr(args, "_loaded_model", None) or _model(args, args.model)
    visual = model.model.visual
    if not (hasattr(visual, "trunk") and hasattr(visual, "head")):  # export teaches on the joint embedding
        return None, None
    return prediction_features(prediction, model, section, rows), rows


def cmd_teach(args) -> int:
    """Fit the learner on the teaching sets of export folders (and of a taught --init) into a new bundle."""
    import time

    from napari_cytoclip.errors import BundleError, CacheMismatch
    from napari_cytoclip.models.bundle import save_taught_bundle
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.io.safe_files import now_iso
    from napari_cytoclip.teach.teaching import fit_learner, load_teaching_set, taught_provenance, taught_regions

    if os.path.lexists(args.out):
        raise OutputError(args.out, "already exists; choose a new folder for the taught model")
    base = _bundle(args.init)
    sets = [(load_teaching_set(base.path, BundleError), base.path)] if base.taught else []
    for folder in args.folders:
        ts = load_teaching_set(folder)
        if ts.model.get("hash") != base.weights_hash():
            raise CacheMismatch(folder, f"its teaching examples were made by model {ts.model.get('name')} "
                                        f"({ts.model.get('hash')}), not by {base.name} ({base.weights_hash()}); "
                                        "teach with --init that model, or export again with this one")
        sets.append((ts, folder))
    merged = sets[0][0]
    for ts, folder in sets[1:]:
        merged = merged.extend(ts, folder)
    if not merged.taught().any():
        raise CytoclipError(args.folders[0], "holds no taught cells (nothing painted or confirmed); "
                                             "paint corrections or export with --reviewed")
    _quiet_libraries(args)
    model = load_model(base, device=args.device)
    regions = taught_regions(model.regions, merged.regions, list(merged.counts()))
    t0 = time.perf_counter()
    learner = fit_learner(merged, model, regions)
    fit_s = time.perf_counter() - t0
    prov = taught_provenance(base, merged, regions, learner, fit_s, now_iso())
    bundle = save_taught_bundle(base, regions, learner, merged, args.out, prov)
    print(bundle.path, flush=True)
    if not args.quiet:
        counts = merged.counts()
        by_id = {r.id: r for r in regions}
        print(f"taught {int(merged.taught().sum())} cells of {len(merged.sources)} section(s) in {fit_s:.1f} s: " + ", ".join(
            f"{by_id[i].acronym or by_id[i].name} {n}" for i, n in sorted(counts.items()) if i in by_id), flush=True)
    return 0


def _bundle(path: Path | None):
    from napari_cytoclip.models.bundle import BUNDLE_WEIGHTS, default_bundle_path, load_bundle

    if path is None:
        path = default_bundle_path()
        if not (path / BUNDLE_WEIGHTS).is_file():
            raise CytoclipError(path, "the default model is not installed; pass a bundle folder with --model")
    return load_bundle(path)


def _prediction_for_export(args):
    """Prediction, section and bundle behind the corrections: from ``--prediction`` (checked) or predicted now."""
    from napari_cytoclip.inference.cache import expected_signature, jsonable, load_prediction
    from napari_cytoclip.inference.grid import TileGrid
    from napari_cytoclip.outputs.prediction_folder import CACHE_DIR
    from napari_cytoclip.inference.predict import check_signature
    from napari_cytoclip.io.sections import open_section

    if args.prediction is None:
        model = args._loaded_model = _model(args, args.model)
        section = open_section(args.image, pixel_size_um=args.pixel_size)
        section.require_pixel_size()
        return _predict_one(section, model, args, args.image.name), section, model.bundle
    folder = args.prediction / CACHE_DIR if (args.prediction / CACHE_DIR).is_dir() else args.prediction
    cached = load_prediction(folder)
    bundle = _bundle(args.model)
    section = open_section(args.image, pixel_size_um=cached.grid.pixel_size_um if args.pixel_size is None
                           else args.pixel_size)
    grid = TileGrid.covering(section.shape, section.require_pixel_size(), cached.grid.stride_um)
    check_signature(cached, jsonable(expected_signature(section, bundle, grid)), str(args.prediction))
    return cached, section, bundle


def cmd_import_model(args) -> int:
    from napari_cytoclip.models.import_checkpoint import import_checkpoint

    _quiet_libraries(args)
    path = import_checkpoint(args.checkpoint, args.out, args.regions, args.tile_um, arch=args.arch,
                             config=args.config, tile_px=args.tile_px, mode=args.mode, scales_um=args.scales_um,
                             polarity=args.polarity, stride_um=args.stride_um, name=args.name)
    print(path, flush=True)
    return 0


def _export_geometry(args, bundle):
    """The tiles export-pairs cuts: ``--tile-px/--tile-um/--mode/--scales-um`` over the model's input."""
    from napari_cytoclip.teach.pairs import export_geometry

    if all(getattr(args, k, None) is None for k in ("tile_px", "tile_um", "mode", "scales_um")):
        return None
    return export_geometry(bundle.input, args.tile_px, args.tile_um, args.mode, args.scales_um)


COMMANDS = {"predict": cmd_predict, "train": cmd_train, "evaluate": cmd_evaluate, "export-pairs": cmd_export,
            "teach": cmd_teach, "import-model": cmd_import_model}


def _quiet_libraries(args) -> None:
    """Before a command builds a model: the command line owns its process, so open_clip's and transformers'
    model-loading chatter (root-logger warnings about weights loaded later, load reports, progress bars) is
    not shown until the command ends (:func:`main` puts the logging back; ``--debug`` keeps it). The plugin
    shares napari's process and never does this."""
    if getattr(args, "debug", False) or getattr(args, "_restore_logging", None) is not None:
        return
    import logging

    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    before = (root.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    root.setLevel(max(root.level, logging.ERROR))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def restore() -> None:
        root.setLevel(before[0])
        hf_logging.set_verbosity(before[1])
        if before[2]:
            hf_logging.enable_progress_bar()
    args._restore_logging = restore


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, CytoclipError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    old_showwarning = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        return COMMANDS[args.command](args)
    except (CytoclipError, OSError, ValueError, MemoryError, RecursionError) as exc:
        if debug:
            raise
        print(f"{PROG}: error: {_error_text(exc)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = old_showwarning
        if getattr(args, "_restore_logging", None) is not None:
            args._restore_logging()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
