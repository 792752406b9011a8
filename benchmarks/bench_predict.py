"""Whole-slide prediction speed and memory on a 40,960 px pyramidal JPEG BigTIFF mosaic of Allen plates.

    HF_HUB_OFFLINE=1 python benchmarks/bench_predict.py [--work /tmp/cytoclip-bench] [--max-tiles 3072] \
        [--section benchmarks/README.md]

Builds the slide with ``make_slide.py`` if missing (about 3 minutes, 236 MB; never commit it), then
runs ``--rounds`` (at least 3) interleaved rounds. Each round measures, on the same ``--max-tiles``
tissue cells (a contiguous run in the middle of the slide), wall time and CPU time:

1. **Encoder alone**: the shipped model's ``encode_image`` on pre-loaded, pre-normalised tensors.
2. **End to end**: ``predict.predict_iter`` (lazy TIFF reading, JPEG decoding, window cutting and
   resizing, prefetch thread, encoding, per-batch classification, final vote). Steady state = from
   the first batch out to the last. The reader thread's own CPU time is taken inside this run
   (``time.thread_time`` around each ``ResampledReader.read``; the real reader, only timed).
3. **Naive baseline**: every grid cell of the same rows (background included, no tissue mask),
   each tile read on its own, one forward per batch, no prefetch (``--naive-tiles`` of them).
4. **Stages alone**: reading the windows (``ResampledReader``, one thread: thread CPU time), the
   aggregation (probabilities + neighbourhood vote, ``decode_labels``, on the end-to-end run's
   embeddings) and writing the results folder (``write_prediction_folder``, labels, confidence,
   embedding cache). CPU time is ``time.process_time`` (all threads) unless named thread CPU.

Every figure is printed with the 1-minute load average seen when it was taken. Medians over the
rounds are reported with their spread (min-max). A goal counts as "met" only when every round
meets it and the load stayed at or below the core count; when the rounds straddle the goal (or 1.0
for a ratio) or the machine was overloaded, it is reported as "unresolved on this machine".

Then **peak memory** (VmHWM) of fresh processes that run what ``napari-cytoclip predict`` runs
(open, load the model, predict, write the results folder with its cache) on the 40k slide and its
10k crop: with the real encoder at ``--rss-stride`` and at the model's 100 um stride with the
encoder replaced by a stub (the same reading, grid, embeddings, vote and cache at full size,
without the hour of convolutions).

The script prints the Markdown section for ``benchmarks/README.md`` (between its
``<!-- bench_predict:begin/end -->`` markers) and the rows of its goals table; ``--section FILE``
writes both into FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
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
BEGIN, END = "<!-- bench_predict:begin -->", "<!-- bench_predict:end -->"
GOAL_KEYS = ("| end-to-end / bare-encoder", "| speed-up over a naive", "| background tiles skipped", "| peak RSS")
RATIO_GOAL = 0.9  # issue 5: end-to-end tiles/s >= 0.9 x the bare encoder's


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def vm(field: str = "VmHWM") -> float:
    """This process's ``VmHWM`` (peak) or ``VmRSS`` in MB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spread(values) -> tuple[float, float, float]:
    """(median, min, max)."""
    v = [float(x) for x in values]
    return statistics.median(v), min(v), max(v)


def fmt(values, digits: int = 1) -> str:
    """``median (min-max)``."""
    m, lo, hi = spread(values)
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def verdict(values, goal: float, loads, cores: int, also_one: bool = False) -> str:
    """"met" when every round reaches ``goal`` on a machine not loaded past its cores; "not met" when
    none does; else "unresolved on this machine". ``also_one``: a ratio whose rounds straddle 1.0
    is unresolved too (which of the two is faster is not known)."""
    lo, hi, worst = min(values), max(values), max(loads)
    if worst > cores:
        return f"unresolved on this machine (load {worst:.1f} > {cores} cores)"
    if also_one and lo < 1.0 < hi:
        return "unresolved on this machine (rounds on both sides of 1.0)"
    if lo >= goal:
        return "met"
    if hi < goal:
        return "not met"
    return f"unresolved on this machine (rounds on both sides of {goal:g})"


