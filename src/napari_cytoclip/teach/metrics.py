"""Segmentation and retrieval metrics, and the report plots."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int, ignore: Sequence[int] = (0,)) -> np.ndarray:
    """Counts ``(n_classes, n_classes)``: rows truth, columns prediction.

    Pixels whose truth is in ``ignore`` (or out of range) are skipped; predictions out of range
    count as class 0 ("nothing predicted").
    """
    truth = np.asarray(truth).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    keep = (truth >= 0) & (truth < n_classes) & ~np.isin(truth, list(ignore))
    truth, pred = truth[keep], pred[keep]
    pred = np.where((pred >= 0) & (pred < n_classes), pred, 0)
    return np.bincount(truth * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def scores_from_confusion(cm: np.ndarray, class_ids: Sequence[int]) -> dict:
    """Per-class precision, recall, F1 and support; macro-F1 over classes with support; accuracy."""
    cm = np.asarray(cm, np.float64)
    per = {}
    for k in class_ids:
        tp = cm[k, k]
        predicted, support = cm[:, k].sum(), cm[k].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[int(k)] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                       "support": int(support)}
    scored = [per[k]["f1"] for k in per if per[k]["support"] > 0]
    rows = cm[list(class_ids)]
    total = rows.sum()
    accuracy = float(sum(cm[k, k] for k in class_ids) / total) if total else 0.0
    return {"per_class": per, "macro_f1": float(np.mean(scored)) if scored else 0.0, "accuracy": accuracy}


def top_fraction_precision(similarity_row: np.ndarray, tile_labels: np.ndarray, label: int,
                           fraction: float = 0.1) -> float:
    """Share of the top ``fraction`` of tiles (by similarity) whose label is ``label``."""
    sim = np.asarray(similarity_row, np.float64)
    k = max(1, int(round(fraction * len(sim))))
    top = np.argsort(-sim, kind="stable")[:k]
    return float(np.mean(np.asarray(tile_labels)[top] == label))


def precision_at_k(similarity: np.ndarray, tile_labels: np.ndarray, query_labels: Sequence[int],
                   ks: Sequence[int] = (1, 5, 10)) -> dict:
    """For each k: per-query share of the top-k tiles in the query's region, and their mean."""
    sim = np.atleast_2d(np.asarray(similarity, np.float64))
    order = np.argsort(-sim, axis=1, kind="stable")
    labels = np.asarray(tile_labels)
    out = {}
    for k in ks:
        hits = [float(np.mean(labels[order[i, :k]] == q)) for i, q in enumerate(query_labels)]
        out[int(k)] = {"per_query": hits, "mean": float(np.mean(hits)) if hits else 0.0}
    return out


retrieval_recall_at_k = precision_at_k  # the name used in the evaluation issue


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, class_ids: Sequence[int], names: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix with names on both axes and the shares in the cells."""
    plt = _pyplot()
    cm = np.asarray(cm, np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for i in range(n):
        for j in range(n):
            if norm[i, j] >= 0.01:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("atlas label")
    ax.set_title("confusion (rows sum to 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def plot_f1_bars(scores: dict, names: Sequence[str], path: str | Path) -> Path:
    """Horizontal bars of per-region F1 with the macro-F1 as a vertical line."""
    plt = _pyplot()
    per = scores["per_class"]
    ids = list(per)
    f1 = [per[i]["f1"] for i in ids]
    macro = scores.get("macro_f1", float(np.mean(f1)) if f1 else 0.0)
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.32 * len(ids)))
    ax.barh(range(len(ids)), f1, color="#4c72b0")
    ax.set_yticks(range(len(ids)), list(names)[:len(ids)], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(macro, color="#c44e52", linestyle="--", label=f"macro-F1 {macro:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
