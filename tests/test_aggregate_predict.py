"""From embeddings to labels (softmax, voting) and end-to-end prediction on a real Allen plate crop with
a tiny model: streaming progress, labels only on encoded cells, batch-size invariance, cancelling,
re-decoding with another region order."""
from __future__ import annotations

import copy
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import tiny_bundle  # noqa: E402

from napari_cytoclip.inference.aggregate import (footprint_radius, labels_from_index, region_probabilities,  # noqa: E402
                                       similarity_grid, vote)
from napari_cytoclip.teach.allen import default_data_dir  # noqa: E402

PLATES = default_data_dir() / "allen_ara_coronal_nissl_plates"
needs_data = pytest.mark.skipif(not PLATES.is_dir(), reason=f"the real Allen plates ({PLATES}) are not there")


# ------------------------------------------------------------------------------------- probabilities
def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("logit_scale", [0.0, 1.0, 50.0, 100.0])
def test_region_probabilities_rows_sum_to_one(logit_scale):
    rng = np.random.default_rng(0)
    emb, reg = unit_rows(rng, 40, 16), unit_rows(rng, 7, 16)
    p = region_probabilities(emb, reg, logit_scale)
    assert p.shape == (40, 7) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert (p >= 0).all() and np.isfinite(p).all()
    if logit_scale > 0:
        assert np.array_equal(p.argmax(1), (emb @ reg.T).argmax(1))
    else:
        np.testing.assert_allclose(p, 1 / 7, atol=1e-6)


def test_region_probabilities_match_a_softmax():
    emb = np.array([[1.0, 0.0]], np.float32)
    reg = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    p = region_probabilities(emb, reg, 10.0)
    np.testing.assert_allclose(p[0], [1 / (1 + np.exp(-10)), np.exp(-10) / (1 + np.exp(-10))], rtol=1e-5)


# ----------------------------------------------------------------------------------------------- vote
def test_vote_radius_zero_is_the_per_cell_argmax():
    rng = np.random.default_rng(1)
    cells = np.array([[0, 0], [0, 2], [1, 1], [2, 3], [3, 0]])
    probs = rng.dirichlet(np.ones(5), size=len(cells)).astype(np.float32)
    index, conf = vote(cells, probs, (4, 4), radius=0)
    expected = np.full((4, 4), -1)
    expected[cells[:, 0], cells[:, 1]] = probs.argmax(1)
    assert np.array_equal(index, expected)
    np.testing.assert_allclose(conf[cells[:, 0], cells[:, 1]], probs.max(1))
    assert (conf[index < 0] == 0).all()


@pytest.mark.parametrize("label_um", [100.0, 300.0])
def test_decode_labels_equals_probabilities_then_vote(label_um, monkeypatch):
    """decode_labels skips the (n, regions) array for radius 0 and works in row blocks: same result as vote()."""
    from napari_cytoclip.inference import predict
    from napari_cytoclip.inference.grid import TileGrid

    rng = np.random.default_rng(3)
    grid = TileGrid.covering((700, 900), 1.0, 100.0)
    rr, cc = np.nonzero(rng.random(grid.shape) < 0.7)
    cells = np.stack([rr, cc], 1).astype(np.int32)
    emb = unit_rows(rng, len(cells), 16).astype(np.float16)
    regions = unit_rows(rng, 4, 16)
    monkeypatch.setattr(predict, "DECODE_ROWS", 7)
    labels, conf = predict.decode_labels(cells, emb, regions, [3, 5, 8, 9], grid, label_um, 30.0)
    probs = region_probabilities(emb, regions, 30.0)
    index, want_conf = vote(cells, probs, grid.shape, footprint_radius(label_um, grid.stride_um))
    np.testing.assert_array_equal(labels, labels_from_index(index, [3, 5, 8, 9]))
    np.testing.assert_allclose(conf, want_conf, rtol=1e-6)


def test_vote_radius_one_averages_encoded_neighbours():
    # a 1 x 4 grid: cells 0, 1, 2 encoded, cell 3 background
    cells = np.array([[0, 0], [0, 1], [0, 2]])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]], np.float32)
    index, conf = vote(cells, probs, (1, 4), radius=1)
    # cell 0: mean(p0, p1) = (0.55, 0.45); cell 1: mean(p0, p1, p2) = (0.4667, 0.5333);
    # cell 2: mean(p1, p2) = (0.25, 0.75); cell 3 is not encoded and gets nothing
    assert index.tolist() == [[0, 1, 1, -1]]
    np.testing.assert_allclose(conf[0, :3], [0.55, 1.6 / 3, 0.75], rtol=1e-6)
    assert conf[0, 3] == 0.0


