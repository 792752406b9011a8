"""Building open_clip models from bundles or plain checkpoints, and encoding tiles and text."""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_cytoclip.models.bundle import BUNDLE_WEIGHTS, InputSpec, ModelBundle, Region, default_bundle_path, load_bundle
from napari_cytoclip.models.open_clip_build import build_open_clip  # noqa: F401  (part of this module's API)
from napari_cytoclip.inference.cputhreads import run_small
from napari_cytoclip.errors import BundleError

TEXT_TRUNK_PREFIX = "text.transformer."
POOLED = "pooled"  # feature kind: the image tower's trunk output (global average pool), before the projection
NO_FEATURES = "none"


@dataclass(frozen=True)
class ModelIdentity:
    """What cached embeddings and features depend on besides the section and the grid.

    ``precision``: how the image tower ran (``fp32``, ``bf16``, ``cuda-amp``); ``features``: the kind of
    per-cell features stored beside the embeddings (:data:`POOLED` or :data:`NO_FEATURES`). ``None``
    for either means "any" (reading a cache whose embeddings are used as they are, e.g. for export).
    """

    name: str
    weights_hash: str
    input: dict
    precision: str | None = None
    features: str | None = None

    @classmethod
    def of_bundle(cls, bundle: ModelBundle, precision: str | None = None,
                  features: str | None = None) -> "ModelIdentity":
        return cls(name=bundle.name, weights_hash=bundle.weights_hash(), input=bundle.to_json()["input"],
                   precision=precision, features=features)


def feature_kind(bundle: ModelBundle) -> str:
    """:data:`POOLED` for a timm image tower (trunk + projection head), else :data:`NO_FEATURES`."""
    cfg = (bundle.architecture.get("config") or {}).get("vision_cfg") or {}
    return POOLED if cfg.get("timm_model_name") else NO_FEATURES


def resolve_precision(bundle: ModelBundle, device: Any, precision: str = "auto", warn: bool = False) -> str:
    """The precision a model of ``bundle`` runs at on ``device`` (a torch device) for a requested ``precision``."""
    if device.type == "cuda":
        return "cuda-amp"
    if device.type != "cpu":
        return "fp32"
    if precision == "auto":
        return "bf16" if cpu_supports_bf16() and _is_conv_tower(bundle) else "fp32"
    if precision == "bf16" and not cpu_supports_bf16():
        if warn:
            warnings.warn("this CPU has no native bfloat16; using float32", RuntimeWarning, stacklevel=3)
        return "fp32"
    return precision


