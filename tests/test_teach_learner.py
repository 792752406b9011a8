"""The live-teaching learner (models/learner.py) and the fine CCF label transfer (allen.py)."""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest

from napari_cytoclip.teach import allen
from napari_cytoclip.models.learner import Learner, prior_logits, smooth

PLATES = allen.default_data_dir() / "allen_ara_coronal_nissl_plates"
needs_data = pytest.mark.skipif(not PLATES.is_dir(), reason=f"the real Allen plates ({PLATES}) are not there")


def _toy(n_per=200, d=16, seed=0):
    """Three known classes whose text prior is right, and features where class 2 hides a new class 3."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (4, d))
    y = np.repeat(np.arange(4), n_per)
    x = centres[y] + rng.normal(0, 1, (len(y), d))
    text = np.eye(3, 8, dtype=np.float32)                 # 3 known texts in an 8-d joint space
    joint = text[np.minimum(y, 2)] + rng.normal(0, 0.05, (len(y), 8))  # new class 3 looks like class 2
    joint /= np.linalg.norm(joint, axis=1, keepdims=True)
    return x.astype(np.float32), y, joint.astype(np.float32), text


def test_untaught_learner_is_the_text_classifier():
    x, y, joint, text = _toy()
    prior = prior_logits(joint, text, 10.0, [0, 1, 2])
    learner = Learner().set_stats(x).fit(x[:0], y[:0], prior[:0], [1, 2, 3])
    z = 10.0 * joint @ text.T
    expect = np.exp(z - z.max(1, keepdims=True))
    expect /= expect.sum(1, keepdims=True)
    np.testing.assert_allclose(learner.predict_proba(x, prior), expect, atol=1e-5)


def test_new_region_from_examples_and_untaught_regions_keep_zero_shot():
    x, y, joint, text = _toy()
    classes = [0, 1, 2, 3]
    # class 3 is new and splits known class 2 (its parent): each starts at the parent's logit - log 2
    prior = prior_logits(joint, text, 10.0, [0, 1, 2, 2], children=[1, 1, 2, 2])
    taught = np.flatnonzero((y >= 2) & (np.arange(len(y)) % 200 < 20))   # 20 examples each of classes 2 and 3
    learner = Learner(l2=1e-2).set_stats(x).fit(x[taught], y[taught], prior[taught], classes)
    pred = np.asarray(classes)[learner.predict_proba(x, prior).argmax(1)]
    held = np.setdiff1d(np.arange(len(y)), taught)
    for k in classes:
        assert np.mean(pred[held][y[held] == k] == k) > 0.9, k
    assert list(learner.taught_counts) == [0, 0, 20, 20]


def test_parent_split_shares_the_parent_probability():
    _, _, joint, text = _toy()
    z = prior_logits(joint, text, 10.0, [0, 1, 2, 2], children=[1, 1, 2, 2])
    np.testing.assert_allclose(z[:, 2], z[:, 3])
    np.testing.assert_allclose(z[:, 2], 10.0 * joint @ text[2] - math.log(2), atol=1e-5)
    none = prior_logits(joint, text, 10.0, [0, None])
    np.testing.assert_allclose(none[:, 1], (10.0 * joint @ text.T).min(1), atol=1e-5)


def test_state_round_trip_is_plain_arrays_and_predicts_the_same():
    x, y, joint, text = _toy()
    prior = prior_logits(joint, text, 10.0, [0, 1, 2, 2], children=[1, 1, 2, 2])
    learner = Learner(l2=0.1, balance=0.5).set_stats(x).fit(x[::7], y[::7], prior[::7], [0, 1, 2, 3])
    state = learner.to_state()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    again = Learner.from_state({k: v.copy() for k, v in state.items()})
    np.testing.assert_array_equal(again.logits(x, prior), learner.logits(x, prior))
    assert (again.l2, again.balance) == (0.1, 0.5)


def test_newer_state_is_refused():
    x, y, joint, text = _toy()
    state = Learner().set_stats(x).fit(x[:0], y[:0], np.zeros((0, 3), np.float32), [0, 1, 2]).to_state()
    state["version"] = np.array([99])
    with pytest.raises(ValueError, match="newer"):
        Learner.from_state(state)


@pytest.mark.parametrize("radius, self_weight, flips", [(0, 1.0, False), (1, 1.0, True), (1, 20.0, False)])
def test_smooth_votes_with_encoded_neighbours_only(radius, self_weight, flips):
    cells = np.array([(r, c) for r in range(3) for c in range(3)] + [(0, 5)], np.int32)
    probs = np.tile(np.array([[0.9, 0.1]], np.float32), (len(cells), 1))
    centre = 4
    probs[centre] = (0.2, 0.8)       # an outlier amid 8 neighbours of the other class
    probs[-1] = (0.3, 0.7)           # an isolated cell: no encoded neighbour, keeps its own vote
    out = smooth(cells, probs.copy(), (3, 6), radius, self_weight)
    assert (out[centre].argmax() == 0) == flips
    np.testing.assert_allclose(out[-1], probs[-1])


# ------------------------------------------------------------------------------------------------
# fine CCF labels

@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_read_nrrd_fortran_order(tmp_path, encoding):
    vol = np.arange(2 * 3 * 4, dtype=np.uint32).reshape(2, 3, 4)
    body = vol.tobytes(order="F")
    header = (f"NRRD0005\ntype: uint32\ndimension: 3\nsizes: 2 3 4\nendian: little\nencoding: {encoding}\n\n").encode()
    path = tmp_path / "v.nrrd"
    path.write_bytes(header + (gzip.compress(body) if encoding == "gzip" else body))
    np.testing.assert_array_equal(allen.read_nrrd(path), vol)


def test_structure_tree_lut_prefers_the_deepest_target():
    tree = allen.StructureTree(acronym={1: "root", 2: "A", 3: "A1", 4: "B"}, name={},
                               path={1: (1,), 2: (1, 2), 3: (1, 2, 3), 4: (1, 4)})
    np.testing.assert_array_equal(tree.lut([2, 3], np.array([3, 2, 4, 1])), [2, 1, 0, 0])
    assert tree.children(2) == [3] and tree.id_of("B") == 4


@needs_data
@pytest.mark.parametrize("plate", [43, 83])
def test_fine_labels_agree_with_the_coarse_labels(plate):
    tree = allen.structure_tree()
    coarse = allen.plates()[plate - 1].label_map()
    fine = allen.fine_labels(plate)
    assert fine.shape == coarse.shape
    ids = [tree.id_of(a) for a in ("Isocortex", "OLF", "HPF", "CTXsp", "STR", "PAL", "TH", "HY", "MB", "P", "MY", "CB",
                                   "fiber tracts", "VS", "root")]
    u, inv = np.unique(fine, return_inverse=True)
    mapped = tree.lut(ids, u)[inv].reshape(fine.shape)
    labelled = coarse > 0
    assert np.mean(mapped[labelled] == coarse[labelled]) > 0.999


@needs_data
def test_hippocampal_subregions_on_a_plate():
    tree = allen.structure_tree()
    fine = allen.fine_labels(83)
    sub = allen.subregion_labels(fine, ["CA", "DG", "RHP"], tree)
    hpf = allen.subregion_labels(fine, ["HPF"], tree) == 1
    counts = np.bincount(sub[hpf], minlength=4)
    assert (counts[1:] > 1000).all()                      # CA, DG and RHP all present
    assert counts[0] < 0.05 * counts.sum()                # little of HPF is in none of them
    assert not sub[~hpf].any()                            # nothing outside HPF
    assert set(allen.sub_regions("STR", tree)) == {"STRd", "STRv", "LSX", "sAMY"}
