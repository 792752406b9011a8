"""Teaching sets and the taught learner: painted and confirmed cells -> a head refitted in seconds.

A :class:`TeachingSet` holds one row per taught cell (pooled image features, joint embedding,
region id, source section, grid cell, painted or confirmed), the regions table (known and new
regions) and the sections it came from. It is stored
as ``teaching.safetensors`` (numpy arrays) + ``teaching.json``; never pickled.

:func:`fit_learner` fits :class:`~napari_cytoclip.models.taught.TaughtLearner` around the base model's text
classifier; :func:`~napari_cytoclip.inference.taught_decode.decode_with_learner` relabels a prediction with it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_cytoclip.errors import BundleError, CytoclipError
from napari_cytoclip.models.bundle import (TEACHING_JSON, TEACHING_SAFETENSORS, Region, read_json,
                                           region_from_dict, validate_regions)
from napari_cytoclip.models.learner import prior_logits
from napari_cytoclip.inference.taught_decode import text_rows
from napari_cytoclip.models.taught import FEATURE_KIND, TaughtLearner, feature_basis, read_safetensors

TEACHING_FORMAT = "napari-cytoclip-teaching"
TEACHING_VERSION = 1
PAINTED, CONFIRMED, UNCHANGED = 0, 1, 2  # UNCHANGED: a sample of cells left as predicted (weak context)
CONTEXT_CELLS = 2000                # unchanged cells kept per section as weak examples of their predicted region
CONTEXT_WEIGHT = 0.2                # their weight relative to painted/confirmed cells: without them a
                                    # single painted region has no counter-examples and floods the map
DEFAULT_HYPER = {"l2": 0.1}         # chosen on the validation plates (benchmarks/teach.py, FINAL_HYPER)
STATS_SAMPLE = 2000                 # slow path (no cached features): other cells read as context candidates


# ---------------------------------------------------------------------------------------------
# teaching sets

@dataclass
class TeachingSet:
    """Taught cells of one or more sections (see the module docstring)."""

    features: np.ndarray                 # (n, F) float16 pooled features
    joint: np.ndarray                    # (n, D) float16 joint embeddings (for the text prior)
    region: np.ndarray                   # (n,) int64 region ids
    source: np.ndarray                   # (n,) int64 index into ``sources``
    cell: np.ndarray                     # (n, 2) int32 grid cells (row, col)
    kind: np.ndarray                     # (n,) uint8 PAINTED / CONFIRMED / UNCHANGED
    regions: list[Region]
    sources: list[dict]                  # {"name", "hash", "time", "painted", "confirmed"}
    model: dict                          # base model {"name", "hash"} whose features these are
    feature_kind: str = FEATURE_KIND

    def __len__(self) -> int:
        return len(self.region)

    def taught(self) -> np.ndarray:
        """Rows of painted or confirmed cells (not the unchanged context)."""
        return self.kind != UNCHANGED

    def counts(self) -> dict[int, int]:
        """Taught (painted or confirmed) cells per region id."""
        ids, n = np.unique(self.region[self.taught()], return_counts=True)
        return {int(i): int(k) for i, k in zip(ids, n)}

    def extend(self, other: "TeachingSet", source: Any = None) -> "TeachingSet":
        """This set plus ``other``; a section (by hash) in both keeps ``other``'s examples only."""
        if other.model.get("hash") != self.model.get("hash") or other.feature_kind != self.feature_kind:
            raise CytoclipError(source, f"taught with model {other.model.get('name')} ({other.model.get('hash')}), "
                                        f"not {self.model.get('name')} ({self.model.get('hash')}); "
                                        "export the sections again with the same model")
        regions = merge_regions(self.regions, other.regions, source)
        again = {s["hash"] for s in other.sources}
        keep_src = [i for i, s in enumerate(self.sources) if s["hash"] not in again]
        remap = np.full(len(self.sources), -1, np.int64)
        remap[keep_src] = np.arange(len(keep_src))
        rows = np.flatnonzero(remap[self.source] >= 0) if len(self) else np.zeros(0, np.int64)
        cat = lambda a, b: np.concatenate([a, b])  # noqa: E731
        return TeachingSet(
            features=cat(self.features[rows], other.features), joint=cat(self.joint[rows], other.joint),
            region=cat(self.region[rows], other.region),
            source=cat(remap[self.source[rows]], other.source + len(keep_src)),
            cell=cat(self.cell[rows], other.cell), kind=cat(self.kind[rows], other.kind),
            regions=regions,
            sources=[self.sources[i] for i in keep_src] + list(other.sources), model=dict(self.model),
            feature_kind=self.feature_kind)

    # -- files ------------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {"features": np.ascontiguousarray(self.features, np.float16),
                "joint": np.ascontiguousarray(self.joint, np.float16),
                "region": np.asarray(self.region, np.int64), "source": np.asarray(self.source, np.int64),
                "cell": np.ascontiguousarray(self.cell, np.int32), "kind": np.asarray(self.kind, np.uint8)}

    def description(self) -> dict:
        return {"format": TEACHING_FORMAT, "version": TEACHING_VERSION, "feature_kind": self.feature_kind,
                "model": self.model, "regions": [r.to_dict() for r in self.regions], "sources": self.sources,
                "counts": {str(k): v for k, v in self.counts().items()}, "cells": len(self)}

    def save(self, folder: str | Path) -> None:
        """Write ``teaching.safetensors`` then ``teaching.json`` into ``folder``, each atomically."""
        from safetensors.numpy import save

        from napari_cytoclip.io.safe_files import atomic_write_bytes, atomic_write_text

        folder = Path(folder)
        atomic_write_bytes(folder / TEACHING_SAFETENSORS, save(self.arrays(), metadata={"format": TEACHING_FORMAT}))
        atomic_write_text(folder / TEACHING_JSON, json.dumps(self.description(), indent=1))


