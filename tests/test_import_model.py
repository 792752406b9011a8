"""Bring your own CytoCLIP: import an open_clip checkpoint as a bundle, predict with it, export pairs in
its geometry and train it with the real ``open_clip_train.main`` (issue 14)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from napari_cytoclip import cli  # noqa: E402
from napari_cytoclip.errors import BundleError, OutputError  # noqa: E402

# a tiny CLIP with open_clip's own (built-in) text tower and tokenizer: nothing to download
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
SAMPLE_PX = 7.17  # um/px of the bundled Allen plate 41


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refusing an option
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def refused(rc: int, err: str, name: str | Path, pattern: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("napari-cytoclip: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(name) in lines[0] and pattern.lower() in lines[0].lower(), lines[0]
    return lines[0]


def write_config(folder: Path, cfg: dict = TINY) -> Path:
    """An ``open_clip_config.json`` (what ``--model local-dir:FOLDER`` of open_clip_train reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": cfg}))
    return path


def train_style_checkpoint(path: Path, cfg: dict = TINY, seed: int = 0, **extra) -> dict:
    """Save a random model the way open_clip_train does: ``{"epoch", "name", "state_dict" (module.), "optimizer"}``."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    folder = write_config(path.parent / f"{path.stem}_cfg", cfg).parent
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    state = model.state_dict()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"epoch": 1, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": opt.state_dict(), **extra}, str(path))
    return state


@pytest.fixture()
def regions(tmp_path) -> Path:
    path = tmp_path / "regions.csv"
    path.write_text("id,name,acronym,color\n1,Isocortex,CTX,#ff0000\n2,Striatum,STR,#00ff00\n3,Thalamus,TH,#0000ff\n")
    return path


@pytest.fixture()
def sample_crop(tmp_path) -> Path:
    """A 200 x 260 px crop (1.4 x 1.9 mm) of the real bundled plate 41, as an RGB TIFF."""
    import tifffile
    from PIL import Image

    from napari_cytoclip.io.sample_data import SAMPLE_DIR

    with Image.open(SAMPLE_DIR / "plate_41.jpg") as im:
        arr = np.asarray(im.convert("RGB"))
    y, x = arr.shape[0] // 2, arr.shape[1] // 3
    path = tmp_path / "crop.tif"
    tifffile.imwrite(path, np.ascontiguousarray(arr[y - 100:y + 100, x - 130:x + 130]))
    return path


def test_import_open_clip_train_checkpoint_then_predict(tmp_path, regions, sample_crop, capsys):
    from napari_cytoclip.models.bundle import load_bundle
    from napari_cytoclip.models.model import load_model

    ckpt = tmp_path / "epoch_1.pt"
    state = train_style_checkpoint(ckpt)
    config = write_config(tmp_path / "cfg")
    out = tmp_path / "my_model"
    rc, stdout, err = run_cli(capsys, "import-model", ckpt, "--config", config, "--regions", regions,
                              "--tile-um", 320, "--mode", "rgb", "--out", out)
    assert rc == 0, err
    assert stdout.strip() == str(out)
    bundle = load_bundle(out)
    assert bundle.input.size == 32 and bundle.input.mode == "rgb" and bundle.input.scales_um == (320.0,)
    assert bundle.label_um == 320.0 and [r.name for r in bundle.regions] == ["Isocortex", "Striatum", "Thalamus"]
    assert bundle.input.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # open_clip's preprocess
    prov = bundle.provenance["imported"]
    assert prov["source_file"] == "epoch_1.pt" and prov["checkpoint_epoch"] == 1 and len(prov["sha256"]) == 64
    assert {"open_clip", "torch", "napari-cytoclip"} <= set(prov["software"])
    model = load_model(out, device="cpu", precision="fp32")
    for k, v in state.items():  # the checkpoint's weights, not a fresh init
        assert np.array_equal(model.model.state_dict()[k].numpy(), v.numpy()), k

    results = tmp_path / "results"
    rc, _, err = run_cli(capsys, "predict", sample_crop, "--model", out, "--pixel-size", SAMPLE_PX,
                         "--out", results, "--device", "cpu", "--quiet")
    assert rc == 0, err
    meta = (results / "crop" / "prediction.json").read_text()
    assert "epoch_1" in meta and bundle.weights_hash() in meta  # the imported model made it
    import tifffile

    labels = tifffile.imread(results / "crop" / "labels.tif")
    assert labels.size > 0 and set(np.unique(labels)) <= {0, 1, 2, 3} and labels.max() > 0


def test_named_architecture_with_builtin_text_tower(tmp_path, regions):
    """A named open_clip architecture (RN50-style built-in text tower + SimpleTokenizer) is not refused as a
    download; a tile size other than the architecture's turns it into its config at that size."""
    import open_clip
    import torch

    from napari_cytoclip.models.bundle import load_bundle
    from napari_cytoclip.models.import_checkpoint import import_checkpoint
    from napari_cytoclip.models.model import load_model

    cfg = json.loads(json.dumps(open_clip.get_model_config("ViT-S-32")))
    cfg["vision_cfg"]["image_size"] = 64
    torch.manual_seed(0)
    write_config(tmp_path / "c", cfg)
    model = open_clip.create_model(f"local-dir:{tmp_path / 'c'}", load_weights=False)
    ckpt = tmp_path / "vits32.pt"
    torch.save(model.state_dict(), str(ckpt))  # a bare state dict
    out = import_checkpoint(ckpt, tmp_path / "b", regions, 640.0, arch="ViT-S-32", tile_px=64)
    bundle = load_bundle(out)
    assert bundle.architecture["base"] == "ViT-S-32" and bundle.architecture["config"]["vision_cfg"]["image_size"] == 64
    loaded = load_model(out, device="cpu", precision="fp32")
    assert loaded.region_embeddings().shape == (3, cfg["embed_dim"])


def _wrong_arch(tmp_path, regions):
    ckpt = tmp_path / "other.pt"
    train_style_checkpoint(ckpt, {**TINY, "embed_dim": 48})
    return ckpt, ["--config", write_config(tmp_path / "cfg"), "--regions", regions], ckpt, "text_projection"


def _unknown_arch(tmp_path, regions):
    ckpt = tmp_path / "x.pt"
    train_style_checkpoint(ckpt)
    return ckpt, ["--arch", "ViT-B-32x", "--regions", regions], ckpt, "unknown open_clip architecture 'ViT-B-32x'"


def _missing_regions(tmp_path, regions):
    ckpt = tmp_path / "x.pt"
    train_style_checkpoint(ckpt)
    absent = tmp_path / "nope.csv"
    return ckpt, ["--config", write_config(tmp_path / "cfg"), "--regions", absent], absent, "regions CSV not found"


def _truncated(tmp_path, regions):
    ckpt = tmp_path / "x.pt"
    train_style_checkpoint(ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    return ckpt, ["--config", write_config(tmp_path / "cfg"), "--regions", regions], ckpt, "truncated or corrupt"


def _garbage(tmp_path, regions):
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"not a checkpoint at all\n" * 10)
    return ckpt, ["--config", write_config(tmp_path / "cfg"), "--regions", regions], ckpt, "truncated or corrupt"


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_code(tmp_path, regions):
    import torch

    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}, "hook": Payload(tmp_path / "PWNED")}, str(ckpt))
    return ckpt, ["--config", write_config(tmp_path / "cfg"), "--regions", regions], ckpt, "refused to unpickle"


