"""Scoring a model against label images: pixelwise region metrics and text-to-tile retrieval.

Each image is predicted on its grid, the grid labels are painted back on the image's own pixel
grid (nearest cell centre) and compared with the label image pixel by pixel; pixels whose truth
is in ``ignore`` are skipped. One confusion matrix accumulates over all images. Retrieval ranks
every encoded tile (labelled by the majority truth in its ``label_um`` square) by its similarity
to each region's text embedding and to free-text queries.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from napari_cytoclip.errors import CytoclipError
from napari_cytoclip.io.safe_files import atomic_write_text, atomic_write_with, check_output_folder, new_output_folder
from napari_cytoclip.models.model import CytoClip
from napari_cytoclip.io.safe_files import now_iso
from napari_cytoclip.outputs.prediction_folder import upsample_rows

REPORT_JSON = "report.json"
CONFUSION_PNG = "confusion.png"
F1_PNG = "f1_per_region.png"
TOP_K = (10, 50, 100)
TOP_FRACTION = 0.1
ROW_BLOCK = 1024

Progress = Callable[[int, int, str], None]


def evaluate(model: CytoClip, images: Sequence[str | Path], labels: Sequence[str | Path], out: str | Path, *,
             pixel_sizes: Sequence[float] | None = None, ignore: Sequence[int] = (0, 15),
             stride_um: float | None = None, queries: dict[int, Sequence[str] | str] | None = None,
             progress: Progress | None = None, overwrite: bool = False, batch_size: int = 64,
             info: dict | None = None) -> dict:
    """Predict every image, score it against its label image and write the report into ``out``.

    ``progress(done_tiles, total_tiles, image_name)`` is called after each batch; ``info`` is
    added to the report as it is. Writes ``report.json``, ``confusion.png`` and
    ``f1_per_region.png`` into a new folder (an earlier report folder is replaced only with ``overwrite``,
    and only when napari-cytoclip wrote all of it); returns the report.
    """
    images, labels = [Path(p) for p in images], [Path(p) for p in labels]
    out = Path(out)
    _check_inputs(images, labels, pixel_sizes, out, overwrite)
    ignore = tuple(int(i) for i in ignore)
    region_ids = [r.id for r in model.regions]
    n_classes = max(region_ids + list(ignore)) + 1
    cm = np.zeros((n_classes, n_classes), np.int64)
    tiles_emb, tiles_lab, per_image = [], [], []
    for i, (image, label_path) in enumerate(zip(images, labels)):
        px = None if pixel_sizes is None else float(pixel_sizes[i])
        item = _evaluate_image(model, image, label_path, px, ignore, n_classes, stride_um, batch_size, progress)
        cm += item.pop("confusion")
        tiles_emb.append(item.pop("tile_embeddings"))
        tiles_lab.append(item.pop("tile_labels"))
        per_image.append(item)
    report = {**_report(model, cm, ignore, per_image, stride_um), **(info or {})}
    report["retrieval"] = retrieval_report(model, np.concatenate(tiles_emb), np.concatenate(tiles_lab),
                                           _normalise_queries(queries))
    _write_report(report, cm, model, out, overwrite)
    return report


def _check_inputs(images: list[Path], labels: list[Path], pixel_sizes, out: Path, overwrite: bool) -> None:
    if not images:
        raise ValueError("no images to evaluate")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label images: give one label image per image")
    if pixel_sizes is not None and len(pixel_sizes) != len(images):
        raise ValueError(f"{len(pixel_sizes)} pixel sizes for {len(images)} images")
    for path in [*images, *labels]:
        if not path.is_file():
            raise CytoclipError(path, "no such file")
    check_output_folder(out, overwrite, inputs=[*images, *labels])


def _evaluate_image(model: CytoClip, image: Path, label_path: Path, pixel_size: float | None, ignore: tuple,
                    n_classes: int, stride_um: float | None, batch_size: int, progress: Progress | None) -> dict:
    from napari_cytoclip.teach.allen import majority_labels
    from napari_cytoclip.teach.export import read_label_image
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section

    section = open_section(image, pixel_size_um=pixel_size)
    try:
        truth = read_label_image(label_path)
        if tuple(truth.shape) != tuple(section.shape):
            raise CytoclipError(label_path, f"the label image is {truth.shape[1]}x{truth.shape[0]} px, "
                                            f"the image {section.shape[1]}x{section.shape[0]} px")
        _check_truth_ids(truth, n_classes, ignore, [r.id for r in model.regions], label_path)
        section.require_pixel_size()
        t0 = time.perf_counter()
        report = None if progress is None else (lambda d, t: progress(d, t, image.name))
        pred = predict_section(section, model, stride_um=stride_um, batch_size=batch_size, progress=report)
        seconds = time.perf_counter() - t0
    finally:
        section.close()
    cm = pixel_confusion(truth, pred.labels, pred.grid, n_classes, ignore)
    half = pred.label_um / pred.grid.pixel_size_um / 2
    tile_labels = majority_labels(truth, pred.grid.centers(pred.cells), half)[0] if len(pred.cells) \
        else np.zeros(0, np.int32)
    keep = ~np.isin(tile_labels, ignore)
    scored = int(cm.sum())
    return {"image": str(image), "labels": str(label_path), "pixel_size_um": pred.grid.pixel_size_um,
            "grid_shape": list(pred.grid.shape), "encoded_tiles": int(len(pred.cells)),
            "pixels_scored": scored, "accuracy": float(np.trace(cm) / scored) if scored else None,
            "seconds": seconds, "confusion": cm,
            "tile_embeddings": np.asarray(pred.embeddings, np.float16)[keep], "tile_labels": tile_labels[keep]}


def _check_truth_ids(truth: np.ndarray, n_classes: int, ignore: tuple, region_ids: list[int], source: Path) -> None:
    ids = {int(v) for v in np.unique(truth)}
    unknown = sorted(ids - set(region_ids) - set(ignore))
    if unknown:
        raise CytoclipError(source, f"label ids {unknown} are neither regions of the model nor ignored "
                                    f"(ignore={list(ignore)})")


def pixel_confusion(truth: np.ndarray, grid_labels: np.ndarray, grid, n_classes: int, ignore: Sequence[int]) -> np.ndarray:
    """Confusion matrix (truth rows, prediction columns) of grid labels painted on the truth's pixel grid."""
    from napari_cytoclip.teach.metrics import confusion_matrix

    height, width = truth.shape
    cm = np.zeros((n_classes, n_classes), np.int64)
    for y0 in range(0, height, ROW_BLOCK):
        y1 = min(y0 + ROW_BLOCK, height)
        pred = upsample_rows(np.asarray(grid_labels), grid, y0, y1, width)
        cm += np.asarray(confusion_matrix(truth[y0:y1], pred, n_classes, ignore=tuple(ignore)), np.int64)
    return cm


