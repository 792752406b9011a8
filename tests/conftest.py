"""Shared pytest hooks.

GUI tests (those using ``make_napari_viewer``, ``qtbot`` or ``qapp``, or marked ``gui``) need an X
display: Xvfb (started by pytest-xvfb) or ``$DISPLAY``, and the xcb libraries Qt's platform plugin
loads. Without them Qt aborts the whole run ("Fatal Python error: Aborted"), so this file checks
for them before anything creates a Qt application; when something is missing it keeps pytest-xvfb
from starting and skips the GUI tests with one line naming what is missing and how to install it.
``CYTOCLIP_FAKE_NO_DISPLAY=1`` makes the check report everything missing (for testing this file).
"""
from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
from collections import Counter

import pytest

EXIT_STATUS = pytest.StashKey[int]()

RELIABILITY_PREFIX = "test_reliability_"
GUI_FIXTURES = {"make_napari_viewer", "make_napari_viewer_proxy", "qtbot", "qapp"}
# the libraries Qt's xcb platform plugin needs beyond a plain X client, and their Debian packages
XCB_LIBS = {"libxcb-icccm.so.4": "libxcb-icccm4", "libxcb-keysyms.so.1": "libxcb-keysyms1",
            "libxkbcommon-x11.so.0": "libxkbcommon-x11-0", "libxcb-cursor.so.0": "libxcb-cursor0"}
FAKE_NO_DISPLAY = "CYTOCLIP_FAKE_NO_DISPLAY"


def _have_library(soname: str) -> bool:
    name = soname[3:].split(".so")[0]  # libxcb-icccm.so.4 -> xcb-icccm
    found = ctypes.util.find_library(name)
    if found:
        return found == soname or found.startswith(soname)
    try:  # find_library can miss libraries without a dev symlink: ask the loader cache
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.strip().startswith(soname + " ") for line in listing.splitlines())


def display_problem() -> str | None:
    """None when GUI tests can run here, else one line naming what is missing and how to install it."""
    fake = os.environ.get(FAKE_NO_DISPLAY, "") not in ("", "0")
    missing, packages = [], []
    if fake or not (shutil.which("Xvfb") or os.environ.get("DISPLAY")):
        missing.append("Xvfb (and no $DISPLAY)")
        packages += ["xvfb", "xauth"]
    libs = [lib for lib in XCB_LIBS if fake or not _have_library(lib)]
    missing += libs
    packages += [XCB_LIBS[lib] for lib in libs]
    if not missing:
        return None
    return (f"GUI tests skipped: missing {', '.join(missing)}; install with: "
            f"sudo apt-get install -y {' '.join(packages)}")


DISPLAY_PROBLEM = display_problem()  # checked when pytest loads this file, before any Qt application exists


@pytest.hookimpl(optionalhook=True)
def pytest_xvfb_disable(config) -> bool:
    """Keep pytest-xvfb from starting (or looking for) Xvfb when the GUI tests cannot run anyway."""
    return DISPLAY_PROBLEM is not None


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gui: needs a napari viewer (Xvfb)")


def is_gui_test(item) -> bool:
    return bool(GUI_FIXTURES & set(getattr(item, "fixturenames", ()))) or item.get_closest_marker("gui") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Skip GUI tests before their fixtures would start Qt (one skip line for all of them with ``-ra``)."""
    if DISPLAY_PROBLEM is not None and is_gui_test(item):
        pytest.skip(DISPLAY_PROBLEM)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print how many cases of the reliability catalogue (tests/test_reliability_*.py) were collected."""
    session = getattr(terminalreporter, "_session", None)
    items = list(getattr(session, "items", None) or [])
    if items:
        modules = [getattr(getattr(item, "module", None), "__name__", "") or "" for item in items]
    else:  # no session items (e.g. an xdist controller): count the reported test ids instead
        ids = {getattr(rep, "nodeid", "") for reports in terminalreporter.stats.values() for rep in reports}
        modules = [nodeid.split("::")[0].rsplit("/", 1)[-1][:-3] for nodeid in ids if nodeid]
    per_module = Counter(name.rsplit(".", 1)[-1] for name in modules
                         if name.rsplit(".", 1)[-1].startswith(RELIABILITY_PREFIX))
    if not per_module:
        return
    parts = ", ".join(f"{name[len(RELIABILITY_PREFIX):]} {n}" for name, n in sorted(per_module.items()))
    terminalreporter.write_line(f"reliability catalogue: {sum(per_module.values())} cases ({parts})")


def pytest_sessionfinish(session, exitstatus) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Leave without interpreter finalisation once pytest and its plugins (Xvfb included) are done.

    After a full run (Qt, vispy, torch, zarr, dask in one process) CPython's final garbage collection
    has aborted in a C extension ("none_dealloc", exit 134) after every test had passed and the summary
    was printed; the exit status must be pytest's own. ``CYTOCLIP_TEST_FINALIZE=1`` keeps the normal exit.
    """
    import sys

    status = config.stash.get(EXIT_STATUS, None)
    if status is None or os.environ.get("CYTOCLIP_TEST_FINALIZE") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
