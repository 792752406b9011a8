"""Model bundles and models: validation errors name the bundle, pickled checkpoints are refused,
plain open_clip checkpoints load, tiny models encode into a normalised space, and the shipped
architecture builds offline from the packages that carry its pretrained weights."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import TINY_CONFIG, tiny_bundle  # noqa: E402

from napari_cytoclip.models.bundle import (BUNDLE_JSON, BUNDLE_WEIGHTS, default_bundle_path, load_bundle,  # noqa: E402
                                    load_regions_csv)
from napari_cytoclip.errors import BundleError  # noqa: E402
from napari_cytoclip.models.import_checkpoint import load_checkpoint_model  # noqa: E402
from napari_cytoclip.models.model import (load_model, pick_device,  # noqa: E402
                                   read_state_dict)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny").path


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(tiny_dir, device="cpu")


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_meta(folder: Path, change) -> Path:
    meta_path = folder / BUNDLE_JSON
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    return folder


# --------------------------------------------------------------------------------------- valid bundle
def test_tiny_bundle_loads(tiny_dir, tiny_model):
    bundle = load_bundle(tiny_dir)
    assert bundle.path == tiny_dir and bundle.weights_path == tiny_dir / BUNDLE_WEIGHTS
    assert len(bundle.weights_hash()) == 16
    assert tiny_model.input.size == 32 and len(tiny_model.regions) == 14
    assert tiny_model.device.type == "cpu"


# ------------------------------------------------------------------------------------- invalid bundles
def _set(path: list, value):
    def change(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _dup_ids(meta):
    meta["regions"][1]["id"] = meta["regions"][0]["id"]


META_CASES = {
    "unknown_architecture": (_set(["architecture"], {"name": "no-such-open-clip-model"}),
                             "unknown open_clip architecture"),
    "architecture_missing": (lambda m: m.pop("architecture"), "architecture"),
    "bad_config": (_set(["architecture", "config", "vision_cfg", "layers"], "many"), "cannot build"),
    "empty_regions": (_set(["regions"], []), "empty"),
    "regions_not_a_list": (_set(["regions"], {"1": "cortex"}), "regions"),
    "duplicate_region_ids": (_dup_ids, r"duplicate region ids \[1\]"),
    "region_id_zero": (_set(["regions", 0, "id"], 0), "between 1 and 65535"),
    "region_without_name": (_set(["regions", 0, "name"], " "), "no name"),
    "bad_colour_word": (_set(["regions", 0, "color"], "reddish"), "colour"),
    "bad_colour_hex": (_set(["regions", 0, "color"], "#12345g"), "colour"),
    "bad_colour_range": (_set(["regions", 0, "color"], [300, 0, 0]), "colour"),
    "prompts_a_string": (_set(["regions", 0, "prompts"], "a Nissl tile"), "prompts"),
    "prompts_not_strings": (_set(["regions", 0, "prompts"], ["ok", 3]), "prompts"),
    "prompts_empty_string": (_set(["regions", 0, "prompts"], [""]), "prompts"),
    "bad_polarity": (_set(["input", "polarity"], "sideways"), "polarity"),
    "bad_mode": (_set(["input", "mode"], "hsv"), "mode"),
    "input_missing_size": (lambda m: m["input"].pop("size"), "input"),
    "negative_scale": (_set(["input", "scales_um"], [-1.0, 2.0, 3.0]), "scales_um"),
    "text_tower_not_installed": (_set(["text_tower"], {"package": "no_such_text_tower_pkg", "subdir": "m"}),
                                 "not installed"),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_bad_cytoclip_json_raises_bundle_error_naming_the_bundle(case, tiny_dir, tmp_path):
    change, message = META_CASES[case]
    folder = edit_meta(copy_bundle(tiny_dir, tmp_path / case), change)
    with pytest.raises(BundleError, match=message) as info:
        load_model(folder, device="cpu")
    assert str(folder) in str(info.value), str(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError, match="not found") as info:
        load_bundle(tmp_path / "nope")
    assert info.value.source == str(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(BundleError, match="folder") as info:
        load_bundle(tmp_path / "model.safetensors")
    assert "model.safetensors" in str(info.value)


def test_missing_json(tiny_dir, tmp_path):
    folder = copy_bundle(tiny_dir, tmp_path / "b")
    (folder / BUNDLE_JSON).unlink()
    with pytest.raises(BundleError, match=f"missing {BUNDLE_JSON}") as info:
        load_bundle(folder)
    assert info.value.source == str(folder)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage", "[1, 2, 3]", "null"])
def test_malformed_json(tiny_dir, tmp_path, text):
    folder = copy_bundle(tiny_dir, tmp_path / "b")
    (folder / BUNDLE_JSON).write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError) as info:
        load_bundle(folder)
    assert BUNDLE_JSON in str(info.value) and str(folder) in str(info.value)


def test_missing_weights(tiny_dir, tmp_path):
    folder = copy_bundle(tiny_dir, tmp_path / "b")
    (folder / BUNDLE_WEIGHTS).unlink()
    with pytest.raises(BundleError, match=f"missing {BUNDLE_WEIGHTS}") as info:
        load_bundle(folder)
    assert info.value.source == str(folder)


@pytest.mark.parametrize("data", [b"", b"not a safetensors file at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_corrupt_safetensors(tiny_dir, tmp_path, data):
    folder = copy_bundle(tiny_dir, tmp_path / "b")
    (folder / BUNDLE_WEIGHTS).write_bytes(data)
    with pytest.raises(BundleError, match="cannot read the weights") as info:
        load_model(folder, device="cpu")
    assert str(folder / BUNDLE_WEIGHTS) in str(info.value)


def test_truncated_safetensors(tiny_dir, tmp_path):
    folder = copy_bundle(tiny_dir, tmp_path / "b")
    weights = folder / BUNDLE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BundleError, match="cannot read the weights") as info:
        load_model(folder, device="cpu")
    assert BUNDLE_WEIGHTS in str(info.value)


def test_weights_of_another_architecture(tiny_dir, tmp_path):
    other = json.loads(json.dumps(TINY_CONFIG))
    other["embed_dim"] = 16
    folder = edit_meta(copy_bundle(tiny_dir, tmp_path / "b"), _set(["architecture", "config"], other))
    with pytest.raises(BundleError, match="do not match") as info:
        load_model(folder, device="cpu")
    assert str(folder / BUNDLE_WEIGHTS) in str(info.value)


def test_weights_with_missing_and_extra_tensors(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_bundle(tiny_dir, tmp_path / "b")
    state = load_file(str(folder / BUNDLE_WEIGHTS))
    state.pop(sorted(state)[0])
    state["surprise.weight"] = next(iter(state.values())).clone()
    save_file(state, str(folder / BUNDLE_WEIGHTS))
    with pytest.raises(BundleError, match="1 missing.*1 unexpected"):
        load_model(folder, device="cpu")


def test_regions_csv(tmp_path):
    csv_path = tmp_path / "regions.csv"
    csv_path.write_text("id,name,acronym,color,prompts\n3,Cortex,CTX,#FF0000,cortex tile|isocortex\n7,Striatum,,,\n")
    regions = load_regions_csv(csv_path)
    assert [(r.id, r.name, r.color) for r in regions] == [(3, "Cortex", "#ff0000"), (7, "Striatum", "#808080")]
    assert regions[0].prompts == ("cortex tile", "isocortex") and regions[1].texts()
    csv_path.write_text("id,name\n3,Cortex\n3,Again\n")
    with pytest.raises(BundleError, match=r"regions\.csv.*duplicate"):
        load_regions_csv(csv_path)
    csv_path.write_text("identifier,label\n1,x\n")
    with pytest.raises(BundleError, match=r"regions\.csv.*header"):
        load_regions_csv(csv_path)


# ------------------------------------------------------------------------------------ pickled payloads
class Payload:
    """Unpickling this would create ``marker`` (it stands for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_malicious_checkpoint(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"visual.proj": torch.zeros(2), "payload": Payload(marker)}, str(path))
    return path


