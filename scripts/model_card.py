"""Measure the shipped model and two baselines on the 26 held-out Allen test plates, in one run.

    python scripts/model_card.py --out docs/model_card

Models compared (same windows, same grid, same pixelwise scoring):
  * the shipped model (zero-shot from its region prompts: cosine to the prompt ensembles);
  * the untrained dual encoder (ImageNet EfficientNet-Lite0 + MiniLM, random projections);
  * a linear probe (logistic regression) on frozen ImageNet EfficientNet-Lite0 features of the
    same multi-scale windows, fitted on training-split plates only.
Scores: pixelwise per-region precision/recall/F1, macro-F1 and accuracy over the 14 divisions
(labels 0 and 15 ignored), and free-text retrieval precision (top 10% of test tiles) for each
region name and for paraphrases that share no content word with any training caption.

The shipped model is measured as users run it (``precision="auto"``: bf16 on CPUs with native bf16).
Writes ``summary.json`` and ``card.md`` (the tables README.md cites) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_cytoclip.teach import allen
from napari_cytoclip.models.architectures import create_initial_bundle
from napari_cytoclip.models.bundle import default_bundle_path
from napari_cytoclip.teach.evaluate import evaluate_allen_split
from napari_cytoclip.models.model import load_model
from napari_cytoclip.inference.predict import plan_grid
from napari_cytoclip.io.tissue import tissue_mask
from napari_cytoclip.inference.windows import WindowReader


def trunk_features(model, windows: np.ndarray) -> np.ndarray:
    """Pooled ImageNet trunk features (before any projection) of uint8 windows."""
    import torch

    with torch.inference_mode():
        x = model.preprocess(windows)
        return model.model.visual.trunk(x).float().numpy()


def probe_windows(model, plate, stride_um: float, rng):
    images, labels, _ = allen.plate_windows(plate, model.input, model.bundle.label_um, stride_um, rng)
    return trunk_features(model, images), labels


def fit_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, epochs: int = 300):
    """Multinomial logistic regression (L2, class-balanced) fitted with L-BFGS in torch."""
    import torch

    x = torch.from_numpy(features)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    y = torch.from_numpy(labels.astype(np.int64))
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    counts = torch.bincount(y, minlength=n_classes).float().clamp(min=1)
    weight = (counts.sum() / counts) / n_classes
    opt = torch.optim.LBFGS([w, b], max_iter=epochs, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y, weight=weight) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda f: ((torch.from_numpy(f) - mu) / sd @ w + b).argmax(1).detach().numpy()


def evaluate_probe(model, classify, plates, stride_um: float) -> np.ndarray:
    """Pixelwise confusion (16x16) of the probe on ``plates``."""
    from napari_cytoclip.teach.evaluate import pixel_confusion

    cm = np.zeros((16, 16), np.int64)
    for plate in plates:
        section = plate.section()
        mask = tissue_mask(section)
        grid, cells, _ = plan_grid(section, model, stride_um, mask)
        reader = WindowReader(section, model.input, mask.polarity)
        pred = np.concatenate([classify(trunk_features(model, reader.read(grid.centers(cells[i:i + 256]))))
                               for i in range(0, len(cells), 256)]) if len(cells) else np.zeros(0, int)
        labels = np.zeros(grid.shape, np.uint16)
        labels[cells[:, 0], cells[:, 1]] = pred
        cm += pixel_confusion(plate.label_map(), labels, grid, 16, allen.IGNORED_LABELS)
    return cm


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=str(default_bundle_path()))
    ap.add_argument("--data", default=None)
    ap.add_argument("--stride-um", type=float, default=None)
    ap.add_argument("--probe-stride-um", type=float, default=400.0, help="window spacing for probe training pairs")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--readme", default=None, help="also put card.md between the model-card markers of this file")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="the shipped model's precision (default: what users get)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = allen.plates(args.data, "test")
    t0 = time.time()
    model = load_model(args.model, device="auto", precision=args.precision)
    stride = args.stride_um or model.bundle.stride_um
    summary = {"test_plates": [p.number for p in test], "stride_um": stride, "machine": machine(),
               "precision": model_precision(model), "device": str(model.device)}
    report = evaluate_allen_split(model, "test", args.data, out=out / "shipped", stride_um=stride,
                                  overwrite=True)
    summary["shipped"] = {k: report[k] for k in ("macro_f1", "accuracy")}
    summary["shipped_per_region"] = {v["name"]: v["f1"] for v in report["per_region"].values()}
    summary["retrieval"] = report["retrieval"]
    print(f"shipped model: macro-F1 {report['macro_f1']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    if not args.skip_baselines:
        with tempfile.TemporaryDirectory() as tmp:
            init = create_initial_bundle(Path(tmp) / "untrained", model.input.scales_um, model.input.size,
                                         model.bundle.label_um, model.bundle.stride_um)
            untrained = load_model(init, device="cpu", precision="fp32")
            rep = evaluate_allen_split(untrained, "test", args.data, out=out / "untrained", stride_um=stride,
                                       overwrite=True)
            summary["untrained_dual_encoder"] = {k: rep[k] for k in ("macro_f1", "accuracy")}
            print(f"untrained dual encoder: macro-F1 {rep['macro_f1']:.3f}", flush=True)
            rng = np.random.default_rng(0)
            feats, labs = zip(*[probe_windows(untrained, p, args.probe_stride_um, rng)
                                for p in allen.plates(args.data, "train")])
            classify = fit_probe(np.concatenate(feats), np.concatenate(labs), 16)
            cm = evaluate_probe(untrained, classify, test, stride)
            from napari_cytoclip.teach.metrics import scores_from_confusion

            scores = scores_from_confusion(cm, list(range(1, 15)))
            summary["imagenet_linear_probe"] = {"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"],
                                                "train_windows": int(sum(len(l) for l in labs))}
            print(f"linear probe: macro-F1 {scores['macro_f1']:.3f}", flush=True)
    summary["seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    card = card_markdown(summary)
    (out / "card.md").write_text(card)
    print(card)
    if args.readme:
        from napari_cytoclip.io.safe_files import write_between_markers

        write_between_markers(args.readme, "model-card", card)


def machine() -> str:
    import os
    import platform

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"load {load:.1f} at the start")


def model_precision(model) -> str:
    return str(getattr(model, "precision", None) or getattr(model, "dtype", "unknown"))


def card_markdown(s: dict) -> str:
    """The model card tables, generated from one run's summary."""
    lines = [f"Measured by `python scripts/model_card.py --out docs/model_card` on the {len(s['test_plates'])} "
             f"held-out Allen test plates (number % 5 == 0), {s['stride_um']:g} um grid, shipped model in "
             f"{s['precision']} on {s['device']} ({s['machine']}).", "",
             "| model | macro-F1 | accuracy |", "|---|---|---|",
             f"| **shipped `cytoclip-allen-mouse`** (zero-shot from region prompts) | **{s['shipped']['macro_f1']:.3f}** "
             f"| **{s['shipped']['accuracy']:.3f}** |"]
    if "untrained_dual_encoder" in s:
        u, p = s["untrained_dual_encoder"], s["imagenet_linear_probe"]
        lines += [f"| untrained dual encoder (same towers, random projections) | {u['macro_f1']:.3f} | {u['accuracy']:.3f} |",
                  f"| linear probe on frozen ImageNet EfficientNet-Lite0 features, same windows | {p['macro_f1']:.3f} "
                  f"| {p['accuracy']:.3f} |"]
    lines += ["", "Per region (F1, shipped model): " + ", ".join(f"{k} {v:.2f}" for k, v in s["shipped_per_region"].items())
              + ".", ""]
    r = s["retrieval"]
    lines += [f"Free text, region names: precision@10 averages {r['mean_precision_at_10_regions']:.2f}, "
              f"top-10% precision {r['mean_top10pct_precision_regions']:.2f}.",
              "Paraphrases sharing no content word with any training caption (all of them, failures included; "
              "chance = the region's share of test tiles):", "",
              "| query | region | precision@10 | top-10% precision | chance |", "|---|---|---|---|---|"]
    for q in r["queries"]:
        lines.append(f"| {q['text']} | {q['region_name']} | {q.get('precision_at_10', float('nan')):.1f} "
                     f"| {q['top_fraction_precision']:.2f} | {q['chance']:.2f} |")
    good = sum(q["top_fraction_precision"] >= 0.5 for q in r["queries"])
    lines += ["", f"{good} of {len(r['queries'])} paraphrases reach a top-10% precision of 0.5 or more; "
              f"mean top-10% precision {r['mean_top10pct_precision_queries']:.2f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
