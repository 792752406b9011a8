"""Whole-slide prediction speed and memory on a 40,960 px pyramidal JPEG BigTIFF mosaic of Allen plates.

    HF_HUB_OFFLINE=1 python benchmarks/bench_predict.py [--work /tmp/cytoclip-bench] [--max-tiles 3072]

A smaller run for a busy machine (what benchmarks/README.md reports):

    HF_HUB_OFFLINE=1 python benchmarks/bench_predict.py --rounds 2 --max-tiles 1024 --naive-tiles 512 \
        --rss-stride 1600 --skip-chunked

Builds the slide with ``make_slide.py`` if missing (about 3 minutes, 236 MB; never commit it), then
measures in one run:

1. **Encoder alone**: the shipped model's ``encode_image`` on pre-loaded, pre-normalised
   channels-last tensors of ``--max-tiles`` tissue tiles (a contiguous run of tissue cells in the
   middle of the slide), batch ``--batch-size``.
2. **End to end**: ``predict.predict_iter`` on the same cells of the slide (lazy TIFF reading, JPEG
   decoding, window cutting and resizing, preprocessing, prefetch thread, encoding, per-batch
   classification). Steady state = from the first batch out to the last; the one-off planning
   (thumbnail, tissue mask, grid) is timed on the whole slide. Also with the slide's levels opened as
   plain zarr arrays instead of dask arrays: a prototype of a proposed ``sections.py`` change.
   Encoder and end-to-end runs alternate for ``--rounds`` rounds (background load hits both alike);
   the ratio uses the best round of each. Also per CPU-second of this process (all its threads),
   and the reader alone (the windows of the timed cells, batch by batch): on a saturated CPU the
   end-to-end ratio cannot exceed reader rate / (reader rate + encoder rate).
3. **Naive baseline** in the same run: every grid cell of the same strip of rows (background
   included, no tissue mask), each tile read on its own, one forward per batch, no prefetch.
   Whole-slide projections: naive = all grid cells at the naive rate; ours = planning + tissue
   cells at the end-to-end rate.
4. **Peak memory** (VmHWM) of a fresh process that runs what ``napari-cytoclip predict`` runs
   (open, load the model, predict, write the results folder with its embedding cache) on the 40k
   slide and on its 10k crop: with the real encoder at ``--rss-stride`` (default 400 um: the full
   slide at 100 um is ~360,000 tissue tiles, about an hour on 2 cores) and at the model's 100 um
   stride with the encoder replaced by a stub (the same reading, grid, embeddings, vote and
   cache at full size, without the hour of convolutions).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def vm(field: str = "VmHWM") -> float:
    """This process's ``VmHWM`` (peak) or ``VmRSS`` in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def zarr_section(path: Path):
    """The slide with its pyramid levels as plain zarr arrays (no dask): the proposed sections.py reading."""
    import tifffile
    import zarr

    from napari_cytoclip.io.sections import Section, _tiff_pixel_size

    tif = tifffile.TiffFile(path)
    series = tif.series[0]
    group = zarr.open(series.aszarr(), mode="r")
    levels = [group[k] for k in sorted(group.array_keys(), key=int)] if not hasattr(group, "shape") else [group]
    return Section(name=path.stem, levels=levels, pixel_size_um=_tiff_pixel_size(tif, series), source=str(path),
                   _keep_open=[tif])


# ------------------------------------------------------------------------------------ memory child
def chunked_region_probabilities(embeddings, region_embeddings, logit_scale, rows: int = 65536):
    """``aggregate.region_probabilities`` a block of rows at a time: the float32 copy of the embeddings
    (the whole slide's, 4 bytes x dim per tile) never exists at once. Was a prototype; ``predict.decode_labels``
    now works in blocks itself, so this run (skipped with ``--skip-chunked``) no longer differs."""
    from napari_cytoclip.inference.aggregate import region_probabilities

    n = len(embeddings)
    out = np.empty((n, len(region_embeddings)), np.float32)
    for i in range(0, n, rows):
        out[i:i + rows] = region_probabilities(embeddings[i:i + rows], region_embeddings, logit_scale)
    return out


