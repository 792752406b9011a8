"""QuPath-compatible GeoJSON for label grids: exact cell outlines out, scanline rasterising in.

A grid cell ``(r, c)`` is the square of side ``step`` centred at ``origin + (r, c) * step``,
in napari's pixel convention (pixel ``i`` centred at ``i``). GeoJSON coordinates follow QuPath
(pixel ``i`` spans ``[i, i + 1)``, ``(x, y)`` order), so they are shifted by half a pixel.
Exterior rings have positive signed area in those numbers, holes negative (RFC 7946).
"""
from __future__ import annotations

import json
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from napari_cytoclip.errors import CytoclipError
from napari_cytoclip.io.safe_files import atomic_write_text

def _hex_rgb(color: str) -> list[int]:
    h = str(color).lstrip("#")
    try:
        return [int(h[i:i + 2], 16) for i in (0, 2, 4)]
    except ValueError:
        return [128, 128, 128]


def _boundary_edges(mask: np.ndarray) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Directed lattice edges (row, col corners) with the region on the right (y-down)."""
    m = np.pad(mask, 1)
    edges = []
    r, c = np.nonzero(m[1:-1, 1:-1] & ~m[:-2, 1:-1])          # outside above: top edge, left to right
    edges += [((i, j), (i, j + 1)) for i, j in zip(r, c)]
    r, c = np.nonzero(m[1:-1, 1:-1] & ~m[2:, 1:-1])           # outside below: bottom edge, right to left
    edges += [((i + 1, j + 1), (i + 1, j)) for i, j in zip(r, c)]
    r, c = np.nonzero(m[1:-1, 1:-1] & ~m[1:-1, :-2])          # outside left: left edge, upwards
    edges += [((i + 1, j), (i, j)) for i, j in zip(r, c)]
    r, c = np.nonzero(m[1:-1, 1:-1] & ~m[1:-1, 2:])           # outside right: right edge, downwards
    edges += [((i, j + 1), (i + 1, j + 1)) for i, j in zip(r, c)]
    return [((int(a[0]), int(a[1])), (int(b[0]), int(b[1]))) for a, b in edges]


def _rings(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed rings of lattice corners; at a corner shared diagonally, keep hugging the same cell."""
    out: dict = defaultdict(list)
    for a, b in _boundary_edges(mask):
        out[a].append(b)
    rings = []
    while out:
        start = next(iter(out))
        ring, cur, prev = [start], start, None
        while True:
            nexts = out[cur]
            if len(nexts) > 1 and prev is not None:
                d = (cur[0] - prev[0], cur[1] - prev[1])
                right = (d[1], -d[0])       # in (row, col): right of moving +col is +row
                order = [right, d, (-d[1], d[0])]
                nexts.sort(key=lambda n: order.index((n[0] - cur[0], n[1] - cur[1]))
                           if (n[0] - cur[0], n[1] - cur[1]) in order else 3)
            nxt = nexts.pop(0)
            if not nexts:
                del out[cur]
            prev, cur = cur, nxt
            if cur == start:
                break
            ring.append(cur)
        ring.append(start)
        rings.append(_simplify(ring))
    return rings


