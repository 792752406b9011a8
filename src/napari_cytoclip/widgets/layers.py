"""Building and updating napari layers from predictions (all on the tile grid, never full resolution)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from napari_cytoclip.io.reader import TRANSPARENT, features_table, region_colormap  # noqa: F401  (re-exported)
from napari_cytoclip.widgets.state import META_KEY, PredictionState, layer_alive, state_of

HIGHLIGHT_RGBA = (1.0, 0.24, 0.96, 1.0)  # magenta: stands out on viridis
REVIEW_RGBA = (1.0, 0.2, 0.2, 1.0)
CANVAS_PX = 600.0


# ---------------------------------------------------------------------------------------------
# colours and tables (region_colormap and features_table live in the Qt-free reader)

# ---------------------------------------------------------------------------------------------
# geometry

def image_transform(layer: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    """The (y, x) ``scale`` and ``translate`` of an image layer's two spatial axes."""
    scale = tuple(float(s) for s in layer.scale[-2:])
    translate = tuple(float(t) for t in layer.translate[-2:])
    return scale, translate


def cell_world(state: PredictionState, cell: Sequence[int]) -> np.ndarray:
    """World (y, x) of a grid cell's centre."""
    t = state.transform
    return np.asarray(t["translate"]) + np.asarray(cell, np.float64) * np.asarray(t["scale"])


def focus_cell(viewer: Any, state: PredictionState, cell: Sequence[int], fov_cells: float = 24.0) -> None:
    """Centre the camera on a cell, zoomed so that about ``fov_cells`` cells span the view."""
    center = cell_world(state, cell)
    cell_size = float(np.mean(state.transform["scale"]))
    camera = viewer_camera(viewer)
    camera.center = tuple(float(v) for v in center)
    camera.zoom = float(canvas_pixels(viewer) / (fov_cells * cell_size))


def viewer_camera(viewer: Any) -> Any:
    """``viewer.scene.camera`` (napari >= 0.9), else the older ``viewer.camera``."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def canvas_pixels(viewer: Any) -> float:
    """The smaller side of the canvas in screen pixels (``viewer.canvas.size``), else a typical value."""
    size = getattr(getattr(viewer, "canvas", None), "size", None)
    try:
        side = float(min(size))
    except (TypeError, ValueError):
        return CANVAS_PX
    return side if side > 50 else CANVAS_PX


def place(layer: Any, scale: Sequence[float], translate: Sequence[float]) -> None:
    """Set a layer's ``scale`` and ``translate`` where they differ: napari redoes the layer's transforms and the
    viewer's dims on every assignment, equal or not (about 12 ms each here), and a rerun keeps the same grid."""
    if not np.array_equal(np.asarray(layer.scale, float), np.asarray(scale, float)):
        layer.scale = scale
    if not np.array_equal(np.asarray(layer.translate, float), np.asarray(translate, float)):
        layer.translate = translate


# ---------------------------------------------------------------------------------------------
# layers

def _find(viewer: Any, layer: Any) -> Any:
    return layer if layer_alive(viewer, layer) else None


LABELS_DTYPE = np.uint16  # room for every region id a bundle or New region gives


def regions_key(regions: Sequence[Any]) -> tuple:
    """What a Labels colormap of ``regions`` depends on: each region's id and colour."""
    return tuple((int(r.id), tuple(float(v) for v in r.rgba())) for r in regions)


def labels_colormap(regions: Sequence[Any]) -> Any:
    """napari's direct colormap of ``regions``, its lookup for uint16 labels built now.

    napari builds that lookup in Python over all 65,536 uint16 values the first time a layer maps
    labels (about 35 ms here, on the main thread inside ``Labels(...)``); built here, in a worker
    thread, and reused for later layers of the same regions, the constructor skips it.
    """
    from napari.utils.colormaps import DirectLabelColormap

    colormap = DirectLabelColormap(color_dict=region_colormap(regions))
    colormap.map(np.zeros(1, LABELS_DTYPE))
    return colormap


