"""Bring your own CytoCLIP: a plain open_clip checkpoint (what ``open_clip_train`` writes, or a bare
state dict) plus an architecture, a regions CSV and a tile geometry, as a model bundle.

Nothing is downloaded and no code in the checkpoint runs (``torch.load(weights_only=True)``).
Every tensor is checked against the architecture before anything is written. Also here: the
small "recent models" list the *Predict regions* chooser shows.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import platform
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from napari_cytoclip.errors import BundleError, CytoclipError
from napari_cytoclip.models.bundle import (BUNDLE_JSON, MODES, POLARITIES, InputSpec, ModelBundle, check_input,
                                           check_architecture, load_bundle, load_regions_csv, read_json, save_bundle)

if TYPE_CHECKING:  # model.py is imported inside the functions that need it
    from napari_cytoclip.models.model import CytoClip

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
RECENT_MAX = 10


def input_spec(tile_um: float, tile_px: int, mode: str = "rgb", scales_um: Sequence[float] | None = None,
               polarity: str = "brightfield", mean: Sequence[float] = InputSpec.mean,
               std: Sequence[float] = InputSpec.std, source: Any = None) -> InputSpec:
    """The tile geometry of a model: ``tile_px`` pixels covering ``tile_um`` micrometres (``rgb``: one
    colour window; ``gray_scales``: the grey levels of ``scales_um`` windows, default ``tile_um``, as channels)."""
    if mode not in MODES:
        raise BundleError(source, f"mode must be one of {MODES}, got {mode!r}")
    if polarity not in POLARITIES:
        raise BundleError(source, f"polarity must be one of {POLARITIES}, got {polarity!r}")
    try:
        tile_um, tile_px = float(tile_um), int(tile_px)
    except (TypeError, ValueError):
        raise BundleError(source, f"tile size must be numbers, got {tile_um!r} um and {tile_px!r} px") from None
    if not (math.isfinite(tile_um) and tile_um > 0):
        raise BundleError(source, f"the tile size must be a positive number of micrometres, got {tile_um}")
    if mode == "rgb" and scales_um and [float(s) for s in scales_um] != [tile_um]:
        raise BundleError(source, "an 'rgb' tile is one window of --tile-um; --scales-um is for 'gray_scales'")
    scales = tuple(float(s) for s in scales_um) if scales_um else (tile_um,)
    spec = InputSpec(size=tile_px, scales_um=scales, mode=mode, polarity=polarity,
                     mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    check_input(spec, source)
    return spec


# ---------------------------------------------------------------------------------------------
# reading a checkpoint

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """``(state_dict, info)`` from a torch checkpoint or a safetensors file, without running any of its code.

    Accepts ``open_clip_train``'s ``{"epoch", "name", "state_dict", "optimizer"}`` and bare state
    dicts; a ``module.`` prefix (DistributedDataParallel) is removed. ``info`` keeps ``epoch``/``name``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "checkpoint not found" if not path.exists() else "the checkpoint is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise BundleError(path, _load_problem(path, exc)) from None
    info: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info = {k: obj[k] for k in ("epoch", "name") if isinstance(obj.get(k), (int, str))}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise BundleError(path, "holds no state dict (expected a dictionary of tensors, or one under 'state_dict')")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise BundleError(path, f"is not a state dict: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor")
    state = {}
    for k, v in obj.items():
        key = k[len("module."):] if str(k).startswith("module.") else str(k)
        state[key] = v
    return state, info


def _load_problem(path: Path, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path) and not _starts_like_pickle(path):
        return "not a readable PyTorch checkpoint (truncated or corrupt: it is not a complete torch.save file)"
    if "weights_only" in text or "Unpickl" in type(exc).__name__ or "unpickl" in text.lower():
        return ("refused to unpickle: the checkpoint holds Python objects (code), not only tensors; "
                "save the model's state_dict() alone, or convert it with the tool that wrote it")
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
        return "not a readable PyTorch checkpoint (truncated or corrupt: it is not a complete torch.save file)"
    return f"not a readable checkpoint (truncated or corrupt: {type(exc).__name__}: {text[:160]})"


