"""Teach it live (issue 13): a simulated anatomist splits a known division into new sub-regions.

    HF_HUB_OFFLINE=1 nohup python benchmarks/teach.py --split val > results/teach_bench/val.log 2>&1 &

Stages (each result is cached under ``--work``, so a rerun resumes and skips what is done):

1. ``features/plate_<n>.npz``: for each plate used, the tissue cells on the shipped model's grid
   (100 um) with the cached 256-d joint embedding, the image tower's pooled 1280-d features and a
   high-resolution view (640 um at 96 px through the ImageNet EfficientNet-Lite0), float16.
2. ``truth/<task>/plate_<n>.npz``: per grid cell, the histogram of its pixels' truth codes (coarse
   division, or the sub-region of the replaced division from ``allen.fine_labels``): any labelling of
   the cells gives the exact pixelwise confusion of the grid painted on the plate.
3. ``runs/<split>/<task>/<arm>.json``: one experiment (K whole corrected plates or sparse painted cells,
   seed, feature set, learner) scored on the split's plates.

Tasks (``--tasks``): DIVISION:SUB,SUB,... with coarse acronyms and CCF acronyms; default
HPF:CA,DG,RHP and STR:CP,ACB,OT,LSX,sAMY. Split: ``val`` (plates % 10 == 3; every choice) or ``test``
(multiples of 5; the final table only). Teaching plates come from a fixed pool of 12 training plates
(qc ok, >= 2000 px of the division) per task.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_cytoclip.teach import allen  # noqa: E402

DIVISIONS = {"Isocortex": 1, "OLF": 2, "HPF": 3, "CTXsp": 4, "STR": 5, "PAL": 6, "TH": 7, "HY": 8, "MB": 9,
             "P": 10, "MY": 11, "CB": 12, "fiber tracts": 13, "VS": 14}
IGNORE = 15          # truth code: unlabelled / root-only / division pixels under none of the sub-regions
NEW_BASE = 16        # truth code of the first sub-region
DEFAULT_TASKS = ["HPF:CA,DG,RHP", "STR:CP,ACB,OT,LSX,sAMY"]
POOL_SIZE = 10
MIN_DIVISION_PX = 2000


def parse_task(text: str) -> tuple[str, list[str]]:
    div, _, subs = text.partition(":")
    if div not in DIVISIONS or not subs:
        raise SystemExit(f"bad task {text!r}: DIVISION:SUB,SUB with DIVISION one of {sorted(DIVISIONS)}")
    return div, subs.split(",")


def task_name(div: str, subs: list[str]) -> str:
    return f"{div}-{'_'.join(subs)}".replace(" ", "")


# ---------------------------------------------------------------------------------------------
# plates

def plate_by_number() -> dict:
    return {p.number: p for p in allen.plates()}


def training_pool(div: str) -> list[int]:
    """12 training plates (qc ok) containing the division, evenly spaced along the brain."""
    code = DIVISIONS[div]
    cand = [p.number for p in allen.plates(split="train") if p.qc == "ok" and (p.label_map() == code).sum() >= MIN_DIVISION_PX]
    if len(cand) <= POOL_SIZE:
        return cand
    idx = np.unique(np.rint(np.linspace(0, len(cand) - 1, POOL_SIZE)).astype(int))
    return [cand[i] for i in idx]


TEACH_EVERY = [2]
EVAL_OVERRIDE: list[int] = []   # --eval-plates: a subset of the split's plates (development runs)


def eval_plates(split: str) -> list[int]:
    numbers = [p.number for p in allen.plates(split=split)]
    if EVAL_OVERRIDE:
        bad = sorted(set(EVAL_OVERRIDE) - set(numbers))
        if bad:
            raise SystemExit(f"--eval-plates {bad} are not {split} plates")
        return sorted(EVAL_OVERRIDE)
    return numbers


def runs_tag(split: str) -> str:
    return split + ("-" + "_".join(map(str, sorted(EVAL_OVERRIDE))) if EVAL_OVERRIDE else "")


# ---------------------------------------------------------------------------------------------
# stage 1: features

def extract(work: Path, numbers: list[int], log, hires: bool = False, every: dict | None = None) -> None:
    """Joint + pooled features per plate (``features/``); with ``hires`` the second view (``hires/``)."""
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.teach.features import ImageNetView, section_features

    folder = work / ("hires" if hires else "features")
    folder.mkdir(parents=True, exist_ok=True)
    todo = [n for n in numbers if not (folder / f"plate_{n:03d}.npz").exists()]
    if not todo:
        return
    model = load_model(device="cpu")
    view = ImageNetView() if hires else None
    plates = plate_by_number()
    for n in todo:
        t0 = time.perf_counter()
        if hires:
            from napari_cytoclip.inference.predict import plan_grid
            from napari_cytoclip.inference.windows import WindowReader

            section = plates[n].section()
            grid, cells, mask = plan_grid(section, model)
            step = (every or {}).get(n, 1)
            cells = cells[(cells[:, 0] % step == 0) & (cells[:, 1] % step == 0)]
            reader = WindowReader(section, view.spec, mask.polarity)
            centers = grid.centers(cells)
            t1 = time.perf_counter()
            feats, t_net = [], 0.0
            for i in range(0, len(cells), 128):
                w = reader.read(centers[i:i + 128])
                t2 = time.perf_counter()
                feats.append(view.features(w).astype(np.float16))
                t_net += time.perf_counter() - t2
            arrays = {"cells": cells, "hires": np.concatenate(feats)}
            secs = {"hires_s": t_net, "plan_s": t1 - t0, "total_s": time.perf_counter() - t0, "n_cells": int(len(cells))}
        else:
            f = section_features(plates[n].section(), model, every=(every or {}).get(n, 1))
            arrays = {"cells": f.cells, "joint": f.joint, "pooled": f.pooled, "grid": json.dumps(f.grid.to_dict())}
            secs = dict(f.seconds, total_s=time.perf_counter() - t0, n_cells=int(len(f.cells)))
        tmp = folder / f".plate_{n:03d}.tmp.npz"
        np.savez(tmp, seconds=json.dumps(secs), **arrays)
        os.replace(tmp, folder / f"plate_{n:03d}.npz")
        log(f"{folder.name} plate {n}: {secs['n_cells']} cells, " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items() if k.endswith("_s")))


def load_features(work: Path, n: int) -> dict:
    from napari_cytoclip.inference.grid import TileGrid

    with np.load(work / "features" / f"plate_{n:03d}.npz") as z:
        out = {k: z[k] for k in ("cells", "joint", "pooled")}
        out["hires"] = z["hires"] if "hires" in z.files else None
        out["grid"] = TileGrid.from_dict(json.loads(str(z["grid"])))
        out["seconds"] = json.loads(str(z["seconds"]))
    hp = work / "hires" / f"plate_{n:03d}.npz"
    if out["hires"] is None and hp.exists():
        with np.load(hp) as z:
            if np.array_equal(z["cells"], out["cells"]):
                out["hires"] = z["hires"]
            else:  # a teaching plate whose high-res view was computed on fewer cells: keep the cells both have
                cols = int(out["cells"][:, 1].max()) + 1
                key = lambda c: c[:, 0].astype(np.int64) * cols + c[:, 1]  # noqa: E731
                pos = {int(k): i for i, k in enumerate(key(z["cells"]))}
                rows = np.array([i for i, k in enumerate(key(out["cells"])) if int(k) in pos])
                for name in ("cells", "joint", "pooled"):
                    out[name] = out[name][rows]
                out["hires"] = z["hires"][[pos[int(k)] for k in key(out["cells"])]]
            out["seconds"]["hires_s"] = json.loads(str(z["seconds"]))["hires_s"]
    return out


# ---------------------------------------------------------------------------------------------
# stage 2: truth per grid cell

def truth_codes(n: int, div: str, subs: list[str], tree) -> np.ndarray:
    """Per pixel: the coarse division (1-14), IGNORE, 0 outside, or NEW_BASE + i for sub-region i."""
    plate = plate_by_number()[n]
    coarse = plate.label_map().astype(np.int32)
    codes = np.where(coarse == 15, IGNORE, coarse)
    inside = coarse == DIVISIONS[div]
    if inside.any():
        sub = allen.subregion_labels(allen.fine_labels(n, shape=coarse.shape), subs, tree)
        codes[inside] = np.where(sub[inside] > 0, NEW_BASE - 1 + sub[inside], IGNORE)
    return codes


def cell_histograms(codes: np.ndarray, grid, n_codes: int) -> np.ndarray:
    """``(rows * cols, n_codes)`` pixel counts of each truth code in each grid cell (nearest cell)."""
    h, w = codes.shape
    rows, cols = grid.shape
    r = np.clip(np.rint((np.arange(h) - grid.origin[0]) / grid.step), 0, rows - 1).astype(np.int64)
    c = np.clip(np.rint((np.arange(w) - grid.origin[1]) / grid.step), 0, cols - 1).astype(np.int64)
    cell = (r[:, None] * cols + c[None, :]).ravel()
    return np.bincount(cell * n_codes + codes.ravel(), minlength=rows * cols * n_codes).reshape(rows * cols, n_codes)


def load_truth(work: Path, task: str, n: int, div: str, subs: list[str], grid, tree) -> np.ndarray:
    path = work / "truth" / task / f"plate_{n:03d}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        hist = cell_histograms(truth_codes(n, div, subs, tree), grid, NEW_BASE + len(subs))
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, hist=hist.astype(np.int32))
        os.replace(tmp, path)
    with np.load(path) as z:
        return z["hist"]


# ---------------------------------------------------------------------------------------------
# stage 3: experiments

FEATURE_SETS = {"joint": ("joint",), "pooled": ("pooled",), "hires": ("hires",), "pooled+hires": ("pooled", "hires"),
                "joint+pooled": ("joint", "pooled"),
                "joint+pooled+hires": ("joint", "pooled", "hires")}


def text_embeddings(work: Path) -> tuple[np.ndarray, float]:
    """The shipped model's 14 region text embeddings (rows = region ids 1..14) and logit scale."""
    path = work / "text.npz"
    if not path.exists():
        from napari_cytoclip.models.model import load_model

        m = load_model(device="cpu")
        assert [r.id for r in m.regions] == list(range(1, 15))
        np.savez(path, text=m.region_embeddings(), logit_scale=np.array(m.logit_scale))
    with np.load(path) as z:
        return z["text"], float(z["logit_scale"])


