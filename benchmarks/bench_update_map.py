"""*Update map* on a large section: refit the learner and relabel every cell from the cache.

    python benchmarks/bench_update_map.py [--cells 100000] [--rounds 5]

A section of ``--cells`` encoded cells (a square grid) with the shipped model's feature sizes (1280-d
pooled features, 256-d joint embeddings; random unit vectors around a few cluster centres, so the
learner has structure to fit), 2,000 taught cells of a new region and 2,000 of a known one. The first
update projects every cell's features and computes the text prior once (kept in the widget's cache);
later updates refit the head and vote. Prints medians over rounds with the spread and the load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def fake_prediction(n: int, feat_dim: int, emb_dim: int, seed: int = 0):
    from napari_cytoclip.inference.grid import TileGrid
    from napari_cytoclip.inference.predict import Prediction

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    grid = TileGrid(origin=(0.0, 0.0), step=10.0, shape=(side, side), pixel_size_um=10.0)
    rr, cc = np.divmod(np.arange(n), side)
    cells = np.stack([rr, cc], 1).astype(np.int32)
    zone = (cc * 8 // side).astype(np.int64)                 # 8 vertical bands of "tissue types"
    centres_f = rng.normal(size=(8, feat_dim)).astype(np.float32)
    centres_e = rng.normal(size=(8, emb_dim)).astype(np.float32)
    feats = (centres_f[zone] + rng.normal(scale=2.0, size=(n, feat_dim))).astype(np.float16)
    emb = centres_e[zone] + rng.normal(scale=2.0, size=(n, emb_dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    labels = np.zeros((side, side), np.uint16)
    labels[rr, cc] = 1 + zone
    pred = Prediction(grid=grid, cells=cells, embeddings=emb, regions=[], labels=labels,
                      confidence=np.ones((side, side), np.float32), signature={}, label_um=200.0, logit_scale=50.0,
                      polarity="brightfield", features=feats, feature_kind="pooled")
    return pred, zone


def main(argv=None) -> None:
    from napari_cytoclip.models.bundle import Region
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.inference.taught_decode import decode_with_learner
    from napari_cytoclip.teach.teaching import examples_from_section, fit_learner, taught_regions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write-docs", action="store_true", help="put the output into benchmarks/README.md")
    args = ap.parse_args(argv)
    model = load_model(None, device="cpu")
    pred, zone = fake_prediction(args.cells, 1280, model.embed_dim)
    pred.regions = list(model.regions)
    edited = pred.labels.copy()
    rng = np.random.default_rng(1)
    new_rows = rng.choice(np.flatnonzero(zone == 2), 2000, replace=False)
    known_rows = rng.choice(np.flatnonzero(zone == 5), 2000, replace=False)
    cells = pred.cells
    edited[cells[new_rows, 0], cells[new_rows, 1]] = 20
    edited[cells[known_rows, 0], cells[known_rows, 1]] = 7
    table = [*model.regions, Region(20, "new region", "NEW", "#ff8800")]
    taught = examples_from_section(pred, edited, table, pred.features, name="synthetic", section_hash="0",
                                   model={"name": model.bundle.name, "hash": model.model_hash}, when="now")
    regions = taught_regions(model.regions, taught.regions, [r.id for r in taught.regions])
    painted = edited != pred.labels
    cache: dict = {}
    first = last = None
    fits, decodes, totals = [], [], []
    for k in range(args.rounds + 1):
        t0 = time.perf_counter()
        learner = fit_learner(taught, model, regions, basis=None if last is None else (last.basis_mean, last.basis))
        t1 = time.perf_counter()
        decode_with_learner(pred, learner, model, painted=painted, current=edited, regions=regions, cache=cache)
        t2 = time.perf_counter()
        last = learner
        if k == 0:
            first = (t1 - t0, t2 - t1)
            continue
        fits.append(t1 - t0)
        decodes.append(t2 - t1)
        totals.append(t2 - t0)

    def med(v):
        return f"{statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})"

    load = os.getloadavg()[0]
    verdict = "met" if statistics.median(totals) <= 1.0 else (
        "unresolved on this machine (load above the core count)" if load > (os.cpu_count() or 1) else "not met")
    text = "\n".join([
        "Printed by `python benchmarks/bench_update_map.py --write-docs` (synthetic features of the shipped model's "
        "sizes, the shipped model's text prior).", "",
        f"Update map, {args.cells:,} cells, {len(taught)} teaching rows, {os.cpu_count()} CPU cores, "
        f"load {load:.1f} at the end; medians over {args.rounds} rounds (min-max):",
        f"- first update (projects features, text prior): fit {first[0]:.2f} s + relabel {first[1]:.2f} s",
        f"- later updates: fit {med(fits)}, relabel {med(decodes)}, total {med(totals)}",
        f"- goal: an update within 1 s: {verdict}"])
    print(text)
    if args.write_docs:
        from pathlib import Path

        from napari_cytoclip.io.safe_files import write_between_markers

        write_between_markers(Path(__file__).resolve().parent / "README.md", "update-map", text)


if __name__ == "__main__":
    main()
