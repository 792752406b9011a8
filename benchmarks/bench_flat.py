"""Flat images (JPEG, PNG, single-level TIFF): speed, label agreement and memory of the reading pyramid.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_flat.py speed [--plates 40 65 90] [--rounds 3]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_flat.py agree [--plates 5 50]     # default: every test plate
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_flat.py rss [--size 40960] [--crop 10240]

``speed``: per round and plate (interleaved), the bare encoder on the plate's pre-read, pre-normalised
windows against ``predict_section`` on a freshly opened section (planning, the one-time pyramid build,
reading, encoding and voting included); the build alone is timed on another fresh section.
``agree``: on Allen *test* plates (reading only: a comparison, nothing is tuned), the windows prediction reads
(``ResampledReader``) vs each window cut and resized at full resolution (``WindowReader(pyramid=False)``, what
every flat image got before), both encoded: per-tile argmax and voted-label agreement, and pixel macro-F1 of
both against the atlas labels.
``rss``: a flat (single-level, tiled JPEG) TIFF of the ``make_slide`` mosaic and its top-left crop, each
predicted in a fresh process with a stub encoder at the model's 100 um grid; peak RSS (VmHWM) of each.
Every figure is printed with the 1-minute load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from report import Report  # noqa: E402

REPORT = Report()  # what this run printed, for --section
say = REPORT.say


def load() -> float:
    return os.getloadavg()[0]


def spread(v) -> str:
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def _plate(number: int):
    try:
        from napari_cytoclip.teach import allen
    except ImportError:  # before the move to teach/
        from napari_cytoclip import allen

    return next(p for p in allen.plates() if p.number == number)


# ------------------------------------------------------------------------------------ speed
def speed(args) -> None:
    import torch

    from napari_cytoclip.inference.predict import plan_grid, predict_section
    from napari_cytoclip.inference.windows import WindowReader
    from napari_cytoclip.models.model import load_model

    model = load_model(None, device="cpu")
    tensors = {}
    for n in args.plates:
        s = _plate(n).section()
        grid, cells, mask = plan_grid(s, model, args.stride_um)
        reader = WindowReader(s, model.input, mask.polarity, pyramid=False)  # the same windows for every path
        tensors[n] = [model.preprocess(reader.read(grid.centers(cells[i:i + 64]))) for i in range(0, len(cells), 64)]
    model.encode_windows(np.zeros((64, 64, 64, 3), np.uint8))  # warm-up: the encoder and the vocabulary (text
    model.region_embeddings()  # embeddings are memoised per model: a one-time cost, not per section)
    rows = []
    for r in range(args.rounds):
        for n in args.plates:
            t, l0 = time.perf_counter(), load()
            with torch.inference_mode():
                for x in tensors[n]:
                    torch.nn.functional.normalize(model.model.encode_image(x), dim=-1)
            enc_s, enc_load = time.perf_counter() - t, load()
            tiles = sum(len(x) for x in tensors[n])
            t = time.perf_counter()
            s = _plate(n).section()
            pred = predict_section(s, model, stride_um=args.stride_um)
            e2e_s, e2e_load = time.perf_counter() - t, load()
            s = _plate(n).section()
            t = time.perf_counter()
            view = s.pyramid(max(model.input.scales_um) / model.input.size)
            build_s = time.perf_counter() - t
            assert len(pred.cells) == tiles
            row = {"round": r + 1, "plate": n, "tiles": tiles, "encoder_tps": tiles / enc_s, "e2e_tps": tiles / e2e_s,
                   "ratio": enc_s / e2e_s, "build_ms": build_s * 1e3, "levels": len(view.levels),
                   "load": [l0, enc_load, e2e_load]}
            rows.append(row)
            say(f"round {r + 1} plate {n}: {tiles} tiles, encoder {row['encoder_tps']:.0f} tiles/s, end to end "
                  f"{row['e2e_tps']:.0f} tiles/s, ratio {row['ratio']:.2f}, pyramid build {row['build_ms']:.0f} ms "
                  f"({row['levels']} levels), load {l0:.1f}/{enc_load:.1f}/{e2e_load:.1f}", flush=True)
    ratios = [x["ratio"] for x in rows]
    loads = [v for x in rows for v in x["load"]]
    say(f"end to end / encoder, median (min-max) over {args.rounds} rounds x plates {args.plates}: {spread(ratios)}; "
          f"pyramid build ms {spread([x['build_ms'] for x in rows])}; load {min(loads):.1f}-{max(loads):.1f} "
          f"on {os.cpu_count()} cores")
    lo, hi = min(ratios), max(ratios)
    say("goal >= 0.9:", "met" if lo >= 0.9 else "not met" if hi < 0.9 else "unresolved on this machine")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


# ------------------------------------------------------------------------------------ agreement
def agree(args) -> None:
    from napari_cytoclip.inference.predict import decode_labels, plan_grid
    from napari_cytoclip.inference.resampled import ResampledReader
    from napari_cytoclip.inference.windows import WindowReader
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.teach.allen import IGNORED_LABELS, plates
    from napari_cytoclip.teach.evaluate import pixel_confusion

    model = load_model(None, device="cpu")
    region_emb, ids = model.region_embeddings(), [r.id for r in model.regions]
    n_classes = max(max(ids), *IGNORED_LABELS) + 1
    numbers = args.plates or [p.number for p in plates() if p.split == "test"]
    tot = {"tiles": 0, "argmax": 0, "voted": 0}
    cms = {"full": 0, "resampled": 0}
    say(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, precision "
          f"{model.precision}; plates {numbers}", flush=True)
    for n in numbers:
        plate = _plate(n)
        assert plate.split == "test", "agreement is checked on test plates (reading only)"
        s = plate.section()
        grid, cells, mask = plan_grid(s, model, args.stride_um)
        centres = grid.centers(cells)
        readers = {"full": WindowReader(s, model.input, mask.polarity, pyramid=False),  # every flat image before
                   "resampled": ResampledReader(s, model.input, mask.polarity, centres)}  # what predict reads now
        out = {}
        for name, reader in readers.items():
            emb = np.concatenate([model.encode_windows(reader.read(centres[i:i + 64]))
                                  for i in range(0, len(cells), 64)])
            labels, _ = decode_labels(cells, emb, region_emb, ids, grid, model.bundle.label_um, model.logit_scale)
            cm = pixel_confusion(plate.label_map(), labels, grid, n_classes, IGNORED_LABELS)
            cms[name] = cms[name] + cm
            out[name] = ((emb @ region_emb.T).argmax(1), labels[cells[:, 0], cells[:, 1]], macro_f1(cm, ids))
        a = int((out["full"][0] == out["resampled"][0]).sum())
        v = int((out["full"][1] == out["resampled"][1]).sum())
        tot["tiles"] += len(cells)
        tot["argmax"] += a
        tot["voted"] += v
        say(f"plate {n}: {len(cells)} tiles, argmax agreement {a / len(cells):.4%}, voted {v / len(cells):.4%}, "
              f"macro-F1 full-res {out['full'][2]:.4f} resampled {out['resampled'][2]:.4f}, load {load():.1f}",
              flush=True)
    say(f"all {len(numbers)} plates, {tot['tiles']} tiles: argmax agreement {tot['argmax'] / tot['tiles']:.4%}, "
          f"voted {tot['voted'] / tot['tiles']:.4%} (goal >= 99.5%); pooled pixel macro-F1 full-res "
          f"{macro_f1(cms['full'], ids):.4f}, resampled {macro_f1(cms['resampled'], ids):.4f}")


def macro_f1(cm: np.ndarray, ids) -> float:
    """Mean F1 over the region ids present in the truth (rows: truth, columns: prediction)."""
    f1 = []
    for k in ids:
        tp, t, p = cm[k, k], cm[k].sum(), cm[:, k].sum()
        if t:
            f1.append(2 * tp / (t + p) if t + p else 0.0)
    return float(np.mean(f1)) if f1 else float("nan")


# ------------------------------------------------------------------------------------ memory
def write_flat(path: Path, size: int, pixel_um: float = 2.5, cell: int = 4096) -> Path:
    """The ``make_slide`` mosaic's top-left ``size`` px as a flat (no pyramid levels) tiled JPEG BigTIFF."""
    import tifffile
    from make_slide import TILE, Mosaic, _tiles

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    per_cm = 1e4 / pixel_um
    t = time.perf_counter()
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(_tiles(Mosaic(size, pixel_um, cell), 1, size, size), shape=(size, size, 3), dtype=np.uint8,
                  tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                  resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", metadata=None)
    os.replace(tmp, path)
    say(f"wrote {path} ({size} px, {path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s, "
          f"load {load():.1f}", flush=True)
    return path


def vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(path: Path, stride: float) -> dict:
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section
    from napari_cytoclip.models.model import CytoClip, load_model

    t0 = time.perf_counter()
    section = open_section(path)
    model = load_model(None, device="cpu")
    regions, dim = model.region_embeddings(), model.embed_dim
    after = vm("VmRSS")

    def fake(self, windows):  # brightness-picked region embedding: no convolution cost, same reading
        level = windows[..., 2].reshape(len(windows), -1).mean(1) / 255.0
        k = np.clip((level * 3 * len(regions)).astype(int), 0, len(regions) - 1)
        e = regions[k] + 0.01 * np.random.default_rng(len(windows)).standard_normal((len(windows), dim))
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    CytoClip.encode_windows = fake
    t = time.perf_counter()
    view = section.pyramid(max(model.input.scales_um) / model.input.size)
    build_s = time.perf_counter() - t
    on_disk = getattr(view, "pyramid_folder", None) is not None
    pred = predict_section(section, model, stride_um=stride)
    return {"path": path.name, "shape": list(section.shape), "tiles": int(len(pred.cells)),
            "grid": list(pred.grid.shape), "levels": len(view.levels), "pyramid_on_disk": on_disk,
            "build_s": build_s, "total_s": time.perf_counter() - t0, "rss_after_model_mb": after,
            "peak_mb": vm("VmHWM"), "load": load()}


def rss(args) -> None:
    work = args.work
    paths = [write_flat(work / f"flat{args.size}.tif", args.size), write_flat(work / f"flat{args.size}_crop{args.crop}.tif", args.crop)]
    res = {p.name: [] for p in paths}
    for r in range(args.rounds):
        for p in paths:
            cmd = [sys.executable, __file__, "rss-child", str(p), "--stride-um", str(args.stride_um)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode or not lines:
                raise RuntimeError(out.stderr[-3000:])
            m = json.loads(lines[-1])
            res[p.name].append(m)
            say(f"round {r + 1} {m['path']}: {m['shape']} px, {m['tiles']} tiles, {m['levels']} levels "
                  f"({'zarr on disk' if m['pyramid_on_disk'] else 'in memory'}, built in {m['build_s']:.1f} s), "
                  f"peak RSS {m['peak_mb']:.0f} MB (after model {m['rss_after_model_mb']:.0f}), {m['total_s']:.0f} s, "
                  f"load {m['load']:.1f}", flush=True)
    big, small = ([m["peak_mb"] for m in res[p.name]] for p in paths)
    ratio = [a / b for a, b in zip(big, small)]
    say(f"peak RSS {paths[0].name} {spread(big)} MB vs {paths[1].name} {spread(small)} MB: ratio {spread(ratio)} "
          f"(goal <= 1.10: {'met' if max(ratio) <= 1.1 else 'not met' if min(ratio) > 1.1 else 'unresolved'})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["speed", "agree", "rss", "rss-child"])
    ap.add_argument("path", nargs="?", type=Path)
    ap.add_argument("--plates", type=int, nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stride-um", type=float, default=100.0)
    ap.add_argument("--size", type=int, default=40960)
    ap.add_argument("--crop", type=int, default=10240)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cytoclip-bench")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--min-resize", type=float, help="override sections.PYRAMID_MIN_RESIZE in this process")
    ap.add_argument("--section", type=Path, help="README whose bench_flat_<what> section gets this run's output")
    args = ap.parse_args(argv)
    if args.what != "rss-child":
        say(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load {load():.1f}")
    if args.min_resize is not None:  # this benchmark process only: compare the margin's effect
        from napari_cytoclip.io import sections

        sections.PYRAMID_MIN_RESIZE = args.min_resize
    if args.what == "speed":
        args.plates = args.plates or [40, 65, 90]
        speed(args)
    elif args.what == "agree":
        agree(args)
    elif args.what == "rss":
        args.rounds = min(args.rounds, 2) if args.rounds == 3 else args.rounds
        rss(args)
    else:
        print(json.dumps(rss_child(args.path, args.stride_um)))
    if args.section and args.what != "rss-child":
        command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_flat.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--section") and
            a != str(args.section))
        REPORT.write(args.section, f"bench_flat_{args.what}", command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