class PlateData:
    """Features, per-cell truth and pixel histograms of one plate for one task."""

    def __init__(self, work: Path, task: str, n: int, div: str, subs: list[str], tree, every: int = 1):
        f = load_features(work, n)
        keep = (f["cells"][:, 0] % every == 0) & (f["cells"][:, 1] % every == 0)  # same density on every teaching plate
        self.number, self.cells, self.grid = n, f["cells"][keep], f["grid"]
        self.feats = {k: (f[k][keep] if f[k] is not None else None) for k in ("joint", "pooled", "hires")}
        self.seconds = f["seconds"]
        self.hist = load_truth(work, task, n, div, subs, self.grid, tree)
        cols = self.grid.shape[1]
        self.flat = self.cells[:, 0].astype(np.int64) * cols + self.cells[:, 1]
        h = self.hist[self.flat]
        self.label = h.argmax(1)                                  # majority truth code per encoded cell
        self.purity = h.max(1) / np.maximum(h.sum(1), 1)

    def x(self, names, basis=None) -> np.ndarray:
        x = np.concatenate([self.feats[k].astype(np.float32) for k in names], 1)
        if basis is not None:  # a fixed projection (PCA of the training pool), stored as float16 like a cache
            x = ((x - basis[0]) @ basis[1]).astype(np.float16).astype(np.float32)
        return x

    def confusion(self, pred_codes: np.ndarray, n_codes: int) -> np.ndarray:
        """Pixel confusion (truth rows, prediction columns) of the encoded cells' codes painted on the plate."""
        full = np.zeros(len(self.hist), np.int64)
        full[self.flat] = pred_codes
        cm = np.zeros((n_codes, n_codes), np.int64)
        for p in np.unique(full):
            cm[:, p] += self.hist[full == p].sum(0)
        return cm