def _starts_like_pickle(path: Path) -> bool:
    """A legacy (non-zip) torch.save file is a pickle: protocol 2+ starts with 0x80."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# the architecture

def architecture_for(arch: str | None = None, config: str | Path | None = None, tile_px: int | None = None,
                     source: Any = None) -> tuple[dict, dict]:
    """``(architecture, preprocess_cfg)`` for a named open_clip model or an open_clip model config JSON.

    The config file may be a bare model config (``{"embed_dim", "vision_cfg", "text_cfg"}``) or an
    ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``). A ``tile_px`` other than
    the architecture's image size turns a named architecture into its config at that size (what
    ``open_clip_train --force-image-size`` trains).
    """
    import open_clip

    if (arch is None) == (config is None):
        raise BundleError(source, "give the architecture as --arch NAME or --config MODEL_CONFIG.json (one of them)")
    preprocess: dict = {}
    if arch is not None:
        names = open_clip.list_models()
        if arch not in names:
            close = difflib.get_close_matches(arch, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (open_clip.list_models() lists them)"
            raise BundleError(source, f"unknown open_clip architecture {arch!r}{hint}")
        cfg = open_clip.get_model_config(arch)
        text = cfg.get("text_cfg") or {}
        if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
            raise BundleError(source, f"open_clip architecture {arch!r} takes its text tower from the Hugging Face "
                                      "hub, which is never downloaded here; use an architecture with a built-in "
                                      "text tower (e.g. ViT-B-32, RN50) or a --config")
        architecture: dict = {"name": arch}
    else:
        raw = read_json(config, BundleError)
        if not isinstance(raw, dict):
            raise BundleError(config, "an open_clip model config must be a JSON object")
        cfg = raw.get("model_cfg", raw)
        preprocess = raw.get("preprocess_cfg") or {}
        if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict) or \
                not isinstance(cfg.get("text_cfg"), dict) or "embed_dim" not in cfg:
            raise BundleError(config, "not an open_clip model config (needs 'embed_dim', 'vision_cfg' and 'text_cfg')")
        architecture = {"config": cfg}
        source = config
    check_architecture({"config": cfg}, source)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if tile_px is not None and int(tile_px) != int(size):
        cfg = json.loads(json.dumps(cfg))
        cfg["vision_cfg"]["image_size"] = int(tile_px)
        architecture = {"config": cfg, **({"base": arch} if arch else {})}
    return architecture, preprocess


def _image_size(architecture: dict) -> int:
    import open_clip

    cfg = architecture.get("config") or open_clip.get_model_config(architecture["name"])
    size = cfg["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def check_state_dict(model: Any, state: dict, arch_label: str, source: Any) -> None:
    """Every tensor of the architecture present with its shape, nothing extra; names the first problem."""
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in state:
            extra = sorted(set(state) - set(own))
            more = f"; the checkpoint has {extra[0]!r} instead" if extra else ""
            raise BundleError(source, f"does not fit {arch_label}: missing tensor {key!r}{more} "
                                      "(wrong architecture?)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise BundleError(source, f"does not fit {arch_label}: {key} is {tuple(state[key].shape)} in the "
                                      f"checkpoint, {tuple(tensor.shape)} in the architecture (wrong architecture "
                                      "or tile size?)")
    extra = [k for k in state if k not in own]
    if extra:
        raise BundleError(source, f"does not fit {arch_label}: unexpected tensor {extra[0]!r}"
                                  f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''} (wrong architecture?)")


# ---------------------------------------------------------------------------------------------
# the import

def import_checkpoint(checkpoint: str | Path, out: str | Path, regions_csv: str | Path, tile_um: float, *,
                      arch: str | None = None, config: str | Path | None = None, tile_px: int | None = None,
                      mode: str = "rgb", scales_um: Sequence[float] | None = None, polarity: str = "brightfield",
                      stride_um: float | None = None, name: str | None = None, description: str = "") -> Path:
    """Write a bundle folder ``out`` (never overwritten) from an open_clip checkpoint; returns its path."""
    import open_clip
    import torch

    from napari_cytoclip import __version__ as own_version
    from napari_cytoclip.models.model import build_open_clip
    from napari_cytoclip.io.safe_files import now_iso

    checkpoint, out = Path(checkpoint), Path(out)
    if os.path.lexists(out):
        raise BundleError(out, "already exists; choose a new folder for the model")
    regions = load_regions_csv(regions_csv)
    if not checkpoint.is_file():
        raise BundleError(checkpoint, "checkpoint not found" if not checkpoint.exists() else "the checkpoint is not a file")
    architecture, preprocess = architecture_for(arch, config, tile_px, source=checkpoint)
    tile_px = int(tile_px) if tile_px is not None else _image_size(architecture)
    spec = input_spec(tile_um, tile_px, mode, scales_um, polarity, source=out)  # checked before the model is built
    label_um = float(tile_um)
    bundle = ModelBundle(name=name or checkpoint.stem, architecture=architecture, input=spec, regions=regions,
                         label_um=label_um, stride_um=float(stride_um or label_um),
                         description=description or f"imported from {checkpoint.name}")
    model, tokenizer = build_open_clip(bundle, load_text_weights=False)
    pre = {**(open_clip.get_model_preprocess_cfg(model) or {}), **preprocess}
    mean, std = pre.get("mean", spec.mean), pre.get("std", spec.std)
    bundle.input = input_spec(tile_um, tile_px, mode, scales_um, polarity, mean, std, source=out)
    state, info = read_checkpoint(checkpoint)
    arch_label = arch or (Path(config).name if config else "the architecture")
    check_state_dict(model, state, arch_label, checkpoint)
    model.load_state_dict(state, strict=True)
    _smoke_test(model, tokenizer, bundle, checkpoint)
    bundle.provenance = {"imported": {
        "source_file": checkpoint.name, "sha256": file_sha256(checkpoint),
        "size_bytes": checkpoint.stat().st_size, "architecture": arch or Path(config).name,
        **{f"checkpoint_{k}": v for k, v in info.items()}, "regions_csv": Path(regions_csv).name,
        "time": now_iso(), "software": {"napari-cytoclip": own_version, "open_clip": open_clip.__version__,
                                        "torch": torch.__version__, "python": platform.python_version()}}}
    saved = save_bundle(bundle, model.state_dict(), out)
    return saved.path or out


def _smoke_test(model: Any, tokenizer: Any, bundle: ModelBundle, source: Any) -> None:
    """One tile and one prompt through the model: a tile size the tower cannot take fails here, not in predict."""
    import torch

    model.eval()
    size = bundle.input.size
    try:
        with torch.inference_mode():
            img = model.encode_image(torch.zeros(1, 3, size, size))
            txt = model.encode_text(tokenizer([bundle.regions[0].texts()[0]]))
            scale = float(model.logit_scale.exp())
    except Exception as exc:
        raise BundleError(source, f"the model does not run on {size} px tiles ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:160]}); give the --tile-px it was trained at") from None
    if img.shape[-1] != txt.shape[-1]:
        raise BundleError(source, f"image ({img.shape[-1]}) and text ({txt.shape[-1]}) embeddings differ in size")
    if not (torch.isfinite(img).all() and torch.isfinite(txt).all() and math.isfinite(scale)):
        raise BundleError(source, "the model gives non-finite outputs; the weights are damaged")


# ---------------------------------------------------------------------------------------------
# recent models

def recent_models_path() -> Path:
    """``recent.json`` in the user's config folder (platformdirs where installed)."""
    try:
        from platformdirs import user_config_dir

        return Path(user_config_dir("napari-cytoclip", appauthor=False)) / "recent.json"
    except ImportError:
        return Path.home() / ".config" / "napari-cytoclip" / "recent.json"