def rss_child(path: Path, stride: float, stub: bool, chunked: bool = False) -> dict:
    """What ``napari-cytoclip predict`` does, in this (fresh) process; returns peak memory and counts."""
    from napari_cytoclip.models.model import CytoClip, load_model
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section

    t0 = time.perf_counter()
    section = open_section(path)
    model = load_model(None, device="cpu")
    dim = model.embed_dim
    after_load = vm("VmRSS")
    if stub:
        regions = model.region_embeddings()

        def fake(self, windows):
            """Region embedding picked by the widest window's brightness, plus noise: labels as spatially
            coherent as a real model's (random embeddings would paint salt and pepper, the worst case
            for the GeoJSON outlines), at no convolution cost."""
            level = windows[..., 2].reshape(len(windows), -1).mean(1) / 255.0
            k = np.clip((level * 3 * len(regions)).astype(int), 0, len(regions) - 1)
            rng = np.random.default_rng(int(windows[:, 32, 32, 0].sum()))
            e = regions[k] + 0.02 * rng.standard_normal((len(windows), dim)).astype(np.float32)
            return e / np.linalg.norm(e, axis=1, keepdims=True)
        CytoClip.encode_windows = fake
    if chunked:
        import napari_cytoclip.inference.predict as predict_module

        predict_module.region_probabilities = chunked_region_probabilities
    prediction = predict_section(section, model, stride_um=stride, batch_size=64)
    t_pred = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        write_prediction_folder(prediction, section, Path(tmp) / "out")
        cache = "zarr" if (Path(tmp) / "out" / "cache" / "embeddings.zarr").exists() else "npz"
    return {"path": str(path), "shape": list(section.shape), "stride_um": stride, "stub_encoder": stub,
            "chunked_decode": chunked,
            "grid": list(prediction.grid.shape), "tiles": int(len(prediction.cells)), "predict_s": t_pred,
            "total_s": time.perf_counter() - t0, "rss_after_model_mb": after_load, "peak_mb": vm("VmHWM"),
            "cache": cache}


