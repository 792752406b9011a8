"""Bring your own CytoCLIP, end to end on real data, through open_clip's own trainer (issue 14).

    HF_HUB_OFFLINE=1 python benchmarks/byo_cytoclip.py --work /tmp/cytoclip-byo

Every step is a subprocess (the ``napari-cytoclip`` console script, or ``python -m
open_clip_train.main``): the same commands the README gives a user. Each step is skipped when its
output exists, so a rerun resumes (training resumes from open_clip_train's latest epoch).

1. **Export** in an RGB geometry: predict each TRAINING plate (``--plates``, default 21 41 61 81)
   with the shipped model, take the atlas labels as the corrected labels (root-only 15 left
   unlabelled), and ``export-pairs --reviewed --tile-px 64 --tile-um 640 --mode rgb`` them all into one
   pair folder: native-colour 64 px tiles of 640 um (10 um/px), one per grid cell.
2. **Train** a small open_clip CLIP from scratch (a 4-layer ViT at 64 px with open_clip's built-in
   text tower, config in ``WORK/arch/open_clip_config.json``) with the real ``python -m
   open_clip_train.main --train-data pairs.csv --dataset-type csv ...`` for ``--epochs`` epochs.
3. **Import** its last checkpoint with ``napari-cytoclip import-model --config ... --tile-px 64
   --tile-um 640 --mode rgb`` (the regions' prompts are the captions it was trained on).
4. **Evaluate** the imported model, and the shipped one for reference, with ``napari-cytoclip evaluate``
   on one TEST plate (``--test-plate``, number % 5 == 0) at ``--stride-um``.

No accuracy target: this shows the path runs and what a few CPU minutes of training give.
Prints a summary and writes it to ``benchmarks/README.md`` between the ``byo:begin/end`` markers.
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

HERE = Path(__file__).resolve().parent
CLI = shutil.which("napari-cytoclip") or str(Path(sys.executable).with_name("napari-cytoclip"))
ROOT_ONLY = 15
ARCH = {"embed_dim": 192,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "patch_size": 8, "head_width": 64},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 3}}
BEGIN, END = "<!-- byo:begin -->", "<!-- byo:end -->"


def run(log: list, *args, cwd: Path | None = None) -> float:
    """Run a command (napari-cytoclip unless the first argument is a list), return its wall seconds."""
    cmd = list(args[0]) + [str(a) for a in args[1:]] if isinstance(args[0], list) else [CLI, *map(str, args)]
    print("$", " ".join(map(str, cmd)), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    log.append({"cmd": [Path(str(c)).name if i == 0 else str(c) for i, c in enumerate(cmd)], "seconds": round(seconds, 1)})
    return seconds


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_path = self.work / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.log = self.results.setdefault("commands", [])

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=1))

    def plate(self, n: int):
        from napari_cytoclip.teach import allen

        found = [p for p in allen.plates() if p.number == n]
        if not found:
            raise SystemExit(f"plate {n} is not a usable Allen plate in {allen.default_data_dir()}")
        return found[0]

    # -- 1: export pairs in an RGB geometry from training plates ----------------------------------
    def export(self) -> Path:
        import numpy as np
        import tifffile

        a = self.args
        export = self.work / "export"
        done = self.results.setdefault("export", {})
        for n in a.plates:
            plate = self.plate(n)
            if plate.split != "train":
                raise SystemExit(f"plate {n} is a {plate.split} plate; export only training plates")
            key = f"plate_{n:03d}"
            if key in done:
                continue
            pred = self.work / "predict" / Path(plate.image).stem
            if pred.exists():  # an interrupted prediction
                shutil.rmtree(pred)
            t_pred = run(self.log, "predict", plate.image, "--out", self.work / "predict", "--pixel-size",
                         plate.um_per_px, "--stride-um", a.stride_um, "--device", "cpu", "--quiet")
            labels = self.work / "corrections" / f"{key}.tif"
            labels.parent.mkdir(parents=True, exist_ok=True)
            atlas = np.asarray(plate.label_map()).astype(np.uint16)
            atlas[atlas == ROOT_ONLY] = 0
            tifffile.imwrite(labels, atlas, compression="zlib")
            t_exp = run(self.log, "export-pairs", plate.image, labels, "--prediction", pred, "--out", export,
                        "--reviewed", "--tile-px", a.tile_px, "--tile-um", a.tile_um, "--mode", "rgb",
                        "--device", "cpu", "--quiet")
            done[key] = {"predict_s": round(t_pred, 1), "export_s": round(t_exp, 1)}
            self.save()
        with open(export / "pairs" / "pairs.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        self.results["pairs"] = len(rows)
        self.results["captions"] = sorted({r["caption"] for r in rows})
        return export

    # -- 2: train with open_clip's own trainer ----------------------------------------------------
    def train(self, export: Path) -> Path:
        a = self.args
        arch = self.work / "arch"
        arch.mkdir(exist_ok=True)
        (arch / "open_clip_config.json").write_text(json.dumps({"model_cfg": ARCH}, indent=1))
        logs = self.work / "oc_logs"
        last = logs / "byo" / "checkpoints" / f"epoch_{a.epochs}.pt"
        if not last.is_file():
            seconds = run(self.log, [sys.executable, "-m", "open_clip_train.main"],
                          "--model", f"local-dir:{arch}", "--train-data", "pairs.csv", "--dataset-type", "csv",
                          "--csv-img-key", "filepath", "--csv-caption-key", "caption", "--csv-separator", ",",
                          "--batch-size", a.batch_size, "--epochs", a.epochs, "--lr", a.lr, "--warmup", a.warmup,
                          "--wd", 0.1, "--workers", 0, "--precision", "fp32", "--seed", 0, "--logs", logs,
                          "--name", "byo", "--save-frequency", 1, "--save-most-recent", "--resume", "latest",
                          "--report-to", "", "--log-every-n-steps", 20, cwd=export / "pairs")
            self.results["train_s"] = self.results.get("train_s", 0.0) + round(seconds, 1)
            self.save()
        return last

    # -- 3: import the checkpoint -----------------------------------------------------------------
    def import_model(self, checkpoint: Path, export: Path) -> Path:
        a = self.args
        bundle = self.work / "byo_model"
        if (bundle / "cytoclip.json").is_file():
            return bundle
        regions = self.work / "regions.csv"
        with open(export / "regions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        with open(regions, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "name", "acronym", "color", "prompts"])
            for r in rows:  # the first prompt is the caption export-pairs wrote for the region
                w.writerow([r["id"], r["name"], r["acronym"], r["color"], (r.get("prompts") or "").split("|")[0]])
        self.results["import_s"] = round(run(
            self.log, "import-model", checkpoint, "--config", self.work / "arch" / "open_clip_config.json",
            "--regions", regions, "--tile-px", a.tile_px, "--tile-um", a.tile_um, "--mode", "rgb",
            "--stride-um", a.stride_um, "--out", bundle), 1)
        self.save()
        return bundle

    # -- 4: evaluate on a test plate --------------------------------------------------------------
    def evaluate(self, name: str, model: Path | None) -> dict:
        a = self.args
        plate = self.plate(a.test_plate)
        if plate.split != "test":
            raise SystemExit(f"plate {a.test_plate} is not a test plate (number % 5 == 0)")
        out = self.work / "reports" / f"{name}_plate{a.test_plate}"
        if not (out / "report.json").is_file():
            if out.exists():
                shutil.rmtree(out)
            model_args = ["--model", model] if model else []
            self.results[f"eval_{name}_s"] = round(run(
                self.log, "evaluate", *model_args, "--images", plate.image, "--labels", plate.labels,
                "--pixel-size", plate.um_per_px, "--stride-um", a.stride_um, "--device", "cpu", "--out", out,
                "--quiet"), 1)
            self.save()
        report = json.loads((out / "report.json").read_text())
        return {"macro_f1": report["macro_f1"], "accuracy": report["accuracy"]}

    def main(self) -> str:
        import torch

        t0 = time.perf_counter()
        export = self.export()
        checkpoint = self.train(export)
        bundle = self.import_model(checkpoint, export)
        self.results["byo"] = self.evaluate("byo", bundle)
        self.results["shipped"] = self.evaluate("shipped", None)
        self.results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
                                   f"(torch threads {torch.get_num_threads()}), Python {platform.python_version()}, "
                                   f"torch {torch.__version__}")
        self.results["this_run_s"] = round(time.perf_counter() - t0, 1)
        self.save()
        return summary(self.results, self.args)


def summary(r: dict, a) -> str:
    exp = r["export"]
    lines = [f"Command: `HF_HUB_OFFLINE=1 python benchmarks/byo_cytoclip.py --plates {' '.join(map(str, a.plates))} "
             f"--test-plate {a.test_plate} --epochs {a.epochs}`", "",
             f"- Machine: {r['machine']}.",
             f"- Data: Allen training plates {', '.join(k.split('_')[1].lstrip('0') for k in exp)} predicted with the "
             f"shipped model on a {a.stride_um:g} um grid; atlas labels as the corrections; `export-pairs --reviewed "
             f"--tile-px {a.tile_px} --tile-um {a.tile_um:g} --mode rgb`: {r['pairs']} pairs "
             f"({len(r['captions'])} captions).",
             f"- Model: open_clip CLIP from scratch, ViT {ARCH['vision_cfg']['layers']} layers x "
             f"{ARCH['vision_cfg']['width']} at {ARCH['vision_cfg']['image_size']} px (patch "
             f"{ARCH['vision_cfg']['patch_size']}), built-in text tower {ARCH['text_cfg']['layers']} x "
             f"{ARCH['text_cfg']['width']}, trained with `python -m open_clip_train.main` (csv, batch {a.batch_size}, "
             f"{a.epochs} epochs, lr {a.lr:g}, warmup {a.warmup}).",
             f"- Wall times: predict {sum(v['predict_s'] for v in exp.values()):.0f} s and export "
             f"{sum(v['export_s'] for v in exp.values()):.0f} s for {len(exp)} plates; train {r.get('train_s', 0):.0f} s; "
             f"import-model {r['import_s']:.1f} s; evaluate {r.get('eval_byo_s', 0):.0f} s.",
             f"- Test plate {a.test_plate} (pixelwise over the 14 divisions at {a.stride_um:g} um): imported model "
             f"macro-F1 **{r['byo']['macro_f1']:.3f}** (accuracy {r['byo']['accuracy']:.3f}); shipped model on the same "
             f"plate and grid {r['shipped']['macro_f1']:.3f} ({r['shipped']['accuracy']:.3f}).", ""]
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    body = f"{BEGIN}\n## `byo_cytoclip.py`: bring your own CytoCLIP through open_clip_train\n\n{text}\n{END}"
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + body + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(new)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/cytoclip-byo")
    ap.add_argument("--plates", type=int, nargs="+", default=[21, 41, 61, 81], help="training plates to export")
    ap.add_argument("--test-plate", type=int, default=45)
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--tile-um", type=float, default=640.0)
    ap.add_argument("--stride-um", type=float, default=200.0)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    text = Bench(args).main()
    print(text, flush=True)
    if not args.no_readme:
        write_section(text, HERE / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