def f1s(cm: np.ndarray, codes: list[int]) -> dict:
    out = {}
    for k in codes:
        tp, pred, sup = cm[k, k], cm[:, k].sum(), cm[k].sum()
        if sup == 0:
            continue
        p, r = (tp / pred if pred else 0.0), tp / sup
        out[k] = float(2 * p * r / (p + r)) if p + r else 0.0
    return out


def scores(cms: np.ndarray, div: str, subs: list[str]) -> dict:
    """Sub-region F1s and macro; the 14 divisions' macro-F1 with the sub-regions merged back."""
    n_codes = cms.shape[0]
    new = list(range(NEW_BASE, NEW_BASE + len(subs)))
    sub = f1s(cms, new)
    merge = np.arange(n_codes)
    merge[new] = DIVISIONS[div]
    cm14 = np.zeros((n_codes, n_codes), np.int64)
    np.add.at(cm14, (merge[:, None].repeat(n_codes, 1), merge[None, :].repeat(n_codes, 0)), cms)
    known = f1s(cm14, list(range(1, 15)))
    return {"sub_macro_f1": float(np.mean(list(sub.values()))) if sub else 0.0,
            "sub_f1": {s: sub.get(NEW_BASE + i) for i, s in enumerate(subs)},
            "known_macro_f1": float(np.mean(list(known.values()))), "known_f1": {int(k): v for k, v in known.items()}}