def create_labels_layer(viewer: Any, state: PredictionState, name: str, reuse: Any = None,
                        colormap: Any = None) -> Any:
    """The grid-shaped Labels layer of a new run (reusing ``reuse`` if given), filled with 0.

    A new layer gets its colours (``colormap``: from :func:`labels_colormap`, else built here) and hover
    table in the constructor, so napari builds its visual once.
    """
    from napari.layers import Labels

    data = np.zeros(tuple(state.grid.shape), LABELS_DTYPE)
    t = state.transform
    colormap = region_colormap(state.regions) if colormap is None else colormap
    features = features_table(state.regions)
    carried: dict[str, Any] = {}
    if reuse is not None and layer_alive(viewer, reuse):
        layer = reuse
        old = state_of(layer)
        for role, aux in (old.layers.items() if old is not None else ()):
            if role == "confidence" and layer_alive(viewer, aux):
                # kept, emptied, and refilled at the end: removing a layer costs napari a full
                # gc.collect() on the main thread (about 0.4 s here with the model loaded)
                aux.data = np.zeros(data.shape, np.float32)
                place(aux, t["scale"], t["translate"])
                carried[role] = aux
            elif role != "labels" and layer_alive(viewer, aux):
                viewer.layers.remove(aux)  # other views of the old run: a new run starts clean
        layer.data = data
        place(layer, t["scale"], t["translate"])
        if old is None or [r.to_dict() for r in old.regions] != [r.to_dict() for r in state.regions]:
            layer.colormap = colormap
        layer.features = features
    else:
        layer = Labels(data, name=name, scale=t["scale"], translate=t["translate"], opacity=0.55,
                       colormap=colormap, features=features)
        viewer.add_layer(layer)
    layer.editable = False  # batches write into it until the run ends
    state.layers = {"labels": layer, **carried}
    state.publish()
    return layer


def apply_batch(state: PredictionState, cells: np.ndarray, labels: np.ndarray, confidence: np.ndarray,
                refresh: bool = True) -> None:
    """Write one batch of tile labels into the state and, in place, into its Labels layer's data.

    ``refresh=False`` leaves redrawing to the caller (see :func:`redraw_labels`), so that a stream
    of small batches costs one redraw per interval instead of one per batch.
    """
    cells = np.asarray(cells)
    if len(cells) == 0:
        return
    rr, cc = cells[:, 0], cells[:, 1]
    state.predicted[rr, cc] = labels
    state.tile_confidence[rr, cc] = confidence
    layer = state.labels_layer
    if layer is not None:
        layer.data[rr, cc] = labels
        if refresh:
            layer.refresh()


def redraw_labels(viewer: Any, state: PredictionState, full: bool = False) -> None:
    """Redraw the Labels layer after in-place writes; ``full`` also updates its thumbnail and extent."""
    layer = state.labels_layer
    if layer is None or not layer_alive(viewer, layer):
        return
    if full:
        layer.refresh()
    else:
        layer.refresh(thumbnail=False, extent=False, highlight=False)


def finish_layers(viewer: Any, state: PredictionState, confidence: bool = True) -> None:
    """After a complete run: final labels, hover table and (with ``confidence``) the confidence layer.

    The colours were set when the layer was created (same regions), so they are not rebuilt here.
    """
    pred = state.prediction
    state.predicted = np.asarray(pred.labels, np.uint16).copy()
    layer = state.labels_layer
    if layer is not None and layer_alive(viewer, layer):
        layer.data = state.predicted.copy()  # a full refresh of the layer
        layer.editable = True
        layer.features = features_table(state.regions, layer.data, pred.confidence)
        if confidence:
            _confidence_layer(viewer, state)
        viewer.layers.selection.active = layer
    state.publish()


def drop_views(viewer: Any, state: PredictionState) -> None:
    """Remove the layers of an unfinished run other than its Labels layer (a confidence layer kept from a rerun)."""
    for role, aux in list(state.layers.items()):
        if role != "labels":
            state.layers.pop(role)
            if layer_alive(viewer, aux):
                viewer.layers.remove(aux)


def show_confidence(viewer: Any, state: PredictionState) -> Any:
    """The (hidden) confidence layer of a complete prediction, below its Labels layer; None without one."""
    if state.prediction is None or not layer_alive(viewer, state.labels_layer):
        return None
    layer = _confidence_layer(viewer, state)
    viewer.layers.selection.active = state.labels_layer
    return layer


def _confidence_layer(viewer: Any, state: PredictionState) -> Any:
    from napari.layers import Image

    t = state.transform
    conf = np.asarray(state.prediction.confidence, np.float32)
    name = f"cytoclip confidence ({state.image_name})"
    layer = _find(viewer, state.layers.get("confidence"))
    if layer is None:
        layer = Image(conf, name=name, scale=t["scale"], translate=t["translate"], colormap="magma",
                      contrast_limits=(0.0, 1.0), opacity=0.7, visible=False,
                      metadata={META_KEY: {"role": "confidence", "image": state.image_name}})
        index = list(viewer.layers).index(state.labels_layer)
        viewer.layers.insert(index, layer)  # below the labels
    else:
        layer.data = conf
        layer.contrast_limits = (0.0, 1.0)
    state.layers["confidence"] = layer
    return layer