def _not_tensors(tmp_path, regions):
    import torch

    ckpt = tmp_path / "x.pt"
    torch.save({"epoch": 3, "lr": 0.1}, str(ckpt))
    return ckpt, ["--config", write_config(tmp_path / "cfg"), "--regions", regions], ckpt, "not a state dict"


def _missing_tensor(tmp_path, regions):
    import torch

    ckpt = tmp_path / "x.pt"
    train_style_checkpoint(ckpt)
    obj = torch.load(str(ckpt), weights_only=True)
    del obj["state_dict"]["module.logit_scale"]
    torch.save(obj, str(ckpt))
    return ckpt, ["--config", write_config(tmp_path / "cfg"), "--regions", regions], ckpt, "missing tensor 'logit_scale'"


def _wrong_tile_px(tmp_path, regions):
    ckpt = tmp_path / "x.pt"
    train_style_checkpoint(ckpt)
    return ckpt, ["--config", write_config(tmp_path / "cfg"), "--regions", regions, "--tile-px", "64"], ckpt, \
        "visual.positional_embedding"


BAD = {"wrong_architecture": _wrong_arch, "unknown_architecture": _unknown_arch, "missing_regions": _missing_regions,
       "truncated_checkpoint": _truncated, "not_a_checkpoint": _garbage, "pickled_code": _pickled_code,
       "not_tensors": _not_tensors, "missing_tensor": _missing_tensor, "wrong_tile_size": _wrong_tile_px}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_imports_get_one_clear_error(case, tmp_path, regions, capsys):
    ckpt, options, named, pattern = BAD[case](tmp_path, regions)
    out = tmp_path / "bundle"
    rc, _, err = run_cli(capsys, "import-model", ckpt, *options, "--tile-um", 320, "--out", out)
    refused(rc, err, named, pattern)
    assert not out.exists() and not (tmp_path / "PWNED").exists()


