"""Throughput of the shipped image tower on this CPU: float32 and the fast paths, measured in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_model.py [--batch-size 128] [--rounds 8] [--paths ...]

Pre-normalised float32 batches (no reading, no preprocessing: the encoder alone). The paths
(``fastpaths.py``) are timed in interleaved rounds, one batch each per round, so background load
hits all of them alike; the table gives the best round (the closest to an idle machine), the
median, and tiles per CPU-second of this process (less sensitive to other processes, though
OpenMP spin-waiting counts as CPU time). Ratios are against ``fp32`` (eager NCHW) and against
``channels_last`` (what ``CytoClip`` runs on CPU today). ``bf16`` is emulated and very slow on
CPUs without AVX-512-BF16/AMX: it gets one small batch per round there.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fastpaths  # noqa: E402


def main(argv=None) -> int:
    import torch

    from napari_cytoclip.models.model import cpu_supports_bf16, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--paths", nargs="+", default=["fp32", "channels_last", "jit", "compile", "int8", "bf16"])
    args = ap.parse_args(argv)

    print(f"machine: {fastpaths.machine()}")
    model = load_model(None, device="cpu", precision="fp32")
    size = model.input.size
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
    x = fastpaths.normalised_batch(model, windows)
    native_bf16 = cpu_supports_bf16()
    fns, build_s, first_s = {}, {}, {}
    for name in args.paths:
        t = time.perf_counter()
        f = fastpaths.build(name, model, args.batch_size)
        xb = x if name != "bf16" or native_bf16 else x[:8]
        first_s[name] = fastpaths.warm(f, xb)
        build_s[name] = time.perf_counter() - t
        fns[name] = (f, xb)
        print(f"  built {name}: {build_s[name]:.1f} s (first batch {first_s[name]:.1f} s)", flush=True)
    wall = {n: [] for n in fns}
    cpu = {n: [] for n in fns}
    for r in range(args.rounds):
        for name, (f, xb) in fns.items():
            if name == "bf16" and not native_bf16 and r >= 2:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            f(xb)
            wall[name].append(len(xb) / (time.perf_counter() - t0))
            cpu[name].append(len(xb) / max(time.process_time() - c0, 1e-9))
    best = {n: max(v) for n, v in wall.items()}
    print()
    print(f"Image tower ({model.bundle.name}, {size} px, batch {args.batch_size}), tiles/s, {args.rounds} "
          f"interleaved rounds; load average now {os.getloadavg()[0]:.1f}")
    print(f"{'path':<15}{'best':>9}{'median':>9}{'per CPU-s':>11}{'vs fp32':>9}{'vs ch_last':>11}{'build s':>9}")
    ref = best.get("fp32")
    cl = best.get("channels_last")
    for name in fns:
        b = best[name]
        print(f"{name:<15}{b:>9.1f}{statistics.median(wall[name]):>9.1f}{statistics.median(cpu[name]):>11.1f}"
              f"{(b / ref if ref else float('nan')):>8.2f}x{(b / cl if cl else float('nan')):>10.2f}x"
              f"{build_s[name]:>9.1f}")
    if "bf16" in fns and not native_bf16:
        print("bf16: no native bfloat16 on this CPU (emulated; 8-tile batches). load_model(precision='auto') keeps fp32 here.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
