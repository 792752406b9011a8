"""Windows sliced from images resampled once per scale (issue 15): the same filter as a resize, the same
windows as WindowReader away from the window edges, and independent of batching and memory limits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_cytoclip.inference import resampled
from napari_cytoclip.inference.resampled import ResampledReader, triangle_taps
from napari_cytoclip.inference.windows import WindowReader
from napari_cytoclip.io.sections import section_from_array
from napari_cytoclip.models.bundle import InputSpec

from test_flat_pyramid import smooth_tissue

SPEC = InputSpec(size=16, scales_um=(64.0, 128.0, 256.0), mode="gray_scales")  # 4, 8, 16 um per model pixel


@pytest.mark.parametrize("n_in, n_out", [(64, 16), (90, 16), (33, 16), (16, 16)])
def test_triangle_taps_are_torch_antialiased_bilinear_inside(n_in, n_out):
    rng = np.random.default_rng(n_in)
    row = rng.uniform(0, 1, n_in).astype(np.float32)
    want = F.interpolate(torch.from_numpy(row)[None, None, None], size=(1, n_out), mode="bilinear",
                         antialias=True, align_corners=False)[0, 0, 0].numpy()
    index, weight = triangle_taps(0, n_out, 0.0, n_in / n_out)
    got = (np.take(row, np.clip(index, 0, n_in - 1)) * weight).sum(1)
    ok = np.ones(n_out, bool)
    for i in range(n_out):  # outputs whose filter lies inside the row (torch renormalises at the ends)
        used = index[i][weight[i] > 0]
        ok[i] = used.min() >= 0 and used.max() < n_in
    assert ok.sum() >= n_out - 2
    np.testing.assert_allclose(got[ok], want[ok], atol=2e-6)
    np.testing.assert_allclose(weight.sum(1), 1.0, atol=1e-6)


def _sections(rgb=False):
    img = smooth_tissue((700, 650), seed=3, rgb=rgb)
    return section_from_array(img, 1.0)


def test_windows_match_window_reader_away_from_their_edges():
    section = _sections()
    # centres where WindowReader's crops start on whole pixels of every level, and q-th model pixels
    rng = np.random.default_rng(0)
    centres = (rng.integers(40, 160, (40, 2)) * 4).astype(np.float64)
    ref = WindowReader(section, SPEC, "brightfield").read(centres).astype(int)
    new = ResampledReader(section, SPEC, "brightfield", centres).read(centres).astype(int)
    assert new.shape == ref.shape and new.dtype == np.int64
    inner = np.s_[:, 2:-2, 2:-2, :]  # a crop resize renormalises its filter at the crop's edge; this does not
    assert np.abs(new[inner] - ref[inner]).max() <= 1
    assert np.abs(new - ref).mean() < 1.5


def test_windows_do_not_depend_on_batching_order_or_memory_limit(monkeypatch):
    section = _sections(rgb=True)
    grid_centres = np.stack(np.meshgrid(np.arange(20, 680, 23.7), np.arange(10, 640, 23.7), indexing="ij"),
                            -1).reshape(-1, 2)
    whole = ResampledReader(section, SPEC, "brightfield", grid_centres).read(grid_centres)
    batched = np.concatenate([ResampledReader(section, SPEC, "brightfield", grid_centres).read(grid_centres[i:i + 7])
                              for i in range(0, len(grid_centres), 7)])
    np.testing.assert_array_equal(whole, batched)
    order = np.random.default_rng(2).permutation(len(grid_centres))
    unannounced = ResampledReader(section, SPEC, "brightfield").read(grid_centres[order])
    np.testing.assert_array_equal(unannounced, whole[order])
    monkeypatch.setattr(resampled, "IMAGE_BYTES", 4000)  # a few rows at a time: rebuilt as reading moves down
    monkeypatch.setattr(resampled, "STRIP_BYTES", 3000)
    reader = ResampledReader(section, SPEC, "brightfield", grid_centres)
    small = np.concatenate([reader.read(grid_centres[i:i + 16]) for i in range(0, len(grid_centres), 16)])
    np.testing.assert_array_equal(small, whole)
    assert max(b.row1 - b.row0 for b in reader._built.values()) <= 2 * SPEC.size  # the least a build reaches


def test_outside_the_image_is_background_and_polarity_is_applied():
    img = np.full((300, 300), 40, np.uint8)  # dark tissue everywhere
    section = section_from_array(img, 1.0)
    far = np.array([[150.0, 150.0], [-500.0, -500.0]])
    bright = ResampledReader(section, SPEC, "brightfield", far).read(far)
    assert abs(int(bright[0, 8, 8, 0]) - 40) <= 1
    assert (bright[1] == 255).all()  # outside: brightfield background
    dark = ResampledReader(section, SPEC, "fluorescence", far).read(far)  # inverted into the model's polarity
    assert abs(int(dark[0, 8, 8, 0]) - 215) <= 1 and (dark[1] == 255).all()


def test_rgb_model_gets_colour_windows():
    spec = InputSpec(size=16, scales_um=(64.0,), mode="rgb")
    section = _sections(rgb=True)
    centres = np.array([[200.0, 200.0], [400.0, 300.0]])
    out = ResampledReader(section, spec, "brightfield", centres).read(centres)
    ref = WindowReader(section, spec, "brightfield").read(centres)
    assert out.shape == (2, 16, 16, 3)
    assert np.abs(out[:, 2:-2, 2:-2].astype(int) - ref[:, 2:-2, 2:-2]).max() <= 1


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data").is_dir(), reason="no real data")
def test_labels_agree_with_full_resolution_windows_on_a_real_test_plate_crop():
    """Plate 50 is a test plate: read only, to compare the reading paths (nothing is tuned)."""
    from helpers import cropped_plate_section

    from napari_cytoclip.inference.predict import plan_grid
    from napari_cytoclip.models.model import load_model

    section, _ = cropped_plate_section(50, (0, 700, 0, 1000))
    model = load_model(None, device="cpu")
    grid, cells, mask = plan_grid(section, model)
    centres = grid.centers(cells)
    readers = {"full": WindowReader(section, model.input, mask.polarity, pyramid=False),
               "resampled": ResampledReader(section, model.input, mask.polarity, centres)}
    regions = model.region_embeddings()
    top = {k: np.concatenate([model.encode_windows(r.read(centres[i:i + 64])) for i in range(0, len(centres), 64)])
           @ regions.T for k, r in readers.items()}
    assert (top["full"].argmax(1) == top["resampled"].argmax(1)).mean() >= 0.98
