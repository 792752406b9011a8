"""Relabel a prediction with a taught model's learner, from the cached features (no re-encoding).

:func:`decode_with_learner` is what *Update map* and prediction with a taught bundle run; a widget keeps a
``cache`` dict per prediction so that repeated updates cost only the linear head and the vote.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from napari_cytoclip.errors import CytoclipError
from napari_cytoclip.models.bundle import Region
from napari_cytoclip.models.learner import prior_logits, smooth
from napari_cytoclip.models.taught import JOINT, TaughtLearner


def prediction_features(prediction, model=None, section=None, rows: np.ndarray | None = None) -> Any:
    """Pooled float16 features of ``prediction.cells[rows]`` (all cells by default): from the cache
    (``prediction.features``) when there, else read and encoded again (needs ``model`` and ``section``).

    All cells of a cache come back as the cached array itself, which may be a lazy on-disk (zarr) array:
    callers read it in blocks (:meth:`TaughtLearner.project`) or index the rows they need.
    """
    cached = getattr(prediction, "features", None)
    idx = np.arange(len(prediction.cells)) if rows is None else np.asarray(rows, np.int64)
    if cached is not None:
        return cached if rows is None else np.asarray(cached[idx], np.float16)
    if model is None or section is None:
        raise CytoclipError(prediction.source or None, "the prediction has no cached image features; "
                                                       "predict again with this version")
    from napari_cytoclip.inference.resampled import ResampledReader

    centers = prediction.grid.centers(np.asarray(prediction.cells)[idx])
    reader = ResampledReader(section, model.input, prediction.polarity, centers)  # the windows prediction reads
    out = []
    with model.capturing_features() as capture:
        for i in range(0, len(idx), 128):
            windows = reader.read(centers[i:i + 128])
            model.encode_windows(windows)
            pooled = capture.take(len(windows))
            if pooled is None:
                raise CytoclipError(prediction.source or None, f"{model.bundle.name} gives no pooled image features")
            out.append(pooled.astype(np.float16))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float16)


def text_rows(regions_by_class: Sequence[Region], class_text: np.ndarray, model) -> tuple[np.ndarray, list]:
    """Text embeddings of the classes with text, and each class's row (None: no prior)."""
    with_text = [r for r, t in zip(regions_by_class, class_text) if t]
    text = model.region_embeddings(with_text) if with_text else np.zeros((0, model.embed_dim), np.float32)
    it = iter(range(len(with_text)))
    return text, [next(it) if t else None for t in class_text]


def class_prior(learner: TaughtLearner, regions: Sequence[Region], model, joint: np.ndarray) -> np.ndarray:
    """Text-prior logits ``(n, C)`` of the learner's classes for joint embeddings."""
    by_id = {r.id: r for r in regions}
    regs = [by_id[int(c)] for c in learner.classes]
    text, sources = text_rows(regs, learner.class_text, model)
    if not any(s is not None for s in sources):
        return np.zeros((joint.shape[0], len(regs)), np.float32)
    return prior_logits(joint, text, model.logit_scale, sources)


def decode_with_learner(prediction, learner: TaughtLearner, model, *, section=None, painted: np.ndarray | None = None,
                        current: np.ndarray | None = None, regions: Sequence[Region] | None = None,
                        cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(rows, cols)`` uint16 and confidence float32 of ``prediction`` by the learner.

    Probabilities are voted over neighbours (``learner.radius``, ``learner.self_weight``, see
    :func:`~napari_cytoclip.models.learner.smooth`). Cells in ``painted`` keep their label in ``current``
    (default: the prediction's labels) and vote for it; confidence 1 there. ``regions``: where the
    learner's classes are described (default ``model.regions``; the widget passes regions added since).
    ``cache``: a dict the caller keeps for one prediction; the projected features (while the learner's
    basis is the same object) and the text prior (while classes and texts are the same) are kept there,
    so that repeated updates cost only the linear head and the vote.
    """
    cells = np.asarray(prediction.cells)
    shape = tuple(prediction.grid.shape)
    labels, conf = np.zeros(shape, np.uint16), np.zeros(shape, np.float32)
    if len(cells) == 0:
        return labels, conf
    cache = {} if cache is None else cache
    kept = cache.get("features")
    if kept is not None and kept[0] is learner.basis and kept[1] == learner.feature_kind:
        feats = kept[2]
    else:
        raw = np.asarray(prediction.embeddings, np.float32) if learner.feature_kind == JOINT else \
            prediction_features(prediction, model, section)
        wide = len(learner.mean) if learner.basis is None else learner.basis.shape[0]
        if raw.shape[1] != wide:
            raise CytoclipError(prediction.source or None, f"the cached features have {raw.shape[1]} values per "
                                                           f"cell, the learner expects {wide}")
        feats = learner.project(raw)
        cache["features"] = (learner.basis, learner.feature_kind, feats)
    if feats.shape[1] != len(learner.mean):
        raise CytoclipError(prediction.source or None, f"the cached features have {feats.shape[1]} values per cell, "
                                                       f"the learner expects {len(learner.mean)}")
    described = {r.id: r for r in (model.regions if regions is None else regions)}
    prior_key = (tuple(int(c) for c in learner.classes), tuple(bool(t) for t in learner.class_text),
                 tuple((r.name, r.description, r.prompts) if r else None
                       for r in (described.get(int(c)) for c in learner.classes)))
    kept = cache.get("prior")
    if kept is not None and kept[0] == prior_key:
        prior = kept[1]
    else:
        prior = class_prior(learner, list(described.values()), model, prediction.embeddings)
        cache["prior"] = (prior_key, prior)
    probs = learner.predict_proba(feats, prior)
    current = np.asarray(prediction.labels if current is None else current)
    col = {int(c): i for i, c in enumerate(learner.classes)}
    fixed = None
    if painted is not None:
        painted = np.asarray(painted, bool)
        fixed = painted[cells[:, 0], cells[:, 1]]
        for i in np.flatnonzero(fixed):
            j = col.get(int(current[cells[i, 0], cells[i, 1]]))
            if j is not None:
                probs[i] = 0.0
                probs[i, j] = 1.0
    probs = smooth(cells, probs, shape, learner.radius, learner.self_weight)
    labels[cells[:, 0], cells[:, 1]] = np.asarray(learner.classes, np.uint16)[probs.argmax(1)]
    conf[cells[:, 0], cells[:, 1]] = probs.max(1)
    if painted is not None:
        labels[painted] = current[painted]
        conf[painted] = 1.0
    return labels, conf


def apply_learner(prediction, model, section=None):
    """Relabel ``prediction`` in place with ``model.learner`` (no-op for a model without one)."""
    learner = getattr(model, "learner", None)
    if learner is not None:
        prediction.labels, prediction.confidence = decode_with_learner(prediction, learner, model, section=section)
    return prediction
