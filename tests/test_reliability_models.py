"""Reliability catalogue, models: every bad model bundle, and models are data, never code.

Each bundle case is a copy of a tiny real bundle with one thing wrong. Through the core
(``load_model``) it must raise a :class:`BundleError` with a one-line message naming the bundle (its
folder, ``cytoclip.json`` or ``weights.safetensors``); through ``napari-cytoclip predict --model`` it
must exit with status 2, one error line naming the bundle and no traceback. Bundles that are unusual
but fine must load.

A pickled checkpoint is never unpickled: a payload whose ``__reduce__`` would create a marker file is
fed to every place that reads weights, checkpoints or caches; each must refuse it and the marker must
not exist afterwards.
"""
from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tifffile

from helpers import tiny_bundle

import napari_cytoclip
from napari_cytoclip import cli
from napari_cytoclip.errors import BundleError, CytoclipError

PX = 5.0


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("model") / "tiny").path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A small synthetic section (100 x 120 px, dark tissue on a bright slide)."""
    rng = np.random.default_rng(0)
    img = np.full((100, 120), 230, np.uint8)
    img[20:80, 24:96] = rng.integers(20, 120, (60, 72))
    path = tmp_path_factory.mktemp("image") / "section.tif"
    tifffile.imwrite(path, img)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_cli_refused(rc: int, err: str, names: str) -> None:
    assert "Traceback" not in err, err
    assert rc == 2, f"exit status {rc}: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("napari-cytoclip: error: ")]
    assert len(errors) == 1 and all(line.startswith("napari-cytoclip: ") for line in lines), err
    assert names in errors[0], f"the error does not name {names}: {errors[0]}"


# ------------------------------------------------------------------------------------------ bundle edits
def edit_json(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        meta_path = folder / "cytoclip.json"
        meta = json.loads(meta_path.read_text())
        change(meta)
        meta_path.write_text(json.dumps(meta))  # json.dumps writes NaN/Infinity literals, as json.loads reads them
        return folder
    return make


def region(index: int, **fields) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        for key, value in fields.items():
            if value is DROP:
                meta["regions"][index].pop(key, None)
            else:
                meta["regions"][index][key] = value
    return change


def setting(section: str | None, **fields) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        (meta[section] if section else meta).update(fields)
    return change


def every_region(**fields) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        for i in range(len(meta["regions"])):
            region(i, **fields)(meta)
    return change


DROP = object()


def drop(key: str) -> Callable[[dict], None]:
    return lambda meta: meta.pop(key)


def write_file(name: str, data: bytes | None) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        return folder
    return make


def json_text(transform: Callable[[str], str]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "cytoclip.json"
        path.write_text(transform(path.read_text()))
        return folder
    return make


def load_weights_copy(path: Path) -> dict:
    """The tensors of a safetensors file, copied out of its memory map (the file may then be rewritten)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path)).items()}


