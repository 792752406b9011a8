"""UI-thread stalls while the Predict widget predicts: a 10 ms QTimer heartbeat on napari's main thread.

    HF_HUB_OFFLINE=1 xvfb-run -a python benchmarks/bench_ui.py [--stride-um 100] [--plate 41] [--rerun]

A shown napari viewer (Xvfb, Qt's xcb platform: ``QT_QPA_PLATFORM=offscreen`` breaks napari's
canvas) with the bundled sample (Allen plate 41) and the "Predict regions" dock widget set to the
shipped model on the CPU. A ``QTimer`` fires every 10 ms on the main thread and records the gap
since the previous beat; the widget's own thread worker runs the prediction (``PredictWidget.run``,
the same as pressing Run). Reported: gaps while idle (baseline), while the worker loads the model,
and while it classifies tiles (the Labels layer updated batch by batch), and the time spent in the
widget's main-thread handlers (``_on_yielded`` per batch, ``_redraw`` at most every ``REDRAW_MS``,
the end-of-run steps), and for each stall (a gap over 100 ms) the handlers that ran during it
("other": a canvas redraw, other Qt events, or the GIL held by a worker thread) and the single calls
known to hold the GIL that overlapped it (garbage-collector passes, C-extension initialisation). ``--rerun``
predicts a second time with the model the widget cached. ``--plate N`` predicts Allen plate N.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Report  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PLUGIN = "napari-cytoclip"
REPORT = Report()  # the report, for --section
say = REPORT.say


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stride-um", type=float, default=100.0)
    ap.add_argument("--plate", type=int, default=None, help="an Allen plate number (default: the sample, 41)")
    ap.add_argument("--idle-s", type=float, default=2.0)
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("--rerun", action="store_true",
                    help="then predict again with the model the widget has cached (the 'rerun' phase)")
    ap.add_argument("--section", type=Path, help="README whose bench_ui section gets this run's report")
    args = ap.parse_args(argv)

    import fastpaths
    import napari
    import numpy as np
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_cytoclip.widgets import predict_widget as pw

    viewer = napari.Viewer(show=True)
    if args.plate is None:
        layers = viewer.open_sample(PLUGIN, "allen_plate_41")
        image = next(layer for layer in layers if layer.name.startswith("Allen Nissl plate"))
    else:
        from napari_cytoclip.teach import allen

        plate = next(p for p in allen.plates() if p.number == args.plate)
        image = viewer.add_image(np.asarray(plate.section().levels[0]),
                                 name=f"plate {plate.number}", scale=(plate.um_per_px,) * 2,
                                 metadata={"pixel_size_um": plate.um_per_px, "source": str(plate.image)})
    app = QApplication.instance()
    events = watch_gil_holders()
    phase = {"name": "opening the widget"}
    gaps: dict[str, list[float]] = {"opening the widget": [], "warm start": [], "idle": [],
                                    "loading model": [], "classifying": [], "finishing": [],
                                    "rerun (model cached)": []}
    calls: list[tuple[float, float, str]] = []  # (start, end, handler) of every timed handler call
    stalls: list[tuple[float, float, str]] = []  # (start, end, phase) of every gap over 100 ms
    last = [time.perf_counter()]
    widget = None

    def beat():
        now = time.perf_counter()
        gaps[phase["name"]].append(1000 * (now - last[0]))
        if now - last[0] > 0.1:
            stalls.append((last[0], now, phase["name"]))
        last[0] = now
        if widget is not None and phase["name"] == "loading model" and (
                widget.status.text().startswith(("Classifying", "0 /")) or "tissue tiles" in widget.status.text()):
            phase["name"] = "classifying"
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(beat)
    timer.start()
    already = [name for name in ("torch", "open_clip", "transformers") if name in sys.modules]
    t_open = time.perf_counter()
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Predict regions")
    open_ms = 1000 * (time.perf_counter() - t_open)
    calls.append((t_open, time.perf_counter(), "open widget"))
    widget.set_model_path(None)  # the shipped model on the default device ("auto": the CPU here)
    widget.image.value = image
    widget.stride.value = args.stride_um

    handler_ms: dict[str, list[float]] = {name: [] for name in (
        "_on_yielded", "_redraw", "_on_returned", "_finish_labels", "_finish_confidence", "_finish_views",
        "_end_run")}
    for name in handler_ms:
        original = getattr(pw.PredictWidget, name)

        def timed(self, *a, _orig=original, _name=name, **k):
            t = time.perf_counter()
            try:
                return _orig(self, *a, **k)
            finally:
                handler_ms[_name].append(1000 * (time.perf_counter() - t))
                calls.append((t, time.perf_counter(), _name))
        setattr(pw.PredictWidget, name, timed)

    def wait(seconds: float, until=None):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not (until and until()):
            app.processEvents()
            time.sleep(0.001)

    phase["name"] = "warm start"
    wait(120.0, until=lambda: widget._preload is None)  # the widget's warm start (libraries, model; thread worker)
    preload_s = time.perf_counter() - t_open
    phase["name"] = "idle"
    wait(args.idle_s)
    phase["name"] = "loading model"
    t0 = time.perf_counter()
    state = widget.run()
    run_call_ms = 1000 * (time.perf_counter() - t0)
    calls.append((t0, time.perf_counter(), "run"))
    assert state is not None, widget.status.text()
    wait(args.timeout_s, until=lambda: widget.worker is None)
    elapsed = time.perf_counter() - t0
    phase["name"] = "finishing"
    wait(0.5)
    rerun_s = None
    if args.rerun and state.complete:
        phase["name"] = "rerun (model cached)"
        t1 = time.perf_counter()
        again = widget.run()
        calls.append((t1, time.perf_counter(), "run"))
        assert again is not None, widget.status.text()
        wait(args.timeout_s, until=lambda: widget.worker is None)
        rerun_s = time.perf_counter() - t1
        phase["name"] = "finishing"
        wait(0.5)
        state = again if again.complete else state
    timer.stop()
    ok = state.complete
    pred = state.prediction
    say(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    say(f"Prediction in the widget's thread worker: {'complete' if ok else 'NOT complete: ' + widget.status.text()}, "
          f"{len(pred.cells) if pred else 0} tiles at {args.stride_um:g} um in {elapsed:.1f} s "
          f"({pred.timings.get('tiles_per_s', 0):.0f} tiles/s)" if pred else "")
    say(f"{'main-thread heartbeat (10 ms)':<30}{'beats':>7}{'median ms':>11}{'p99 ms':>9}{'max ms':>9}{'>100 ms':>9}")
    for name, g in gaps.items():
        if not g:
            continue
        arr = np.asarray(g)
        say(f"{name:<30}{len(arr):>7}{statistics.median(g):>11.1f}{np.percentile(arr, 99):>9.1f}{arr.max():>9.1f}"
              f"{int((arr > 100).sum()):>9}")
    for name, ms in handler_ms.items():
        if ms:
            say(f"handler {name}: {len(ms)} calls, median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms")
    if rerun_s is not None:
        say(f"rerun with the cached model: {rerun_s:.1f} s")
    say(f"PredictWidget.run() itself (first run) (main thread: checks, section, empty Labels layer): {run_call_ms:.0f} ms")
    layer = state.labels_layer
    if layer is not None:
        def refresh_ms(**kw):
            ts = []
            for _ in range(10):
                t = time.perf_counter()
                layer.refresh(**kw)
                app.processEvents()
                ts.append(1000 * (time.perf_counter() - t))
            return statistics.median(ts)
        full = refresh_ms()
        lean = refresh_ms(thumbnail=False, extent=False, highlight=False)
        say(f"Labels layer {layer.data.shape}: refresh() + events {full:.1f} ms; "
              f"refresh(thumbnail=False, extent=False, highlight=False) + events {lean:.1f} ms")
        made, added = napari_layer_add_ms(viewer, layer, app)
        say(f"napari alone, a copy of that layer (its data, colours, hover table), 5 times: Labels(...) "
            f"{made:.1f} ms, viewer.add_layer {added:.1f} ms (medians)")
        plain_made, plain_added = napari_layer_add_ms(viewer, layer, app, plain=True)
        say(f"napari's floor, an empty Labels layer of that shape with napari's defaults (uint8, no colours, no "
            f"table), 5 times: Labels(...) {plain_made:.1f} ms, viewer.add_layer {plain_added:.1f} ms (medians)"
            + ("; over 100 ms: the first run on an image cannot start without a stall on this machine, whatever "
               "the plugin does (a rerun reuses its layer)" if plain_added > 100 else ""))
    say("stalls over 100 ms (phase, ms, what ran on the main thread during it; 'other' = drawing, "
          "Qt events or the GIL held by a worker):")
    for a, b, name in stalls:
        inside = sorted({n for s0, s1, n in calls if s0 < b and s1 > a})
        held = [f"{what} {1000 * (s1 - s0):.0f} ms" for s0, s1, what in events if s0 < b and s1 > a]
        say(f"  {name:<20}{1000 * (b - a):7.0f} ms at {a - t0:7.2f} s  {', '.join(inside) or 'other'}"
              f"{'; during ' + ', '.join(held) if held else ''}")
    busy = [g for k in ("loading model", "classifying", "finishing", "rerun (model cached)") for g in gaps[k]]
    opening = gaps["opening the widget"] + gaps["warm start"]
    say(f"opening the widget: {open_ms:.0f} ms on the main thread; its warm start (libraries and model, in a thread worker) done "
          f"{preload_s:.1f} s after; largest gap meanwhile {max(opening, default=0):.0f} ms "
          f"({sum(g > 100 for g in opening)} over 100 ms); imported before it opened: {already or 'none of torch, open_clip, transformers'}")
    say(f"UI stall maximum during the prediction: {max(busy):.0f} ms (goal: none over 100 ms)")
    # after the run: fastpaths.machine() imports torch, which must not happen before the widget opens
    say(f"machine: {fastpaths.machine()}, Qt platform {os.environ.get('QT_QPA_PLATFORM', 'xcb (default)')}")
    if args.section:
        command = "HF_HUB_OFFLINE=1 xvfb-run -a .venv/bin/python benchmarks/bench_ui.py " + " ".join(argv or sys.argv[1:])
        REPORT.write(args.section, "bench_ui", command)
    viewer.close()
    return 0 if ok else 1


def napari_layer_add_ms(viewer, layer, app, times: int = 5, plain: bool = False) -> tuple[float, float]:
    """Median ms of napari's ``Labels(...)`` and ``viewer.add_layer`` for a copy of ``layer``: what adding
    a result layer costs napari itself, apart from the widget's work. ``plain``: an empty uint8 layer of the
    same shape with napari's default colours and no table instead (napari's own floor)."""
    import numpy as np
    from napari.layers import Labels

    made, added = [], []
    for i in range(times):
        t = time.perf_counter()
        if plain:
            copy = Labels(np.zeros(layer.data.shape, np.uint8), name=f"plain {i}")
        else:
            copy = Labels(np.array(layer.data), name=f"copy {i}", scale=layer.scale, translate=layer.translate,
                          opacity=layer.opacity, colormap=layer.colormap, features=layer.features)
        made.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        viewer.add_layer(copy)
        added.append(1000 * (time.perf_counter() - t))
        app.processEvents()
        viewer.layers.remove(copy)
        app.processEvents()
    return statistics.median(made), statistics.median(added)


def watch_gil_holders(min_s: float = 0.02) -> list[tuple[float, float, str]]:
    """``(start, end, what)`` of the single calls that hold the GIL long, appended as they happen: the
    garbage collector's passes (``gc.callbacks``) and C-extension module initialisation
    (``_imp.create_dynamic``, e.g. ``torch._C``). This benchmark owns its process, so it may hook both."""
    import _imp
    import gc

    events: list[tuple[float, float, str]] = []
    started: dict = {}

    def on_gc(step, info):
        if step == "start":
            started["gc"] = time.perf_counter()
        elif "gc" in started:
            t = started.pop("gc")
            if time.perf_counter() - t >= min_s:
                events.append((t, time.perf_counter(), f"gc generation {info['generation']} pass"))
    gc.callbacks.append(on_gc)
    create = _imp.create_dynamic

    def create_dynamic(spec, *args):
        t = time.perf_counter()
        try:
            return create(spec, *args)
        finally:
            if time.perf_counter() - t >= min_s:
                events.append((t, time.perf_counter(), f"{spec.name} C-extension init"))
    _imp.create_dynamic = create_dynamic
    return events


if __name__ == "__main__":
    sys.exit(main())