def has_teaching_set(folder: str | Path) -> bool:
    return (Path(folder) / TEACHING_JSON).is_file() or (Path(folder) / TEACHING_SAFETENSORS).is_file()


def load_teaching_set(folder: str | Path, error: type[CytoclipError] = CytoclipError) -> TeachingSet:
    """Read and validate a teaching set (shapes, ids in the regions table, finite numbers)."""
    folder = Path(folder)
    meta_path, arr_path = folder / TEACHING_JSON, folder / TEACHING_SAFETENSORS
    for p in (meta_path, arr_path):
        if not p.is_file():
            raise error(folder, f"holds no teaching examples ({p.name} is missing); export corrections into it with "
                                "'napari-cytoclip export-pairs' first")
    meta = read_json(meta_path, error)
    if not isinstance(meta, dict) or meta.get("format") != TEACHING_FORMAT:
        raise error(meta_path, "not a teaching set written by napari-cytoclip")
    if int(meta.get("version", 0)) > TEACHING_VERSION:
        raise error(meta_path, f"teaching set version {meta.get('version')} is newer than this napari-cytoclip reads")
    try:
        regions = [region_from_dict(r, meta_path) for r in meta["regions"]]
        validate_regions(regions, meta_path)
        sources, model = list(meta["sources"]), dict(meta["model"])
        if not all(isinstance(s, dict) and isinstance(s.get("hash"), str) for s in sources):
            raise ValueError("every source needs a 'hash'")
    except BundleError as exc:
        raise error(meta_path, exc.problem) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise error(meta_path, f"incomplete teaching description ({exc})") from None
    a = read_safetensors(arr_path, error)
    need = ("features", "joint", "region", "source", "cell", "kind")
    missing = [k for k in need if k not in a]
    if missing:
        raise error(arr_path, f"missing arrays {missing}")
    n, s = len(a["region"]), len(sources)
    shapes_ok = (a["features"].ndim == 2 and a["joint"].ndim == 2 and len(a["features"]) == n and len(a["joint"]) == n
                 and a["region"].ndim == 1 and a["source"].shape == (n,) and a["cell"].shape == (n, 2)
                 and a["kind"].shape == (n,))
    if not shapes_ok:
        raise error(arr_path, "array shapes do not agree with each other or with the sections listed in "
                              f"{TEACHING_JSON}: the teaching set is damaged")
    if not all(np.isfinite(a[k]).all() for k in ("features", "joint")):
        raise error(arr_path, "holds non-finite numbers: the teaching set is damaged")
    unknown = sorted(set(np.unique(a["region"]).tolist()) - {r.id for r in regions})
    if unknown:
        raise error(arr_path, f"taught region ids {unknown} are not in the regions of {TEACHING_JSON}")
    if n and (a["source"].min() < 0 or a["source"].max() >= s):
        raise error(arr_path, "examples point at sections that are not listed: the teaching set is damaged")
    return TeachingSet(features=a["features"], joint=a["joint"], region=a["region"].astype(np.int64),
                       source=a["source"].astype(np.int64), cell=a["cell"].astype(np.int32),
                       kind=a["kind"].astype(np.uint8), regions=regions, sources=sources, model=model,
                       feature_kind=str(meta.get("feature_kind", FEATURE_KIND)))


