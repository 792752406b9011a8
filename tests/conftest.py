"""Shared pytest hooks."""
from __future__ import annotations

from collections import Counter

RELIABILITY_PREFIX = "test_reliability_"


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
