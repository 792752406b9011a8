"""Sample data: Allen Reference Atlas coronal Nissl plate 41 (a training-split plate) with its atlas labels.

The image is the whole plate (1024 x 953 px, dark-field rendering, about 7.17 µm per pixel as
estimated by registration to the Allen CCFv3); the labels are the 15 coarse CCFv3 divisions
transferred onto it by affine registration, shown as outlines for reference. Provenance, licence
and citations are in ``data/sample/plate_41.json`` and in each layer's metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).parents[1] / "data" / "sample"
PLATE_JSON = SAMPLE_DIR / "plate_41.json"
UNASSIGNED_COLOR = "#5a5a5a"


def plate_41_info() -> dict:
    return json.loads(PLATE_JSON.read_text(encoding="utf-8"))


def allen_plate_41() -> list[tuple]:
    """Image layer (scale = pixel size in µm) and the reference atlas Labels layer."""
    from PIL import Image

    info = plate_41_info()
    with Image.open(SAMPLE_DIR / info["image"]) as im:
        image = np.asarray(im.convert("L"))
    with Image.open(SAMPLE_DIR / info["labels"]) as im:
        labels = np.asarray(im).astype(np.uint8)
    px = float(info["pixel_size_um"])
    provenance = {k: info[k] for k in ("plate", "split", "qc", "provenance", "license", "pixel_size_note")}
    image_kwargs = {
        "name": f"Allen Nissl plate {info['plate']}", "scale": (px, px), "colormap": "gray",
        "contrast_limits": (0, 255),
        "metadata": {"pixel_size_um": px, "source": str(SAMPLE_DIR / info["image"]),
                     "polarity": info["polarity"], **provenance},
    }
    labels_kwargs = {
        "name": f"atlas labels (plate {info['plate']})", "scale": (px, px), "opacity": 0.35,
        "colormap": atlas_colormap(info["divisions"]), "features": atlas_features(info["divisions"]),
        "metadata": {"pixel_size_um": px, "source": str(SAMPLE_DIR / info["labels"]),
                     "note": info["labels_note"], **provenance},
    }
    return [(image, image_kwargs, "image"), (labels, labels_kwargs, "labels")]


def _division_colors(divisions: list[dict]) -> dict[int, str]:
    from napari_cytoclip.models.vocabularies import allen_mouse_regions

    colors = {r.id: r.color for r in allen_mouse_regions()}
    return {int(d["id"]): colors.get(int(d["id"]), UNASSIGNED_COLOR) for d in divisions}


def atlas_colormap(divisions: list[dict]) -> dict:
    """The divisions' colours as a plain mapping (napari's Labels makes it a ``DirectLabelColormap``)."""
    from napari_cytoclip.models.bundle import Region

    transparent = np.zeros(4, np.float32)
    color_dict: dict = {None: transparent, 0: transparent}
    for rid, color in _division_colors(divisions).items():
        color_dict[rid] = np.asarray(Region(rid, "x", color=color).rgba(), np.float32)
    return color_dict


def atlas_features(divisions: list[dict]):
    import pandas as pd

    return pd.DataFrame({"index": [int(d["id"]) for d in divisions],
                         "name": [d["name"] for d in divisions],
                         "acronym": [d["acronym"] for d in divisions]})