class RecentModels:
    """Bundle folders used lately, newest first, kept in a small JSON file (rewritten atomically)."""

    def __init__(self, path: str | Path | None = None, limit: int = RECENT_MAX):
        self.path = Path(path) if path is not None else recent_models_path()
        self.limit = limit

    def entries(self) -> list[dict]:
        """``[{"path", "name", "time"}, ...]`` of bundles that still exist; an unreadable file reads as empty."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return []
        items = data.get("models", []) if isinstance(data, dict) else []
        return [e for e in items if isinstance(e, dict) and isinstance(e.get("path"), str)
                and (Path(e["path"]) / BUNDLE_JSON).is_file()][: self.limit]

    def paths(self) -> list[Path]:
        return [Path(e["path"]) for e in self.entries()]

    def add(self, bundle_path: str | Path) -> list[dict]:
        """Put a bundle folder first (checked: it must load); returns the new list."""
        from napari_cytoclip.io.safe_files import atomic_write_text
        from napari_cytoclip.io.safe_files import now_iso

        folder = Path(bundle_path).resolve()
        bundle = load_bundle(folder)
        items = [e for e in self.entries() if Path(e["path"]).resolve() != folder]
        items = [{"path": str(folder), "name": bundle.name, "time": now_iso()}, *items][: self.limit]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"models": items}, indent=1))
        except (OSError, CytoclipError):
            pass  # a read-only config folder only costs the list, never the import or prediction
        return items


def load_checkpoint_model(architecture: str, checkpoint: str | Path, regions_csv: str | Path,
                          input_spec: InputSpec | None = None, device: str = "auto") -> CytoClip:
    """A plain open_clip checkpoint + architecture name + regions CSV, as a model (nothing written).

    Without ``input_spec`` the tile is an RGB window of the architecture's image size in pixels
    and micrometres (1 um/px). ``import_checkpoint.import_checkpoint`` makes a reusable bundle instead.
    """
    import open_clip

    from napari_cytoclip.models.model import CytoClip, build_open_clip, pick_device

    regions = load_regions_csv(regions_csv)
    arch, _ = architecture_for(architecture, None, input_spec.size if input_spec else None, source=checkpoint)
    if input_spec is None:
        size = open_clip.get_model_config(architecture)["vision_cfg"].get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        input_spec = InputSpec(size=int(size), scales_um=(float(size),), mode="rgb",
                               mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    bundle = ModelBundle(name=Path(checkpoint).stem, architecture=arch, input=input_spec,
                         regions=regions, label_um=min(input_spec.scales_um), stride_um=min(input_spec.scales_um))
    bundle.weights_path = Path(checkpoint)
    dev = pick_device(device)
    state, _ = read_checkpoint(checkpoint)
    model, tokenizer = build_open_clip(bundle, load_text_weights=False)
    check_state_dict(model, state, architecture, checkpoint)
    model.load_state_dict(state, strict=True)
    return CytoClip(bundle, model, tokenizer, dev, "fp32")