# ------------------------------------------------------------------------------------ memory child
def rss_child(path: Path, stride: float, stub: bool) -> dict:
    """What ``napari-cytoclip predict`` does, in this (fresh) process; returns peak memory and counts."""
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section
    from napari_cytoclip.models.model import CytoClip, load_model
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder

    t0 = time.perf_counter()
    section = open_section(path)
    model = load_model(None, device="cpu")
    dim = model.embed_dim
    after_load = vm("VmRSS")
    if stub:
        regions = model.region_embeddings()

        def fake(self, windows):
            """Region embedding picked by the widest window's brightness, plus noise: labels as spatially
            coherent as a real model's, at no convolution cost."""
            level = windows[..., 2].reshape(len(windows), -1).mean(1) / 255.0
            k = np.clip((level * 3 * len(regions)).astype(int), 0, len(regions) - 1)
            rng = np.random.default_rng(int(windows[:, 32, 32, 0].sum()))
            e = regions[k] + 0.02 * rng.standard_normal((len(windows), dim)).astype(np.float32)
            return e / np.linalg.norm(e, axis=1, keepdims=True)
        CytoClip.encode_windows = fake
    prediction = predict_section(section, model, stride_um=stride, batch_size=64)
    t_pred = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        write_prediction_folder(prediction, section, Path(tmp) / "out")
        cache = "zarr" if (Path(tmp) / "out" / "cache" / "embeddings.zarr").exists() else "npz"
    return {"path": str(path), "shape": list(section.shape), "stride_um": stride, "stub_encoder": stub,
            "grid": list(prediction.grid.shape), "tiles": int(len(prediction.cells)), "predict_s": t_pred,
            "total_s": time.perf_counter() - t0, "rss_after_model_mb": after_load, "peak_mb": vm("VmHWM"),
            "cache": cache, "load": load()}