def test_vote_radius_one_in_two_dimensions():
    # 3 x 3 grid, all encoded; the centre window is confident in class 1, the rest mildly in class 0
    cells = np.array([[r, c] for r in range(3) for c in range(3)])
    probs = np.tile(np.array([[0.6, 0.4]], np.float32), (9, 1))
    probs[4] = [0.0, 1.0]
    index, conf = vote(cells, probs, (3, 3), radius=1)
    # corner (0, 0) averages 4 windows: (0.6 * 3 + 0) / 4 = 0.45 for class 0 -> class 1 wins with 0.55
    # edge (0, 1) averages 6 windows: class 0 = 0.6 * 5 / 6 = 0.5, class 1 = (0.4 * 5 + 1) / 6 = 0.5 (tie: first)
    # centre averages 9: class 0 = 0.6 * 8 / 9 = 0.5333
    assert index[0, 0] == 1 and conf[0, 0] == pytest.approx(0.55)
    assert conf[0, 1] == pytest.approx(0.5)
    assert index[1, 1] == 0 and conf[1, 1] == pytest.approx(0.6 * 8 / 9)


def test_vote_with_no_cells():
    index, conf = vote(np.zeros((0, 2), int), np.zeros((0, 3), np.float32), (2, 3), radius=1)
    assert (index == -1).all() and (conf == 0).all()


@st.composite
def vote_cases(draw):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    k = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    all_cells = np.array([[r, c] for r in range(rows) for c in range(cols)])
    keep = rng.random(len(all_cells)) < draw(st.floats(0.1, 1.0))
    cells = all_cells[keep]
    probs = rng.dirichlet(np.ones(k), size=len(cells)).astype(np.float32)
    radius = draw(st.integers(0, 3))
    perm = rng.permutation(len(cells))
    return cells, probs, (rows, cols), radius, perm


@settings(max_examples=150, deadline=None)
@given(vote_cases())
def test_vote_does_not_depend_on_the_order_of_cells(case):
    cells, probs, shape, radius, perm = case
    index, conf = vote(cells, probs, shape, radius)
    index2, conf2 = vote(cells[perm], probs[perm], shape, radius)
    assert np.array_equal(index, index2)
    assert np.array_equal(conf, conf2)
    encoded = np.zeros(shape, bool)
    if len(cells):
        encoded[cells[:, 0], cells[:, 1]] = True
    assert np.array_equal(index >= 0, encoded)  # labels exactly on the encoded cells
    assert ((conf[encoded] > 0) & (conf[encoded] <= 1 + 1e-6)).all()


@pytest.mark.parametrize("label_um, stride_um, radius", [
    (100, 100, 0), (300, 100, 1), (500, 100, 2), (250, 100, 1), (50, 100, 0), (1000, 100, 4)])
def test_footprint_radius(label_um, stride_um, radius):
    assert footprint_radius(label_um, stride_um) == radius


def test_footprint_radius_ties_follow_one_rule():
    """Ties round down for every ratio (not half to even): label/stride 2, 4, 6, 8 give radius 0, 1, 2, 3."""
    radii = [footprint_radius(k * 100.0, 100.0) for k in (2, 4, 6, 8)]
    assert radii == [0, 1, 2, 3], radii


@pytest.mark.parametrize("label_um, stride_um, radius", [
    (200, 100, 0), (201, 100, 1), (400, 100, 1), (401, 100, 2), (600, 100, 2), (0.6, 0.1, 2), (0.7, 0.1, 3),
    (200 * 0.1, 100 * 0.1, 0)])
def test_footprint_radius_table(label_um, stride_um, radius):
    """Half-way ratios (even label/stride) round down, also through float noise; anything above rounds up."""
    assert footprint_radius(label_um, stride_um) == radius


@settings(max_examples=200, deadline=None)
@given(st.floats(1.0, 1e4), st.floats(1.0, 1e3))
def test_footprint_radius_is_the_nearest_integer_ties_down(label_um, stride_um):
    """The footprint ``2 r + 1`` cells is the odd count nearest to label/stride, never off by more than one cell."""
    r = footprint_radius(label_um, stride_um)
    x = (label_um / stride_um - 1) / 2
    assert isinstance(r, int) and r >= 0
    if x > 0:
        assert x - 0.5 - 1e-6 <= r <= x + 0.5 + 1e-6
    else:
        assert r == 0
    assert footprint_radius(label_um * 1.5, stride_um) >= r  # monotone in the label size


