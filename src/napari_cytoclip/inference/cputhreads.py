"""Run small torch work on one CPU thread.

On a 2-core machine with the other core busy (the viewer, another process), every torch op that opens an
OpenMP region waits for the descheduled second thread: a text query took ~530 ms on two threads and ~20 ms on
one, a 100k x 256 similarity 70-250 ms against 7 ms (measured here). Interactive work (text queries,
re-decoding) is small enough that one thread is always the faster choice.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``: unchanged), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
