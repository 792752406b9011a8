"""The fast inference paths give the labels of plain float32 (at least 99.5% of tiles), on real plates.

Enabled fast paths: channels-last float32 on CPU (always), whole-model bfloat16 on CPUs with native
bf16 where ``precision="auto"`` picks it, CUDA mixed precision where a GPU is present; and float16
storage of the embeddings. Two real Allen plates at a 200 um stride with the shipped model. Full
figures on all 26 test plates: ``benchmarks/bench_agreement.py``.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PLATES = (10, 20)  # small test plates: ~600 tissue tiles at 200 um
STRIDE_UM = 200.0
MIN_AGREEMENT = 0.995


@pytest.fixture(scope="module")
def fp32_model():
    from napari_cytoclip.models.model import load_model

    return load_model(None, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def windows(fp32_model):
    """uint8 model inputs of the tissue tiles of both plates, read once."""
    from helpers import allen_plate

    from napari_cytoclip.inference.predict import plan_grid
    from napari_cytoclip.inference.windows import WindowReader

    out = []
    for n in PLATES:
        section = allen_plate(n).section()
        grid, cells, mask = plan_grid(section, fp32_model, STRIDE_UM)
        reader = WindowReader(section, fp32_model.input, mask.polarity)
        out += [reader.read(grid.centers(cells[i:i + 256])) for i in range(0, len(cells), 256)]
    w = np.concatenate(out)
    assert len(w) > 400
    return w


def plain_fp32_embeddings(model, windows: np.ndarray, batch: int = 128) -> np.ndarray:
    """The reference: eager float32 in the default (NCHW) memory format, no fast path at all."""
    import torch

    visual = copy.deepcopy(model.model.visual).float().to(memory_format=torch.contiguous_format)
    mean = torch.tensor(model.input.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.input.std).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(windows[i:i + batch]).permute(0, 3, 1, 2).float().div(255.0)
            x = ((x - mean) / std).contiguous()
            out.append(torch.nn.functional.normalize(visual(x), dim=-1).numpy())
    return np.concatenate(out)


def encode(model, windows: np.ndarray, batch: int = 128) -> np.ndarray:
    return np.concatenate([model.encode_windows(windows[i:i + batch]) for i in range(0, len(windows), batch)])


def labels_of(model, embeddings: np.ndarray) -> np.ndarray:
    from napari_cytoclip.inference.aggregate import region_probabilities

    return region_probabilities(embeddings, model.region_embeddings(), model.logit_scale).argmax(1)


@pytest.fixture(scope="module")
def reference(fp32_model, windows):
    emb = plain_fp32_embeddings(fp32_model, windows)
    return emb, labels_of(fp32_model, emb)


def test_channels_last_cpu_default_agrees(fp32_model, windows, reference):
    import torch

    assert fp32_model.device.type == "cpu"
    assert fp32_model.model.visual.trunk.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    emb = encode(fp32_model, windows)
    agreement = float((labels_of(fp32_model, emb) == reference[1]).mean())
    print(f"channels_last vs fp32: {100 * agreement:.3f}% of {len(windows)} tiles")
    assert agreement >= MIN_AGREEMENT


def test_auto_bf16_where_enabled_agrees(windows, reference, fp32_model):
    from napari_cytoclip.models.model import load_model

    auto = load_model(None, device="cpu", precision="auto")
    if auto.precision != "bf16":
        pytest.skip("precision='auto' keeps float32 on this CPU (no native bf16); "
                    "benchmarks/bench_agreement.py measures bf16 agreement on any CPU")
    agreement = float((labels_of(fp32_model, encode(auto, windows)) == reference[1]).mean())
    print(f"bf16 vs fp32: {100 * agreement:.3f}%")
    assert agreement >= MIN_AGREEMENT


def test_cuda_mixed_precision_agrees(windows, reference, fp32_model):
    import torch

    from napari_cytoclip.models.model import load_model

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    gpu = load_model(None, device="cuda")
    agreement = float((labels_of(fp32_model, encode(gpu, windows, 512)) == reference[1]).mean())
    print(f"CUDA autocast vs CPU fp32: {100 * agreement:.3f}%")
    assert agreement >= MIN_AGREEMENT


def test_float16_embeddings_keep_labels_and_retrieval(fp32_model, reference):
    """Predictions store float16 embeddings: the same argmax labels and the same text-query top 100."""
    emb32, lab32 = reference
    emb16 = emb32.astype(np.float16)
    lab16 = labels_of(fp32_model, emb16.astype(np.float32))
    assert float((lab16 == lab32).mean()) >= 0.999, int((lab16 != lab32).sum())
    for query in ("cerebellum", "hippocampal formation"):
        t = fp32_model.encode_texts([query])[0]
        top32 = set(np.argsort(-(emb32 @ t), kind="stable")[:100])
        top16 = set(np.argsort(-(emb16.astype(np.float32) @ t), kind="stable")[:100])
        assert len(top32 & top16) >= 95, query


def test_kept_bands_give_the_windows_of_fresh_reads(tmp_path, fp32_model, monkeypatch):
    """The reader's kept bands (one per scale) change nothing: a tiled pyramidal JPEG TIFF of a real plate,
    read batch by batch in grid order, equals every window read alone with band keeping off."""
    import tifffile
    from PIL import Image

    from helpers import allen_plate
    from napari_cytoclip.inference import windows as windows_module
    from napari_cytoclip.inference.predict import plan_grid
    from napari_cytoclip.io.sections import open_section

    plate = allen_plate(40)
    with Image.open(plate.image) as im:
        big = np.asarray(im.convert("L").resize((im.width * 4, im.height * 4), Image.Resampling.BILINEAR))
    path = tmp_path / "pyramid.tif"
    per_cm = 1e4 / (plate.um_per_px / 4)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(big, tile=(256, 256), compression="jpeg", subifds=5, resolution=(per_cm, per_cm),
                  resolutionunit="CENTIMETER")
        for k in (2, 4, 8, 16, 32):
            tif.write(np.ascontiguousarray(big[::k, ::k]), tile=(128, 128), compression="jpeg", subfiletype=1,
                      resolution=(per_cm / k, per_cm / k), resolutionunit="CENTIMETER")
    section = open_section(path)
    try:
        assert len(section.levels) == 6
        grid, cells, mask = plan_grid(section, fp32_model, STRIDE_UM)
        reader = windows_module.WindowReader(section, fp32_model.input, mask.polarity)
        assert len({level for level, _ds, _crop in reader.plans}) > 1
        batched = np.concatenate([reader.read(grid.centers(cells[i:i + 64])) for i in range(0, len(cells), 64)])
        assert len(reader._bands) == len(reader.plans)  # bands were kept
        monkeypatch.setattr(windows_module, "BAND_BYTES", 1)  # nothing fits: every read is fresh
        fresh = windows_module.WindowReader(section, fp32_model.input, mask.polarity)
        pick = np.linspace(0, len(cells) - 1, 60).astype(int)
        alone = np.concatenate([fresh.read(grid.centers(cells[i:i + 1])) for i in pick])
        assert not fresh._bands
        np.testing.assert_array_equal(batched[pick], alone)
    finally:
        section.close()
