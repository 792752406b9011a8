"""The correction loop, end to end on real data: predict, correct, export, fine-tune, predict better.

    HF_HUB_OFFLINE=1 python benchmarks/loop.py --split val  --work /tmp/cytoclip-loop [--ks 1,3]
    HF_HUB_OFFLINE=1 python benchmarks/loop.py --split test --work /tmp/cytoclip-loop [--ks 1,3] \
        --section benchmarks/README.md --readme README.md

Every design choice is made on validation plates (plate number % 10 == 3): ``--split val`` fine-tunes
each combination of ``--sweep`` (default ``lr=1e-4,3e-4,1e-3``) and scores it on them; the best mean
macro-F1 over K is recorded as the pick. ``--split test`` refuses to run before that, and then scores
only the picked choices (and the controls) on the held-out test plates (number % 5 == 0): that is the
final table. Both runs share one work folder (its ``results.json``), every model step is a subprocess
call of the ``napari-cytoclip`` console script (the code path a user takes), and each step is skipped
when its output exists, so an interrupted run resumes.

1. **Weak start** (``--start subset``, the default): the default recipe (untrained
   EfficientNet-Lite0 + MiniLM bundle from ``architectures.create_initial_bundle``, pairs from
   ``allen.build_pair_folders``) trained with ``napari-cytoclip train`` on every ``--weak-every``-th
   training plate (a fixed recipe, not tuned). ``--start stain`` instead uses the shipped model on a
   simulated brightfield cresyl-violet stain of the plates (see :func:`stain_plate`);
   ``--start-model BUNDLE`` uses any bundle you give.
2. **Simulated anatomist**: K unseen training plates (fixed seed; never validation, test, ``qc``
   other than ``ok``, or start plates; nested) are predicted with ``napari-cytoclip predict``; the
   "corrected" labels are the atlas labels of ``labels_coarse/`` (15 = root-only becomes 0), exported
   with ``napari-cytoclip export-pairs IMAGE LABELS --prediction DIR`` (a pair per changed cell).
3. **Fine-tune** with ``napari-cytoclip train <K pair folders> --init <start> --replay <start's own
   pairs>`` (arm ``replay``, the recipe). Test split controls with the same choices: ``plain`` (the
   corrections alone) and ``control`` (the replay pairs alone: how much is just more training).
4. **Evaluate** with ``napari-cytoclip evaluate`` at ``--eval-stride-um`` on ``--eval-plates`` of the
   split's plates (all by default).

Prints the loop section of ``benchmarks/README.md`` and the summary bullets of ``README.md``, both
generated from ``results.json`` alone; ``--section`` / ``--readme`` write them between their markers,
and the test run draws ``benchmarks/loop_curve.png``. ``--report-only`` prints them again.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CLI = shutil.which("napari-cytoclip") or str(Path(sys.executable).with_name("napari-cytoclip"))
UNLABELLED = 0
ROOT_ONLY = 15

# MD787 (mitra_md787_mouse_nissl_series), measured on 9 of its PNGs: background about (246, 248, 251),
# mean tissue about (160, 167, 215) (blue-violet cresyl violet on a white slide).
MD787_BACKGROUND = np.array([246.0, 248.0, 251.0])
MD787_TISSUE = np.array([160.0, 167.0, 215.0])


SECTION_BEGIN, SECTION_END = "<!-- loop:begin -->", "<!-- loop:end -->"  # its part of benchmarks/README.md
SUMMARY_BEGIN, SUMMARY_END = "<!-- loop-summary:begin -->", "<!-- loop-summary:end -->"  # README.md bullets
SWEEPABLE = {"lr": float, "steps": int, "replay_ratio": float}  # fine-tune choices a val sweep may pick
ARMS = ("replay", "plain")  # corrections with replay (the recipe), corrections alone (control)


# ---------------------------------------------------------------------------------------------
# data helpers (no model involved)

def stain_plate(darkfield: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dark-field Allen plate rendered as brightfield cresyl-violet colour resembling MD787.

    Stain density ``s`` is the plate's brightness above its background (the median outside the
    labels). Each channel follows Beer-Lambert, ``bg * exp(-k_c * s / mean_tissue_s)``, with ``k_c``
    chosen so that the mean tissue colour is MD787's; per plate the stain strength (x0.8-1.25), the
    blue share (x0.8-1.25) and the background tint (-6..+3 per channel) are jittered, and sensor
    noise (sigma 2 grey levels) is added. Returns uint8 RGB of the plate's size.
    """
    v = darkfield.astype(np.float64) / 255.0
    outside = labels == 0
    floor = float(np.median(v[outside])) if outside.any() else 0.0
    s = np.clip(v - floor, 0.0, None)
    mean_s = max(float(s[labels > 0].mean()) if (labels > 0).any() else float(s.mean()), 1e-3)
    od = -np.log(MD787_TISSUE / MD787_BACKGROUND)
    od = od * rng.uniform(0.8, 1.25) * np.array([1.0, 1.0, rng.uniform(0.8, 1.25)])
    bg = np.clip(MD787_BACKGROUND + rng.uniform(-6.0, 3.0, 3), 0, 255)
    rgb = bg * np.exp(-(s / mean_s)[..., None] * od)
    rgb += rng.normal(0.0, 2.0, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def corrected_labels(atlas: np.ndarray) -> np.ndarray:
    """The simulated anatomist's final labels: the atlas labels, root-only (15) left unlabelled."""
    out = np.asarray(atlas).astype(np.uint16, copy=True)
    out[out == ROOT_ONLY] = UNLABELLED
    return out


def pick_corrected_plates(plates, exclude: set[int], n: int, seed: int) -> list:
    """``n`` training plates (qc ok, not in ``exclude``) in a seeded order; prefixes are nested."""
    pool = sorted((p for p in plates if p.split == "train" and p.qc == "ok" and p.number not in exclude),
                  key=lambda p: p.number)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:n]]


