"""GeoJSON outlines of label grids: exact cell boundaries, holes, diagonal contact, round trips."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_cytoclip.errors import CytoclipError
from napari_cytoclip.outputs.geojson import geojson_to_labels, labels_to_geojson, write_geojson

REGIONS = [{"id": i, "name": f"r{i}", "acronym": f"A{i}", "color": "#102030"} for i in range(1, 6)]


def roundtrip(labels, origin=(0.0, 0.0), step=1.0):
    data = labels_to_geojson(labels, REGIONS, origin=origin, step=step)
    return geojson_to_labels(json.loads(json.dumps(data)), labels.shape, REGIONS, origin=origin, step=step)


def rings(data, rid):
    feat = next(f for f in data["features"] if f["properties"]["region_id"] == rid)
    return feat["geometry"]["coordinates"]


def signed_area(ring):
    xy = np.asarray(ring)
    return float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]) / 2)


@settings(max_examples=150, deadline=None)
@given(arrays(np.uint16, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 4)))
def test_roundtrip_any_grid(labels):
    assert np.array_equal(roundtrip(labels), labels)


def test_single_cell_square_in_qupath_pixels():
    labels = np.zeros((3, 3), np.uint16)
    labels[1, 1] = 2
    data = labels_to_geojson(labels, REGIONS, origin=(10.0, 20.0), step=4.0)
    (poly,) = rings(data, 2)
    xs, ys = zip(*poly[0])
    # cell (1,1) is centred at pixel (14, 24) in napari's convention: it spans x 22..26, y 12..16 (+0.5)
    assert (min(xs), max(xs), min(ys), max(ys)) == (22.5, 26.5, 12.5, 16.5)
    assert len(poly[0]) == 5 and signed_area(poly[0]) > 0
    props = data["features"][0]["properties"]
    assert props["classification"] == {"name": "r2", "color": [16, 32, 48]} and props["objectType"] == "annotation"


def test_diagonal_contact_gives_two_polygons():
    labels = np.array([[1, 0], [0, 1]], np.uint16)
    polys = rings(labels_to_geojson(labels, REGIONS), 1)
    assert len(polys) == 2 and all(len(p) == 1 and len(p[0]) == 5 for p in polys)
    assert np.array_equal(roundtrip(labels), labels)


def test_hole_and_island_in_hole():
    labels = np.ones((7, 7), np.uint16)
    labels[1:6, 1:6] = 0
    labels[3, 3] = 1
    polys = rings(labels_to_geojson(labels, REGIONS), 1)
    assert sorted(len(p) for p in polys) == [1, 2]
    outer = next(p for p in polys if len(p) == 2)
    assert signed_area(outer[0]) > 0 > signed_area(outer[1])
    assert np.array_equal(roundtrip(labels), labels)


def test_scaled_roundtrip_and_border():
    labels = np.zeros((5, 6), np.uint16)
    labels[:, 0] = 3
    labels[4, :] = 4
    assert np.array_equal(roundtrip(labels, origin=(3.5, -2.0), step=7.25), labels)


def test_unknown_names_and_malformed(tmp_path):
    labels = np.array([[1]], np.uint16)
    data = labels_to_geojson(labels, REGIONS)
    data["features"][0]["properties"]["classification"]["name"] = "Nowhere"
    data["features"][0]["properties"].pop("region_id")
    data["features"][0]["properties"].pop("name")
    with pytest.raises(CytoclipError, match="Nowhere"):
        geojson_to_labels(data, (1, 1), REGIONS)
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(CytoclipError, match="bad.geojson"):
        geojson_to_labels(bad, (1, 1), REGIONS)
    with pytest.raises(CytoclipError, match="Polygon"):
        geojson_to_labels({"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]},
                           "properties": {"name": "r1"}}, (1, 1), REGIONS)
    with pytest.raises(CytoclipError, match="FeatureCollection"):
        geojson_to_labels({"type": "Nope"}, (1, 1), REGIONS)


def test_write_is_atomic_and_readable(tmp_path):
    path = write_geojson(labels_to_geojson(np.eye(3, dtype=np.uint16), REGIONS), tmp_path / "a.geojson")
    assert json.loads(path.read_text())["type"] == "FeatureCollection"
    assert [p.name for p in tmp_path.iterdir()] == ["a.geojson"]


def _square(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def test_partly_outside_is_clipped_entirely_outside_is_refused():
    part = {"type": "Feature", "geometry": _square(-10, -10, 2, 2), "properties": {"name": "r2"}}
    labels = geojson_to_labels({"type": "FeatureCollection", "features": [part]}, (4, 4), REGIONS)
    assert labels[0, 0] == labels[1, 1] == 2 and labels[3, 3] == 0
    away = {"type": "Feature", "geometry": _square(-30, -30, -20, -20), "properties": {"name": "r2"}}
    with pytest.raises(CytoclipError, match=r"features 1 \(r2\) lie entirely outside"):
        geojson_to_labels({"type": "FeatureCollection", "features": [part, away]}, (4, 4), REGIONS)


def test_region_id_accepts_integral_values_and_reports_unknown_ids():
    for rid in (3, 3.0, "3"):
        doc = {"type": "Feature", "geometry": _square(0, 0, 1, 1), "properties": {"region_id": rid}}
        assert geojson_to_labels(doc, (1, 1), REGIONS)[0, 0] == 3
    doc = {"type": "Feature", "geometry": _square(0, 0, 1, 1), "properties": {"region_id": 3.5}}
    with pytest.raises(CytoclipError, match="region_id"):
        geojson_to_labels(doc, (1, 1), REGIONS)
    doc = {"type": "Feature", "geometry": _square(0, 0, 1, 1), "properties": {"region_id": 99}}
    with pytest.raises(CytoclipError, match="region_id 99"):
        geojson_to_labels(doc, (1, 1), REGIONS)