def _report(model: CytoClip, cm: np.ndarray, ignore: tuple, per_image: list[dict], stride_um: float | None) -> dict:
    from napari_cytoclip.teach.metrics import scores_from_confusion

    names = {r.id: r.name for r in model.regions}
    support = cm.sum(1)
    class_ids = [r.id for r in model.regions if r.id not in ignore and support[r.id] > 0]
    scores = scores_from_confusion(cm, class_ids)
    return {
        "created": now_iso(), "model": {"name": model.bundle.name, "hash": model.model_hash,
                                        "label_um": model.bundle.label_um, "input": model.bundle.to_json()["input"]},
        "stride_um": float(stride_um or model.bundle.stride_um), "ignore": list(ignore),
        "n_images": len(per_image), "pixels_scored": int(cm.sum()),
        "class_ids": class_ids, "class_names": [names[i] for i in class_ids],
        "macro_f1": float(scores["macro_f1"]), "accuracy": float(scores["accuracy"]),
        "per_region": _per_region(scores, class_ids, names),
        "confusion": {"labels": list(range(cm.shape[0])), "matrix": cm.tolist(),
                      "rows": "truth", "columns": "prediction (0 = no tissue predicted)"},
        "images": per_image,
    }


def _per_region(scores: dict, class_ids: list[int], names: dict) -> dict:
    per = scores.get("per_class", scores.get("per_region", {}))
    out = {}
    for rid in class_ids:
        entry = per.get(rid, per.get(str(rid), {}))
        out[str(rid)] = {"name": names[rid], **{k: _plain(v) for k, v in entry.items()}}
    return out


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _normalise_queries(queries: dict | None) -> dict[int, list[str]]:
    if not queries:
        return {}
    return {int(k): [v] if isinstance(v, str) else list(v) for k, v in queries.items()}