def pick_eval_plates(plates, split: str, n: int | None) -> list:
    """``n`` plates of ``split`` ("val": number % 10 == 3, "test": number % 5 == 0), evenly spaced along
    the AP axis (all when ``n`` is None or too big)."""
    chosen = sorted((p for p in plates if p.split == split), key=lambda p: p.number)
    if not n or n >= len(chosen):
        return chosen
    idx = np.unique(np.round(np.linspace(0, len(chosen) - 1, n)).astype(int))
    return [chosen[i] for i in idx]


def pick_test_plates(plates, n: int | None) -> list:
    return pick_eval_plates(plates, "test", n)


def parse_sweep(specs: list[str]) -> list[dict]:
    """``["lr=1e-4,1e-3", "steps=100,200"]`` -> every combination, as dicts of the chosen values."""
    grid: list[dict] = [{}]
    for spec in specs:
        key, _, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if key not in SWEEPABLE or not values:
            raise SystemExit(f"--sweep {spec!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEPABLE)}")
        grid = [{**g, key: SWEEPABLE[key](v)} for g in grid for v in values.split(",") if v]
    return grid


def config_tag(cfg: dict) -> str:
    """A folder-name tag for a fine-tune configuration, e.g. ``lr0.001_steps200_rr1``."""
    return f"lr{cfg['lr']:g}_steps{cfg['steps']}_rr{cfg['replay_ratio']:g}"


def pick_best(candidates: list[dict]) -> dict:
    """The candidate with the best mean validation macro-F1 over its K (first one on a tie)."""
    return max(candidates, key=lambda c: (c["mean_macro_f1"], -candidates.index(c)))


def weak_subset(plates, every: int) -> list:
    train = sorted((p for p in plates if p.split == "train"), key=lambda p: p.number)
    return train[::every]


def epochs_for(n_pairs: int, steps: int, batch_size: int) -> int:
    """Epochs that give about ``steps`` optimiser steps (``n_pairs // batch_size`` per epoch)."""
    per_epoch = max(1, n_pairs // batch_size)
    return max(1, int(round(steps / per_epoch)))


def schedule_for(n_new: int, steps: int, new_per_batch: int) -> tuple[int, int]:
    """(epochs, steps per epoch) for about ``steps`` steps, an epoch being about one pass over the new pairs."""
    epochs = epochs_for(n_new, steps, new_per_batch)
    return epochs, max(1, int(round(steps / epochs)))


def count_pairs(folder: Path) -> int:
    with open(folder / "pairs.csv", newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))


