"""benchmarks/bench_predict.py's report: medians with spread over rounds, and no "met" the machine cannot resolve."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_predict as bp  # noqa: E402  (benchmarks/bench_predict.py)


@pytest.mark.parametrize("values, goal, loads, also_one, expected", [
    ([0.95, 1.0, 1.1], 0.9, [1.0, 1.5], False, "met"),
    ([0.5, 0.6, 0.7], 0.9, [1.0, 1.5], False, "not met"),
    ([0.8, 0.95, 1.0], 0.9, [1.0], False, "unresolved on this machine (rounds on both sides of 0.9)"),
    ([0.95, 1.05, 1.2], 0.9, [1.0], True, "unresolved on this machine (rounds on both sides of 1.0)"),
    ([0.95, 1.0, 1.1], 0.9, [1.0, 6.5], False, "unresolved on this machine (load 6.5 > 2 cores)"),
    ([3.0, 4.0, 5.0], 1.0, [2.0], False, "met"),  # load equal to the cores is not overloaded
])
def test_verdict(values, goal, loads, also_one, expected):
    assert bp.verdict(values, goal, loads, 2, also_one) == expected


def _round(enc_s, e2e_s, load):
    return {"encoder": {"tiles": 600, "wall_s": enc_s, "cpu_s": 2 * enc_s, "load": load},
            "e2e": {"tiles": 640, "steady_tiles": 600, "steady_wall_s": e2e_s, "steady_cpu_s": 2 * e2e_s,
                    "reader_thread_cpu_s": 0.6, "load": load},
            "naive": {"tiles": 300, "wall_s": 20.0, "cpu_s": 40.0, "load": load},
            "stages": {"read": {"wall_s": 0.7, "cpu_s": 0.6, "thread_cpu_s": 0.6, "load": load},
                       "aggregate": {"wall_s": 0.1, "cpu_s": 0.1, "load": load},
                       "write": {"wall_s": 1.0, "cpu_s": 0.9, "load": load}}}


def _results(rounds):
    return {"command": "cmd", "date": "d", "machine": "m", "cores": 2, "slide": "/s/slide40k.tif",
            "shape": [40960, 40960], "pixel_size_um": 2.5, "grid": [1024, 1024], "grid_stride_um": 100.0,
            "grid_cells": 1048576, "tissue_cells": 360000, "background_skipped": 0.656, "plan_s": 1.0,
            "plan_load": 1.0, "batch": 64, "timed_tiles": 600, "naive_cells": 300, "rounds": rounds}


def test_report_gives_the_median_and_spread_not_the_best_round():
    # ratios 0.5, 1.0, 2.0: the best round (2.0) must not be the reported figure
    lines, goals = bp.report(_results([_round(10.0, 20.0, 1.0), _round(10.0, 10.0, 1.5), _round(20.0, 10.0, 1.2)]))
    text = "\n".join(lines)
    assert "| end to end / encoder, wall (goal >= 0.9) | 1.00 (0.50-2.00) |" in text
    assert "unresolved on this machine (rounds on both sides of 1.0)" in goals[0]
    assert "not measured" in goals[-1]  # no memory runs: no memory figure
    assert "1.0 to 1.5 on 2 cores" in text


def test_report_on_a_loaded_machine_never_says_met():
    lines, goals = bp.report(_results([_round(10.0, 9.0, 7.0)] * 3))
    assert "met |" not in "\n".join(goals).replace("not met |", "")
    assert all("unresolved on this machine (load 7.0 > 2 cores)" in g for g in goals[:2])


def test_write_section_replaces_only_its_section_and_goal_rows(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("| goal | measured | met? |\n|---|---|---|\n| end-to-end / bare-encoder old | 1.35 | yes |\n"
                      "| other goal | 40 ms | yes |\n\n" + bp.BEGIN + "\nold 1.72x\n" + bp.END + "\n\n## next\n")
    bp.write_section(readme, ["new section"], ["| end-to-end / bare-encoder new | 1.00 | unresolved |"])
    text = readme.read_text()
    assert "1.35" not in text and "1.72x" not in text and "| other goal | 40 ms | yes |" in text
    assert "| end-to-end / bare-encoder new | 1.00 | unresolved |" in text and text.endswith("\n\n## next\n")
    assert bp.BEGIN + "\nnew section\n" + bp.END in text


def test_benchmark_report_writes_this_runs_lines_between_markers(tmp_path, capsys):
    from report import Report  # benchmarks/report.py: bench_flat's and bench_ui's --section

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench_x:begin -->\nold figures\n<!-- bench_x:end -->\nafter\n")
    report = Report()
    report.say("ratio", 0.91)
    report.say("load 1.2")
    report.write(readme, "bench_x", "python benchmarks/bench_x.py")
    assert capsys.readouterr().out == "ratio 0.91\nload 1.2\n"
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "    python benchmarks/bench_x.py\n\n```\nratio 0.91\nload 1.2\n```" in text
