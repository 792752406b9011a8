"""dask.distributed prediction gives the single-process results (LocalCluster, two worker processes): the same
grid, cells and labels; embeddings and confidence up to the float rounding of a different thread count.

Real Allen plates written as TIFFs with resolution tags (so every path reads the same pixel size);
a tiny random model for the many-sections run, the shipped model for one huge-section run.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile

from helpers import allen_plate, tiny_bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
distributed = pytest.importorskip("distributed")


def plate_tiff(folder, n: int, box=None, name=None):
    """Plate ``n`` (gray, optionally cropped to ``(y0, y1, x0, x1)``) as a TIFF stating its pixel size."""
    from PIL import Image

    plate = allen_plate(n)
    with Image.open(plate.image) as im:
        image = np.asarray(im.convert("L"))
    if box is not None:
        y0, y1, x0, x1 = box
        image = image[y0:y1, x0:x1]
    path = folder / f"{name or f'plate{n}'}.tif"
    per_cm = 1e4 / plate.um_per_px
    tifffile.imwrite(path, np.ascontiguousarray(image), resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return path


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    bundle = tiny_bundle(root / "tiny")
    big = plate_tiff(root, 40)                              # 25 x 23 cells at 300 um: split into chunks
    small = plate_tiff(root, 70, box=(250, 750, 200, 700))  # 15 x 15 cells: one whole-section task
    return root, bundle.path, big, small


def single_process():
    """The plain path, run while this module's Client is dask's default scheduler: TIFF levels are
    dask arrays, and computing them would go to the cluster (their zarr store holds an open file and
    does not pickle). Not needed once sections.py reads its levels with the synchronous scheduler."""
    import dask

    return dask.config.set(scheduler="synchronous")


def assert_close_embeddings(a, b):
    """float16 embeddings equal up to the float rounding a different thread count causes (workers run one
    thread; oneDNN blocks its kernels by thread count): a few rows off by a few float16 steps."""
    assert a.dtype == b.dtype == np.float16 and a.shape == b.shape
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=1)
    assert diff.max() <= 2e-3, diff.max()
    assert (diff > 0).mean() <= 0.02, f"{int((diff > 0).sum())} of {len(diff)} embeddings differ"


def _read(folder):
    labels = tifffile.imread(folder / "labels.tif")
    conf = tifffile.imread(folder / "confidence.tif")
    with np.load(folder / "cache" / "embeddings.npz") as z:
        emb, cells = z["embeddings"], z["cells"]
    summary = json.loads((folder / "prediction.json").read_text())
    return labels, conf, emb, cells, summary


def test_cli_scheduler_local_2_matches_plain_cli(data, tmp_path, capsys):
    """``predict --scheduler local:2`` starts its own two-process LocalCluster (before this module's
    cluster exists) and writes what the plain CLI writes."""
    from napari_cytoclip.cli import main

    root, model, big, small = data
    common = ["--model", str(model), "--device", "cpu", "--stride-um", "300", "--batch-size", "32", "--quiet"]
    assert main(["predict", str(small), "--out", str(tmp_path / "plain"), *common]) == 0
    capsys.readouterr()
    rc = main(["predict", str(small), "--out", str(tmp_path / "dist"), *common, "--scheduler", "local:2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.split() == [str(tmp_path / "dist" / "plate70")]
    a, b = _read(tmp_path / "plain" / "plate70"), _read(tmp_path / "dist" / "plate70")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-4, rtol=0)
    assert_close_embeddings(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3])
    assert a[4]["tile_counts"] == b[4]["tile_counts"] and a[4]["tile_counts"]["encoded"] > 50


def test_cli_scheduler_matches_single_process(data, client, tmp_path, monkeypatch, capsys):
    """``predict --scheduler ADDRESS`` writes the same folders as the plain CLI, with one section split."""
    from napari_cytoclip.inference import distributed as dist
    from napari_cytoclip.cli import main

    root, model, big, small = data
    common = ["--model", str(model), "--device", "cpu", "--stride-um", "300", "--batch-size", "32", "--quiet"]
    with single_process():
        assert main(["predict", str(big), str(small), "--out", str(tmp_path / "plain"), *common]) == 0
    monkeypatch.setattr(dist, "DEFAULT_SPLIT_CELLS", 400)   # the 575-cell plate is split, the 225-cell crop not
    monkeypatch.setattr(dist, "DEFAULT_CHUNK_CELLS", 100)   # rounded down to 96 = 3 batches per chunk
    split_calls = []
    original = dist._SplitJob.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        split_calls.append((self.path.name, len(self.starts)))
    monkeypatch.setattr(dist._SplitJob, "__init__", spy)
    rc = main(["predict", str(big), str(small), "--out", str(tmp_path / "dist"), *common,
               "--scheduler", client.scheduler.address])
    assert rc == 0, capsys.readouterr().err
    assert [name for name, _ in split_calls] == ["plate40.tif"] and split_calls[0][1] > 1
    for stem in ("plate40", "plate70"):
        a, b = _read(tmp_path / "plain" / stem), _read(tmp_path / "dist" / stem)
        np.testing.assert_array_equal(a[0], b[0])                       # labels.tif
        np.testing.assert_allclose(a[1], b[1], atol=1e-4, rtol=0)        # confidence.tif
        assert_close_embeddings(a[2], b[2])                             # float16 embeddings
        np.testing.assert_array_equal(a[3], b[3])                       # cells
        assert a[4]["grid"] == b[4]["grid"] and a[4]["section_hash"] == b[4]["section_hash"]
        assert a[4]["tile_counts"] == b[4]["tile_counts"] and a[4]["tile_counts"]["encoded"] > 50
    # one model per worker, loaded once and kept on the worker object
    counts = client.run(lambda dask_worker: len(getattr(dask_worker, dist.WORKER_MODELS_ATTR, {})))
    assert set(counts.values()) <= {0, 1} and sum(counts.values()) >= 1


def test_predict_many_local_scheduler_refuses_existing_and_reports_failures(data, client, tmp_path):
    from napari_cytoclip.inference.distributed import predict_many
    from napari_cytoclip.errors import OutputError, SectionError

    root, model, big, small = data
    (tmp_path / small.stem).mkdir()
    with pytest.raises(OutputError):
        predict_many([small], tmp_path, model=model, scheduler=client, stride_um=400, device="cpu")
    bad = tmp_path / "broken.jpg"  # not a TIFF: fails on a worker, the error comes back intact
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(SectionError, match="broken.jpg"):
        predict_many([bad], tmp_path / "out", model=model, scheduler=client, stride_um=400, device="cpu")
    with pytest.raises(ValueError):
        predict_many([small], tmp_path / "out", model=model, scheduler="local:0")


def test_huge_section_chunks_equal_predict_section(client, tmp_path):
    """The shipped model: chunks of cells on two workers == one process (labels, confidence, embeddings)."""
    from napari_cytoclip.inference.distributed import predict_section_distributed
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section

    path = plate_tiff(tmp_path, 55, box=(150, 850, 100, 800), name="crop55")
    model = load_model(None, device="cpu")
    with single_process():
        section = open_section(path)
        ref = predict_section(section, model, stride_um=200, batch_size=32)
        section.close()
    seen = []
    got = predict_section_distributed(path, client, None, stride_um=200, batch_size=32, chunk_cells=64,
                                      device="cpu", precision=model.precision,
                                      progress=lambda done, total: seen.append((done, total)))
    assert got.timings["chunks"] > 2 and seen[-1][0] == seen[-1][1] == len(ref.cells)
    np.testing.assert_array_equal(got.cells, ref.cells)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.confidence, ref.confidence, atol=1e-4, rtol=0)
    assert_close_embeddings(got.embeddings, ref.embeddings)
    assert got.signature == ref.signature and got.polarity == ref.polarity
    assert [r.id for r in got.regions] == [r.id for r in ref.regions]
    assert got.grid == ref.grid and len(np.unique(ref.labels)) > 3
