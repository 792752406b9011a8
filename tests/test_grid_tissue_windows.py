"""Tile grids (property tests), tissue masks on real plates, and model-input windows (shape, polarity,
tiling invariance across batch groupings and pyramid levels)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_cytoclip.teach.allen import default_data_dir
from napari_cytoclip.models.bundle import InputSpec
from napari_cytoclip.inference.grid import TileGrid
from napari_cytoclip.io.sections import PixelSizeWarning, section_from_array
from napari_cytoclip.io.tissue import detect_polarity, tissue_mask
from napari_cytoclip.inference.windows import WindowReader

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PLATES = default_data_dir() / "allen_ara_coronal_nissl_plates"
needs_data = pytest.mark.skipif(not PLATES.is_dir(), reason=f"the real Allen plates ({PLATES}) are not there")

sizes = st.integers(min_value=1, max_value=700)
pixel_sizes = st.floats(min_value=0.1, max_value=50.0, allow_nan=False, allow_infinity=False)
strides = st.floats(min_value=1.0, max_value=2000.0, allow_nan=False, allow_infinity=False)


# ------------------------------------------------------------------------------------------------ grid
@settings(max_examples=150, deadline=None)
@given(h=sizes, w=sizes, px=pixel_sizes, stride=strides)
def test_every_pixel_centre_is_in_exactly_one_cell(h, w, px, stride):
    grid = TileGrid.covering((h, w), px, stride, max_cells=10**9)  # geometry only: sub-pixel cells too
    rows, cols = grid.shape
    assert rows >= 1 and cols >= 1
    assert grid.step == pytest.approx(stride / px)
    eps = 1e-9
    for axis, (n_px, n_cells) in enumerate(((h, rows), (w, cols))):
        # cells are squares of side `step` at spacing `step` (they tile the plane): in cell units, cell k
        # covers u in [k - 0.5, k + 0.5). Each pixel centre must fall in one cell of the grid.
        u = (np.arange(n_px, dtype=np.float64) - grid.origin[axis]) / grid.step
        owner = np.floor(u + 0.5)
        assert (np.abs(u - owner) <= 0.5 + eps).all()
        # inside the grid; a centre exactly on a cell edge (u = k + 0.5 up to rounding) may go either way
        low, high = np.floor(u + 0.5 - eps), np.floor(u + 0.5 + eps)
        assert ((low >= 0) | (high >= 0)).all() and ((low < n_cells) | (high < n_cells)).all(), axis
        assert (np.minimum(low, high) >= -1).all() and (np.maximum(low, high) <= n_cells).all()
        strictly_inside = (u > -0.5 + eps) & (u < n_cells - 0.5 - eps)
        assert strictly_inside[(u >= 0) & (u <= n_cells - 1)].all()


@settings(max_examples=150, deadline=None)
@given(h=sizes, w=sizes, px=pixel_sizes, stride=strides)
def test_grid_is_centred_and_tight(h, w, px, stride):
    grid = TileGrid.covering((h, w), px, stride, max_cells=10**9)  # geometry only: sub-pixel cells too
    for axis, n_px in enumerate((h, w)):
        n_cells = grid.shape[axis]
        first_edge = grid.origin[axis] - grid.step / 2          # image spans [-0.5, n_px - 0.5]
        last_edge = grid.origin[axis] + (n_cells - 0.5) * grid.step
        before, after = -0.5 - first_edge, last_edge - (n_px - 0.5)
        assert before == pytest.approx(after, abs=1e-6 * max(1.0, grid.step * n_cells))
        tol = 1e-9 * max(1.0, grid.step * n_cells)
        assert -tol <= before < grid.step / 2 + tol or n_cells == 1  # no whole cell wasted
        # one cell fewer would not cover the image
        assert (n_cells - 1) * grid.step < n_px or n_cells == 1


@settings(max_examples=150, deadline=None)
@given(h=sizes, w=sizes, px=pixel_sizes, stride=strides,
       scale=st.tuples(st.floats(0.01, 100.0), st.floats(0.01, 100.0)),
       translate=st.tuples(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4)),
       cell=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_layer_transform_maps_cell_centres_onto_the_image(h, w, px, stride, scale, translate, cell):
    """A grid-shaped napari layer with layer_transform puts each cell's data point (its centre) on the
    world position of that cell's centre in the image layer (world = data * scale + translate)."""
    grid = TileGrid.covering((h, w), px, stride, max_cells=10**12)  # geometry only: sub-pixel cells too
    r, c = int(cell[0] * (grid.shape[0] - 1)), int(cell[1] * (grid.shape[1] - 1))
    tf = grid.layer_transform(scale, translate)
    centre_px = grid.centers(np.array([[r, c]]))[0]
    image_world = centre_px * np.asarray(scale) + np.asarray(translate)
    layer_world = np.array([r, c]) * np.asarray(tf["scale"]) + np.asarray(tf["translate"])
    np.testing.assert_allclose(layer_world, image_world, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(tf["scale"], grid.step * np.asarray(scale))


def test_grid_centres_and_round_trip():
    grid = TileGrid.covering((101, 57), 2.0, 20.0)  # 10 px cells: 11 x 6
    assert grid.shape == (11, 6)
    centres = grid.centers()
    assert centres.shape == (66, 2)
    np.testing.assert_allclose(centres[0], [(101 - 110) / 2 + 5 - 0.5, (57 - 60) / 2 + 5 - 0.5])
    assert grid.stride_um == pytest.approx(20.0)
    assert TileGrid.from_dict(grid.to_dict()) == grid


@pytest.mark.parametrize("px, stride", [(0, 10), (-1, 10), (float("nan"), 10), (1, 0), (1, float("inf"))])
def test_grid_refuses_impossible_sizes(px, stride):
    with pytest.raises(ValueError):
        TileGrid.covering((10, 10), px, stride)


# --------------------------------------------------------------------------------------------- tissue
def plate_section(n: int):
    from PIL import Image

    from napari_cytoclip.teach import allen

    plate = next(p for p in allen.plates() if p.number == n)
    with Image.open(plate.image) as im:
        img = np.asarray(im.convert("L"))
    return section_from_array(img, plate.um_per_px, name=f"plate{n}"), plate.label_map()


@needs_data
@pytest.mark.parametrize("plate", [41, 100])
def test_tissue_mask_covers_the_brain_and_not_the_background(plate):
    section, labels = plate_section(plate)
    mask = tissue_mask(section)
    assert mask.polarity == "darkfield"
    assert mask.mask.shape == labels.shape and mask.factor == pytest.approx(1.0)  # 1024 px: thumbnail = image
    brain = labels > 0
    recall = (mask.mask & brain).sum() / brain.sum()
    assert recall > 0.97, recall
    # label 0 is background and also tissue the atlas did not reach: most of it must be outside the mask
    outside = (~mask.mask & ~brain).sum() / (~brain).sum()
    assert outside > 0.75, outside
    # the image corners are slide background
    for y, x in [(5, 5), (5, -6), (-6, 5), (-6, -6)]:
        assert not mask.mask[y, x]


@needs_data
def test_tissue_fraction_in_cells():
    section, labels = plate_section(41)
    mask = tissue_mask(section)
    grid = TileGrid.covering(section.shape, section.pixel_size_um, 200.0)
    frac = mask.fraction_in_cells(grid.centers(), grid.step).reshape(grid.shape)
    assert ((frac >= 0) & (frac <= 1)).all()
    centre = grid.centers(np.array([[grid.shape[0] // 2, grid.shape[1] // 2]]))[0].astype(int)
    assert labels[centre[0], centre[1]] > 0 and frac[grid.shape[0] // 2, grid.shape[1] // 2] == 1.0
    assert frac[0, 0] == 0.0


def test_flat_image_has_no_tissue():
    mask = tissue_mask(section_from_array(np.full((200, 300), 240, np.uint8), 1.0))
    assert not mask.mask.any() and mask.polarity == "brightfield"


# -------------------------------------------------------------------------------------------- windows
GRAY_SPEC = InputSpec(size=16, scales_um=(16.0, 32.0, 64.0), mode="gray_scales", polarity="brightfield")


def random_tissue(shape=(300, 280), seed=0, rgb=False):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, shape + ((3,) if rgb else ()), dtype=np.uint8)
    return img


def test_window_shape_dtype_and_channels():
    section = section_from_array(random_tissue(), 1.0)
    reader = WindowReader(section, GRAY_SPEC, "brightfield")
    centres = np.array([[150, 140], [10, 10], [299, 279], [-40, 500]], float)
    out = reader.read(centres)
    assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
    assert reader.read(np.zeros((0, 2))).shape == (0, 16, 16, 3)
    # far outside the image: brightfield background
    assert (out[3] == 255).all()
    # the three channels are three different context sizes
    assert not np.array_equal(out[0, ..., 0], out[0, ..., 2])


def test_single_scale_gray_repeats_and_rgb_keeps_colour():
    section = section_from_array(random_tissue(rgb=True), 1.0)
    one = WindowReader(section, InputSpec(size=16, scales_um=(32.0,), mode="gray_scales"), "brightfield")
    w = one.read(np.array([[100, 100]]))
    assert np.array_equal(w[..., 0], w[..., 1]) and np.array_equal(w[..., 0], w[..., 2])
    rgb = WindowReader(section, InputSpec(size=16, scales_um=(16.0,), mode="rgb"), "brightfield")
    w = rgb.read(np.array([[100.0, 100.0]]))
    # 16 um at 1 um/px, 16 px: the window is the image crop itself, centred on the pixel
    crop = np.asarray(section.levels[0])[92:108, 92:108]
    assert np.array_equal(w[0], crop)


@needs_data
def test_darkfield_plate_is_inverted_for_a_brightfield_model():
    section, labels = plate_section(41)
    assert detect_polarity(section) == "darkfield"
    spec = InputSpec(size=32, scales_um=(320.0,), mode="gray_scales", polarity="brightfield")
    centres = np.array([[30.0, 30.0], [476.0, 512.0]])  # a background corner, the brain centre (45 px crops)
    inverted = WindowReader(section, spec, "darkfield").read(centres)
    as_is = WindowReader(section, spec, "brightfield").read(centres)
    assert inverted[0].mean() > 200 and as_is[0].mean() < 55  # background: white after inversion
    assert np.abs(inverted.astype(int) + as_is.astype(int) - 255).max() <= 1
    dark_model = InputSpec(size=32, scales_um=(320.0,), mode="gray_scales", polarity="darkfield")
    assert np.array_equal(WindowReader(section, dark_model, "darkfield").read(centres), as_is)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), groups=st.integers(1, 5), scales=st.sampled_from([
    (16.0, 32.0, 64.0), (10.0, 25.0, 70.0), (40.0,)]))
def test_windows_do_not_depend_on_how_centres_are_grouped(seed, groups, scales):
    rng = np.random.default_rng(seed)
    section = section_from_array(random_tissue(seed=seed % 7), 1.3)
    spec = InputSpec(size=16, scales_um=scales, mode="gray_scales")
    reader = WindowReader(section, spec, "darkfield")
    centres = np.column_stack([rng.uniform(-30, 330, 12), rng.uniform(-30, 310, 12)])
    together = reader.read(centres)
    one_by_one = np.concatenate([reader.read(c[None]) for c in centres])
    order = rng.permutation(len(centres))
    shuffled = np.empty_like(together)
    for part in np.array_split(order, groups):
        if len(part):
            shuffled[part] = reader.read(centres[part])
    assert np.array_equal(together, one_by_one)
    assert np.array_equal(together, shuffled)


@pytest.mark.parametrize("mode, scales", [("gray_scales", (8.0, 16.0, 24.0)), ("rgb", (24.0,))])
def test_pyramid_level_zero_equals_a_single_level_image(mode, scales):
    """When the target resolution picks level 0, a 2-level pyramid gives the same windows as level 0 alone."""
    img = random_tissue((256, 240), seed=3, rgb=(mode == "rgb"))
    level1 = img[::4, ::4]
    spec = InputSpec(size=16, scales_um=scales, mode=mode)
    single = section_from_array(img, 0.5)
    pyramid = section_from_array([img, level1], 0.5)
    assert pyramid.downsample(1) == pytest.approx(4.0)
    assert all(pyramid.level_for(s / spec.size) == 0 for s in scales)
    centres = np.array([[0, 0], [128, 120], [255, 239], [30.4, 200.6], [-20, 100]], float)
    a = WindowReader(single, spec, "brightfield", pyramid=False).read(centres)  # level 0 alone
    b = WindowReader(pyramid, spec, "brightfield").read(centres)
    assert np.array_equal(a, b)


def test_coarse_windows_come_from_the_coarse_level():
    img = random_tissue((512, 512), seed=5)
    level1 = np.asarray(img.reshape(256, 2, 256, 2).mean((1, 3)).round(), np.uint8)
    pyramid = section_from_array([img, level1], 1.0)
    spec = InputSpec(size=16, scales_um=(64.0,), mode="gray_scales")  # 4 um per model pixel: level 1 (2 um)
    reader = WindowReader(pyramid, spec, "brightfield")
    assert reader.plans == [(1, 2.0, 32)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeWarning)
        out = reader.read(np.array([[256.0, 256.0]]))
    assert out.shape == (1, 16, 16, 3)