def retrieval_report(model: CytoClip, embeddings: np.ndarray, tile_labels: np.ndarray,
                     queries: dict[int, list[str]]) -> dict:
    """Precision@k and top-fraction precision of each region's text embedding and of free-text queries."""
    embeddings = np.asarray(embeddings, np.float32)
    tile_labels = np.asarray(tile_labels)
    names = {r.id: r.name for r in model.regions}
    present = [r for r in model.regions if np.any(tile_labels == r.id)]
    per_region = {}
    if present and len(embeddings):
        sims = embeddings @ model.region_embeddings(present).T
        for k, region in enumerate(present):
            per_region[str(region.id)] = {"name": region.name, **_ranking_scores(sims[:, k], tile_labels, region.id)}
    rows = []
    for rid, texts in queries.items():
        if rid not in names or not np.any(tile_labels == rid) or not texts:
            continue
        sims = embeddings @ model.encode_texts(texts).T
        for j, text in enumerate(texts):
            rows.append({"text": text, "region_id": rid, "region_name": names[rid],
                         **_ranking_scores(sims[:, j], tile_labels, rid)})
    macro = lambda key, items: float(np.mean([v[key] for v in items])) if items else None
    return {"n_tiles": int(len(tile_labels)), "per_region": per_region, "queries": rows,
            f"mean_top{int(TOP_FRACTION * 100)}pct_precision_regions": macro("top_fraction_precision",
                                                                               list(per_region.values())),
            f"mean_top{int(TOP_FRACTION * 100)}pct_precision_queries": macro("top_fraction_precision", rows),
            "mean_precision_at_10_regions": macro("precision_at_10", list(per_region.values()))}


def _ranking_scores(similarity: np.ndarray, tile_labels: np.ndarray, label: int) -> dict:
    from napari_cytoclip.teach.metrics import top_fraction_precision

    order = np.argsort(-similarity, kind="stable")
    hits = tile_labels[order] == label
    out = {f"precision_at_{k}": float(hits[:k].mean()) for k in TOP_K if len(hits)}
    out["top_fraction_precision"] = float(top_fraction_precision(similarity, tile_labels, label, fraction=TOP_FRACTION))
    out["chance"] = float(hits.mean()) if len(hits) else 0.0
    out["support"] = int(hits.sum())
    return out


def _write_report(report: dict, cm: np.ndarray, model: CytoClip, out: Path, overwrite: bool) -> None:
    from napari_cytoclip.teach.metrics import plot_confusion, plot_f1_bars

    ids, names = _plot_classes(cm, report["class_ids"], model)
    scores = {"per_class": {int(k): v for k, v in report["per_region"].items()}, "macro_f1": report["macro_f1"]}
    report["files"] = {"report": REPORT_JSON, "confusion": CONFUSION_PNG, "f1_per_region": F1_PNG}
    with new_output_folder(out, overwrite=overwrite, kind="report") as tmp:
        atomic_write_with(tmp / CONFUSION_PNG, lambda p: plot_confusion(cm[np.ix_(ids, ids)], ids, names, p))
        atomic_write_with(tmp / F1_PNG, lambda p: plot_f1_bars(scores, report["class_names"], p))
        atomic_write_text(tmp / REPORT_JSON, json.dumps(report, indent=1, default=_plain))


def _plot_classes(cm: np.ndarray, class_ids: list[int], model: CytoClip) -> tuple[list[int], list[str]]:
    """Scored classes plus every other predicted class and "(none)", so each row shows all its pixels."""
    names = {r.id: r.name for r in model.regions}
    predicted = [k for k in names if cm[:, k].sum() > 0 and k not in class_ids]
    ids = [0] + list(class_ids) + sorted(predicted)
    return ids, ["(none)"] + [names[k] for k in ids[1:]]


def evaluate_allen_split(model: CytoClip, split: str = "test", data_dir: str | Path | None = None, *,
                         out: str | Path, plate_numbers: Sequence[int] | None = None,
                         queries: dict[int, Sequence[str] | str] | None = None, **kwargs) -> dict:
    """:func:`evaluate` on the Allen plates of ``split``, each at its own estimated pixel size.

    ``queries`` defaults to :data:`~napari_cytoclip.models.vocabularies.ALLEN_PARAPHRASES`.
    """
    from napari_cytoclip.teach.allen import IGNORED_LABELS, plates
    from napari_cytoclip.models.vocabularies import ALLEN_PARAPHRASES

    chosen = [p for p in plates(data_dir, split) if plate_numbers is None or p.number in plate_numbers]
    if not chosen:
        raise CytoclipError(data_dir, f"no Allen plates for split {split!r}" +
                            (f" and plates {list(plate_numbers)}" if plate_numbers else ""))
    kwargs.setdefault("ignore", IGNORED_LABELS)
    info = {"allen_split": split, "plates": [p.number for p in chosen]}
    return evaluate(model, [p.image for p in chosen], [p.labels for p in chosen], out,
                    pixel_sizes=[p.um_per_px for p in chosen],
                    queries=ALLEN_PARAPHRASES if queries is None else queries, info=info, **kwargs)