class Task:
    def __init__(self, work: Path, split: str, div: str, subs: list[str], pool: list[int], log):
        self.work, self.split, self.div, self.subs, self.pool, self.log = work, split, div, subs, pool, log
        self.name = task_name(div, subs)
        tree = allen.structure_tree()
        ev = set(eval_plates(split))
        self.plates = {n: PlateData(work, self.name, n, div, subs, tree, 1 if n in ev else TEACH_EVERY[0])
                       for n in sorted(ev | set(pool))}
        self.text, self.logit_scale = text_embeddings(work)
        d = DIVISIONS[div]
        self.classes = [k for k in range(1, 15) if k != d] + list(range(NEW_BASE, NEW_BASE + len(subs)))
        self.sources = [k - 1 for k in range(1, 15) if k != d] + [d - 1] * len(subs)
        self.children = [1] * 13 + [len(subs)] * len(subs)
        self.n_codes = NEW_BASE + len(subs)
        self._pca = {}
        from napari_cytoclip.models.learner import prior_logits

        for p in self.plates.values():
            p.prior = prior_logits(p.feats["joint"], self.text, self.logit_scale, self.sources, self.children)
            p.zeroshot = np.asarray(range(1, 15))[(p.feats["joint"].astype(np.float32) @ self.text.T).argmax(1)]

    def pca(self, names, dims: int):
        """Mean and the top ``dims`` principal axes of the features over the training pool plates."""
        key = ("+".join(names), dims)
        if key not in self._pca:
            x = np.concatenate([self.plates[n].x(names) for n in self.pool])
            mean = x.mean(0)
            _, _, vt = np.linalg.svd(x[::4] - mean, full_matrices=False)
            self._pca[key] = (mean, vt[:dims].T.copy())
        return self._pca[key]

    def evaluate(self, predict, radii=(0, 1)) -> dict:
        """``predict(plate) -> probs (n, C)``; scored on the split's plates for each smoothing radius."""
        from napari_cytoclip.models.learner import smooth

        cms = {r: np.zeros((self.n_codes, self.n_codes), np.int64) for r in radii}
        t = 0.0
        for n in eval_plates(self.split):
            p = self.plates[n]
            t0 = time.perf_counter()
            probs = predict(p)
            t += time.perf_counter() - t0
            for r in radii:
                pr = smooth(p.cells, probs, p.grid.shape, r) if r else probs
                cms[r] += p.confusion(np.asarray(self.classes)[pr.argmax(1)], self.n_codes)
        out = {f"r{r}": scores(cms[r], self.div, self.subs) for r in radii}
        out["predict_s"] = t
        return out

    def evaluate_codes(self, codes_of) -> dict:
        cm = np.zeros((self.n_codes, self.n_codes), np.int64)
        for n in eval_plates(self.split):
            p = self.plates[n]
            cm += p.confusion(codes_of(p), self.n_codes)
        return {"r0": scores(cm, self.div, self.subs)}

    # -- the simulated anatomist -------------------------------------------------------------------
    def teaching_set(self, kind: str, k: int, seed: int) -> tuple[list[int], dict]:
        """Plates and, per plate, the taught cell indices with their codes."""
        rng = np.random.default_rng([seed, k, 0 if kind == "plates" else 1])
        # like an anatomist, pick sections that show every sub-region (enough pure cells of each for the sparse
        # case); of 200 random draws the first that covers the most sub-regions
        need = 1 if kind == "plates" else k
        best, chosen = -1, []
        for _ in range(200):
            draw = sorted(rng.choice(self.pool, k if kind == "plates" else 3, replace=False).tolist())
            covered = sum(sum(int(((self.plates[n].label == code) & (self.plates[n].purity >= 0.6)).sum()) for n in draw) >= need
                          for code in range(NEW_BASE, self.n_codes))
            if covered > best:
                best, chosen = covered, draw
            if covered == self.n_codes - NEW_BASE:
                break
        if kind == "plates":
            taught = {}
            for n in chosen:
                p = self.plates[n]
                ok = np.flatnonzero((p.label > 0) & (p.label != IGNORE))
                taught[n] = (ok, p.label[ok])
            return chosen, taught
        taught = {n: ([], []) for n in chosen}
        for code in range(NEW_BASE, self.n_codes):
            cand = [(n, i) for n in chosen for i in np.flatnonzero((self.plates[n].label == code) & (self.plates[n].purity >= 0.6))]
            for j in rng.choice(len(cand), min(k, len(cand)), replace=False):
                n, i = cand[j]
                taught[n][0].append(i)
                taught[n][1].append(code)
        return chosen, {n: (np.asarray(a, np.int64), np.asarray(b, np.int64)) for n, (a, b) in taught.items()}

    def run(self, arm: str, kind: str, k: int, seed: int, feats: str, **hyper) -> dict:
        key = f"{kind}{k}_s{seed}_{arm}_{feats}" + "".join(f"_{a}{v}" for a, v in sorted(hyper.items()))
        path = self.work / "runs" / runs_tag(self.split) / self.name / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        from napari_cytoclip.models.learner import Learner

        chosen, taught = self.teaching_set(kind, k, seed)
        names, _, dims = feats.partition("@pca")
        names = FEATURE_SETS[names]
        basis = self.pca(names, int(dims)) if dims else None
        X = lambda p: p.x(names, basis)  # noqa: E731
        res = {"arm": arm, "kind": kind, "k": k, "seed": seed, "features": feats, "hyper": hyper, "plates": chosen,
               "taught_cells": int(sum(len(a) for a, _ in taught.values()))}
        if arm == "ceiling":
            res.update(self.evaluate_codes(lambda p: np.where(p.label == IGNORE, 0, p.label)))
        elif arm == "zeroshot":
            res.update(self.evaluate_codes(lambda p: p.zeroshot))
        else:
            x = np.concatenate([X(self.plates[n])[a] for n, (a, _) in taught.items()])
            y = np.concatenate([b for _, b in taught.values()])
            z = np.concatenate([self.plates[n].prior[a] for n, (a, _) in taught.items()])
            if arm == "probe":
                learner = Learner(prior_scale=0.0, learn_alpha=False, balance=hyper.get("balance", 1.0),
                                  l2=hyper.get("l2", 1e-3))
            else:
                learner = Learner(**hyper)
            learner.set_stats(np.concatenate([X(self.plates[n]) for n in chosen]))
            t0 = time.perf_counter()
            learner.fit(x, y, z, self.classes, seed=seed)
            res["fit_s"] = time.perf_counter() - t0
            res["alpha"] = learner.alpha
            res.update(self.evaluate(lambda p: learner.predict_proba(X(p), p.prior)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, path)
        self.log(f"{self.name} {key}: sub {res['r0']['sub_macro_f1']:.3f}"
                 + (f" (r1 {res['r1']['sub_macro_f1']:.3f})" if "r1" in res else "")
                 + f" known {res['r0']['known_macro_f1']:.3f}" + (f" fit {res['fit_s']:.1f}s" if "fit_s" in res else ""))
        return res


def run_all(work: Path, args, tasks, pools, log) -> None:
    plan = json.loads(args.plan) if args.plan else default_plan()
    results = {}
    for div, subs in tasks:
        task = Task(work, args.split, div, subs, pools[task_name(div, subs)], log)
        rows = results[task.name] = []
        rows.append(task.run("zeroshot", "plates", 0, 0, "joint"))
        for item in plan:
            for seed in range(3):
                if item["arm"] == "zeroshot":
                    continue
                rows.append(task.run(item["arm"], item["kind"], item["k"], seed, item["feats"], **item.get("hyper", {})))
    table, bullets = report(results, args.split, tasks), summary(results, args.split)
    print(table)
    print(bullets)
    if args.write_docs:
        from napari_cytoclip.io.safe_files import write_between_markers

        write_between_markers(ROOT / "benchmarks" / "README.md", f"teach-{args.split}", table)
        if args.split == "test":
            write_between_markers(ROOT / "README.md", "teach-summary", bullets)


def default_plan() -> list[dict]:
    """The final table: ceiling, linear probe and the learner at K = 1, 3, 10 plates and 5 / 20 painted cells."""
    out = []
    for kind, k in (("plates", 1), ("plates", 3), ("plates", 10), ("sparse", 5), ("sparse", 20)):
        if kind == "plates":
            out.append({"arm": "ceiling", "kind": kind, "k": k, "feats": "joint"})
        out.append({"arm": "probe", "kind": kind, "k": k, "feats": FINAL_FEATURES})
        out.append({"arm": "learner", "kind": kind, "k": k, "feats": FINAL_FEATURES, "hyper": FINAL_HYPER})
    return out


FINAL_FEATURES = "pooled@pca256"   # chosen on val (issue 13 notes)
FINAL_HYPER: dict = {"l2": 0.1}
FINAL_RADIUS = "r1"


def report(results: dict, split: str, tasks) -> str:
    """Markdown: medians over seeds with the min-max spread, per task and teaching case."""
    def cell(values):
        v = [x for x in values if x is not None]
        if not v:
            return "-"
        return f"{np.median(v):.3f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{v[0]:.3f}"

    lines = [f"split **{split}** ({len(eval_plates(split))} plates: {', '.join(map(str, eval_plates(split)))}), "
             f"100 um grid, pixelwise F1 over whole plates, voting radius {FINAL_RADIUS[1:]} for the learner; "
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}", ""]
    for name, rows in results.items():
        zs = next(r for r in rows if r["arm"] == "zeroshot")
        lines += [f"### {name} (zero-shot known macro-F1 {zs['r0']['known_macro_f1']:.3f})", "",
                  "| teaching | arm | features | sub-regions macro-F1 | known 14 macro-F1 | change | fit s |",
                  "|---|---|---|---|---|---|---|"]
        groups = {}
        for r in rows:
            if r["arm"] == "zeroshot":
                continue
            key = (r["kind"], r["k"], r["arm"], r["features"], json.dumps(r["hyper"], sort_keys=True))
            groups.setdefault(key, []).append(r)
        for (kind, k, arm, feats, hyper), rs in groups.items():
            rad = FINAL_RADIUS if (arm == "learner" and FINAL_RADIUS in rs[0]) else "r0"
            sub = [r[rad]["sub_macro_f1"] for r in rs]
            known = [r[rad]["known_macro_f1"] for r in rs]
            delta = [x - zs["r0"]["known_macro_f1"] for x in known]
            what = f"{k} plates" if kind == "plates" else f"{k} cells/sub-region, 3 sections"
            fit = [r.get("fit_s") for r in rs]
            lines.append(f"| {what} | {arm}{'' if hyper == '{}' else ' ' + hyper} | {feats if arm != 'ceiling' else '-'} | "
                         f"{cell(sub)} | {cell(known)} | {cell(delta)} | {cell(fit)} |")
        lines.append("")
    return "\n".join(lines)


GOALS = {("plates", 3): 0.70, ("plates", 10): 0.80, ("sparse", 20): 0.60}


def summary(results: dict, split: str) -> str:
    """README bullets: the learner's median sub-region macro-F1 per teaching case, next to the probe,
    and the change of the 14 known divisions; each goal said met or not, failures included."""
    def med(rows, key):
        v = [r[key]["sub_macro_f1" if key != "known" else "known_macro_f1"] for r in rows] if key != "known" else \
            [r[FINAL_RADIUS if FINAL_RADIUS in r else "r0"]["known_macro_f1"] for r in rows]
        return float(np.median(v)), min(v), max(v)

    plates = eval_plates(split)
    lines = [f"- Data: Allen plates, split **{split}** ({len(plates)} plates: {', '.join(map(str, plates))}); teaching "
             f"plates from the training split; 100 um grid; medians over 3 seeds (min-max); "
             f"{platform.machine()}, {os.cpu_count()} CPU cores. Printed by `benchmarks/teach.py --split {split}`."]
    for name, rows in results.items():
        zs = next(r for r in rows if r["arm"] == "zeroshot")["r0"]["known_macro_f1"]
        parts, known = [], []
        for kind, k in (("plates", 1), ("plates", 3), ("plates", 10), ("sparse", 5), ("sparse", 20)):
            arm = [r for r in rows if r["arm"] == "learner" and r["kind"] == kind and r["k"] == k]
            probe = [r for r in rows if r["arm"] == "probe" and r["kind"] == kind and r["k"] == k]
            if not arm:
                continue
            rad = FINAL_RADIUS if FINAL_RADIUS in arm[0] else "r0"
            sub = [r[rad]["sub_macro_f1"] for r in arm]
            known += [r[rad]["known_macro_f1"] - zs for r in arm]
            what = f"K={k} plates" if kind == "plates" else f"{k} cells/sub-region on 3 sections"
            goal = GOALS.get((kind, k))
            verdict = "" if goal is None else (f", goal >= {goal:.2f} {'met' if np.median(sub) >= goal else 'NOT met'}")
            pv = f"; linear probe {np.median([r['r0']['sub_macro_f1'] for r in probe]):.2f}" if probe else ""
            parts.append(f"{what}: {np.median(sub):.3f} ({min(sub):.2f}-{max(sub):.2f}){pv}{verdict}")
        lines.append(f"- **{name}** (sub-regions macro-F1, learner): " + "; ".join(parts) + ".")
        if known:
            lines.append(f"  The 14 known divisions (zero-shot {zs:.3f}) change by {min(known):+.3f} to {max(known):+.3f}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "results" / "teach_bench"))
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    ap.add_argument("--stage", choices=("extract", "hires", "run", "all"), default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hires", action="store_true", help="with --stage all: also extract the high-resolution view")
    ap.add_argument("--teach-every", type=int, default=2,
                    help="teaching plates: only cells whose row and column are multiples of this (saves extraction time)")
    ap.add_argument("--eval-plates", type=int, nargs="*", default=[], help="score on these plates of the split only")
    ap.add_argument("--plan", default="", help="JSON list of {arm, kind, k, feats, hyper}; default: the feature comparison")
    ap.add_argument("--write-docs", action="store_true",
                    help="put the table into benchmarks/README.md and the summary into README.md (between markers)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    EVAL_OVERRIDE[:] = args.eval_plates
    TEACH_EVERY[0] = args.teach_every
    work.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(time.strftime("%H:%M:%S"), msg, flush=True)  # noqa: E731
    tasks = [parse_task(t) for t in args.tasks]
    pools = {task_name(d, s): training_pool(d) for d, s in tasks}
    numbers = sorted(set(eval_plates(args.split)) | {n for p in pools.values() for n in p})
    log(f"split {args.split}: {len(eval_plates(args.split))} evaluation plates; pools {pools}")
    # evaluation plates with the divisions first, then the teaching pools, then the rest
    pooled = {m for p in pools.values() for m in p}
    ev = set(eval_plates(args.split))
    divs = [DIVISIONS[d] for d, _ in tasks]
    has_div = {n for n in ev if any((plate_by_number()[n].label_map() == c).any() for c in divs)}
    numbers.sort(key=lambda n: (0 if n in has_div else 1 if n in pooled else 2, n))
    # teaching plates: every other row and column of the 100 um grid (a quarter of the cells) unless evaluated
    every = {n: args.teach_every for n in pooled - ev}
    if args.stage in ("extract", "all"):
        extract(work, numbers, log, every=every)
    if args.stage == "hires" or (args.stage == "all" and args.hires):
        extract(work, numbers, log, hires=True, every=every)
    if args.stage in ("run", "all"):
        run_all(work, args, tasks, pools, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
