"""Review and identify: which tile to look at next, and what a group of tiles most resembles."""
from __future__ import annotations

from typing import Any

import numpy as np

from napari_cytoclip.widgets.state import PredictionState


def least_confident_unreviewed(state: PredictionState) -> tuple[int, int] | None:
    """The encoded cell with the lowest confidence that the review queue has not shown yet."""
    pred = state.prediction
    cells = np.asarray(pred.cells)
    todo = cells[~state.visited[cells[:, 0], cells[:, 1]]]
    if len(todo) == 0:
        return None
    conf = pred.confidence[todo[:, 0], todo[:, 1]]
    r, c = (int(v) for v in todo[int(np.argmin(conf))])
    return r, c


def advance_review(state: PredictionState, confirm: bool = True
                   ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Leave the tile under review and show the next least confident one: ``(left, shown)``.

    Moving on with ``confirm`` confirms the tile the user was shown (``left``; None if none was);
    without it (*Skip*) the tile stays unconfirmed. The next tile is only shown, never confirmed.
    """
    left = state.confirm_shown() if confirm else None
    state.under_review = None
    cell = least_confident_unreviewed(state)
    if cell is not None:
        state.show_for_review(cell)
    return left, cell


def identify_cells(state: PredictionState, model: Any, mask: np.ndarray, k: int = 5
                   ) -> tuple[int, list[tuple[Any, float, float]]]:
    """``(n, top)``: the encoded cells under ``mask``, and the ``k`` regions their mean embedding is closest to.

    The tiles' embeddings are averaged and renormalised, compared (cosine) with the region
    embeddings of the current vocabulary, and turned into probabilities with the model's
    ``logit_scale`` softmax; ``top`` holds ``(region, probability, cosine)``, best first.
    """
    pred = state.prediction
    cells = np.asarray(pred.cells)
    idx = np.flatnonzero(mask[cells[:, 0], cells[:, 1]])
    if len(idx) == 0:
        return 0, []
    emb = np.asarray(pred.embeddings[idx], np.float32).mean(0)
    emb /= max(float(np.linalg.norm(emb)), 1e-12)
    cos = model.region_embeddings(state.regions) @ emb
    logits = model.logit_scale * cos
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)[:k]
    return len(idx), [(state.regions[i], float(p[i]), float(cos[i])) for i in order]


def describe_top(n: int, what: str, top: list[tuple[Any, float, float]]) -> str:
    lines = [f"{n} tiles of {what}:"]
    for rank, (region, prob, cos) in enumerate(top, 1):
        acr = f" ({region.acronym})" if region.acronym and region.acronym != region.name else ""
        lines.append(f"{rank}. {region.name}{acr}  {prob:.0%}  (cosine {cos:.3f})")
    return "\n".join(lines)


def shapes_to_grid(shapes: Any, indices: list[int], state: PredictionState) -> np.ndarray:
    """Grid cells whose centres lie inside the given shapes (polygons, rectangles, ellipses)."""
    from matplotlib.path import Path as MplPath

    t = state.transform
    rows, cols = state.grid.shape
    rr, cc = np.indices((rows, cols))
    centres = np.stack([rr.ravel(), cc.ravel()], 1).astype(np.float64)
    mask = np.zeros(rows * cols, bool)
    for i in indices:
        verts = np.asarray(shapes.data[i], np.float64)[:, -2:]
        world = np.array([np.asarray(shapes.data_to_world(v))[-2:] for v in verts])
        grid_pts = (world - np.asarray(t["translate"])) / np.asarray(t["scale"])
        kind = shapes.shape_type[i]
        if kind in ("line", "path"):
            continue
        if kind == "ellipse":
            lo, hi = grid_pts.min(0), grid_pts.max(0)
            centre, radius = (lo + hi) / 2, (hi - lo) / 2
            angle = np.linspace(0, 2 * np.pi, 72, endpoint=False)
            grid_pts = centre + np.stack([np.sin(angle), np.cos(angle)], 1) * radius
        mask |= MplPath(grid_pts).contains_points(centres)
    return mask.reshape(rows, cols)
