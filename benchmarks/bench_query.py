"""Text-query and re-decode latency on 100,000 cached tile embeddings.

    HF_HUB_OFFLINE=1 python benchmarks/bench_query.py [--cells 100000] [--repeats 20]

A :class:`Prediction` of ``--cells`` random L2-normalised float16 embeddings (the dtype predictions
keep) on a 400 x 400 grid, with the shipped model's text tower, vocabulary and logit scale. Timed,
as the Query widget and ``Prediction`` run them:

* **text query**: a new (not memoised) text through the text tower, then ``Prediction.similarity``
  (cosine of every cell to it, as a grid); also the similarity alone, for a memoised text;
* **similarity from a lazy zarr cache**: the same on a prediction loaded back with
  ``cache.load_prediction`` from a cache stored as zarr (what slides over ``cache.LARGE_CELLS`` cells
  get), so each query reads the embeddings from disk;
* **re-decode with a new vocabulary**: region embeddings of a new vocabulary (its prompts through
  the text tower) and ``Prediction.decode`` (probabilities, neighbourhood vote, labels).

Median and maximum of ``--repeats`` runs, milliseconds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def numpy_similarity(cells, embeddings, text_embedding, grid_shape):
    """The baseline the core replaced: a full float32 copy by numpy, then one matrix product."""
    out = np.full(grid_shape, np.nan, np.float32)
    out[cells[:, 0], cells[:, 1]] = np.asarray(embeddings, np.float32) @ np.asarray(text_embedding, np.float32)
    return out


def timed(fn, repeats: int) -> tuple[float, float, object]:
    out, ts = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(1000 * (time.perf_counter() - t))
    return statistics.median(ts), max(ts), out


def main(argv=None) -> int:
    import fastpaths

    from napari_cytoclip.models.bundle import Region
    from napari_cytoclip.inference.cache import load_prediction, save_prediction
    from napari_cytoclip.inference.grid import TileGrid
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.inference.predict import Prediction

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)

    print(f"machine: {fastpaths.machine()}")
    model = load_model(None, device="cpu")
    dim = model.embed_dim
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(args.cells / 0.6)))
    grid = TileGrid((50.0, 50.0), 40.0, (side, side), 2.5)
    flat = np.sort(rng.choice(side * side, size=args.cells, replace=False))
    cells = np.stack([flat // side, flat % side], 1).astype(np.int32)
    emb = rng.standard_normal((args.cells, dim)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    pred = Prediction(grid=grid, cells=cells, embeddings=emb, regions=list(model.regions),
                      labels=np.zeros(grid.shape, np.uint16), confidence=np.zeros(grid.shape, np.float32),
                      signature={}, label_um=model.bundle.label_um, logit_scale=model.logit_scale, polarity="darkfield")
    pred.decode(model.region_embeddings())  # warm-up

    counter = iter(range(10**9))

    def new_text_query():
        t = model.encode_texts([f"granule cell layer, variant {next(counter)}"])[0]
        return pred.similarity(t)

    text = model.encode_texts(["cerebellum"])[0]
    q_med, q_max, sim = timed(new_text_query, args.repeats)
    s_med, s_max, _ = timed(lambda: pred.similarity(text), args.repeats)
    t_med, t_max, _ = timed(lambda: model.encode_texts([f"thalamus {next(counter)}"]), args.repeats)
    assert np.isfinite(sim).sum() == args.cells

    with tempfile.TemporaryDirectory() as tmp:
        save_prediction(pred, Path(tmp) / "cache", large_cells=0)
        lazy = load_prediction(Path(tmp) / "cache")
        z_med, z_max, zsim = timed(lambda: lazy.similarity(text), max(3, args.repeats // 4))
        assert np.allclose(zsim, pred.similarity(text), equal_nan=True)

    def new_vocabulary():
        i = next(counter)
        regions = [Region(r.id, f"{r.name} ({i})", r.acronym, r.color, r.description,
                          tuple(f"{p} [{i}]" for p in r.texts())) for r in model.regions]
        return pred.decode(model.region_embeddings(regions), regions)

    d_med, d_max, _ = timed(new_vocabulary, max(3, args.repeats // 4))
    re = model.region_embeddings()
    dd_med, dd_max, _ = timed(lambda: pred.decode(re), max(3, args.repeats // 4))

    b_med, b_max, bsim = timed(lambda: numpy_similarity(cells, emb, text, grid.shape), args.repeats)
    assert np.allclose(bsim, pred.similarity(text), atol=1e-5, equal_nan=True)
    n_prompts = sum(len(r.texts()) for r in model.regions)

    print()
    print(f"{args.cells} cached float16 embeddings ({dim}-d) on a {side} x {side} grid; ms (median / max of runs)")
    print(f"{'':<58}{'median':>9}{'max':>9}")
    rows = [("text query: new text -> similarity grid (goal < 50 ms)", q_med, q_max),
            ("  of which: text tower, one new text", t_med, t_max),
            ("  similarity grid alone (memoised text)", s_med, s_max),
            ("similarity from a lazy zarr cache (reads from disk)", z_med, z_max),
            (f"re-decode, new vocabulary ({len(model.regions)} regions, {n_prompts} prompts)", d_med, d_max),
            ("  decode alone (region embeddings known)", dd_med, dd_max)]
    rows += [("baseline: numpy float32 copy, then one product", b_med, b_max)]
    for name, med, mx in rows:
        print(f"{name:<58}{med:>9.1f}{mx:>9.1f}")
    print(f"similarity speed-up over the numpy baseline: {b_med / s_med:.1f}x; "
          f"text query goal < 50 ms: {'met' if q_med < 50 else 'not met'} ({q_med:.0f} ms median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