def test_labels_from_index_and_similarity_grid():
    index = np.array([[-1, 0], [1, 2]])
    assert labels_from_index(index, [5, 9, 700]).tolist() == [[0, 5], [9, 700]]
    cells = np.array([[0, 1], [1, 0]])
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    sim = similarity_grid(cells, emb, np.array([0.6, 0.8], np.float32), (2, 2))
    assert np.isnan(sim[0, 0]) and np.isnan(sim[1, 1])
    assert sim[0, 1] == pytest.approx(0.6) and sim[1, 0] == pytest.approx(0.8)


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from napari_cytoclip.models.model import load_model

    return load_model(tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny").path, device="cpu")


CROP = (620, 920, 60, 360)  # rows, cols of plate 41: the ventral-lateral brain edge and the slide around it


@pytest.fixture(scope="module")
def crop_section():
    if not PLATES.is_dir():
        pytest.skip(f"the real Allen plates ({PLATES}) are not there")
    from PIL import Image

    from napari_cytoclip.teach import allen
    from napari_cytoclip.io.sections import section_from_array

    plate = next(p for p in allen.plates() if p.number == 41)
    with Image.open(plate.image) as im:
        img = np.asarray(im.convert("L"))
    y0, y1, x0, x1 = CROP
    return section_from_array(np.ascontiguousarray(img[y0:y1, x0:x1]), plate.um_per_px, name="plate41-crop")


class PerWindow:
    """The model, encoding each window on its own: the numbers cannot depend on the batch it came in."""

    def __init__(self, model):
        self._model = model
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_windows(self, windows):
        self.calls += 1
        if len(windows) == 0:
            return self._model.encode_windows(windows)
        return np.concatenate([self._model.encode_windows(windows[i:i + 1]) for i in range(len(windows))])


class PixelProbe(PerWindow):
    """The model with a batch-independent image tower: each embedding is the differences of 32 fixed pixel
    pairs of its window, normalised (element-wise arithmetic only: no BLAS blocking can make batches differ)."""

    def encode_windows(self, windows):
        self.calls += 1
        n = len(windows)
        if n == 0:
            return np.zeros((0, 32), np.float32)
        flat = windows.reshape(n, -1).astype(np.float32)
        a, b = np.random.default_rng(0).choice(flat.shape[1], (2, 32), replace=False)
        e = flat[:, a] - flat[:, b] + 0.5
        return e / np.sqrt((e * e).sum(1, keepdims=True))


def run(gen):
    """Drain a predict_iter generator: (batch results, the returned Prediction)."""
    results = []
    while True:
        try:
            results.append(next(gen))
        except StopIteration as stop:
            return results, stop.value


@pytest.fixture(scope="module")
def streamed(crop_section, tiny_model):
    from napari_cytoclip.inference.predict import predict_iter

    return run(predict_iter(crop_section, tiny_model, batch_size=7))


def test_predict_iter_streams_progress(streamed):
    results, pred = streamed
    total = len(pred.cells)
    assert 30 < total < np.prod(pred.grid.shape), "the crop must hold tissue and background"
    dones = [r.done for r in results]
    assert dones == sorted(dones) and len(set(dones)) == len(dones)
    assert dones[-1] == total and all(r.total == total for r in results)
    assert all(len(r.cells) <= 7 for r in results) and len(results) == -(-total // 7)
    assert np.array_equal(np.concatenate([r.cells for r in results]), pred.cells)
    ids = {r.id for r in pred.regions}
    for r in results:
        assert set(r.labels.tolist()) <= ids and ((r.confidence > 0) & (r.confidence <= 1)).all()


def test_prediction_labels_are_zero_exactly_outside_encoded_cells(streamed, crop_section):
    _, pred = streamed
    encoded = np.zeros(pred.grid.shape, bool)
    encoded[pred.cells[:, 0], pred.cells[:, 1]] = True
    assert pred.labels.dtype == np.uint16 and pred.labels.shape == pred.grid.shape
    assert (pred.labels[~encoded] == 0).all()
    assert (pred.labels[encoded] > 0).all()
    assert (pred.confidence[~encoded] == 0).all() and (pred.confidence[encoded] > 0).all()
    assert pred.embeddings.shape == (len(pred.cells), 32) and pred.embeddings.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(pred.embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert pred.polarity == "darkfield" and pred.complete
    assert pred.grid.stride_um == pytest.approx(100.0)
    assert pred.tile_counts()["encoded"] == len(pred.cells)
    # the tile grid covers the crop: 300 px at 7.17 um/px with 100 um cells
    assert pred.grid.shape == (int(np.ceil(300 * crop_section.pixel_size_um / 100)),) * 2


def test_same_prediction_for_any_batch_size(crop_section, tiny_model):
    """Tiling invariance end to end: reading, prefetching, ordering and voting do not depend on the batch
    size (the image tower is replaced by a batch-independent one to compare bit for bit)."""
    from napari_cytoclip.inference.predict import predict_iter, predict_section

    results, pred7 = run(predict_iter(crop_section, PixelProbe(tiny_model), batch_size=7))
    pred64 = predict_section(crop_section, PixelProbe(tiny_model), batch_size=64)
    assert len(results) == -(-len(pred7.cells) // 7)
    assert np.array_equal(pred7.cells, pred64.cells)
    assert np.array_equal(pred7.embeddings, pred64.embeddings)
    assert np.array_equal(pred7.labels, pred64.labels)
    assert np.array_equal(pred7.confidence, pred64.confidence)
    assert pred7.signature == pred64.signature
    assert len(np.unique(pred7.labels[pred7.labels > 0])) > 1  # a non-trivial labelling


def test_batched_model_agrees_across_batch_sizes(streamed, crop_section, tiny_model):
    """With the real (batched) model only float rounding (BLAS blocking) may differ between batch sizes."""
    from napari_cytoclip.inference.predict import predict_section

    _, ref = streamed
    p = predict_section(crop_section, tiny_model, batch_size=64)
    assert np.array_equal(p.cells, ref.cells)
    np.testing.assert_allclose(p.embeddings.astype(np.float32), ref.embeddings.astype(np.float32), atol=2e-3)
    assert (p.labels == ref.labels).mean() > 0.97


def test_closing_the_generator_stops_the_work(crop_section, tiny_model):
    from napari_cytoclip.inference.predict import predict_iter

    model = PerWindow(tiny_model)
    gen = predict_iter(crop_section, model, batch_size=4)
    first = next(gen)
    assert first.done == 4 and first.total > 12
    gen.close()
    calls = model.calls
    time.sleep(0.3)
    assert model.calls == calls == 1
    assert not [t for t in threading.enumerate() if t.name == "cytoclip-reader" and t.is_alive()]
    with pytest.raises(StopIteration):
        next(gen)


def test_predict_section_cancel_raises(crop_section, tiny_model):
    from napari_cytoclip.errors import Cancelled
    from napari_cytoclip.inference.predict import predict_section

    seen = []
    with pytest.raises(Cancelled):
        predict_section(crop_section, tiny_model, batch_size=8, progress=lambda d, t: seen.append(d),
                        should_cancel=lambda: len(seen) >= 2)
    assert seen == [8, 16]


def test_decode_with_reversed_regions_keeps_the_names(streamed, tiny_model):
    _, pred = streamed
    before = copy.deepcopy(pred)
    names = {r.id: r.name for r in before.regions}
    regions = list(reversed(before.regions))
    redone = copy.deepcopy(pred).decode(tiny_model.region_embeddings(regions), regions)
    assert [r.id for r in redone.regions] == [r.id for r in regions]
    encoded = before.labels > 0
    before_names = np.vectorize(names.get, otypes=[object])(before.labels[encoded])
    after_names = np.vectorize({r.id: r.name for r in redone.regions}.get, otypes=[object])(redone.labels[encoded])
    assert (before_names == after_names).all()
    np.testing.assert_allclose(redone.confidence, before.confidence, atol=1e-5)


def test_decode_with_a_subset_of_regions(streamed, tiny_model):
    _, pred = streamed
    subset = pred.regions[:3]
    redone = copy.deepcopy(pred).decode(tiny_model.region_embeddings(subset), subset)
    encoded = pred.labels > 0
    assert set(np.unique(redone.labels[encoded]).tolist()) <= {r.id for r in subset}
    assert (redone.labels[~encoded] == 0).all()


def test_similarity_is_nan_off_tissue(streamed, tiny_model):
    _, pred = streamed
    sim = pred.similarity(tiny_model.encode_texts(["cell-dense granular layer"])[0])
    encoded = pred.labels > 0
    assert np.isnan(sim[~encoded]).all() and np.isfinite(sim[encoded]).all()
    assert (np.abs(sim[encoded]) <= 1.001).all()
