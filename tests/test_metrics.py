"""Metrics against hand-computed values."""
import numpy as np

from napari_cytoclip.teach.metrics import (confusion_matrix, plot_confusion, plot_f1_bars, precision_at_k,
                                           scores_from_confusion, top_fraction_precision)


def test_confusion_and_scores_by_hand():
    truth = np.array([0, 1, 1, 1, 2, 2, 3])
    pred = np.array([2, 1, 1, 2, 2, 9, 3])
    cm = confusion_matrix(truth, pred, 4)
    assert cm[0].sum() == 0                       # ignored truth
    assert cm[2, 0] == 1                          # out-of-range prediction counts as 0
    s = scores_from_confusion(cm, [1, 2, 3])
    assert s["per_class"][1] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert s["per_class"][2]["precision"] == 0.5 and s["per_class"][2]["recall"] == 0.5
    assert np.isclose(s["macro_f1"], (0.8 + 0.5 + 1.0) / 3)
    assert np.isclose(s["accuracy"], 4 / 6)


def test_macro_skips_classes_without_support():
    cm = confusion_matrix(np.array([1, 1]), np.array([1, 2]), 3)
    s = scores_from_confusion(cm, [1, 2])
    assert s["per_class"][2]["support"] == 0 and np.isclose(s["macro_f1"], s["per_class"][1]["f1"])


def test_retrieval():
    sim = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.9, 0.3]])
    labels = np.array([1, 1, 2, 2])
    r = precision_at_k(sim, labels, [1, 2], ks=(1, 2))
    assert r[1]["per_query"] == [1.0, 1.0] and r[2]["per_query"] == [1.0, 1.0]
    assert top_fraction_precision(sim[0], labels, 1, fraction=0.5) == 1.0
    assert top_fraction_precision(sim[0], labels, 2, fraction=0.75) == 1 / 3


def test_plots_write_png(tmp_path):
    cm = np.array([[0, 0, 0], [0, 5, 1], [0, 2, 4]])
    s = scores_from_confusion(cm, [1, 2])
    a = plot_confusion(cm[1:, 1:], [1, 2], ["one", "two"], tmp_path / "c.png")
    b = plot_f1_bars(s, ["one", "two"], tmp_path / "f.png")
    assert a.read_bytes()[:4] == b"\x89PNG" and b.read_bytes()[:4] == b"\x89PNG"
