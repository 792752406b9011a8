"""Threads this package owns: one for small interactive torch work, and run-scoped low-priority workers.

**Small work on one CPU thread.** On a 2-core machine with the other core busy (the viewer, another
process), every torch op that opens an OpenMP region waits for the descheduled second thread: a text
query took ~530 ms on two threads and ~20 ms on one, a 100k x 256 similarity 70-250 ms against 7 ms
(measured here). Interactive work (text queries, similarity, re-decoding) therefore runs in one
package-owned thread (:func:`run_small`) whose torch thread count is set to 1 once, when it starts;
nothing flips ``torch.set_num_threads`` per call any more.

Measured here (torch 2.14, OpenMP backend, ``tests/test_house.py`` checks it): ``torch.set_num_threads(1)``
called inside a package thread leaves ``torch.get_num_threads()`` of the main thread (and of every
thread that already ran torch) unchanged: OpenMP's thread count is a per-thread setting (ICV), and MKL's
is set thread-locally. It does change torch's process default, which a thread that first uses torch
*later* picks up (a fresh thread then saw 1, not 2). So the owned thread, right after setting its own
count, has a short-lived helper thread set the default back; from then on the process is as before and
only the owned thread runs on one thread.

**Lower priority only for our own threads.** :func:`run_in_owned_thread` runs a generator in a new
thread that this package creates (and that ends with the run), optionally at a lower CPU priority
(Linux ``nice``; torch's OpenMP team started from it inherits it). A pooled thread (napari's
QThreadPool) is never reniced: an unprivileged process cannot raise a priority back, so the pool would
keep it for whoever reuses the thread.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Generator, TypeVar

T = TypeVar("T")
SMALL_THREAD_NAME = "cytoclip-small"

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _one_thread() -> None:
    """Initializer of the owned thread: one torch thread here, the process default left as it was."""
    import torch

    before = torch.get_num_threads()  # this thread's first torch use: the process default
    torch.set_num_threads(1)          # this thread's OpenMP/MKL count, and (side effect) the process default
    restore = threading.Thread(target=torch.set_num_threads, args=(before,), name="cytoclip-threads-restore")
    restore.start()
    restore.join()


def run_small(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in the package's single-threaded torch worker; returns its result."""
    global _executor
    if threading.current_thread().name.startswith(SMALL_THREAD_NAME):
        return func(*args, **kwargs)
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=SMALL_THREAD_NAME,
                                           initializer=_one_thread)
        executor = _executor
    return executor.submit(func, *args, **kwargs).result()


def lower_priority(niceness: int) -> None:
    """Lower the calling thread's CPU priority to at least ``niceness`` (Linux; elsewhere nothing).

    Only for threads this package created and that end with their work (see :func:`run_in_owned_thread`).
    """
    if niceness <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), niceness))
    except (AttributeError, OSError):
        pass


def run_in_owned_thread(gen: Generator, *, niceness: int = 0, name: str = "cytoclip-run",
                        depth: int = 2) -> Generator:
    """Drive ``gen`` in a new package-owned thread (at ``niceness``); yields its items, returns its value.

    Closing the returned generator stops ``gen`` at its next item and waits for the thread to end.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        lower_priority(niceness)
        try:
            while not stop.is_set():
                try:
                    item = next(gen)
                except StopIteration as done:
                    put(("return", done.value))
                    return
                if not put(("item", item)):
                    return
        except BaseException as exc:  # handed to the consumer
            put(("error", exc))
        finally:
            gen.close()

    thread = threading.Thread(target=work, daemon=True, name=name)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "return":
                return value
            else:
                raise value
    finally:
        stop.set()
        thread.join()
