"""A small head refitted in about a second from taught cells, on top of the text classifier.

The model: ``logits = alpha * prior_scale * prior + W @ standardise(x) + b``. ``prior`` are the
zero-shot logits of the joint embedding against the region texts (``logit_scale * cos``), mapped to
the learner's classes by :func:`prior_logits` (a new region that replaces or refines a known one
starts from its parent's logit minus ``log(number of children)``, so the parent's probability is
split evenly; a region with neither text nor parent starts at the row's lowest logit). ``W`` and
``b`` are a multinomial logistic regression, L2-regularised towards zero, that is towards the text
classifier: regions nobody taught keep their zero-shot behaviour. ``alpha`` (one scalar, starts at
1, unpenalised) lets taught examples weaken the prior everywhere when it contradicts them. Taught
cells count the same whether their region is known or new (class-balanced weights).

Numpy/torch only, no Qt. :meth:`Learner.to_state` gives plain arrays (safetensors-friendly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

STATE_VERSION = 1


def prior_logits(joint: np.ndarray, text_embeddings: np.ndarray, logit_scale: float,
                 sources: Sequence[int | Sequence[int] | None], children: Sequence[int] | None = None) -> np.ndarray:
    """Zero-shot logits ``(n, C)`` for the learner's classes from L2-normalised joint embeddings.

    ``text_embeddings`` ``(T, D)``: one row per known text. ``sources[c]``: the text row of class ``c``,
    or a parent's row (with ``children[c]`` > 1: how many classes split that parent), or ``None`` for a
    class with neither (it starts at the row's lowest logit).
    """
    import torch

    t = torch.from_numpy(np.asarray(text_embeddings, np.float32))
    n = joint.shape[0]  # numpy, or a lazy (zarr) array read 65536 rows at a time
    out = np.empty((n, len(sources)), np.float32)
    children = list(children) if children is not None else [1] * len(sources)
    for i in range(0, n, 65536):
        e = torch.from_numpy(np.asarray(joint[i:i + 65536], np.float32))
        z = float(logit_scale) * (e @ t.T)
        low = z.min(1).values
        cols = []
        for src, k in zip(sources, children):
            if src is None:
                cols.append(low)
            else:
                cols.append(z[:, int(src)] - math.log(max(int(k), 1)))
        out[i:i + len(e)] = torch.stack(cols, 1).numpy()
    return out


@dataclass
class Learner:
    """Logistic regression on standardised features around the text prior (see the module docstring)."""

    l2: float = 0.1              # L2 on W and b (loss is the weighted mean over taught cells); chosen on val
    prior_scale: float = 1.0     # temperature of the text prior
    balance: float = 1.0         # class weight = count ** -balance (0: every cell the same)
    max_iter: int = 60
    max_per_class: int = 4000    # taught cells used per class (random, fixed seed): bounds the fit time
    learn_alpha: bool = True
    std_floor: float = 1.0       # standardisation divides by max(std, std_floor * median std)
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    W: np.ndarray | None = None
    b: np.ndarray | None = None
    alpha: float = 1.0
    taught_counts: np.ndarray | None = None

    # -- standardisation ------------------------------------------------------------------------
    def set_stats(self, features: np.ndarray, rows: int = 20000, seed: int = 0) -> "Learner":
        """Mean and std of the features (of all cells of the sections taught, say) for standardising."""
        x = np.asarray(features)
        if len(x) > rows:
            x = x[np.sort(np.random.default_rng(seed).choice(len(x), rows, replace=False))]
        x = x.astype(np.float32)
        self.mean = x.mean(0)
        std = x.std(0)
        # floor at a share of the median std: a feature nearly constant on the taught sections must not be
        # amplified, since it varies on others (pooled CNN features have such dims)
        self.std = np.maximum(std, self.std_floor * float(np.median(std)) + 1e-6).astype(np.float32)
        return self

    def _x(self, features, torch):
        x = torch.from_numpy(np.asarray(features, np.float32))
        return (x - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)

    # -- fitting ------------------------------------------------------------------------------------
    def fit(self, features: np.ndarray, labels: np.ndarray, prior: np.ndarray, classes: Sequence[int],
            sample_weight: np.ndarray | None = None, seed: int = 0) -> "Learner":
        """Fit on taught cells: ``features`` ``(n, d)``, ``labels`` ``(n,)`` region ids among ``classes``,
        ``prior`` ``(n, C)`` from :func:`prior_logits` with columns in ``classes`` order."""
        import torch

        classes = np.asarray(classes, np.int64)
        col = {int(c): i for i, c in enumerate(classes)}
        labels = np.asarray(labels)
        keep = np.isin(labels, classes)
        idx = np.flatnonzero(keep)
        y_all = np.array([col[int(v)] for v in labels[idx]], np.int64)
        rng = np.random.default_rng(seed)
        picked = []
        counts = np.bincount(y_all, minlength=len(classes))
        for k in np.flatnonzero(counts):
            rows = idx[y_all == k]
            if len(rows) > self.max_per_class:
                rows = np.sort(rng.choice(rows, self.max_per_class, replace=False))
            picked.append(rows)
        rows = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
        if self.mean is None:
            self.set_stats(features)
        self.classes, self.taught_counts = classes, counts.astype(np.int64)
        d, c = len(self.mean), len(classes)
        self.W, self.b, self.alpha = np.zeros((c, d), np.float32), np.zeros(c, np.float32), 1.0
        if len(rows) == 0:
            return self
        x = self._x(np.asarray(features)[rows], torch)
        z0 = torch.from_numpy(np.asarray(prior, np.float32)[rows]) * self.prior_scale
        y = torch.from_numpy(np.array([col[int(v)] for v in labels[rows]], np.int64))
        n_k = torch.bincount(y, minlength=c).float()
        cw = torch.where(n_k > 0, n_k.clamp(min=1) ** -self.balance, torch.zeros(()))
        w = cw[y]
        if sample_weight is not None:
            w = w * torch.from_numpy(np.asarray(sample_weight, np.float32)[rows])
        w = w / w.sum()
        W = torch.zeros((c, d), requires_grad=True)
        b = torch.zeros(c, requires_grad=True)
        taught = (n_k > 0).float()  # untaught classes keep W = b = 0: only the prior speaks for them
        a = torch.ones((), requires_grad=self.learn_alpha)
        params = [W, b] + ([a] if self.learn_alpha else [])
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=self.max_iter, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            Wm, bm = W * taught[:, None], b * taught
            logits = a * z0 + x @ Wm.T + bm
            loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * w).sum() \
                + 0.5 * self.l2 * ((Wm * Wm).sum() + (bm * bm).sum())
            loss.backward()
            return loss

        opt.step(closure)
        self.W = (W * taught[:, None]).detach().numpy().copy()
        self.b = (b * taught).detach().numpy().copy()
        self.alpha = float(a.detach())
        return self

    # -- prediction ---------------------------------------------------------------------------------
    def logits(self, features: np.ndarray, prior: np.ndarray, rows: int = 32768) -> np.ndarray:
        """``(n, C)`` float32 logits, block by block (features may be float16 or a zarr array)."""
        import torch

        n = len(prior)
        out = np.empty((n, len(self.classes)), np.float32)
        scale = torch.from_numpy(1.0 / self.std)
        W = torch.from_numpy(self.W) * scale                     # fold the standardisation into W, b
        b = torch.from_numpy(self.b) - W @ torch.from_numpy(self.mean)
        with torch.inference_mode():
            for i in range(0, n, rows):
                block = np.asarray(features[i:i + rows])
                x = torch.from_numpy(block if block.dtype in (np.float16, np.float32) else block.astype(np.float32)).float()
                z0 = torch.from_numpy(np.asarray(prior[i:i + rows], np.float32))
                out[i:i + len(x)] = torch.addmm(b, x, W.T).add_(z0, alpha=self.alpha * self.prior_scale).numpy()
        return out

    def predict_proba(self, features: np.ndarray, prior: np.ndarray) -> np.ndarray:
        z = self.logits(features, prior)
        z -= z.max(1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(1, keepdims=True)
        return z

    # -- state ----------------------------------------------------------------------------------------
    def to_state(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickle), e.g. for ``safetensors.numpy.save_file``."""
        return {"version": np.array([STATE_VERSION], np.int64), "classes": np.asarray(self.classes, np.int64),
                "W": np.asarray(self.W, np.float32), "b": np.asarray(self.b, np.float32),
                "mean": np.asarray(self.mean, np.float32), "std": np.asarray(self.std, np.float32),
                "alpha": np.array([self.alpha], np.float32),
                "hyper": np.array([self.l2, self.prior_scale, self.balance, self.max_iter, self.max_per_class,
                                   float(self.learn_alpha), self.std_floor], np.float64),
                "taught_counts": np.asarray(self.taught_counts if self.taught_counts is not None
                                            else np.zeros(len(self.classes)), np.int64)}

    @classmethod
    def from_state(cls, state: dict) -> "Learner":
        v = int(np.asarray(state["version"]).ravel()[0])
        if v > STATE_VERSION:
            raise ValueError(f"learner state version {v} is newer than this napari-cytoclip reads")
        h = np.asarray(state["hyper"], np.float64)
        return cls(l2=float(h[0]), prior_scale=float(h[1]), balance=float(h[2]), max_iter=int(h[3]),
                   max_per_class=int(h[4]), learn_alpha=bool(h[5]), std_floor=float(h[6]) if len(h) > 6 else 1.0, classes=np.asarray(state["classes"], np.int64),
                   mean=np.asarray(state["mean"], np.float32), std=np.asarray(state["std"], np.float32),
                   W=np.asarray(state["W"], np.float32), b=np.asarray(state["b"], np.float32),
                   alpha=float(np.asarray(state["alpha"]).ravel()[0]),
                   taught_counts=np.asarray(state["taught_counts"], np.int64))


def smooth(cells: np.ndarray, probs: np.ndarray, grid_shape: tuple[int, int], radius: int = 1,
           self_weight: float = 1.0) -> np.ndarray:
    """Average each encoded cell's probabilities with its encoded neighbours within ``radius``
    (Chebyshev), its own weighted ``self_weight``; background cells take no part. ``(n, C)``."""
    if radius <= 0 or len(cells) == 0:
        return probs
    rows, cols = grid_shape
    k = probs.shape[1]
    pad = np.zeros((rows + 2 * radius, cols + 2 * radius, k), np.float32)
    cnt = np.zeros((rows + 2 * radius, cols + 2 * radius), np.float32)
    r, c = cells[:, 0] + radius, cells[:, 1] + radius
    pad[r, c] = probs
    cnt[r, c] = 1.0
    acc = np.zeros((rows, cols, k), np.float32)
    n = np.zeros((rows, cols), np.float32)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            acc += pad[dy:dy + rows, dx:dx + cols]
            n += cnt[dy:dy + rows, dx:dx + cols]
    own = probs * (self_weight - 1.0)
    return (acc[cells[:, 0], cells[:, 1]] + own) / (n[cells[:, 0], cells[:, 1]] + (self_weight - 1.0))[:, None]