def merge_regions(first: Sequence[Region], second: Sequence[Region], source: Any = None) -> list[Region]:
    """``first`` then the regions of ``second`` it lacks; one id named two ways is refused."""
    out = {r.id: r for r in first}
    for r in second:
        old = out.get(r.id)
        if old is not None and old.name.strip().lower() != r.name.strip().lower():
            raise CytoclipError(source, f"region id {r.id} is '{old.name}' in one teaching set and '{r.name}' in "
                                        "another; give each region one id")
        out.setdefault(r.id, r)
    return sorted(out.values(), key=lambda r: r.id)


def examples_from_section(prediction, edited: np.ndarray, regions: Sequence[Region], features: Any, *,
                          confirmed: np.ndarray | None = None, name: str, section_hash: str, model: dict,
                          when: str, feature_rows: np.ndarray | None = None,
                          feature_kind: str = FEATURE_KIND, predicted: np.ndarray | None = None) -> TeachingSet:
    """The teaching set of one corrected section.

    Painted cells: ``edited`` (grid shape) differs from ``predicted`` (the labels before painting, default
    ``prediction.labels``) and is non-zero; confirmed cells: ``confirmed`` and labelled. Only encoded cells
    (those with features) are taught. ``features`` are rows of ``prediction.cells`` (all of them, or those
    in ``feature_rows``, which must include every taught cell; the others are context candidates). Unchanged
    cells become weak context
    examples of their label, except cells of a region the user painted over: painting part of a region
    says the rest of it may be wrong too, and as context they would teach the old label right back.
    """
    cells = np.asarray(prediction.cells)
    edited = np.asarray(edited)
    before = np.asarray(prediction.labels if predicted is None else predicted)
    painted = (edited != before) & (edited > 0)
    ok = (np.asarray(confirmed, bool) if confirmed is not None else np.zeros(edited.shape, bool)) & (edited > 0) & ~painted
    lab = edited[cells[:, 0], cells[:, 1]] if len(cells) else np.zeros(0, edited.dtype)
    kind = np.where(painted[cells[:, 0], cells[:, 1]], PAINTED, CONFIRMED).astype(np.uint8) if len(cells) \
        else np.zeros(0, np.uint8)
    taught = np.flatnonzero(painted[cells[:, 0], cells[:, 1]] | ok[cells[:, 0], cells[:, 1]]) if len(cells) \
        else np.zeros(0, np.int64)
    rows = np.arange(len(cells)) if feature_rows is None else np.asarray(feature_rows, np.int64)
    pos = np.full(len(cells), -1, np.int64)
    pos[rows] = np.arange(len(rows))
    over = np.unique(before[painted])
    context = np.setdiff1d(rows, taught)
    context = context[(lab[context] > 0) & ~np.isin(lab[context], over[over > 0])]
    context = context[np.linspace(0, len(context) - 1, min(len(context), CONTEXT_CELLS)).astype(np.int64)] \
        if len(context) else context
    kind[context] = UNCHANGED
    n_taught = len(taught)
    taught = np.concatenate([taught, context])
    if (pos[taught] < 0).any():
        raise ValueError("features are missing for some taught cells")
    by_id = {r.id: r for r in regions}
    src = {"name": name, "hash": section_hash, "time": when, "painted": int((kind[taught] == PAINTED).sum()),
           "confirmed": int((kind[taught] == CONFIRMED).sum()), "unchanged_context": int(len(context)),
           "skipped_not_encoded": int(painted.sum() + ok.sum() - n_taught)}
    return TeachingSet(
        features=np.ascontiguousarray(features[pos[taught]], np.float16),  # numpy or zarr: only these rows read
        joint=np.asarray(np.asarray(prediction.embeddings[taught]) if len(taught) else
                         np.zeros((0, prediction.embeddings.shape[1])), np.float16),
        region=lab[taught].astype(np.int64), source=np.zeros(len(taught), np.int64),
        cell=cells[taught].astype(np.int32), kind=kind[taught], regions=sorted(by_id.values(), key=lambda r: r.id),
        sources=[src], model=dict(model), feature_kind=feature_kind)


# ---------------------------------------------------------------------------------------------
# features of a prediction

