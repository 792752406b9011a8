"""The correction loop, end to end on real data: predict, correct, export, fine-tune, predict better.

    HF_HUB_OFFLINE=1 python benchmarks/loop.py --work /tmp/cytoclip-loop

What it does (every model step is a subprocess call of the ``napari-cytoclip`` console script, the
same code path a user takes; each step is skipped when its output exists, so a rerun resumes):

1. **Weak start** (``--start subset``, the default): the default recipe (untrained
   EfficientNet-Lite0 + MiniLM bundle from ``architectures.create_initial_bundle``, pairs from
   ``allen.build_pair_folders``) trained with ``napari-cytoclip train`` on a small subset of the
   training plates (every ``--weak-every``-th one). ``--start stain`` instead uses the shipped model on
   a simulated brightfield cresyl-violet stain of the plates (see :func:`stain_plate`);
   ``--start-model BUNDLE`` uses any bundle you give.
2. **Simulated anatomist**: K unseen training plates (fixed seed; never validation, test, ``qc``
   other than ``ok``, or plates the weak model was trained on; the sets are nested, 1 in 3 in 10) are
   predicted with ``napari-cytoclip predict``. The "corrected" labels are the atlas labels of
   ``labels_coarse/`` (what an anatomist's corrections converge to; 15 = root-only becomes 0 =
   unlabelled), written as a full-resolution label TIFF; ``napari-cytoclip export-pairs IMAGE LABELS
   --prediction DIR`` reduces it to the prediction grid (label at each cell centre) and exports a pair
   for every cell whose label differs from the prediction.
3. **Fine-tune** with ``napari-cytoclip train <K pair folders> --init <start> --replay <start's own
   pairs>`` (arm ``replay``, the recommended recipe: every batch is half corrections, half replay),
   for ``--steps`` optimiser steps (``--epochs``/``--steps-per-epoch`` chosen so that an epoch is
   about one pass over the corrections). Controls, same steps: ``plain`` (the corrections alone, no
   replay) and ``control`` (the replay pairs alone, no corrections: how much is just more training).
   The wall time is measured. Replay pairs are the start model's training pairs (``--start subset``),
   ``--replay-pairs``, or else a small set rebuilt from the Allen training plates.
4. **Evaluate** the start, every fine-tuned model and, for reference, the shipped model with
   ``napari-cytoclip evaluate`` on the held-out test plates (plate number a multiple of 5), at
   ``--eval-stride-um`` on ``--test-plates`` of the 26 (evenly spaced).

Writes ``WORK/results.json``, ``benchmarks/loop_curve.png`` and the loop section of ``benchmarks/README.md``
(between its ``<!-- loop:begin/end -->`` markers; text after the ``<!-- analysis -->`` line is kept).
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


# The no-replay run of this benchmark before replay existed (the previous section, same commands but
# `train` without --replay, warmup 100 steps, about 60 steps; start model 0.510, retrained since).
PREVIOUS_NO_REPLAY = {"start": 0.510, "1": 0.328, "3": 0.446, "10": 0.517,
                      "pairs": {"1": 354, "3": 1397, "10": 3864}}
# Measured earlier with `python benchmarks/loop.py --start stain --ks '' --test-plates 6` (not rerun here).
STAIN_EARLIER = (0.7570, 0.7569, [5, 30, 55, 80, 105, 130], 200.0,
                 "measured in an earlier run with `python benchmarks/loop.py --start stain --ks '' --test-plates 6`")
ANALYSIS_MARK = "<!-- analysis -->"
SECTION_BEGIN, SECTION_END = "<!-- loop:begin -->", "<!-- loop:end -->"  # its part of benchmarks/README.md
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


def pick_test_plates(plates, n: int | None) -> list:
    """``n`` of the test plates, evenly spaced along the AP axis (all when ``n`` is None or too big)."""
    test = sorted((p for p in plates if p.split == "test"), key=lambda p: p.number)
    if not n or n >= len(test):
        return test
    idx = np.unique(np.round(np.linspace(0, len(test) - 1, n)).astype(int))
    return [test[i] for i in idx]


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
        from napari_cytoclip import allen

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
        from napari_cytoclip import allen
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
            from napari_cytoclip import allen
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
        from napari_cytoclip.cli import image_stem

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

    def fine_tune(self, arm: str, k: int, plates: list, start: Path, replay: list[Path]) -> Path:
        """Arm ``replay`` (corrections + replay), ``plain`` (corrections alone) or ``control`` (replay alone)."""
        a = self.args
        key = "control" if arm == "control" else f"{arm}/{k}"
        model = self.work / "models" / key.replace("/", "_K")
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
            per_batch = min(a.batch_size, max(1, int(round(a.batch_size / (1 + a.replay_ratio)))))
            extra = ["--replay", *replay, "--replay-ratio", a.replay_ratio]
        epochs, per_epoch = schedule_for(n, a.steps, per_batch)
        model.parent.mkdir(parents=True, exist_ok=True)
        seconds = self.run("train", *folders, "--init", start, "--out", model, *extra, "--epochs", epochs,
                           "--steps-per-epoch", per_epoch, "--batch-size", a.batch_size, "--lr", a.lr,
                           "--seed", a.seed, "--device", "cpu", "--quiet")
        prov = json.loads((model / "cytoclip.json").read_text()).get("provenance", {})
        self.results["fine_tune"][key] = {
            "arm": arm, "k": 0 if arm == "control" else k, "plates": [] if arm == "control" else
            [p.number for p in plates], "pairs": prov.get("n_pairs"), "replay_pairs": prov.get("n_replay_pairs", 0),
            "epochs": epochs, "steps": epochs * per_epoch, "new_per_batch": per_batch, "batch_size": a.batch_size,
            "warmup_steps": prov.get("config", {}).get("warmup_steps"), "lr": a.lr, "seconds": seconds,
            "train_loop_seconds": sum(h.get("seconds", 0) for h in prov.get("history", [])),
            "load_average_after": self.run.last_load}
        self.save()
        return model

    # -- step 4: evaluate -------------------------------------------------------------------------

    def evaluate(self, name: str, model: Path, test: list, stained: bool | None = None) -> dict:
        a = self.args
        tag = f"{name}_s{a.eval_stride_um:g}_{len(test)}plates"  # a report per model, grid and test set
        out = self.work / "reports" / tag
        images = [self.image_of(p, stained) for p in test]
        if not (out / "report.json").is_file():
            if out.exists():  # an interrupted evaluation
                shutil.rmtree(out)
            seconds = self.run("evaluate", "--model", model, "--images", *images,
                               "--labels", *[p.labels for p in test],
                               "--pixel-size", *[p.um_per_px for p in test], "--stride-um", a.eval_stride_um,
                               "--device", "cpu", "--out", out, "--quiet")
            self.results.setdefault("eval_seconds", {})[tag] = seconds
            self.save()
        report = json.loads((out / "report.json").read_text())
        if [(Path(i["image"]).name, Path(i["labels"]).name) for i in report["images"]] != \
                [(im.name, p.labels.name) for im, p in zip(images, test)]:
            raise SystemExit(f"{out} was made for other test images; remove it to evaluate again")
        return {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
                "per_region": {v["name"]: v.get("f1") for v in report["per_region"].values()},
                "n_images": report["n_images"], "pixels_scored": report["pixels_scored"],
                "report": str(out / "report.json")}

    # -- all --------------------------------------------------------------------------------------

    def main(self) -> dict:
        from napari_cytoclip.models.bundle import default_bundle_path

        a = self.args
        t0 = time.perf_counter()
        ks = sorted(set(a.ks))
        self.results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        self.results["machine"] = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                                   "platform": platform.platform()}
        start = self.start_model()
        exclude = set(self.results.get("start", {}).get("plates", []))
        corrected = pick_corrected_plates(self.all_plates, exclude, max(ks, default=0), a.seed)
        test = pick_test_plates(self.all_plates, a.test_plates)
        self.results["test_plates"] = [p.number for p in test]
        self.results["corrected_order"] = [p.number for p in corrected]
        self.results["scores"] = scores = {}
        self.save()
        self.log(f"start model {start}; corrected plates (in order) {[p.number for p in corrected]}; "
                 f"{len(test)} test plates {[p.number for p in test]}")
        scores["start"] = self.evaluate("K00", start, test)
        self.save()
        replay = self.replay_folders(start) if ks else []
        arms = [arm for arm in ARMS if arm == "replay" or a.controls]
        for arm in arms:  # the recipe first: its numbers are in even if the controls run out of time
            for k in ks:
                for plate in corrected[:k]:
                    self.correct(plate, start)
                model = self.fine_tune(arm, k, corrected[:k], start, replay)
                scores[f"{arm}/{k}"] = self.evaluate(f"{arm}_K{k:02d}", model, test)
                self.save()
            if arm == "replay" and a.controls and ks:
                scores["control"] = self.evaluate("control", self.fine_tune("control", 0, [], start, replay), test)
                self.save()
        if a.reference:
            self.results["reference"] = self.evaluate("shipped", default_bundle_path(), test, stained=False)
            shipped = json.loads((default_bundle_path() / "cytoclip.json").read_text()).get("provenance", {})
            self.results["reference"].update(train_plates=_n_plates(shipped), pairs=shipped.get("n_pairs"))
        if a.stain_check and a.start != "stain":
            # the shipped model on the same test plates rendered as brightfield colour (stain_plate)
            self.results["stain_check"] = self.evaluate("shipped_stained", default_bundle_path(), test, stained=True)
        self.results["wall_seconds_this_run"] = time.perf_counter() - t0
        self.save()
        self.log(f"done in {time.perf_counter() - t0:.0f} s: " +
                 ", ".join(f"{k} {v['macro_f1']:.3f}" for k, v in scores.items()))
        return self.results


# ---------------------------------------------------------------------------------------------
# curve and README section

def arm_ks(results: dict, arm: str) -> list[int]:
    return sorted(int(k.split("/")[1]) for k in results["scores"] if k.startswith(arm + "/"))


def plot_curve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = results["scores"]
    k0 = scores["start"]["macro_f1"]
    fig, ax = plt.subplots(figsize=(8.0, 3.8), dpi=120)
    styles = {"replay": ("o-", "#3b5bdb", "corrections + replay (recipe)"),
              "plain": ("s--", "#e8590c", "corrections alone")}
    all_ks = [0]
    for arm, (fmt, colour, label) in styles.items():
        ks = arm_ks(results, arm)
        if not ks:
            continue
        all_ks += ks
        f1 = [k0] + [scores[f"{arm}/{k}"]["macro_f1"] for k in ks]
        ax.plot([0] + ks, f1, fmt, color=colour, label=label)
        if arm == "replay":
            for k, v in zip([0] + ks, f1):
                ax.annotate(f"{v:.3f}", (k, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    prev = PREVIOUS_NO_REPLAY
    pk = [k for k in ("1", "3", "10") if k in prev]
    ax.plot([0] + [int(k) for k in pk], [prev["start"]] + [prev[k] for k in pk], "x:", color="#868e96",
            label="corrections alone, earlier run (warmup 100)")
    if "control" in scores:
        ax.axhline(scores["control"]["macro_f1"], ls="-.", color="#2b8a3e", alpha=0.8,
                   label=f"replay alone, no corrections ({scores['control']['macro_f1']:.3f})")
    if "reference" in results:
        ax.axhline(results["reference"]["macro_f1"], ls="--", color="gray",
                   label=f"shipped model ({results['reference']['macro_f1']:.3f})")
    ks = sorted(set(all_ks + [int(k) for k in pk]))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlim(-0.15, max(ks) * 1.25)
    ax.set_xlabel("corrected plates K (0 = start model)")
    ax.set_ylabel("macro-F1, held-out test plates")
    c = results["config"]
    ax.set_title(f"Correction loop: {len(results['test_plates'])} test plates, {c['eval_stride_um']:g} um grid, "
                 f"{c['steps']} fine-tune steps", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _n_plates(provenance: dict) -> int | None:
    """Training plates behind a bundle, when its provenance lists its pair folders."""
    pairs = provenance.get("pairs")
    return len(pairs) if isinstance(pairs, list) else None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def region_rows(results: dict, keys: list[str]) -> list[tuple[str, list[float]]]:
    """Per-region F1 for each score key, sorted by the gain of the last key over the first."""
    scores = results["scores"]
    names = list(scores[keys[-1]]["per_region"])
    rows = [(name, [scores[k]["per_region"].get(name) or 0.0 for k in keys]) for name in names]
    return sorted(rows, key=lambda r: r[1][-1] - r[1][0], reverse=True)


def _stain_numbers(results: dict, stain_results: dict | None):
    """(shipped on plates, shipped on stained plates, plates, stride, how measured)."""
    if "stain_check" in results and "reference" in results:
        return (results["reference"]["macro_f1"], results["stain_check"]["macro_f1"], results["test_plates"],
                results["config"]["eval_stride_um"], "measured in this run")
    if stain_results and "reference" in stain_results and stain_results["config"]["start"] == "stain":
        c = stain_results["config"]
        return (stain_results["reference"]["macro_f1"], stain_results["scores"]["start"]["macro_f1"],
                stain_results["test_plates"], c["eval_stride_um"],
                f"measured with `python benchmarks/loop.py --start stain --ks '' --test-plates {c['test_plates']}`")
    return STAIN_EARLIER


def _delta(score: dict | None, base: float) -> str:
    return "-" if score is None else f"{score['macro_f1']:.3f} ({score['macro_f1'] - base:+.3f})"


def write_section(results: dict, path: Path, command: str, stain_results: dict | None = None) -> None:
    c = results["config"]
    scores = results["scores"]
    ks = arm_ks(results, "replay") or arm_ks(results, "plain")
    ft = results.get("fine_tune", {})
    start = results.get("start", {})
    corr = results.get("corrections", {})
    rep = results.get("replay", {})
    cores = results["machine"]["cpu_count"]
    k0 = scores["start"]["macro_f1"]
    lines = ["## The correction loop: predict, correct, export, fine-tune, evaluate", "",
             f"Rerun: `{command}` (resumes; each step is skipped when its output exists).", ""]
    res = "; ".join(f"K = {k}: {_delta(scores.get(f'replay/{k}'), k0)}" for k in arm_ks(results, "replay"))
    lines += [f"**Result**: macro-F1 on the {len(results['test_plates'])} held-out test plates, start model "
              f"{k0:.3f}; after fine-tuning with replay on K corrected plates: {res}."]
    if "control" in scores:
        lines[-1] += (f" The same number of steps on the replay pairs alone, without any correction, gives "
                      f"{scores['control']['macro_f1']:.3f}.")
    if arm_ks(results, "plain"):
        lines[-1] += " Without replay: " + "; ".join(
            f"K = {k}: {_delta(scores.get(f'plain/{k}'), k0)}" for k in arm_ks(results, "plain")) + "."
    lines.append("")
    if c["start"] == "subset" and not c.get("start_model"):
        lines.append(
            f"Start model (K = 0): the default recipe (`architectures.create_initial_bundle` + "
            f"`allen.build_pair_folders` + `napari-cytoclip train`) trained on {len(start.get('plates', []))} training "
            f"plates ({', '.join(map(str, start.get('plates', [])))}; every {c['weak_every']}th), "
            f"{start.get('pairs')} pairs at {start.get('pair_stride_um'):g} um, {start.get('epochs')} epoch(s) of "
            f"batch {start.get('batch_size')}, lr {start.get('lr')}, warmup {start.get('warmup_steps', 100)} steps: "
            f"{start.get('train_seconds', 0):.0f} s on {cores} CPU cores.")
    elif c.get("start_model"):
        lines.append(f"Start model (K = 0): `{c['start_model']}`.")
    else:
        lines.append("Start model (K = 0): the shipped model on the plates rendered as brightfield cresyl-violet "
                     "colour (`stain_plate` in `benchmarks/loop.py`).")
    lines += ["",
              f"Simulated anatomist: K unseen training plates (qc ok; not validation, test or start plates; seed "
              f"{c['seed']}; nested) predicted with `napari-cytoclip predict --stride-um {c['predict_stride_um']:g}`, "
              f"corrected to the atlas labels of `labels_coarse/` (full-resolution label TIFF, root-only 15 left "
              f"unlabelled), exported with `napari-cytoclip export-pairs IMAGE LABELS --prediction DIR` (a pair per "
              f"cell whose corrected label differs from the prediction).", "",
              f"Fine-tune: `napari-cytoclip train PAIRS... --init START --replay REPLAY... --replay-ratio "
              f"{c['replay_ratio']:g}` ({c['steps']} steps of batch {c['batch_size']}, "
              f"{len(rep.get('folders', []))} replay folders = the start model's own {rep.get('pairs')} training "
              f"pairs, lr {c['lr']}, default warmup = a tenth of the steps, `--device cpu`; `--epochs` and "
              f"`--steps-per-epoch` set so that an epoch is about one pass over the corrections). Controls with "
              f"the same steps: *no replay* (the corrections alone, as before replay existed) and *replay alone* "
              f"(the replay pairs, no corrections: what extra training on the start data gives by itself). "
              f"Evaluated with `napari-cytoclip evaluate` on {len(results['test_plates'])} held-out test plates "
              f"({', '.join(map(str, results['test_plates']))}) at a {c['eval_stride_um']:g} um grid (labels 0 and "
              f"15 ignored).", "",
              "![macro-F1 against the number of corrected plates](loop_curve.png)", "",
              "| K | corrected plates | corrected pairs | steps | fine-tune (s) | load avg | macro-F1, with replay "
              "| accuracy | macro-F1, no replay | no replay, earlier run |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| 0 | - | - | - | - | - | {k0:.3f} | {scores['start']['accuracy']:.3f} | {k0:.3f} | "
              f"{PREVIOUS_NO_REPLAY['start']:.3f} |"]
    for k in ks:
        f = ft.get(f"replay/{k}", ft.get(f"plain/{k}", {}))
        r, p = scores.get(f"replay/{k}"), scores.get(f"plain/{k}")
        lines.append(f"| {k} | {', '.join(map(str, f.get('plates', [])))} | {f.get('pairs')} | {f.get('steps')} | "
                     f"{f.get('seconds', 0):.0f} | {_fmt(f.get('load_average_after'))} | "
                     f"{'-' if r is None else format(r['macro_f1'], '.3f')} | "
                     f"{'-' if r is None else format(r['accuracy'], '.3f')} | "
                     f"{'-' if p is None else format(p['macro_f1'], '.3f')} | "
                     f"{PREVIOUS_NO_REPLAY.get(str(k), float('nan')):.3f} |")
    if "control" in scores:
        f = ft.get("control", {})
        lines.append(f"| replay alone | - | 0 (+{f.get('pairs')} replay) | {f.get('steps')} | "
                     f"{f.get('seconds', 0):.0f} | {_fmt(f.get('load_average_after'))} | "
                     f"{scores['control']['macro_f1']:.3f} | {scores['control']['accuracy']:.3f} | | |")
    if "reference" in results:
        r = results["reference"]
        plates = f"all {r['train_plates']} training plates" if r.get("train_plates") else "all training plates"
        lines.append(f"| shipped model | {plates} | {r.get('pairs')} | | | | {r['macro_f1']:.3f} | "
                     f"{r['accuracy']:.3f} | | 0.829 |")
    lines += ["", "Fine-tune seconds are the wall time of the `napari-cytoclip train` command with replay (model, "
              f"pair and replay loading included) on {cores} CPU cores; 'load avg' is the 1-minute load average when "
              f"it finished (above {cores} means the cores were shared with other work). The earlier run's numbers "
              "come from the previous version of this benchmark (no replay, 100 warmup steps for a 60-step "
              f"fine-tune, start model {PREVIOUS_NO_REPLAY['start']:.3f}; the start model has been retrained since "
              "with the same recipe).", ""]
    if corr:
        lines += ["| plate | cells corrected = pairs | predict (s) | export (s) |", "|---|---|---|---|"]
        for key in sorted(corr, key=lambda s: results["corrected_order"].index(corr[s]["plate"])):
            e = corr[key]
            lines.append(f"| {e['plate']} | {e['pairs']} | {e['predict_seconds']:.0f} | {e['export_seconds']:.0f} |")
        lines.append("")
    rks = arm_ks(results, "replay")
    if rks:
        keys = ["start"] + (["control"] if "control" in scores else []) + [f"replay/{k}" for k in rks]
        heads = ["start"] + (["replay alone"] if "control" in scores else []) + [f"K = {k}" for k in rks]
        lines += [f"Per-region F1 with replay, sorted by the gain of K = {rks[-1]} over the start model:", "",
                  "| region | " + " | ".join(heads) + " | gain over start" +
                  (" | gain over replay alone |" if "control" in scores else " |"),
                  "|---|" + "---|" * (len(heads) + 1 + ("control" in scores))]
        for name, vals in region_rows(results, keys):
            extra = f" | {vals[-1] - vals[1]:+.3f}" if "control" in scores else ""
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {vals[-1] - vals[0]:+.3f}"
                         + extra + " |")
        lines.append("")
    ref, st, plates, stride, how = _stain_numbers(results, stain_results)
    lines += [f"Why not the stained start: the shipped model scores macro-F1 {ref:.4f} on test plates "
              f"{', '.join(map(str, plates))} ({stride:g} um grid) and {st:.4f} on the same plates rendered as "
              "MD787-like brightfield cresyl-violet colour (`stain_plate`: inverted, Beer-Lambert colour ramp "
              "calibrated to MD787's mean tissue and background RGB, per-plate jitter of stain strength, blue "
              "share and background tint, sensor noise). The model reads grey levels and detects polarity "
              f"itself, so this stain barely weakens it and is no weak start ({how}; `--start stain` runs the "
              "whole loop from it anyway).", ""]
    ev = results.get("eval_seconds", {})
    if ev:
        lines.append("Evaluation wall time per model: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(ev.items())) + ".")
        lines.append("")
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if SECTION_BEGIN in old and SECTION_END in old:
        head, rest = old.split(SECTION_BEGIN, 1)
        body, tail = rest.split(SECTION_END, 1)
    else:  # no section yet: append one
        head, body, tail = old + ("\n" if old else ""), "", "\n"
    kept = body[body.index(ANALYSIS_MARK):] if ANALYSIS_MARK in body else ANALYSIS_MARK + "\n"
    text = (head + SECTION_BEGIN + "\n" + "\n".join(lines) + "\n" + kept.rstrip("\n") + "\n"
            + SECTION_END + tail)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/cytoclip-loop", help="work folder (resumable)")
    ap.add_argument("--data", default=None, help="folder holding allen_ara_coronal_nissl_plates (default ../shared/data)")
    ap.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 3, 10],
                    help="numbers of corrected plates (comma separated)")
    ap.add_argument("--start", choices=["subset", "stain"], default="subset", help="the weak start (see above)")
    ap.add_argument("--start-model", default=None, help="use this bundle as the start model instead")
    ap.add_argument("--weak-every", type=int, default=8, help="start model: every Nth training plate")
    ap.add_argument("--weak-pair-stride-um", type=float, default=240.0)
    ap.add_argument("--weak-steps", type=int, default=720, help="start model: optimiser steps (720: converged)")
    ap.add_argument("--weak-lr", type=float, default=2e-3)
    ap.add_argument("--predict-stride-um", type=float, default=200.0, help="grid the anatomist corrects")
    ap.add_argument("--eval-stride-um", type=float, default=200.0)
    ap.add_argument("--test-plates", type=int, default=None, help="evaluate on N evenly spaced test plates (26)")
    ap.add_argument("--steps", type=int, default=200, help="fine-tune: optimiser steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--replay-ratio", type=float, default=1.0, help="replay pairs per corrected pair in a batch")
    ap.add_argument("--replay-pairs", nargs="+", default=None, help="replay pair folders (default: the start's own)")
    ap.add_argument("--no-controls", dest="controls", action="store_false",
                    help="skip the no-replay and replay-alone fine-tunes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", dest="reference", action="store_false", help="skip the shipped model's score")
    ap.add_argument("--stain-check", dest="stain_check", action="store_true",
                    help="also score the shipped model on the stained test plates")
    ap.add_argument("--stain-results", default=None,
                    help="results.json of a '--start stain' run to quote in the section")
    ap.add_argument("--report-only", action="store_true", help="only redraw the curve and section from results.json")
    ap.add_argument("--png", default=str(HERE / "loop_curve.png"))
    ap.add_argument("--section", default=str(HERE / "README.md"), help="Markdown file whose loop section is rewritten")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report_only:
        results = json.loads((Path(args.work) / "results.json").read_text())
    else:
        results = Loop(args).main()
    if any(k != "start" for k in results["scores"]):  # a curve and a section only when something was fine-tuned
        import shlex

        plot_curve(results, Path(args.png))
        given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
        stain = json.loads(Path(args.stain_results).read_text()) if args.stain_results else None
        write_section(results, Path(args.section), "HF_HUB_OFFLINE=1 " + shlex.join(["python", "benchmarks/loop.py",
                                                                                     *given]), stain)
    print(json.dumps({k: v["macro_f1"] for k, v in results["scores"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
