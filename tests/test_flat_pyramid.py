"""Flat images are read through a pyramid built once per section (issue 15): the same windows within resize
tolerance, levels on disk for large images with bounded memory, and the same labels on a real plate."""
from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from napari_cytoclip.inference.windows import WindowReader
from napari_cytoclip.io import sections
from napari_cytoclip.io.sections import open_section, section_from_array
from napari_cytoclip.models.bundle import InputSpec

SPEC = InputSpec(size=16, scales_um=(64.0, 128.0, 256.0), mode="gray_scales")  # 4, 8, 16 um per model pixel


def smooth_tissue(shape, seed=0, rgb=False):
    """Blobs of cells on a bright background: texture at the scales the windows see."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    img = np.full(shape, 230.0, np.float32)
    for _ in range(40):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(8, 60)
        img -= rng.uniform(40, 120) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img += rng.normal(0, 6, shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.stack([img, np.roll(img, 3, 0), np.roll(img, 3, 1)], -1) if rgb else img


@pytest.mark.parametrize("shape, rgb, dtype", [((600, 520), False, np.uint8), ((601, 523), True, np.uint8),
                                               ((377, 610), False, np.uint16), ((450, 451), False, np.float32)])
def test_pyramid_windows_equal_full_resolution_windows(shape, rgb, dtype):
    img = smooth_tissue(shape, seed=shape[1], rgb=rgb).astype(dtype) * (200 if dtype == np.uint16 else 1)
    section = section_from_array(img, 1.0)
    fast = WindowReader(section, SPEC, "brightfield")
    slow = WindowReader(section, SPEC, "brightfield", pyramid=False)
    # 4, 8 and 16 um per model pixel at 1 um/px: levels 0, 1 and 2 of a built pyramid (each window still
    # reduced PYRAMID_MIN_RESIZE = 4-fold), level 0 alone before
    assert [p[:2] for p in fast.plans] == [(0, 1.0), (1, 2.0), (2, 4.0)]
    assert [p[:2] for p in slow.plans] == [(0, 1.0)] * 3
    rng = np.random.default_rng(1)
    centres = np.concatenate([rng.uniform(0, shape, (60, 2)), [[0, 0], [shape[0] - 1, shape[1] - 1], [-30, 40]]])
    a = fast.read(centres).astype(int)
    b = slow.read(centres).astype(int)
    assert len(fast.section.levels) == 3 and fast.section is not section
    diff = np.abs(a - b)
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 16, (diff.mean(), np.percentile(diff, 99))
    # the view is built once and kept: a second reader shares it
    assert WindowReader(section, SPEC, "brightfield").section is fast.section


def test_built_levels_are_exact_area_means_with_exact_factors():
    img = smooth_tissue((203, 130), seed=4)
    view = section_from_array(img, 1.0).pyramid(32.0)  # up to 8 um pixels: 4x finer than 32
    assert [view.downsample(i) for i in range(len(view.levels))] == [1.0, 2.0, 4.0, 8.0]
    assert [lv.shape for lv in view.levels] == [(203, 130), (102, 65), (51, 33), (26, 17)]
    padded = np.pad(img, ((0, 1), (0, 0)), mode="edge").astype(int)
    expect = (padded.reshape(102, 2, 65, 2).sum((1, 3)) + 2) // 4
    assert np.array_equal(view.levels[1], expect)
    # a section with levels of its own is its own view
    pyr = section_from_array([img, img[::2, ::2]], 2.0)
    assert pyr.pyramid(16.0) is pyr


def _write_flat_tiff(path: Path, side: int) -> np.ndarray:
    """A ``side`` x ``side`` gray, tiled, zlib TIFF without pyramid levels, written tile by tile; returns a
    small sample of its pixels ``[:1024, :1024]`` for checking."""
    import tifffile

    def tile(ty, tx):
        yy, xx = np.mgrid[ty:ty + 512, tx:tx + 512]
        return ((yy // 7 + xx // 13) % 200 + 20).astype(np.uint8)

    def tiles():
        for ty in range(0, side, 512):
            for tx in range(0, side, 512):
                yield tile(ty, tx)

    tifffile.imwrite(path, tiles(), shape=(side, side), dtype=np.uint8, tile=(512, 512), compression="zlib",
                     resolution=(1e4 / 2.0, 1e4 / 2.0), resolutionunit="CENTIMETER", metadata=None)
    return np.block([[tile(y, x) for x in (0, 512)] for y in (0, 512)])


def test_large_flat_tiff_pyramid_is_on_disk_and_built_in_bounded_memory(tmp_path, monkeypatch):
    side = 12_288  # 151 MB decoded: over the (lowered) in-memory limit
    path = tmp_path / "flat.tif"
    sample = _write_flat_tiff(path, side)
    monkeypatch.setattr(sections, "PYRAMID_MEMORY_BYTES", 64 * 2 ** 20)
    section = open_section(path)
    assert len(section.levels) == 1 and not isinstance(section.levels[0], np.ndarray)
    gc.collect()
    tracemalloc.start()
    try:
        view = section.pyramid(64.0)  # 2 um/px: levels /2, /4, /8 (16 um, 4x finer than 64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    decoded = side * side
    assert peak < decoded / 4, f"building the pyramid allocated {peak / 2 ** 20:.0f} MB at peak"
    import zarr

    folder = Path(view.pyramid_folder)
    assert len(view.levels) == 4 and all(isinstance(lv, zarr.Array) for lv in view.levels[1:])
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) > 0
    expect = (sample.astype(int).reshape(512, 2, 512, 2).sum((1, 3)) + 2) // 4
    assert np.array_equal(view.levels[1][:512, :512], expect)
    reader = WindowReader(section, SPEC, "brightfield")
    assert reader.section is view and reader.read(np.array([[6000.0, 6000.0]])).shape == (1, 16, 16, 3)
    section.close()
    del view, reader
    gc.collect()
    assert not folder.exists(), "the temporary pyramid outlived its section"


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data").is_dir(), reason="no real data")
def test_labels_agree_on_a_real_allen_test_plate_crop():
    """Plate 50 is a test plate: read only, to compare the two reading paths (nothing is tuned)."""
    from helpers import cropped_plate_section

    from napari_cytoclip.inference.predict import decode_labels, plan_grid
    from napari_cytoclip.models.model import load_model

    section, _ = cropped_plate_section(50, (0, 700, 0, 1000))
    model = load_model(None, device="cpu")
    grid, cells, mask = plan_grid(section, model)
    assert len(cells) > 150
    emb = {}
    for pyramid in (False, True):
        reader = WindowReader(section, model.input, mask.polarity, pyramid=pyramid)
        emb[pyramid] = np.concatenate([model.encode_windows(reader.read(grid.centers(cells[i:i + 64])))
                                       for i in range(0, len(cells), 64)])
    assert len(WindowReader(section, model.input, mask.polarity).section.levels) > 1
    regions = model.region_embeddings()
    top = {k: (e @ regions.T).argmax(1) for k, e in emb.items()}
    assert (top[True] == top[False]).mean() >= 0.98
    ids = [r.id for r in model.regions]
    voted = {k: decode_labels(cells, e, regions, ids, grid, model.bundle.label_um, model.logit_scale)[0]
             for k, e in emb.items()}
    assert (voted[True][cells[:, 0], cells[:, 1]] == voted[False][cells[:, 0], cells[:, 1]]).mean() >= 0.99