def run_child(path: Path, stride: float, stub: bool, chunked: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(path), "--stride-um", str(stride)] + \
        (["--stub"] if stub else []) + (["--chunked-decode"] if chunked else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"memory child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------ speed
def encoder_only(model, tensors) -> tuple[float, float]:
    """Tiles per wall second and per CPU second of this process (reader thread included)."""
    import torch

    t, c = time.perf_counter(), time.process_time()
    n = 0
    with torch.inference_mode():
        for x in tensors:
            torch.nn.functional.normalize(model.model.encode_image(x), dim=-1)
            n += len(x)
    return n / (time.perf_counter() - t), n / max(time.process_time() - c, 1e-9)


def end_to_end(section, model, cells, batch) -> dict:
    from napari_cytoclip.inference.predict import predict_iter

    t0 = time.perf_counter()
    gen = predict_iter(section, model, cells=cells, batch_size=batch)
    first = None
    try:
        while True:
            res = next(gen)
            if first is None:
                first = (time.perf_counter(), res.done, time.process_time())
    except StopIteration as stop:
        pred = stop.value
    t1, c1 = time.perf_counter(), time.process_time()
    steady = (len(cells) - first[1]) / (t1 - first[0])
    return {"steady": steady, "steady_cpu": (len(cells) - first[1]) / max(c1 - first[2], 1e-9), "with_plan": len(cells) / (t1 - t0), "plan_s": pred.timings["plan_s"],
            "encode_share": pred.timings["encode_s"] / (t1 - t0)}


def naive(section, model, cells, grid, batch) -> float:
    """Each tile read alone, one forward per batch, no prefetch, no tissue mask."""
    from napari_cytoclip.io.tissue import detect_polarity
    from napari_cytoclip.inference.windows import WindowReader

    t = time.perf_counter()
    reader = WindowReader(section, model.input, detect_polarity(section))
    pending = []
    for cell in cells:
        pending.append(reader.read(grid.centers(cell[None]))[0])
        if len(pending) == batch:
            model.encode_windows(np.stack(pending))
            pending = []
    if pending:
        model.encode_windows(np.stack(pending))
    return len(cells) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cytoclip-bench")
    ap.add_argument("--max-tiles", type=int, default=3072, help="tissue tiles timed end to end per round")
    ap.add_argument("--naive-tiles", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rss-stride", type=float, default=400.0)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-chunked", action="store_true", help="skip the chunked-decode prototype memory run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rss-child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stride-um", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stub", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunked-decode", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.stride_um, args.stub, args.chunked_decode)), flush=True)
        return 0

    import fastpaths
    import make_slide

    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.inference.predict import plan_grid
    from napari_cytoclip.io.sections import open_section
    from napari_cytoclip.inference.windows import WindowReader

    slide, crop = make_slide.ensure_slides(args.work / "slide40k.tif", 40960, 10240)
    print(f"machine: {fastpaths.machine()}", flush=True)
    model = load_model(None, device="cpu")
    section = open_section(slide)
    t = time.perf_counter()
    grid, tissue, mask = plan_grid(section, model)
    plan_s = time.perf_counter() - t
    n_grid = int(np.prod(grid.shape))
    print(f"slide {section.shape[1]} x {section.shape[0]} px at {section.pixel_size_um:g} um/px, grid {grid.shape} "
          f"at {grid.stride_um:g} um = {n_grid} cells, {len(tissue)} tissue ({100 * (1 - len(tissue) / n_grid):.1f}% "
          f"background skipped), planned in {plan_s:.2f} s", flush=True)

    mid = len(tissue) // 2
    cells = tissue[mid:mid + args.max_tiles]
    reader = WindowReader(section, model.input, mask.polarity)
    t, c = time.perf_counter(), time.process_time()
    windows = np.concatenate([reader.read(grid.centers(cells[i:i + args.batch_size]))
                              for i in range(0, len(cells), args.batch_size)])
    read_rate = (len(cells) / (time.perf_counter() - t), len(cells) / max(time.process_time() - c, 1e-9))
    print(f"reader alone (WindowReader, batches of {args.batch_size} in grid order, JPEG decoding included): "
          f"{read_rate[0]:.0f} tiles/s, {read_rate[1]:.0f} tiles per CPU-second", flush=True)
    tensors = [model.preprocess(windows[i:i + args.batch_size]) for i in range(0, len(windows), args.batch_size)]
    model.encode_windows(windows[:args.batch_size])  # oneDNN warm-up
    zsection = zarr_section(slide)

    enc, enc_cpu, e2e, e2e_z = [], [], [], []
    for r in range(args.rounds):
        wall, cpu = encoder_only(model, tensors)
        enc.append(wall)
        enc_cpu.append(cpu)
        e2e.append(end_to_end(section, model, cells, args.batch_size))
        e2e_z.append(end_to_end(zsection, model, cells, args.batch_size))
        print(f"  round {r + 1}: encoder {enc[-1]:.1f}, end-to-end {e2e[-1]['steady']:.1f} "
              f"(zarr levels {e2e_z[-1]['steady']:.1f}) tiles/s; per CPU-second encoder {enc_cpu[-1]:.1f}, "
              f"end-to-end {e2e[-1]['steady_cpu']:.1f}; load {os.getloadavg()[0]:.1f}", flush=True)
    rows = sorted({int(r) for r in cells[:, 0]})
    strip = np.stack(np.meshgrid(np.asarray(rows), np.arange(grid.shape[1]), indexing="ij"), -1).reshape(-1, 2)
    pick = np.linspace(0, len(strip) - 1, min(args.naive_tiles, len(strip))).astype(int)
    naive_cells = strip[pick].astype(np.int32)
    naive_tissue = float(np.isin(naive_cells[:, 0] * grid.shape[1] + naive_cells[:, 1],
                                 tissue[:, 0] * grid.shape[1] + tissue[:, 1]).mean())
    naive_rate = naive(section, model, naive_cells, grid, args.batch_size)
    print(f"  naive: {naive_rate:.1f} tiles/s on {len(naive_cells)} cells ({100 * naive_tissue:.0f}% tissue)",
          flush=True)

    best_enc = max(enc)
    best = max(e2e, key=lambda d: d["steady"])
    best_z = max(e2e_z, key=lambda d: d["steady"])
    ours_s = plan_s + len(tissue) / best["steady"]
    naive_s = n_grid / naive_rate
    results = {"machine": fastpaths.machine(), "slide": str(slide), "shape": list(section.shape),
               "pixel_size_um": section.pixel_size_um, "grid": list(grid.shape), "grid_cells": n_grid,
               "tissue_cells": int(len(tissue)), "background_skipped": 1 - len(tissue) / n_grid, "plan_s": plan_s,
               "timed_tiles": int(len(cells)), "encoder_tiles_per_s": enc, "encoder_tiles_per_cpu_s": enc_cpu,
               "end_to_end": e2e, "ratio_cpu": max(d["steady_cpu"] for d in e2e) / max(enc_cpu),
               "reader_tiles_per_s": read_rate[0], "reader_tiles_per_cpu_s": read_rate[1],
               "end_to_end_zarr": e2e_z, "naive_tiles_per_s": naive_rate, "naive_cells": int(len(naive_cells)),
               "ratio": best["steady"] / best_enc, "ratio_zarr": best_z["steady"] / best_enc,
               "ratio_per_round_median": statistics.median(d["steady"] / e for d, e in zip(e2e, enc)),
               "ratio_zarr_per_round_median": statistics.median(d["steady"] / e for d, e in zip(e2e_z, enc)),
               "projected_ours_s": ours_s, "projected_naive_s": naive_s, "speedup_vs_naive": naive_s / ours_s,
               "per_tile_speedup_vs_naive": best["steady"] / naive_rate}

    print()
    print(f"Speed on the 40k slide ({len(cells)} tissue tiles timed, batch {args.batch_size}, best of {args.rounds} "
          "interleaved rounds)")
    print(f"{'':<46}{'tiles/s':>9}{'ratio':>8}")
    print(f"{'encoder alone (pre-loaded tensors)':<46}{best_enc:>9.1f}{1.0:>8.2f}")
    print(f"{'end to end, predict_iter (steady)':<46}{best['steady']:>9.1f}{results['ratio']:>8.2f}")
    print(f"{'end to end, zarr levels (proposed)':<46}{best_z['steady']:>9.1f}{results['ratio_zarr']:>8.2f}")
    print(f"{'naive (per-tile reads, no prefetch, no mask)':<46}{naive_rate:>9.1f}{naive_rate / best_enc:>8.2f}")
    print(f"per CPU-second of this process (all threads; fairer under other load): encoder {max(enc_cpu):.1f}, "
          f"end to end {max(d['steady_cpu'] for d in e2e):.1f} tiles, ratio {results['ratio_cpu']:.2f}")
    print(f"reading costs {100 * max(enc_cpu) / read_rate[1]:.1f}% of the encoder's CPU time per tile "
          f"(reader {read_rate[1]:.0f} vs encoder {max(enc_cpu):.1f} tiles per CPU-second): the ceiling of "
          f"the end-to-end ratio on a saturated CPU is {read_rate[1] / (read_rate[1] + max(enc_cpu)):.2f}")
    print(f"end-to-end / encoder, median of the per-round ratios: {results['ratio_per_round_median']:.2f} "
          f"(zarr levels {results['ratio_zarr_per_round_median']:.2f}); planning the whole slide "
          f"{best['plan_s']:.2f} s per predict_iter call")
    print(f"whole slide: {n_grid} grid cells, {len(tissue)} tissue -> {100 * results['background_skipped']:.1f}% "
          f"skipped; projected {ours_s / 60:.0f} min ours vs {naive_s / 60:.0f} min naive = "
          f"{results['speedup_vs_naive']:.1f}x ({results['per_tile_speedup_vs_naive']:.2f}x per tile, the rest from "
          f"skipping background); planning {plan_s:.2f} s")

    if not args.skip_rss:
        runs = [(slide, args.rss_stride, False, False), (crop, args.rss_stride, False, False),
                (slide, 100.0, True, False), (crop, 100.0, True, False)] + \
            ([] if args.skip_chunked else [(slide, 100.0, True, True)])
        mem = []
        for path, stride, stub, chunked in runs:
            r = run_child(path, stride, stub, chunked)
            mem.append(r)
            print(f"  memory: {Path(r['path']).name} stride {stride:g} {'stub' if stub else 'model'}"
                  f"{' chunked decode' if chunked else ''}: "
                  f"{r['peak_mb']:.0f} MB peak, {r['tiles']} tiles, {r['total_s']:.0f} s", flush=True)
        results["memory"] = mem
        print()
        print("Peak memory (VmHWM) of a fresh process: open, load model, predict, write results + cache")
        print(f"{'section':<28}{'stride':>7}{'encoder':>14}{'grid':>12}{'tiles':>9}{'model MB':>10}{'peak MB':>9}"
              f"{'cache':>7}{'s':>7}")
        for r in mem:
            enc_kind = ("stub" if r["stub_encoder"] else "real") + ("+chunked" if r["chunked_decode"] else "")
            print(f"{Path(r['path']).name:<28}{r['stride_um']:>7g}{enc_kind:>14}"
                  f"{'x'.join(map(str, r['grid'])):>12}{r['tiles']:>9}{r['rss_after_model_mb']:>10.0f}"
                  f"{r['peak_mb']:>9.0f}{r['cache']:>7}{r['total_s']:>7.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
