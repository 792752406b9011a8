"""A taught model: the fast learner on top of a bundle's text classifier, applied to cached features.

:class:`TaughtLearner` is :class:`~napari_cytoclip.models.learner.Learner` plus which classes have text,
how cells are voted and the fixed projection of wide features; :func:`read_learner` validates a bundle's
``learner.safetensors``. Relabelling a prediction with it is
:mod:`napari_cytoclip.inference.taught_decode`; fitting it from taught cells is :mod:`napari_cytoclip.teach.teaching`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from napari_cytoclip.errors import BundleError, CytoclipError
from napari_cytoclip.models.learner import Learner

if TYPE_CHECKING:  # bundle.py loads learners from here: no import back at run time
    from napari_cytoclip.models.bundle import Region

FEATURE_KIND = "pooled"             # the image tower's pooled trunk features
JOINT = "joint"                     # models without a trunk/head split (e.g. open_clip ViTs): the joint embedding
DEFAULT_RADIUS = 1                  # voting radius chosen on the validation plates (benchmarks/teach.py: r1)
DEFAULT_SELF_WEIGHT = 1.0
BASIS_DIMS = 256                    # pooled features are projected on their top principal axes (chosen on val:
                                    # as accurate as all 1280 dims for new regions, kinder to known ones, and
                                    # fast enough for a one-second map update)
PROJECT_ROWS = 32768                 # features projected this many rows at a time (a zarr cache is read in blocks)


def read_safetensors(path: Path, error: type[CytoclipError]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several kinds for a truncated or foreign file
        raise error(path, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None


@dataclass
class TaughtLearner(Learner):
    """:class:`Learner` plus which classes have a text prior, how cells are voted and, for wide features,
    the fixed projection (``basis_mean``, ``basis``: top principal axes) applied before it."""

    class_text: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    radius: int = DEFAULT_RADIUS
    self_weight: float = DEFAULT_SELF_WEIGHT
    feature_kind: str = FEATURE_KIND
    basis_mean: np.ndarray | None = None
    basis: np.ndarray | None = None

    def project(self, features, rows: int | None = None) -> np.ndarray:
        """``features`` ``(n, F)`` on the learner's axes ``(n, d)`` float32 (unchanged without a basis).

        ``features`` may be a lazy on-disk (zarr) array: it is read ``rows`` (:data:`PROJECT_ROWS`) rows at a time.
        """
        rows = rows or PROJECT_ROWS
        if self.basis is None:
            return np.asarray(features, np.float32)
        import torch

        basis, mean = torch.from_numpy(self.basis), torch.from_numpy(self.basis_mean)
        n = features.shape[0]
        out = np.empty((n, basis.shape[1]), np.float32)
        with torch.inference_mode():
            for i in range(0, n, rows):
                block = torch.from_numpy(np.asarray(features[i:i + rows], np.float32))
                out[i:i + len(block)] = ((block - mean) @ basis).numpy()
        return out

    def to_state(self) -> dict[str, np.ndarray]:
        state = super().to_state()
        state["class_text"] = np.asarray(self.class_text, np.uint8)
        state["decode"] = np.array([self.radius, self.self_weight], np.float64)
        if self.basis is not None:
            state["basis_mean"] = np.asarray(self.basis_mean, np.float32)
            state["basis"] = np.ascontiguousarray(self.basis, np.float32)
        return state

    @classmethod
    def from_state(cls, state: dict, feature_kind: str = FEATURE_KIND) -> "TaughtLearner":
        base = Learner.from_state(state)
        d = np.asarray(state["decode"], np.float64).ravel()
        basis = state.get("basis")
        return cls(**{k: getattr(base, k) for k in Learner.__dataclass_fields__},
                   class_text=np.asarray(state["class_text"]).astype(bool), radius=int(d[0]),
                   self_weight=float(d[1]), feature_kind=feature_kind,
                   basis_mean=None if basis is None else np.asarray(state["basis_mean"], np.float32),
                   basis=None if basis is None else np.asarray(basis, np.float32))

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save

        from napari_cytoclip.io.safe_files import atomic_write_bytes

        atomic_write_bytes(path, save(self.to_state(), metadata={"format": "napari-cytoclip-learner",
                                                                  "feature_kind": self.feature_kind}))


def feature_basis(features, dims: int = BASIS_DIMS, rows: int = 8000,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and top ``dims`` principal axes ``(F, dims)`` of ``features`` (None when they are not wider).

    The eigenvectors of the covariance, in torch (numpy's SVD of the same rows was 10x slower on a
    loaded 2-core machine); at most ``rows`` rows, drawn with a fixed seed.
    """
    import torch

    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] <= dims or len(x) < 2:
        return None
    if len(x) > rows:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), rows, replace=False))]
    t = torch.from_numpy(x.astype(np.float32))
    mean = t.mean(0)
    t -= mean
    _, vectors = torch.linalg.eigh(t.T @ t)           # ascending eigenvalues
    axes = vectors[:, -dims:].flip(1).contiguous()
    return mean.numpy(), axes.numpy()


def read_learner(path: str | Path, regions: Sequence[Region]) -> TaughtLearner:
    """Read and validate ``learner.safetensors`` against a bundle's ``regions`` (BundleError otherwise)."""
    from safetensors import safe_open

    path = Path(path)
    state = read_safetensors(path, BundleError)
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception:  # pragma: no cover - read above already
        meta = {}
    need = ("version", "classes", "W", "b", "mean", "std", "alpha", "hyper", "taught_counts", "class_text", "decode")
    missing = [k for k in need if k not in state]
    if missing:
        raise BundleError(path, f"not a learner file: missing {missing}")
    c, w = state["classes"], state["W"]
    d = state["mean"].shape[0] if state["mean"].ndim == 1 else -1
    if not (c.ndim == 1 and len(c) > 0 and w.shape == (len(c), d) and state["b"].shape == (len(c),)
            and state["std"].shape == (d,) and state["class_text"].shape == (len(c),)
            and state["taught_counts"].shape == (len(c),) and state["decode"].size == 2
            and state["alpha"].size == 1 and state["hyper"].ndim == 1 and state["hyper"].size >= 6):
        raise BundleError(path, "the learner's array shapes do not agree (classes, W, b, mean, std): it is damaged")
    if ("basis" in state) != ("basis_mean" in state) or ("basis" in state and not (
            state["basis"].ndim == 2 and state["basis"].shape[1] == d and state["basis_mean"].shape == (state["basis"].shape[0],))):
        raise BundleError(path, "the learner's feature projection does not fit its weights: it is damaged")
    floats = ("W", "b", "mean", "std", "alpha", "hyper", "decode") + (("basis", "basis_mean") if "basis" in state else ())
    if not all(np.isfinite(state[k]).all() for k in floats) or not (state["std"] > 0).all():
        raise BundleError(path, "the learner holds non-finite numbers (or a std <= 0): it is damaged")
    ids = [int(v) for v in c]
    unknown = sorted(set(ids) - {r.id for r in regions})
    if unknown or len(set(ids)) != len(ids):
        raise BundleError(path, f"learner classes {unknown or 'repeat'} are not the bundle's regions"
                          if unknown else "learner classes repeat: it is damaged")
    dec = state["decode"].ravel()
    if not (0 <= dec[0] <= 16 and dec[1] > 0):
        raise BundleError(path, f"decoding settings {dec.tolist()} are out of range (radius 0-16, self weight > 0)")
    try:
        return TaughtLearner.from_state(state, str(meta.get("feature_kind", FEATURE_KIND)))
    except (ValueError, TypeError, IndexError) as exc:
        raise BundleError(path, f"unreadable learner ({exc})") from None
