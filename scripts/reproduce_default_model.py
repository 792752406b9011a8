"""Rebuild the shipped model from ../shared/data: pairs from the Allen plates, then training.

    python scripts/reproduce_default_model.py --work /tmp/cytoclip-work --out /tmp/cytoclip-model

Uses only the training plates (validation: plate % 10 == 3; test plates, multiples of 5, never).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from napari_cytoclip import allen
from napari_cytoclip.architectures import create_initial_bundle
from napari_cytoclip.train import TrainConfig, train


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder holding allen_ara_coronal_nissl_plates (default ../shared/data)")
    ap.add_argument("--work", required=True, help="scratch folder for pairs and the initial model")
    ap.add_argument("--out", required=True, help="new bundle folder")
    ap.add_argument("--scales-um", default="320,640,1280")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--label-um", type=float, default=200.0)
    ap.add_argument("--stride-um", type=float, default=100.0)
    ap.add_argument("--pair-stride-um", type=float, default=120.0)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--text-features", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--time-budget-s", type=float, default=None, help="fit the epochs to this training time")
    args = ap.parse_args(argv)
    work = Path(args.work)
    scales = tuple(float(s) for s in args.scales_um.split(","))
    init_dir = work / "init"
    init = create_initial_bundle(init_dir, scales, args.size, args.label_um, args.stride_um) \
        if not init_dir.exists() else None
    from napari_cytoclip.bundle import load_bundle

    init = init or load_bundle(init_dir)
    t0 = time.time()
    folders = {}
    for split in ("train", "val"):
        folders[split] = allen.build_pair_folders(work / f"pairs_{split}", split, init.input, init.regions,
                                                  args.label_um, args.pair_stride_um, args.data, seed=args.seed,
                                                  workers=args.workers)
        print(f"{split}: {len(folders[split])} plates of pairs after {time.time() - t0:.0f} s", flush=True)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                      seed=args.seed, text_features=args.text_features,
                      time_budget_s=args.time_budget_s)
    bundle = train(folders["train"], args.out, init, cfg, val_folders=folders["val"],
                   progress=lambda d: print(json.dumps(d), flush=True) if "epoch_done" in d else None)
    print("wrote", bundle.path, "selected epoch", bundle.provenance.get("selected_epoch"))


if __name__ == "__main__":
    main()