def _simplify(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop corners in the middle of straight runs; the ring stays closed."""
    pts = ring[:-1]
    keep = []
    n = len(pts)
    for i in range(n):
        a, b, c = pts[i - 1], pts[i], pts[(i + 1) % n]
        if (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0:
            keep.append(b)
    keep = keep or pts
    return keep + [keep[0]]


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)


def _inside(point: tuple[float, float], ring: np.ndarray) -> bool:
    x, y = point
    x0, y0, x1, y1 = ring[:-1, 0], ring[:-1, 1], ring[1:, 0], ring[1:, 1]
    cross = (y0 > y) != (y1 > y)
    xs = x0[cross] + (y - y0[cross]) * (x1[cross] - x0[cross]) / (y1[cross] - y0[cross])
    return bool(np.sum(xs > x) % 2)


def _to_xy(ring: list[tuple[int, int]], origin, step) -> np.ndarray:
    rc = np.asarray(ring, np.float64)
    y = origin[0] + (rc[:, 0] - 0.5) * step + 0.5
    x = origin[1] + (rc[:, 1] - 0.5) * step + 0.5
    return np.stack([x, y], 1)


def _polygons(mask: np.ndarray, origin, step) -> list[list[list[list[float]]]]:
    """MultiPolygon coordinates: each exterior with the holes it contains."""
    exteriors, holes = [], []
    for ring in _rings(mask):
        xy = _to_xy(ring, origin, step)
        (exteriors if _signed_area(xy) > 0 else holes).append(xy)
    polys = [[e] for e in exteriors]
    for h in holes:
        # a cell inside the hole: half a cell to the left of the hole's first edge
        (x0, y0), (x1, y1) = h[0], h[1]
        length = max(np.hypot(x1 - x0, y1 - y0), 1e-12)
        nx, ny = (y1 - y0) / length, -(x1 - x0) / length
        probe = ((x0 + x1) / 2 + nx * step / 2, (y0 + y1) / 2 + ny * step / 2)
        owners = [i for i, e in enumerate(exteriors) if _inside(probe, e)]
        if owners:
            best = min(owners, key=lambda i: abs(_signed_area(exteriors[i])))
            polys[best].append(h)
    return [[ring.round(6).tolist() for ring in poly] for poly in polys]


def labels_to_geojson(labels: np.ndarray, regions: list[dict], *, origin=(0.0, 0.0), step: float = 1.0,
                      properties: dict | None = None) -> dict:
    """A FeatureCollection with one MultiPolygon feature per label id present (0 = nothing)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    by_id = {int(r["id"]): r for r in regions}
    features = []
    for rid in (int(v) for v in np.unique(labels) if v != 0):
        region = by_id.get(rid, {"id": rid, "name": f"region {rid}", "color": "#808080"})
        props = {"objectType": "annotation",
                 "classification": {"name": region["name"], "color": _hex_rgb(region.get("color", "#808080"))},
                 "isLocked": False, "region_id": rid, "name": region["name"]}
        if region.get("acronym"):
            props["acronym"] = region["acronym"]
        props.update(properties or {})
        features.append({"type": "Feature", "id": str(uuid.uuid4()),
                         "geometry": {"type": "MultiPolygon", "coordinates": _polygons(labels == rid, origin, step)},
                         "properties": props})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(data: dict, path: str | Path) -> Path:
    """Write compact JSON atomically (temp file beside it, then rename)."""
    return atomic_write_text(path, json.dumps(data, separators=(",", ":")))


def _load(data: Any) -> tuple[dict, str]:
    if isinstance(data, dict):
        return data, "GeoJSON"
    path = Path(data)
    if path.is_dir():
        raise CytoclipError(path, "is a folder, not a GeoJSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except FileNotFoundError:
        raise CytoclipError(path, "GeoJSON file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CytoclipError(path, f"not valid JSON ({exc})") from None
    except OSError as exc:
        raise CytoclipError(path, f"cannot read the GeoJSON file ({exc.strerror or exc})") from None


def _features(doc: Any, source: str) -> list[dict]:
    if not isinstance(doc, dict):
        raise CytoclipError(source, "GeoJSON must be an object")
    if doc.get("type") == "FeatureCollection" and isinstance(doc.get("features"), list):
        return doc["features"]
    if doc.get("type") == "Feature":
        return [doc]
    raise CytoclipError(source, "expected a GeoJSON FeatureCollection or Feature")


def _rings_of(geometry: Any, source: str) -> list[np.ndarray]:
    if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
        kind = geometry.get("type") if isinstance(geometry, dict) else type(geometry).__name__
        raise CytoclipError(source, f"only Polygon and MultiPolygon geometries are supported, got {kind}")
    polys = [geometry.get("coordinates")] if geometry["type"] == "Polygon" else geometry.get("coordinates")
    rings = []
    try:
        for poly in polys:
            for ring in poly:
                arr = np.asarray(ring, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 3 or not np.isfinite(arr).all():
                    raise ValueError
                if not np.array_equal(arr[0], arr[-1]):
                    arr = np.vstack([arr, arr[:1]])
                rings.append(arr[:, :2])
    except (TypeError, ValueError):
        raise CytoclipError(source, "malformed polygon coordinates") from None
    return rings


def _feature_name(props: dict) -> str | None:
    """The region name a feature gives: QuPath's ``classification`` (an object or a plain string), else ``name``."""
    cls = props.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls if isinstance(cls, str) else None
    name = name if isinstance(name, str) and name.strip() else props.get("name")
    return str(name).strip() if name is not None and str(name).strip() else None


def _feature_id(props: dict, source: str, index: int) -> int | None:
    """The feature's integer ``region_id`` (None when absent), or a clear error."""
    rid = props.get("region_id")
    if rid is None:
        return None
    if isinstance(rid, str):
        rid = rid.strip()
        try:
            return int(rid)
        except ValueError:
            pass
    elif isinstance(rid, int) and not isinstance(rid, bool):
        return rid
    elif isinstance(rid, float) and np.isfinite(rid) and rid.is_integer():
        return int(rid)
    raise CytoclipError(source, f"feature {index}: 'region_id' must be an integer, got {rid!r}")


def _region_for(props: dict, regions: list[dict], source: str = "GeoJSON", index: int = 0) -> int | None:
    """The region id a feature's properties name (by name or acronym, else by ``region_id``), or None."""
    name = _feature_name(props)
    if name:
        key = name.lower()
        for r in regions:
            if key in (str(r.get("name", "")).lower(), str(r.get("acronym", "")).lower()):
                return int(r["id"])
    rid = _feature_id(props, source, index)
    if rid is not None and any(int(r["id"]) == rid for r in regions):
        return rid
    return None


def _properties(feat: dict, source: str, index: int) -> dict:
    props = feat.get("properties")
    if props is None:
        return {}
    if not isinstance(props, dict):
        raise CytoclipError(source, f"feature {index}: 'properties' must be an object, got {type(props).__name__}")
    return props


def _fill(rings: list[np.ndarray], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Even-odd scanline fill: which (ys x xs) sample points lie inside the rings."""
    seg = np.concatenate([np.hstack([r[:-1], r[1:]]) for r in rings])  # x0, y0, x1, y1
    x0, y0, x1, y1 = seg.T
    out = np.zeros((len(ys), len(xs)), bool)
    for i, y in enumerate(ys):
        hit = (y0 > y) != (y1 > y)
        if not hit.any():
            continue
        cuts = np.sort(x0[hit] + (y - y0[hit]) * (x1[hit] - x0[hit]) / (y1[hit] - y0[hit]))
        counts = np.searchsorted(cuts, xs, side="right")
        out[i] = counts % 2 == 1
    return out


def geojson_to_labels(data: dict | str | Path, shape: tuple[int, int], regions: list[dict], *,
                      origin=(0.0, 0.0), step: float = 1.0) -> np.ndarray:
    """Rasterise features onto the label grid by sampling each cell centre (later features win).

    Unknown region names and features lying entirely outside the grid are refused with one error.
    """
    doc, source = _load(data)
    features = _features(doc, source)
    labels = np.zeros(shape, np.uint16)
    ys = origin[0] + np.arange(shape[0]) * step + 0.5
    xs = origin[1] + np.arange(shape[1]) * step + 0.5
    # the grid's extent in GeoJSON coordinates: every cell is a square of side ``step`` around its sample point
    y_lo, y_hi = origin[0] + 0.5 - step / 2, origin[0] + 0.5 + (shape[0] - 0.5) * step
    x_lo, x_hi = origin[1] + 0.5 - step / 2, origin[1] + 0.5 + (shape[1] - 0.5) * step
    unknown, outside = [], []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise CytoclipError(source, "a feature is not an object")
        props = _properties(feat, source, i)
        rid = _region_for(props, regions, source, i)
        if rid is None:
            name = _feature_name(props)
            if name is None and props.get("region_id") is not None:
                name = f"region_id {props['region_id']}"
            unknown.append(name or "(unnamed)")
            continue
        rings = _rings_of(feat.get("geometry"), source)
        if not rings:
            continue
        pts = np.concatenate(rings)
        if pts[:, 0].max() < x_lo or pts[:, 0].min() > x_hi or pts[:, 1].max() < y_lo or pts[:, 1].min() > y_hi:
            outside.append(f"{i} ({_feature_name(props) or rid})")
            continue
        labels[_fill(rings, ys, xs)] = rid
    if unknown:
        known = ", ".join(str(r.get("name")) for r in regions)
        raise CytoclipError(source, f"unknown region names {sorted(set(unknown))}; known: {known}")
    if outside:
        raise CytoclipError(source, f"features {', '.join(outside)} lie entirely outside the label grid "
                                    f"(x {x_lo:g}..{x_hi:g}, y {y_lo:g}..{y_hi:g} px): is this GeoJSON for another "
                                    "image or pixel size?")
    return labels