def weights_edit(change: Callable[[dict], dict]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        from safetensors.torch import save_file

        path = folder / "weights.safetensors"
        tensors = change(load_weights_copy(path))
        path.unlink()
        save_file(tensors, str(path))
        return folder
    return make


def weights_bytes(change: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "weights.safetensors"
        path.write_bytes(change(path.read_bytes()))
        return folder
    return make


def benign_pickle_weights(folder: Path) -> Path:
    """weights.safetensors that is really a torch (pickle) checkpoint of the right tensors."""
    import torch

    path = folder / "weights.safetensors"
    tensors = load_weights_copy(path)
    path.unlink()
    torch.save(tensors, path)
    return folder


def bundle_is_a_file(folder: Path) -> Path:
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    return folder


def bundle_missing(folder: Path) -> Path:
    shutil.rmtree(folder)
    return folder


def json_is_a_folder(folder: Path) -> Path:
    (folder / "cytoclip.json").unlink()
    (folder / "cytoclip.json").mkdir()
    return folder


@dataclass(frozen=True)
class BundleCase:
    id: str
    make: Callable[[Path], Path]
    pattern: str | None          # regex of the refusal; None: the bundle is fine
    xfail: str | None = None
    cli_xfail: str | None = "same"


BUNDLE_CASES = [
    # the folder and its description
    BundleCase("folder_missing", bundle_missing, r"not found"),
    BundleCase("folder_is_a_file", bundle_is_a_file, r"folder"),
    BundleCase("json_missing", write_file("cytoclip.json", None), r"missing cytoclip\.json"),
    BundleCase("json_is_a_folder", json_is_a_folder, r"missing cytoclip\.json"),
    BundleCase("json_empty", write_file("cytoclip.json", b""), r"malformed JSON"),
    BundleCase("json_truncated", json_text(lambda t: t[: len(t) // 2]), r"malformed JSON"),
    BundleCase("json_not_utf8", write_file("cytoclip.json", b"\xff\xfe{\x00}"), r"malformed JSON"),
    BundleCase("json_is_a_list", write_file("cytoclip.json", b"[]"), r"JSON object"),
    # architecture
    BundleCase("architecture_missing", edit_json(drop("architecture")), r"architecture"),
    BundleCase("architecture_not_an_object", edit_json(setting(None, architecture="ViT-B-32")), r"architecture"),
    BundleCase("architecture_unknown", edit_json(setting(None, architecture={"name": "no-such-net"})),
               r"unknown open_clip architecture"),
    BundleCase("architecture_config_broken", edit_json(setting(None, architecture={"config": {"embed_dim": "x"}})),
               r"cannot build"),
    BundleCase("weights_do_not_fit_architecture",
               edit_json(lambda m: m["architecture"]["config"].update(embed_dim=64)), r"do not match"),
    BundleCase("text_tower_not_installed", edit_json(setting(None, text_tower={"package": "no_such_tower_pkg"})),
               r"not installed"),
    BundleCase("text_tower_not_an_object", edit_json(setting(None, text_tower="minilm")), r"text_tower"),
    # input specification
    BundleCase("input_missing", edit_json(drop("input")), r"input"),
    BundleCase("input_size_tiny", edit_json(setting("input", size=2)), r"out of range"),
    BundleCase("input_size_text", edit_json(setting("input", size="big")), r"input"),
    BundleCase("input_mode_unknown", edit_json(setting("input", mode="hsv")), r"mode"),
    BundleCase("input_polarity_unknown", edit_json(setting("input", polarity="sideways")), r"polarity"),
    BundleCase("scales_empty", edit_json(setting("input", scales_um=[])), r"scales_um"),
    BundleCase("scales_negative", edit_json(setting("input", scales_um=[-320.0, 640.0, 1280.0])), r"scales_um"),
    BundleCase("scales_text", edit_json(setting("input", scales_um=["wide"])), r"input"),
    BundleCase("scales_nan", edit_json(setting("input", scales_um=[float("nan"), 640.0, 1280.0])),
               r"scales_um|finite"),
    BundleCase("scales_infinite", edit_json(setting("input", scales_um=[float("inf"), 640.0, 1280.0])),
               r"scales_um|finite"),
    BundleCase("rgb_with_three_scales", edit_json(setting("input", mode="rgb")), r"one window size"),
    BundleCase("std_zero", edit_json(setting("input", std=[0.0, 0.2, 0.2])), r"std"),
    BundleCase("std_nan", edit_json(setting("input", std=[float("nan")] * 3)), r"std|finite"),
    BundleCase("mean_nan", edit_json(setting("input", mean=[float("nan")] * 3)), r"mean|finite"),
    BundleCase("mean_two_values", edit_json(setting("input", mean=[0.5, 0.5])), r"mean"),
    BundleCase("label_um_negative", edit_json(setting(None, label_um=-200.0)), r"positive"),
    BundleCase("label_um_text", edit_json(setting(None, label_um="wide")), r"numbers"),
    BundleCase("label_um_infinite", edit_json(setting(None, label_um=float("inf"))), r"label_um|finite"),
    BundleCase("stride_um_infinite", edit_json(setting(None, stride_um=float("inf"))), r"stride_um|finite"),
    # regions
    BundleCase("regions_missing", edit_json(drop("regions")), r"regions"),
    BundleCase("regions_empty", edit_json(setting(None, regions=[])), r"empty"),
    BundleCase("region_not_an_object", edit_json(setting(None, regions=[5])), r"object"),
    BundleCase("region_ids_duplicate", edit_json(region(1, id=1)), r"duplicate region ids \[1\]"),
    BundleCase("region_id_zero", edit_json(region(0, id=0)), r"between 1 and 65535"),
    BundleCase("region_id_too_large", edit_json(region(0, id=70000)), r"between 1 and 65535"),
    BundleCase("region_id_missing", edit_json(region(0, id=DROP)), r"integer 'id'"),
    BundleCase("region_id_text", edit_json(region(0, id="isocortex")), r"integer 'id'"),
    BundleCase("region_id_fractional", edit_json(region(0, id=1.5)), r"integer|id"),
    BundleCase("region_name_missing", edit_json(region(0, name=DROP)), r"no name"),
    BundleCase("region_name_blank", edit_json(region(0, name="   ")), r"no name"),
    BundleCase("colour_word", edit_json(region(0, color="red")), r"colour 'red'"),
    BundleCase("colour_short_hex", edit_json(region(0, color="#12345")), r"colour"),
    BundleCase("colour_bad_hex", edit_json(region(0, color="#GGGGGG")), r"colour"),
    BundleCase("colour_out_of_range", edit_json(region(0, color=[300, 0, 0])), r"colour"),
    BundleCase("colour_two_values", edit_json(region(0, color=[1, 2])), r"colour"),
    BundleCase("colour_nan", edit_json(region(0, color=[float("nan"), 0, 0])), r"colour"),
    BundleCase("prompts_a_string", edit_json(region(0, prompts="a Nissl tile")), r"prompts"),
    BundleCase("prompts_blank", edit_json(region(0, prompts=["  "])), r"prompts"),
    BundleCase("prompts_numbers", edit_json(region(0, prompts=[1, 2])), r"prompts"),
    BundleCase("prompts_null", edit_json(region(0, prompts=None)), r"prompts"),
    BundleCase("prompts_a_number", edit_json(region(0, prompts=5)), r"prompts"),
    # weights
    BundleCase("weights_missing", write_file("weights.safetensors", None), r"missing weights\.safetensors"),
    BundleCase("weights_empty", write_file("weights.safetensors", b""), r"cannot read the weights"),
    BundleCase("weights_garbage", write_file("weights.safetensors", bytes(range(256)) * 64),
               r"cannot read the weights"),
    BundleCase("weights_truncated", weights_bytes(lambda b: b[: len(b) // 2]), r"cannot read the weights"),
    BundleCase("weights_header_too_large", weights_bytes(lambda b: struct.pack("<Q", 2**60) + b[8:]),
               r"cannot read the weights"),
    BundleCase("weights_header_not_json", weights_bytes(lambda b: b[:8] + b"\x00" * 32 + b[40:]),
               r"cannot read the weights"),
    BundleCase("weights_missing_tensors",
               weights_edit(lambda s: {k: v for k, v in s.items() if not k.startswith("visual.")}), r"missing"),
    BundleCase("weights_extra_tensors", weights_edit(lambda s: {**s, "head.extra": s["logit_scale"].clone()}),
               r"unexpected"),
    BundleCase("weights_are_a_pickle", benign_pickle_weights, r"cannot read the weights"),
    # unusual but fine
    BundleCase("prompts_missing_everywhere", edit_json(every_region(prompts=DROP)), None),
    BundleCase("colour_float_triple", edit_json(region(0, color=[0.5, 0.25, 1.0])), None),
    BundleCase("colour_int_triple", edit_json(region(0, color=[255, 0, 128])), None),
    BundleCase("region_ids_as_text", edit_json(lambda m: [r.update(id=str(r["id"])) for r in m["regions"]]), None),
    BundleCase("unknown_extra_fields", edit_json(setting(None, future_field={"x": 1})), None),
]


def _params(which: str):
    out = []
    for case in BUNDLE_CASES:
        if which == "cli" and case.pattern is None:
            continue
        reason = case.xfail if which == "core" or case.cli_xfail == "same" else case.cli_xfail
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def make_case(case: BundleCase, tiny_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_dir, folder)
    return case.make(folder)


@pytest.mark.parametrize("case", _params("core"))
def test_bundle_catalogue_core(case, tiny_dir, tmp_path):
    from napari_cytoclip.models.model import load_model

    folder = make_case(case, tiny_dir, tmp_path)
    if case.pattern is None:
        model = load_model(folder, device="cpu", precision="fp32")
        if case.id == "prompts_missing_everywhere":  # the prompts are then made from names and descriptions
            emb = model.region_embeddings()
            assert emb.shape == (len(model.regions), model.embed_dim) and np.isfinite(emb).all()
        assert all(r.texts() and r.color.startswith("#") and len(r.color) == 7 for r in model.regions)
        assert len({r.id for r in model.regions}) == len(model.regions)
        return
    with pytest.raises(Exception) as info:
        load_model(folder, device="cpu", precision="fp32")
    exc, text = info.value, str(info.value)
    assert isinstance(exc, BundleError), f"{type(exc).__name__}: {text}"
    assert "\n" not in text and str(folder) in text, text
    assert re.search(case.pattern, text), text


@pytest.fixture
def quick_prompts(monkeypatch):
    """Region prompt embeddings as fixed random unit vectors: a bundle that loads then predicts without spending
    seconds on its prompts (the catalogue is about loading; the text tower is exercised by the core tests)."""
    from napari_cytoclip.models.model import CytoClip

    def region_embeddings(self, regions=None):
        regions = self.regions if regions is None else regions
        emb = np.random.default_rng(0).normal(size=(len(regions), 32)).astype(np.float32)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    monkeypatch.setattr(CytoClip, "region_embeddings", region_embeddings)
    monkeypatch.setattr(CytoClip, "embed_dim", 32)


@pytest.mark.parametrize("case", _params("cli"))
def test_bundle_catalogue_cli(case, tiny_dir, image, tmp_path, capsys, quick_prompts):
    folder = make_case(case, tiny_dir, tmp_path)
    rc, _, err = run_cli(capsys, "predict", image, "--out", tmp_path / "results", "--model", folder,
                         "--pixel-size", PX, "--device", "cpu", "--precision", "fp32", "--quiet")
    assert_cli_refused(rc, err, str(folder))
    assert re.search(case.pattern, err), err
    assert not (tmp_path / "results" / "section").exists()


def test_regions_csv_catalogue(tmp_path):
    """The regions CSV of plain open_clip checkpoints: the same rules, the same one-line errors."""
    from napari_cytoclip.models.bundle import load_regions_csv

    cases = {
        "missing.csv": (None, r"not found"),
        "empty.csv": ("", r"header"),
        "no_name.csv": ("id,label\n1,cortex\n", r"header"),
        "duplicate.csv": ("id,name\n1,a\n1,b\n", r"duplicate region ids \[1\]"),
        "bad_colour.csv": ("id,name,color\n1,a,blue\n", r"colour 'blue'"),
        "bad_id.csv": ("id,name\nx,a\n", r"integer 'id'"),
        "not_utf8.csv": (b"id,name\n1,\xff\xfe\n", r"cannot read"),
    }
    for name, (content, pattern) in cases.items():
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(BundleError) as info:
            load_regions_csv(path)
        assert str(path) in str(info.value) and re.search(pattern, str(info.value)), (name, str(info.value))
    good = tmp_path / "good.csv"
    good.write_text("id,name,acronym,color,description,prompts\n1,Cortex,CTX,#ff0000,layers,a|b\n2,Striatum,,,,\n")
    regions = load_regions_csv(good)
    assert [r.id for r in regions] == [1, 2] and regions[0].prompts == ("a", "b") and regions[1].texts()


# ------------------------------------------------------------------------------------------ pickles
class Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_payload_is_live(tmp_path):
    """The payload works: plain unpickling creates the marker (so its absence below means something)."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()


def evil_zip(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"visual.proj": torch.zeros(2), "payload": Payload(marker)}, path)
    return path


def evil_legacy(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": {"w": Payload(marker)}}, protocol=2))
    return path


def small_pairs(folder: Path, n: int = 8) -> Path:
    from napari_cytoclip.teach.pairs import Pair, write_pairs

    rng = np.random.default_rng(0)
    write_pairs(folder, [Pair(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), f"a tile of region {k % 2 + 1}",
                              {"region_id": k % 2 + 1}) for k in range(n)])
    return folder


def _read_state_dict(tmp, marker, writer):
    from napari_cytoclip.models.model import read_state_dict

    path = writer(tmp / "checkpoint.pt", marker)
    return path, lambda: read_state_dict(path)


def _bundle_weights(tmp, marker, tiny_dir):
    from napari_cytoclip.models.model import load_model

    folder = tmp / "bundle"
    shutil.copytree(tiny_dir, folder)
    evil_zip(folder / "weights.safetensors", marker)
    return folder / "weights.safetensors", lambda: load_model(folder, device="cpu", precision="fp32")


def _checkpoint_model(tmp, marker):
    from napari_cytoclip.models.import_checkpoint import load_checkpoint_model

    csv_path = tmp / "regions.csv"
    csv_path.write_text("id,name\n1,cortex\n2,striatum\n")
    path = evil_zip(tmp / "open_clip.pt", marker)
    return path, lambda: load_checkpoint_model("ViT-S-32", path, csv_path, device="cpu")


def _cache(tmp, marker):
    from napari_cytoclip.inference.cache import CACHE_FORMAT, load_prediction

    folder = tmp / "cache"
    folder.mkdir()
    (folder / "prediction.json").write_text(json.dumps({"format": CACHE_FORMAT, "version": 1, "storage": "npz"}))
    payload = np.empty(1, dtype=object)
    payload[0] = Payload(marker)
    np.savez(folder / "embeddings.npz", cells=payload, labels=payload, confidence=payload, embeddings=payload)
    return folder / "embeddings.npz", lambda: load_prediction(folder)


def _train(tmp, marker, tiny_dir, planted: str):
    from napari_cytoclip.teach.train import TrainConfig, train

    pairs = small_pairs(tmp / "pairs")
    out = tmp / "trained"
    ckpt = tmp / "trained.ckpt"
    ckpt.mkdir()
    (ckpt / "cytoclip-train.json").write_text("{}")  # a checkpoint folder made by train, then tampered with
    path = evil_zip(ckpt / planted, marker)
    config = TrainConfig(epochs=1, batch_size=4, steps_per_epoch=1, warmup_steps=1, device="cpu", augment=False)
    return path, lambda: train([pairs], out, tiny_dir, config)


PICKLE_ENTRIES = {
    "read_state_dict_zip": lambda tmp, marker, tiny: _read_state_dict(tmp, marker, evil_zip),
    "read_state_dict_legacy_pickle": lambda tmp, marker, tiny: _read_state_dict(tmp, marker, evil_legacy),
    "bundle_weights_file": lambda tmp, marker, tiny: _bundle_weights(tmp, marker, tiny),
    "plain_open_clip_checkpoint": lambda tmp, marker, tiny: _checkpoint_model(tmp, marker),
    "embedding_cache_npz": lambda tmp, marker, tiny: _cache(tmp, marker),
    "train_resume_checkpoint": lambda tmp, marker, tiny: _train(tmp, marker, tiny, "last.pt"),
    "train_text_feature_cache": lambda tmp, marker, tiny: _train(tmp, marker, tiny, "text_features.pt"),
}
CLEAR_ERROR_BUG = ("train._resume/pooled_text_features: torch.load(weights_only=True) refuses the pickle (safe), but "
                   "the UnpicklingError escapes raw: no CytoclipError naming the checkpoint, a traceback in the CLI")


@pytest.mark.parametrize("entry", list(PICKLE_ENTRIES))
def test_malicious_pickle_is_never_unpickled(entry, tiny_dir, tmp_path):
    marker = tmp_path / "PWNED"
    path, load = PICKLE_ENTRIES[entry](tmp_path, marker, tiny_dir)
    with pytest.raises(Exception) as info:
        load()
    assert not marker.exists(), f"{entry}: the pickle ran code"
    assert not isinstance(info.value, (AssertionError, NameError, AttributeError)), info.value
    if not entry.startswith("train_"):  # the training entries: see test_malicious_checkpoint_error_is_clear
        assert isinstance(info.value, CytoclipError), f"{type(info.value).__name__}: {info.value}"
        assert str(path) in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not (tmp_path / "trained").exists()


@pytest.mark.parametrize("entry", ["train_resume_checkpoint", "train_text_feature_cache"])
def test_malicious_checkpoint_error_is_clear(entry, tiny_dir, tmp_path):
    marker = tmp_path / "PWNED"
    path, load = PICKLE_ENTRIES[entry](tmp_path, marker, tiny_dir)
    with pytest.raises(CytoclipError) as info:
        load()
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_cli_refuses_pickled_bundle_weights(tiny_dir, image, tmp_path, capsys):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_dir, folder)
    marker = tmp_path / "PWNED"
    evil_zip(folder / "weights.safetensors", marker)
    rc, _, err = run_cli(capsys, "predict", image, "--out", tmp_path / "results", "--model", folder,
                         "--pixel-size", PX, "--device", "cpu", "--quiet")
    assert_cli_refused(rc, err, str(folder / "weights.safetensors"))
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_the_package():
    """Every torch.load passes weights_only=True; no pickle.load(s), no np.load with allow_pickle."""
    root = Path(napari_cytoclip.__file__).parent
    problems = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(root)}:{node.lineno}"
            if owner == "torch" and name == "load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "cPickle", "dill", "joblib") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if owner in ("np", "numpy") and name == "load":
                flag = kwargs.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{where}: np.load without allow_pickle=False")
    assert not problems, problems