def pick_device(preference: str = "auto"):
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit choice is checked."""
    import torch

    preference = (preference or "auto").lower()
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise BundleError(None, "device 'cuda' was asked for but no CUDA GPU is available")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BundleError(None, "device 'mps' was asked for but Apple MPS is not available")
    if preference not in ("cpu", "mps") and not preference.startswith("cuda"):
        raise BundleError(None, f"unknown device {preference!r} (auto, cpu, cuda, mps)")
    return torch.device(preference)


def cpu_supports_bf16() -> bool:
    """Native bfloat16 arithmetic (AVX-512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust oneDNN's own check
        import torch

        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # pragma: no cover - older torch
            return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def read_state_dict(path: str | Path) -> dict:
    """Tensors from safetensors, or from a torch checkpoint without unpickling code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = "refused to unpickle: the checkpoint holds Python objects, not only tensors" \
            if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__ else f"{type(exc).__name__}: {exc}"
        raise BundleError(path, f"cannot read the weights ({kind})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise BundleError(path, "the weights file is not a dictionary of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def load_weights_into(model: Any, state: dict, source: Any, text_from_package: bool) -> None:
    """Load ``state`` strictly, except the text trunk when the text tower comes from a package."""
    own = model.state_dict()
    bad_shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise BundleError(source, "weights do not match the architecture: " + "; ".join(bad_shapes[:5]))
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state)
                     if not (text_from_package and k.startswith(TEXT_TRUNK_PREFIX)))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise BundleError(source, "weights do not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


class CytoClip:
    """A loaded model: encodes uint8 windows and text into one normalised embedding space."""

    def __init__(self, bundle: ModelBundle, model: Any, tokenizer: Any, device: Any, precision: str = "fp32"):
        import torch

        self.bundle = bundle
        self.device = device
        self.precision = precision
        self._tokenizer = tokenizer
        self._text_cache: dict[str, np.ndarray] = {}
        self._capture = threading.local()  # per-thread feature capture (see capturing_features)
        self._affine: tuple | None = None  # (scale, shift) tensors of preprocess, made on first use
        self.learner = None  # a taught bundle's TaughtLearner (set by load_model); used when labels are decoded
        model.eval()
        self.model = model.to(device)
        self.image_dtype = torch.float32
        if device.type == "cpu":
            self.model.visual.to(memory_format=torch.channels_last)
            if precision == "bf16":
                self.model.visual.to(torch.bfloat16)
                self.image_dtype = torch.bfloat16
        with torch.no_grad():
            self.logit_scale = float(model.logit_scale.exp().clamp(max=100).item())
        if not 0.01 <= self.logit_scale <= 100:  # NaN fails too
            raise BundleError(bundle.weights_path or bundle.path or bundle.name,
                              f"the logit scale {self.logit_scale:g} is out of the sane range 0.01-100; "
                              "the weights are damaged")

    @property
    def input(self) -> InputSpec:
        return self.bundle.input

    @property
    def regions(self) -> list[Region]:
        return self.bundle.regions

    @property
    def model_hash(self) -> str:
        return self.bundle.weights_hash()

    def preprocess(self, windows: np.ndarray):
        """uint8 ``(B, N, N, 3)`` windows to the normalised tensor the image tower takes."""
        import torch

        if self._affine is None:  # (x / 255 - mean) / std as one multiply-add
            mean = torch.tensor(self.input.mean, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(self.input.std, device=self.device).view(1, 3, 1, 1)
            self._affine = (1.0 / (255.0 * std), -mean / std)
        scale, shift = self._affine
        w = np.asarray(windows)
        if not w.flags.writeable or min(w.strides, default=0) < 0:
            w = np.array(w, order="C")  # a copy torch may own
        # any layout in (a channel-planar reader's view too); one multiply-add in place, then one copy into the
        # layout the image tower wants (channels-last on the CPU), interleaving there if the input was planar
        x = torch.from_numpy(w).to(self.device).permute(0, 3, 1, 2).float().mul_(scale).add_(shift)
        layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        return x.to(self.image_dtype, memory_format=layout)

    @property
    def feature_kind(self) -> str:
        """:data:`POOLED` when the image tower splits into a trunk and a projection head, else :data:`NO_FEATURES`."""
        visual = self.model.visual
        return POOLED if hasattr(visual, "trunk") and hasattr(visual, "head") else NO_FEATURES

    @property
    def identity(self) -> ModelIdentity:
        """This model's :class:`ModelIdentity`, with the precision it runs at and its feature kind."""
        precision = "cuda-amp" if self.device.type == "cuda" else self.precision
        return ModelIdentity.of_bundle(self.bundle, precision, self.feature_kind)

    def encode_windows(self, windows: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings ``(B, D)`` of uint8 windows.

        Inside :meth:`capturing_features` (this thread only), the pooled features of the same forward
        pass are kept too.
        """
        import torch

        if len(windows) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        capture = getattr(self._capture, "rows", None)
        x = self.preprocess(windows)
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
                    emb, pooled = self._forward(x, capture is not None)
            else:
                emb, pooled = self._forward(x, capture is not None)
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        if capture is not None and pooled is not None:
            capture.append(pooled.to(torch.float16).cpu().numpy())  # what the cache stores
        return emb.cpu().numpy()

    def _forward(self, x: Any, pooled: bool) -> tuple[Any, Any]:
        visual = self.model.visual
        if pooled and self.feature_kind == POOLED:
            features = visual.trunk(x)
            return visual.head(features), features
        return self.model.encode_image(x), None

    def capturing_features(self) -> "_FeatureCapture":
        """Context (this thread only): :meth:`encode_windows` also keeps the pooled features of its forward
        pass; ``take(n)`` returns those of the last ``n`` windows as float16 ``(n, F)``, or None."""
        return _FeatureCapture(self._capture)

    @property
    def embed_dim(self) -> int:
        if not hasattr(self, "_dim"):
            self._dim = int(self.encode_texts(["x"]).shape[1])
        return self._dim

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings of ``texts`` (memoised per string)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            tokens = self._tokenizer(todo).to(self.device)
            emb = run_small(self._encode_tokens, tokens)  # small work: the package's one-thread worker
            for t, e in zip(todo, emb):
                self._text_cache[t] = e
        return np.stack([self._text_cache[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def _encode_tokens(self, tokens: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()

    def region_embeddings(self, regions: Sequence[Region] | None = None) -> np.ndarray:
        """One embedding per region: its prompt ensemble averaged, then renormalised."""
        regions = self.regions if regions is None else regions
        self.encode_texts([t for r in regions for t in r.texts()])  # every new prompt in one batch
        out = []
        for r in regions:
            e = self.encode_texts(r.texts()).mean(0)
            out.append(e / max(np.linalg.norm(e), 1e-12))
        return np.stack(out).astype(np.float32)


LIBRARIES = ("torch", "open_clip", "transformers", "safetensors.torch")  # what load_model imports


def preload_libraries() -> list[str]:
    """Import the libraries :func:`load_model` needs (seconds the first time, nothing after); returns the
    names imported now. A GUI runs this in a background thread when it opens, so that the imports, which hold
    the GIL for up to a few hundred ms at a time, are done before the first prediction instead of during it."""
    import importlib
    import sys

    todo = [name for name in LIBRARIES if name not in sys.modules]
    for name in todo:
        importlib.import_module(name)
    return todo


def load_model(bundle: ModelBundle | str | Path | None = None, device: str = "auto",
               precision: str = "auto") -> CytoClip:
    """Load a bundle (default: the shipped model) onto ``device``.

    ``precision``: ``fp32``, ``bf16`` (CPU with native bf16 only) or ``auto`` (bf16 where the
    CPU supports it natively, else fp32; CUDA always uses mixed precision).
    """
    if bundle is None:
        path = default_bundle_path()
        if not (path / BUNDLE_WEIGHTS).is_file():
            raise BundleError(path, "the default model is not installed; pass a bundle folder with --model")
        bundle = path
    if not isinstance(bundle, ModelBundle):
        bundle = load_bundle(bundle)
    dev = pick_device(device)
    model, tokenizer = build_open_clip(bundle)
    if bundle.weights_path is not None:
        state = read_state_dict(bundle.weights_path)
        load_weights_into(model, state, bundle.weights_path, text_from_package=bundle.text_tower is not None)
    precision = resolve_precision(bundle, dev, precision, warn=True)
    loaded = CytoClip(bundle, model, tokenizer, dev, "fp32" if precision == "cuda-amp" else precision)
    loaded.learner = bundle.load_learner()  # a taught bundle decodes labels with its learner
    return loaded


def _is_conv_tower(bundle: ModelBundle) -> bool:
    """bf16 on CPU pays off (and keeps labels) for the conv-net towers measured here."""
    cfg = bundle.architecture.get("config", {}).get("vision_cfg", {})
    return any(k in str(cfg.get("timm_model_name", "")) for k in ("efficientnet", "mobilenet", "convnext", "resnet"))


class _FeatureCapture:
    """See :meth:`CytoClip.capturing_features`."""

    def __init__(self, local: threading.local):
        self._local = local

    def __enter__(self) -> "_FeatureCapture":
        self._local.rows = []
        return self

    def __exit__(self, *exc: Any) -> None:
        self._local.rows = None

    def take(self, n: int) -> np.ndarray | None:
        """Features of the last ``n`` windows encoded (None when the model or a wrapper gave none)."""
        rows, self._local.rows = self._local.rows or [], []
        got = np.concatenate(rows) if rows else None
        return got if got is not None and len(got) == n else None