def pair_regions(folder: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with open(folder / "pairs.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                name = json.loads(line).get("region_name", "?")
                counts[name] = counts.get(name, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# running the console script

class Runner:
    """Runs ``napari-cytoclip`` commands, logging each and its wall time."""

    def __init__(self, log):
        self.log = log
        self.last_load = None

    def __call__(self, *args) -> float:
        cmd = [CLI, *[str(a) for a in args]]
        shown = " ".join(cmd if len(cmd) < 14 else cmd[:12] + [f"... ({len(cmd) - 12} more)"])
        self.log(f"$ {shown}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - t0
        if proc.stdout.strip():
            self.log("  " + proc.stdout.strip().replace("\n", "\n  "))
        if proc.returncode != 0:
            self.log(proc.stderr[-4000:])
            raise SystemExit(f"command failed with status {proc.returncode}: {shown}")
        self.last_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.log(f"  ({seconds:.1f} s; 1-min load average {self.last_load})")
        return seconds


# ---------------------------------------------------------------------------------------------
# the experiment

class Loop:
    def __init__(self, args):
        from napari_cytoclip.teach import allen

        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_path = self.work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.all_plates = allen.plates(args.data)
        self.by_number = {p.number: p for p in self.all_plates}
        self._logfile = open(self.work / "loop.log", "a", encoding="utf-8")
        self.run = Runner(self.log)

    def log(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self._logfile.write(line + "\n")
        self._logfile.flush()

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.results_path)

    # -- images -------------------------------------------------------------------------------

    def image_of(self, plate, stained: bool | None = None) -> Path:
        """The image the loop shows the model: the plate itself, or its stained rendering."""
        if not (self.args.start == "stain" if stained is None else stained):
            return plate.image
        from PIL import Image

        path = self.work / "stained" / f"plate_{plate.number:03d}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(plate.image) as im:
                gray = np.asarray(im.convert("L"))
            rgb = stain_plate(gray, plate.label_map(), np.random.default_rng([self.args.seed, plate.number]))
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(rgb).save(tmp)
            tmp.replace(path)
        return path

    # -- step 1: the weak start -----------------------------------------------------------------

    def start_model(self) -> Path:
        from napari_cytoclip.models.bundle import default_bundle_path

        a = self.args
        if a.start_model:
            return Path(a.start_model)
        if a.start == "stain":
            return default_bundle_path()
        model = self.work / "start" / "model"
        if (model / "cytoclip.json").is_file():
            return model
        from napari_cytoclip.teach import allen
        from napari_cytoclip.models.architectures import create_initial_bundle
        from napari_cytoclip.models.bundle import load_bundle

        shipped = load_bundle(default_bundle_path())
        init_dir = self.work / "start" / "init"
        init = load_bundle(init_dir) if (init_dir / "cytoclip.json").is_file() else create_initial_bundle(
            init_dir, shipped.input.scales_um, shipped.input.size, shipped.label_um, shipped.stride_um)
        subset = weak_subset(self.all_plates, a.weak_every)
        self.log(f"weak start: default recipe on training plates {[p.number for p in subset]}")
        folders = allen.build_pair_folders(self.work / "start" / "pairs", "train", init.input, init.regions,
                                           init.label_um, a.weak_pair_stride_um, a.data, seed=a.seed,
                                           plate_numbers=[p.number for p in subset])
        n = sum(count_pairs(f) for f in folders)
        epochs = epochs_for(n, a.weak_steps, a.batch_size)
        seconds = self.run("train", *folders, "--init", init_dir, "--out", model, "--epochs", epochs,
                           "--batch-size", a.batch_size, "--lr", a.weak_lr, "--warmup-steps", 100, "--seed", a.seed,
                           "--device", "cpu", "--quiet")
        self.results["start"] = {"kind": "subset", "plates": [p.number for p in subset], "pairs": n,
                                 "pair_stride_um": a.weak_pair_stride_um, "epochs": epochs, "warmup_steps": 100,
                                 "batch_size": a.batch_size, "lr": a.weak_lr, "train_seconds": seconds}
        self.save()
        return model

    def replay_folders(self, start: Path) -> list[Path]:
        """The start model's own training pairs (or ``--replay-pairs``, or a small Allen set rebuilt)."""
        a = self.args
        if a.replay_pairs:
            folders = [Path(f) for f in a.replay_pairs]
        elif a.start == "subset" and not a.start_model:
            folders = [self.work / "start" / "pairs" / f"plate_{n:03d}" for n in self.results["start"]["plates"]]
        else:
            from napari_cytoclip.teach import allen
            from napari_cytoclip.models.bundle import load_bundle

            bundle = load_bundle(start)
            subset = weak_subset(self.all_plates, a.weak_every)
            folders = allen.build_pair_folders(self.work / "replay", "train", bundle.input, bundle.regions,
                                               bundle.label_um, a.weak_pair_stride_um, a.data, seed=a.seed,
                                               plate_numbers=[p.number for p in subset])
        missing = [f for f in folders if not (f / "pairs.csv").is_file()]
        if missing:
            raise SystemExit(f"replay pair folders missing: {missing[:3]}")
        self.results["replay"] = {"folders": [f.name for f in folders], "pairs": sum(count_pairs(f) for f in folders)}
        self.save()
        return folders

    # -- step 2: predict, correct, export ---------------------------------------------------------

    def correct(self, plate, start: Path) -> dict:
        """Predict one plate, write the atlas "corrections" and export them with export-pairs."""
        import tifffile

        a = self.args
        key = f"plate_{plate.number:03d}"
        done = self.results.setdefault("corrections", {}).get(key)
        export = self.work / "exports" / key
        if done and (export / "pairs" / "pairs.csv").is_file():
            return done
        image = self.image_of(plate)
        from napari_cytoclip.outputs.naming import image_stem

        pred = self.work / "predict" / image_stem(image)
        t_pred = 0.0
        if not (pred / "prediction.json").is_file():
            if pred.exists():  # an interrupted prediction
                shutil.rmtree(pred)
            t_pred = self.run("predict", image, "--out", self.work / "predict", "--model", start,
                              "--pixel-size", plate.um_per_px, "--stride-um", a.predict_stride_um,
                              "--device", "cpu", "--quiet")
        labels = self.work / "corrections" / f"{key}.tif"
        labels.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(labels, corrected_labels(plate.label_map()), compression="zlib")
        if export.exists():  # an interrupted export: start the folder again
            shutil.rmtree(export)
        t_exp = self.run("export-pairs", image, labels, "--prediction", pred, "--model", start, "--out", export,
                         "--device", "cpu", "--quiet")
        log = json.loads((export / "export.json").read_text())["exports"][-1]
        info = {"plate": plate.number, "image": str(image), "pairs": count_pairs(export / "pairs"),
                "corrected_cells": log["corrected_cells"], "confirmed_cells": log["confirmed_cells"],
                "predict_seconds": t_pred, "export_seconds": t_exp, "pair_regions": pair_regions(export / "pairs")}
        self.results["corrections"][key] = info
        self.save()
        return info

    # -- step 3: fine-tune ------------------------------------------------------------------------

    def fine_tune(self, arm: str, k: int, plates: list, start: Path, replay: list[Path], cfg: dict) -> Path:
        """Arm ``replay`` (corrections + replay), ``plain`` (corrections alone) or ``control`` (replay alone),
        with the fine-tune choices ``cfg`` (lr, steps, replay_ratio). Models are shared by the val and test
        runs: the split only decides which plates score them."""
        a = self.args
        tag = config_tag(cfg)
        key = f"control@{tag}" if arm == "control" else f"{arm}/{k}@{tag}"
        model = self.work / "models" / (f"control_{tag}" if arm == "control" else f"{arm}_K{k:02d}_{tag}")
        entry = self.results.setdefault("fine_tune", {}).get(key)
        if entry and (model / "cytoclip.json").is_file():
            return model
        if model.exists():  # written but not recorded: train again
            shutil.rmtree(model)
        folders = replay if arm == "control" else [self.work / "exports" / f"plate_{p.number:03d}" / "pairs"
                                                   for p in plates]
        n = sum(count_pairs(f) for f in folders)
        extra: list = []
        per_batch = a.batch_size
        if arm == "replay":
            per_batch = min(a.batch_size, max(1, int(round(a.batch_size / (1 + cfg["replay_ratio"])))))
            extra = ["--replay", *replay, "--replay-ratio", cfg["replay_ratio"]]
        epochs, per_epoch = schedule_for(n, cfg["steps"], per_batch)
        model.parent.mkdir(parents=True, exist_ok=True)
        seconds = self.run("train", *folders, "--init", start, "--out", model, *extra, "--epochs", epochs,
                           "--steps-per-epoch", per_epoch, "--batch-size", a.batch_size, "--lr", cfg["lr"],
                           "--seed", a.seed, "--device", "cpu", "--quiet")
        prov = json.loads((model / "cytoclip.json").read_text()).get("provenance", {})
        self.results["fine_tune"][key] = {
            "arm": arm, "k": 0 if arm == "control" else k, "config": cfg,
            "plates": [] if arm == "control" else [p.number for p in plates], "pairs": prov.get("n_pairs"),
            "replay_pairs": prov.get("n_replay_pairs", 0), "epochs": epochs, "steps": epochs * per_epoch,
            "new_per_batch": per_batch, "batch_size": a.batch_size,
            "warmup_steps": prov.get("config", {}).get("warmup_steps"), "seconds": seconds,
            "load_average_after": self.run.last_load}
        self.save()
        return model

    # -- step 4: evaluate -------------------------------------------------------------------------

    def evaluate(self, name: str, model: Path, plates: list, split: str, stained: bool | None = None) -> dict:
        a = self.args
        tag = f"{name}_{split}_s{a.eval_stride_um:g}_{len(plates)}plates"  # a report per model, split, grid, set
        out = self.work / "reports" / tag
        images = [self.image_of(p, stained) for p in plates]
        if not (out / "report.json").is_file():
            if out.exists():  # an interrupted evaluation
                shutil.rmtree(out)
            seconds = self.run("evaluate", "--model", model, "--images", *images,
                               "--labels", *[p.labels for p in plates],
                               "--pixel-size", *[p.um_per_px for p in plates], "--stride-um", a.eval_stride_um,
                               "--device", "cpu", "--out", out, "--quiet")
            self.results.setdefault("eval_seconds", {})[tag] = seconds
            self.save()
        report = json.loads((out / "report.json").read_text())
        if [(Path(i["image"]).name, Path(i["labels"]).name) for i in report["images"]] != \
                [(im.name, p.labels.name) for im, p in zip(images, plates)]:
            raise SystemExit(f"{out} was made for other images; remove it to evaluate again")
        return {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
                "per_region": {v["name"]: v.get("f1") for v in report["per_region"].values()},
                "n_images": report["n_images"], "pixels_scored": report["pixels_scored"],
                "report": str(out / "report.json")}

    # -- all --------------------------------------------------------------------------------------

    def main(self) -> dict:
        """``--split val``: the sweep, scored on validation plates, picks the fine-tune choices.
        ``--split test``: the picked choices (from this work folder's val run), scored on test plates."""
        a = self.args
        t0 = time.perf_counter()
        ks = sorted(set(a.ks))
        self.results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        start = self.start_model()
        exclude = set(self.results.get("start", {}).get("plates", []))
        corrected = pick_corrected_plates(self.all_plates, exclude, max(ks, default=0), a.seed)
        plates = pick_eval_plates(self.all_plates, a.split, a.eval_plates)
        self.results["corrected_order"] = [p.number for p in corrected]
        run = {"split": a.split, "plates": [p.number for p in plates], "ks": ks, "machine": machine(),
               "data": str(Path(self.all_plates[0].image).parent.parent), "started": now(), "scores": {}}
        if a.split == "val":
            base = {"lr": a.lr, "steps": a.steps, "replay_ratio": a.replay_ratio}
            run["candidates"] = [{"config": {**base, **g}} for g in parse_sweep(a.sweep)]
            run["swept"] = sorted({k for g in parse_sweep(a.sweep) for k in g})
        else:
            val = self.results.get("val", {})
            if "chosen" not in val:
                raise SystemExit(f"no validation sweep in {self.results_path}: run `--split val` with this --work "
                                 "first; the test split only scores the choices it picked")
            if sorted(val["ks"]) != ks:
                raise SystemExit(f"--ks {ks} differs from the validation run's {val['ks']}")
            run["chosen"] = val["chosen"]
        self.results[a.split] = run
        self.save()
        self.log(f"split {a.split}: start model {start}; corrected plates (in order) {[p.number for p in corrected]}; "
                 f"{len(plates)} {a.split} plates {run['plates']}")
        scores = run["scores"]
        scores["start"] = self.evaluate("K00", start, plates, a.split)
        self.save()
        replay = self.replay_folders(start) if ks else []
        for k in ks:
            for plate in corrected[:k]:
                self.correct(plate, start)
        if a.split == "val":
            for cand in run["candidates"]:
                cfg, tag = cand["config"], config_tag(cand["config"])
                cand["scores"] = {}
                for k in ks:
                    model = self.fine_tune("replay", k, corrected[:k], start, replay, cfg)
                    cand["scores"][str(k)] = self.evaluate(f"replay_K{k:02d}_{tag}", model, plates, "val")
                    scores[f"replay/{k}@{tag}"] = cand["scores"][str(k)]
                    self.save()
                cand["mean_macro_f1"] = float(np.mean([s["macro_f1"] for s in cand["scores"].values()]))
            run["chosen"] = pick_best(run["candidates"])["config"]
        else:
            cfg, tag = run["chosen"], config_tag(run["chosen"])
            arms = ["replay"] + (["plain"] if a.controls else [])
            for arm in arms:  # the recipe first: its numbers are in even if the controls run out of time
                for k in ks:
                    model = self.fine_tune(arm, k, corrected[:k], start, replay, cfg)
                    scores[f"{arm}/{k}"] = self.evaluate(f"{arm}_K{k:02d}_{tag}", model, plates, "test")
                    self.save()
                if arm == "replay" and a.controls and ks:
                    model = self.fine_tune("control", 0, [], start, replay, cfg)
                    scores["control"] = self.evaluate(f"control_{tag}", model, plates, "test")
                    self.save()
            if a.reference:
                from napari_cytoclip.models.bundle import default_bundle_path

                run["reference"] = self.evaluate("shipped", default_bundle_path(), plates, "test", stained=False)
            if a.stain_check and a.start != "stain":
                from napari_cytoclip.models.bundle import default_bundle_path

                run["stain_check"] = self.evaluate("shipped_stained", default_bundle_path(), plates, "test",
                                                   stained=True)
        run["finished"] = now()
        run["machine_at_end"] = machine()
        run["wall_seconds"] = time.perf_counter() - t0
        self.save()
        self.log(f"done in {run['wall_seconds']:.0f} s: " + ", ".join(f"{k} {v['macro_f1']:.3f}" for k, v in scores.items()))
        return self.results


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def machine() -> str:
    """CPU model, cores and 1-minute load average."""
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{name}, {os.cpu_count()} cores, load average {load:.1f}"


# ---------------------------------------------------------------------------------------------
# curve, tables and README text (generated from results.json alone)

def arm_ks(scores: dict, arm: str) -> list[int]:
    return sorted(int(k.split("/")[1]) for k in scores if k.startswith(arm + "/") and "@" not in k)


def plot_curve(test: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = test["scores"]
    k0 = scores["start"]["macro_f1"]
    fig, ax = plt.subplots(figsize=(8.0, 3.8), dpi=120)
    styles = {"replay": ("o-", "#3b5bdb", "corrections + replay (recipe)"),
              "plain": ("s--", "#e8590c", "corrections alone")}
    all_ks = [0]
    for arm, (style, colour, label) in styles.items():
        ks = arm_ks(scores, arm)
        if not ks:
            continue
        all_ks += ks
        f1 = [k0] + [scores[f"{arm}/{k}"]["macro_f1"] for k in ks]
        ax.plot([0] + ks, f1, style, color=colour, label=label)
        if arm == "replay":
            for k, v in zip([0] + ks, f1):
                ax.annotate(f"{v:.3f}", (k, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if "control" in scores:
        ax.axhline(scores["control"]["macro_f1"], ls="-.", color="#2b8a3e", alpha=0.8,
                   label=f"replay alone, no corrections ({scores['control']['macro_f1']:.3f})")
    if "reference" in test:
        ax.axhline(test["reference"]["macro_f1"], ls="--", color="gray",
                   label=f"shipped model ({test['reference']['macro_f1']:.3f})")
    ks = sorted(set(all_ks))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlim(-0.15, max(ks) * 1.25)
    ax.set_xlabel("corrected plates K (0 = start model)")
    ax.set_ylabel("macro-F1, held-out test plates")
    ax.set_title(f"Correction loop: {len(test['plates'])} test plates, choices picked on validation plates "
                 f"({config_tag(test['chosen'])})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _f1(score: dict | None) -> str:
    return "-" if score is None else f"{score['macro_f1']:.3f}"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def region_rows(scores: dict, keys: list[str]) -> list[tuple[str, list[float]]]:
    """Per-region F1 for each score key, sorted by the gain of the last key over the first."""
    names = list(scores[keys[-1]]["per_region"])
    rows = [(name, [scores[k]["per_region"].get(name) or 0.0 for k in keys]) for name in names]
    return sorted(rows, key=lambda r: r[1][-1] - r[1][0], reverse=True)


def val_table(results: dict) -> list[str]:
    """The validation sweep: every candidate's macro-F1 on the validation plates, and the pick."""
    val = results.get("val")
    if not val or "chosen" not in val:
        return ["Validation sweep: not run to the end yet (`--split val`)."]
    ks = val["ks"]
    lines = [f"Validation sweep (`--split val`, {val['started']} to {val.get('finished', '?')}; machine at start: "
             f"{val['machine']}; at end: {val.get('machine_at_end', '?')}): corrections + replay, scored on "
             f"{len(val['plates'])} validation plates ({', '.join(map(str, val['plates']))}; plate number % 10 == 3) "
             f"of `{val['data']}`. Start model: {_f1(val['scores'].get('start'))}. Swept: "
             f"{', '.join(val['swept']) or 'nothing'}; the pick is the best mean over K.", "",
             "| lr | steps | replay ratio | " + " | ".join(f"K = {k}" for k in ks) + " | mean | picked |",
             "|---|---|---|" + "---|" * len(ks) + "---|---|"]
    for c in val["candidates"]:
        cfg = c["config"]
        lines.append(f"| {cfg['lr']:g} | {cfg['steps']} | {cfg['replay_ratio']:g} | "
                     + " | ".join(_f1(c.get("scores", {}).get(str(k))) for k in ks)
                     + f" | {c['mean_macro_f1']:.3f} | {'yes' if cfg == val['chosen'] else ''} |")
    return lines


def test_table(results: dict) -> list[str]:
    """The final table: the picked choices, scored once on the test plates."""
    test = results.get("test")
    if not test or "finished" not in test:
        return ["Test table: not run to the end yet (`--split test`, after the validation sweep)."]
    scores, ft, cfg = test["scores"], results.get("fine_tune", {}), test["chosen"]
    tag = config_tag(cfg)
    k0 = scores["start"]
    lines = [f"Test table (`--split test`, {test['started']} to {test['finished']}; machine at start: "
             f"{test['machine']}; at end: {test['machine_at_end']}): {len(test['plates'])} held-out test plates "
             f"({', '.join(map(str, test['plates']))}; plate number % 5 == 0) of `{test['data']}`, fine-tune choices "
             f"picked on validation: lr {cfg['lr']:g}, {cfg['steps']} steps, replay ratio {cfg['replay_ratio']:g}.", "",
             "| K | corrected plates | corrected pairs | steps | fine-tune (s) | load avg | macro-F1, with replay "
             "| accuracy | macro-F1, no replay |", "|---|---|---|---|---|---|---|---|---|",
             f"| 0 | - | - | - | - | - | {k0['macro_f1']:.3f} | {k0['accuracy']:.3f} | {k0['macro_f1']:.3f} |"]
    for k in arm_ks(scores, "replay") or arm_ks(scores, "plain"):
        f = ft.get(f"replay/{k}@{tag}", ft.get(f"plain/{k}@{tag}", {}))
        r, p = scores.get(f"replay/{k}"), scores.get(f"plain/{k}")
        lines.append(f"| {k} | {', '.join(map(str, f.get('plates', [])))} | {f.get('pairs')} | {f.get('steps')} | "
                     f"{f.get('seconds', 0):.0f} | {_fmt(f.get('load_average_after'))} | {_f1(r)} | "
                     f"{'-' if r is None else format(r['accuracy'], '.3f')} | {_f1(p)} |")
    if "control" in scores:
        f = ft.get(f"control@{tag}", {})
        lines.append(f"| replay alone | - | 0 (+{f.get('replay_pairs') or f.get('pairs')} replay) | {f.get('steps')} | "
                     f"{f.get('seconds', 0):.0f} | {_fmt(f.get('load_average_after'))} | "
                     f"{scores['control']['macro_f1']:.3f} | {scores['control']['accuracy']:.3f} | |")
    if "reference" in test:
        r = test["reference"]
        lines.append(f"| shipped model | all training plates | | | | | {r['macro_f1']:.3f} | {r['accuracy']:.3f} | |")
    return lines


def summary_bullets(results: dict) -> list[str]:
    """The README's "what to expect" bullets, from the same results."""
    test = results.get("test")
    if not test or "finished" not in test:
        return ["- Not measured yet on this repository's code: `benchmarks/loop.py` has not finished a "
                "`--split val` sweep and a `--split test` run (the 2-core machine it was written on was shared "
                "with other jobs). Until it has, no number is quoted here; see the correction-loop section of "
                "`benchmarks/README.md` for the commands."]
    s, cfg = test["scores"], test["chosen"]
    k0 = s["start"]["macro_f1"]
    out = [f"- Data: `{test['data']}`; fine-tune choices picked on {len(results['val']['plates'])} validation "
           f"plates (lr {cfg['lr']:g}, {cfg['steps']} steps, replay ratio {cfg['replay_ratio']:g}); scores on "
           f"{len(test['plates'])} test plates; machine: {test['machine']}."]
    out.append(f"- Start model {k0:.3f}; with replay: " + "; ".join(
        f"K = {k}: {s[f'replay/{k}']['macro_f1']:.3f} ({s[f'replay/{k}']['macro_f1'] - k0:+.3f})"
        for k in arm_ks(s, "replay")) + "." + (f" Replay alone, no corrections: {s['control']['macro_f1']:.3f}."
                                              if "control" in s else ""))
    if arm_ks(s, "plain"):
        out.append("- Without replay: " + "; ".join(
            f"K = {k}: {s[f'plain/{k}']['macro_f1']:.3f} ({s[f'plain/{k}']['macro_f1'] - k0:+.3f})"
            for k in arm_ks(s, "plain")) + ".")
    return out


def section_lines(results: dict, commands: list[str]) -> list[str]:
    c = results.get("config", {})
    start = results.get("start", {})
    rep = results.get("replay", {})
    lines = ["## The correction loop: predict, correct, export, fine-tune, evaluate", "",
             "Generated by `benchmarks/loop.py` from its `results.json`; nothing here is typed by hand. Rerun "
             "(each step resumes; the test run refuses to start before the validation sweep has picked its "
             "choices):", ""] + [f"    {cmd}" for cmd in commands] + [""]
    if start:
        lines += [f"Start model (K = 0): the default recipe (`architectures.create_initial_bundle` + "
                  f"`allen.build_pair_folders` + `napari-cytoclip train`) on {len(start['plates'])} training plates "
                  f"({', '.join(map(str, start['plates']))}), {start['pairs']} pairs at {start['pair_stride_um']:g} um, "
                  f"{start['epochs']} epoch(s) of batch {start['batch_size']}, lr {start['lr']}, warmup "
                  f"{start['warmup_steps']} steps: {start['train_seconds']:.0f} s. Its recipe is fixed, not tuned.", ""]
    lines += [f"Simulated anatomist: K unseen training plates (qc ok; never validation, test or start plates; seed "
              f"{c.get('seed')}; nested) predicted with `napari-cytoclip predict --stride-um "
              f"{c.get('predict_stride_um', 0):g}`, corrected to the atlas labels of `labels_coarse/` (root-only 15 "
              f"left unlabelled), exported with `napari-cytoclip export-pairs IMAGE LABELS --prediction DIR`. "
              f"Fine-tune: `napari-cytoclip train PAIRS... --init START --replay REPLAY...` "
              f"(replay = the start model's own training pairs"
              + (f", {len(rep['folders'])} folders, {rep['pairs']} pairs" if rep else "")
              + f", batch {c.get('batch_size')}, `--device cpu`); controls with the same choices: *no replay* "
              f"and *replay alone*. Scored with `napari-cytoclip evaluate` at a {c.get('eval_stride_um', 0):g} um "
              f"grid.", ""]
    lines += val_table(results) + [""] + test_table(results) + [""]
    test = results.get("test")
    if test and "finished" in test:
        lines += ["![macro-F1 against the number of corrected plates](loop_curve.png)", ""]
        s = test["scores"]
        rks = arm_ks(s, "replay")
        if rks:
            keys = ["start"] + (["control"] if "control" in s else []) + [f"replay/{k}" for k in rks]
            heads = ["start"] + (["replay alone"] if "control" in s else []) + [f"K = {k}" for k in rks]
            lines += [f"Per-region F1 on the test plates, with replay, sorted by the gain of K = {rks[-1]}:", "",
                      "| region | " + " | ".join(heads) + " | gain over start |", "|---|" + "---|" * (len(heads) + 1)]
            for name, vals in region_rows(s, keys):
                lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {vals[-1] - vals[0]:+.3f} |")
            lines.append("")
        if "stain_check" in test and "reference" in test:
            lines += [f"Shipped model on the test plates: {test['reference']['macro_f1']:.4f}; on the same plates "
                      f"rendered as MD787-like brightfield colour (`stain_plate`): {test['stain_check']['macro_f1']:.4f}.",
                      ""]
    corr = results.get("corrections", {})
    if corr:
        lines += ["| plate | cells corrected = pairs | predict (s) | export (s) |", "|---|---|---|---|"]
        for key in sorted(corr, key=lambda s: results["corrected_order"].index(corr[s]["plate"])):
            e = corr[key]
            lines.append(f"| {e['plate']} | {e['pairs']} | {e['predict_seconds']:.0f} | {e['export_seconds']:.0f} |")
        lines.append("")
    return lines


def replace_between(path: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between two marker lines of ``path`` (atomically)."""
    old = path.read_text(encoding="utf-8")
    if begin not in old or end not in old:
        raise SystemExit(f"{path}: markers {begin} / {end} not found")
    head, rest = old.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail, encoding="utf-8")
    tmp.replace(path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/cytoclip-loop", help="work folder (resumable; shared by val and test)")
    ap.add_argument("--data", default=None, help="folder holding allen_ara_coronal_nissl_plates (default ../shared/data)")
    ap.add_argument("--split", choices=["val", "test"], default="val",
                    help="val: the sweep, scored on validation plates, picks the choices; test: the picked "
                         "choices, scored on the test plates (final table)")
    ap.add_argument("--sweep", action="append", default=None,
                    help="KEY=V1,V2,... (KEY: lr, steps, replay_ratio); repeat for a grid (default lr=1e-4,3e-4,1e-3)")
    ap.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 3, 10],
                    help="numbers of corrected plates (comma separated)")
    ap.add_argument("--start", choices=["subset", "stain"], default="subset", help="the weak start (see above)")
    ap.add_argument("--start-model", default=None, help="use this bundle as the start model instead")
    ap.add_argument("--weak-every", type=int, default=8, help="start model: every Nth training plate")
    ap.add_argument("--weak-pair-stride-um", type=float, default=240.0)
    ap.add_argument("--weak-steps", type=int, default=720, help="start model: optimiser steps")
    ap.add_argument("--weak-lr", type=float, default=2e-3)
    ap.add_argument("--predict-stride-um", type=float, default=200.0, help="grid the anatomist corrects")
    ap.add_argument("--eval-stride-um", type=float, default=200.0)
    ap.add_argument("--eval-plates", type=int, default=None, help="score on N evenly spaced plates of the split (all)")
    ap.add_argument("--steps", type=int, default=200, help="fine-tune steps when not swept")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tune lr when not swept")
    ap.add_argument("--replay-ratio", type=float, default=1.0, help="replay pairs per corrected pair (when not swept)")
    ap.add_argument("--replay-pairs", nargs="+", default=None, help="replay pair folders (default: the start's own)")
    ap.add_argument("--no-controls", dest="controls", action="store_false",
                    help="test split: skip the no-replay and replay-alone fine-tunes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", dest="reference", action="store_false", help="skip the shipped model's score")
    ap.add_argument("--stain-check", dest="stain_check", action="store_true",
                    help="also score the shipped model on the stained test plates")
    ap.add_argument("--report-only", action="store_true", help="only print (and write) the report from results.json")
    ap.add_argument("--png", default=str(HERE / "loop_curve.png"))
    ap.add_argument("--section", default=None, help="Markdown file whose loop section is rewritten "
                    "(benchmarks/README.md)")
    ap.add_argument("--readme", default=None, help="Markdown file whose loop summary bullets are rewritten (README.md)")
    args = ap.parse_args(argv)
    args.sweep = args.sweep or ["lr=1e-4,3e-4,1e-3"]
    return args


def main(argv=None) -> int:
    import shlex

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report_only:  # no results.json yet: the text says so instead of giving numbers
        saved = Path(args.work) / "results.json"
        results = json.loads(saved.read_text()) if saved.is_file() else {"config": vars(args)}
    else:
        results = Loop(args).main()
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--report-only",)]
    given = [a for i, a in enumerate(given) if a not in ("--split", "--section", "--readme")
             and (i == 0 or given[i - 1] not in ("--split", "--section", "--readme"))]
    commands = ["HF_HUB_OFFLINE=1 " + shlex.join(["python", "benchmarks/loop.py", "--split", s, *given])
                for s in ("val", "test")]
    lines, bullets = section_lines(results, commands), summary_bullets(results)
    print("\n".join(lines))
    print("README bullets:")
    print("\n".join(bullets))
    if "finished" in results.get("test", {}):
        plot_curve(results["test"], Path(args.png))
    if args.section:
        replace_between(Path(args.section), SECTION_BEGIN, SECTION_END, lines)
    if args.readme:
        replace_between(Path(args.readme), SUMMARY_BEGIN, SUMMARY_END, bullets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