def refresh_region_layers(viewer: Any, state: PredictionState) -> None:
    """Colours and hover table of the Labels layer for the current vocabulary and data."""
    layer = state.labels_layer
    if layer is None or not layer_alive(viewer, layer):
        return
    conf = state.prediction.confidence if state.prediction is not None else state.tile_confidence
    layer.colormap = region_colormap(state.regions)
    layer.features = features_table(state.regions, np.asarray(layer.data), conf)
    if state.prediction is not None and layer_alive(viewer, state.layers.get("confidence")):
        state.layers["confidence"].data = np.asarray(state.prediction.confidence, np.float32)
    layer.refresh()


def transparent_low_viridis():
    """viridis whose lowest value is transparent (cells outside the tissue)."""
    from napari.utils.colormaps import Colormap, ensure_colormap

    base = np.asarray(ensure_colormap("viridis").colors, np.float32)
    colors = np.concatenate([[[0.0, 0.0, 0.0, 0.0]], base], 0)
    controls = np.concatenate([[0.0], np.linspace(0.002, 1.0, len(base))])
    return Colormap(colors=colors, controls=controls, name="viridis_tissue", interpolation="linear")


def query_layers(viewer: Any, state: PredictionState, text: str, similarity: np.ndarray,
                 threshold: float) -> tuple[Any, Any]:
    """Show a similarity grid as a heatmap ``query: <text>`` and its above-threshold highlight.

    One heatmap and one highlight layer per prediction, reused from query to query.
    """
    from napari.layers import Image, Labels
    from napari.utils.colormaps import DirectLabelColormap

    t = state.transform
    finite = np.isfinite(similarity)
    lo = float(similarity[finite].min()) if finite.any() else 0.0
    hi = float(similarity[finite].max()) if finite.any() else 1.0
    floor = lo - max(hi - lo, 1e-6) * 0.01  # outside tissue: just below the lowest, drawn transparent
    shown = np.where(finite, similarity, floor).astype(np.float32)
    name = f"query: {text}"
    heat = _find(viewer, state.layers.get("query"))
    meta = {META_KEY: {"role": "query", "text": text, "image": state.image_name, "similarity": similarity}}
    if heat is None:
        heat = Image(shown, name=name, scale=t["scale"], translate=t["translate"],
                     colormap=transparent_low_viridis(), contrast_limits=(floor, hi if hi > floor else floor + 1e-6),
                     opacity=0.75, metadata=meta)
        viewer.add_layer(heat)
    else:
        heat.data = shown
        heat.contrast_limits = (floor, hi if hi > floor else floor + 1e-6)
        heat.name = name
        heat.metadata.update(meta)
    state.layers["query"] = heat
    high = _find(viewer, state.layers.get("highlight"))
    mask = highlight_mask(similarity, threshold)
    if high is None:
        high = Labels(mask, name=f"query highlight ({state.image_name})", scale=t["scale"],
                      translate=t["translate"], opacity=0.6,
                      colormap=DirectLabelColormap(color_dict={None: TRANSPARENT, 0: TRANSPARENT,
                                                               1: np.asarray(HIGHLIGHT_RGBA, np.float32)}))
        high.editable = False
        viewer.add_layer(high)
    else:
        high.data = mask
    state.layers["highlight"] = high
    if state.labels_layer is not None and layer_alive(viewer, state.labels_layer):
        viewer.layers.selection.active = state.labels_layer
    return heat, high


def highlight_mask(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """1 where a cell's similarity reaches ``threshold`` (never outside the tissue)."""
    with np.errstate(invalid="ignore"):
        return (np.isfinite(similarity) & (similarity >= threshold)).astype(np.uint8)


def review_marker(viewer: Any, state: PredictionState, cell: Sequence[int]) -> Any:
    """A Shapes layer with one rectangle around the cell under review."""
    from napari.layers import Shapes

    center = cell_world(state, cell)
    half = np.asarray(state.transform["scale"]) / 2
    rect = np.array([center - half, [center[0] - half[0], center[1] + half[1]], center + half,
                     [center[0] + half[0], center[1] - half[1]]])
    layer = _find(viewer, state.layers.get("review"))
    if layer is None:
        layer = Shapes([rect], shape_type="rectangle", name=f"review tile ({state.image_name})",
                       edge_color=[REVIEW_RGBA], face_color=[TRANSPARENT],
                       edge_width=float(np.mean(half)) * 0.15)
        viewer.add_layer(layer)
    else:
        layer.data = [rect]
        layer.edge_color = [REVIEW_RGBA]
        layer.face_color = [TRANSPARENT]
    state.layers["review"] = layer
    if state.labels_layer is not None and layer_alive(viewer, state.labels_layer):
        viewer.layers.selection.active = state.labels_layer
    return layer
