"""The house (issue 12): import layers without cycles, one encode loop with cached features, a complete
cache signature, and a plugin that leaves its host process as it found it."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_bundle

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_cytoclip"
CORE = ("io", "inference", "models", "teach", "outputs")
GUI_ROOTS = {"qtpy", "napari", "PySide6", "PyQt5", "PyQt6", "PySide2", "vispy", "magicgui"}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


# ------------------------------------------------------------------------------ import graph
def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module named by an import statement (top-level or inside functions), with its line;
    imports under ``if TYPE_CHECKING:`` (never run) are left out."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names] + [(node.module, node.lineno)]
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for name, _ in _imports(path):
            if name in mods and name not in (m, "napari_cytoclip"):
                graph[m].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    edges = [f"{a} -> {b}" for comp in found for a in comp for b in sorted(graph[a]) if b in comp]
    assert not found, "import cycles:\n" + "\n".join(edges)


@pytest.mark.parametrize("folder", ["inference", "models", "teach", "outputs", "io", "io/reader.py"])
def test_core_never_imports_the_gui(folder):
    files = [PACKAGE / folder] if folder.endswith(".py") else sorted((PACKAGE / folder).rglob("*.py"))
    bad = [f"{f.relative_to(PACKAGE)}:{line} imports {name}" for f in files for name, line in _imports(f)
           if name.split(".")[0] in GUI_ROOTS or name.startswith("napari_cytoclip.widgets")]
    assert not bad, "\n".join(bad)


def test_core_imports_without_qt_or_napari():
    mods = sorted(m for m in _modules() if m.split(".")[1:2] and m.split(".")[1] in CORE
                  or m in ("napari_cytoclip.cli", "napari_cytoclip.errors"))
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(GUI_ROOTS)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------ features and signature
@pytest.fixture(scope="module")
def shipped():
    from napari_cytoclip.models.bundle import default_bundle_path
    from napari_cytoclip.models.model import load_model

    if not (default_bundle_path() / "weights.safetensors").is_file():
        pytest.skip("the shipped model is not installed")
    return load_model(None, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def small_section():
    from napari_cytoclip.io.sample_data import SAMPLE_DIR, plate_41_info
    from napari_cytoclip.io.sections import open_section, section_from_array

    info = plate_41_info()
    full = open_section(SAMPLE_DIR / info["image"], pixel_size_um=float(info["pixel_size_um"]))
    h, w = full.shape
    crop = np.asarray(full.levels[0])[h // 4:h // 4 + 300, w // 4:w // 4 + 300]
    return section_from_array(crop, float(info["pixel_size_um"]), name="crop")


def test_features_come_from_the_same_forward_pass(shipped, small_section):
    from napari_cytoclip.inference.predict import predict_iter
    from napari_cytoclip.inference.resampled import ResampledReader
    from napari_cytoclip.teach.features import tower_features

    gen = predict_iter(small_section, shipped, batch_size=16)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        pred = stop.value
    assert pred.feature_kind == "pooled" and pred.features.dtype == np.float16
    assert pred.features.shape == (len(pred.cells), 1280)
    assert pred.signature["precision"] == "fp32" and pred.signature["features"] == "pooled"
    centres = pred.grid.centers(pred.cells[:5])
    joint, pooled = tower_features(shipped, ResampledReader(small_section, shipped.input, pred.polarity).read(centres))
    np.testing.assert_allclose(pred.features[:5].astype(np.float32), pooled, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(pred.embeddings[:5].astype(np.float32), joint, atol=2e-3)


def test_teaching_features_are_what_a_prediction_caches(shipped, small_section):
    """teach.features.section_features (the teaching benchmark's features) reads and encodes like a prediction:
    the same cells, joint embeddings and pooled features; with ``every`` only the subsampled cells, same rows."""
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.teach.features import section_features

    pred = predict_section(small_section, shipped, batch_size=16)
    feats = section_features(small_section, shipped, batch_size=16)
    np.testing.assert_array_equal(feats.cells, pred.cells)
    np.testing.assert_array_equal(feats.joint, np.asarray(pred.embeddings, np.float16))
    np.testing.assert_array_equal(feats.pooled, np.asarray(pred.features))
    every = section_features(small_section, shipped, batch_size=16, every=2)
    keep = (pred.cells[:, 0] % 2 == 0) & (pred.cells[:, 1] % 2 == 0)
    assert 0 < len(every.cells) < len(pred.cells)
    np.testing.assert_array_equal(every.cells, pred.cells[keep])
    np.testing.assert_allclose(every.pooled.astype(np.float32), np.asarray(pred.features[keep], np.float32),
                               rtol=0.02, atol=0.02)  # other batches: oneDNN rounding may differ slightly


def test_large_predictions_stream_embeddings_and_features_to_disk(shipped, small_section, monkeypatch):
    """Above MEMORY_ROWS_BYTES the rows go to a temporary zarr store as they come (issue 15: memory does not
    grow with the section); labels, embeddings and features are the same as in memory."""
    from napari_cytoclip.inference import encode
    from napari_cytoclip.inference.predict import predict_section

    in_memory = predict_section(small_section, shipped, batch_size=16)
    assert isinstance(in_memory.embeddings, np.ndarray) and isinstance(in_memory.features, np.ndarray)
    monkeypatch.setattr(encode, "MEMORY_ROWS_BYTES", 1024)
    streamed = predict_section(small_section, shipped, batch_size=16)
    assert not isinstance(streamed.embeddings, np.ndarray) and not isinstance(streamed.features, np.ndarray)
    np.testing.assert_array_equal(streamed.embeddings[:], in_memory.embeddings)
    np.testing.assert_array_equal(streamed.features[:], in_memory.features)
    np.testing.assert_array_equal(streamed.labels, in_memory.labels)
    np.testing.assert_array_equal(streamed.confidence, in_memory.confidence)
    sim = streamed.similarity(shipped.encode_texts(["striatum"])[0])
    np.testing.assert_allclose(sim, in_memory.similarity(shipped.encode_texts(["striatum"])[0]), atol=1e-6)


@pytest.mark.parametrize("large_cells", [10 ** 9, 0], ids=["npy", "zarr"])
def test_features_round_trip_through_the_cache_lazily(shipped, small_section, tmp_path, large_cells):
    from napari_cytoclip.inference.cache import expected_signature, load_prediction, save_prediction
    from napari_cytoclip.inference.predict import predict_section

    pred = predict_section(small_section, shipped, batch_size=32)
    save_prediction(pred, tmp_path / "cache", large_cells=large_cells)
    back = load_prediction(tmp_path / "cache", expected_signature(small_section, shipped.identity, pred.grid))
    assert not isinstance(back.features, np.ndarray) or isinstance(back.features, np.memmap)  # lazy
    np.testing.assert_array_equal(np.asarray(back.features[:]), pred.features)
    assert back.feature_kind == "pooled"


@pytest.mark.parametrize("other", [{"precision": "bf16"}, {"features": "pooled"}, {"weights_hash": "0" * 64}],
                         ids=["precision", "feature_kind", "weights"])
def test_a_cache_of_another_precision_or_feature_kind_is_refused(tmp_path, other):
    from dataclasses import replace

    from napari_cytoclip.errors import CacheMismatch
    from napari_cytoclip.inference.cache import expected_signature, load_prediction, save_prediction
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import section_from_array
    from napari_cytoclip.models.model import load_model

    model = load_model(tiny_bundle(tmp_path / "tiny"), device="cpu", precision="fp32")
    rng = np.random.default_rng(0)
    section = section_from_array((rng.random((200, 200)) * 120).astype(np.uint8), 10.0, name="noise")
    pred = predict_section(section, model)
    save_prediction(pred, tmp_path / "cache")
    good = model.identity
    load_prediction(tmp_path / "cache", expected_signature(section, good, pred.grid))
    load_prediction(tmp_path / "cache", expected_signature(section, model.bundle, pred.grid))  # any precision
    with pytest.raises(CacheMismatch):
        load_prediction(tmp_path / "cache", expected_signature(section, replace(good, **other), pred.grid))


# ------------------------------------------------------------------------------ a good citizen
def _process_state() -> dict:
    import logging
    import warnings

    import torch
    from PIL import Image
    from transformers.utils import logging as hf_logging

    fresh: list = []
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    return {"environ": dict(os.environ), "pil": Image.MAX_IMAGE_PIXELS, "torch_threads": torch.get_num_threads(),
            "fresh_thread_torch_threads": fresh[0],
            "priority": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
            "root_log_level": logging.getLogger().level, "transformers_verbosity": hf_logging.get_verbosity(),
            "transformers_progress_bars": hf_logging.is_progress_bar_enabled(),
            "warning_filters": list(warnings.filters)}


def _load_predict_query_and_run_the_widget_steps(folder: Path) -> None:
    """What the plugin does in napari's process: load a model, read a PNG, predict, query, re-decode, and
    the widget's prediction steps (without Qt)."""
    from PIL import Image

    from napari_cytoclip.inference.grid import TileGrid
    from napari_cytoclip.inference.predict import predict_section
    from napari_cytoclip.io.sections import open_section
    from napari_cytoclip.models.model import load_model
    from napari_cytoclip.widgets.predict_steps import prediction_steps
    from napari_cytoclip.widgets.state import PredictionState

    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((300, 300)) * 150).astype(np.uint8)).save(folder / "section.png")
    model = load_model(tiny_bundle(folder / "tiny"), device="cpu", precision="fp32")
    section = open_section(folder / "section.png", pixel_size_um=10.0)  # a PIL read
    pred = predict_section(section, model)
    sim = pred.similarity(model.encode_texts(["a brand new query text"])[0])
    pred.decode(model.region_embeddings())
    state = PredictionState(image_name="s", section=section, grid=TileGrid.covering(section.shape, 10.0, 100.0),
                            bundle=model.bundle, model_key=("x", "cpu"), stride_um=100.0, image_scale=(1.0, 1.0),
                            image_translate=(0.0, 0.0))
    state.model = model
    steps = prediction_steps(state, "cpu", 64, folder / "cache")
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        assert stop.value is not None
    assert np.isfinite(sim).any()