def stats_rows(n_cells: int, taught: np.ndarray, sample: int = STATS_SAMPLE) -> np.ndarray:
    """Taught rows plus an even sample of the others (the slow path's candidates for context cells)."""
    step = max(1, n_cells // max(sample, 1))
    return np.union1d(np.asarray(taught, np.int64), np.arange(0, n_cells, step))


# ---------------------------------------------------------------------------------------------
# the learner

def taught_regions(base_regions: Sequence[Region], table: Sequence[Region], taught_ids: Sequence[int]) -> list[Region]:
    """The taught bundle's vocabulary: the base regions (named as ``table`` names them, base prompts
    kept) and the taught new regions from ``table``."""
    by_id = {r.id: r for r in table}
    out = []
    for r in base_regions:
        t = by_id.get(r.id)
        out.append(r if t is None else Region(r.id, t.name, t.acronym or r.acronym, t.color, t.description or
                                              r.description, r.prompts))
    known = {r.id for r in base_regions}
    out += [by_id[i] for i in sorted(set(int(i) for i in taught_ids) - known)]
    return out


def fit_learner(teaching_set: TeachingSet, base_model, regions: Sequence[Region] | None = None,
                seed: int = 0, basis: tuple[np.ndarray, np.ndarray] | None = None, **hyper) -> TaughtLearner:
    """Fit the learner on every taught cell around ``base_model``'s text classifier.

    Classes: ``regions`` (default: :func:`taught_regions` of the base model and the teaching set).
    Known regions (ids of the base vocabulary) and new ones with a description or prompts have a text
    prior; new regions without text start from none (the row's lowest logit).
    """
    if regions is None:
        regions = taught_regions(base_model.regions, teaching_set.regions, list(teaching_set.counts()))
    known = {r.id for r in base_model.regions}
    init = getattr(base_model, "learner", None)
    if init is not None:  # a taught base: its new regions without text keep having none
        known -= {int(c) for c, t in zip(init.classes, init.class_text) if not t}
    class_text = np.array([r.id in known or bool(r.prompts) or bool(r.description.strip()) for r in regions])
    learner = TaughtLearner(class_text=class_text, feature_kind=teaching_set.feature_kind,
                            **{**DEFAULT_HYPER, **hyper})
    if basis is None:
        basis = feature_basis(teaching_set.features)
    if basis is not None:
        learner.basis_mean, learner.basis = basis
    x = learner.project(teaching_set.features)
    learner.set_stats(x)
    text, sources = text_rows(regions, class_text, base_model)
    joint = np.asarray(teaching_set.joint, np.float32)
    prior = prior_logits(joint, text, base_model.logit_scale, sources) if len(joint) else \
        np.zeros((0, len(regions)), np.float32)
    weight = np.where(teaching_set.taught(), 1.0, CONTEXT_WEIGHT).astype(np.float32)
    learner.fit(x, teaching_set.region, prior, [r.id for r in regions], sample_weight=weight,
                seed=seed)
    return learner


def taught_provenance(base, merged, regions, learner, fit_s: float, when: str) -> dict:
    """What was taught (cells per region), from which sections, when; the base bundle under 'parent'."""
    import hashlib

    known = {r.id for r in base.regions}
    counts = {}
    for r in regions:
        sel = (merged.region == r.id) & merged.taught()
        if sel.any():
            counts[str(r.id)] = {"name": r.name, "acronym": r.acronym, "cells": int(sel.sum()),
                                 "painted": int((sel & (merged.kind == PAINTED)).sum()),
                                 "confirmed": int((sel & (merged.kind == CONFIRMED)).sum()), "new": r.id not in known}
    parent = {"name": base.name, "hash": base.weights_hash(), "path": str(base.path), "taught": base.taught,
              "provenance": base.provenance}
    if base.taught:
        parent["learner_sha256"] = hashlib.sha256(base.learner_path.read_bytes()).hexdigest()[:16]
    return {"taught": {"when": when, "cells": int(merged.taught().sum()), "regions": counts,
                       "unchanged_context_cells": int((~merged.taught()).sum()),
                       "sections": [{k: s.get(k) for k in ("name", "hash", "time", "painted", "confirmed")}
                                    for s in merged.sources],
                       "features": learner.feature_kind, "fit_s": round(fit_s, 3),
                       "feature_axes": None if learner.basis is None else int(learner.basis.shape[1]),
                       "learner": {"l2": learner.l2, "prior_scale": learner.prior_scale, "balance": learner.balance,
                                   "alpha": learner.alpha, "radius": learner.radius,
                                   "self_weight": learner.self_weight}},
            "parent": parent}