def test_import_refuses_to_overwrite(tmp_path, regions, capsys):
    ckpt = tmp_path / "x.pt"
    train_style_checkpoint(ckpt)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "import-model", ckpt, "--config", write_config(tmp_path / "cfg"),
                         "--regions", regions, "--tile-um", 320, "--out", out)
    refused(rc, err, out, "already exists")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_recent_models_store(tmp_path):
    from helpers import tiny_bundle

    from napari_cytoclip.models.import_checkpoint import RecentModels

    a, b = tiny_bundle(tmp_path / "a").path, tiny_bundle(tmp_path / "b", seed=1).path
    store = RecentModels(tmp_path / "cfg" / "recent.json", limit=3)
    assert store.entries() == []
    store.add(a)
    store.add(b)
    store.add(a)
    assert store.paths() == [a.resolve(), b.resolve()]
    assert RecentModels(tmp_path / "cfg" / "recent.json").paths() == [a.resolve(), b.resolve()]  # persisted
    with pytest.raises(BundleError):
        store.add(tmp_path / "not-a-bundle")
    (tmp_path / "cfg" / "recent.json").write_text("{broken")
    assert store.entries() == []


# ------------------------------------------------------------------------------ export in any geometry

def _predicted(tmp_path, capsys, bundle: Path, image: Path) -> tuple[Path, Path]:
    import tifffile

    results = tmp_path / "results"
    rc, _, err = run_cli(capsys, "predict", image, "--model", bundle, "--pixel-size", SAMPLE_PX, "--out", results,
                         "--device", "cpu", "--quiet")
    assert rc == 0, err
    labels = tifffile.imread(results / "crop" / "labels.tif")
    corrected = np.where(labels > 0, np.where(labels == 1, 2, 1), 0).astype(np.uint16)  # every tissue cell "corrected"
    path = tmp_path / "corrected.tif"
    tifffile.imwrite(path, corrected)
    return results / "crop", path


def test_export_pairs_in_another_geometry(tmp_path, regions, sample_crop, capsys):
    from PIL import Image

    from napari_cytoclip.teach.pairs import read_pairs

    ckpt = tmp_path / "m.pt"
    train_style_checkpoint(ckpt)
    bundle = tmp_path / "model"
    assert run_cli(capsys, "import-model", ckpt, "--config", write_config(tmp_path / "cfg"), "--regions", regions,
                   "--tile-um", 320, "--out", bundle)[0] == 0
    prediction, corrected = _predicted(tmp_path, capsys, bundle, sample_crop)
    out = tmp_path / "export"
    rc, _, err = run_cli(capsys, "export-pairs", sample_crop, corrected, "--prediction", prediction, "--model", bundle,
                         "--out", out, "--tile-px", 48, "--tile-um", 480, "--mode", "rgb")
    assert rc == 0, err
    files, captions, records = read_pairs(out / "pairs")
    assert files and len(files) == len(captions) == len(records)
    with Image.open(files[0]) as im:
        assert im.size == (48, 48) and im.mode == "RGB"
    assert records[0]["input"] == {"size": 48, "scales_um": [480.0], "mode": "rgb", "polarity": "brightfield"}
    header = (out / "pairs" / "pairs.csv").read_text().splitlines()[0]
    assert header == "filepath,caption"
    # one pair folder, one geometry: the model's own 32 px tiles are refused there
    rc, _, err = run_cli(capsys, "export-pairs", sample_crop, corrected, "--prediction", prediction, "--model", bundle,
                         "--out", out)
    refused(rc, err, out / "pairs", "one tile geometry")
    # default unchanged: the model's input windows
    rc, _, err = run_cli(capsys, "export-pairs", sample_crop, corrected, "--prediction", prediction, "--model", bundle,
                         "--out", tmp_path / "export2")
    assert rc == 0, err
    files2, _, records2 = read_pairs(tmp_path / "export2" / "pairs")
    with Image.open(files2[0]) as im:
        assert im.size == (32, 32)
    assert records2[0]["input"]["size"] == 32