def test_prediction_and_query_leave_the_process_as_they_found_it(tmp_path):
    """Environment, PIL's limit, torch threads, priority, logging and warning filters are as they were.
    The first round also imports what the libraries import lazily (some add warning filters of their own):
    logging is compared across it, everything across the second."""
    import logging

    from transformers.utils import logging as hf_logging

    from napari_cytoclip.models.model import preload_libraries

    preload_libraries()
    logs = (logging.getLogger().level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    _load_predict_query_and_run_the_widget_steps(tmp_path / "first")
    assert (logging.getLogger().level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == logs
    before = _process_state()
    _load_predict_query_and_run_the_widget_steps(tmp_path / "second")
    assert _process_state() == before


def test_loading_models_adds_no_root_log_handler(tmp_path):
    """open_clip's factory logs through module-level ``logging`` calls, which add a stderr handler to a root
    logger that has none (napari's case; pytest's own handlers hide it, hence a fresh interpreter): loading
    the shipped model, a config bundle with a built-in text tower and a named architecture adds none."""
    tiny = tiny_bundle(tmp_path / "tiny").path
    code = ("import logging, sys\n"
            "from napari_cytoclip.models.model import load_model\n"
            "from napari_cytoclip.models.bundle import ModelBundle, InputSpec, default_bundle_path\n"
            "from napari_cytoclip.models.open_clip_build import build_open_clip\n"
            "from napari_cytoclip.models.vocabularies import allen_mouse_regions\n"
            "assert logging.getLogger().handlers == []\n"
            "if (default_bundle_path() / 'weights.safetensors').is_file(): load_model(None, device='cpu')\n"
            "load_model(sys.argv[1], device='cpu')\n"
            "build_open_clip(ModelBundle(name='rn', architecture={'name': 'RN50'}, input=InputSpec(224, (1000.0,)),\n"
            "                            regions=allen_mouse_regions(), label_um=1000.0, stride_um=1000.0),\n"
            "                load_text_weights=False)\n"
            "print(logging.getLogger().handlers)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tiny)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "initialized randomly" not in out.stderr and "no CLIP weights" not in out.stderr


def test_the_small_work_thread_runs_torch_on_one_thread_without_changing_others():
    import torch

    from napari_cytoclip.inference.cputhreads import run_small

    main_before = torch.get_num_threads()
    fresh = []
    assert run_small(torch.get_num_threads) == 1
    t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == main_before and fresh == [main_before]


def test_only_the_runs_own_thread_is_reniced():
    from napari_cytoclip.inference.cputhreads import run_in_owned_thread

    def work():
        yield os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return threading.current_thread().name

    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    gen = run_in_owned_thread(work(), niceness=me + 3, name="cytoclip-test")
    assert next(gen) == me + 3
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == "cytoclip-test"
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == me


def test_the_cli_predicts_offline_without_hf_variables(tmp_path):
    from napari_cytoclip.models.bundle import default_bundle_path

    if not (default_bundle_path() / "weights.safetensors").is_file():
        pytest.skip("the shipped model is not installed")
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    unreachable = "http://127.0.0.1:9"  # nothing listens: any download attempt fails
    env.update(HTTP_PROXY=unreachable, HTTPS_PROXY=unreachable, http_proxy=unreachable, https_proxy=unreachable,
               HF_HOME=str(tmp_path / "hf_home"), NO_PROXY="", no_proxy="")
    code = ("import os, sys\nfrom napari_cytoclip.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            f"assert not any(k in os.environ for k in {OFFLINE_VARS!r}), 'the CLI set an HF variable'\n"
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "predict", "--sample", "--stride-um", "400", "--quiet",
                          "--out", str(tmp_path / "results")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "results" / "plate_41" / "labels.tif").is_file() or any((tmp_path / "results").iterdir())


def test_the_cli_quiets_library_chatter_and_puts_logging_back(tmp_path, capsys, caplog):
    """The command line owns its process: open_clip's "no pretrained weights loaded" and transformers' load
    reports are not shown while a command loads a model, and logging is as it was when ``main`` returns."""
    import logging

    from PIL import Image
    from transformers.utils import logging as hf_logging

    from napari_cytoclip.cli import main

    rng = np.random.default_rng(2)
    Image.fromarray((rng.random((300, 300)) * 150).astype(np.uint8)).save(tmp_path / "section.png")
    bundle = tiny_bundle(tmp_path / "tiny").path  # builds a model itself, with the chatter
    caplog.clear()
    before = (logging.getLogger().level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    rc = main(["predict", str(tmp_path / "section.png"), "--pixel-size", "10", "--model", str(bundle),
               "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    chatter = [r.getMessage() for r in caplog.records if "weights" in r.getMessage().lower()]
    assert rc == 0 and not chatter and "weights" not in err.lower(), (chatter, err)
    assert (logging.getLogger().level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
