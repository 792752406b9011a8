"""Small shared fixtures for tests: a tiny real open_clip bundle and the real Allen plates."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CONFIG = {
    "embed_dim": 32,
    "custom_text": True,  # CustomTextCLIP (model.text), the layout training expects
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def tiny_bundle(folder: str | Path, seed: int = 0, name: str = "tiny-cytoclip"):
    """A small random-weight open_clip bundle (ViT image tower, native text tower) in ``folder``.

    Input 32 px, scales 320/640/1280 um, label 200 um, stride 100 um, the Allen vocabulary.
    """
    import torch

    from napari_cytoclip.models.bundle import InputSpec, ModelBundle, save_bundle
    from napari_cytoclip.models.model import build_open_clip
    from napari_cytoclip.models.vocabularies import allen_mouse_regions

    bundle = ModelBundle(name=name, architecture={"config": TINY_CONFIG},
                         input=InputSpec(32, (320.0, 640.0, 1280.0)), regions=allen_mouse_regions(),
                         label_um=200.0, stride_um=100.0, description="tiny random test model")
    torch.manual_seed(seed)
    model, _ = build_open_clip(bundle)
    return save_bundle(bundle, model.state_dict(), folder)


def allen_plates(split: str | None = None):
    """The real Allen plates (``../shared/data`` or ``$CYTOCLIP_DATA``); the test is skipped without them."""
    import pytest

    from napari_cytoclip.teach import allen

    index = allen.default_data_dir() / "allen_ara_coronal_nissl_plates" / "plates_index.csv"
    if not index.is_file():
        pytest.skip(f"the real Allen plates ({index.parent}) are not there")
    return allen.plates(split=split)


def allen_plate(n: int):
    """The Allen plate numbered ``n`` (see :func:`allen_plates`)."""
    for plate in allen_plates():
        if plate.number == n:
            return plate
    raise KeyError(f"no usable Allen plate {n}")


def cropped_plate_section(n: int, box: tuple[int, int, int, int] | None = None, name: str | None = None):
    """A section of plate ``n`` (optionally cropped to ``(y0, y1, x0, x1)``) with its pixel size, and its labels."""
    from PIL import Image

    from napari_cytoclip.io.sections import section_from_array

    plate = allen_plate(n)
    with Image.open(plate.image) as im:
        image = np.asarray(im.convert("L"))
    labels = plate.label_map()
    if box is not None:
        y0, y1, x0, x1 = box
        image, labels = image[y0:y1, x0:x1], labels[y0:y1, x0:x1]
    section = section_from_array(np.ascontiguousarray(image), plate.um_per_px, name=name or f"plate{n}")
    section.source = str(plate.image)
    return section, labels