@pytest.mark.parametrize("options, pattern", [
    (["--mode", "rgb", "--scales-um", "320", "640", "1280"], "one window"),
    (["--tile-px", "2"], "out of range"),
    (["--mode", "gray_scales", "--scales-um", "100", "200"], "1 or 3"),
])
def test_export_geometry_errors(options, pattern):
    from napari_cytoclip.models.bundle import InputSpec
    from napari_cytoclip.teach.pairs import export_geometry

    args = cli.build_parser().parse_args(["export-pairs", "i.tif", "l.tif", "--out", "o", *options])
    with pytest.raises(BundleError, match=pattern):
        export_geometry(InputSpec(64, (320.0, 640.0, 1280.0)), args.tile_px, args.tile_um, args.mode, args.scales_um)


# ------------------------------------------------------------------------------ open_clip's own trainer

@pytest.mark.slow  # about 60 s on two shared cores (open_clip_train starts in a subprocess)
def test_open_clip_train_on_exported_pairs_then_reimport(tmp_path, regions, sample_crop, capsys):
    """The real ``python -m open_clip_train.main`` trains on an exported pairs.csv; its checkpoint imports."""
    pytest.importorskip("braceexpand", reason="pip install -e '.[train]'")
    pytest.importorskip("webdataset", reason="pip install -e '.[train]'")
    from napari_cytoclip.models.model import load_model

    ckpt = tmp_path / "m.pt"
    train_style_checkpoint(ckpt, seed=3)
    cfg_dir = write_config(tmp_path / "arch").parent
    bundle = tmp_path / "model"
    assert run_cli(capsys, "import-model", ckpt, "--config", cfg_dir / "open_clip_config.json", "--regions", regions,
                   "--tile-um", 320, "--stride-um", 160, "--out", bundle)[0] == 0
    prediction, corrected = _predicted(tmp_path, capsys, bundle, sample_crop)
    out = tmp_path / "export"
    assert run_cli(capsys, "export-pairs", sample_crop, corrected, "--prediction", prediction, "--model", bundle,
                   "--out", out)[0] == 0
    pairs = out / "pairs"
    assert len((pairs / "pairs.csv").read_text().splitlines()) - 1 >= 8  # at least two batches of 4
    # open_clip_train starts from the bundle's weights: a plain open_clip state dict beside the config
    shutil.copyfile(bundle / "weights.safetensors", cfg_dir / "open_clip_model.safetensors")
    logs = tmp_path / "logs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{cfg_dir}",
           "--train-data", "pairs.csv", "--dataset-type", "csv", "--csv-img-key", "filepath",
           "--csv-caption-key", "caption", "--csv-separator", ",", "--batch-size", "4", "--epochs", "1",
           "--workers", "0", "--lr", "1e-4", "--warmup", "1", "--precision", "fp32", "--logs", str(logs),
           "--name", "run", "--save-frequency", "1", "--seed", "0", "--report-to", ""]
    proc = subprocess.run(cmd, cwd=pairs, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trained = logs / "run" / "checkpoints" / "epoch_1.pt"
    assert trained.is_file(), sorted(str(p) for p in logs.rglob("*"))
    again = tmp_path / "model2"
    rc, _, err = run_cli(capsys, "import-model", trained, "--config", cfg_dir / "open_clip_config.json",
                         "--regions", regions, "--tile-um", 320, "--out", again)
    assert rc == 0, err
    assert "Train Epoch: 0" in proc.stdout + proc.stderr  # it took optimiser steps
    start, trained_sd = load_model(bundle, device="cpu").model.state_dict(), load_model(again, device="cpu").model.state_dict()
    diff = {k: float((trained_sd[k] - start[k]).abs().max()) for k in start if start[k].is_floating_point()}
    assert max(diff.values()) > 0  # trained ...
    assert diff["token_embedding.weight"] < 5e-3  # ... from the imported weights (a fresh init differs by ~0.1)