def test_the_payload_is_live(tmp_path):
    """Control: plain unpickling does run it, so the refusals below mean something."""
    marker = tmp_path / "pwned"
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    with open(tmp_path / "p.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_read_state_dict_refuses_pickled_code(tmp_path, suffix):
    marker = tmp_path / "pwned"
    ckpt = write_malicious_checkpoint(tmp_path / f"evil{suffix}", marker)
    with pytest.raises(BundleError, match="refused to unpickle") as info:
        read_state_dict(ckpt)
    assert str(ckpt) in str(info.value)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_not_unpickled(tiny_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = copy_bundle(tiny_dir, tmp_path / "b")
    write_malicious_checkpoint(folder / BUNDLE_WEIGHTS, marker)
    with pytest.raises(BundleError, match="cannot read the weights"):
        load_model(folder, device="cpu")
    assert not marker.exists()


def test_load_checkpoint_model_refuses_pickled_code(tmp_path, tiny_arch):
    marker = tmp_path / "pwned"
    ckpt = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(BundleError, match="refused to unpickle"):
        load_checkpoint_model(tiny_arch, ckpt, regions_csv(tmp_path), device="cpu")
    assert not marker.exists()


def test_state_dict_must_hold_tensors(tmp_path):
    import torch

    torch.save({"a": 1, "b": "text"}, str(tmp_path / "numbers.pt"))
    with pytest.raises(BundleError, match="not a dictionary of tensors"):
        read_state_dict(tmp_path / "numbers.pt")
    with pytest.raises(BundleError, match="not found"):
        read_state_dict(tmp_path / "absent.pt")


# ------------------------------------------------------------------------------ open_clip checkpoints
TINY_ARCH = "cytoclip-test-tiny-vit"


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """A tiny architecture registered by name in open_clip's model registry."""
    import open_clip

    cfg = {k: v for k, v in TINY_CONFIG.items() if k != "custom_text"}
    path = tmp_path_factory.mktemp("arch") / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    assert TINY_ARCH in open_clip.list_models()
    return TINY_ARCH


def regions_csv(folder: Path) -> Path:
    path = folder / "regions.csv"
    path.write_text("id,name,color,prompts\n1,Cortex,#ff0000,cortex|isocortex tile\n2,Striatum,#00ff00,\n"
                    "9,Cerebellum,#0000ff,cerebellum\n")
    return path


def test_load_checkpoint_model_from_a_plain_state_dict(tmp_path, tiny_arch):
    import open_clip
    import torch

    torch.manual_seed(1)
    model = open_clip.create_model(tiny_arch, pretrained=None)
    ckpt = tmp_path / "tiny.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, str(ckpt))  # DDP-style keys too
    cm = load_checkpoint_model(tiny_arch, ckpt, regions_csv(tmp_path), device="cpu")
    assert [r.id for r in cm.regions] == [1, 2, 9]
    assert cm.input.size == 32 and cm.input.mode == "rgb"
    emb = cm.encode_windows(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert cm.region_embeddings().shape == (3, 32)
    # the weights really were loaded
    for k, v in model.state_dict().items():
        assert torch.equal(cm.model.state_dict()[k].cpu(), v), k


def test_load_checkpoint_model_unknown_architecture(tmp_path):
    with pytest.raises(BundleError, match="unknown open_clip architecture"):
        load_checkpoint_model("no-such-model-xyz", tmp_path / "x.pt", regions_csv(tmp_path), device="cpu")


# ----------------------------------------------------------------------------------------- devices
def test_pick_device_auto_is_cpu_without_an_accelerator():
    import torch

    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if torch.cuda.is_available() or has_mps:
        pytest.skip("this machine has an accelerator: 'auto' picks it")
    assert pick_device("auto").type == "cpu"
    assert pick_device(None).type == "cpu"
    with pytest.raises(BundleError, match="no CUDA GPU"):
        pick_device("cuda")


def test_pick_device_refuses_unknown_names():
    assert pick_device("CPU").type == "cpu"
    with pytest.raises(BundleError, match="unknown device"):
        pick_device("tpu")


# ---------------------------------------------------------------------------------------- encoding
def test_encode_windows_is_l2_normalised(tiny_model):
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    emb = tiny_model.encode_windows(windows)
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert tiny_model.encode_windows(windows[:0]).shape == (0, 32)
    # one window alone encodes (nearly) as in the batch
    np.testing.assert_allclose(tiny_model.encode_windows(windows[2:3])[0], emb[2], atol=1e-4)


def test_region_embeddings(tiny_model):
    emb = tiny_model.region_embeddings()
    assert emb.shape == (14, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.unique(emb.round(5), axis=0).shape[0] == 14
    texts = tiny_model.encode_texts(["cortex", "striatum", "cortex"])
    assert texts.shape == (3, 32) and np.array_equal(texts[0], texts[2])
    assert 0 < tiny_model.logit_scale <= 100


# ------------------------------------------------------------------------------- shipped architecture
def test_shipped_architecture_builds_offline_with_imagenet_trunk(monkeypatch):
    """EfficientNet-Lite0 (ImageNet weights from a package) + MiniLM text tower (from a package): no hub."""
    import torch

    from napari_cytoclip.models.architectures import (MINILM_TEXT_TOWER, efficientnet_minilm,
                                                      imagenet_efficientnet_lite0_state)
    from napari_cytoclip.models.bundle import InputSpec, ModelBundle
    from napari_cytoclip.models.model import build_open_clip
    from napari_cytoclip.models.vocabularies import allen_mouse_regions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    bundle = ModelBundle(name="arch-check", architecture=efficientnet_minilm(embed_dim=64, image_size=64),
                         input=InputSpec(64, (320.0, 640.0, 1280.0)), regions=allen_mouse_regions(),
                         label_um=200.0, stride_um=100.0, text_tower=MINILM_TEXT_TOWER)
    model, tokenizer = build_open_clip(bundle)
    assert type(model).__name__ == "CustomTextCLIP"
    state = imagenet_efficientnet_lite0_state()
    result = model.visual.trunk.load_state_dict(state, strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) <= {"classifier.weight", "classifier.bias"}
    trunk = model.visual.trunk.state_dict()
    assert torch.equal(trunk["conv_stem.weight"], state["conv_stem.weight"])
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.zeros(2, 3, 64, 64))
        txt = model.encode_text(tokenizer(["a Nissl-stained tile of the cerebellum", "ventricles"]))
    assert img.shape == (2, 64) and txt.shape == (2, 64)
    # the MiniLM trunk is pretrained (from the package): its word embeddings are not a fresh init
    words = model.text.transformer.embeddings.word_embeddings.weight.detach()
    assert words.shape == (30522, 384) and float(words.std()) < 0.1 and float(words.abs().max()) > 0.3


@pytest.mark.skipif(not (default_bundle_path() / BUNDLE_WEIGHTS).is_file(), reason="the shipped model is not built")
def test_shipped_bundle_loads_and_encodes():
    model = load_model(None, device="cpu")
    assert model.bundle.name == "cytoclip-allen-mouse"
    spec = model.input
    emb = model.encode_windows(np.full((2, spec.size, spec.size, 3), 200, np.uint8))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    assert model.region_embeddings().shape == (len(model.regions), emb.shape[1])


def test_region_ids_integral_accepted_fractional_refused():
    from napari_cytoclip.models.bundle import region_from_dict

    for value in (4, 4.0, "4", " 4 "):
        assert region_from_dict({"id": value, "name": "x"}, "src").id == 4
    for value in (4.5, True, None, float("nan"), "4.5", [4]):
        with pytest.raises(BundleError, match="integer 'id'"):
            region_from_dict({"id": value, "name": "x"}, "src")


def test_preload_libraries_imports_what_load_model_needs_once():
    """The widget preloads these in a thread worker when it opens (issue 15: no import stalls while predicting)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from napari_cytoclip.models.model import LIBRARIES, preload_libraries\n"
            "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules\n"
            "first = preload_libraries()\n"
            "assert all(name in sys.modules for name in LIBRARIES), first\n"
            "assert preload_libraries() == []\n"
            "print(sorted(first))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "open_clip" in out.stdout and "torch" in out.stdout
