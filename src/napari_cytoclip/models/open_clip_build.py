"""Build the open_clip model and tokenizer a bundle names, without open_clip's factory.

``open_clip.create_model`` and ``get_tokenizer`` report through the module-level ``logging.info`` and
``logging.warning``, and those call ``logging.basicConfig()`` when the root logger has no handler: in
napari's process (none there) the first model load added a stderr handler to the root logger, a
process-wide change. So the classes are built here from the config the way the factory builds them
(fp32, no checkpoint, no download): the same modules and the same parameter names.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from napari_cytoclip.errors import BundleError
from napari_cytoclip.models.bundle import ModelBundle, check_architecture, resolve_text_tower


def build_open_clip(bundle: ModelBundle, load_text_weights: bool = True):
    """The open_clip model and tokenizer a bundle names, with random or package text weights."""
    import open_clip

    source = bundle.path or bundle.name
    arch = bundle.architecture
    try:
        if "config" in arch:
            cfg = json.loads(json.dumps(arch["config"]))
            check_architecture({"config": cfg}, source)
            text_dir = resolve_text_tower(bundle.text_tower, source)
            if text_dir is not None:
                _probe_text_config(text_dir, source)
                cfg.setdefault("text_cfg", {})["hf_model_name"] = str(text_dir)
                cfg["text_cfg"]["hf_tokenizer_name"] = str(text_dir)
            model = instantiate(cfg, text_weights=load_text_weights and text_dir is not None)
            tokenizer = make_tokenizer(cfg, text_dir)
        else:
            name = arch["name"]
            if name not in open_clip.list_models():
                raise BundleError(source, f"unknown open_clip architecture {name!r}")
            cfg = open_clip.get_model_config(name) or {}
            named_text = cfg.get("text_cfg") or {}
            if named_text.get("hf_model_name") or named_text.get("hf_tokenizer_name"):
                raise BundleError(source, f"open_clip architecture {name!r} takes its text tower from the Hugging "
                                          "Face hub; name its config with a 'text_tower' package instead")
            model = instantiate(cfg, text_weights=False)
            tokenizer = make_tokenizer(cfg, None, name)
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(source, f"cannot build the architecture ({type(exc).__name__}: {exc})") from None
    return model, tokenizer


def instantiate(cfg: dict, text_weights: bool) -> Any:
    """The open_clip model class for ``cfg`` (``CLIP``, ``CustomTextCLIP`` or ``CoCa``, chosen as
    ``create_model`` chooses), fp32, random weights except, with ``text_weights``, a Hugging Face text
    tower's own (from its local folder) and never timm's ImageNet weights (a download)."""
    import open_clip

    cfg = copy.deepcopy(cfg)
    vision, text = cfg.setdefault("vision_cfg", {}), cfg.setdefault("text_cfg", {})
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False
    hf_text = "hf_model_name" in text
    if hf_text:
        text["hf_model_pretrained"] = bool(text_weights)
    if cfg.pop("custom_text", False) or hf_text:
        model_class = open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP
    else:
        model_class = open_clip.CLIP
    model = model_class(**cfg, cast_dtype=None)
    _set_default_preprocess(model)
    return model


def _set_default_preprocess(model: Any) -> None:
    """open_clip's default preprocessing (OpenAI mean and std) at the image tower's size, attached as
    ``create_model`` attaches it (``open_clip.get_model_preprocess_cfg`` reads it)."""
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg

    preprocess = asdict(PreprocessCfg())
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if size is not None:
        preprocess["size"] = size
    open_clip.set_model_preprocess_cfg(model, preprocess)


def make_tokenizer(cfg: dict, text_dir: Path | None, name: str | None = None) -> Any:
    """The tokenizer ``get_tokenizer`` would give: the text tower folder's Hugging Face tokenizer (local files
    only, no custom code), SigLIP's for a SigLIP architecture name, else open_clip's BPE tokenizer."""
    import open_clip

    text = cfg.get("text_cfg") or {}
    context_length = text.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    if text_dir is not None:
        return open_clip.tokenizer.HFTokenizer(str(text_dir), trust_remote_code=False, local_files_only=True,
                                               context_length=context_length)
    if name is not None and "siglip" in name.lower():
        variant = "gemma" if "siglip2" in name.lower() else "mc4" if "i18n" in name.lower() else "c4-en"
        return open_clip.tokenizer.SigLipTokenizer(variant, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length, **dict(text.get("tokenizer_kwargs") or {}))


def _probe_text_config(text_dir: Path, source: Any) -> None:
    """Read the text tower's config from its folder only, refusing custom code (``trust_remote_code=False``)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(text_dir), trust_remote_code=False, local_files_only=True)
    except Exception as exc:
        raise BundleError(source, f"the text tower in {text_dir} cannot be read without running its code "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
