"""Memory for large arrays: plain pages instead of numpy's transparent-huge-page advice (numpy only)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

# Arrays of at least this many bytes get their own anonymous memory map (``zeros_plain_pages``).
PLAIN_PAGES_MIN_BYTES = 4 << 20
PLAIN_PAGES = True  # benchmarks/inference_overhead.py switches it off to measure the difference


def zeros_plain_pages(shape: tuple[int, ...], dtype: Any, order: str = "C") -> np.ndarray:
    """A zero-filled array in fresh anonymous memory pages, without numpy's huge-page advice.

    numpy asks Linux for transparent huge pages on large arrays (``madvise(MADV_HUGEPAGE)``). Where
    the kernel then compacts memory on the first touch and still finds no huge page, as on the 2-core
    machine of the benchmarks, the first write costs several times more than with ordinary pages
    (550 MB: 1.3 s against 0.3 s there, timed once by hand; for the whole ``predict`` of a
    512 x 512 x 300 CT it was 3 % of the wall time, ``benchmarks/results/inference_overhead.md``).
    Large write-once stores gain nothing from huge pages, so they take plain pages from an anonymous
    ``mmap`` (zeroed by the kernel, freed with the array).
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if not PLAIN_PAGES or nbytes < PLAIN_PAGES_MIN_BYTES:
        return np.zeros(shape, dt, order=order)
    import mmap

    return np.ndarray(shape, dt, buffer=mmap.mmap(-1, nbytes), order=order)


def release_in_background(held: list[Any], delay_s: float = 1.0) -> threading.Thread:
    """Let go of the objects in ``held`` (emptied here) from a daemon thread, ``delay_s`` from now.

    Freeing arrays in plain pages (``zeros_plain_pages``) unmaps them page by page: 150 MB took
    47 ms here, on whichever thread dropped the last reference. CPython's ``mmap`` releases the GIL
    while it unmaps, so done from another thread it does not hold up the caller (a GUI's event loop:
    its longest gap stayed under 1 ms while 150 MB were freed beside it). The delay lets the caller
    drop its own references first, so that the last one is this thread's.
    """
    items = list(held)
    held.clear()

    def drop() -> None:
        time.sleep(delay_s)
        items.clear()

    thread = threading.Thread(target=drop, name="napari-apl-release", daemon=True)
    thread.start()
    return thread


def set_numpy_huge_pages(enabled: bool) -> bool | None:
    """Turn numpy's huge-page advice for large arrays on or off; return the previous setting.

    ``None`` (nothing changed) when the user chose with ``NUMPY_MADVISE_HUGEPAGE`` or this numpy
    has no such switch. The command line turns the advice off while it runs, for the reason given in
    ``zeros_plain_pages``: every large temporary array of a prediction then costs ordinary page faults.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return None
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    return None if setter is None else bool(setter(bool(enabled)))