def run_child(path: Path, stride: float, stub: bool) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(path), "--stride-um", str(stride)] + (["--stub"] if stub else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"memory child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------ speed
class Clock:
    """Wall and process-CPU seconds of a block, and the load average at its end."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.cpu = time.process_time() - self.c
        self.load = load()


def encoder_only(model, tensors) -> dict:
    import torch

    with Clock() as c, torch.inference_mode():
        n = 0
        for x in tensors:
            torch.nn.functional.normalize(model.model.encode_image(x), dim=-1)
            n += len(x)
    return {"tiles": n, "wall_s": c.wall, "cpu_s": c.cpu, "load": c.load}


def end_to_end(section, model, cells, batch) -> tuple[dict, object]:
    """``predict_iter`` on ``cells``, with the reader thread's CPU time taken around each read."""
    import napari_cytoclip.inference.encode as encode_module
    import napari_cytoclip.inference.predict as predict_module
    from napari_cytoclip.inference.resampled import ResampledReader

    reader_cpu = [0.0]

    class TimedReader(ResampledReader):  # the real reader; only its thread CPU time is added up
        def read(self, centers_px):
            t = time.thread_time()
            try:
                return super().read(centers_px)
            finally:
                reader_cpu[0] += time.thread_time() - t

    original = encode_module.ResampledReader
    encode_module.ResampledReader = TimedReader
    try:
        with Clock() as c:
            gen = predict_module.predict_iter(section, model, cells=cells, batch_size=batch)
            first = None
            try:
                while True:
                    res = next(gen)
                    if first is None:
                        first = (time.perf_counter(), res.done, time.process_time())
            except StopIteration as stop:
                pred = stop.value
    finally:
        encode_module.ResampledReader = original
    t1, c1 = c.t + c.wall, c.c + c.cpu
    steady = len(cells) - first[1]
    return ({"tiles": len(cells), "steady_tiles": steady, "steady_wall_s": t1 - first[0],
             "steady_cpu_s": c1 - first[2], "wall_s": c.wall, "cpu_s": c.cpu, "plan_s": pred.timings["plan_s"],
             "encode_wall_s": pred.timings["encode_s"], "reader_thread_cpu_s": reader_cpu[0], "load": c.load}, pred)


def naive(section, model, cells, grid, batch) -> dict:
    """Each tile read alone, one forward per batch, no prefetch, no tissue mask."""
    from napari_cytoclip.inference.windows import WindowReader
    from napari_cytoclip.io.tissue import detect_polarity

    with Clock() as c:
        reader = WindowReader(section, model.input, detect_polarity(section))
        pending = []
        for cell in cells:
            pending.append(reader.read(grid.centers(cell[None]))[0])
            if len(pending) == batch:
                model.encode_windows(np.stack(pending))
                pending = []
        if pending:
            model.encode_windows(np.stack(pending))
    return {"tiles": len(cells), "wall_s": c.wall, "cpu_s": c.cpu, "load": c.load}


def stages(section, model, grid, cells, polarity, batch, pred) -> dict:
    """Reading, aggregation and writing, each alone."""
    from napari_cytoclip.inference.predict import decode_labels
    from napari_cytoclip.inference.resampled import ResampledReader
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder

    reader = ResampledReader(section, model.input, polarity, grid.centers(cells))
    t = time.thread_time()
    with Clock() as c:
        windows = [reader.read(grid.centers(cells[i:i + batch])) for i in range(0, len(cells), batch)]
    out = {"read": {"wall_s": c.wall, "cpu_s": c.cpu, "thread_cpu_s": time.thread_time() - t, "load": c.load}}
    with Clock() as c:  # what encode_windows does before the encoder: the encoder-alone run starts after it
        for w in windows:
            model.preprocess(w)
    out["preprocess"] = {"wall_s": c.wall, "cpu_s": c.cpu, "load": c.load}
    with Clock() as c:
        decode_labels(pred.cells, pred.embeddings, model.region_embeddings(), [r.id for r in model.regions],
                      pred.grid, model.bundle.label_um, model.logit_scale)
    out["aggregate"] = {"wall_s": c.wall, "cpu_s": c.cpu, "load": c.load}
    with tempfile.TemporaryDirectory() as tmp, Clock() as c:
        write_prediction_folder(pred, section, Path(tmp) / "out")
    out["write"] = {"wall_s": c.wall, "cpu_s": c.cpu, "load": c.load}
    return out


# ------------------------------------------------------------------------------------ report
def report(r: dict) -> tuple[list[str], list[str]]:
    """(the README section's lines, the goals-table rows), from the results of one run."""
    rounds, cores = r["rounds"], r["cores"]
    n, nn = r["timed_tiles"], r["naive_cells"]
    enc = [x["encoder"]["tiles"] / x["encoder"]["wall_s"] for x in rounds]
    enc_cpu = [x["encoder"]["tiles"] / x["encoder"]["cpu_s"] for x in rounds]
    e2e = [x["e2e"]["steady_tiles"] / x["e2e"]["steady_wall_s"] for x in rounds]
    e2e_cpu = [x["e2e"]["steady_tiles"] / x["e2e"]["steady_cpu_s"] for x in rounds]
    nav = [x["naive"]["tiles"] / x["naive"]["wall_s"] for x in rounds]
    ratio = [a / b for a, b in zip(e2e, enc)]
    ratio_cpu = [a / b for a, b in zip(e2e_cpu, enc_cpu)]
    per_tile_naive = [a / b for a, b in zip(e2e, nav)]
    ours_s = [r["plan_s"] + r["tissue_cells"] / v for v in e2e]
    naive_s = [r["grid_cells"] / v for v in nav]
    slide_speedup = [b / a for a, b in zip(ours_s, naive_s)]
    loads = [x[k]["load"] for x in rounds for k in ("encoder", "e2e", "naive")]
    ms = lambda key, part: [1000 * x["stages"][key][part] / n for x in rounds]  # noqa: E731
    read_thread = [1000 * x["stages"]["read"]["thread_cpu_s"] / n for x in rounds]
    read_in_e2e = [1000 * x["e2e"]["reader_thread_cpu_s"] / n for x in rounds]
    enc_ms_cpu = [1000 / v for v in enc_cpu]
    pre = [1000 * x["stages"]["preprocess"]["cpu_s"] / n if "preprocess" in x["stages"] else 0.0 for x in rounds]
    ceiling = [e / (e + rd + p) for e, rd, p in zip(enc_ms_cpu, read_thread, pre)]
    v_ratio = verdict(ratio, RATIO_GOAL, loads, cores, also_one=True)
    v_naive = verdict(slide_speedup, 1.0, loads, cores)
    lo_load, hi_load = min(loads), max(loads)

    title = ("## `bench_predict.py --flat`: the same mosaic as a flat TIFF (no pyramid levels)" if r.get("flat") else
             "## `bench_predict.py`: whole-slide speed, naive baseline, background, peak memory")
    L = [title, "",
         f"    {r['command']}", "",
         f"Generated by the command above in one run ({r['date']}). Machine: {r['machine']}. "
         f"Shipped model, batch {r['batch']}, {r['grid_stride_um']:g} um grid; {n} tissue tiles timed per round "
         f"(the defaults time 3072), naive baseline on {nn} cells; {len(rounds)} interleaved rounds; medians "
         f"with the spread (min-max) of the rounds; load = 1-minute load average when the figure was taken "
         f"({lo_load:.1f} to {hi_load:.1f} on {cores} cores over the timed rounds).", "",
         f"Slide {r['shape'][1]} x {r['shape'][0]} px at {r['pixel_size_um']:g} um/px: grid {r['grid'][0]} x "
         f"{r['grid'][1]} = {r['grid_cells']} cells, {r['tissue_cells']} tissue, "
         f"{100 * r['background_skipped']:.1f}% background skipped; planning {r['plan_s']:.2f} s "
         f"(load {r['plan_load']:.1f}).", "",
         "Per round:", "",
         "| round | encoder tiles/s | end to end tiles/s | ratio | naive tiles/s | encoder tiles/CPU-s | "
         "end to end tiles/CPU-s | load (enc / e2e / naive) |",
         "|---|---|---|---|---|---|---|---|"]
    for i, x in enumerate(rounds):
        L.append(f"| {i + 1} | {enc[i]:.1f} | {e2e[i]:.1f} | {ratio[i]:.2f} | {nav[i]:.1f} | {enc_cpu[i]:.1f} | "
                 f"{e2e_cpu[i]:.1f} | {x['encoder']['load']:.1f} / {x['e2e']['load']:.1f} / {x['naive']['load']:.1f} |")
    ld = {k: [x[k]["load"] for x in rounds] for k in ("encoder", "e2e", "naive")}
    both = lambda *ks: [v for k in ks for v in ld[k]]  # noqa: E731
    L += ["", "Medians (min-max) over the rounds, with the load of the rounds behind each figure:", "",
          "| figure | median (min-max) | load | verdict |", "|---|---|---|---|",
          f"| encoder alone, tiles/s | {fmt(enc)} | {fmt(ld['encoder'])} | |",
          f"| end to end (`predict_iter`, steady), tiles/s | {fmt(e2e)} | {fmt(ld['e2e'])} | |",
          f"| end to end / encoder, wall (goal >= {RATIO_GOAL:g}) | {fmt(ratio, 2)} | "
          f"{fmt(both('encoder', 'e2e'))} | {v_ratio} |",
          f"| end to end / encoder, per CPU-second of this process | {fmt(ratio_cpu, 2)} | "
          f"{fmt(both('encoder', 'e2e'))} | |",
          f"| naive, tiles/s | {fmt(nav)} | {fmt(ld['naive'])} | |",
          f"| end to end / naive, per tile | {fmt(per_tile_naive, 2)} | {fmt(both('e2e', 'naive'))} | |",
          f"| whole slide, projected minutes: ours | {fmt([s / 60 for s in ours_s], 0)} | {fmt(ld['e2e'])} | |",
          f"| whole slide, projected minutes: naive | {fmt([s / 60 for s in naive_s], 0)} | {fmt(ld['naive'])} | |",
          f"| whole-slide speed-up over naive (goal > 1) | {fmt(slide_speedup, 2)} | {fmt(both('e2e', 'naive'))} | "
          f"{v_naive} |",
          "", "Per-stage cost per tile, each stage alone (ms; CPU = all threads of this process unless marked "
          "thread):", "",
          "| stage | wall ms/tile | CPU ms/tile | load |", "|---|---|---|---|",
          f"| reading windows (`ResampledReader`, one thread) | {fmt(ms('read', 'wall_s'), 2)} | "
          f"{fmt(read_thread, 2)} thread | {fmt([x['stages']['read']['load'] for x in rounds])} |",
          f"| reading windows, inside the end-to-end run (reader thread) | | {fmt(read_in_e2e, 2)} thread | |",
          *([f"| preprocessing (`model.preprocess`: uint8 windows to normalised tensors) | "
             f"{fmt(ms('preprocess', 'wall_s'), 2)} | {fmt(pre, 2)} | "
             f"{fmt([x['stages']['preprocess']['load'] for x in rounds])} |"] if "preprocess" in rounds[0]["stages"]
            else []),
          f"| encoder (pre-loaded tensors) | {fmt([1000 / v for v in enc], 2)} | {fmt(enc_ms_cpu, 2)} | "
          f"{fmt([x['encoder']['load'] for x in rounds])} |",
          f"| aggregation and vote (`decode_labels`, {n} tiles on a {r['grid'][0]} x {r['grid'][1]} grid) | "
          f"{fmt(ms('aggregate', 'wall_s'), 2)} | {fmt(ms('aggregate', 'cpu_s'), 2)} | "
          f"{fmt([x['stages']['aggregate']['load'] for x in rounds])} |",
          f"| writing the results folder (`write_prediction_folder`, whole-grid rasters) | "
          f"{fmt(ms('write', 'wall_s'), 2)} | {fmt(ms('write', 'cpu_s'), 2)} | "
          f"{fmt([x['stages']['write']['load'] for x in rounds])} |",
          "",
          f"From the CPU times alone: with no idle core to overlap reading and encoding, end to end would run at "
          f"encoder CPU / (encoder CPU + reading CPU + preprocessing CPU) = {fmt(ceiling, 3)} of the encoder's speed (a derived bound, "
          f"not a measured ratio). Aggregation and writing are paid once per section, not per batch; their "
          f"per-tile figures above are for the {n} timed tiles and the whole-slide grid's rasters.", ""]
    goals = [
        f"| end-to-end / bare-encoder tiles/s >= {RATIO_GOAL:g} | {fmt(ratio, 2)} (median, min-max of "
        f"{len(rounds)} rounds; per CPU-second {fmt(ratio_cpu, 2)}; load {lo_load:.1f}-{hi_load:.1f} on {cores} "
        f"cores) | {v_ratio} |",
        f"| speed-up over a naive baseline | {fmt(slide_speedup, 2)}x for the whole slide ({fmt(per_tile_naive, 2)}x "
        f"per tile, the rest from skipping background; load {lo_load:.1f}-{hi_load:.1f}) | {v_naive} |",
        f"| background tiles skipped | {100 * r['background_skipped']:.1f}% of the {r['grid_cells']:,} grid cells of "
        f"the 40k slide | measured (no goal value) |"]
    mem = r.get("memory")
    if mem:
        L += ["Peak memory (VmHWM) of a fresh process: open, load model, predict, write results + cache:", "",
              "| section | stride um | encoder | grid | tiles | MB after model | peak MB | cache | s | load |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for m in mem:
            L.append(f"| {Path(m['path']).name} | {m['stride_um']:g} | {'stub' if m['stub_encoder'] else 'real'} | "
                     f"{'x'.join(map(str, m['grid']))} | {m['tiles']} | {m['rss_after_model_mb']:.0f} | "
                     f"{m['peak_mb']:.0f} | {m['cache']} | {m['total_s']:.0f} | {m['load']:.1f} |")
        L.append("")
        peak = max(m["peak_mb"] for m in mem)
        pairs = {(Path(m["path"]).name == Path(r["slide"]).name, m["stride_um"], m["stub_encoder"]): m["peak_mb"]
                 for m in mem}
        same = "; ".join(f"{pairs[(True, s, st)]:.0f} vs {pairs[(False, s, st)]:.0f} MB "
                         f"({'stub' if st else 'real'} encoder, {s:g} um grid)"
                         for (big, s, st) in pairs if big and (False, s, st) in pairs)
        ratios = [pairs[(True, s, st)] / pairs[(False, s, st)] for (big, s, st) in pairs if big and (False, s, st) in pairs]
        goals.append(f"| peak RSS < 1.5 GB, the 40k slide within 10% of a 10k crop | 40k slide vs crop: "
                     f"{same} | < 1.5 GB: {'met' if peak < 1536 else 'not met'}; within 10%: "
                     f"{'met' if ratios and max(ratios) <= 1.1 else 'not met'} (ratios "
                     f"{', '.join(f'{x:.2f}' for x in ratios)}; memory does not depend on load) |")
    else:
        goals.append("| peak RSS < 1.5 GB, the 40k slide within 10% of a 10k crop | not measured in this "
                     "run (`--skip-rss`) | not measured |")
    return L, goals


def write_section(path: Path, lines: list[str], goals: list[str], flat: bool = False) -> None:
    """Replace the goal rows above the section (pyramidal slide only) and the text between the
    ``bench_predict`` markers (``bench_predict_flat`` for ``--flat``) of ``path``, each atomically."""
    from napari_cytoclip.io.safe_files import atomic_write_text, write_between_markers

    if goals and not flat:
        head, rest = path.read_text(encoding="utf-8").split(BEGIN, 1)
        rows = head.split("\n")
        for row in goals:
            key = next(k for k in GOAL_KEYS if row.startswith(k))
            rows = [row if line.startswith(key) else line for line in rows]
        atomic_write_text(path, "\n".join(rows) + BEGIN + rest)
    write_between_markers(path, "bench_predict_flat" if flat else "bench_predict", "\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cytoclip-bench")
    ap.add_argument("--max-tiles", type=int, default=3072, help="tissue tiles timed per round")
    ap.add_argument("--naive-tiles", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rss-stride", type=float, default=400.0)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--flat", action="store_true", help="the same mosaic as a flat TIFF (no pyramid levels)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--section", type=Path, default=None, help="README whose bench_predict section is rewritten")
    ap.add_argument("--from-json", type=Path, default=None, help="only print (and write) the report of a --json")
    ap.add_argument("--rss-child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stride-um", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stub", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.stride_um, args.stub)), flush=True)
        return 0
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        if args.rounds < 3:
            ap.error("--rounds must be at least 3 (a median and a spread)")
        if args.max_tiles < 3 * args.batch_size:
            ap.error("--max-tiles must be at least 3 batches (the steady state starts after the first)")
        results = measure(args)
    lines, goals = report(results)
    print("\n".join(lines))
    print("Goals-table rows:")
    print("\n".join(goals))
    if args.section:
        write_section(args.section, lines, goals, flat=bool(results.get("flat")))
    return 0


def measure(args) -> dict:
    import fastpaths
    import make_slide

    from napari_cytoclip.inference.predict import plan_grid
    from napari_cytoclip.inference.resampled import ResampledReader
    from napari_cytoclip.io.sections import open_section
    from napari_cytoclip.models.model import load_model

    given = sys.argv[1:]
    slide, crop = make_slide.ensure_slides(args.work / "slide40k.tif", 40960, 10240)
    if args.flat:  # the same mosaic without pyramid levels: a flat, tiled JPEG BigTIFF
        from bench_flat import write_flat

        slide, crop = write_flat(args.work / "flat40960.tif", 40960), write_flat(args.work / "flat40960_crop10240.tif",
                                                                               10240)
    print(f"machine: {fastpaths.machine()}", flush=True)
    model = load_model(None, device="cpu")
    section = open_section(slide)
    t = time.perf_counter()
    grid, tissue, mask = plan_grid(section, model)
    plan_s = time.perf_counter() - t
    n_grid = int(np.prod(grid.shape))
    results = {"command": "HF_HUB_OFFLINE=1 " + shlex.join(["python", "benchmarks/bench_predict.py", *given]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": fastpaths.machine(),
               "cores": os.cpu_count(), "slide": str(slide), "flat": bool(args.flat), "shape": list(section.shape),
               "pixel_size_um": section.pixel_size_um, "grid": list(grid.shape), "grid_stride_um": grid.stride_um,
               "grid_cells": n_grid, "tissue_cells": int(len(tissue)),
               "background_skipped": 1 - len(tissue) / n_grid, "plan_s": plan_s, "plan_load": load(),
               "batch": args.batch_size}
    print(f"grid {grid.shape}, {len(tissue)} tissue cells, planned in {plan_s:.2f} s (load {load():.1f})", flush=True)

    mid = len(tissue) // 2
    cells = tissue[mid:mid + args.max_tiles]
    reader = ResampledReader(section, model.input, mask.polarity, grid.centers(cells))
    windows = np.concatenate([reader.read(grid.centers(cells[i:i + args.batch_size]))
                              for i in range(0, len(cells), args.batch_size)])
    tensors = [model.preprocess(windows[i:i + args.batch_size]) for i in range(0, len(windows), args.batch_size)]
    model.encode_windows(windows[:args.batch_size])  # oneDNN warm-up
    rows = sorted({int(r) for r in cells[:, 0]})
    strip = np.stack(np.meshgrid(np.asarray(rows), np.arange(grid.shape[1]), indexing="ij"), -1).reshape(-1, 2)
    pick = np.linspace(0, len(strip) - 1, min(args.naive_tiles, len(strip))).astype(int)
    naive_cells = strip[pick].astype(np.int32)
    results.update(timed_tiles=int(len(cells)), naive_cells=int(len(naive_cells)), rounds=[])

    for r in range(args.rounds):
        x = {"encoder": encoder_only(model, tensors)}
        x["e2e"], pred = end_to_end(section, model, cells, args.batch_size)
        x["naive"] = naive(section, model, naive_cells, grid, args.batch_size)
        x["stages"] = stages(section, model, grid, cells, mask.polarity, args.batch_size, pred)
        results["rounds"].append(x)
        e, d, nv = x["encoder"], x["e2e"], x["naive"]
        print(f"  round {r + 1}: encoder {e['tiles'] / e['wall_s']:.1f} tiles/s (load {e['load']:.1f}), end to end "
              f"{d['steady_tiles'] / d['steady_wall_s']:.1f} (load {d['load']:.1f}), naive "
              f"{nv['tiles'] / nv['wall_s']:.1f} (load {nv['load']:.1f})", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=float))

    if not args.skip_rss:
        mem = []
        for path, stride, stub in [(slide, args.rss_stride, False), (crop, args.rss_stride, False),
                                   (slide, 100.0, True), (crop, 100.0, True)]:
            m = run_child(path, stride, stub)
            mem.append(m)
            print(f"  memory: {Path(m['path']).name} stride {stride:g} {'stub' if stub else 'model'}: "
                  f"{m['peak_mb']:.0f} MB peak, {m['tiles']} tiles, {m['total_s']:.0f} s (load {m['load']:.1f})",
                  flush=True)
        results["memory"] = mem
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return results


if __name__ == "__main__":
    sys.exit(main())
