"""Label agreement of the fast CPU paths with plain fp32, on all 26 Allen test plates at the default stride.

    HF_HUB_OFFLINE=1 python benchmarks/bench_agreement.py [--work /tmp/cytoclip-bench] [--paths ...]

For every test plate (plate number a multiple of 5) the tissue windows of the default grid
(100 um) are read once with the package's own ``WindowReader`` and kept as uint8 under ``--work``
(reruns reuse them; never committed). Each path of ``fastpaths.py`` encodes every window; the
per-tile label is the argmax over the model's regions of the tile embedding (before the
neighbourhood vote), and the voted label grid is compared too. ``int8`` changes only the Linear
projection, so it is computed exactly from the fp32 trunk features. ``bf16`` proper is emulated
(very slow) on CPUs without AVX-512-BF16, so it runs on ``--bf16-tiles`` tiles to check that
``bf16sim`` reproduces it; ``bf16sim`` runs on every tile.

Also: float16 storage of embeddings (what ``Prediction`` keeps): per-tile argmax labels and voted
labels from fp16 vs fp32 embeddings, and top-100 retrieval overlap for text queries.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fastpaths  # noqa: E402

QUERIES = ["cerebellum", "hippocampal formation", "isocortex", "fiber tracts", "striatum",
           "a Nissl-stained tile of the thalamus", "olfactory areas", "ventricle"]


def read_windows(model, plates, stride_um: float, work: Path) -> dict:
    """``{plate: (cells, windows uint8)}`` for each plate, cached under ``work``."""
    from napari_cytoclip.inference.predict import plan_grid
    from napari_cytoclip.inference.windows import WindowReader

    out = {}
    for plate in plates:
        f = work / f"windows_s{stride_um:g}_plate{plate.number:03d}.npz"
        if not f.is_file():
            t = time.perf_counter()
            section = plate.section()
            grid, cells, mask = plan_grid(section, model, stride_um)
            reader = WindowReader(section, model.input, mask.polarity)
            windows = np.concatenate([reader.read(grid.centers(cells[i:i + 256])) for i in range(0, len(cells), 256)])
            np.savez(f, cells=cells, windows=windows, grid=json.dumps(grid.to_dict()))
            print(f"  read plate {plate.number}: {len(cells)} tiles in {time.perf_counter() - t:.1f} s", flush=True)
        with np.load(f) as z:
            out[plate.number] = (z["cells"], z["windows"], json.loads(str(z["grid"])))
    return out


def encode_path(name, f, model, data, work: Path, batch: int, trunk: bool = False) -> tuple[dict, float]:
    """Embeddings per plate for path ``name`` (cached); returns them and the tiles/s of what was encoded now."""
    import torch

    res, n_new, t_new = {}, 0, 0.0
    for number, (cells, windows, _grid) in data.items():
        cache = work / f"emb_{name}{'_trunk' if trunk else ''}_s_plate{number:03d}.npy"
        if cache.is_file():
            res[number] = np.load(cache)
            continue
        t = time.perf_counter()
        if trunk:  # pooled trunk features (before the Linear projection), fp32 NCHW
            parts = []
            with torch.inference_mode():
                for i in range(0, len(windows), batch):
                    parts.append(f(fastpaths.normalised_batch(model, windows[i:i + batch])).numpy())
            emb = np.concatenate(parts)
        else:
            emb = fastpaths.encode(f, model, windows, batch)
        t_new += time.perf_counter() - t
        n_new += len(windows)
        np.save(cache, emb)
        res[number] = emb
        print(f"  {name}: plate {number} ({len(windows)} tiles, {len(windows) / (time.perf_counter() - t):.0f} "
              f"tiles/s)", flush=True)
    return res, (n_new / t_new if t_new else float("nan"))


def tile_labels(emb, region_emb, logit_scale):
    from napari_cytoclip.inference.aggregate import region_probabilities

    return region_probabilities(emb, region_emb, logit_scale).argmax(1)


def voted(cells, emb, grid, model, region_emb):
    from napari_cytoclip.inference.grid import TileGrid
    from napari_cytoclip.inference.predict import decode_labels

    labels, _ = decode_labels(cells, emb, region_emb, [r.id for r in model.regions], TileGrid.from_dict(grid),
                              model.bundle.label_um, model.logit_scale)
    return labels[cells[:, 0], cells[:, 1]]


def compare(ref: dict, other: dict, data: dict, model, region_emb) -> dict:
    tiles = same = vsame = 0
    worst = (2.0, -1)
    cos = []
    for number, (cells, _w, grid) in data.items():
        a, b = ref[number], other[number]
        la, lb = tile_labels(a, region_emb, model.logit_scale), tile_labels(b, region_emb, model.logit_scale)
        va, vb = voted(cells, a, grid, model, region_emb), voted(cells, b, grid, model, region_emb)
        tiles += len(a)
        same += int((la == lb).sum())
        vsame += int((va == vb).sum())
        frac = float((la == lb).mean()) if len(a) else 1.0
        worst = min(worst, (frac, number))
        cos.append(np.sum(a * b, 1))
    cos = np.concatenate(cos)
    return {"tiles": tiles, "tile_agreement": same / tiles, "voted_agreement": vsame / tiles,
            "worst_plate": worst[1], "worst_plate_agreement": worst[0],
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def main(argv=None) -> int:
    import torch

    from napari_cytoclip.teach import allen
    from napari_cytoclip.models.model import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cytoclip-bench")
    ap.add_argument("--paths", nargs="+", default=["channels_last", "jit", "compile", "int8", "bf16sim"])
    ap.add_argument("--stride-um", type=float, default=None, help="default: the model's (100 um)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--bf16-tiles", type=int, default=192, help="tiles encoded with real (emulated) bf16")
    ap.add_argument("--plates", type=int, nargs="*", default=None, help="test plate numbers (default: all 26)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    print(f"machine: {fastpaths.machine()}", flush=True)
    model = load_model(None, device="cpu", precision="fp32")
    stride = float(args.stride_um or model.bundle.stride_um)
    plates = [p for p in allen.plates(split="test") if args.plates is None or p.number in args.plates]
    print(f"{len(plates)} test plates, stride {stride:g} um, batch {args.batch_size}", flush=True)
    data = read_windows(model, plates, stride, args.work)
    n_tiles = sum(len(c) for c, _w, _g in data.values())
    print(f"{n_tiles} tissue tiles", flush=True)
    region_emb = model.region_embeddings()

    results: dict = {"machine": fastpaths.machine(), "stride_um": stride, "tiles": n_tiles, "plates": len(plates),
                     "paths": {}}
    ref, speed = encode_path("fp32", fastpaths.build("fp32", model), model, data, args.work, args.batch_size)
    results["paths"]["fp32"] = {"tiles_per_s_while_encoding": speed}
    for name in args.paths:
        if name == "int8":  # only the Linear projection differs: apply it to the fp32 trunk features
            fp32_vis = fastpaths.build("fp32", model)
            trunk = model.model.visual.trunk
            trunk_f = lambda x: trunk(x.contiguous())  # noqa: E731
            feats, _ = encode_path("fp32", trunk_f, model, data, args.work, args.batch_size, trunk=True)
            with torch.no_grad():
                q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(model.model.visual.head),
                                                           {torch.nn.Linear}, dtype=torch.qint8)
                head = model.model.visual.head
                other = {k: torch.nn.functional.normalize(q(torch.from_numpy(v)), dim=-1).numpy()
                         for k, v in feats.items()}
                check = {k: torch.nn.functional.normalize(head(torch.from_numpy(v)), dim=-1).numpy()
                         for k, v in feats.items()}
            del fp32_vis
            gap = max(float(np.abs(check[k] - ref[k]).max()) for k in ref)
            results["paths"]["int8"] = compare(ref, other, data, model, region_emb)
            results["paths"]["int8"]["head_on_trunk_vs_full_max_abs"] = gap
        else:
            t = time.perf_counter()
            f = fastpaths.build(name, model, args.batch_size)
            other, speed = encode_path(name, f, model, data, args.work, args.batch_size)
            results["paths"][name] = compare(ref, other, data, model, region_emb)
            results["paths"][name]["tiles_per_s_while_encoding"] = speed
            results["paths"][name]["build_and_encode_s"] = time.perf_counter() - t
        print(f"  {name}: {json.dumps(results['paths'][name])}", flush=True)

    # real bf16 (emulated on this CPU) on a subset, against bf16sim and fp32
    if args.bf16_tiles > 0 and "bf16sim" in results["paths"]:
        rng = np.random.default_rng(0)
        keys = sorted(data)
        all_idx = [(k, i) for k in keys for i in range(len(data[k][0]))]
        pick = sorted(rng.choice(len(all_idx), size=min(args.bf16_tiles, len(all_idx)), replace=False))
        chosen = [all_idx[j] for j in pick]
        windows = np.stack([data[k][1][i] for k, i in chosen])
        t = time.perf_counter()
        real = fastpaths.encode(fastpaths.build("bf16", model), model, windows, 64)
        dt = time.perf_counter() - t
        sim = np.stack([np.load(args.work / f"emb_bf16sim_s_plate{k:03d}.npy")[i] for k, i in chosen])
        r32 = np.stack([ref[k][i] for k, i in chosen])
        lab = lambda e: tile_labels(e, region_emb, model.logit_scale)  # noqa: E731
        results["bf16_subset"] = {
            "tiles": len(chosen), "tiles_per_s_emulated": len(chosen) / dt,
            "real_vs_sim_min_cosine": float(np.sum(real * sim, 1).min()),
            "real_vs_sim_label_agreement": float((lab(real) == lab(sim)).mean()),
            "real_vs_fp32_label_agreement": float((lab(real) == lab(r32)).mean()),
            "sim_vs_fp32_label_agreement": float((lab(sim) == lab(r32)).mean()),
            "real_vs_fp32_min_cosine": float(np.sum(real * r32, 1).min()),
            "sim_vs_fp32_min_cosine": float(np.sum(sim * r32, 1).min())}
        print(f"  bf16 subset: {json.dumps(results['bf16_subset'])}", flush=True)

    # float16 storage of embeddings
    fp16 = {k: v.astype(np.float16) for k, v in ref.items()}
    results["fp16_embeddings"] = compare(ref, {k: v.astype(np.float32) for k, v in fp16.items()}, data, model,
                                         region_emb)
    all32 = np.concatenate([ref[k] for k in sorted(ref)])
    all16 = np.concatenate([fp16[k] for k in sorted(fp16)])
    overlaps = {}
    for q in QUERIES:
        t = model.encode_texts([q])[0]
        s32 = all32 @ t
        s16 = all16.astype(np.float32) @ t
        top32 = set(np.argsort(-s32, kind="stable")[:100])
        top16 = set(np.argsort(-s16, kind="stable")[:100])
        overlaps[q] = len(top32 & top16) / 100
    results["fp16_embeddings"]["top100_overlap"] = overlaps
    results["fp16_embeddings"]["max_abs_rounding"] = float(np.abs(all16.astype(np.float32) - all32).max())
    print(f"  fp16 embeddings: {json.dumps(results['fp16_embeddings'])}", flush=True)

    print()
    print(f"Label agreement with fp32 on {n_tiles} tiles of {len(plates)} test plates (stride {stride:g} um)")
    print(f"{'path':<15}{'per-tile argmax':>17}{'voted labels':>14}{'worst plate':>18}{'min cosine':>12}")
    for name, r in results["paths"].items():
        if "tile_agreement" not in r:
            continue
        print(f"{name:<15}{100 * r['tile_agreement']:>16.3f}%{100 * r['voted_agreement']:>13.3f}%"
              f"{r['worst_plate']:>8} {100 * r['worst_plate_agreement']:>7.2f}%{r['min_cosine']:>12.5f}")
    r = results["fp16_embeddings"]
    print(f"{'fp16 storage':<15}{100 * r['tile_agreement']:>16.3f}%{100 * r['voted_agreement']:>13.3f}%"
          f"{r['worst_plate']:>8} {100 * r['worst_plate_agreement']:>7.2f}%{r['min_cosine']:>12.5f}")
    print("fp16 top-100 retrieval overlap: " + ", ".join(f"{q!r} {v:.2f}" for q, v in overlaps.items()))
    if "bf16_subset" in results:
        b = results["bf16_subset"]
        print(f"real bf16 (emulated, {b['tiles_per_s_emulated']:.1f} tiles/s) on {b['tiles']} tiles: labels = bf16sim "
              f"{100 * b['real_vs_sim_label_agreement']:.1f}%, = fp32 {100 * b['real_vs_fp32_label_agreement']:.1f}% "
              f"(bf16sim = fp32 {100 * b['sim_vs_fp32_label_agreement']:.1f}%); cosine real/sim >= "
              f"{b['real_vs_sim_min_cosine']:.5f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
